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
- ``body_timeout``: the longest pause between two reads of a request body still being sent.

The two timeouts are enforced by one sweep per second over the open connections (no timer
per request); ``data_received`` only records a timestamp and counts head bytes.

This leans on aiohttp internals: ``RequestHandler._messages``, ``._upgraded``,
``._payload_parser``, ``web_protocol._ErrInfo`` and BaseProtocol's ``_reading_paused``;
tests/test_resources.py fails if an aiohttp upgrade changes them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import resource
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from proxy import metrics
from proxy.config import LimitsConfig

log = logging.getLogger("meterproxy.limits")

# the end of a request head: its blank line (CRLF or bare LF line endings)
_HEAD_END = re.compile(rb"\n\r?\n")

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


class ConnectionGuard:
    """The connection bounds, shared by every connection of one listener."""

    def __init__(self, cfg: LimitsConfig, max_connections: int) -> None:
        self.max_connections = max_connections
        self.max_header_bytes = cfg.max_header_bytes
        self.max_field = cfg.max_header_field
        self.max_line = cfg.max_request_line
        self.header_timeout = cfg.header_timeout
        self.body_timeout = cfg.body_timeout
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
        """Close every connection past its header or body deadline."""
        header_to, body_to = self.header_timeout, self.body_timeout
        for c in list(self.conns):
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
    __slots__ = ("guard", "head_at", "head_bytes", "head_tail", "last_payload", "refused",
                 "rx_at")

    def __init__(self, guard: ConnectionGuard, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.guard = guard
        self.refused = False
        self.rx_at = 0.0
        self.head_at: float | None = None     # first byte of a request head not yet complete
        self.head_bytes = 0
        self.head_tail = b""                    # the last bytes of the head read so far
        self.last_payload: Any = None           # body of the last request parsed

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
        now = self.rx_at = self._loop.time()
        last = self.last_payload
        in_head = (last is None or last.is_eof()) and not self._upgraded \
            and self._payload_parser is None
        if in_head:
            if self.head_at is None:
                self.head_at = now
            self.head_bytes += len(data)
            if self.head_bytes > self.guard.max_header_bytes \
                    and (end := self._head_end(data)) is not None:
                if end > self.guard.max_header_bytes:
                    # a head over the bound that ends in this read would be parsed and
                    # served: refused before it is parsed (one still arriving is refused
                    # below)
                    self._too_large()
                    return
                cut = end - (self.head_bytes - len(data))
                if len(data) - cut > self.guard.max_header_bytes \
                        and (split := self._long_gap(data, cut)) is not None:
                    # a pipelined head over the bound may be whole in the rest of this read
                    # (no head is longer than the gap between two blank lines): the rest
                    # from there is read as a read of its own, so the check above applies
                    self.head_bytes -= len(data)     # (each part counts itself)
                    self.data_received(data[:split])
                    self.data_received(data[split:])
                    return
        messages = self._messages
        queued = len(messages)
        RequestHandler.data_received(self, data)     # (no super object per read)
        if len(messages) > queued:
            msg, self.last_payload = messages[-1]   # a head was completed (or refused)
            self.head_at = None
            self.head_bytes = 0
            self.head_tail = b""
            if isinstance(msg, _ErrInfo):
                # a malformed or oversized head: aiohttp answers 400/431 and closes; read
                # nothing more meanwhile (each further chunk would be parsed into another
                # error holding the chunk: 100 flooding connections reached 1 GB that way)
                transport = self.transport
                if transport is not None:
                    transport.pause_reading()
        elif in_head:
            self.head_tail = data[-3:]
            if self.head_bytes > self.guard.max_header_bytes:
                self._too_large()

    def _long_gap(self, data: bytes, cut: int) -> int | None:
        """Where, after the head that ends at ``cut``, a stretch of ``data`` longer than
        ``max_header_bytes`` without a blank line starts (a head over the bound could be
        it); None when there is none. Scanned only for a read holding more than the bound
        after a head."""
        bound = self.guard.max_header_bytes
        at = cut
        for m in _HEAD_END.finditer(data, cut):
            if m.end() - at > bound:
                return at
            at = m.end()
        return at if len(data) - at > bound else None

    def _too_large(self) -> None:
        transport = self.transport
        if transport is not None:
            transport.write(self.guard.too_large)
        self.kill("header_too_large")

    def _head_end(self, data: bytes) -> int | None:
        """When ``data`` (counted in ``head_bytes``) ends the head being read: the head's
        size, through its blank line (the bytes after it are the body or the next request);
        else None. Also None when a line of it is over ``max_header_field``: aiohttp's
        parser refuses that head itself (400), as it always has."""
        seen = self.head_tail + data
        m = _HEAD_END.search(seen)
        if m is None:
            return None
        if self._refused_by_parser(seen[:m.end()], self.head_bytes == len(data)):
            return None
        return self.head_bytes - len(data) + m.end() - len(self.head_tail)

    def _refused_by_parser(self, head: bytes, whole: bool) -> bool:
        """aiohttp's parser certainly refuses this head (400) for one of its own bounds: a
        header name or value over ``max_header_field`` (aiohttp measures each, not the line:
        ``X-A: <max_header_field bytes>`` is accepted), or, when ``head`` starts with the
        request line (``whole``), a target over ``max_request_line``. Only a certain refusal
        counts: any doubt leaves the head to the 431."""
        lines = head.split(b"\n")
        if whole:
            parts = lines[0].split(b" ")
            if len(parts) > 1 and len(parts[1]) > self.guard.max_line:
                return True
            lines = lines[1:]
        field = self.guard.max_field
        for line in lines:
            if len(line) <= field:
                continue
            name, colon, value = line.partition(b":")
            if colon and (len(name) > field or len(value.strip(b" \t\r")) > field):
                return True
        return False

    def kill(self, reason: str) -> None:
        metrics.connections_closed_total.labels(reason).inc()
        self.head_at = None
        self.force_close()
        transport = self.transport
        if transport is not None:
            transport.close()


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
