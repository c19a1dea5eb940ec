"""Strict durability, deterministically: the consumer never receives the final bytes of a
metered response before its usage row is committed.

Another connection holds the database's write lock (``BEGIN IMMEDIATE``), so the proxy's
commit cannot happen; the test waits until the upstream has sent its whole answer, reads
what the consumer got for a while, asserts the final bytes are not among them, then
releases the lock and asserts they arrive and the usage is in the ledger. The proxy runs
in its own process so that holding the lock never depends on this test's event loop.

The hold is kept well under the store's lock wait (``fail_mode: closed`` answers 503 /
aborts once it gives up), so the assertions are about bytes only, not about how the store
waits.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import ADMIN_TOKEN, write_config
from tests.proxy_process import ProxyProcess
from tests.servers import serve

HELD_FOR = 0.8          # seconds of reading while the lock is held (the commit cannot happen)
BIG = 200 * 1024        # > 64 KiB: forwarded chunk by chunk with a Content-Length

RULES = """\
version: 1
meters:
  api_calls: {stripe_event_name: api_calls}
  llm_tokens: {stripe_event_name: llm_tokens}
rules:
  - name: health
    match: {path: /healthz}
    auth: none
  - name: sse
    match: {path: /sse}
    usage:
      - {meter: llm_tokens, preset: openai_chat}
  - name: calls
    match: {path: "/**"}
    usage:
      - {meter: api_calls, quantity: 1}
"""


class Upstream:
    """Bodies whose last bytes are recognisable; ``done[path]`` is set once the upstream has
    written and flushed the whole answer (so anything missing is held by the proxy)."""

    def __init__(self) -> None:
        self.done: dict[str, asyncio.Event] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/small", self.small)
        app.router.add_get("/big", self.big)
        app.router.add_get("/chunked", self.chunked)
        app.router.add_get("/sse", self.sse)
        return app

    def event(self, path: str) -> asyncio.Event:
        return self.done.setdefault(path, asyncio.Event())

    async def _send(self, request: web.Request, parts: list[bytes], length: int | None,
                    content_type: str) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": content_type})
        if length is not None:
            resp.content_length = length
        await resp.prepare(request)
        for p in parts:
            await resp.write(p)
        await resp.write_eof()
        self.event(request.path).set()
        return resp

    async def small(self, request: web.Request) -> web.StreamResponse:
        body = b'{"ok": true, "end": "FINAL-SMALL"}'
        return await self._send(request, [body], len(body), "application/json")

    async def big(self, request: web.Request) -> web.StreamResponse:
        head = b"x" * (BIG - 9)
        return await self._send(request, [head[:BIG // 2], head[BIG // 2:], b"FINAL-BIG"], BIG,
                                "application/octet-stream")

    async def chunked(self, request: web.Request) -> web.StreamResponse:
        return await self._send(request, [b"part-1;", b"part-2;", b"FINAL-CHUNKED"], None,
                                "text/plain")

    async def sse(self, request: web.Request) -> web.StreamResponse:
        events = [b'data: {"choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n',
                  b'data: {"choices":[],"usage":{"total_tokens":40}}\n\n',
                  b"data: [DONE]\n\n"]
        return await self._send(request, events, None, "text/event-stream")


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[Upstream, ProxyProcess, str, str]]:
    up = Upstream()
    async with serve(up.app()) as upstream_url:
        cfg = write_config(tmp_path, upstream_url, RULES,
                           storage={"durability": "strict", "fail_mode": "closed"})
        proc = ProxyProcess(cfg, tmp_path / "proxy.log")        # on free ports it binds
        proc.spawn()
        try:
            await proc.wait_ready()
            yield up, proc, proc.url.removeprefix("http://"), proc.admin_url
        finally:
            proc.ensure_dead()


async def new_key(admin: str, cid: str) -> str:
    h = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession(headers=h) as s:
        async with s.post(admin + "/admin/customers", json={"id": cid}) as r:
            assert r.status in (200, 201), await r.text()
        async with s.post(admin + f"/admin/customers/{cid}/keys", json={"name": "t"}) as r:
            assert r.status == 201
            return str((await r.json())["key"])


async def usage(admin: str, cid: str) -> dict[str, str]:
    h = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession(headers=h) as s, \
            s.get(admin + f"/admin/customers/{cid}/usage?from=2020-01-01") as r:
        assert r.status == 200
        return dict((await r.json())["meters"])


async def read_for(reader: asyncio.StreamReader, seconds: float, got: bytearray) -> None:
    """Append whatever arrives within ``seconds`` (the connection may stay open)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            data = await asyncio.wait_for(reader.read(65536), left)
        except TimeoutError:
            return
        if not data:
            return
        got += data


async def read_until(reader: asyncio.StreamReader, end: bytes, got: bytearray,
                     timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not got.endswith(end):
        left = deadline - time.monotonic()
        assert left > 0, f"final bytes {end!r} never arrived; got {bytes(got[-200:])!r}"
        data = await asyncio.wait_for(reader.read(65536), left)
        assert data, f"connection closed before {end!r}; got {bytes(got[-200:])!r}"
        got += data


CASES = [
    # path, final bytes the consumer must not see before the commit, body check, usage
    ("/small", b'"FINAL-SMALL"}', None, {"api_calls": "1"}),
    ("/big", b"FINAL-BIG", BIG, {"api_calls": "1"}),
    ("/chunked", b"FINAL-CHUNKED\r\n0\r\n\r\n", None, {"api_calls": "1"}),
    ("/sse", b"data: [DONE]\n\n\r\n0\r\n\r\n", None, {"llm_tokens": "40"}),
]


@pytest.mark.parametrize(("path", "final", "length", "billed"), CASES,
                         ids=[c[0].strip("/") for c in CASES])
async def test_final_bytes_wait_for_the_commit(setup: tuple[Upstream, ProxyProcess, str, str],
                                               tmp_path: Path, path: str, final: bytes,
                                               length: int | None,
                                               billed: dict[str, str]) -> None:
    up, proc, public, admin = setup
    cid = "c" + path.strip("/")
    key = await new_key(admin, cid)
    host, port = public.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    lock = sqlite3.connect(tmp_path / "meter.db", isolation_level=None, timeout=10)
    try:
        lock.execute("BEGIN IMMEDIATE")              # the proxy cannot commit from now on
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {public}\r\nAuthorization: Bearer {key}\r\n"
                     "Connection: close\r\n\r\n".encode())
        await writer.drain()
        await asyncio.wait_for(up.event(path).wait(), 20)   # the upstream sent everything
        got = bytearray()
        await read_for(reader, HELD_FOR, got)
        assert final not in got, f"{path}: final bytes sent before the commit"
        if length is not None:
            head, _, body = bytes(got).partition(b"\r\n\r\n")
            assert f"content-length: {length}".encode() in head.lower()
            assert len(body) < length
        assert proc.proc is not None and proc.proc.poll() is None
        lock.execute("COMMIT")                       # release: the commit can happen now
        await read_until(reader, final, got)
    finally:
        if lock.in_transaction:
            lock.execute("ROLLBACK")
        lock.close()
        writer.close()
    head, _, body = bytes(got).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    if length is not None:
        assert len(body) == length and body.endswith(b"FINAL-BIG")
    assert await usage(admin, cid) == billed
