"""proxy/limits.py: every request head is counted against ``limits.max_header_bytes``
wherever it starts in a read and however the reads split it (docs/resources.md,
"Consumer connections", how max_header_bytes is enforced). _Framing follows each body's framing (Content-Length,
chunked with extensions and trailers) to know where the next head starts.

The property test feeds the real protocol object (GuardedHandler, aiohttp's C parser) the
exact reads it draws, and reads the answers from a real socket; the unit tests drive the
wrapped parser alone for the cases a proxy test cannot reach cheaply (every byte boundary,
upgrades)."""

from __future__ import annotations

import asyncio
import hashlib
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.http_parser import HttpRequestParser
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import LimitsConfig
from proxy.limits import ConnectionGuard, _Framing, guarded_runner
from tests.conftest import ProxyFactory

BOUND = 4096    # the smallest max_header_bytes the config accepts


def _head(i: int, size: int, framing: bytes, method: bytes = b"POST") -> bytes:
    """A request head of ``size`` bytes (or the least it can be), through its blank line."""
    start = method + b" /r%d HTTP/1.1\r\nHost: x\r\n" % i + framing + b"X-Fill: "
    fill = max(size - len(start) - 4, 0)
    return start + b"a" * fill + b"\r\n\r\n"


def _chunked(body: bytes, cuts: list[int], ext: bool, trailer: bool) -> bytes:
    points = sorted({c % len(body) for c in cuts} - {0}) if body else []
    pieces = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    e = b';e=1;q="a b"' if ext else b""
    return b"".join(b"%x%s\r\n%s\r\n" % (len(p), e, p) for p in pieces if p) \
        + b"0" + e + b"\r\n" + (b"T-A: 1\r\nT-B: two\r\n" if trailer else b"") + b"\r\n"


# one request: (head size, framing, body, chunk cuts, extensions, trailers)
_request = st.tuples(
    st.one_of(st.integers(BOUND - 120, BOUND + 120), st.integers(60, 600)),
    st.sampled_from(["none", "cl", "chunked"]),
    st.binary(max_size=600),
    st.lists(st.integers(0, 600), max_size=6),
    st.booleans(), st.booleans())


def _stream(reqs: list[tuple[int, str, bytes, list[int], bool, bool]]
            ) -> tuple[bytes, list[tuple[int, int, int, bytes, int]]]:
    """The pipelined bytes, and per request (head start, head size, end, body, X-Fill)."""
    out = b""
    spans = []
    for i, (size, framing, body, cuts, ext, trailer) in enumerate(reqs):
        if framing == "none":
            head, wire, body = _head(i, size, b"", b"GET"), b"", b""
        elif framing == "cl":
            head, wire = _head(i, size, b"Content-Length: %d\r\n" % len(body)), body
        else:
            head = _head(i, size, b"Transfer-Encoding: chunked\r\n")
            wire = _chunked(body, cuts, ext, trailer)
        fill = len(head) - head.index(b"X-Fill: ") - 12
        spans.append((len(out), len(head), len(out) + len(head) + len(wire), body, fill))
        out += head + wire
    return out, spans


def _responses(buf: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """The complete responses at the start of ``buf`` (status, body), and the rest."""
    done = []
    while (end := buf.find(b"\r\n\r\n")) >= 0:
        head = buf[:end].decode("latin-1").split("\r\n")
        length = next(int(h.split(":", 1)[1]) for h in head[1:]
                      if h.lower().startswith("content-length:"))
        if len(buf) < end + 4 + length:
            break
        done.append((int(head[0].split()[1]), buf[end + 4:end + 4 + length]))
        buf = buf[end + 4 + length:]
    return done, buf


async def _echo(request: web.BaseRequest) -> web.Response:
    body = await request.read()
    return web.Response(body=b"%s %d %s %d" % (
        request.path.encode(), len(body), hashlib.sha256(body).hexdigest()[:16].encode(),
        len(request.headers.get("X-Fill", ""))))


def _expected(span: tuple[int, int, int, bytes, int], i: int) -> tuple[int, bytes]:
    _, _, _, body, fill = span
    return 200, b"/r%d %d %s %d" % (i, len(body), hashlib.sha256(body).hexdigest()[:16].encode(),
                                    fill)


async def _serve_reads(reads: list[bytes], spans: list[tuple[int, int, int, bytes, int]]
                       ) -> None:
    guard = ConnectionGuard(LimitsConfig(max_header_bytes=BOUND), max_connections=10)
    runner = guarded_runner(_echo, guard, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(200):
            if guard.conns:
                break
            await asyncio.sleep(0.005)
        handler, = guard.conns
        # the read holding the byte past the bound of the first head over it: refused there
        over = next((start + BOUND for start, size, *_ in spans if size > BOUND), None)
        got: list[tuple[int, bytes]] = []
        buf = b""
        fed = 0
        for piece in reads:
            before = fed
            fed += len(piece)
            handler.data_received(piece)
            if over is not None and before <= over < fed:
                rest = await asyncio.wait_for(reader.read(-1), 5)
                done, tail = _responses(buf + rest)
                assert tail == b"", tail[:200]
                # answered: every request complete before this read; then the 431
                assert got + done[:-1] == [_expected(s, i) for i, s in enumerate(spans)
                                           if s[2] <= before]
                assert done[-1][0] == 431 and b"header_too_large" in done[-1][1], done[-1]
                return
            # every request complete so far (all under the bound) is answered, in order
            want = [_expected(s, i) for i, s in enumerate(spans) if s[2] <= fed]
            while len(got) < len(want):
                data = await asyncio.wait_for(reader.read(65536), 5)
                assert data, (got, want)
                done, buf = _responses(buf + data)
                got += done
            assert got == want
        assert over is None
    finally:
        writer.close()
        await runner.cleanup()


@given(reqs=st.lists(_request, min_size=1, max_size=5),
       cuts=st.lists(st.integers(0, 8 * BOUND), max_size=12))
def test_every_head_is_measured_wherever_the_reads_split_the_stream(
        reqs: list[tuple[int, str, bytes, list[int], bool, bool]], cuts: list[int]) -> None:
    """A pipelined stream of heads of random sizes around the bound, with Content-Length and
    chunked bodies (random chunks, extensions, trailers, any bytes), cut into reads at random
    boundaries: every head over the bound is refused (431, in the read that brings its byte
    past the bound, nothing after it served), every head under it is served, and what is
    served is what was sent (path, body, head)."""
    stream, spans = _stream(reqs)
    points = sorted({c % len(stream) for c in cuts} - {0})
    reads = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    asyncio.run(_serve_reads(reads, spans))


# the wrapped parser alone

def _framing(bound: int = BOUND, queue: int = 0) -> tuple[_Framing, list[int]]:
    refused: list[int] = []
    loop = asyncio.new_event_loop()
    loop.close()
    proto = mock.Mock(_reading_paused=False)      # the payloads' flow control only
    parser = HttpRequestParser(proto, loop, 2**16, max_line_size=16384, max_field_size=16384,
                               max_msg_queue_size=queue)
    handler: Any = SimpleNamespace(guard=SimpleNamespace(max_header_bytes=bound),
                                   _too_large=lambda: refused.append(1))
    return _Framing(parser, handler), refused


def _feed(fr: _Framing, reads: list[bytes], refused: list[int]) -> list[str]:
    """The paths of the messages parsed; nothing more is fed once refused (the connection
    is closed then)."""
    paths = []
    for r in reads:
        msgs, _, _ = fr.feed_data(r)
        paths += [m.path for m, _ in msgs]
        if refused:
            break
    return paths


def test_a_chunked_body_split_at_every_byte_boundary_is_followed_exactly() -> None:
    """A chunked body with extensions and trailers, then a head just over the bound (or just
    under it), split into two reads at every byte, and into one-byte reads: the head over is
    refused and never parsed into a message; the one under is parsed and not refused."""
    first = _head(0, 200, b"Transfer-Encoding: chunked\r\n") \
        + _chunked(b"0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n", [3, 9], True, True)
    for size, refused_want in ((BOUND + 1, [1]), (BOUND, [])):
        data = first + _head(1, size, b"Content-Length: 3\r\n") + b"abc"
        splits = [[data[:k], data[k:]] for k in range(1, len(data))]
        for reads in [*splits, [data[i:i + 1] for i in range(len(data))]]:
            fr, refused = _framing()
            paths = _feed(fr, reads, refused)
            assert refused == refused_want, (size, len(reads[0]))
            assert paths == (["/r0"] if refused_want else ["/r0", "/r1"]), paths


def test_a_content_length_body_holding_a_head_is_not_counted_as_one() -> None:
    """A body that looks like a big head is body: skipped by its length, not measured, at
    every split of the stream into two reads."""
    big = _head(9, BOUND + 500, b"")
    data = _head(0, 100, b"Content-Length: %d\r\n" % len(big)) + big + _head(1, 100, b"")
    for k in range(1, len(data)):
        fr, refused = _framing()
        assert _feed(fr, [data[:k], data[k:]], refused) == ["/r0", "/r1"]
        assert refused == []


def test_heads_after_empty_lines_are_measured_from_their_request_line() -> None:
    """llhttp skips empty lines before a request line: they start no head (counting them as
    an empty head would shift every later head onto the wrong framing)."""
    data = b"\r\n\r\n" + _head(0, 100, b"Content-Length: 2\r\n") + b"ok\r\n" \
        + _head(1, BOUND + 1, b"")
    for k in range(1, len(data)):
        fr, refused = _framing()
        assert _feed(fr, [data[:k], data[k:]], refused) == ["/r0"]
        assert refused == [1]


def test_a_declined_upgrade_resumes_counting_at_the_tail_and_frames_are_not_heads() -> None:
    """After an upgrade request the rest of the read is not HTTP: WebSocket frames are not
    counted; if the upgrade is declined, aiohttp re-feeds that tail to the parser, and its
    heads are measured (this one is over the bound)."""
    up = b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    fr, refused = _framing()
    msgs, upgraded, tail = fr.feed_data(up + b"\x81\x05hello" * 2000)
    assert upgraded and len(tail) == 14000 and refused == []
    fr, refused = _framing()
    msgs, upgraded, tail = fr.feed_data(up + _head(1, BOUND + 10, b""))
    assert upgraded and refused == [] and [m.path for m, _ in msgs] == ["/ws"]
    fr.set_upgraded(False)
    msgs, _, _ = fr.feed_data(tail)
    assert refused == [1] and list(msgs) == []


def test_an_unsupported_upgrade_drops_the_rest_of_its_read_for_the_parser_and_the_count() -> None:
    """llhttp stops after a request asking for an upgrade aiohttp does not support and
    aiohttp drops the rest of that read: it is not counted either, and the next read starts
    a head (here one over the bound, refused)."""
    up = b"GET /u HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: foo\r\n\r\n"
    fr, refused = _framing()
    # the dropped rest opens a body that would swallow the next head if it were counted
    assert _feed(fr, [up + b"POST /d HTTP/1.1\r\nHost: x\r\nContent-Length: 99999\r\n\r\n",
                      _head(2, BOUND + 1, b"")], refused) == ["/u"]
    assert refused == [1]


def test_http_1_0_keep_alive_and_expect_100_continue_bodies_are_followed() -> None:
    """An HTTP/1.0 keep-alive request with a body, and one sending Expect: 100-continue
    whose body comes in a later read: the heads after them are measured from their first
    byte (one just under the bound is parsed, one just over is refused)."""
    one = b"POST /a HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\n\r\n\r\n\r"
    expect = _head(1, 300, b"Expect: 100-continue\r\nContent-Length: 4\r\n")
    for size, want in ((BOUND, []), (BOUND + 1, [1])):
        fr, refused = _framing()
        paths = _feed(fr, [one + expect, b"body" + _head(2, size, b"")], refused)
        assert refused == want
        assert paths == (["/a", "/r1"] if want else ["/a", "/r1", "/r2"])


def test_heads_the_parser_holds_back_while_its_queue_is_full_are_measured_in_order() -> None:
    """With its message queue full the parser pauses and keeps the rest of the read; the
    walk stops at the first head whose message is not out yet and goes on as the parser
    re-parses what it kept (aiohttp feeds it b"" as its queue drains): the framing of each
    body still comes from its own message, and the head over the bound is refused when the
    walk reaches it, before its message is returned."""
    reqs = b"".join(_head(i, 300, b"Content-Length: 4\r\n") + b"%4d" % i for i in range(5))
    for size, want in ((BOUND, []), (BOUND + 1, [1])):
        fr, refused = _framing(queue=2)
        msgs, _, _ = fr.feed_data(reqs + _head(5, size, b""))
        paths = [m.path for m, _ in msgs]
        assert paths == ["/r0", "/r1"] and refused == []
        while not refused and len(paths) < 6:
            for _ in msgs:
                fr.message_consumed()
            msgs, _, _ = fr.feed_data(b"")
            assert msgs or refused
            paths += [m.path for m, _ in msgs]
        assert refused == want
        assert paths == [f"/r{i}" for i in range(5 if want else 6)]


# the real proxy (tests/conftest.py), real sockets: inputs from the review of _Framing

# a head of 11 KB (against 8 KiB) whose every line is under max_header_field (4 KiB)
_BIG = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + b"".join(
    b"X-Fill-%d: %s\r\n" % (i, b"v" * 1000) for i in range(10))


async def _rest(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(-1), 10)


async def test_a_head_after_a_connect_with_a_content_length_is_measured(
        make_proxy: ProxyFactory) -> None:
    """llhttp switches protocols right after a CONNECT head and never reads a body for it
    (its Content-Length is ignored); aiohttp keeps the rest of the read as the upgraded tail
    and, once the proxy has declined the CONNECT, parses it as HTTP again. The walk took the
    Content-Length for a body and skipped that many bytes of the tail: a head over the bound
    in it was parsed and served (200)."""
    p = await make_proxy(limits={"max_header_bytes": "8KiB", "max_header_field": "4KiB"})
    reader, writer = await asyncio.open_connection("127.0.0.1", p.server.public_port)
    try:
        writer.write(b"CONNECT x:443 HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n"
                     + _BIG + b"\r\n")
        await writer.drain()
        data = await _rest(reader)
    finally:
        writer.close()
    assert b'{"ok": true}' not in data, data[-300:]
    assert b"HTTP/1.1 431 " in data and b"header_too_large" in data, data[-300:]


async def _read_until(reader: asyncio.StreamReader, got: bytes, marker: bytes,
                      n: int) -> bytes:
    """Read on after ``got`` until ``marker`` occurs ``n`` times (each read within 10 s; the
    connection must stay open meanwhile)."""
    while got.count(marker) < n:
        chunk = await asyncio.wait_for(reader.read(65536), 10)
        assert chunk, got[-300:]
        got += chunk
    return got


async def test_a_head_after_a_full_message_queue_drained_by_an_empty_refeed_is_measured(
        make_proxy: ProxyFactory) -> None:
    """33 pipelined requests in one read, the last head ending the read: aiohttp's parser
    stops after 32 (its queue is full) and emits the 33rd when the queue drains, on a
    re-feed of b"". The walk had measured that head and waited for its message, but an
    empty re-feed never reached the wait: the 33rd message stayed unmatched, and the next
    request's framing was taken for it. A next head over the bound with a Content-Length
    was skipped as that body and served (200)."""
    p = await make_proxy(limits={"max_header_bytes": "8KiB", "max_header_field": "4KiB"})
    reader, writer = await asyncio.open_connection("127.0.0.1", p.server.public_port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 33)
        await writer.drain()
        await _read_until(reader, b"", b"HTTP/1.1 200 ", 33)
        # (empty lines after the body: the parser skips them before a next request line)
        writer.write(_BIG + b"Content-Length: 20000\r\n\r\n" + b"\r\n" * 10000)
        await writer.drain()
        data = await _rest(reader)
    finally:
        writer.close()
    assert b"HTTP/1.1 200 " not in data, data[:300]
    assert data.startswith(b"HTTP/1.1 431 ") and b"header_too_large" in data, data[:300]


@pytest.mark.parametrize("after", [b"", b"\r\n"], ids=["body", "body-then-empty-line"])
async def test_a_slow_upstream_answer_to_a_request_with_a_body_is_not_cut_by_header_timeout(
        make_proxy: ProxyFactory, after: bytes) -> None:
    """Reading a request body makes aiohttp re-feed the parser b"" (resume_reading); that
    re-feed started the header clock as if a next head had begun, so a POST whose upstream
    took longer than header_timeout (1 s here, 10 s by default: a long LLM completion) was
    cut by the sweep with no answer, its request complete and sent long before. So did an
    empty line after the body (RFC 9112 2.2: a server SHOULD ignore one before a request
    line; some clients send it after a POST body): no head starts with it."""
    p = await make_proxy(limits={"header_timeout": "1s"})
    key = await p.customer_with_key("slow")
    body = b'{"prompt_tokens": 5}'
    reader, writer = await asyncio.open_connection("127.0.0.1", p.server.public_port)
    try:
        writer.write(b"POST /v1/chat/completions?delay_ms=3000 HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + key.encode() + b"\r\nConnection: close\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
                     + body)
        await writer.drain()
        if after:
            await asyncio.sleep(0.2)        # (a read of its own)
            writer.write(after)
            await writer.drain()
        data = await _rest(reader)
    finally:
        writer.close()
    assert data.startswith(b"HTTP/1.1 200 "), data[:300]
    assert b"chatcmpl-1" in data, data[-300:]


@pytest.mark.parametrize("size", [8192, 8193])
async def test_pipelined_requests_past_the_parser_queue_keep_their_framing(
        make_proxy: ProxyFactory, size: int) -> None:
    """83 pipelined requests, bodies holding blank lines and request lines, so aiohttp's
    parser pauses and resumes its queue (32) several times, then a head of exactly the bound
    (served) or one byte over it (431, nothing served after): every head keeps its framing
    through the pauses, so no body is counted as a head and no head is skipped as a body."""
    p = await make_proxy(limits={"max_header_bytes": "8KiB", "max_header_field": "4KiB"})
    body = b"\r\n\r\nGET / HTTP/1.1\r\n" * 5
    posts = b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body), body) * 40
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + b"".join(
        b"X-%d: %s\r\n" % (i, b"a" * 3000) for i in range(2))
    head += b"X-L: " + b"b" * (size - len(head) - 9) + b"\r\n\r\n"
    assert len(head) == size
    reader, writer = await asyncio.open_connection("127.0.0.1", p.server.public_port)
    try:
        writer.write(posts + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 3)
        await writer.drain()
        got = await _read_until(reader, b"", b"HTTP/1.1 ", 43)
        writer.write(posts)
        await writer.drain()
        got = await _read_until(reader, got, b"HTTP/1.1 ", 83)
        writer.write(head)
        await writer.drain()
        got += await _rest(reader)
    finally:
        writer.close()
    assert b"HTTP/1.1 431 " not in got[:-300]
    if size == 8192:
        assert got.count(b"HTTP/1.1 ") == 84 and got.endswith(b'{"ok": true}'), got[-300:]
    else:
        assert got.count(b"HTTP/1.1 ") == 84 and b"header_too_large" in got[-200:], got[-300:]
