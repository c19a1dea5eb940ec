"""A TCP relay to PostgreSQL that a test can cut and restore: the outage drill.

``cut()`` aborts every relayed connection and makes new ones close at once (connection
refused, as far as the driver can tell); ``restore()`` relays again. Both ends of every pair
are closed on ``stop()``. ``lose_commit_replies(n)``: the next ``n`` COMMITs of
transactions that sent an INSERT reach the server, their answers never reach the client,
and their connections are cut a moment later (a write that committed while the client sees
the connection lost: outcome unknown). It reads the SQL text, so the client must not use
named prepared statements (``statement_cache_size=0``).
"""

from __future__ import annotations

import asyncio
import contextlib

from proxy import tasks


class CuttableRelay:
    def __init__(self, target_host: str = "127.0.0.1", target_port: int = 5432) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.cut_now = False
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._pumps: set[asyncio.Task[None]] = set()
        self._lose_commits = 0
        self._writes: tuple[bytes, ...] = (b"INSERT",)
        self.commits_lost = 0

    def lose_commit_replies(self, n: int, writes: tuple[bytes, ...] = (b"INSERT",)) -> None:
        """The next ``n`` COMMITs of transactions that sent one of ``writes`` commit, and
        their replies never arrive (the connection is cut)."""
        self._lose_commits = n
        self._writes = writes

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def cut(self) -> None:
        self.cut_now = True
        for w in list(self._writers):
            w.transport.abort()

    def restore(self) -> None:
        self.cut_now = False

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for t in list(self._pumps):
            await tasks.cancel_and_wait(t)
        for w in list(self._writers):
            with contextlib.suppress(OSError):
                await w.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.cut_now:
            writer.transport.abort()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_w))
        muted = [False, False]  # [a COMMIT went up: nothing more comes down, an INSERT went up]
        a = tasks.spawn("relay-up", self._pump(reader, up_w, watch=muted))
        b = tasks.spawn("relay-down", self._pump(up_r, writer, muted=muted))
        self._pumps.update((a, b))
        await asyncio.wait({a, b}, return_when=asyncio.FIRST_COMPLETED)
        for w in (writer, up_w):
            w.transport.abort()
            self._writers.discard(w)
        for t in (a, b):
            await tasks.cancel_and_wait(t)
            self._pumps.discard(t)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    watch: list[bool] | None = None, muted: list[bool] | None = None) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await src.read(65536):
                if muted is not None and muted[0]:
                    continue
                dst.write(data)
                await dst.drain()
                if watch is None or self._lose_commits <= 0:
                    continue
                up = data.upper()
                watch[1] = watch[1] or any(w in up for w in self._writes)
                if b"COMMIT" in up and not watch[1]:
                    continue                        # a read-only transaction's
                if b"COMMIT" in up:
                    self._lose_commits -= 1
                    self.commits_lost += 1
                    watch[0] = True
                    await asyncio.sleep(0.2)      # the server has it (it commits), then the cut
                    return
