"""One keep-alive connection to an upstream: an asyncio Protocol that writes requests and
parses responses with httptools (llhttp), and the ``Response`` it hands to the caller.

Everything a request needs happens in the protocol's callbacks and in the requesting
coroutine: no task and no timer per request. Deadlines are fields (``armed``, ``nreads``)
that the pool's one sweeper reads (``UpstreamPool._sweep``).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

import httptools

from proxy.errors import MeterproxyError
from proxy.upstream.errors import (
    BodyError,
    BodyTimeout,
    ConnectionClosed,
    ProtocolError,
    ResponseTimeout,
)

if TYPE_CHECKING:
    from proxy.upstream.pool import UpstreamPool, _Host

# what the sweeper checks on an active connection
DISARMED, READ, EXPECT = 0, 1, 2

Headers = list[tuple[str, str]]


class Stale(MeterproxyError):
    """Internal: a connection closed before any response byte of this request arrived.
    ``unsent``: it was closed before the request was written (certainly not received)."""

    def __init__(self, unsent: bool) -> None:
        super().__init__("stale connection")
        self.unsent = unsent


class _Abort(MeterproxyError):
    """Internal: raised from a parser callback to stop parsing (the reason is in conn.error)."""


def _new_parser(conn: Connection) -> httptools.HttpResponseParser:
    parser = httptools.HttpResponseParser(conn)
    # a bare LF line ending is tolerated (aiohttp's parser does too); nothing else is lenient
    parser.set_dangerous_leniencies(lenient_optional_cr_before_lf=True)
    return parser


class Response:
    """A final response head, and its body as an async iterator of ``bytes`` chunks.

    ``headers`` is the raw list of (name, value) in order, duplicates and name case kept
    (latin-1 decoded). ``trailers`` (chunked bodies) is filled once the body has ended.
    ``informational`` holds the 1xx responses skipped before this one.
    Reading pauses while more than ``high_water`` bytes wait here for the caller.
    ``release()`` (or ``close()``) after use: a body not read to its end closes the
    connection (never reused); a complete one has already gone back to the pool.
    """

    __slots__ = ("_chunks", "_conn", "_done", "_exc", "_low", "_size", "_waiter", "chunked",
                 "content_length", "headers", "informational", "keep_alive", "reason",
                 "status", "trailers", "upgraded", "version")

    def __init__(self, status: int, reason: str, headers: Headers, version: str,
                 content_length: int | None, chunked: bool, keep_alive: bool,
                 informational: list[tuple[int, Headers]], conn: Connection | None,
                 low_water: int) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.version = version
        self.content_length = content_length
        self.chunked = chunked
        self.keep_alive = keep_alive
        self.informational = informational
        self.trailers: Headers = []
        self.upgraded: Upgraded | None = None      # set on a 101 to pool.upgrade()
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._done = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._conn = conn
        self._low = low_water

    @property
    def complete(self) -> bool:
        """The whole body has arrived (it may still be buffered here)."""
        return self._done and self._exc is None

    @property
    def failed(self) -> bool:
        """The body broke (iterating raises once the buffered chunks are taken)."""
        return self._exc is not None

    @property
    def buffered(self) -> int:
        """Body bytes received and not yet taken by the caller."""
        return self._size

    def header(self, name: str) -> str | None:
        """The first value of a header (case-insensitive), or None."""
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        while True:
            chunks = self._chunks
            if chunks:
                chunk = chunks.popleft()
                self._size -= len(chunk)
                conn = self._conn
                if conn is not None and conn.paused and self._size <= self._low:
                    conn.resume()
                return chunk
            if self._exc is not None:
                raise self._exc
            if self._done:
                raise StopAsyncIteration
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    def take_ready(self) -> deque[bytes] | tuple[()] | None:
        """Every chunk that has arrived and was not taken yet, in order, at once and without
        a coroutine (``()`` when none has; then ``await arrival()``); None once the body has
        ended and all of it was taken. Raises the body's error (``BodyError``,
        ``BodyTimeout``) once the chunks that arrived before it were taken, as iterating
        does. The chunks are the caller's now, so reading resumes if it was paused: what
        waits here and in the caller's hands is at most twice what iteration allows (high
        water plus one read, each)."""
        chunks = self._chunks
        if chunks:
            self._chunks = deque()
            self._size = 0
            conn = self._conn
            if conn is not None and conn.paused:
                conn.resume()
            return chunks
        if self._exc is not None:
            raise self._exc
        if self._done:
            return None
        return ()

    async def arrival(self) -> None:
        """Wait until a chunk arrives or the body ends (at once if one is waiting or it has
        ended): then ``take_ready()`` has something to say."""
        if self._chunks or self._done:
            return
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def take(self) -> bytes:
        """The whole body once ``complete`` (no coroutine): what ``read()`` returns then."""
        assert self._done and self._exc is None
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        return data

    async def read(self) -> bytes:
        """The whole body (raises BodyError/BodyTimeout like iteration)."""
        if self._done and self._exc is None:
            data = b"".join(self._chunks)
            self._chunks.clear()
            self._size = 0
            return data
        return b"".join([chunk async for chunk in self])

    def release(self) -> None:
        """Done with this response. An unfinished body closes its connection."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.abandon(self)
        self._chunks.clear()
        self._size = 0

    close = release

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    # ---- fed by the connection (its on_body appends the chunks itself) ---------------

    def _finish(self) -> None:
        self._done = True
        self._conn = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._done:
            return
        self._done = True
        self._exc = exc
        self._conn = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Upgraded:
    """A connection the upstream switched to another protocol (``101``): the raw byte stream,
    for the caller to relay. ``initial`` holds bytes that arrived right after the head.
    Counts against the pool's limits until ``close()``."""

    __slots__ = ("_buf", "_conn", "_eof", "_size", "_waiter")

    def __init__(self, conn: Connection, initial: bytes) -> None:
        self._conn = conn
        self._buf: deque[bytes] = deque([initial] if initial else [])
        self._size = len(initial)
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None

    @property
    def transport(self) -> asyncio.Transport:
        transport = self._conn.transport
        assert transport is not None
        return transport

    async def read(self) -> bytes:
        """The next bytes from the upstream; b"" once it has closed."""
        while not self._buf:
            if self._eof:
                return b""
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        chunk = self._buf.popleft()
        self._size -= len(chunk)
        conn = self._conn
        if conn.paused and self._size <= conn.cfg.low_water:
            conn.resume()
        return chunk

    def write(self, data: bytes) -> None:
        if not self._conn.closed and self._conn.transport is not None:
            self._conn.transport.write(data)

    async def drain(self) -> None:
        await self._conn.drain()

    def close(self) -> None:
        self._conn.close()

    def _feed(self, data: bytes) -> None:
        self._buf.append(data)
        self._size += len(data)
        if self._size > self._conn.cfg.high_water:
            self._conn.pause()
        self._wake()

    def _end(self) -> None:
        self._eof = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Connection(asyncio.Protocol):
    """One upstream connection. States: idle in its host's pool, active (one request), or
    upgraded, until ``closed``. A request is written by ``send()``; the response is parsed
    by the httptools callbacks below (``on_*``)."""

    def __init__(self, pool: UpstreamPool, host: _Host) -> None:
        self.pool = pool
        self.cfg = pool.cfg
        self.high_water = pool.cfg.high_water
        self.host = host
        self.transport: asyncio.Transport | None = None
        self.parser = _new_parser(self)
        self.closed = False
        self.active = False
        self.requests = 0
        self.idle_since = 0.0
        # deadlines, read by the sweeper
        self.armed = DISARMED
        self.nreads = 0
        self.seen = -1
        self.since = 0.0
        # flow control
        self.paused = False             # reading paused: the caller's buffer is full
        self.write_paused = False       # writing paused: the transport's buffer is full
        self.drain_waiter: asyncio.Future[None] | None = None
        self.upgraded: Upgraded | None = None
        self.uploader: asyncio.Task[None] | None = None
        self._reset_request()

    def _reset_request(self) -> None:
        self.head_fut: asyncio.Future[Response] | None = None
        self.gate: asyncio.Future[None] | None = None   # Expect: 100-continue
        self.resp: Response | None = None
        self.is_head = False
        self.want_upgrade = False
        self.req_done = False
        self.msg_done = False
        self.got_bytes = False
        self.written = False
        self.poisoned = False
        self.reset_parser = False
        self.keep_alive = False
        self.error: BaseException | None = None
        self._new_head()
        self.informational: list[tuple[int, Headers]] = []

    def _new_head(self) -> None:
        self.in_head = True
        self.head_bytes = 0         # bytes fed while the head is incomplete (memory bound)
        self.head_size = 0          # the head's own size, counted by the callbacks
        self.reason = b""
        self.headers: Headers = []
        self.clen: int | None = None
        self.te: str | None = None
        self.trailer_count = 0

    # ---- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports implement asyncio.Transport without subclassing it)
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=self.cfg.write_high_water)
        self.idle_since = self.pool.clock
        self.pool.conns.add(self)

    def data_received(self, data: bytes) -> None:
        self.nreads += 1
        upgraded = self.upgraded
        if upgraded is not None:
            upgraded._feed(data)
            return
        if not self.active or self.msg_done:
            # bytes nobody asked for (after a complete response, on an idle connection)
            self.poisoned = True
            self.close()
            return
        self.got_bytes = True
        in_head = self.in_head
        if in_head:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade(data[exc.args[0]:])
            return
        except httptools.HttpParserError as exc:
            self._broken(self.error or ProtocolError(
                f"the upstream sent an invalid response ({exc})"))
            return
        if self.in_head and self.head_bytes > self.cfg.max_head_bytes:
            self._broken(ProtocolError(
                f"the upstream's response head is over {self.cfg.max_head_bytes} bytes"))
            return
        self._maybe_release()       # (parsing may have completed the response)

    def eof_received(self) -> bool | None:
        resp = self.resp
        if (resp is not None and self.msg_done is False and not self.in_head
                and self.clen is None and not self._chunked() and self.upgraded is None):
            # a close-delimited body ends here (llhttp has no callback for it)
            self.keep_alive = False
            self.msg_done = True
            resp._finish()
            self._maybe_release()
        return False        # close the transport: never write to a half-closed upstream

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed = self.closed
        self.closed = True
        self.armed = DISARMED
        if exc is None:
            err: BaseException = ConnectionClosed("the upstream closed the connection")
        else:
            err = ConnectionClosed(f"the upstream connection broke ({type(exc).__name__})")
        self._lost(err)
        if not was_closed:
            self.pool._forget(self)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.nreads += 1            # progress, for the write-stall deadline
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ---- httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.resp is not None:       # a second response to one request
            self.error = ProtocolError("the upstream sent more than one response")
            self.poisoned = True
            raise _Abort

    def on_status(self, status: bytes) -> None:
        self.reason += status
        self.head_size += len(status) + 15

    def on_header(self, name: bytes, value: bytes) -> None:
        cfg = self.cfg
        if len(name) + len(value) > cfg.max_field_bytes:
            self.error = ProtocolError(
                f"the upstream sent a header field over {cfg.max_field_bytes} bytes")
            raise _Abort
        if not self.in_head:    # trailers, after the last chunk
            self.trailer_count += 1
            if self.trailer_count > cfg.max_headers:
                self.error = BodyError(f"the upstream sent over {cfg.max_headers} trailers")
                raise _Abort
            assert self.resp is not None
            self.resp.trailers.append((name.decode("latin-1"), value.decode("latin-1")))
            return
        self.head_size += len(name) + len(value) + 4
        if self.head_size > cfg.max_head_bytes:
            self.error = ProtocolError(
                f"the upstream's response head is over {cfg.max_head_bytes} bytes")
            raise _Abort
        headers = self.headers
        if len(headers) >= cfg.max_headers:
            self.error = ProtocolError(f"the upstream sent over {cfg.max_headers} headers")
            raise _Abort
        n = name.decode("latin-1")
        v = value.decode("latin-1")
        headers.append((n, v))
        if len(n) == 14 and n.lower() == "content-length":
            self.clen = int(v)          # llhttp has validated it (digits, one header)
        elif len(n) == 17 and n.lower() == "transfer-encoding":
            self.te = v if self.te is None else f"{self.te}, {v}"

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        if status < 200 and not (status == 101 and self.want_upgrade):
            if status == 101:
                self.error = ProtocolError("the upstream switched protocols unasked (101)")
                raise _Abort
            if len(self.informational) >= self.cfg.max_informational:
                self.error = ProtocolError(
                    f"the upstream sent over {self.cfg.max_informational} 1xx responses")
                raise _Abort
            self.informational.append((status, self.headers))
            if status == 100:
                gate = self.gate
                if gate is not None and not gate.done():
                    gate.set_result(None)
            self._new_head()        # on_message_complete follows; the final head comes next
            return
        self.in_head = False
        self.keep_alive = parser.should_keep_alive()
        chunked = self._chunked()
        resp = self.resp = Response(status, self.reason.decode("latin-1"), self.headers,
                                    parser.get_http_version(), self.clen, chunked,
                                    self.keep_alive, self.informational, self,
                                    self.cfg.low_water)
        if self.is_head or status in (204, 304) or status == 101:
            # no body, whatever the head says; llhttp does not know a HEAD response has none
            self.msg_done = True
            self.reset_parser = self.is_head
            resp._finish()
        fut = self.head_fut
        if fut is not None and not fut.done():
            fut.set_result(resp)
        self._wake_writer()

    def on_body(self, body: bytes) -> None:
        resp = self.resp
        if resp is None or self.msg_done:
            self.error = ProtocolError("the upstream sent a body where none belongs")
            self.poisoned = True
            raise _Abort
        # (Response._feed inlined: this runs once per chunk)
        resp._chunks.append(body)
        size = resp._size = resp._size + len(body)
        waiter = resp._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if size > self.high_water and not self.paused:
            self.pause()

    def on_message_complete(self) -> None:
        resp = self.resp
        if resp is None or self.in_head:    # the end of a 1xx
            return
        if not self.msg_done:
            self.msg_done = True
            resp._finish()

    def _chunked(self) -> bool:
        te = self.te
        return te is not None and te.rsplit(",", 1)[-1].strip().lower() == "chunked"

    # ---- flow control ---------------------------------------------------------------

    def pause(self) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self.seen = -1              # silence while paused was ours, not the upstream's
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark (or the
        response head arrives, or the connection is lost)."""
        if not self.write_paused:
            return
        if self.closed:
            raise self.error or ConnectionClosed("the upstream connection is closed")
        waiter = self.drain_waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self.drain_waiter = None

    def _wake_writer(self) -> None:
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        gate = self.gate
        if gate is not None and not gate.done():
            gate.set_result(None)

    # ---- request ----------------------------------------------------------------------

    async def send(self, head: bytes, body: Any, is_head: bool, expect: bool,
                   chunked: bool, length: int | None, state: SendState | None) -> Response:
        """Write one request and return its response head. Raises ``Stale`` when the
        connection closed before any byte of the response (the pool decides on a retry)."""
        if self.closed or self.transport is None:
            raise Stale(unsent=True)
        loop = self.pool._loop
        assert loop is not None
        self.active = True
        self.requests += 1
        self.is_head = is_head
        fut: asyncio.Future[Response] = loop.create_future()
        self.head_fut = fut
        transport = self.transport
        try:
            if body is None or isinstance(body, bytes):
                if expect and body:
                    transport.write(head)
                    self.written = True
                    if not await self._expect(loop):
                        return await fut
                    transport.write(body)
                elif not body:
                    transport.write(head)
                elif len(body) <= 16384:
                    transport.write(head + body)
                else:
                    transport.writelines((head, body))
                self.written = True
                self.req_done = True
                self.armed, self.seen = READ, -1
                if self.write_paused:
                    await self.drain()
                return await fut
            assert state is not None
            transport.write(head)
            self.written = True
            if expect and not await self._expect(loop):
                return await fut
            # the body is written by its own task, so a response head that arrives while the
            # body is still being produced (an early 413, an upstream that answers as it reads,
            # a consumer whose body stalls) reaches the caller at once; the upload goes on in
            # the background (an upstream that reads no more is cut off when its response
            # ends: the connection is then closed). A failing body fails the request.
            self.uploader = loop.create_task(
                self._upload_rest(body.__aiter__(), chunked, length, state))
            return await fut
        except BaseException:
            # an error, a stale connection, or the caller cancelled (its consumer went away):
            # the exchange is incomplete, the connection is never reused
            self.close()
            raise

    async def _expect(self, loop: asyncio.AbstractEventLoop) -> bool:
        """After a head with ``Expect: 100-continue``: True to send the body (100 arrived, or
        expect_timeout passed), False when a final response came first (body never sent)."""
        gate = self.gate = loop.create_future()
        self.armed, self.seen = EXPECT, -1
        try:
            await gate
        finally:
            self.gate = None
            self.armed = DISARMED
        fut = self.head_fut
        return fut is None or not fut.done()

    async def _stream(self, it: AsyncIterator[bytes], chunked: bool, length: int | None,
                      state: SendState, background: bool = False) -> bool:
        """Write the body from ``it``; True when it is all written, False when the response
        head arrived first (``background``: the rest of an upload after the head arrived,
        written to the end). Raises what ``it`` raises (the caller's body broke)."""
        fut = self.head_fut
        transport = self.transport
        assert fut is not None and transport is not None
        while True:
            if fut.done() and not background:
                return False
            state.touched = True
            try:
                chunk = await it.__anext__()
            except StopAsyncIteration:
                break
            except BaseException as exc:
                self._fail_upload(exc)      # the request is incomplete: never reuse
                raise
            if not chunk:
                continue
            state.sent += len(chunk)
            if length is not None and state.sent > length:
                err = ValueError("the request body is longer than its Content-Length")
                self._fail_upload(err)
                raise err
            if self.closed:
                return True         # the head future holds why
            if chunked:
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                transport.write(chunk)
            if self.write_paused:
                self.armed, self.seen = READ, -1    # the upstream must read our body
                await self.drain()
                self.armed = DISARMED
        if self.closed:
            return True
        if length is not None and state.sent != length:
            err = ValueError("the request body is shorter than its Content-Length")
            self._fail_upload(err)
            raise err
        if chunked and not self.closed:
            transport.write(b"0\r\n\r\n")
        self.req_done = True
        self.armed, self.seen = READ, -1
        return True

    def _fail_upload(self, exc: BaseException) -> None:
        """The request body broke: the caller waiting for the head gets ``exc`` (unless a
        response head already came), and the connection is closed."""
        fut = self.head_fut
        if fut is not None and not fut.done() and not isinstance(exc, asyncio.CancelledError):
            fut.set_exception(exc)
        self.close()

    async def _upload_rest(self, it: AsyncIterator[bytes], chunked: bool, length: int | None,
                           state: SendState) -> None:
        try:
            await self._stream(it, chunked, length, state, background=True)
        except Exception:           # the response is the caller's; the connection is closed
            self.close()
            return
        if self.msg_done:
            self._maybe_release()

    # ---- end of a request ---------------------------------------------------------------

    def _maybe_release(self) -> None:
        """The response is complete: back to the pool, or closed when the request body was
        not all sent (the upstream answered early) or keep-alive is not allowed."""
        if not (self.msg_done and self.active) or self.closed:
            return
        if not self.req_done:
            self.close()
            return
        reusable = self.keep_alive and not self.poisoned \
            and self.requests < self.cfg.max_requests
        resp = self.resp
        if resp is not None:
            resp._conn = None
        self.active = False
        self.armed = DISARMED
        if not reusable:
            self.close()
            return
        if self.reset_parser:
            self.parser = _new_parser(self)
        if self.paused:
            self.resume()
        self._reset_request()
        self.pool._release(self)

    def abandon(self, resp: Response) -> None:
        """The caller released a response before its body ended: close (never reuse)."""
        if self.resp is resp and not self.closed and not (self.msg_done and self.req_done):
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.armed = DISARMED
        transport = self.transport
        if transport is not None:
            transport.close()
        uploader = self.uploader
        if uploader is not None and not uploader.done():
            uploader.cancel()
        self._lost(self.error or ConnectionClosed("the upstream connection was closed"))
        self.pool._forget(self)

    def expire(self, kind: int) -> None:
        """Called by the sweeper when a deadline passed."""
        if kind == EXPECT:
            gate = self.gate
            if gate is not None and not gate.done():
                gate.set_result(None)       # no 100 Continue: send the body anyway
            self.armed = DISARMED
            return
        fut = self.head_fut
        if fut is not None and not fut.done():
            self.error = ResponseTimeout("the upstream did not answer in time")
        else:
            self.error = BodyTimeout("the upstream stopped sending mid-body")
        self.close()

    def _broken(self, err: BaseException) -> None:
        self.error = err
        self.close()

    def _lost(self, err: BaseException) -> None:
        """Fail whatever waits on this connection."""
        if self.error is not None:
            err = self.error
        fut = self.head_fut
        if fut is not None and not fut.done():
            if not self.got_bytes and not isinstance(err, (ResponseTimeout, ProtocolError)):
                fut.set_exception(Stale(unsent=not self.written))
            else:
                fut.set_exception(err if not isinstance(err, BodyError) else
                                  ProtocolError(str(err)))
        gate = self.gate
        if gate is not None and not gate.done():
            gate.set_result(None)
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        resp = self.resp
        if resp is not None and not resp._done:
            if isinstance(err, BodyError):
                resp._fail(err)
            else:
                resp._fail(BodyError(f"the upstream connection broke mid-body: {err}"))
        upgraded = self.upgraded
        if upgraded is not None:
            upgraded._end()

    def _upgrade(self, rest: bytes) -> None:
        resp = self.resp
        if resp is None or resp.status != 101 or not self.want_upgrade:
            self._broken(ProtocolError("the upstream switched protocols unasked"))
            return
        self.armed = DISARMED
        self.active = False
        self.upgraded = resp.upgraded = Upgraded(self, rest)


class SendState:
    """Per request, what the body writer did (for the retry rule)."""

    __slots__ = ("sent", "touched")

    def __init__(self) -> None:
        self.sent = 0
        self.touched = False    # the body iterator was asked for a chunk: it cannot be replayed
