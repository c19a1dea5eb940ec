"""Resource bounds of the public port (docs/resources.md): header size, header / body /
idle timeouts, maximum connections, per-customer concurrency, the bounded wait for an
upstream connection, and flat memory under a header flood (a proxy in a subprocess)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from proxy import metrics
from tests.conftest import ADMIN_TOKEN, Proxy, ProxyFactory, write_config
from tests.helpers import wait_until
from tests.proxy_process import ProxyProcess
from tests.servers import serve
from tests.upstream_kit import settle


async def _raw(p: Proxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", p.server.public_port)


async def _closed_within(reader: asyncio.StreamReader, timeout: float) -> tuple[float, bytes]:
    """Read until the peer closes; returns (seconds it took, everything read)."""
    t0 = time.monotonic()
    data = b""
    async with asyncio.timeout(timeout):
        while chunk := await reader.read(65536):
            data += chunk
    return time.monotonic() - t0, data


async def _audited(p: Proxy, customer: str | None = None) -> None:
    """Wait until the audit holds a row (of ``customer``, when named)."""
    def any_row() -> bool:
        with p.db() as c:
            if customer is None:
                return bool(c.execute("SELECT COUNT(*) FROM audit").fetchone()[0])
            return bool(c.execute("SELECT COUNT(*) FROM audit WHERE customer_id = ?",
                                  (customer,)).fetchone()[0])
    await wait_until(any_row, what="an audit row")


def _closed(reason: str) -> float:
    return float(metrics.connections_closed_total.labels(reason)._value.get())


async def test_idle_connection_is_closed(make_proxy: ProxyFactory) -> None:
    p = await make_proxy(limits={"idle_timeout": "500ms", "header_timeout": "10s"})
    reader, writer = await _raw(p)
    took, data = await _closed_within(reader, 5.0)
    writer.close()
    assert data == b"" and 0.4 <= took < 3.0
    # and between keep-alive requests
    reader, writer = await _raw(p)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    took, data = await _closed_within(reader, 5.0)
    assert data.startswith(b"HTTP/1.1 200 ") and 0.4 <= took < 3.0
    writer.close()


async def test_slow_header_is_cut_off(make_proxy: ProxyFactory) -> None:
    """Slowloris: a head trickled a byte at a time never completes; header_timeout closes
    it long before idle_timeout."""
    p = await make_proxy(limits={"idle_timeout": "30s", "header_timeout": "500ms"})
    before = _closed("header_timeout")
    reader, writer = await _raw(p)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")

    async def trickle() -> None:
        for _ in range(100):
            await asyncio.sleep(0.1)
            writer.write(b"X")
            await writer.drain()

    task = asyncio.ensure_future(trickle())
    took, data = await _closed_within(reader, 5.0)
    task.cancel()
    assert data == b"" and took < 3.0
    assert _closed("header_timeout") == before + 1
    writer.close()


async def test_stalled_body_is_cut_off(make_proxy: ProxyFactory) -> None:
    """A body that stalls is cut off by body_timeout. Here the upstream answers the part it
    got (10 bytes) before the connection closes: that answer reached the consumer (status,
    headers, data, never a clean end), so the request is billed for what was delivered, like
    any abandoned stream, flagged ``abandoned``."""
    p = await make_proxy(limits={"body_timeout": "500ms", "idle_timeout": "30s"})
    key = await p.customer_with_key("slow-body")
    before = _closed("body_timeout")
    reader, writer = await _raw(p)
    writer.write(b"POST /v1/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode()
                 + b"\r\nContent-Length: 1000\r\n\r\n" + b"a" * 10)
    await writer.drain()
    took, got = await _closed_within(reader, 5.0)
    writer.close()
    assert took < 3.0
    assert _closed("body_timeout") == before + 1
    assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"a\r\naaaaaaaaaa\r\n")  # no 0-chunk
    await _audited(p)
    with p.db() as c:
        assert c.execute("SELECT rule, meter, quantity, flags FROM audit").fetchall() == [
            ("upload", "bytes_in", 10_000_000, "abandoned")]


async def test_a_slow_upstream_is_not_a_stalled_body(make_proxy: ProxyFactory) -> None:
    """The body timeout counts only while a body is still being sent: a complete request
    waiting on a slow upstream is not cut off."""
    p = await make_proxy(limits={"body_timeout": "300ms"})
    key = await p.customer_with_key("patient")
    async with p.session.post(p.url + "/v1/items?delay_ms=1200", data=b"x" * 100,
                              headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200


async def test_head_over_the_total_bound_gets_431(make_proxy: ProxyFactory) -> None:
    p = await make_proxy(limits={"max_header_bytes": "8KiB", "max_header_field": "4KiB"})
    before = _closed("header_too_large")
    reader, writer = await _raw(p)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    for i in range(10):                  # each field fits, the head does not
        writer.write(f"X-Fill-{i}: ".encode() + b"v" * 1000 + b"\r\n")
    await writer.drain()
    _, data = await _closed_within(reader, 5.0)
    assert data.startswith(b"HTTP/1.1 431 ")
    body = orjson.loads(data.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["type"] == "header_too_large"
    assert _closed("header_too_large") == before + 1
    writer.close()
    # a head just under the bound still works
    headers = {f"X-Fill-{i}": "v" * 1000 for i in range(6)}
    async with p.session.get(p.url + "/healthz", headers=headers) as r:
        assert r.status == 200


async def test_one_header_field_over_the_bound_is_refused(make_proxy: ProxyFactory) -> None:
    """aiohttp's own per-line bound: 400 "Got more than N bytes", then closed."""
    p = await make_proxy(limits={"max_header_field": "4KiB"})
    reader, writer = await _raw(p)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 5000 + b"\r\n\r\n")
    await writer.drain()
    _, data = await _closed_within(reader, 5.0)
    assert data.startswith(b"HTTP/1.0 400 ") and b"Got more than 4096 bytes" in data
    writer.close()


async def test_connections_over_the_limit_are_refused_with_503(make_proxy: ProxyFactory) -> None:
    p = await make_proxy(limits={"max_connections": 5})
    before = metrics.connections_refused_total._value.get()
    held = [await _raw(p) for _ in range(5)]
    reader, writer = await _raw(p)
    _, data = await _closed_within(reader, 5.0)
    assert data.startswith(b"HTTP/1.1 503 ")
    assert orjson.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "too_many_connections"
    assert metrics.connections_refused_total._value.get() == before + 1
    writer.close()
    # one closes: a new connection is served again
    held[0][1].close()
    await held[0][1].wait_closed()

    async def served() -> bool:
        r2, w2 = await _raw(p)
        w2.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        _, got = await _closed_within(r2, 5.0)
        w2.close()
        return got.startswith(b"HTTP/1.1 200 ")

    await wait_until(served, timeout=5, interval=0.05, what="a new connection to be served")
    for _, w in held[1:]:
        w.close()


async def test_per_customer_concurrency_limit_isolates_other_customers(
        make_proxy: ProxyFactory) -> None:
    p = await make_proxy(limits={"per_customer_concurrency": 2})
    greedy = await p.customer_with_key("greedy")
    other = await p.customer_with_key("other")

    async def get(key: str, path: str) -> tuple[int, str, float]:
        t0 = time.perf_counter()
        async with p.session.get(p.url + path, headers={"Authorization": f"Bearer {key}"}) as r:
            body = await r.json()
            kind = body["error"]["type"] if "error" in body else ""
            return r.status, kind, time.perf_counter() - t0

    slow = [asyncio.ensure_future(get(greedy, "/v1/items?delay_ms=1500")) for _ in range(2)]
    await wait_until(lambda: p.server.pipeline.in_flight.get("greedy", 0) == 2)
    refused = await get(greedy, "/v1/items")
    assert refused[:2] == (429, "concurrency_limit_exceeded") and refused[2] < 0.5
    status, _, took = await get(other, "/v1/items")
    assert status == 200 and took < 1.0
    assert [r[0] for r in await asyncio.gather(*slow)] == [200, 200]
    assert (await get(greedy, "/v1/items"))[0] == 200       # slots come back
    assert p.server.pipeline.in_flight == {}
    with p.db() as c:
        rows = c.execute("SELECT customer_id, status FROM audit ORDER BY seq").fetchall()
    assert sorted(rows) == [("greedy", 200)] * 3 + [("other", 200)]


async def test_full_upstream_pool_answers_503_upstream_busy(make_proxy: ProxyFactory) -> None:
    p = await make_proxy(upstream={"pool_size": 2, "pool_wait": "300ms"})
    a = await p.customer_with_key("a")
    b = await p.customer_with_key("b")

    async def get(key: str, path: str) -> tuple[int, dict[str, object], float]:
        t0 = time.perf_counter()
        async with p.session.get(p.url + path, headers={"Authorization": f"Bearer {key}"}) as r:
            return r.status, await r.json(), time.perf_counter() - t0

    slow = [asyncio.ensure_future(get(a, "/v1/items?delay_ms=1500")) for _ in range(2)]
    upstream = p.server.rt.upstream
    await wait_until(lambda: upstream.in_use == 2)
    status, body, took = await get(b, "/v1/items")
    assert status == 503 and body["error"]["type"] == "upstream_busy"  # type: ignore[index]
    assert 0.3 <= took < 1.0
    assert [r[0] for r in await asyncio.gather(*slow)] == [200, 200]
    assert upstream.in_use == 0
    # a waiter that gets a slot in time is served
    slow = [asyncio.ensure_future(get(a, "/v1/items?delay_ms=150")) for _ in range(2)]
    await wait_until(lambda: upstream.in_use == 2)
    status, _, _ = await get(b, "/v1/items")
    assert status == 200
    await asyncio.gather(*slow)
    assert upstream.in_use == 0
    with p.db() as c:
        rows = c.execute("SELECT customer_id FROM audit").fetchall()
    assert sorted(rows) == [("a",)] * 4 + [("b",)]    # the 503 was not billed


async def _small_window_get(sock: socket.socket, p: Proxy, path: str, key: str) -> bytes:
    """``GET path`` through the proxy on ``sock`` with a 4 KiB receive buffer (the proxy's
    transport to it fills soon after the head); returns the first read (the head)."""
    loop = asyncio.get_running_loop()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", p.server.public_port))
    await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: x\r\n"
                                  f"Authorization: Bearer {key}\r\n\r\n".encode())
    return await asyncio.wait_for(loop.sock_recv(sock, 1024), 10)


@pytest.mark.parametrize("path", ["/v1/stream", "/v1/file"])
async def test_a_consumer_that_stops_reading_is_cut_off_by_write_timeout(
        make_proxy: ProxyFactory, path: str) -> None:
    """A consumer that reads the head of a multi-megabyte response (an event stream metered
    by its body, or a Content-Length body with a constant quantity) and then nothing: the
    proxy's transport to it stays full, so the stream loop waits in its drain and the
    upstream connection, paused, is skipped by the pool's read_timeout. Without a bound it
    was held for as long as the consumer kept the connection open: with pool_size 1 every
    other request waited pool_wait and got 503 upstream_busy. write_timeout aborts the
    consumer's connection; the upstream connection is closed (its body is incomplete: never
    reused) and the request is billed for what was delivered, flagged ``abandoned``, as a
    consumer that disconnects is."""
    pad = b"x" * (16 * 1024 - 40)
    size = 32 * 1024 * 1024
    sent = 0
    upstream_done = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        if request.path == "/v1/file":
            resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            resp.content_length = size
        await resp.prepare(request)
        i = 0
        try:
            while sent < size:
                i += 1
                e = b'data: {"units": %d, "pad": "%s"}\n\n' % (i, pad)
                e = e[:size - sent]
                await resp.write(e)
                sent += len(e)
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        finally:
            upstream_done.set()
        return resp

    async def items(request: web.Request) -> web.Response:
        return web.json_response({"ok": 1})

    app = web.Application()
    app.router.add_get("/v1/stream", stream)
    app.router.add_get("/v1/file", stream)
    app.router.add_get("/v1/items", items)
    async with serve(app, shutdown_timeout=0.5) as upstream_url:
        p = await make_proxy(upstream_url=upstream_url,
                             upstream={"pool_size": 1, "pool_wait": "1s"},
                             limits={"write_timeout": "1s"})
        key = await p.customer_with_key("stall")
        before = _closed("write_timeout")
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            head = await _small_window_get(sock, p, path, key)
            assert head.startswith(b"HTTP/1.1 200"), head
            # the consumer reads nothing more: the upstream is held back once the proxy's
            # transport to the consumer is full
            held = await settle(lambda: sent, window=0.3, timeout=20.0)
            assert 0 < held < size // 2, held
            t0 = time.monotonic()
            await wait_until(lambda: _closed("write_timeout"), ok=lambda n: n == before + 1,
                             timeout=10, what="the write timeout to close the connection")
            assert time.monotonic() - t0 < 4.0
            # the consumer's connection is gone (aborted: whatever it reads ends in a reset
            # or an end of file, never the rest of the body)
            got = 0
            with contextlib.suppress(ConnectionError):
                async with asyncio.timeout(10):
                    while chunk := await loop.sock_recv(sock, 65536):
                        got += len(chunk)
            assert got < size
        finally:
            sock.close()
        upstream = p.server.rt.upstream
        await wait_until(lambda: upstream.pool.stats()["open"], ok=lambda n: n == 0,
                         what="the upstream connection to be closed")
        assert upstream.in_use == 0
        await asyncio.wait_for(upstream_done.wait(), 10)
        assert sent < size                  # the upstream's body was cut, not read to its end
        # the one upstream connection is free: the next request is served
        async with p.session.get(p.url + "/v1/items",
                                 headers={"Authorization": f"Bearer {key}"}) as r:
            assert r.status == 200
            await r.read()
        await _audited(p, "stall")
        with p.db() as c:
            rows = c.execute("SELECT rule, meter, quantity > 0, flags FROM audit "
                             "WHERE customer_id = 'stall' ORDER BY seq").fetchall()
        billed = ("stream", "units") if path == "/v1/stream" else ("everything-else", "api_calls")
        assert rows == [(*billed, 1, "abandoned"), ("everything-else", "api_calls", 1, "")]


async def test_a_slow_but_steady_reader_is_not_cut_off_by_write_timeout(
        make_proxy: ProxyFactory) -> None:
    """A consumer that reads a large download slowly but steadily (8 KiB every 0.25 s, far
    under the rate that would empty the proxy's buffer to its low-water mark within
    write_timeout) keeps the connection full the whole time, yet it reads: every sweep sees
    the buffer smaller than at its last look, so write_timeout never cuts it off."""
    size = 32 * 1024 * 1024
    chunk = b"x" * 65536

    async def file(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = size
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError, RuntimeError):
            for _ in range(size // len(chunk)):
                await resp.write(chunk)
            await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/v1/file", file)
    async with serve(app, shutdown_timeout=0.5) as upstream_url:
        p = await make_proxy(upstream_url=upstream_url, limits={"write_timeout": "1s"})
        key = await p.customer_with_key("slow")
        before = _closed("write_timeout")
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            got = len(await _small_window_get(sock, p, "/v1/file", key))
            await asyncio.sleep(1.5)                # the proxy's transport to it fills
            t0 = time.monotonic()
            while time.monotonic() - t0 < 4.0:     # four write_timeouts of slow reading
                data = await asyncio.wait_for(loop.sock_recv(sock, 8192), 10)
                assert data, "the proxy closed the connection of a consumer that reads"
                got += len(data)
                await asyncio.sleep(0.25)
            assert _closed("write_timeout") == before
            assert got < size // 2
        finally:
            sock.close()


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_header_flood_keeps_memory_flat(tmp_path: Path, upstream: str) -> None:
    """100 unauthenticated connections each sending 100 headers of 120 KB without ever
    finishing the head (12 GB offered): the proxy's RSS grows by less than 50 MB (each
    connection is cut at the first oversized field), and it keeps serving."""
    cfg = write_config(tmp_path, upstream)
    proc = ProxyProcess(cfg, tmp_path / "proxy.log")          # on free ports it binds
    proc.spawn()
    try:
        await proc.wait_ready()
        port = int(proc.url.rsplit(":", 1)[1])
        assert proc.proc is not None
        pid = proc.proc.pid
        base = _rss(pid)
        peak = base
        stop = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, _rss(pid))
                await asyncio.sleep(0.02)

        field = b"X-Flood: " + b"a" * (120 * 1024) + b"\r\n"
        sent_total = 0

        async def flood() -> None:
            nonlocal sent_total
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /v1/items HTTP/1.1\r\nHost: x\r\n")
            try:
                for _ in range(100):
                    writer.write(field)
                    await writer.drain()
                    sent_total += len(field)
            except (ConnectionResetError, BrokenPipeError):
                pass
            finally:
                writer.close()

        sampler = asyncio.ensure_future(sample())
        await asyncio.gather(*(flood() for _ in range(100)))
        await asyncio.sleep(0.3)
        stop.set()
        await sampler
        assert peak - base < 50 * 1024 * 1024, (base, peak)
        assert sent_total < 100 * len(field) * 100     # cut off early, not read to the end
        import aiohttp
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{proc.url}/healthz") as r:
                assert r.status == 200
            async with s.get(f"{proc.admin_url}/readyz",
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
                assert r.status == 200
    finally:
        proc.ensure_dead()


async def test_a_consumer_leaving_while_waiting_for_a_slot_frees_nothing_twice(
        make_proxy: ProxyFactory) -> None:
    """A request cancelled while queued for an upstream slot leaves the queue without taking
    (or leaking) a slot: after the slow request ends the pool is empty and serves again."""
    p = await make_proxy(upstream={"pool_size": 1, "pool_wait": "5s"})
    key = await p.customer_with_key("q")
    h = {"Authorization": f"Bearer {key}"}
    upstream = p.server.rt.upstream

    async def get(path: str) -> int:
        async with p.session.get(p.url + path, headers=h) as r:
            await r.read()
            return r.status

    slow = asyncio.ensure_future(get("/v1/items?delay_ms=800"))
    await wait_until(lambda: upstream.in_use == 1)
    leaving = asyncio.ensure_future(get("/v1/items"))
    await wait_until(lambda: upstream.waiting == 1)
    leaving.cancel()                     # the consumer disconnects while queued
    await wait_until(lambda: upstream.waiting == 0)
    assert await slow == 200
    await wait_until(lambda: upstream.in_use == 0)
    assert await get("/v1/items") == 200
    assert upstream.in_use == 0


async def test_an_answer_delivered_before_the_body_ended_is_billed(
        make_proxy: ProxyFactory) -> None:
    """A body that never ends (Content-Length 100000, 10 bytes sent) on a route whose upstream
    answers without reading it: the consumer receives the whole answer, so the request is
    billed. (It was not: any GET route could be used for free this way.)"""
    p = await make_proxy(limits={"body_timeout": "30s", "idle_timeout": "30s"})
    key = await p.customer_with_key("half-body")
    reader, writer = await _raw(p)
    writer.write(b"GET /v1/items HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode()
                 + b"\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10)
    await writer.drain()
    data = b""
    async with asyncio.timeout(5):
        while b'"gadget"}]}' not in data:
            chunk = await reader.read(65536)
            assert chunk, data
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 ")
    writer.close()
    await _audited(p, "half-body")
    assert p.ledger_totals() == {("half-body", "api_calls"): 1_000_000}


async def test_an_abandoned_answer_to_an_unfinished_body_is_billed_for_what_was_sent(
        make_proxy: ProxyFactory) -> None:
    """The same unfinished body, on a stream the consumer abandons after 3 of 10 events: the
    request is billed for what was delivered (the last value seen, 3 units), like any
    abandoned stream. (It was billed nothing: abandon + unfinished body made any stream free.)"""
    p = await make_proxy(limits={"body_timeout": "30s", "idle_timeout": "30s"})
    key = await p.customer_with_key("half-stream")
    reader, writer = await _raw(p)
    writer.write(b"GET /v1/stream?chunks=10&chunk_delay_ms=300 HTTP/1.1\r\nHost: x\r\n"
                 b"Authorization: Bearer " + key.encode()
                 + b"\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10)
    await writer.drain()
    data = b""
    async with asyncio.timeout(10):
        while b'"units":3' not in data.replace(b" ", b""):
            chunk = await reader.read(65536)
            assert chunk, data
            data += chunk
    writer.close()                      # 300 ms before the 4th event
    await _audited(p, "half-stream")
    assert p.ledger_totals() == {("half-stream", "units"): 3_000_000}
    with p.db() as c:
        assert c.execute("SELECT flags FROM audit WHERE customer_id = 'half-stream'"
                         ).fetchone()[0] == "abandoned"
