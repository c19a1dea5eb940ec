"""The request pipeline: authenticate, match, forward, measure, record.

    consumer -> key -> rule -> (credit check) -> upstream -> stream back -> quantities
             -> usage row -> [strict: committed] -> final bytes released

Invariants
- The per-request path does no SQLite I/O and allocates no config objects: rules are
  compiled, keys are a dict lookup, usage rows go to the Store's in-memory buffer.
- strict durability: the last bytes of a metered response (the final chunk of a
  Content-Length body, or the terminating chunk of a chunked one) are written only after
  the request's usage row is committed. A consumer that received the whole response is
  therefore in the ledger, whatever happens to the process afterwards.
- A consumer that disconnects cancels the upstream request; what was measured until then
  is still recorded (abandoned streams are billed for what was delivered).
- Errors the proxy itself answers are JSON ``{"error": {"type", "message"}}``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict, istr

from proxy import metrics
from proxy.credits.book import CreditBook, Hold
from proxy.credits.ledger import Entry, covered_quantity
from proxy.credits.reserve import Reservations
from proxy.credits.thresholds import ThresholdWatch
from proxy.errors import MeteringUnavailable, UpstreamError
from proxy.loglimit import LogLimiter
from proxy.request.forward import BODY_ERRORS, body_error, strip_hop_by_hop
from proxy.rules import UNREADABLE, Measurement, Quantity, Rule, compute, constant_quantities
from proxy.rules.model import ResponseNeed
from proxy.rules.sse import UsageChunkFilter, is_event_stream, with_stream_usage
from proxy.runtime import Runtime
from proxy.store.db import UsageItem, UsageRow
from proxy.target import InvalidTarget, canonical
from proxy.units import cost_micro, fmt_micro, to_micro

log = logging.getLogger("meterproxy.handler")

_SMALL_BODY = 64 * 1024
_XRID = istr("X-Request-Id")
_XCR = istr("X-Credits-Remaining")
_CT = "application/json"


def error_response(status: int, type_: str, message: str, request_id: str | None = None,
                   extra: dict[str, Any] | None = None) -> web.Response:
    err: dict[str, Any] = {"type": type_, "message": message}
    if extra:
        err.update(extra)
    headers = {_XRID: request_id} if request_id else None
    return web.Response(status=status, body=orjson.dumps({"error": err}), content_type=_CT,
                        headers=headers)


class _Aborted(Exception):
    """The consumer went away mid-response."""


class Pipeline:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        cfg = rt.cfg
        self.cap = cfg.max_inspect_bytes
        self.strict = cfg.storage.durability == "strict"
        self.forward_key = cfg.keys.forward_to_upstream
        self.reserved = cfg.reserved_prefix.rstrip("/")
        self._key_headers = [(istr(s.header), s.scheme) for s in cfg.keys.sources if s.header]
        self._key_query = [s.query for s in cfg.keys.sources if s.query]
        self._strip_headers = frozenset(s.header.lower() for s in cfg.keys.sources
                                        if s.header and not self.forward_key) | {"host"}
        self._req_counters: dict[tuple[str, int], Any] = {}
        self._unit_counters: dict[str, Any] = {}
        self.reserved_handlers: dict[str, Any] = {}
        self.refusals = LogLimiter(log)   # unknown API keys: any caller can send them at will
        # public routes the proxy answers itself (the Stripe webhook), by canonical path
        self.public_routes: dict[str, Any] = {}
        self.book: CreditBook | None = None
        self.watch: ThresholdWatch | None = None
        self.shadow = cfg.credits.enforcement == "shadow"
        self.default_estimate = to_micro(cfg.credits.default_estimate)
        self.top_up = cfg.credits.top_up_url
        self.reservations = Reservations(self.default_estimate)
        # requests in flight per customer (limits.per_customer_concurrency; 0 = unlimited)
        self.max_per_customer = cfg.limits.per_customer_concurrency or 1 << 62
        self.in_flight: dict[str, int] = {}

    # ---- entry point ---------------------------------------------------------------

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        rid = request.headers.get(_XRID, "")
        if not rid or len(rid) > 128 or not rid.isprintable():
            rid = os.urandom(16).hex()    # kept only when short and printable (it is stored)
        try:
            path, target = canonical(request.raw_path)
        except InvalidTarget as exc:
            self._count("(invalid_path)", 400)
            return error_response(400, "invalid_path", str(exc), rid)
        if self.reserved and path.startswith(self.reserved):
            return await self._reserved(request, rid, path)
        if (route := self.public_routes.get(path)) is not None:
            resp: web.StreamResponse = await route(request)
            return resp
        rules = self.rt.rules
        match = rules.match(request.method, path, request.headers, request.query)
        rule = match.rule if match is not None else None
        rule_name = rule.name if rule is not None else "(unmatched)"
        key_id = customer_id = ""
        if rule is None or rule.auth == "required":
            denied, key_id, customer_id = self.authenticate(request, rid)
            if denied is not None:
                self._count(rule_name, denied.status)
                return denied
        in_flight = self.in_flight
        if customer_id and (n := in_flight.get(customer_id, 0)) >= self.max_per_customer:
            metrics.concurrency_rejections_total.inc()
            self._count(rule_name, 429)
            return _too_many(n, rid)
        metered = rule is not None and bool(rule.usage) and bool(customer_id)
        if metered and not self.rt.store.accepting:
            metrics.metering_unavailable_total.inc()
            self._count(rule_name, 503)
            return error_response(503, "metering_unavailable",
                                  "Usage cannot be recorded right now; the request was not "
                                  "forwarded. Retry shortly.", rid)
        hold: Hold | None = None
        if metered and self.book is not None:
            assert rule is not None
            hold, refused = self._admit(rule, customer_id, rid)
            if refused is not None:
                self._count(rule_name, 402)
                return refused
        if customer_id:     # no await since the check above: one critical section
            in_flight[customer_id] = in_flight.get(customer_id, 0) + 1
        try:
            # a WebSocket handshake is a GET (RFC 6455 4.1); any other method with an Upgrade
            # header is forwarded as that method (Upgrade is hop-by-hop): what was matched
            if request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket":
                return await self._websocket(request, rid, rule,
                                             match.path_params if match else {}, key_id,
                                             customer_id, rules.version, started, hold,
                                             path, target)
            ctx = _Request(self, request, rid, rule, match.path_params if match else {}, key_id,
                           customer_id, rules.version, started, metered, hold, path, target)
            resp = await ctx.run()
        finally:
            if hold is not None and not hold.released:
                self.book.release(hold)  # type: ignore[union-attr]
            if customer_id:
                if (left := in_flight[customer_id] - 1):
                    in_flight[customer_id] = left
                else:
                    del in_flight[customer_id]
        self._count(rule_name, resp.status)
        return resp

    # ---- credits: admission ----------------------------------------------------------

    def admission_cost(self, rule: Rule) -> int:
        """Micro-credits held at admission: constant quantities' cost plus the adaptive
        reservation of every quantity only known later (proxy.credits.reserve)."""
        return self.reservations.for_rule(rule).cost()

    def _admit(self, rule: Rule, customer_id: str,
               rid: str) -> tuple[Hold | None, web.Response | None]:
        """The credit decision: one synchronous critical section (no await), so concurrent
        requests cannot spend the same credit."""
        book = self.book
        assert book is not None
        cust = self.rt.keys.customers.get(customer_id)
        block = cust is not None and cust.overage == "block"
        if not block and not book.has_credits(customer_id):
            return None, None                     # pay-as-you-go: nothing to hold
        cost = self.admission_cost(rule)
        now = time.time()
        enforce = block and not self.shadow
        hold = book.try_hold(customer_id, cost, now, block=enforce, debt_ok=enforce)
        if hold is not None:
            if block and self.shadow and cost > book.available(customer_id, now) + hold.amount:
                metrics.credit_shadow_rejections_total.inc()
            return hold, None
        return None, self.refusal(customer_id, cost, now, rid)

    def admit_hint(self, rule: Rule, hold: Hold, request: web.Request, request_json: object,
                   rid: str) -> web.Response | None:
        """Once a request body is read: hold the extra its ``reserve_from`` hints ask for
        (block customers: 402 when it does not fit). Only rules that name a hint get here."""
        book = self.book
        assert book is not None
        extra = self.reservations.for_rule(rule).hint_extra(request_json, request.headers,
                                                            request.query)
        now = time.time()
        if book.grow(hold, extra, now, block=hold.debt_ok):
            return None
        book.release(hold)
        return self.refusal(hold.customer_id, self.admission_cost(rule) + extra, now, rid)

    def refusal(self, customer_id: str, cost: int, now: float, rid: str) -> web.Response:
        book = self.book
        assert book is not None
        metrics.credit_rejections_total.inc()
        balance = book.available(customer_id, now)
        msg = (f"This request needs {fmt_micro(cost)} credits and {fmt_micro(max(balance, 0))} "
               "are available. Buy more credits to continue"
               + (f": {self.top_up}" if self.top_up else "") + ".")
        resp = error_response(402, "insufficient_credits", msg, rid,
                              {"balance": fmt_micro(max(balance, 0)), "required": fmt_micro(cost),
                               "top_up_url": self.top_up or None})
        resp.headers[_XCR] = fmt_micro(max(balance, 0))
        return resp

    def credits_header(self, customer_id: str) -> str | None:
        book = self.book
        if book is None or not book.has_credits(customer_id):
            return None
        return fmt_micro(max(book.available(customer_id, time.time()), 0))

    def _units_counter(self, meter: str) -> Any:
        c = self._unit_counters.get(meter)
        if c is None:
            c = self._unit_counters[meter] = metrics.metered_units_total.labels(meter)
        return c

    def _count(self, rule: str, status: int) -> None:
        key = (rule, status // 100)
        c = self._req_counters.get(key)
        if c is None:
            c = self._req_counters[key] = metrics.requests_total.labels(rule, f"{status // 100}xx")
        c.inc()

    # ---- authentication ------------------------------------------------------------

    def authenticate(self, request: web.Request,
                      rid: str) -> tuple[web.Response | None, str, str]:
        raw = self._extract_key(request)
        if raw is None:
            return error_response(401, "missing_api_key",
                                  "No API key was sent. Send it as 'Authorization: Bearer <key>'.",
                                  rid), "", ""
        entry = self.rt.keys.lookup(raw)
        if entry is None:
            metrics.AUTH_FAIL_API_KEY.inc()
            self.refusals.log(logging.WARNING, "unknown API key", "unknown API key from %s",
                          request.remote)
            return error_response(401, "invalid_api_key", "The API key is not valid.", rid), "", ""
        if entry.revoked:
            return error_response(403, "key_revoked", "This API key has been revoked.", rid), "", ""
        cust = self.rt.keys.customers.get(entry.customer_id)
        if cust is None or cust.status == "suspended":
            return error_response(403, "customer_suspended",
                                  "This account is suspended. Contact support.", rid), "", ""
        return None, entry.key_id, entry.customer_id

    def _extract_key(self, request: web.Request) -> str | None:
        headers = request.headers
        for name, scheme in self._key_headers:
            value = headers.get(name)
            if not value:
                continue
            if scheme:
                prefix, _, token = value.partition(" ")
                if prefix.lower() != scheme.lower() or not token.strip():
                    continue
                return token.strip()
            return value.strip()
        for q in self._key_query:
            v = request.query.get(q)
            if v:
                return v
        return None

    # ---- reserved paths (consumer usage API, webhooks) -----------------------------

    async def _reserved(self, request: web.Request, rid: str, path: str) -> web.StreamResponse:
        sub = path[len(self.reserved):] or "/"
        handler = self.reserved_handlers.get(sub)
        if handler is None:
            return error_response(404, "not_found", "No such endpoint.", rid)
        resp: web.StreamResponse = await handler(request)
        return resp

    # ---- websockets ------------------------------------------------------------------

    async def _websocket(self, request: web.Request, rid: str, rule: Rule | None,
                         params: Any, key_id: str, customer_id: str, version: str,
                         started: float, hold: Hold | None, path: str,
                         target: str) -> web.StreamResponse:
        headers = self.upstream_headers(request, rid)
        for h in ("Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions",
                  "Sec-WebSocket-Protocol"):
            headers.popall(h, None)
        protocols = tuple(p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "")
                          .split(",") if p.strip())
        try:
            upstream_ws = await self.rt.upstream.ws_connect(target, headers, protocols)
        except UpstreamError as exc:
            return error_response(exc.status, exc.type, str(exc), rid)
        try:
            return await self._ws_session(request, upstream_ws, protocols, rid, rule, params,
                                          key_id, customer_id, version, started, hold, path)
        finally:
            self.rt.upstream.release_slot()

    async def _ws_session(self, request: web.Request,
                          upstream_ws: aiohttp.ClientWebSocketResponse,
                          protocols: tuple[str, ...], rid: str, rule: Rule | None, params: Any,
                          key_id: str, customer_id: str, version: str, started: float,
                          hold: Hold | None, path: str) -> web.StreamResponse:
        server_ws = web.WebSocketResponse(protocols=protocols, autoping=False)
        await server_ws.prepare(request)
        # an upgraded session counts as a success (2xx) for count_when
        status = 200
        try:
            await _pump_ws(server_ws, upstream_ws)
        finally:
            await upstream_ws.close()
            await server_ws.close()
            if rule is not None and rule.usage and customer_id:
                m = Measurement(status=status, request_headers=request.headers,
                                response_headers={}, query=request.query, path_params=params,
                                request_json=UNREADABLE, response_body=None, request_bytes=0,
                                response_bytes=0,
                                duration_ms=Decimal(int((time.perf_counter() - started) * 1000)))
                self.record(rid, rule, m, status, key_id, customer_id, version, "websocket",
                            hold, request, path)
        return server_ws

    # ---- shared helpers ------------------------------------------------------------------

    def upstream_headers(self, request: web.Request, rid: str) -> CIMultiDict[str]:
        headers: CIMultiDict[str] = CIMultiDict()
        strip_hop_by_hop(request.headers, headers, self._strip_headers)
        peer = request.remote or ""
        prior = request.headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
        headers["X-Forwarded-Proto"] = request.scheme
        headers["X-Forwarded-Host"] = request.host
        headers[_XRID] = rid
        return headers

    def record(self, rid: str, rule: Rule, m: Measurement | None, status: int, key_id: str,
               customer_id: str, version: str, flags: str, hold: Hold | None,
               request: web.Request | None = None,
               path: str = "", withhold: bool = False) -> asyncio.Future[None] | None:
        """Turn a measurement into a usage row (pure quantities), settle its credits, and hand
        both to the Store (one transaction). Not billable: the hold is released.
        ``m`` may be None only for a rule whose quantities are all constants."""
        if not rule.count_when.matches(status):
            if hold is not None and self.book is not None:
                self.book.release(hold)
            return None
        quantities: Sequence[Quantity] | None = constant_quantities(rule)
        if quantities is None:
            assert m is not None
            quantities = compute(rule, m, self.default_estimate)
        if not quantities:
            return None
        rates = {u.meter: u.credits_per_unit for u in rule.usage}
        costs = [cost_micro(q.micro, r) if (r := rates.get(q.meter)) is not None else 0
                 for q in quantities]
        settled = self.book.settle(hold, costs, time.time()) \
            if hold is not None and self.book is not None else None
        if self.book is not None:
            ests = self.reservations.for_rule(rule).estimators
            for q in quantities:
                if not q.unreadable and (est := ests.get(q.meter)) is not None:
                    est.observe(q.micro)
        items = []
        debits: list[tuple[str, Entry]] = []
        for i, q in enumerate(quantities):
            f = flags
            if q.unreadable:
                metrics.unreadable_quantities_total.labels(rule.name).inc()
                metrics.quantity_fallback_total.labels(rule.name, q.meter, q.reason).inc()
                f = f"{f},unreadable,fallback_{q.reason}" if f \
                    else f"unreadable,fallback_{q.reason}"
            credits = covered = 0
            if settled is not None:
                entries, uncovered = settled[i]
                credits = costs[i] - uncovered
                covered = covered_quantity(q.micro, costs[i], credits)
                debits.extend((q.meter, e) for e in entries)
            items.append(UsageItem(q.meter, q.micro, credits, q.micro - covered, f))
            if q.micro:
                self._units_counter(q.meter).inc(q.micro / 1_000_000)
        if debits and self.watch is not None:
            cust = self.rt.keys.customers.get(customer_id)
            self.watch.check(customer_id, anchor=cust.billing_anchor if cust else None)
        row = UsageRow(rid, time.time(), customer_id, key_id, rule.name, version, status, items,
                       debits=debits, method=request.method if request is not None else "",
                       path=path[:2048],
                       withhold=withhold)
        return self.rt.store.record(row, wait=self.strict and not flags)


class _Request:
    """One proxied HTTP request: the state that lives between forward and record."""

    __slots__ = ("customer_id", "delivered", "flags", "hold", "key_id", "match_params", "metered",
                 "p", "path", "req", "request_bytes", "request_json", "rid", "rule", "started",
                 "strip_usage", "target", "upstream_s", "version")

    def __init__(self, p: Pipeline, req: web.Request, rid: str, rule: Rule | None,
                 params: Any, key_id: str, customer_id: str, version: str, started: float,
                 metered: bool, hold: Hold | None, path: str, target: str) -> None:
        self.p, self.req, self.rid, self.rule = p, req, rid, rule
        self.match_params, self.key_id, self.customer_id = params, key_id, customer_id
        self.version, self.started, self.metered = version, started, metered
        self.request_bytes = 0
        self.request_json: object = UNREADABLE
        self.upstream_s = 0.0
        self.flags = ""
        self.hold = hold
        self.strip_usage = False
        self.delivered = False      # a streamed answer's head reached an open consumer connection
        self.path, self.target = path, target     # canonical (proxy.target)

    async def run(self) -> web.StreamResponse:
        req, p = self.req, self.p
        headers = p.upstream_headers(req, self.rid)
        rule = self.rule
        if rule is not None and self.metered:
            if rule.response_body is not ResponseNeed.NONE:
                # the body must be readable: ask for it uncompressed (decoded if ignored)
                headers["Accept-Encoding"] = "identity"
            if (rule.request_json or rule.stream_usage) and req.body_exists \
                    and _encoded(req.headers):
                return error_response(
                    415, "unsupported_content_encoding",
                    "This endpoint reads the request body to meter it; send it "
                    "uncompressed (no Content-Encoding).", self.rid)
        data = await self._request_body(headers)
        if self.hold is not None and self.rule is not None and \
                p.reservations.for_rule(self.rule).hinted:
            refused = p.admit_hint(self.rule, self.hold, req, self.request_json, self.rid)
            if refused is not None:
                return refused
        t_up = time.perf_counter()
        try:
            upstream = await p.rt.upstream.request(req.method, self.target, headers, data)
        except UpstreamError as exc:
            metrics.upstream_errors_total.labels(exc.type).inc()
            return error_response(exc.status, exc.type, str(exc), self.rid)
        try:
            out_headers, inspector = self._response_head(upstream)
            clen = upstream.content_length
            if req.method == "HEAD" or upstream.status in (204, 304):
                self.upstream_s = time.perf_counter() - t_up
                try:
                    if (commit := self._finish(upstream.status, upstream, None, 0,
                                               True)) is not None:
                        await commit
                except MeteringUnavailable:
                    metrics.metering_unavailable_total.inc()
                    return _withheld(self.rid)
                return web.Response(status=upstream.status, headers=out_headers)
            if clen is not None and clen <= _SMALL_BODY:
                return await self._respond_small(upstream, out_headers, inspector, t_up)
            return await self._respond(upstream, out_headers, inspector, t_up)
        finally:
            upstream.release()
            p.rt.upstream.release_slot()

    def _response_head(self, upstream: aiohttp.ClientResponse) -> tuple[CIMultiDict[str], Any]:
        """The consumer's response headers, and the body inspector if a rule reads the body."""
        out_headers: CIMultiDict[str] = CIMultiDict()
        strip_hop_by_hop(upstream.headers, out_headers)
        out_headers[_XRID] = self.rid
        inspector = None
        if self.rule is not None and self.metered:
            uh = upstream.headers
            inspector = self.rule.new_inspector(uh.get("Content-Type"), self.p.cap,
                                                uh.get("Content-Encoding"))
        return out_headers, inspector

    async def _request_body(self, headers: CIMultiDict[str]) -> Any:
        req = self.req
        if not req.body_exists:
            return None
        rule = self.rule
        if rule is not None and (rule.request_json or rule.stream_usage) and self.metered:
            return await self._inspect_request_body(headers)
        return self._count_stream(req.content)

    async def _count_stream(self, content: aiohttp.StreamReader) -> Any:
        async for chunk in content.iter_any():
            self.request_bytes += len(chunk)
            yield chunk

    async def _inspect_request_body(self, headers: CIMultiDict[str]) -> Any:
        cap = self.p.cap
        buf = bytearray()
        content = self.req.content
        while len(buf) <= cap:
            chunk = await content.readany()
            if not chunk:
                break
            buf += chunk
        if len(buf) <= cap:
            self.request_bytes = len(buf)
            rule = self.rule
            assert rule is not None
            # an openai_chat rule only needs the JSON of a body that may ask for a stream
            # (a key may also be spelt with \u escapes)
            if buf and (rule.request_json or b'"stream"' in buf or b"\\u" in buf):
                try:
                    self.request_json = orjson.loads(buf)
                except orjson.JSONDecodeError:
                    self.request_json = UNREADABLE
            body = bytes(buf)
            if rule.stream_usage and self.request_json is not UNREADABLE:
                added = with_stream_usage(self.request_json, body)
                if added is not None:
                    body = added
                    self.strip_usage = True
            headers.popall("Transfer-Encoding", None)
            headers["Content-Length"] = str(len(body))
            return body
        # over the inspection cap: stream what was read, then the rest, untouched
        return self._prefixed(bytes(buf), content)

    async def _prefixed(self, prefix: bytes, content: aiohttp.StreamReader) -> Any:
        self.request_bytes += len(prefix)
        yield prefix
        async for chunk in content.iter_any():
            self.request_bytes += len(chunk)
            yield chunk

    async def _respond(self, upstream: aiohttp.ClientResponse, out_headers: CIMultiDict[str],
                       inspector: Any, t_up: float) -> web.StreamResponse:
        """A large or streamed body: forwarded chunk by chunk as it arrives."""
        p, req = self.p, self.req
        clen = upstream.content_length
        chunked = clen is None
        status = upstream.status
        if chunked:
            out_headers.popall("Content-Length", None)
        if self.metered:
            # streamed: the balance after this request's hold (settled once the body ends)
            xcr = p.credits_header(self.customer_id)
            if xcr is not None:
                out_headers[_XCR] = xcr
        strip = self._usage_filter(upstream) if self.strip_usage else None
        if strip is not None:
            clen = None                       # the length changes: sent chunked
            out_headers.popall("Content-Length", None)
        resp = web.StreamResponse(status=status, headers=out_headers)
        if clen is not None:
            resp.content_length = clen
        await resp.prepare(req)
        self.delivered = (tr := req.transport) is not None and not tr.is_closing()
        sent = 0
        held: bytes | None = None
        hold_last = self.metered and p.strict and clen is not None
        try:
            # each chunk is inspected once it is written, so an abandoned response is
            # measured by what was delivered (a failed write is not)
            async for chunk in upstream.content.iter_any():
                if hold_last and clen is not None and sent + len(chunk) >= clen:
                    sent += len(chunk)
                    held = chunk
                    if inspector is not None:
                        inspector.feed(chunk)
                    break
                if strip is None:
                    await _write(resp, chunk)
                elif out := strip.feed(chunk):
                    await _write(resp, out)
                sent += len(chunk)
                if inspector is not None:
                    inspector.feed(chunk)
            if strip is not None and (rest := strip.flush()):
                await _write(resp, rest)
        except BODY_ERRORS as exc:
            # the upstream died mid-body: the consumer gets a truncated response (the
            # connection is closed, never a clean end) and the request counts as a 502
            metrics.upstream_errors_total.labels(body_error(exc).type + "_midstream").inc()
            self.flags = "upstream_aborted"
            self.upstream_s = time.perf_counter() - t_up
            if (commit := self._finish(502, upstream, inspector, sent)) is not None:
                await commit
            _kill(req)
            return resp
        except (_Aborted, asyncio.CancelledError):
            metrics.client_aborts_total.inc()
            self.flags = "abandoned"
            self.upstream_s = time.perf_counter() - t_up
            if (commit := self._finish(status, upstream, inspector, sent)) is not None:
                await commit
            raise
        self.upstream_s = time.perf_counter() - t_up
        try:
            if (commit := self._finish(status, upstream, inspector, sent)) is not None:
                await commit
        except MeteringUnavailable:
            metrics.metering_unavailable_total.inc()
            _kill(req)
            return resp
        if held is not None:
            await _write(resp, held)
        await resp.write_eof()
        return resp

    async def _respond_small(self, upstream: aiohttp.ClientResponse, headers: CIMultiDict[str],
                             inspector: Any, t_up: float) -> web.StreamResponse:
        try:
            body = await upstream.read()
        except BODY_ERRORS as exc:
            err = body_error(exc)
            metrics.upstream_errors_total.labels(err.type + "_midstream").inc()
            self.flags = "upstream_aborted"
            self.upstream_s = time.perf_counter() - t_up
            if (commit := self._finish(502, upstream, inspector, 0)) is not None:
                await commit
            return error_response(err.status, err.type, str(err), self.rid)
        if inspector is not None:
            inspector.feed(body)
        strip = self._usage_filter(upstream) if self.strip_usage else None
        if strip is not None:
            body = strip.feed(body) + strip.flush()
        self.upstream_s = time.perf_counter() - t_up
        try:
            if (commit := self._finish(upstream.status, upstream, inspector, len(body),
                                       True)) is not None:
                await commit
        except MeteringUnavailable:
            metrics.metering_unavailable_total.inc()
            return _withheld(self.rid)
        headers.popall("Content-Length", None)
        if self.metered:
            xcr = self.p.credits_header(self.customer_id)   # exact: settled above
            if xcr is not None:
                headers[_XCR] = xcr
        return web.Response(status=upstream.status, headers=headers, body=body)

    def _usage_filter(self, upstream: aiohttp.ClientResponse) -> UsageChunkFilter | None:
        """When the proxy added include_usage for this client, a filter that removes the
        usage-only chunk again (not on a compressed stream: it passes as the upstream sent
        it, extra chunk included)."""
        if upstream.headers.get("Content-Encoding") or not is_event_stream(upstream.headers.get("Content-Type")):
            return None
        return UsageChunkFilter(self.p.cap)

    def _finish(self, status: int, upstream: aiohttp.ClientResponse, inspector: Any,
                response_bytes: int, withhold: bool = False) -> asyncio.Future[None] | None:
        """Measure and record; in strict mode returns the commit to wait for before the
        final bytes go out (a plain function: no coroutine frame on the hot path).
        ``withhold``: a failed commit answers 503 instead of the response, so the row is
        dropped then (never billed; see Store invariant 8)."""
        total = time.perf_counter() - self.started
        metrics.upstream_seconds.observe(self.upstream_s)
        metrics.overhead_seconds.observe(max(total - self.upstream_s, 0.0))
        rule = self.rule
        if rule is None or not self.metered:
            return None
        if self.flags and not self.delivered and not self.req.content.is_eof():
            # the consumer never finished sending its request (cut off by limits.body_timeout,
            # or gone) and nothing of the answer reached it (a buffered answer is withheld
            # until here; a streamed one started after the connection was already closed):
            # there is no request to bill. An answer delivered in full, or a streamed answer
            # the consumer received part of and abandoned, is billed even if the body never
            # ended (an upstream that answers without reading the body would otherwise serve
            # it free).
            return None
        m = None
        if constant_quantities(rule) is None:
            m = Measurement(status=status, request_headers=self.req.headers,
                            response_headers=upstream.headers, query=self.req.query,
                            path_params=self.match_params, request_json=self.request_json,
                            response_body=inspector.result() if inspector is not None else None,
                            request_bytes=self.request_bytes, response_bytes=response_bytes,
                            duration_ms=Decimal(int(total * 1000)), abandoned=bool(self.flags))
        return self.p.record(self.rid, rule, m, status, self.key_id, self.customer_id,
                             self.version, self.flags, self.hold, self.req, self.path,
                             withhold)


def _encoded(headers: Any) -> bool:
    """True when the request body has a content coding other than identity, on any
    ``Content-Encoding`` line or list item: a compressed body must not hide behind a first
    "identity" (the upstream would decode it; the proxy could not read it)."""
    return any(t.strip() and t.strip().lower() != "identity"
               for v in headers.getall("Content-Encoding", ()) for t in v.split(","))


def _withheld(rid: str) -> web.Response:
    return error_response(503, "metering_unavailable",
                          "Usage could not be recorded; the answer is withheld (and not "
                          "billed). Retry shortly.", rid)


def _too_many(n: int, rid: str) -> web.Response:
    resp = error_response(429, "concurrency_limit_exceeded",
                          f"This account already has {n} requests in flight, the most allowed "
                          "at once. Retry when one of them has finished.", rid)
    resp.headers["Retry-After"] = "1"
    return resp


async def _write(resp: web.StreamResponse, chunk: bytes) -> None:
    try:
        await resp.write(chunk)
    except (ConnectionResetError, aiohttp.ClientConnectionResetError, RuntimeError) as exc:
        raise _Aborted() from exc


def _kill(req: web.Request) -> None:
    """Close the consumer connection without a clean end, so a partial body is never mistaken
    for a complete one."""
    transport = req.transport
    if transport is not None:
        transport.abort()


_WS = aiohttp.WSMsgType
_WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


async def _relay(src: _WebSocket, dst: _WebSocket) -> None:
    """Copy frames one way until either side closes."""
    async for msg in src:
        if msg.type == _WS.TEXT:
            await dst.send_str(msg.data)
        elif msg.type == _WS.BINARY:
            await dst.send_bytes(msg.data)
        elif msg.type == _WS.PING:
            await dst.ping(msg.data)
        elif msg.type == _WS.PONG:
            await dst.pong(msg.data)
        elif msg.type in (_WS.CLOSE, _WS.ERROR):
            break


async def _pump_ws(server: web.WebSocketResponse, client: aiohttp.ClientWebSocketResponse) -> None:
    from proxy.tasks import spawn
    tasks = [spawn("ws-down", _relay(client, server)), spawn("ws-up", _relay(server, client))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
