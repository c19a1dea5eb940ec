"""Connection bounds of the public port: what one consumer connection may hold, and for how
long (docs/resources.md).

aiohttp bounds the request line, each header line and the number of headers itself
(``max_line_size``, ``max_field_size``, ``max_headers``) and closes connections idle
between requests (``keepalive_timeout``). What it lacks is added here, in a subclass of its
per-connection protocol (``RequestHandler``):

- ``max_connections``: one more connection is accepted, answered 503
  ``too_many_connections`` and closed at once (its file descriptor is freed immediately);
- ``max_header_bytes``: the bytes of one request head, in total (431, then closed);
- ``header_timeout``: from the first byte of a request head to its end;
- ``body_timeout``: the longest pause between two reads of a request body still being sent;
- ``write_timeout``: the longest the connection may stay full (its transport over the
  high-water mark) with the consumer reading nothing of what the proxy sends (a sweep that
  finds the write buffer smaller than at the last look restarts the clock). Without it a consumer
  that stops reading held the upstream connection serving it for as long as it liked (the
  stream loop waits in its drain; the pool's read_timeout skips a connection whose reading
  is paused by our back-pressure), and a few of them could take the whole pool.

The three timeouts are enforced by one sweep per second over the open connections (no timer
per request); ``data_received`` only records a timestamp, and ``pause_writing`` (called by
the transport only when it fills, never per write) when the connection filled. A connection
past ``write_timeout`` is aborted (a close would wait for the flush that never comes): its
``connection_lost`` cancels the handler (handler_cancellation), so the request ends as any
consumer disconnect does (``proxy.request.stream``: billed for what was delivered, flagged
``abandoned``; the unfinished upstream response's connection closed, never reused).

Head bytes are counted by ``_Framing``, a wrapper of the connection's request parser that
follows each body's framing, so every head is measured wherever it starts in a read.

This leans on aiohttp internals: ``RequestHandler._messages``, ``._upgraded``,
``._payload_parser``, ``._parser`` (replaced by the wrapper: its ``feed_data`` returns the
messages parsed, the upgrade flag and the upgraded tail; a paused parser is re-fed with
``b""``; a declined upgrade's tail is fed again), ``web_protocol._ErrInfo`` and
BaseProtocol's ``_reading_paused``, ``_paused`` and ``pause_writing``;
tests/test_resources.py and tests/test_limits.py fail if an aiohttp upgrade changes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import re
import resource
import struct
from typing import Any

import orjson
from aiohttp import web
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from proxy import metrics
from proxy.config import LimitsConfig

# the kernel's send queue of a socket (Linux: SIOCOUTQ); None where termios lacks it
_TIOCOUTQ: int | None = getattr(__import__("termios"), "TIOCOUTQ", None)

log = logging.getLogger("meterproxy.limits")

# the end of a request head or trailer section: its empty line. llhttp's request parser
# wants CRLF line endings (a bare LF in a head is a 400), so in the bytes it accepted the
# first CRLF CRLF is the end; in bytes it has not parsed yet (its queue is full) a head with
# bare LFs is only counted longer than it is, and refused by the parser when it gets there.
_HEAD_END = b"\r\n\r\n"
# the empty lines llhttp skips before a request line
_LEADING = re.compile(rb"[\r\n]*")
# the hex digits that start a chunk-size line (its extensions follow)
_HEX = re.compile(rb"[0-9A-Fa-f]*")

# _Framing states: in a head (or a chunked body's trailer section), in a body (or one chunk's
# data and its CRLF), in a chunk-size line, or at a measured head whose message the parser
# has not emitted yet (it paused: its queue is full)
_HEAD, _BODY, _CHUNK_LINE, _WAIT = range(4)

# the file descriptors kept free for everything else (database, WAL, logs, admin port)
FD_RESERVE = 64


def _canned(status: str, type_: str, message: str) -> bytes:
    body = orjson.dumps({"error": {"type": type_, "message": message}})
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def effective_max_connections(configured: int, pool_size: int) -> int:
    """``configured``, once the open-file limit fits it: every consumer connection, every
    upstream connection and the reserve each take one descriptor. The soft limit is raised
    towards the hard one when needed; what still does not fit lowers the bound (a refusal
    with 503 beats running out of descriptors, where every accept and the database fail)."""
    need = configured + pool_size + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    if soft < need and (hard == resource.RLIM_INFINITY or hard > soft):
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    fits = max(int(soft) - pool_size - FD_RESERVE, 16)
    if fits < configured:
        log.warning("limits.max_connections %d lowered to %d to fit the open-file limit %d "
                    "(raise it with ulimit -n)", configured, fits, soft)
        return fits
    return configured


def _queued(transport: asyncio.BaseTransport | None) -> int:
    """Bytes queued for the consumer and not yet read by it: the transport's write buffer
    plus, on Linux, the kernel's send queue (``TIOCOUTQ``: unsent and unacknowledged). The
    kernel's queue is what a slow reader drains first: the transport's buffer moves only
    when the socket is writable again, which TCP signals once a third or more of the send
    buffer is free (a megabyte or more on a loopback), so a consumer reading steadily can
    leave the transport's buffer unchanged for many seconds. Once a second per full
    connection (``ConnectionGuard.sweep``) and at each ``pause_writing``: never per write."""
    if not isinstance(transport, asyncio.WriteTransport):
        return 0
    size = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if _TIOCOUTQ is not None and sock is not None:
        with contextlib.suppress(OSError, ValueError):
            size += struct.unpack("i", fcntl.ioctl(sock.fileno(), _TIOCOUTQ, b"\0\0\0\0"))[0]
    return size


class ConnectionGuard:
    """The connection bounds, shared by every connection of one listener."""

    def __init__(self, cfg: LimitsConfig, max_connections: int) -> None:
        self.max_connections = max_connections
        self.max_header_bytes = cfg.max_header_bytes
        self.max_field = cfg.max_header_field
        self.max_line = cfg.max_request_line
        self.header_timeout = cfg.header_timeout
        self.body_timeout = cfg.body_timeout
        self.write_timeout = cfg.write_timeout
        self.handler_args: dict[str, Any] = {
            "max_line_size": cfg.max_request_line, "max_field_size": cfg.max_header_field,
            "max_headers": cfg.max_headers, "keepalive_timeout": cfg.idle_timeout}
        self.conns: set[GuardedHandler] = set()
        self.refusal = _canned(
            "503 Service Unavailable", "too_many_connections",
            f"The proxy has {max_connections} open connections, its limit. Retry shortly.")
        self.too_large = _canned(
            "431 Request Header Fields Too Large", "header_too_large",
            f"The request head is over {cfg.max_header_bytes} bytes.")

    def sweep(self, now: float) -> None:
        """Close every connection past its header, body or write deadline."""
        header_to, body_to, write_to = self.header_timeout, self.body_timeout, \
            self.write_timeout
        for c in list(self.conns):
            if c._paused:
                # full: stalled only while the consumer reads nothing (its buffer never got
                # smaller since the last look); one that reads slowly but steadily restarts
                # the clock at every sweep that sees progress
                size = _queued(c.transport)
                if size < c.full_size:
                    c.full_at = now
                c.full_size = size
                if now - c.full_at > write_to:
                    c.abort("write_timeout")    # a WebSocket too: its frames back up the same way
                    continue
            if c._upgraded or c._payload_parser is not None:
                continue            # a websocket: frames, not HTTP
            head_at = c.head_at
            if head_at is not None and now - head_at > header_to:
                c.kill("header_timeout")
                continue
            body = c.last_payload
            if body is not None and not body.is_eof() and now - c.rx_at > body_to \
                    and not c._reading_paused:
                c.kill("body_timeout")

    async def sweep_forever(self, interval: float = 1.0) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            self.sweep(loop.time())


class GuardedHandler(RequestHandler):
    __slots__ = ("full_at", "full_size", "guard", "head_at", "last_payload", "refused", "rx_at")

    def __init__(self, guard: ConnectionGuard, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.guard = guard
        self.refused = False
        self.rx_at = 0.0
        self.head_at: float | None = None     # first byte of a request head not yet complete
        self.last_payload: Any = None           # body of the last request parsed
        self.full_at = 0.0      # when writing paused (the transport filled), or last progressed
        self.full_size = 0      # its write buffer's size at that time or the last sweep
        # every byte the request parser is fed passes _Framing first (data_received, the
        # re-feed of a paused parser, the tail of a declined upgrade)
        self._parser = _Framing(self._parser, self)  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self.guard
        if len(guard.conns) >= guard.max_connections:
            self.refused = True
            metrics.connections_refused_total.inc()
            assert isinstance(transport, asyncio.Transport)
            transport.write(guard.refusal)
            transport.close()
            return
        guard.conns.add(self)
        metrics.open_connections.set(len(guard.conns))
        self.rx_at = self._loop.time()
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.refused:
            return
        guard = self.guard
        guard.conns.discard(self)
        metrics.open_connections.set(len(guard.conns))
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # head bytes are counted by the parser wrapper (_Framing), which sees every byte the
        # parser does; here only the header timeout's start and the last body are kept
        now = self.rx_at = self._loop.time()
        # (b"" is aiohttp re-feeding its parser, on every read of a body and as its queue
        # drains: no byte of a head arrived, so it starts no header clock)
        started = False
        if self.head_at is None and data:
            last = self.last_payload
            if (last is None or last.is_eof()) and not self._upgraded \
                    and self._payload_parser is None:
                self.head_at = now
                started = True
        messages = self._messages
        queued = len(messages)
        RequestHandler.data_received(self, data)     # (no super object per read)
        if started and len(messages) == queued:
            framing: Any = self._parser      # (a _Framing; None once the connection is lost)
            if framing is not None and framing.between_heads():
                # only empty lines came (the parser skips them before a request line)
                self.head_at = None
        if len(messages) > queued:
            msg, self.last_payload = messages[-1]   # a head was completed (or refused)
            self.head_at = None
            if isinstance(msg, _ErrInfo):
                # a malformed or oversized head: aiohttp answers 400/431 and closes; read
                # nothing more meanwhile (each further chunk would be parsed into another
                # error holding the chunk: 100 flooding connections reached 1 GB that way)
                transport = self.transport
                if transport is not None:
                    transport.pause_reading()

    def pause_writing(self) -> None:
        # (the transport went over its high-water mark: called then only, not per write)
        self.full_at = self._loop.time()
        self.full_size = _queued(self.transport)
        super().pause_writing()

    def _too_large(self) -> None:
        transport = self.transport
        if transport is not None:
            transport.write(self.guard.too_large)
        self.kill("header_too_large")

    def kill(self, reason: str) -> None:
        metrics.connections_closed_total.labels(reason).inc()
        self.head_at = None
        self.force_close()
        transport = self.transport
        if transport is not None:
            transport.close()

    def abort(self, reason: str) -> None:
        """Drop the connection at once, unflushed: a close would wait for a consumer that
        does not read. ``connection_lost`` follows and cancels the handler."""
        metrics.connections_closed_total.labels(reason).inc()
        self.head_at = None
        transport = self.transport
        if transport is not None:
            transport.abort()


class _Framing:
    """The request parser of one connection, wrapped: after each ``feed_data`` the same
    bytes are walked with the framing of the messages the parser returned, so the start and
    end of every head is known exactly wherever it falls in a read (after a body, split
    across reads, pipelined), and every head over ``max_header_bytes`` is refused (431)
    before its message is queued (docs/resources.md, "Consumer connections").

    Bodies are skipped by count: a Content-Length body in O(1), a chunked one by its
    chunk-size lines (one search for the line's end each); a byte search runs only where a
    head (or a trailer section) can be. The parser is authoritative: a read it refuses
    raises before the walk (aiohttp answers 400), so the walk only follows framing the
    parser accepted. After an upgrade the rest of the read is not HTTP: the walk stops
    there and starts again at a head if aiohttp re-feeds that tail (a declined upgrade);
    a CONNECT has no body (llhttp switches right after its head). A head measured before
    its message is out (the parser paused) is matched to the next message returned, also
    by a re-feed of b""."""

    __slots__ = ("bound", "chunked", "ext", "h", "left", "n", "p", "size", "stash", "state",
                 "tail", "trailers", "upgrade")

    def __init__(self, parser: Any, handler: GuardedHandler) -> None:
        self.p = parser
        self.h = handler
        self.bound = handler.guard.max_header_bytes
        self.state = _HEAD
        self.n = 0              # bytes of the head (or chunk-size line) so far
        self.tail = b""         # its last bytes (<= 3): a blank line split across reads
        self.left = 0           # bytes left of the body or chunk (+ its CRLF)
        self.size = 0           # the chunk size read so far
        self.ext = False        # past the chunk size's digits (in its extensions)
        self.chunked = False    # the current message's body is chunked
        self.upgrade = False    # the current message asks for an upgrade
        self.trailers = False   # the head being read is a trailer section
        self.stash = b""        # bytes after a measured head whose message is still unparsed

    # the parser's other methods, used by RequestHandler and BaseProtocol
    def feed_eof(self) -> Any:
        return self.p.feed_eof()

    def message_consumed(self) -> None:
        self.p.message_consumed()

    def set_upgraded(self, val: bool) -> None:
        self.p.set_upgraded(val)

    def pause_reading(self) -> None:
        self.p.pause_reading()

    def between_heads(self) -> bool:
        """No byte of a head (or of a body) is pending: the next byte starts a head."""
        return self.state == _HEAD and not (self.n or self.tail or self.stash or self.trailers)

    def feed_data(self, data: bytes) -> Any:
        res = self.p.feed_data(data)
        msgs, upgraded, tail = res
        if len(msgs) == 1 and self.state == _HEAD and not (self.n or self.tail or self.stash) \
                and not upgraded:
            # the common read: one whole request, its body (if any) ending the read
            msg, payload = msgs[0]
            e = data.find(_HEAD_END) + 4
            if 4 <= e <= self.bound and not msg.chunked and (
                    e == len(data) if payload is EMPTY_PAYLOAD
                    else e + int(msg.headers.get("Content-Length") or 0) == len(data)):
                return res
        if self.stash:
            data, self.stash = self.stash + data, b""
        end = len(data) - len(tail) if upgraded else len(data)
        k = self._walk(data, end, msgs)
        if k < 0:
            return res
        self.h._too_large()
        return list(msgs[:k]), False, b""

    def _walk(self, data: bytes, end: int, msgs: Any) -> int:
        """Follow ``data[:end]``; the index in ``msgs`` of a head over the bound, else -1."""
        pos = 0
        mi = 0
        bound = self.bound
        # (a head measured in an earlier read whose message comes now, on a re-feed of b""
        # or with the read ending at that head, is matched even though no byte is left)
        while pos < end or (self.state == _WAIT and mi < len(msgs)):
            state = self.state
            if state == _BODY:
                left = self.left
                if end - pos < left:
                    self.left = left - (end - pos)
                    return -1
                pos += left
                self.left = 0
                if self.chunked:
                    self.state, self.size, self.ext, self.n = _CHUNK_LINE, 0, False, 0
                elif self._message_end():
                    return -1
            elif state == _HEAD:
                if self.n == 0 and not self.tail and data[pos] in b"\r\n" \
                        and not self.trailers:
                    pos = _LEADING.match(data, pos, end).end()    # type: ignore[union-attr]
                    if pos == end:
                        return -1
                e = -1
                tail = self.tail
                if tail:
                    e = (tail + data[pos:pos + 3]).find(_HEAD_END)
                    if e >= 0:
                        e = pos + e + 4 - len(tail)
                if e < 0:
                    e = data.find(_HEAD_END, pos, end)
                    if e < 0:
                        self.n += end - pos
                        if self.n > bound:
                            return mi
                        self.tail = (tail + data[max(pos, end - 3):end])[-3:]
                        return -1
                    e += 4
                if self.n + e - pos > bound:
                    return mi
                pos = e
                self.n = 0
                self.tail = b""
                if self.trailers:
                    self.trailers = False
                    if self._message_end():
                        return -1
                elif mi < len(msgs):
                    msg, payload = msgs[mi]
                    mi += 1
                    if self._message(msg, payload):
                        return -1
                else:
                    self.state = _WAIT
                    self.stash = data[pos:end]
                    return -1
            elif state == _CHUNK_LINE:
                nl = data.find(b"\n", pos, end)
                stop = end if nl < 0 else nl
                if not self.ext:
                    digits = _HEX.match(data, pos, stop).end()     # type: ignore[union-attr]
                    if digits > pos:
                        self.size = (self.size << 4 * (digits - pos)) \
                            | int(data[pos:digits], 16)
                    self.ext = digits < stop
                self.n += stop - pos
                if self.n > bound:
                    return mi
                if nl < 0:
                    return -1
                pos = nl + 1
                self.n = 0
                if self.size:
                    self.state, self.left = _BODY, self.size + 2
                else:   # the last chunk: its trailer section (the size line's CRLF counts)
                    self.state, self.trailers, self.tail = _HEAD, True, b"\r\n"
            else:   # _WAIT: the head before data[pos] is measured; its message is due
                if mi >= len(msgs):
                    self.stash = data[pos:end]
                    return -1
                msg, payload = msgs[mi]
                mi += 1
                self.state = _HEAD
                if self._message(msg, payload):
                    return -1
        return -1

    def _message(self, msg: Any, payload: Any) -> bool:
        """Start the body of ``msg``, just parsed; True when the rest of the read is not
        HTTP (an upgrade)."""
        self.upgrade = msg.upgrade
        if msg.method == "CONNECT":
            # llhttp switches protocols right after a CONNECT head and reads no body for it,
            # whatever its Content-Length or Transfer-Encoding says
            self.upgrade = True
            return self._message_end()
        if msg.chunked:
            self.chunked = True
            self.state, self.size, self.ext, self.n = _CHUNK_LINE, 0, False, 0
            return False
        self.chunked = False
        if payload is not EMPTY_PAYLOAD:
            length = msg.headers.get("Content-Length")
            if length:
                self.state, self.left = _BODY, int(length)
                return False
        return self._message_end()

    def _message_end(self) -> bool:
        """The current message is complete: the next byte starts a head, unless it asked for
        an upgrade: llhttp stops there (aiohttp keeps the rest as the upgraded tail, or drops
        it when the upgrade is not one it supports)."""
        self.state = _HEAD
        self.trailers = False
        self.n = 0
        self.tail = b""
        return self.upgrade


def guarded_runner(handler: Any, guard: ConnectionGuard, *, shutdown_timeout: float,
                   **kwargs: Any) -> web.ServerRunner:
    """A runner of aiohttp's low-level ``web.Server`` (no Application, no router: the
    pipeline routes on the canonical path itself) whose connections are ``GuardedHandler``s
    under ``guard``. ``kwargs`` go to the server and each connection's ``RequestHandler``."""
    server = GuardedServer(handler, guard, **kwargs, **guard.handler_args)
    return web.ServerRunner(server, handle_signals=False, shutdown_timeout=shutdown_timeout)


class GuardedServer(web.Server):
    """``web.Server`` whose protocol factory makes ``GuardedHandler``s. Its requests are
    ``BaseRequest``s without a body size limit (``client_max_size=0``, what the public
    Application had: bodies are streamed, and each route that reads one bounds it itself)."""

    def __init__(self, handler: Any, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(handler, request_factory=self._unbounded_request, **kwargs)
        self._guard = guard

    def _unbounded_request(self, message: Any, payload: Any, protocol: RequestHandler,
                           writer: Any, task: asyncio.Task[None]) -> web.BaseRequest:
        return web.BaseRequest(message, payload, protocol, writer, task, self._loop,
                               client_max_size=0)

    def __call__(self) -> RequestHandler:
        return GuardedHandler(self._guard, self, loop=self._loop, **self._kwargs)
