"""Step 7, the consumer routes: what API consumers see on the public port, under the reserved prefix (``/_meter`` by
default), authenticated with their own API key:

  GET /_meter/              the usage page (static HTML + inline JS, no CDN, no build step)
  GET /_meter/usage         current period per meter (display names, whole units), cost so
                            far, projection, daily cost, the upcoming invoice's lines,
                            Stripe's invoice preview beside them (none when the Stripe
                            customer is shared: ``invoice_check.billed_together``),
                            credits, 90-day history, prices in words (``usage_report``)
  GET /_meter/events.csv    their own metered requests for ?from=&to= (default: this period)
  GET /_meter/events.json   the same as JSON
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from importlib import resources

import orjson
from aiohttp import web

from proxy.admin.input import time_range
from proxy.credits.money import MoneyBook
from proxy.credits.service import CreditService
from proxy.errors import HttpError
from proxy.periods import period_bounds
from proxy.reports.exports import stream_export
from proxy.reports.invoice_check import PreviewCache, billed_together
from proxy.reports.usage_report import customer_report
from proxy.request.auth import Authenticator
from proxy.runtime import Runtime
from proxy.stripe.client import InvoicePreview

_PAGE: bytes | None = None


def _page() -> bytes:
    global _PAGE
    if _PAGE is None:
        _PAGE = resources.files("proxy.static").joinpath("usage.html").read_bytes()
    return _PAGE


Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def _get_only(handler: Handler, query: frozenset[str]) -> Handler:
    """GET and HEAD only (else 405), and only the documented query parameters (else 400)."""
    async def get_only(request: web.BaseRequest) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            raise HttpError("Only GET is answered here.", status=405,
                            type_="method_not_allowed", headers=_ALLOW)
        unknown = request.query.keys() - query
        if unknown:
            raise HttpError("unknown query parameter(s): "
                            + ", ".join(sorted(repr(u)[:40] for u in unknown)))
        return await handler(request)
    return get_only


_ALLOW = {"Allow": "GET, HEAD"}


class ConsumerApi:
    """Authenticates with the pipeline's authentication step (``proxy.request.auth``) and
    answers under ``prefix`` (``reserved_prefix``); its routes are handed to the pipeline,
    which routes them on the canonical path. Refusals are raised as ``HttpError``."""

    def __init__(self, rt: Runtime, auth: Authenticator, credits: CreditService | None,
                 previews: PreviewCache | None = None) -> None:
        self.rt = rt
        self.auth = auth
        self.credits = credits
        self.previews = previews        # Stripe invoice previews (a Stripe key configured)
        self.money: MoneyBook | None = None     # monetary credits (set by the composition root)

    def routes(self) -> list[web.RouteDef]:
        prefix = self.rt.cfg.reserved_prefix.rstrip("/")
        if not prefix:
            return []
        keys = frozenset(self.auth.key_query)          # an API key may travel in the query
        page = _get_only(self.page, keys)
        return [web.route("*", prefix, page), web.route("*", prefix + "/", page),
                web.route("*", prefix + "/usage", _get_only(self.usage, keys)),
                web.route("*", prefix + "/events.csv",
                          _get_only(self.events_csv, keys | {"from", "to"})),
                web.route("*", prefix + "/events.json",
                          _get_only(self.events_json, keys | {"from", "to"}))]

    async def page(self, request: web.BaseRequest) -> web.Response:
        return web.Response(body=_page(), content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-store",
                                     "Content-Security-Policy":
                                         "default-src 'self'; script-src 'unsafe-inline';"
                                         " style-src 'unsafe-inline'; img-src 'self' data:"})

    async def usage(self, request: web.BaseRequest) -> web.Response:
        cid = self.auth.authenticate(request).customer_id
        rt = self.rt
        cust = rt.keys.customers[cid]
        await rt.store.try_catch_up()
        preview: InvoicePreview | str | None = None
        shared = False
        if self.previews is not None and cust.stripe_customer_id:
            # a Stripe customer billed for several local customers: its preview is theirs too
            scid = cust.stripe_customer_id
            shared = len(await rt.owners().customers.by_stripe_id(scid)) > 1
            if not shared:
                preview = await self.previews.get(scid)
        report = await customer_report(rt.owners().usage, rt.rules, rt.prices(), cust,
                                       self.credits, preview=preview,
                                       account=self.money.account(cid) if self.money else None)
        if shared:
            report["invoice_preview"] = billed_together()
        return web.Response(body=orjson.dumps(report), content_type="application/json",
                            headers={"Cache-Control": "no-store"})

    async def _events(self, request: web.BaseRequest, fmt: str) -> web.StreamResponse:
        cid = self.auth.authenticate(request).customer_id
        cust = self.rt.keys.customers[cid]
        start, end = period_bounds(cust.billing_anchor, time.time())
        s, e = time_range(request.query.get("from"), request.query.get("to"), start, end)
        await self.rt.store.try_catch_up()
        return await stream_export(request, self.rt.owners().usage, cid, s, e, fmt)

    async def events_csv(self, request: web.BaseRequest) -> web.StreamResponse:
        return await self._events(request, "csv")

    async def events_json(self, request: web.BaseRequest) -> web.StreamResponse:
        return await self._events(request, "json")
