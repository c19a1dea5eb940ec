"""``POST /admin/reconcile``: the ledger against Stripe's meter event summaries.

Parameters (query string, or the same keys in an optional JSON body; the query wins):
  ``from``, ``to``   RFC 3339, a date or unix seconds (default: the last 48 hours)
  ``grace``          seconds, or with a unit: ``90s``, ``30m``, ``2h`` (default: the config's
                     ``stripe.reconcile_grace``, set by the composition root)
  ``customer``       reconcile one customer only
  ``dry_run``        ``true``: report only, make nothing due
  ``format``         ``json`` (default) or ``table`` (fixed-width text)
  ``all``            with ``format=table``: every hour, not only the discrepancies

A rules event name without a usable Stripe meter is a 400 whose ``error.missing`` lists the
names; a reconcile that cannot reach Stripe is a 502. Mounted behind the admin-token
middleware with the other admin routes.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from proxy.admin import jerror, jok
from proxy.reconcile import InvalidRange, ReconcileError, Reconciler, ReconcileRefused
from proxy.timeutil import parse_time

RECONCILER = web.AppKey("reconciler", Reconciler)
RECONCILE_GRACE = web.AppKey("reconcile_grace", float)

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_TRUE = ("1", "true", "yes")


def parse_grace(raw: Any) -> float:
    """Seconds from ``7200``, ``"7200"``, ``"90s"``, ``"30m"``, ``"2h"``, ``"1d"``."""
    if isinstance(raw, bool):
        raise ValueError("grace is a duration")
    if isinstance(raw, int | float):
        value = float(raw)
    else:
        text = str(raw).strip().lower()
        unit = _UNITS.get(text[-1:], 0.0)
        value = float(text[:-1]) * unit if unit else float(text)
    if not value >= 0:
        raise ValueError("grace must be a non-negative duration")
    return value


async def _params(request: web.Request) -> dict[str, Any]:
    out: dict[str, Any] = {}
    raw = await request.read()
    if raw.strip():
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ValueError("the body must be a JSON object") from exc
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        out.update(body)
    out.update(request.query)
    unknown = set(out) - {"from", "to", "grace", "customer", "dry_run", "format", "all"}
    if unknown:
        raise ValueError(f"unknown parameter(s): {', '.join(sorted(unknown))}")
    return out


def _flag(v: Any) -> bool:
    return v is True or str(v).lower() in _TRUE


async def post_reconcile(request: web.Request) -> web.Response:
    reconciler = request.app.get(RECONCILER)
    if reconciler is None:
        return jerror(409, "invalid_request", "reconcile needs Stripe: set stripe.api_key and a"
                      " meter events sink (meter_events or meter_event_stream)")
    try:
        p = await _params(request)
        start = parse_time(str(p["from"])) if p.get("from") not in (None, "") else None
        end = parse_time(str(p["to"])) if p.get("to") not in (None, "") else None
        grace = parse_grace(p["grace"]) if p.get("grace") not in (None, "") \
            else request.app.get(RECONCILE_GRACE, 7200.0)
        fmt = str(p.get("format") or "json")
        if fmt not in ("json", "table"):
            raise ValueError("format is json or table")
    except (ValueError, TypeError) as exc:
        return jerror(400, "invalid_request", str(exc))
    customer = p.get("customer")
    try:
        report = await reconciler.run(start, end, grace,
                                      customers=[str(customer)] if customer else None,
                                      dry_run=_flag(p.get("dry_run")))
    except ReconcileRefused as exc:
        return jok({"error": {"type": "invalid_request", "message": str(exc),
                              "missing": exc.missing}}, status=400)
    except InvalidRange as exc:
        return jerror(400, "invalid_request", str(exc))
    except ReconcileError as exc:
        return jerror(502, "stripe_unavailable", str(exc))
    if fmt == "table":
        return web.Response(text=report.to_table(all_hours=_flag(p.get("all"))),
                            content_type="text/plain")
    return jok(report.to_json())


def reconcile_routes() -> list[web.RouteDef]:
    return [web.post("/admin/reconcile", post_reconcile)]
