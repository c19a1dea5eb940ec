"""Step 4, streaming and measuring: one proxied HTTP request from the request body to the
last byte of the response.

    request body   streamed upstream as it arrives (counted); buffered up to
                   ``max_inspect_bytes`` when a rule reads its JSON (or adds stream usage)
    upstream       ``proxy.request.forward`` (Upstream.request; the pooled connection is held
                   until the response is released)
    response       a small Content-Length body is read whole and answered in one piece; any
                   other body is streamed chunk by chunk, each chunk handed to the rule's
                   inspector once it was written (joined in batches of up to 64 KiB, all
                   of them before the measurement); the chunks that have arrived when the
                   loop looks are written together (``proxy.request.wire``: one transport
                   write, each its own chunk on the wire), then the loop waits for more
                   or, while the consumer's transport is full, for it to drain
    settle         ``proxy.request.settle`` once the body ended (or was abandoned)

Invariants
- strict durability: the last bytes of a metered response (the final chunk of a
  Content-Length body, or the whole of a small one) are written only after the request's
  usage row is committed; a failed commit answers 503 (small) or closes the connection
  without a clean end (streamed).
- A consumer that disconnects cancels the upstream request; what was measured until then
  is still recorded (abandoned streams are billed for what was delivered).
- The upstream dying mid-body truncates the response (connection closed, never a clean end).
  When part of the body had reached the consumer it is billed for what was delivered, as an
  abandoned stream is, with the upstream's status and the flag ``upstream_aborted``;
  otherwise it counts as a 502.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Collection, Mapping
from decimal import Decimal
from types import MappingProxyType
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from proxy import metrics
from proxy.errors import (
    HttpError,
    MeteringUnavailable,
    MeterproxyError,
    UpstreamError,
    UpstreamUnavailable,
)
from proxy.request.admission import XCR as _XCR
from proxy.request.admission import Admission
from proxy.request.context import RequestContext
from proxy.request.forward import (
    BODY_ERRORS,
    HOP_BY_HOP,
    Upstream,
    body_error,
    forward_headers,
    matched_headers,
    response_headers,
    set_header,
)
from proxy.request.settle import Settlement
from proxy.request.wire import BodyWire, StreamedResponse
from proxy.rules import UNREADABLE, Measurement, body_measurement
from proxy.rules.model import ResponseNeed
from proxy.rules.sse import UsageChunkFilter, is_event_stream, with_stream_usage
from proxy.upstream import Response

_SMALL_BODY = 64 * 1024
_BOM = b"\xef\xbb\xbf"


class Aborted(MeterproxyError):
    """The consumer went away mid-response."""


class Streamer:
    """The fixed parts of the streaming step, built once: what every ``Exchange`` reads."""

    def __init__(self, upstream: Upstream, admission: Admission, settlement: Settlement,
                 cap: int, strict: bool, drop_headers: frozenset[str]) -> None:
        self.upstream = upstream
        self.admission = admission
        self.settlement = settlement
        self.cap = cap
        self.strict = strict
        self.drop_headers = drop_headers
        self.skip_up = HOP_BY_HOP | drop_headers     # never forwarded (lower-case names)


class Exchange:
    """The state of one proxied HTTP request that changes while it streams (the rest is its
    frozen ``RequestContext``)."""

    __slots__ = ("ctx", "delivered", "flags", "request_bytes", "request_json", "s",
                 "strip_usage", "upstream_s")

    def __init__(self, s: Streamer, ctx: RequestContext) -> None:
        self.s = s
        self.ctx = ctx
        self.request_bytes = 0
        self.request_json: object = UNREADABLE
        self.upstream_s = 0.0
        self.flags = ""
        self.strip_usage = False
        self.delivered = False      # a streamed answer's head reached an open consumer connection

    async def run(self) -> web.StreamResponse:
        s, ctx = self.s, self.ctx
        req = ctx.request
        headers = forward_headers(req, ctx.rid, s.skip_up)
        rule = ctx.rule
        if rule is not None and ctx.metered:
            if rule.response_body is not ResponseNeed.NONE:
                # the body must be readable: ask for it uncompressed (decoded if ignored)
                headers = set_header(headers, "Accept-Encoding", "identity")
            if (rule.request_json or rule.stream_usage or rule.request_bytes) \
                    and req.body_exists and _encoded(req.headers):
                raise HttpError("This endpoint reads the request body to meter it; send it "
                                "uncompressed (no Content-Encoding).", status=415,
                                type_="unsupported_content_encoding")
        # (no coroutine for a request without a body: the common case)
        data = await self._request_body(headers) if req.body_exists else \
            (b"" if "Content-Length" in req.headers else None)
        hold = ctx.hold
        if hold is not None and rule is not None and \
                s.admission.reservations.for_rule(rule).hinted:
            s.admission.admit_hint(rule, hold, req, self.request_json)
        t_up = time.perf_counter()
        try:
            upstream = await s.upstream.request(req.method, self.ctx.target, headers, data)
        except UpstreamError as exc:
            metrics.upstream_errors_total.labels(exc.type).inc()
            raise
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            # the consumer's request body broke while it was streamed upstream (or did not
            # match its Content-Length): the exchange with the upstream is incomplete
            metrics.upstream_errors_total.labels("upstream_unavailable").inc()
            raise UpstreamUnavailable(
                f"the upstream request could not be completed ({type(exc).__name__})") from exc
        try:
            out_headers, inspector = self._response_head(upstream)
            clen = upstream.content_length
            if req.method == "HEAD" or upstream.status in (204, 304):
                self.upstream_s = time.perf_counter() - t_up
                try:
                    if (commit := self._finish(upstream.status, upstream, None, 0,
                                               True)) is not None:
                        await commit
                except MeteringUnavailable as exc:
                    metrics.metering_unavailable_total.inc()
                    raise _withheld() from exc
                return web.Response(status=upstream.status, headers=out_headers)
            if (clen is not None and clen <= _SMALL_BODY) or upstream.failed:
                # a small body, answered in one piece (here: no coroutine for it). (A body
                # already known broken, e.g. an invalid first chunk that came with the head,
                # is answered 502 before anything reaches the consumer: _read_small.)
                body = upstream.take() if upstream.complete else \
                    await self._read_small(upstream, inspector, t_up)
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
                except MeteringUnavailable as exc:
                    metrics.metering_unavailable_total.inc()
                    raise _withheld() from exc
                resp = web.Response(status=upstream.status, headers=out_headers, body=body)
                resp_headers = resp.headers
                resp_headers.popall("Content-Length", None)    # aiohttp writes the body's own
                if self.ctx.metered:
                    admission = s.admission
                    if (book := admission.book) is not None \
                            and book.has_credits(self.ctx.customer_id):
                        # exact: settled above
                        xcr = admission.credits_header(self.ctx.customer_id)
                        if xcr is not None:
                            resp_headers[_XCR] = xcr
                return resp
            return await self._respond(upstream, out_headers, inspector, t_up)
        finally:
            upstream.release()

    def _response_head(self, upstream: Response) -> tuple[list[tuple[str, str]], Any]:
        """The consumer's response headers (pairs in order: each response copies them into
        its own multidict once), and the body inspector if a rule reads the body."""
        out_headers = response_headers(upstream.headers, self.ctx.rid)
        inspector = None
        rule = self.ctx.rule
        if rule is not None and self.ctx.metered and rule.response_body is not ResponseNeed.NONE:
            inspector = rule.new_inspector(upstream.header("Content-Type"), self.s.cap,
                                           upstream.header("Content-Encoding"))
        return out_headers, inspector

    async def _request_body(self, headers: list[tuple[str, str]]) -> Any:
        req = self.ctx.request
        if not req.body_exists:
            # an empty Content-Length body keeps its `Content-Length: 0` upstream
            return b"" if "Content-Length" in req.headers else None
        rule = self.ctx.rule
        if rule is not None and (rule.request_json or rule.stream_usage) and self.ctx.metered:
            return await self._inspect_request_body(headers)
        content = req.content
        if content.is_eof() and "Content-Length" in req.headers:
            # the whole Content-Length body arrived with the head: sent in one write, no
            # generator (a chunked body stays chunked: streamed below)
            body = content.read_nowait()
            self.request_bytes = len(body)
            return body
        return self._count_stream(content)

    async def _count_stream(self, content: aiohttp.StreamReader) -> Any:
        async for chunk in content.iter_any():
            self.request_bytes += len(chunk)
            yield chunk

    async def _inspect_request_body(self, headers: list[tuple[str, str]]) -> Any:
        cap = self.s.cap
        buf = bytearray()
        content = self.ctx.request.content
        while len(buf) <= cap:
            chunk = await content.readany()
            if not chunk:
                break
            buf += chunk
        if len(buf) <= cap:
            self.request_bytes = len(buf)
            rule = self.ctx.rule
            assert rule is not None
            # an openai_chat rule only needs the JSON of a body that may ask for a stream
            # (a key may also be spelt with \u escapes; bytes.find: `bytes in bytes` costs a
            # discarded TypeError on Python 3.11)
            exact = True            # the JSON, if read, was read by orjson
            if buf and (rule.request_json or buf.find(b'"stream"') >= 0
                        or buf.find(b"\\u") >= 0):
                try:
                    # a leading UTF-8 byte order mark is ignored, as RFC 8259 8.1 allows and
                    # Python upstreams do (json.loads of bytes); orjson refuses it
                    self.request_json = orjson.loads(
                        memoryview(buf)[3:] if buf.startswith(_BOM) else buf)
                except orjson.JSONDecodeError:
                    exact = False
                    self.request_json = _as_python_reads(buf)
            body = bytes(buf)
            doc = self.request_json
            # a body only the stdlib read gets include_usage only by the byte insertion, and
            # only in UTF-8 (no NUL): orjson would re-encode what it refused
            if rule.stream_usage and doc is not UNREADABLE and (
                    exact or (isinstance(doc, dict) and "stream_options" not in doc
                              and body.find(b"\x00") < 0)):
                added = with_stream_usage(doc, body)
                if added is not None:
                    body = added
                    self.strip_usage = True
            # (in place: the caller sends this list)
            headers[:] = set_header([(k, v) for k, v in headers
                                     if k.lower() != "transfer-encoding"],
                                    "Content-Length", str(len(body)))
            return body
        # over the inspection cap: stream what was read, then the rest, untouched
        return self._prefixed(bytes(buf), content)

    async def _prefixed(self, prefix: bytes, content: aiohttp.StreamReader) -> Any:
        self.request_bytes += len(prefix)
        yield prefix
        async for chunk in content.iter_any():
            self.request_bytes += len(chunk)
            yield chunk

    async def _respond(self, upstream: Response, head: list[tuple[str, str]],
                       inspector: Any, t_up: float) -> web.StreamResponse:
        """A large or streamed body: forwarded chunk by chunk as it arrives."""
        s, req = self.s, self.ctx.request
        clen = upstream.content_length
        chunked = clen is None
        status = upstream.status
        # (the response copies the pairs into its own multidict: the one copy of the head)
        resp = StreamedResponse(status=status, headers=head)
        out_headers = resp.headers
        if chunked:
            out_headers.popall("Content-Length", None)
        if self.ctx.metered:
            # streamed: the balance after this request's hold (settled once the body ends)
            xcr = s.admission.credits_header(self.ctx.customer_id)
            if xcr is not None:
                out_headers[_XCR] = xcr
        strip = self._usage_filter(upstream) if self.strip_usage else None
        if strip is not None:
            clen = None                       # the length changes: sent chunked
            out_headers.popall("Content-Length", None)
        if clen is not None:
            resp.content_length = clen
        wire = BodyWire(await resp.prepare(req))
        if not upstream.buffered:
            wire.send(())       # the head, now: nothing has arrived to go with it
        self.delivered = (tr := req.transport) is not None and not tr.is_closing()
        sent = 0
        held: bytes | None = None
        hold_last = self.ctx.metered and s.strict and clen is not None
        unmetered = not self.ctx.metered
        # chunks written but not yet handed to the inspector, and the bytes handed so far:
        # it gets them joined, every _FEED_BATCH bytes and before any measurement (one call
        # per batch, not per chunk; an inspector reads the same however it is fed)
        seen: list[bytes] = []
        fed = 0
        try:
            # every chunk that has arrived is written at once, each its own chunk on the
            # wire (nothing waits for more), and inspected once it is written, so an
            # abandoned response is measured by what was delivered (a failed write is not)
            while (ready := upstream.take_ready()) is not None:
                if not ready:
                    await upstream.arrival()
                    continue
                batch: Collection[bytes] = ready
                n = sum(map(len, batch))
                if hold_last and clen is not None and sent + n >= clen:
                    # the chunk that completes the body waits for the commit
                    batch, held, n = _until_last(batch, sent, clen)
                try:
                    if strip is None:
                        # an unmetered body that has all arrived ends with its last chunks
                        # (a metered one after its measurement: strict waits for the commit)
                        wire.send(batch, unmetered and upstream.complete)
                    else:
                        wire.send([out for chunk in batch if (out := strip.feed(chunk))])
                except _WRITE_ERRORS as exc:
                    raise Aborted() from exc
                sent += n
                if inspector is not None:
                    seen += batch
                    if held is not None:
                        seen.append(held)
                    if sent - fed > _FEED_BATCH:
                        _feed(inspector, seen)
                        fed = sent
                if held is not None:
                    break
                if wire.paused:
                    try:
                        await wire.drain()
                    except _WRITE_ERRORS as exc:
                        raise Aborted() from exc
            if strip is not None and (rest := strip.flush()):
                await _write(resp, rest)
        except BODY_ERRORS as exc:
            # the upstream died mid-body: the consumer gets a truncated response (the
            # connection is closed, never a clean end). Part of the body reached it: billed
            # for what was delivered, as an abandoned stream is, with the upstream's status
            # (flagged); none did: a 502
            metrics.upstream_errors_total.labels(body_error(exc).type + "_midstream").inc()
            self.flags = "upstream_aborted"
            self.upstream_s = time.perf_counter() - t_up
            _feed(inspector, seen)
            if (commit := self._finish(status if sent and self.delivered else 502, upstream,
                                       inspector, sent)) is not None:
                await commit
            _kill(req)
            return resp
        except (Aborted, asyncio.CancelledError):
            metrics.client_aborts_total.inc()
            self.flags = "abandoned"
            self.upstream_s = time.perf_counter() - t_up
            _feed(inspector, seen)
            if (commit := self._finish(status, upstream, inspector, sent)) is not None:
                await commit
            raise
        self.upstream_s = time.perf_counter() - t_up
        _feed(inspector, seen)
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

    async def _read_small(self, upstream: Response, inspector: Any, t_up: float) -> bytes:
        """A small body that had not all arrived with the head: read whole. A broken one is
        recorded as a 502 (what was measured) and raised as the consumer's 502."""
        try:
            return await upstream.read()
        except BODY_ERRORS as exc:
            err = body_error(exc)
            metrics.upstream_errors_total.labels(err.type + "_midstream").inc()
            self.flags = "upstream_aborted"
            self.upstream_s = time.perf_counter() - t_up
            if (commit := self._finish(502, upstream, inspector, 0)) is not None:
                await commit
            raise err from exc

    def _usage_filter(self, upstream: Response) -> UsageChunkFilter | None:
        """When the proxy added include_usage for this client, a filter that removes the
        usage-only chunk again (not on a compressed stream: it passes as the upstream sent
        it, extra chunk included)."""
        if upstream.header("Content-Encoding") or \
                not is_event_stream(upstream.header("Content-Type")):
            return None
        return UsageChunkFilter(self.s.cap)

    def _finish(self, status: int, upstream: Response, inspector: Any,
                response_bytes: int, withhold: bool = False) -> asyncio.Future[None] | None:
        """Measure and record; in strict mode returns the commit to wait for before the
        final bytes go out (a plain function: no coroutine frame on the hot path).
        ``withhold``: a failed commit answers 503 instead of the response, so the row is
        dropped then (never billed; see Store invariant 8)."""
        total = time.perf_counter() - self.ctx.started
        metrics.observe_request(self.upstream_s, max(total - self.upstream_s, 0.0))
        rule = self.ctx.rule
        if rule is None or not self.ctx.metered:
            return None
        if self.flags and not self.delivered and not self.ctx.request.content.is_eof():
            # the consumer never finished sending its request (cut off by limits.body_timeout,
            # or gone) and nothing of the answer reached it (a buffered answer is withheld
            # until here; a streamed one started after the connection was already closed):
            # there is no request to bill. An answer delivered in full, or a streamed answer
            # the consumer received part of and abandoned, is billed even if the body never
            # ended (an upstream that answers without reading the body would otherwise serve
            # it free).
            return None
        m = None
        rc = self.s.settlement.for_rule(rule)
        if rc.body_only:
            m = body_measurement(status, inspector.result() if inspector is not None else None,
                                 bool(self.flags))
        elif rc.quantities is None:
            m = Measurement(status=status,
                            request_headers=matched_headers(self.ctx.request.headers),
                            response_headers=CIMultiDict(upstream.headers)
                            if rc.response_headers else _NO_HEADERS,
                            query=self.ctx.request.query,
                            path_params=self.ctx.params, request_json=self.request_json,
                            response_body=inspector.result() if inspector is not None else None,
                            request_bytes=self.request_bytes, response_bytes=response_bytes,
                            duration_ms=Decimal(int(total * 1000)), abandoned=bool(self.flags))
        return self.s.settlement.record(self.ctx, rule, m, status, self.flags, withhold, rc)


# the response headers of a measurement whose rule reads none (never looked at)
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


def _encoded(headers: Any) -> bool:
    """True when the request body has a content coding other than identity, on any
    ``Content-Encoding`` line or list item: a compressed body must not hide behind a first
    "identity" (the upstream would decode it; the proxy could not read it)."""
    return any(t.strip() and t.strip().lower() != "identity"
               for v in headers.getall("Content-Encoding", ()) for t in v.split(","))


def _as_python_reads(buf: bytearray) -> object:
    """What a Python upstream reads (``json.loads`` of the bytes) from a request body orjson
    refused although it may be valid JSON (a number beyond a double's range, an escaped lone
    surrogate; UTF-16 or UTF-32), else UNREADABLE. Called only for a refused body."""
    try:
        return json.loads(bytes(buf))
    except (ValueError, RecursionError):
        return UNREADABLE


def _withheld() -> HttpError:
    return HttpError("Usage could not be recorded; the answer is withheld (and not "
                     "billed). Retry shortly.", status=503, type_="metering_unavailable")


# what writing to a consumer that went away raises. A socket error (ECONNRESET, EPIPE) never
# comes out of a write: the transport closes and calls connection_lost, and the next write
# finds it closing (ClientConnectionResetError). A drain waiting when the connection is lost
# fails with a plain ConnectionError, not listed: aiohttp cancels the handler in the same
# step (handler_cancellation=True, proxy/app.py), so the loop sees CancelledError, the same
# abandon path (tests/test_proxy_pipeline.py: a consumer reset while its connection is full,
# and between events).
_WRITE_ERRORS = (ConnectionResetError, aiohttp.ClientConnectionResetError, RuntimeError)


_FEED_BATCH = 64 * 1024


def _feed(inspector: Any, seen: list[bytes]) -> None:
    """Hand the written chunks held in ``seen`` to the inspector (joined), and forget them."""
    if seen:
        inspector.feed(seen[0] if len(seen) == 1 else b"".join(seen))
        seen.clear()


async def _write(resp: web.StreamResponse, chunk: bytes) -> None:
    try:
        await resp.write(chunk)
    except _WRITE_ERRORS as exc:
        raise Aborted() from exc


def _until_last(batch: Collection[bytes], sent: int,
                clen: int) -> tuple[list[bytes], bytes, int]:
    """A batch that completes a Content-Length body of ``clen`` bytes (``sent`` of them
    written before it), split as the chunk-at-a-time loop did: the chunks before the one
    that reaches ``clen``, that chunk (held until the commit), and the bytes up to and
    including it (the upstream's parser ends a body at its length, so nothing follows it)."""
    before: list[bytes] = []
    n = 0
    for chunk in batch:
        n += len(chunk)
        if sent + n >= clen:
            return before, chunk, n
        before.append(chunk)
    raise AssertionError("the batch does not reach clen")


def _kill(req: web.BaseRequest) -> None:
    """Close the consumer connection without a clean end, so a partial body is never mistaken
    for a complete one."""
    transport = req.transport
    if transport is not None:
        transport.abort()
