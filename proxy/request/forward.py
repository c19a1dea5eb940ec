"""Step 3, forwarding: the headers sent upstream, and ``Upstream``, which owns the one
aiohttp ClientSession (keep-alive pool) to the guarded API.

The seam to the rest of the pipeline is narrow on purpose (a different forwarding core can
replace this module): ``upstream_headers`` builds the request head, ``Upstream.request`` /
``Upstream.ws_connect`` send it and hold a pool slot until ``release_slot``, and
``BODY_ERRORS`` / ``body_error`` translate a failure while the body is read.

This is the only module that touches aiohttp's client exceptions: they are translated
to ``UpstreamUnavailable`` (502) and ``UpstreamTimeout`` (504) here. Bodies are passed
through byte for byte (``auto_decompress=False``): what the consumer receives is what
the upstream sent.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, istr
from yarl import URL

from proxy.config import UpstreamConfig
from proxy.errors import UpstreamBusy, UpstreamError, UpstreamTimeout, UpstreamUnavailable

HOP_BY_HOP = frozenset((
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "proxy-connection"))


def strip_hop_by_hop(headers: Mapping[str, str], out: CIMultiDict[str],
                     drop: frozenset[str] = frozenset()) -> CIMultiDict[str]:
    """Copy end-to-end headers into ``out`` (hop-by-hop and those named by Connection dropped).
    ``drop`` holds lower-case names."""
    conn = headers.get("Connection")
    skip = HOP_BY_HOP | drop if drop else HOP_BY_HOP
    if conn:
        skip = skip | {t.strip().lower() for t in conn.split(",") if t.strip()}
    add = out.add
    for k, v in headers.items():
        if k.lower() not in skip:
            add(k, v)
    return out


_XRID = istr("X-Request-Id")


def upstream_headers(request: web.Request, rid: str, drop: frozenset[str]) -> CIMultiDict[str]:
    """The head sent upstream: the consumer's end-to-end headers (minus ``drop``, lower-case:
    the API key headers unless forwarded, and Host), X-Forwarded-*, and X-Request-Id."""
    headers: CIMultiDict[str] = CIMultiDict()
    strip_hop_by_hop(request.headers, headers, drop)
    peer = request.remote or ""
    prior = request.headers.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    headers["X-Forwarded-Proto"] = request.scheme
    headers["X-Forwarded-Host"] = request.host
    headers[_XRID] = rid
    return headers


class Upstream:
    """Every call takes one of ``pool_size`` slots (the connector's own limit, whose wait has
    no bound) and gives it back with ``release_slot()`` once the response is released. With
    every slot taken a call waits at most ``pool_wait``, then raises ``UpstreamBusy`` (503).
    A free slot costs two integer operations; only a full pool allocates a waiter."""

    def __init__(self, cfg: UpstreamConfig) -> None:
        self.base = cfg.url
        self.slots = cfg.pool_size
        self.in_use = 0
        self.pool_wait = cfg.pool_wait
        self._waiters: deque[asyncio.Future[None]] = deque()
        # canonical target -> upstream URL; bounded (yarl's own parse cache is slower to hit)
        self._urls: dict[str, URL] = {}
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout,
                                              sock_read=cfg.read_timeout)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=cfg.pool_size, ttl_dns_cache=300,
                                           enable_cleanup_closed=False),
            timeout=self._timeout,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def acquire_slot(self) -> None:
        if self.in_use < self.slots:
            self.in_use += 1
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append(fut)
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
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)    # in_use unchanged: the slot moves to the waiter
                return
        self.in_use -= 1

    async def request(self, method: str, target: str, headers: CIMultiDict[str],
                      data: Any) -> aiohttp.ClientResponse:
        """``target`` is the canonical request target (proxy.target): it reaches the
        upstream byte for byte (``encoded=True``: yarl neither re-quotes nor normalizes).
        The caller owns one slot once this returns: ``release_slot()`` after releasing
        the response. On an exception no slot is held."""
        url = self._urls.get(target)
        if url is None:
            url = URL(self.base + target, encoded=True)
            if len(target) <= 256:
                if len(self._urls) >= 4096:
                    self._urls.clear()
                self._urls[target] = url
        await self.acquire_slot()
        try:
            return await self.session.request(method, url, headers=headers,
                                              data=data, allow_redirects=False, compress=None)
        except BaseException as exc:
            self.release_slot()
            if isinstance(exc, (TimeoutError, aiohttp.ServerTimeoutError)):
                raise UpstreamTimeout("the upstream did not answer in time") from exc
            if isinstance(exc, (aiohttp.ClientError, OSError)):
                raise UpstreamUnavailable(
                    f"the upstream could not be reached ({type(exc).__name__})") from exc
            raise

    async def ws_connect(self, target: str, headers: CIMultiDict[str],
                         protocols: tuple[str, ...]) -> aiohttp.ClientWebSocketResponse:
        """Holds one slot for the session's life on success: ``release_slot()`` after
        closing it."""
        await self.acquire_slot()
        try:
            return await self._ws_connect(target, headers, protocols)
        except BaseException:
            self.release_slot()
            raise

    async def _ws_connect(self, target: str, headers: CIMultiDict[str],
                          protocols: tuple[str, ...]) -> aiohttp.ClientWebSocketResponse:
        url = URL(self.base.replace("http", "ws", 1) + target, encoded=True)
        try:
            return await self.session.ws_connect(url, headers=headers, protocols=protocols,
                                                 autoclose=False, autoping=False)
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout("the upstream did not answer in time") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnavailable(f"the upstream could not be reached ({type(exc).__name__})") \
                from exc

    async def close(self) -> None:
        await self.session.close()


def _expire(fut: asyncio.Future[None], slots: int, wait: float) -> None:
    if not fut.done():
        fut.set_exception(UpstreamBusy(
            f"All {slots} upstream connections stayed busy for {wait:g}s; the request was not "
            "forwarded (and not billed). Retry shortly."))


# What reading an upstream body can raise; the handler loops over the body itself (an async
# generator wrapper costs several µs per chunk) and hands these to ``body_error``.
BODY_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, OSError, TimeoutError)


def body_error(exc: BaseException) -> UpstreamError:
    """Translate a failure while reading the upstream body (mid-stream)."""
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout("the upstream stopped sending mid-body")
    return UpstreamUnavailable(f"the upstream connection broke mid-body ({type(exc).__name__})")
