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

from proxy.admin import input as ain
from proxy.admin.api import RECONCILE_GRACE, RECONCILER, jok
from proxy.errors import HttpError, InvalidInput
from proxy.http_errors import error_response
from proxy.reconcile import InvalidRange, ReconcileError, ReconcileRefused


def parse_grace(raw: Any) -> float:
    """Seconds from ``7200``, ``"7200"``, ``"90s"``, ``"30m"``, ``"2h"``, ``"1d"`` (up to 30 days)."""
    return ain.duration(raw, "grace")


_NAMES = frozenset({"from", "to", "grace", "customer", "dry_run", "format", "all"})


async def _sources(request: web.Request) -> list[dict[str, Any]]:
    """The JSON body's parameters, then the query's (which win)."""
    raw = await request.read()
    body: Any = {}
    if raw.strip():
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidInput("the body must be a JSON object") from exc
        if not isinstance(body, dict):
            raise InvalidInput("the body must be a JSON object")
    query = dict(request.query)
    unknown = (set(body) | set(query)) - _NAMES
    if unknown:
        raise InvalidInput(f"unknown parameter(s): {', '.join(sorted(unknown))}")
    return [body, query]


def _parse(p: dict[str, Any]) -> dict[str, Any]:
    """Validate every parameter given (an empty or null value is invalid, not "absent")."""
    out: dict[str, Any] = {}
    for name in ("from", "to"):
        if name in p:
            out[name] = float(ain.timestamp(p[name], name))
    if "grace" in p:
        out["grace"] = parse_grace(p["grace"])
    if "format" in p:
        out["format"] = ain.choice(p["format"], "format", ("json", "table"))
    for name in ("dry_run", "all"):
        if name in p:
            out[name] = ain.flag(p[name], name)
    if "customer" in p:
        out["customer"] = ain.text(p["customer"], "customer", 128)
    return out


async def post_reconcile(request: web.Request) -> web.Response:
    reconciler = request.app.get(RECONCILER)
    if reconciler is None:
        return error_response(HttpError("reconcile needs Stripe: set stripe.api_key and a meter"
                                        " events sink (meter_events or meter_event_stream)",
                                        status=409))
    # answered here too (error_response, as the admin middleware does): the route also
    # works mounted without the admin app's middleware
    try:
        body, query = await _sources(request)
        p = _parse(body) | _parse(query)
    except InvalidInput as exc:
        return error_response(exc)
    customer = p.get("customer")
    try:
        report = await reconciler.run(p.get("from"), p.get("to"),
                                      p.get("grace", request.app.get(RECONCILE_GRACE, 7200.0)),
                                      customers=[customer] if customer else None,
                                      dry_run=p.get("dry_run", False))
    except ReconcileRefused as exc:
        return error_response(HttpError(str(exc), extra={"missing": exc.missing}))
    except InvalidRange as exc:
        return error_response(HttpError(str(exc)))
    except ReconcileError as exc:
        return error_response(HttpError(str(exc), status=502, type_="stripe_unavailable"))
    if p.get("format") == "table":
        return web.Response(text=report.to_table(all_hours=p.get("all", False)),
                            content_type="text/plain")
    return jok(report.to_json())


def reconcile_routes() -> list[web.RouteDef]:
    return [web.post("/admin/reconcile", post_reconcile)]
