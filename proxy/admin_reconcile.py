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

from proxy import admin_input as ain
from proxy.admin import jerror, jok
from proxy.reconcile import InvalidRange, ReconcileError, Reconciler, ReconcileRefused
from proxy.store.keys import InvalidInput

RECONCILER = web.AppKey("reconciler", Reconciler)
RECONCILE_GRACE = web.AppKey("reconcile_grace", float)


def parse_grace(raw: Any) -> float:
    """Seconds from ``7200``, ``"7200"``, ``"90s"``, ``"30m"``, ``"2h"``, ``"1d"`` (up to 30 days)."""
    return ain.duration(raw, "grace")


async def _params(request: web.Request) -> dict[str, Any]:
    out: dict[str, Any] = {}
    raw = await request.read()
    if raw.strip():
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidInput("the body must be a JSON object") from exc
        if not isinstance(body, dict):
            raise InvalidInput("the body must be a JSON object")
        out.update(body)
    out.update(request.query)
    unknown = set(out) - {"from", "to", "grace", "customer", "dry_run", "format", "all"}
    if unknown:
        raise InvalidInput(f"unknown parameter(s): {', '.join(sorted(unknown))}")
    return out


def _given(p: dict[str, Any], name: str) -> bool:
    return p.get(name) not in (None, "")


async def post_reconcile(request: web.Request) -> web.Response:
    reconciler = request.app.get(RECONCILER)
    if reconciler is None:
        return jerror(409, "invalid_request", "reconcile needs Stripe: set stripe.api_key and a"
                      " meter events sink (meter_events or meter_event_stream)")
    try:
        p = await _params(request)
        start = ain.timestamp(p["from"], "from") if _given(p, "from") else None
        end = ain.timestamp(p["to"], "to") if _given(p, "to") else None
        grace = parse_grace(p["grace"]) if _given(p, "grace") \
            else request.app.get(RECONCILE_GRACE, 7200.0)
        fmt = ain.choice(p.get("format") or "json", "format", ("json", "table"))
        dry_run = ain.flag(p.get("dry_run", False), "dry_run")
        all_hours = ain.flag(p.get("all", False), "all")
        customer = p.get("customer")
        if customer is not None:
            customer = ain.text(customer, "customer", 128)
    except ain.FieldError as exc:
        return jerror(400, "invalid_request", str(exc), param=exc.field)
    except InvalidInput as exc:
        return jerror(400, "invalid_request", str(exc))
    try:
        report = await reconciler.run(None if start is None else float(start),
                                      None if end is None else float(end), grace,
                                      customers=[customer] if customer else None,
                                      dry_run=dry_run)
    except ReconcileRefused as exc:
        return jok({"error": {"type": "invalid_request", "message": str(exc),
                              "missing": exc.missing}}, status=400)
    except InvalidRange as exc:
        return jerror(400, "invalid_request", str(exc))
    except ReconcileError as exc:
        return jerror(502, "stripe_unavailable", str(exc))
    if fmt == "table":
        return web.Response(text=report.to_table(all_hours=all_hours),
                            content_type="text/plain")
    return jok(report.to_json())


def reconcile_routes() -> list[web.RouteDef]:
    return [web.post("/admin/reconcile", post_reconcile)]
