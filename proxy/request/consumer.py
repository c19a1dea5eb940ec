"""What API consumers see on the public port, under the reserved prefix (``/_meter`` by
default), authenticated with their own API key:

  GET /_meter/              the usage page (static HTML + inline JS, no CDN, no build step)
  GET /_meter/usage         current period per meter (display names, whole units), cost so
                            far, projection, daily cost, the upcoming invoice's lines,
                            credits, 90-day history, prices in words (``usage_report``)
  GET /_meter/events.csv    their own metered requests for ?from=&to= (default: this period)
  GET /_meter/events.json   the same as JSON
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

from proxy.admin.input import FieldError, time_range
from proxy.credits.service import CreditService
from proxy.periods import period_bounds
from proxy.reports.exports import stream_export
from proxy.reports.invoice_check import PreviewCache
from proxy.reports.usage_report import customer_report
from proxy.request.handler import Pipeline, error_response

_PAGE: bytes | None = None


def _page() -> bytes:
    global _PAGE
    if _PAGE is None:
        _PAGE = resources.files("proxy.static").joinpath("usage.html").read_bytes()
    return _PAGE


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _get_only(handler: Handler, query: frozenset[str]) -> Handler:
    """GET and HEAD only (else 405), and only the documented query parameters (else 400)."""
    async def get_only(request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            resp = error_response(405, "method_not_allowed", "Only GET is answered here.")
            resp.headers["Allow"] = "GET, HEAD"
            return resp
        unknown = request.query.keys() - query
        if unknown:
            return error_response(400, "invalid_request", "unknown query parameter(s): "
                                  + ", ".join(sorted(repr(u)[:40] for u in unknown)))
        return await handler(request)
    return get_only


class ConsumerApi:
    def __init__(self, pipeline: Pipeline, reader: Any, credits: CreditService | None,
                 previews: PreviewCache | None = None) -> None:
        self.p = pipeline
        self.reader = reader
        self.credits = credits
        self.previews = previews        # Stripe invoice previews (a Stripe key configured)

    def mount(self) -> None:
        h = self.p.reserved_handlers
        keys = frozenset(self.p._key_query)          # an API key may travel in the query
        h["/"] = h[""] = _get_only(self.page, keys)
        h["/usage"] = _get_only(self.usage, keys)
        h["/events.csv"] = _get_only(self.events_csv, keys | {"from", "to"})
        h["/events.json"] = _get_only(self.events_json, keys | {"from", "to"})

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(body=_page(), content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-store",
                                     "Content-Security-Policy":
                                         "default-src 'self'; script-src 'unsafe-inline';"
                                         " style-src 'unsafe-inline'; img-src 'self' data:"})

    def _who(self, request: web.Request) -> tuple[web.Response | None, str]:
        rid = request.headers.get("X-Request-Id", "")
        denied, _key_id, customer_id = self.p.authenticate(request, rid)
        return denied, customer_id

    async def usage(self, request: web.Request) -> web.Response:
        denied, cid = self._who(request)
        if denied is not None:
            return denied
        rt = self.p.rt
        cust = rt.keys.customers[cid]
        rt.store.try_materialize()
        preview = await self.previews.get(cust.stripe_customer_id) \
            if self.previews is not None and cust.stripe_customer_id else None
        report = await customer_report(rt.owners().usage, rt.rules, rt.prices(), cust,
                                       self.credits, preview=preview)
        return web.Response(body=orjson.dumps(report), content_type="application/json",
                            headers={"Cache-Control": "no-store"})

    async def _events(self, request: web.Request, fmt: str) -> web.StreamResponse:
        denied, cid = self._who(request)
        if denied is not None:
            return denied
        cust = self.p.rt.keys.customers[cid]
        start, end = period_bounds(cust.billing_anchor, time.time())
        try:
            s, e = time_range(request.query.get("from"), request.query.get("to"), start, end)
        except FieldError as exc:
            return error_response(400, "invalid_request", str(exc), extra={"param": exc.field})
        self.p.rt.store.try_materialize()
        return await stream_export(request, self.p.rt.owners().usage, cid, s, e, fmt)

    async def events_csv(self, request: web.Request) -> web.StreamResponse:
        return await self._events(request, "csv")

    async def events_json(self, request: web.Request) -> web.StreamResponse:
        return await self._events(request, "json")
