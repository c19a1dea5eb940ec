"""Test kit for proxy.upstream: small raw asyncio upstream servers on 127.0.0.1 that behave
(or misbehave) exactly as a test scripts them, and a request reader for them."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from proxy.upstream import PoolConfig, UpstreamPool

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Server"], Awaitable[None]]

FAST = {"sweep_interval": 0.05}


class Server:
    """``script(reader, writer, server)`` runs for every accepted connection; ``conns``
    counts connections, ``heads``/``bodies`` collect what ``read_request`` read."""

    def __init__(self, script: Script, rcvbuf: int | None = None) -> None:
        self.script = script
        self.rcvbuf = rcvbuf
        self.conns = 0
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.closed_by_peer = 0
        self.events: list[str] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._srv: asyncio.Server | None = None
        self.port = 0
        self.ssl: ssl.SSLContext | None = None     # set before entering: a TLS upstream

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Server:
        sock = socket.socket()
        if self.rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.bind(("127.0.0.1", 0))
        self._srv = await asyncio.start_server(self._conn, sock=sock, ssl=self.ssl)
        self.port = sock.getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._srv is not None
        self._srv.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._srv.wait_closed()

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.conns += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)   # type: ignore[arg-type]
        try:
            await self.script(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass        # (a cancelled handler returns: asyncio's stream callback logs otherwise)
        finally:
            self._tasks.discard(task)   # type: ignore[arg-type]
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def read_request(self, reader: asyncio.StreamReader, body: bool = True) -> bytes:
        """Read one request head (and its body, Content-Length or chunked, decoded);
        return the head. Raises IncompleteReadError at EOF."""
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        if not body:
            return head
        low = head.lower()
        data = b""
        if b"\r\ntransfer-encoding: chunked\r\n" in low:
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                data += await reader.readexactly(size)
                await reader.readexactly(2)
        elif b"\r\ncontent-length:" in low:
            n = int(low.split(b"\r\ncontent-length:")[1].split(b"\r\n")[0])
            if b"\r\nexpect: 100-continue\r\n" not in low:
                data = await reader.readexactly(n)
        self.bodies.append(data)
        return head


def answer(*parts: bytes, delay: float = 0.0, close: bool = False) -> Script:
    """Answer every request with ``parts`` (written in order, ``delay`` apart)."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     srv: Server) -> None:
        while True:
            head = await srv.read_request(reader)
            method = head.split(b" ", 1)[0]
            for part in parts:
                if method == b"HEAD" and not part.startswith(b"HTTP/"):
                    continue
                writer.write(part)
                await writer.drain()
                if delay:
                    await asyncio.sleep(delay)
            if close:
                return
    return script


def ok(body: bytes = b"hello", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\n" + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body


@contextlib.asynccontextmanager
async def pool_for(srv: Server | str, **cfg: Any) -> AsyncIterator[UpstreamPool]:
    pool = UpstreamPool(srv if isinstance(srv, str) else srv.url, PoolConfig(**{**FAST, **cfg}))
    try:
        yield pool
    finally:
        await pool.close()


async def chunks(*parts: bytes, pause: float = 0.0) -> AsyncIterator[bytes]:
    for part in parts:
        if pause:
            await asyncio.sleep(pause)
        yield part


async def settle(get: Callable[[], int], window: float = 0.2, timeout: float = 10.0) -> int:
    """Wait until ``get()`` stops changing for ``window`` seconds; return that value."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    value = get()
    while True:
        await asyncio.sleep(window)
        now = get()
        if now == value:
            return value
        assert loop.time() < end, "never settled"
        value = now


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.01)
