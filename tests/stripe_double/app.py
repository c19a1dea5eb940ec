"""aiohttp server for the Stripe test double.

One server answers both of the SDK's base addresses ("api" and "meter_events").
Order of processing for a Stripe route: record the call -> auth -> Stripe-Version
-> draw a fault -> edge faults (reset/hang/429s) -> idempotency (replay or
mismatch) -> "500" fault -> the operation -> store the idempotent result
(2xx and 5xx, not 4xx: Stripe saves no result for requests that failed
validation) -> answer, or drop the connection for ``commit_then_drop``.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import orjson
from aiohttp import web

from .faults import FaultKind
from .invoices import preview as invoice_preview
from .invoices import preview_lines
from .state import (
    LEGACY_USAGE_CUTOFF,
    CallRecord,
    DoubleError,
    IdempotentResult,
    StripeDoubleState,
    invalid,
    parse_int,
)

STATE_KEY = web.AppKey("stripe_double_state", StripeDoubleState)
CLOSING_KEY = web.AppKey("stripe_double_closing", asyncio.Event)

_KEY_RE = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")


def parse_nested(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Rebuild Stripe's bracketed form encoding: ``payload[value]=3`` -> nested dicts.

    ``a[0][b]`` and ``a[]`` become lists.
    """
    root: dict[str, Any] = {}
    for key, value in pairs:
        m = _KEY_RE.match(key)
        if m is None:
            root[key] = value
            continue
        parts = [m.group(1), *re.findall(r"\[([^\[\]]*)\]", m.group(2))]
        node: dict[str, Any] = root
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if part == "":  # a[] appends
                part = str(sum(1 for k in node if k.isdigit()))
            if last:
                node[part] = value
            else:
                child = node.get(part)
                if not isinstance(child, dict):
                    child = {}
                    node[part] = child
                node = child
    out: dict[str, Any] = _listify(root)
    return out


def _listify(node: Any) -> Any:
    if isinstance(node, dict):
        conv = {k: _listify(v) for k, v in node.items()}
        if conv and all(k.isdigit() for k in conv):
            return [conv[k] for k in sorted(conv, key=int)]
        return conv
    return node


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(body),
        content_type="application/json",
        headers=headers,
    )


def _list_object(url: str, data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "has_more": has_more, "url": url}


def _paginate(items: list[dict[str, Any]], query: dict[str, Any], url: str) -> dict[str, Any]:
    limit_raw = query.get("limit")
    limit = 10 if limit_raw in (None, "") else parse_int(limit_raw, "limit")
    if not 1 <= limit <= 100:
        raise invalid("limit", "Invalid limit: must be between 1 and 100.", "parameter_invalid")
    start = 0
    after = query.get("starting_after")
    if after:
        ids = [it["id"] for it in items]
        if after not in ids:
            raise invalid(
                "starting_after",
                f"Invalid starting_after: no object with id '{after}' in this list.",
                "resource_missing",
            )
        start = ids.index(after) + 1
    page = items[start : start + limit]
    return _list_object(url, page, start + limit < len(items))


@dataclass
class Ctx:
    request: web.Request
    record: CallRecord
    params: dict[str, Any] = field(default_factory=dict)
    api_key: str = ""
    fault: FaultKind | None = None


Operation = Callable[[Ctx], Awaitable[tuple[int, Any]]]


class _Dropped(Exception):
    """The connection was dropped on purpose; no answer."""


class DoubleApp:
    def __init__(self, state: StripeDoubleState) -> None:
        self.state = state
        self.closing = asyncio.Event()

    # -- plumbing ------------------------------------------------------------
    def _headers(self, request_id: str, version: str | None) -> dict[str, str]:
        h = {"Request-Id": request_id}
        if version:
            h["Stripe-Version"] = version
        return h

    async def _drop(self, request: web.Request) -> None:
        transport = request.transport
        if transport is not None:
            transport.abort()
        raise _Dropped

    async def _hang(self, request: web.Request) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.state.faults.hang_seconds
        while loop.time() < deadline and not self.closing.is_set():
            transport = request.transport
            if transport is None or transport.is_closing():
                break  # the client gave up
            await asyncio.sleep(0.01)
        await self._drop(request)

    def _auth_key(self, request: web.Request) -> str:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            raise DoubleError(
                401,
                "You did not provide an API key. You need to provide your API key in the "
                "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer "
                "YOUR_SECRET_KEY').",
            )
        return auth[7:].strip()

    def _check_api_key(self, key: str) -> None:
        if not key.startswith("sk_test_"):
            shown = key[:8] + "*" * max(0, len(key) - 12) + key[-4:]
            raise DoubleError(401, f"Invalid API Key provided: {shown}", code="api_key_invalid")

    async def _params(self, request: web.Request, v2: bool) -> tuple[dict[str, Any], str]:
        """Parsed params and a canonical fingerprint for idempotency."""
        if request.method == "GET":
            pairs = list(request.query.items())
            return parse_nested(pairs), ""
        raw = await request.read()
        if v2:
            if not raw:
                return {}, ""
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise DoubleError(400, f"Invalid JSON body: {exc}", code="invalid_body") from exc
            if not isinstance(body, dict):
                raise DoubleError(400, "Request body must be a JSON object.", code="invalid_body")
            return body, orjson.dumps(body, option=orjson.OPT_SORT_KEYS).decode()
        ctype = request.headers.get("Content-Type", "")
        if raw and not ctype.startswith("application/x-www-form-urlencoded"):
            raise DoubleError(
                400, f"v1 request bodies must be form-encoded, got Content-Type {ctype!r}."
            )
        pairs = parse_qsl(raw.decode(), keep_blank_values=True)
        return parse_nested(pairs), orjson.dumps(sorted(pairs)).decode()

    async def serve(
        self,
        request: web.Request,
        route: str,
        op: Operation,
        *,
        v2: bool = False,
        session_auth: bool = False,
        idempotent: bool = False,
    ) -> web.StreamResponse:
        st = self.state
        request_id = f"req_{secrets.token_hex(7)}"
        version = request.headers.get("Stripe-Version")
        record = CallRecord(
            route=route,
            method=request.method,
            path=request.path,
            request_id=request_id,
            stripe_version=version,
            idempotency_key=request.headers.get("Idempotency-Key"),
            at=st.now(),
        )
        st.call_log.append(record)
        ctx = Ctx(request, record)
        hdrs = self._headers(request_id, version)
        idem_slot: tuple[str, str] | None = None
        fingerprint = ""
        try:
            try:
                key = self._auth_key(request)
                if session_auth:
                    st.check_session_token(key)
                else:
                    self._check_api_key(key)
                ctx.api_key = key
                if not version:
                    raise DoubleError(
                        400,
                        "The Stripe test double requires a Stripe-Version header on every call.",
                        code="stripe_version_missing",
                    )
                ctx.params, body_print = await self._params(request, v2)
                fingerprint = f"{request.method} {request.path} {body_print}"
                record.params = ctx.params
                ctx.fault = record.fault = st.faults.draw(route)
                await self._edge_fault(ctx)
                ikey = record.idempotency_key
                if idempotent and ikey:
                    idem_slot = (key, ikey)
                    replay = self._idempotency_lookup(idem_slot, fingerprint)
                    if replay is not None:
                        record.replayed = True
                        record.status = replay.status
                        return web.Response(
                            status=replay.status,
                            body=replay.body,
                            content_type="application/json",
                            headers={
                                **replay.headers,
                                **hdrs,
                                "Idempotent-Replayed": "true",
                                "Original-Request": replay.headers.get("Request-Id", ""),
                            },
                        )
                    st.idempotency_in_progress.add(idem_slot)
                if ctx.fault == "500":
                    raise DoubleError(
                        500,
                        "An unknown error occurred (injected by the Stripe test double).",
                        type="api_error",
                    )
                status, body = await op(ctx)
                resp = _json(status, body, hdrs)
            except DoubleError as err:
                resp = _json(err.status, err.body(), {**err.headers, **hdrs})
            status = resp.status
            replayable = 200 <= status < 300 or (status >= 500 and st.idempotency_replays_5xx)
            if idem_slot is not None and replayable:
                assert isinstance(resp.body, bytes)
                st.idempotency[idem_slot] = IdempotentResult(
                    fingerprint=fingerprint,
                    status=status,
                    body=resp.body,
                    headers={k: v for k, v in resp.headers.items() if k != "Content-Type"},
                    created=st.now(),
                )
            if ctx.fault == "commit_then_drop":
                await self._drop(request)
            record.status = status
            return resp
        except _Dropped:
            record.status = None
            return web.Response(status=500)  # never reaches the client
        finally:
            if idem_slot is not None:
                st.idempotency_in_progress.discard(idem_slot)
            if st.log is not None:
                st.log(
                    f"{request.method} {request.path} [{route}] -> "
                    f"{record.status if record.status is not None else 'DROPPED'}"
                    f"{' (replay)' if record.replayed else ''}"
                    f"{f' fault={record.fault}' if record.fault else ''}"
                    f" version={version}"
                )

    async def _edge_fault(self, ctx: Ctx) -> None:
        fault = ctx.fault
        if fault == "reset_before":
            await self._drop(ctx.request)
        elif fault == "hang":
            await self._hang(ctx.request)
        elif fault in ("429", "429_no_retry"):
            raise DoubleError(
                429,
                "Request rate limit exceeded. Learn more about rate limits here "
                "https://stripe.com/docs/rate-limits.",
                code="rate_limit",
                headers={
                    "Stripe-Rate-Limited-Reason": "global-rate",
                    **({"Stripe-Should-Retry": "true"} if fault == "429" else {}),
                },
            )
        elif fault == "lock_timeout":
            raise DoubleError(
                429,
                "This object cannot be accessed right now because another API request or "
                "Stripe process is currently accessing it. If you see this error "
                "intermittently, retry the request.",
                code="lock_timeout",
                headers={"Stripe-Should-Retry": "true"},
            )

    def _idempotency_lookup(
        self, slot: tuple[str, str], fingerprint: str
    ) -> IdempotentResult | None:
        st = self.state
        stored = st.idempotency.get(slot)
        if stored is not None and st.now() - stored.created > st.idempotency_ttl:
            del st.idempotency[slot]
            stored = None
        if stored is not None:
            if stored.fingerprint != fingerprint:
                raise DoubleError(
                    400,
                    "Keys for idempotent requests can only be used with the same parameters "
                    "they were first used with. Try using a key other than "
                    f"'{slot[1]}' if you meant to execute a different request.",
                    type="idempotency_error",
                    code="idempotency_key_in_use",
                )
            return stored
        if slot in st.idempotency_in_progress:
            raise DoubleError(
                409,
                "There is currently another in-progress request using this "
                f"Stripe-Idempotency-Key ('{slot[1]}'). Please retry shortly.",
                type="idempotency_error",
                code="idempotency_key_in_use",
                headers={"Stripe-Should-Retry": "true"},
            )
        return None

    # -- operations ------------------------------------------------------------
    async def op_meter_event(self, ctx: Ctx) -> tuple[int, Any]:
        st = self.state
        prepared = st.prepare_meter_event(ctx.params)
        slot = (prepared.customer, prepared.meter.event_name)
        if st.in_flight[slot] > 0:
            st.concurrency_violations.append(
                {
                    "customer": prepared.customer,
                    "event_name": prepared.meter.event_name,
                    "identifier": prepared.identifier,
                    "request_id": ctx.record.request_id,
                    "at": st.now(),
                }
            )
            raise DoubleError(
                429,
                "Too many concurrent requests for this customer and meter: meter events for "
                f"customer {prepared.customer} and event {prepared.meter.event_name!r} must "
                "be sent one at a time.",
                code="rate_limit",
                headers={"Stripe-Rate-Limited-Reason": "resource-specific"},
            )
        st.in_flight[slot] += 1
        try:
            if st.processing_gate is not None:
                await st.processing_gate.wait()
            if st.processing_delay > 0:
                await asyncio.sleep(st.processing_delay)
            event = st.commit_meter_event(prepared)
        finally:
            st.in_flight[slot] -= 1
            if st.in_flight[slot] <= 0:
                del st.in_flight[slot]
        return 200, event.to_json()

    async def op_adjustment(self, ctx: Ctx) -> tuple[int, Any]:
        return 200, self.state.cancel_event(ctx.params)

    async def op_session(self, ctx: Ctx) -> tuple[int, Any]:
        return 200, self.state.create_session().to_json()

    async def op_stream(self, ctx: Ctx) -> tuple[int, Any]:
        events = self.state.validate_stream_shape(ctx.params)
        self.state.ingest_stream_events(events)
        return 200, {}

    async def op_meters(self, ctx: Ctx) -> tuple[int, Any]:
        items = [m.to_json() for m in self.state.meters.values()]
        status = ctx.params.get("status")
        if status:
            items = [m for m in items if m["status"] == status]
        return 200, _paginate(items, ctx.params, "/v1/billing/meters")

    async def op_meter(self, ctx: Ctx) -> tuple[int, Any]:
        meter_id = ctx.request.match_info["id"]
        meter = self.state.meters.get(meter_id)
        if meter is None:
            raise DoubleError(
                404, f"No such billing meter: '{meter_id}'", code="resource_missing", param="id"
            )
        return 200, meter.to_json()

    async def op_summaries(self, ctx: Ctx) -> tuple[int, Any]:
        meter_id = ctx.request.match_info["id"]
        p = ctx.params
        items = self.state.event_summaries(
            meter_id,
            p.get("customer"),
            p.get("start_time"),
            p.get("end_time"),
            p.get("value_grouping_window"),
        )
        return 200, _paginate(items, p, f"/v1/billing/meters/{meter_id}/event_summaries")

    async def op_price(self, ctx: Ctx) -> tuple[int, Any]:
        price_id = ctx.request.match_info["id"]
        price = self.state.prices.get(price_id)
        if price is None:
            raise DoubleError(
                404, f"No such price: '{price_id}'", code="resource_missing", param="price"
            )
        expand = ctx.params.get("expand") or []
        wanted = set(expand.values() if isinstance(expand, dict) else expand)
        # includable fields, sent only when expanded (the options' own tiers come with
        # currency_options here; the client also asks currency_options.<c>.tiers)
        return 200, {k: v for k, v in price.items()
                     if k not in ("tiers", "currency_options") or k in wanted}

    def _legacy_gate(self, ctx: Ctx) -> None:
        version = ctx.record.stripe_version or ""
        if version[:10] >= LEGACY_USAGE_CUTOFF:
            req = ctx.request
            raise DoubleError(
                404,
                f"Unrecognized request URL ({req.method}: {req.path}). Usage records were "
                f"removed in API version 2025-03-31.basil; this request used Stripe-Version "
                f"{version}. Use billing meter events, or pin an older Stripe-Version.",
                code="resource_missing",
            )

    async def op_credit_grant_create(self, ctx: Ctx) -> tuple[int, Any]:
        return 200, self.state.credit_grants.create(ctx.params).to_json()

    async def op_credit_grant(self, ctx: Ctx) -> tuple[int, Any]:
        return 200, self.state.credit_grants.get(ctx.request.match_info["id"]).to_json()

    async def op_credit_grant_void(self, ctx: Ctx) -> tuple[int, Any]:
        return 200, self.state.credit_grants.void(ctx.request.match_info["id"]).to_json()

    async def op_credit_grant_expire(self, ctx: Ctx) -> tuple[int, Any]:
        return 200, self.state.credit_grants.expire(ctx.request.match_info["id"]).to_json()

    async def op_credit_grants(self, ctx: Ctx) -> tuple[int, Any]:
        items = self.state.credit_grants.list(ctx.params.get("customer"))
        return 200, _paginate(items, ctx.params, "/v1/billing/credit_grants")

    async def op_invoice_item(self, ctx: Ctx) -> tuple[int, Any]:
        return 200, self.state.invoice_items.create(ctx.params)

    async def op_invoice_preview(self, ctx: Ctx) -> tuple[int, Any]:
        return 200, invoice_preview(self.state, ctx.params)

    async def op_invoice_lines(self, ctx: Ctx) -> tuple[int, Any]:
        inv = ctx.request.match_info["id"]
        return 200, _paginate(preview_lines(self.state, inv), ctx.params,
                              f"/v1/invoices/{inv}/lines")

    async def op_invoice_items(self, ctx: Ctx) -> tuple[int, Any]:
        c = ctx.params.get("customer")
        items = [i for i in reversed(self.state.invoice_items.items.values())
                 if c in (None, i["customer"])]
        return 200, _paginate(items, ctx.params, "/v1/invoiceitems")

    async def op_credit_balance_summary(self, ctx: Ctx) -> tuple[int, Any]:
        return 200, self.state.credit_grants.summary(ctx.params)

    async def op_usage_record(self, ctx: Ctx) -> tuple[int, Any]:
        self._legacy_gate(ctx)
        return 200, self.state.create_usage_record(ctx.request.match_info["id"], ctx.params)

    async def op_usage_summaries(self, ctx: Ctx) -> tuple[int, Any]:
        self._legacy_gate(ctx)
        item_id = ctx.request.match_info["id"]
        items = self.state.usage_record_summaries(item_id)
        return 200, _paginate(
            items, ctx.params, f"/v1/subscription_items/{item_id}/usage_record_summaries"
        )

    # -- /_double control API ---------------------------------------------------
    async def _body(self, request: web.Request) -> Any:
        raw = await request.read()
        return orjson.loads(raw) if raw else {}

    async def ctl_state(self, request: web.Request) -> web.Response:
        return _json(200, self.state.snapshot())

    async def ctl_faults(self, request: web.Request) -> web.Response:
        try:
            self.state.faults.configure(await self._body(request))
        except (ValueError, TypeError) as exc:
            return _json(400, {"error": str(exc)})
        return _json(200, self.state.faults.snapshot())

    async def ctl_meters(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        specs = body.get("meters", [body]) if isinstance(body, dict) else body
        meters = self.state.add_meters_json(specs)
        return _json(200, [m.to_json() for m in meters])

    async def ctl_credit_applications(self, request: web.Request) -> web.Response:
        """An invoice finalized: ``{customer, currency, amount}`` of eligible metered lines
        takes credits from the customer's grants (the double has no invoices)."""
        body = await self._body(request)
        applied = self.state.credit_grants.apply_to_invoice(
            str(body["customer"]), str(body["currency"]), int(body["amount"]))
        return _json(200, {"applied": applied})

    async def ctl_reset(self, request: web.Request) -> web.Response:
        self.state.reset()
        return _json(200, {"ok": True})

    async def ctl_config(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        st = self.state
        for name in ("processing_delay", "summary_lag", "session_ttl", "identifier_window"):
            if name in body:
                setattr(st, name, float(body[name]))
        if "advance" in body:
            st.advance(float(body["advance"]))
        if body.get("expire_sessions"):
            st.expire_sessions()
        for item in body.get("subscription_items", []):
            st.add_subscription_item(item["id"], item.get("period_start"), item.get("period_end"))
        return _json(
            200,
            {
                "processing_delay": st.processing_delay,
                "summary_lag": st.summary_lag,
                "session_ttl": st.session_ttl,
                "identifier_window": st.identifier_window,
                "now": st.now(),
            },
        )


def create_app(state: StripeDoubleState) -> web.Application:
    double = DoubleApp(state)

    @web.middleware
    async def stripe_404(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
            return _json(
                404,
                DoubleError(
                    404,
                    f"Unrecognized request URL ({request.method}: {request.path}). Please see "
                    "https://stripe.com/docs or we can help at https://support.stripe.com/.",
                ).body(),
                {"Request-Id": f"req_{secrets.token_hex(7)}"},
            )

    app = web.Application(middlewares=[stripe_404])
    app[STATE_KEY] = state
    app[CLOSING_KEY] = double.closing

    def route(
        name: str, op: Operation, **kw: bool
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await double.serve(request, name, op, **kw)

        return handler

    app.router.add_post(
        "/v1/billing/meter_events",
        route("meter_events", double.op_meter_event, idempotent=True),
    )
    app.router.add_post(
        "/v1/billing/meter_event_adjustments",
        route("meter_event_adjustments", double.op_adjustment, idempotent=True),
    )
    app.router.add_get("/v1/billing/meters", route("meters_list", double.op_meters))
    app.router.add_get("/v1/billing/meters/{id}", route("meter_retrieve", double.op_meter))
    app.router.add_get(
        "/v1/billing/meters/{id}/event_summaries",
        route("event_summaries", double.op_summaries),
    )
    app.router.add_post(
        "/v2/billing/meter_event_session",
        route("meter_event_session", double.op_session, v2=True),
    )
    app.router.add_post(
        "/v2/billing/meter_event_stream",
        route("meter_event_stream", double.op_stream, v2=True, session_auth=True),
    )
    app.router.add_post(
        "/v1/subscription_items/{id}/usage_records",
        route("usage_records", double.op_usage_record, idempotent=True),
    )
    app.router.add_get(
        "/v1/subscription_items/{id}/usage_record_summaries",
        route("usage_record_summaries", double.op_usage_summaries),
    )
    app.router.add_post("/v1/billing/credit_grants",
                        route("credit_grants", double.op_credit_grant_create, idempotent=True))
    app.router.add_get("/v1/billing/credit_grants",
                        route("credit_grants_list", double.op_credit_grants))
    app.router.add_get("/v1/billing/credit_grants/{id}",
                        route("credit_grant_retrieve", double.op_credit_grant))
    app.router.add_post("/v1/billing/credit_grants/{id}/void",
                        route("credit_grant_void", double.op_credit_grant_void, idempotent=True))
    app.router.add_post("/v1/billing/credit_grants/{id}/expire",
                        route("credit_grant_expire", double.op_credit_grant_expire,
                              idempotent=True))
    app.router.add_get("/v1/billing/credit_balance_summary",
                        route("credit_balance_summary", double.op_credit_balance_summary))
    app.router.add_post("/_double/credit_applications", double.ctl_credit_applications)
    app.router.add_post("/v1/invoiceitems",
                        route("invoice_items", double.op_invoice_item, idempotent=True))
    app.router.add_get("/v1/invoiceitems", route("invoice_items_list", double.op_invoice_items))
    app.router.add_post("/v1/invoices/create_preview",
                        route("invoice_preview", double.op_invoice_preview))
    app.router.add_get("/v1/invoices/{id}/lines",
                       route("invoice_lines", double.op_invoice_lines))
    app.router.add_get("/v1/prices/{id}", route("price_retrieve", double.op_price))
    app.router.add_get("/_double/state", double.ctl_state)
    app.router.add_post("/_double/faults", double.ctl_faults)
    app.router.add_post("/_double/meters", double.ctl_meters)
    app.router.add_post("/_double/reset", double.ctl_reset)
    app.router.add_post("/_double/config", double.ctl_config)

    async def on_shutdown(_: web.Application) -> None:
        double.closing.set()  # release hanging handlers

    app.on_shutdown.append(on_shutdown)
    return app
