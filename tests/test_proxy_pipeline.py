"""The request path end to end: real upstream, real proxy, real SQLite."""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import socket
import struct
import time
from collections import Counter
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict

from proxy.metrics import REGISTRY
from tests.conftest import Proxy, ProxyFactory
from tests.helpers import wait_until
from tests.servers import serve
from tests.upstream_kit import settle

Q = 1_000_000


async def test_thousand_requests_totals_match_what_clients_saw(proxy: Proxy) -> None:
    keys = {f"cust{i}": await proxy.customer_with_key(f"cust{i}") for i in range(5)}
    seen: Counter[tuple[str, str]] = Counter()
    rng = random.Random(7)
    plan = []
    for _ in range(1000):
        cust = rng.choice(sorted(keys))
        kind = rng.choice(["items", "items404", "chat", "infer", "infer_free"])
        plan.append((cust, kind))
    queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)

    async def client() -> None:
        async with aiohttp.ClientSession() as s:
            while not queue.empty():
                cust, kind = queue.get_nowait()
                h = {"Authorization": f"Bearer {keys[cust]}"}
                if kind == "items":
                    r = await s.get(proxy.url + "/v1/items", headers=h)
                    units = {"api_calls": 1}
                elif kind == "items404":
                    r = await s.get(proxy.url + "/v1/items?status=404", headers=h)
                    units = {"api_calls": 1}
                elif kind == "chat":
                    r = await s.post(proxy.url + "/v1/chat/completions", headers=h,
                                     json={"prompt_tokens": 3, "completion_tokens": 4})
                    units = {"api_calls": 1, "llm_tokens": 7}
                elif kind == "infer":
                    r = await s.post(proxy.url + "/v1/models/premium-x/infer", headers=h, json={})
                    units = {"api_calls": 10}
                else:
                    r = await s.post(proxy.url + "/v1/models/basic/infer", headers=h, json={})
                    units = {"api_calls": 1}
                await r.read()
                if 200 <= r.status < 300:
                    for m, n in units.items():
                        seen[(cust, m)] += n
                r.release()

    await asyncio.gather(*(client() for _ in range(20)))
    ledger = proxy.ledger_totals()
    assert {k: v // Q for k, v in ledger.items()} == dict(seen)
    assert all(v % Q == 0 for v in ledger.values())


async def test_count_when_override_counts_4xx(proxy: Proxy) -> None:
    key = await proxy.customer_with_key("c")
    h = {"Authorization": f"Bearer {key}"}
    for status in (200, 404, 500):
        async with proxy.session.get(proxy.url + f"/v1/items?count_all=1&status={status}",
                                     headers=h) as r:
            assert r.status == status
    assert proxy.ledger_totals() == {("c", "api_calls"): 2 * Q}


async def test_sse_presets_meter_exact_tokens(proxy: Proxy) -> None:
    key = await proxy.customer_with_key("llm")
    h = {"Authorization": f"Bearer {key}"}
    expected = 0
    for path in ("/v1/chat/completions", "/v1/messages", "/v1/responses"):
        for stream in (False, True):
            body = {"stream": stream, "prompt_tokens": 11, "completion_tokens": 29}
            async with proxy.session.post(proxy.url + path, json=body, headers=h) as r:
                assert r.status == 200
                text = await r.text()
                if stream:
                    assert r.content_type == "text/event-stream"
                    assert "data:" in text
            expected += 40
    totals = proxy.ledger_totals()
    assert totals[("llm", "llm_tokens")] == expected * Q
    assert totals[("llm", "api_calls")] == 2 * Q


async def test_first_sse_chunk_arrives_while_upstream_holds_the_rest(
        make_proxy: ProxyFactory) -> None:
    release = asyncio.Event()

    async def held(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"units": 1}\n\n')
        await release.wait()
        await resp.write(b'data: {"units": 5}\n\n')
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/v1/stream", held)
    async with serve(app) as upstream_url:
        p = await make_proxy(upstream_url=upstream_url)
        key = await p.customer_with_key("s")
        async with p.session.get(p.url + "/v1/stream",
                                 headers={"Authorization": f"Bearer {key}"}) as r:
            first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
            assert first == b'data: {"units": 1}\n\n'
            assert not release.is_set()
            release.set()
            rest = await r.content.read()
            assert rest == b'data: {"units": 5}\n\n'
        assert p.ledger_totals() == {("s", "units"): 5 * Q}


# 50 SSE events, each carrying the running total of units so far (event i: i + 1)
_EVENTS = [b"data: " + orjson.dumps({"i": i, "units": i + 1}) + b"\n\n" for i in range(50)]


def _held_stream(release: asyncio.Event) -> web.Application:
    """An upstream answering GET /v1/stream with the first three ``_EVENTS`` at once and the
    rest only once ``release`` is set (the test sets it after the consumer has gone)."""
    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for e in _EVENTS[:3]:
            await resp.write(e)
        await release.wait()
        try:
            for e in _EVENTS[3:]:
                await resp.write(e)
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        return resp

    app = web.Application()
    app.router.add_get("/v1/stream", stream)
    return app


def _audit_flags(proxy: Proxy, customer: str) -> str:
    with proxy.db() as c:
        return str(c.execute("SELECT flags FROM audit WHERE customer_id=?",
                             (customer,)).fetchone()[0])


async def test_abandoned_stream_is_metered_with_what_was_delivered(
        make_proxy: ProxyFactory) -> None:
    release = asyncio.Event()
    events = _EVENTS
    async with serve(_held_stream(release)) as upstream_url:
        proxy = await make_proxy(upstream_url=upstream_url)
        key = await proxy.customer_with_key("ab")
        async with aiohttp.ClientSession() as s:
            r = await s.get(proxy.url + "/v1/stream", headers={"Authorization": f"Bearer {key}"})
            for e in events[:3]:
                assert await r.content.readuntil(b"\n\n") == e
            r.close()  # the consumer walks away mid-stream
        # the upstream holds event 4 back until the proxy has recorded the abandonment, so
        # what the proxy measured is exactly what the consumer received
        totals = await wait_until(proxy.ledger_totals, what="the abandonment to be recorded")
        release.set()
        # exactly the last value the consumer received (events 4..50 were never delivered)
        assert totals == {("ab", "units"): 3 * Q}
        assert _audit_flags(proxy, "ab") == "abandoned"


def _aborts() -> float:
    return REGISTRY.get_sample_value("meterproxy_client_aborts_total") or 0.0


async def test_a_consumer_reset_between_events_is_billed_for_what_was_delivered(
        make_proxy: ProxyFactory) -> None:
    """The consumer resets its connection (SO_LINGER 0: an RST, not a FIN) while the stream
    loop waits for the upstream's next event, its transport not paused. A reset can never
    reach the loop as a ConnectionResetError or BrokenPipeError from a write: the transport
    (uvloop or asyncio) never raises from ``write()`` for a socket error, it closes and calls
    ``connection_lost``; aiohttp then cancels the handler (``handler_cancellation=True``) and a
    later write finds the transport closing (``ClientConnectionResetError``). Either way the
    loop takes the abandon path: billed for exactly the events delivered, flagged abandoned,
    counted in ``meterproxy_client_aborts_total``."""
    release = asyncio.Event()
    events = _EVENTS
    async with serve(_held_stream(release)) as upstream_url:
        proxy = await make_proxy(upstream_url=upstream_url)
        key = await proxy.customer_with_key("rst2")
        aborts = _aborts()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.public_port)
        try:
            writer.write(f"GET /v1/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}"
                         "\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200"), head
            got = b""
            while got.count(b"\n\n") < 3:
                got += await asyncio.wait_for(reader.read(4096), 5)
            assert all(e in got for e in events[:3]) and events[3] not in got
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            writer.transport.abort()                      # with SO_LINGER 0: an RST
        totals = await wait_until(proxy.ledger_totals, what="the reset stream to be recorded")
        release.set()
        assert totals == {("rst2", "units"): 3 * Q}
        assert _audit_flags(proxy, "rst2") == "abandoned"
        assert _aborts() == aborts + 1


def _dechunk(body: bytes) -> bytes:
    """The payload of a complete chunked body (no trailers)."""
    out, at = [], 0
    while True:
        end = body.index(b"\r\n", at)
        size = int(body[at:end], 16)
        if size == 0:
            assert body[end:] == b"\r\n\r\n"
            return b"".join(out)
        out.append(body[end + 2:end + 2 + size])
        assert body[end + 2 + size:end + 4 + size] == b"\r\n"
        at = end + 4 + size


@pytest.mark.parametrize("path", ["/v1/stream", "/v1/unmetered"])
async def test_a_consumer_that_stops_reading_holds_the_upstream_back(
        make_proxy: ProxyFactory, path: str) -> None:
    """A consumer that reads the head of a long stream and then nothing: the proxy stops
    taking the upstream's chunks once the consumer's connection is full (drain), so the
    upstream is held back by the socket buffers and the proxy's memory stays bounded; once
    the consumer reads again the whole stream arrives, chunk for chunk, and is metered."""
    total = 96 * 1024 * 1024
    pad = b"x" * (16 * 1024 - 40)
    sent = 0
    events: list[bytes] = []

    async def stream(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        i = 0
        while sent < total:
            i += 1
            e = b'data: {"units": %d, "pad": "%s"}\n\n' % (i, pad)
            events.append(e)
            await resp.write(e)
            sent += len(e)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get(path, stream)
    async with serve(app) as upstream_url:
        proxy = await make_proxy(upstream_url=upstream_url)
        key = await proxy.customer_with_key("bp")
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.public_port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                     "Connection: close\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in head
        held = await settle(lambda: sent, window=0.3, timeout=20.0)         # the consumer reads nothing meanwhile
        assert held < total // 3, held
        body = await asyncio.wait_for(reader.read(), 60)
        writer.close()
        assert sent >= total
        payload = _dechunk(body)
        assert payload == b"".join(events)
        if path == "/v1/stream":
            assert await wait_until(proxy.ledger_totals) == {("bp", "units"): len(events) * Q}


async def test_a_consumer_reset_while_its_connection_is_full_is_billed_as_abandoned(
        make_proxy: ProxyFactory) -> None:
    """A consumer reads the head of a long stream, stops reading (the proxy's transport to it
    fills, pauses, and the stream loop waits in its drain), then resets the connection (RST).
    aiohttp fails that drain with a plain ``ConnectionError("Connection lost")``, which the
    loop's write-error list does not name; the handler is cancelled in the same step
    (``handler_cancellation=True``, proxy/app.py), so the loop sees CancelledError and the
    stream is recorded as abandoned with what was written, not left unbilled."""
    pad = b"x" * (16 * 1024 - 40)
    sent = 0
    stop = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        i = 0
        try:
            while not stop.is_set():
                i += 1
                e = b'data: {"units": %d, "pad": "%s"}\n\n' % (i, pad)
                await resp.write(e)
                sent += len(e)
        except (ConnectionError, RuntimeError):
            pass
        return resp

    app = web.Application()
    app.router.add_get("/v1/stream", stream)
    async with serve(app) as upstream_url:
        proxy = await make_proxy(upstream_url=upstream_url)
        key = await proxy.customer_with_key("rst")
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", proxy.server.public_port))
            await loop.sock_sendall(sock, f"GET /v1/stream HTTP/1.1\r\nHost: x\r\n"
                                          f"Authorization: Bearer {key}\r\n\r\n".encode())
            head = await loop.sock_recv(sock, 1024)
            assert head.startswith(b"HTTP/1.1 200"), head
            # nothing more is read until the upstream is held back: the proxy has stopped
            # taking its chunks (the consumer's transport is paused, the loop in drain)
            assert await settle(lambda: sent, window=0.3, timeout=20.0) > 0
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            sock.close()                                  # with SO_LINGER 0: an RST
        try:
            totals = await wait_until(proxy.ledger_totals,
                                      what="the reset stream to be recorded")
        finally:
            stop.set()
        assert totals.get(("rst", "units"), 0) > 0
        assert _audit_flags(proxy, "rst") == "abandoned"


async def test_stream_cut_by_the_upstream_is_metered_with_what_was_delivered(
        make_proxy: ProxyFactory) -> None:
    """The upstream dies mid-stream (no terminating chunk): the consumer's response is cut.
    Part of the answer reached the consumer, so the request is billed for what was delivered
    (the last value among the events handed to the inspector before the measurement), with
    the upstream's status and the flag ``upstream_aborted``, under the default count_when:
    it was recorded as a 502, which [2xx] does not bill, so a stream the consumer had mostly
    received was free (SECURITY.md: an answer that reached the consumer, in full or the part
    of a stream it received, is billed)."""
    events = [b"data: " + orjson.dumps({"i": i, "units": i + 1}) + b"\n\n" for i in range(3)]

    async def cut(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for e in events:
            await resp.write(e)
        await asyncio.sleep(0.05)
        # a handler failing after the head was sent: aiohttp closes the connection, the
        # chunked body never ends
        raise ConnectionResetError("the upstream died mid-body")

    rules = """\
version: 1
meters:
  units: {stripe_event_name: units}
rules:
  - name: cut
    match: {path: /v1/cut}
    usage:
      - {meter: units, quantity: response.json.units}
"""
    app = web.Application()
    app.router.add_get("/v1/cut", cut)
    async with serve(app) as upstream_url:
        proxy = await make_proxy(upstream_url=upstream_url, rules_text=rules)
        key = await proxy.customer_with_key("cut")
        async with aiohttp.ClientSession() as s:
            r = await s.get(proxy.url + "/v1/cut", headers={"Authorization": f"Bearer {key}"})
            for e in events:
                assert await r.content.readuntil(b"\n\n") == e
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.content.read()             # truncated, never a clean end
            r.close()
        totals = await wait_until(proxy.ledger_totals, what="the cut stream to be recorded")
        assert totals == {("cut", "units"): 3 * Q}
        with proxy.db() as c:
            row = c.execute("SELECT status, flags FROM audit WHERE customer_id='cut'").fetchone()
        assert tuple(row) == (200, "upstream_aborted")


async def test_request_json_and_bytes(proxy: Proxy) -> None:
    key = await proxy.customer_with_key("e")
    h = {"Authorization": f"Bearer {key}"}
    body = orjson.dumps({"n": 3, "pad": "x" * 100})
    async with proxy.session.post(proxy.url + "/v1/echo", data=body, headers=h) as r:
        assert await r.read() == body
    assert proxy.ledger_totals() == {("e", "units"): 3 * Q, ("e", "bytes_in"): len(body) * Q}


async def test_headers_forwarded_and_hop_by_hop_dropped(make_proxy: ProxyFactory) -> None:
    seen: CIMultiDict[str] = CIMultiDict()

    async def capture(request: web.Request) -> web.Response:
        seen.extend(request.headers)
        return web.json_response({"ok": 1}, headers={"Connection": "keep-alive, X-Secret",
                                                     "X-Secret": "hop", "X-Kept": "yes"})

    app = web.Application()
    app.router.add_get("/v1/x", capture)
    async with serve(app) as upstream_url:
        p = await make_proxy(upstream_url=upstream_url)
        key = await p.customer_with_key("h")
        async with p.session.get(p.url + "/v1/x", headers={
                "Authorization": f"Bearer {key}", "Connection": "keep-alive, X-Drop-Me",
                "X-Drop-Me": "1", "X-Request-Id": "rid-123", "Keep-Alive": "timeout=5",
                "X-Forwarded-For": "10.1.1.1"}) as r:
            assert r.status == 200
            assert r.headers["X-Request-Id"] == "rid-123"
            assert r.headers["X-Kept"] == "yes"
            assert "X-Secret" not in r.headers
        assert "Authorization" not in seen  # the consumer's key is not forwarded by default
        assert "X-Drop-Me" not in seen and "Keep-Alive" not in seen
        assert seen["X-Request-Id"] == "rid-123"
        assert seen["X-Forwarded-For"] == "10.1.1.1, 127.0.0.1"
        assert seen["X-Forwarded-Proto"] == "http"
        assert seen["X-Forwarded-Host"] == f"127.0.0.1:{p.server.public_port}"
        async with p.session.get(p.url + "/v1/x", headers={"X-API-Key": key}) as r:
            assert r.status == 200
            assert len(r.headers["X-Request-Id"]) == 32


async def test_generated_request_ids_are_time_ordered_hex(proxy: Proxy) -> None:
    """A request without an X-Request-Id gets 32 hex digits that start with the time in
    milliseconds: later requests sort after earlier ones, so the audit's request_id index
    is appended to at its right edge instead of one random page per row."""
    key = await proxy.customer_with_key("rid")
    ids = []
    for _ in range(5):
        async with proxy.session.get(proxy.url + "/v1/items",
                                     headers={"Authorization": f"Bearer {key}"}) as r:
            assert r.status == 200
            ids.append(r.headers["X-Request-Id"])
        await asyncio.sleep(0.002)
    assert all(len(i) == 32 and int(i, 16) >= 0 and i == i.lower() for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert abs(int(ids[0][:12], 16) / 1000 - time.time()) < 60
    with proxy.db() as c:
        audited = [r[0] for r in c.execute("SELECT request_id FROM audit WHERE customer_id='rid'"
                                           " ORDER BY seq")]
    assert audited == ids


async def test_websocket_passes_through(proxy: Proxy) -> None:
    key = await proxy.customer_with_key("ws")
    async with proxy.session.ws_connect(proxy.url + "/ws",
                                        headers={"Authorization": f"Bearer {key}"}) as ws:
        await ws.send_str("hi")
        msg = await ws.receive(timeout=5)
        assert msg.data == "echo:hi"
    await wait_until(proxy.ledger_totals, what="the session's usage")
    assert proxy.ledger_totals() == {("ws", "api_calls"): Q}


async def _raw_ws(proxy: Proxy, key: str, path: str) -> socket.socket:
    """A consumer WebSocket on a plain socket (so it can drop the TCP connection mid-closing
    handshake): handshake done, the 101 head read."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)    # fills fast once unread
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", proxy.server.public_port))
    await loop.sock_sendall(sock, (
        f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), 10)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def _reset(sock: socket.socket) -> None:
    """Drop the TCP connection (SO_LINGER 0: an RST, no Close frame answered or sent)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("first", ["upstream", "consumer"])
async def test_a_websocket_consumer_that_drops_tcp_in_the_closing_handshake_is_billed_once(
        make_proxy: ProxyFactory, first: str) -> None:
    """A metered WebSocket session whose closing handshake never completes: either the
    upstream closes first and the consumer drops its TCP connection instead of answering the
    proxy's Close frame, or a consumer whose connection is full (it stopped reading the
    upstream's frames) sends Close and drops while the proxy waits for the upstream's Close
    reply (aiohttp's close of a full consumer transport waits for the flush, so only the drop
    ends it). aiohttp cancels the relay's handler inside ``close()``
    (handler_cancellation=True); the closes ran before the record, so the session was never
    recorded and the pipeline released its hold: the whole session was free. It is recorded
    once, whatever the closes do."""
    got_close = asyncio.Event()
    release = asyncio.Event()
    ended = asyncio.Event()
    sent = 0

    async def flood(ws: web.WebSocketResponse) -> None:
        nonlocal sent
        with contextlib.suppress(ConnectionError, RuntimeError):
            while True:
                await ws.send_bytes(b"x" * 65536)
                sent += 65536

    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoclose=False)
        await ws.prepare(request)
        try:
            if first == "upstream":
                await ws.close()        # Close first (the proxy answers it at once)
            else:
                sender = asyncio.ensure_future(flood(ws))
                try:
                    while (await ws.receive()).type != aiohttp.WSMsgType.CLOSE:
                        pass
                finally:
                    sender.cancel()
                got_close.set()
                await release.wait()    # the Close reply, held back
                await ws.close()
        finally:
            ended.set()
        return ws

    app = web.Application()
    app.router.add_get("/v1/realtime", ws_handler)
    async with serve(app, shutdown_timeout=0.5) as upstream_url:
        proxy = await make_proxy(upstream_url=upstream_url)
        key = await proxy.customer_with_key("wsdrop")
        loop = asyncio.get_running_loop()
        sock = await _raw_ws(proxy, key, "/v1/realtime")
        try:
            if first == "upstream":
                # the proxy's Close frame (the upstream's, relayed as the proxy closes)
                frame = await asyncio.wait_for(loop.sock_recv(sock, 64), 10)
                assert frame[:1] == b"\x88", frame
            else:
                # the consumer reads nothing: the proxy's transport to it fills and pauses
                assert await settle(lambda: sent, window=0.3, timeout=20.0) > 0
                # a masked Close frame (code 1000, zero mask)
                await loop.sock_sendall(sock, b"\x88\x82\x00\x00\x00\x00\x03\xe8")
                await asyncio.wait_for(got_close.wait(), 10)
        finally:
            _reset(sock)
        try:
            totals = await wait_until(proxy.ledger_totals, what="the session's usage")
        finally:
            release.set()
        await asyncio.wait_for(ended.wait(), 10)
        assert totals == {("wsdrop", "api_calls"): Q}
        with proxy.db() as c:
            rows = c.execute("SELECT status, flags FROM audit WHERE customer_id='wsdrop'"
                             ).fetchall()
        assert rows == [(200, "websocket")]

async def test_large_body_streams_through(proxy: Proxy, tmp_path: Path) -> None:
    key = await proxy.customer_with_key("big")
    payload = random.Random(1).randbytes(3 * 1024 * 1024)
    async with proxy.session.post(proxy.url + "/v1/upload", data=io.BytesIO(payload),
                                  headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200
        assert await r.read() == payload
    assert proxy.ledger_totals() == {("big", "bytes_in"): len(payload) * Q}


async def test_upstream_pool_is_reused_and_exported(proxy: Proxy) -> None:
    """Sequential requests reuse one keep-alive upstream connection, which is idle between
    them; /metrics reports the pool's counts."""
    key = await proxy.customer_with_key("pool")
    for _ in range(5):
        async with proxy.session.get(proxy.url + "/v1/items",
                                     headers={"Authorization": f"Bearer {key}"}) as r:
            assert r.status == 200
            await r.read()
    upstream = proxy.server.rt.upstream
    assert upstream.pool.stats() == {"open": 1, "idle": 1, "waiting": 0, "connecting": 0}
    assert upstream.in_use == 0
    text = await proxy.admin("GET", "/metrics")
    assert 'meterproxy_upstream_connections{state="open"} 1.0' in text
    assert 'meterproxy_upstream_connections{state="idle"} 1.0' in text
    assert 'meterproxy_upstream_connections{state="waiting"} 0.0' in text
