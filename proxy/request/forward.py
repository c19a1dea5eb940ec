"""Step 3, forwarding: the headers sent upstream, and ``Upstream``, which owns the
forwarding core: the keep-alive pool of ``proxy.upstream`` (asyncio Protocols parsing with
httptools) to the guarded API.

The seam to the rest of the pipeline is narrow on purpose: ``forward_headers`` builds the
request head, ``Upstream.request`` sends it (the response holds its pooled connection until
``release()``), ``response_headers`` copies the answer's end-to-end headers, and
``BODY_ERRORS`` / ``body_error`` name a failure while the body is read.

The pool's errors are ``UpstreamError`` subclasses (refused or reset 502
``upstream_unavailable``, no answer in time 504 ``upstream_timeout``, no connection free in
``pool_wait`` 503 ``upstream_busy``). The request target is sent byte for byte (the
canonical target, never re-quoted); bodies pass through byte for byte in both directions
(nothing is decompressed). WebSocket handshakes alone go through aiohttp's client, whose
exceptions are translated here too.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy, istr
from yarl import URL

from proxy import metrics
from proxy.config import UpstreamConfig
from proxy.errors import UpstreamBusy, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from proxy.upstream import BodyError, PoolConfig, Response, UpstreamPool

HOP_BY_HOP = frozenset((
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "proxy-connection"))


def response_headers(headers: list[tuple[str, str]], rid: str) -> list[tuple[str, str]]:
    """The consumer's response head: the upstream's end-to-end headers (given as (name,
    value) pairs in the order received; hop-by-hop and those named by Connection dropped),
    in order, with ``X-Request-Id: rid`` set the way a multidict's ``d[name] = value`` sets
    it: in place of the first such header (the others dropped), else appended."""
    skip = HOP_BY_HOP
    has_rid = False
    for k, v in headers:
        n = len(k)
        if n == 10 and k.lower() == "connection":
            skip = skip | {t.strip().lower() for t in v.split(",") if t.strip()}
        elif n == 12 and k.lower() == "x-request-id":
            has_rid = True
    out = [(k, v) for k, v in headers if k.lower() not in skip]
    if not has_rid:
        out.append(("X-Request-Id", rid))
        return out
    return set_header(out, "X-Request-Id", rid)


def set_header(pairs: list[tuple[str, str]], name: str, value: str) -> list[tuple[str, str]]:
    """``pairs`` with ``name`` set as ``CIMultiDict.__setitem__`` sets it: the first header
    of that name (any case) becomes ``(name, value)`` in its place, later ones are dropped;
    appended when there is none."""
    low = name.lower()
    out: list[tuple[str, str]] = []
    done = False
    for k, v in pairs:
        if k.lower() == low:
            if not done:
                out.append((name, value))
                done = True
            continue
        out.append((k, v))
    if not done:
        out.append((name, value))
    return out


_XRID = istr("X-Request-Id")
# the headers the proxy sets on the way up, in the order it sets them (lower-case -> index)
_SET_UP = ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "X-Request-Id")
_SET_UP_AT = {name.lower(): i for i, name in enumerate(_SET_UP)}
# headers the proxy sets or guards (the above, and the method overrides the pipeline
# checks): a consumer's spelling of one with `_` for `-` is dropped, since CGI, WSGI and
# FastCGI upstreams read X_Forwarded_For or X_HTTP_Method_Override as the real one (as
# HTTP_X_FORWARDED_FOR ...) and would take the consumer's value past the proxy's
_GUARDED = frozenset((*_SET_UP_AT, "x-http-method-override", "x-http-method",
                      "x-method-override"))


def forward_headers(request: web.BaseRequest, rid: str,
                    skip: frozenset[str]) -> list[tuple[str, str]]:
    """The head sent upstream, as (name, value) pairs in order: the consumer's end-to-end
    headers (minus ``skip``: ``HOP_BY_HOP`` with the lower-case names the proxy drops, the
    API key headers unless forwarded and Host), then X-Forwarded-For/-Proto/-Host and
    X-Request-Id, each set the way a multidict's ``d[name] = value`` sets it (in place of the
    first such header the consumer sent, its others dropped; else appended in that order).
    A spelling of those or of the method override headers with ``_`` for ``-`` is dropped
    (``_GUARDED``). One pass over the consumer's headers."""
    h = request.headers
    conn = h.get("Connection")
    if conn:
        skip = skip | {t.strip().lower() for t in conn.split(",") if t.strip()}
    out: list[tuple[str, str]] = []
    at: list[int] | None = None          # where the consumer's own copies of _SET_UP were
    for k, v in h.items():
        low = k.lower()
        if low in skip or ("_" in low and low.replace("_", "-") in _GUARDED):
            continue
        i = _SET_UP_AT.get(low)
        if i is not None:
            if at is None:
                at = [-1, -1, -1, -1]
            if at[i] >= 0:
                continue
            at[i] = len(out)
        out.append((k, v))
    peer = request.remote or ""
    prior = h.get("X-Forwarded-For")
    values = (f"{prior}, {peer}" if prior else peer, request.scheme, request.host, rid)
    if at is None:
        out += zip(_SET_UP, values, strict=True)
        return out
    for i, name in enumerate(_SET_UP):
        if at[i] >= 0:
            out[at[i]] = (name, values[i])
        else:
            out.append((name, values[i]))
    return out


# Connection tokens that name no end-to-end header (close, keep-alive; Upgrade is hop-by-hop)
_PLAIN_CONNECTION = frozenset(("close", "keep-alive", "upgrade"))


def matched_headers(h: CIMultiDictProxy[str]) -> CIMultiDictProxy[str]:
    """The consumer's headers as the upstream receives them, for rule matching and
    measurement: without the headers its ``Connection`` header names (``forward_headers``
    drops them on the way up), so a rule never matches or measures a header the upstream
    does not get. ``h`` itself (no copy) when ``Connection`` names none."""
    conn = h.get("Connection")
    if not conn:
        return h
    named = {t.strip().lower() for t in conn.split(",") if t.strip()} - _PLAIN_CONNECTION
    if not named:
        return h
    return CIMultiDictProxy(CIMultiDict([(k, v) for k, v in h.items()
                                         if k.lower() not in named]))


def upstream_headers(request: web.BaseRequest, rid: str, drop: frozenset[str]) -> CIMultiDict[str]:
    """``forward_headers`` as a multidict (the WebSocket handshake's, for aiohttp's client);
    ``drop`` holds lower-case names."""
    return CIMultiDict(forward_headers(request, rid, HOP_BY_HOP | drop))


class Upstream:
    """The forwarding core: one ``proxy.upstream.UpstreamPool`` (keep-alive HTTP/1.1
    connections of asyncio Protocols parsing with httptools) for every HTTP request, and an
    aiohttp ``ClientSession`` for WebSocket sessions only (see ``ws_connect``).

    The pool bounds its connections (``pool_size``) and waits at most ``pool_wait`` for one
    (then ``UpstreamBusy``, 503); a response holds its connection until ``release()``.
    Its errors are already ``UpstreamError``s (502/503/504, ``proxy/upstream/errors.py``)."""

    def __init__(self, cfg: UpstreamConfig) -> None:
        self.base = cfg.url
        self.pool = UpstreamPool(cfg.url, pool_config(cfg))
        metrics.watch_upstream_pool(self.pool.stats)
        # WebSocket sessions: aiohttp's client, bounded by its own pool_size slots
        self.slots = cfg.pool_size
        self.ws_in_use = 0
        self.pool_wait = cfg.pool_wait
        self._ws_waiters: deque[asyncio.Future[None]] = deque()
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout,
                                              sock_read=cfg.read_timeout)
        self._session: aiohttp.ClientSession | None = None

    @property
    def in_use(self) -> int:
        """Upstream connections held by a request or a WebSocket session now."""
        pool = self.pool
        return pool.total - sum(len(h.idle) for h in pool.hosts.values()) + self.ws_in_use

    @property
    def waiting(self) -> int:
        """Requests queued for a connection (the pool's limit reached)."""
        return sum(1 for w in self.pool.waiters if not w.fut.done()) + \
            sum(1 for f in self._ws_waiters if not f.done())

    def request(self, method: str, target: str, headers: list[tuple[str, str]],
                data: Any) -> Awaitable[Response]:
        """``target`` is the canonical request target (proxy.target): it reaches the
        upstream byte for byte. The response holds its connection until ``release()``.
        ``data``: None, bytes, or an async iterable of bytes (streamed with the caller's
        Content-Length if ``headers`` has one, else chunked)."""
        return self.pool.request(method, target, headers, data)

    # ---- WebSocket sessions (aiohttp's client) ---------------------------------------

    async def acquire_slot(self) -> None:
        if self.ws_in_use < self.slots:
            self.ws_in_use += 1
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._ws_waiters.append(fut)
        timer = loop.call_later(self.pool_wait, _expire, fut, self.slots, self.pool_wait)
        try:
            await fut               # resolved by release_slot: the slot is handed over
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release_slot()     # handed a slot, then cancelled: give it on
            raise
        finally:
            timer.cancel()

    def release_slot(self) -> None:
        waiters = self._ws_waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)    # ws_in_use unchanged: the slot moves to the waiter
                return
        self.ws_in_use -= 1

    async def ws_connect(self, target: str, headers: CIMultiDict[str],
                         protocols: tuple[str, ...]) -> aiohttp.ClientWebSocketResponse:
        """Holds one slot for the session's life on success: ``release_slot()`` after
        closing it. (WebSocket sessions stay on aiohttp's client: the consumer side is
        aiohttp's ``WebSocketResponse``, which relays messages, not bytes; see
        docs/PERFORMANCE.md.)"""
        await self.acquire_slot()
        try:
            return await self._ws_connect(target, headers, protocols)
        except BaseException:
            self.release_slot()
            raise

    async def _ws_connect(self, target: str, headers: CIMultiDict[str],
                          protocols: tuple[str, ...]) -> aiohttp.ClientWebSocketResponse:
        session = self._session
        if session is None:
            session = self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.slots, ttl_dns_cache=300,
                                               enable_cleanup_closed=False),
                timeout=self._timeout, auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
                cookie_jar=aiohttp.DummyCookieJar())
        url = URL(self.base.replace("http", "ws", 1) + target, encoded=True)
        try:
            return await session.ws_connect(url, headers=headers, protocols=protocols,
                                            autoclose=False, autoping=False)
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout("the upstream did not answer in time") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnavailable(f"the upstream could not be reached ({type(exc).__name__})") \
                from exc

    async def close(self) -> None:
        await self.pool.close()
        if self._session is not None:
            await self._session.close()


def pool_config(cfg: UpstreamConfig) -> PoolConfig:
    """The pool's settings from ``upstream.*``. The sweeper that checks every deadline runs
    at least twice per shortest deadline (at most every 0.5 s)."""
    sweep = max(min(0.5, cfg.connect_timeout / 2, cfg.read_timeout / 2, cfg.pool_wait / 2,
                    cfg.idle_timeout / 2), 0.01)
    return PoolConfig.from_upstream(
        cfg, idle_timeout=cfg.idle_timeout, max_requests=cfg.max_requests_per_connection,
        max_head_bytes=cfg.max_response_head_bytes,
        max_field_bytes=cfg.max_response_field_bytes,
        max_headers=cfg.max_response_headers, sweep_interval=sweep)


def _expire(fut: asyncio.Future[None], slots: int, wait: float) -> None:
    if not fut.done():
        fut.set_exception(UpstreamBusy(
            f"All {slots} upstream connections stayed busy for {wait:g}s; the request was not "
            "forwarded (and not billed). Retry shortly."))


# What reading an upstream body can raise; the handler loops over the body itself (an async
# generator wrapper costs several µs per chunk) and hands these to ``body_error``.
BODY_ERRORS: tuple[type[BaseException], ...] = (BodyError,)


def body_error(exc: BaseException) -> UpstreamError:
    """Translate a failure while reading the upstream body (mid-stream): the pool's
    ``BodyError`` (502) and ``BodyTimeout`` (504) already are ``UpstreamError``s."""
    if isinstance(exc, UpstreamError):
        return exc
    return UpstreamUnavailable(f"the upstream connection broke mid-body ({type(exc).__name__})")
