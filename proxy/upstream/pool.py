"""The keep-alive upstream pool: limits, the bounded wait, retries, and the one sweeper task
that checks every deadline (connect, read, expect, idle, pool wait) every sweep_interval."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import AsyncIterable, Coroutine, Iterable, Mapping
from typing import Any

from proxy.tasks import cancel_and_wait
from proxy.upstream.config import Origin, PoolConfig
from proxy.upstream.connection import DISARMED, EXPECT, Connection, Response, SendState, Stale, Upgraded
from proxy.upstream.errors import ConnectError, ConnectionClosed, ConnectTimeout, PoolBusy

HOP_BY_HOP = frozenset((
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "proxy-connection", "content-length", "host"))
IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"))
# methods aiohttp's client sends without `Content-Length: 0` when they have no body
NO_BODY_METHODS = frozenset(("GET", "HEAD", "OPTIONS", "TRACE", "CONNECT"))

HeadersIn = Mapping[str, str] | Iterable[tuple[str, str]]
Body = bytes | AsyncIterable[bytes] | None


class _Host:
    __slots__ = ("count", "idle", "origin")

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.idle: list[Connection] = []     # a stack: the most recently used is reused first
        self.count = 0                       # open or opening connections to this origin


class _Waiter:
    __slots__ = ("fut", "host", "since")

    def __init__(self, fut: asyncio.Future[Connection | None], host: _Host, since: float) -> None:
        self.fut, self.host, self.since = fut, host, since


class UpstreamPool:
    """Keep-alive HTTP/1.1 connections to one or more origins.

    ``request()`` returns a ``Response`` once its head has arrived; the body is read by
    iterating it. A connection goes back to the pool by itself when the response and the
    request body are both complete and the upstream allows keep-alive; ``Response.release()``
    closes it otherwise. Every limit and deadline is in ``PoolConfig``.
    """

    def __init__(self, origin: str | Origin, cfg: PoolConfig | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.cfg = cfg or PoolConfig()
        self.origin = origin if isinstance(origin, Origin) else Origin.parse(origin)
        self.ssl_context = ssl_context
        self.hosts: dict[Origin, _Host] = {}
        self.conns: set[Connection] = set()
        self.total = 0
        self.waiters: deque[_Waiter] = deque()
        self.connecting: dict[asyncio.Task[Any], float] = {}
        self.timed_out: set[asyncio.Task[Any]] = set()
        self.clock = 0.0
        self.closed = False
        self._sweeper: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- the request API ------------------------------------------------------------------

    def request(self, method: str, target: str, headers: HeadersIn = (),
                body: Body = None, *, origin: Origin | None = None) -> Coroutine[Any, Any, Response]:
        """Send ``method target`` (the request target, e.g. ``/v1/x?y=1``, sent as given
        after the origin's prefix) and return the response once its head has arrived.

        ``headers``: a mapping (all of a multidict's items are sent) or (name, value) pairs.
        Hop-by-hop headers, those named by ``Connection``, ``Host`` and ``Content-Length``
        are dropped; ``Host`` is the caller's if it sent one, else the origin's.
        ``body``: None, bytes (sent with Content-Length), or an async iterable of bytes:
        streamed with the caller's ``Content-Length`` if it gave one (the body must match
        it), else chunked. ``Expect: 100-continue`` holds the body back until ``100``, a
        final response (the body is then never sent) or ``expect_timeout``.
        (A plain function returning ``_request``'s coroutine: no second coroutine frame per
        request; await it or hand it to ``create_task`` like a coroutine function's result.)
        """
        return self._request(method, target, headers, body, origin or self.origin, False)

    async def upgrade(self, target: str, headers: HeadersIn = (), protocol: str = "websocket",
                      *, origin: Origin | None = None) -> tuple[Response, Upgraded | None]:
        """A GET asking the upstream to switch to ``protocol`` (``Connection: Upgrade``).
        On ``101`` returns the head and the raw connection (``Upgraded``), held until its
        ``close()``; otherwise the response (read and release it as usual) and None."""
        resp = await self._request("GET", target, headers, None, origin or self.origin,
                                   protocol)
        return resp, resp.upgraded

    async def _request(self, method: str, target: str, headers: HeadersIn, body: Body,
                       origin: Origin, upgrade: str | bool) -> Response:
        if self.closed:
            raise ConnectionClosed("the upstream pool is closed")
        if self._sweeper is None:
            self._start()
        head, expect, chunked, length = _build_head(method, origin, target, headers, body,
                                                    upgrade)
        is_head = method == "HEAD"
        state = None if body is None or isinstance(body, bytes) else SendState()
        retried = False
        host = self.hosts.get(origin)
        if host is None:
            host = self.hosts[origin] = _Host(origin)
        while True:
            idle = host.idle
            while idle:             # the common case, without another coroutine
                conn = idle.pop()
                if not conn.closed:
                    reused = True
                    break
            else:
                conn, reused = await self._acquire(host)
            if upgrade:
                conn.want_upgrade = True
            try:
                return await conn.send(head, body, is_head, expect, chunked, length, state)
            except Stale as exc:
                # closed before any response byte: once more on another connection when the
                # request certainly did not reach the upstream, or when it is idempotent, was
                # sent on a reused (possibly stale) connection and its body can be sent again
                replayable = state is None or not state.touched
                if retried or not replayable or not (
                        exc.unsent or (reused and method in IDEMPOTENT)):
                    raise ConnectionClosed(
                        "the upstream closed the connection before answering") from None
                retried = True

    # ---- connections ------------------------------------------------------------------

    async def _acquire(self, host: _Host) -> tuple[Connection, bool]:
        idle = host.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn, True
        cfg = self.cfg
        if host.count < cfg.max_per_host and self.total < cfg.max_connections:
            self.total += 1
            host.count += 1
        elif host.count >= cfg.max_per_host or not self._evict_idle(host):
            got = await self._wait(host)
            if got is not None:
                return got, True
        return await self._connect(host), False

    def _evict_idle(self, keep: _Host) -> bool:
        """At the total limit: close the longest-idle connection of another origin."""
        oldest: Connection | None = None
        for h in self.hosts.values():
            if h is not keep and h.idle and (oldest is None or
                                             h.idle[0].idle_since < oldest.idle_since):
                oldest = h.idle[0]
        if oldest is None:
            return False
        oldest.close()      # _forget frees its place
        if self.total < self.cfg.max_connections and keep.count < self.cfg.max_per_host:
            self.total += 1
            keep.count += 1
            return True
        return False

    async def _wait(self, host: _Host) -> Connection | None:
        """Queue for a connection: resolved with an idle connection of this origin, or None
        (a place to open one has been reserved for us). Expired by the sweeper."""
        loop = self._loop or asyncio.get_running_loop()
        fut: asyncio.Future[Connection | None] = loop.create_future()
        self.waiters.append(_Waiter(fut, host, loop.time()))
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                got = fut.result()
                if got is not None:
                    self._release(got)
                else:
                    self._unreserve(host)
            raise

    async def _connect(self, host: _Host) -> Connection:
        """Open a connection (a place is already reserved in the counts)."""
        loop = self._loop or asyncio.get_running_loop()
        origin = host.origin
        tls = origin.scheme == "https"
        ctx = (self.ssl_context or ssl.create_default_context()) if tls else None
        task = loop.create_task(loop.create_connection(
            lambda: Connection(self, host), origin.host, origin.port, ssl=ctx,
            server_hostname=origin.host if tls else None))
        self.connecting[task] = loop.time()
        try:
            _, conn = await task
        except BaseException as exc:
            if task.done() and not task.cancelled() and task.exception() is None:
                task.result()[1].close()     # connected, but we were cancelled: its place is freed
            else:
                self._unreserve(host)
            timed_out = task in self.timed_out
            cur = asyncio.current_task()
            if isinstance(exc, asyncio.CancelledError) and timed_out and \
                    (cur is None or not cur.cancelling()):
                raise ConnectTimeout(
                    f"no connection to the upstream within {self.cfg.connect_timeout:g}s") from None
            if isinstance(exc, (OSError, ssl.SSLError)):
                raise ConnectError(
                    f"the upstream could not be reached ({type(exc).__name__})") from exc
            raise
        finally:
            self.connecting.pop(task, None)
            self.timed_out.discard(task)
        if self.closed:
            conn.close()
            raise ConnectionClosed("the upstream pool is closed")
        return conn

    def _unreserve(self, host: _Host) -> None:
        self.total -= 1
        host.count -= 1
        self._wake()

    def _release(self, conn: Connection) -> None:
        """A connection is free for another request."""
        host = conn.host
        conn.idle_since = self.clock
        for w in self.waiters:
            if w.host is host and not w.fut.done():
                self.waiters.remove(w)
                w.fut.set_result(conn)
                return
        if self.waiters and any(not w.fut.done() for w in self.waiters):
            conn.close()        # others wait for a place: this one makes room
            return
        host.idle.append(conn)

    def _forget(self, conn: Connection) -> None:
        """A connection closed: its place is free."""
        if conn not in self.conns:
            return
        self.conns.discard(conn)
        host = conn.host
        with contextlib.suppress(ValueError):
            host.idle.remove(conn)
        self._unreserve(host)

    def _wake(self) -> None:
        """Hand a free place to the first waiter whose origin has room."""
        if self.total >= self.cfg.max_connections:
            return
        for w in self.waiters:
            if not w.fut.done() and w.host.count < self.cfg.max_per_host:
                self.waiters.remove(w)
                self.total += 1
                w.host.count += 1
                w.fut.set_result(None)
                return

    # ---- the sweeper ------------------------------------------------------------------

    def _start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self.clock = loop.time()
        self._sweeper = loop.create_task(self._sweep_forever(), name="upstream-pool-sweeper")

    async def _sweep_forever(self) -> None:
        interval = self.cfg.sweep_interval
        while True:
            await asyncio.sleep(interval)
            self._sweep()

    def _sweep(self) -> None:
        """Every deadline, checked once per sweep_interval (coarse by design)."""
        loop = self._loop
        assert loop is not None
        now = self.clock = loop.time()
        cfg = self.cfg
        for task, started in list(self.connecting.items()):
            if now - started >= cfg.connect_timeout and not task.done():
                self.timed_out.add(task)
                task.cancel()
        while self.waiters and (self.waiters[0].fut.done()
                                or now - self.waiters[0].since >= cfg.pool_wait):
            w = self.waiters.popleft()
            if not w.fut.done():
                w.fut.set_exception(PoolBusy(
                    f"All {cfg.max_connections} upstream connections stayed busy for "
                    f"{cfg.pool_wait:g}s; the request was not forwarded. Retry shortly."))
        idle_timeout, read_timeout, expect_timeout = cfg.idle_timeout, cfg.read_timeout, \
            cfg.expect_timeout
        for conn in list(self.conns):
            armed = conn.armed
            if armed == DISARMED or conn.paused:
                if not conn.active and conn.upgraded is None and \
                        now - conn.idle_since >= idle_timeout:
                    conn.close()
                continue
            if conn.nreads != conn.seen:
                conn.seen, conn.since = conn.nreads, now
                continue
            if now - conn.since >= (expect_timeout if armed == EXPECT else read_timeout):
                conn.expire(armed)

    async def close(self) -> None:
        """Close every connection and fail every waiter; the pool takes no more requests."""
        self.closed = True
        sweeper, self._sweeper = self._sweeper, None
        await cancel_and_wait(sweeper)
        for task in list(self.connecting):
            task.cancel()
        while self.waiters:
            w = self.waiters.popleft()
            if not w.fut.done():
                w.fut.set_exception(ConnectionClosed("the upstream pool is closed"))
        for conn in list(self.conns):
            conn.close()
        await asyncio.sleep(0)      # let the transports run their connection_lost

    # ---- introspection (metrics, tests) --------------------------------------------------

    def stats(self) -> dict[str, int]:
        idle = sum(len(h.idle) for h in self.hosts.values())
        return {"open": self.total, "idle": idle, "waiting": len(self.waiters),
                "connecting": len(self.connecting)}


def _build_head(method: str, origin: Origin, target: str, headers: HeadersIn, body: Body,
                upgrade: str | bool) -> tuple[bytes, bool, bool, int | None]:
    """The request head, and (expect 100-continue, chunked, content length)."""
    # (a list first: isinstance against the Mapping ABC is slow for a non-mapping)
    items: Iterable[tuple[str, str]] = headers if isinstance(headers, list) else \
        headers.items() if isinstance(headers, Mapping) else headers
    skip = HOP_BY_HOP
    lines = [f"{method} {origin.prefix}{target} HTTP/1.1\r\n", ""]    # Host goes first
    host: str | None = None
    given_length: str | None = None
    expect = False
    add = lines.append
    for name, value in items:
        low = name.lower()
        if low in skip:
            if low == "host":
                host = value
            elif low == "content-length":
                given_length = value
            elif low == "connection":
                named = {t.strip().lower() for t in value.split(",") if t.strip()}
                if named - skip:
                    skip = skip | named
                    lines = [line for line in lines
                             if line.split(":", 1)[0].lower() not in named]
                    add = lines.append
            continue
        if low == "expect" and value.strip().lower() == "100-continue":
            expect = True
        add(f"{name}: {value}\r\n")
    lines[1] = f"Host: {host if host is not None else origin.host_header}\r\n"
    chunked = False
    length: int | None = None
    if body is None:
        expect = False
        if given_length not in (None, "0"):
            raise ValueError("a Content-Length without a body")
        if method not in NO_BODY_METHODS:
            add("Content-Length: 0\r\n")
    elif isinstance(body, bytes):
        length = len(body)
        add(f"Content-Length: {length}\r\n")
        if not body:
            expect = False
    elif given_length is not None:
        if not given_length.isdigit():
            raise ValueError(f"invalid Content-Length {given_length!r}")
        length = int(given_length)
        add(f"Content-Length: {length}\r\n")
    else:
        chunked = True
        add("Transfer-Encoding: chunked\r\n")
    if upgrade:
        add(f"Connection: Upgrade\r\nUpgrade: {upgrade}\r\n")
    add("\r\n")
    text = "".join(lines)
    n = len(lines) + (1 if upgrade else 0)
    if text.count("\n") != n or text.count("\r") != n or " " in target:
        raise ValueError("CR, LF or a space in the request target or a header")
    return text.encode("utf-8", "surrogateescape"), expect, chunked, length
