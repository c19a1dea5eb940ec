"""proxy.upstream against real upstream servers on 127.0.0.1 that misbehave on purpose
(tests/upstream_kit.py): request writing, response framing, reuse and retry rules,
limits, deadlines, backpressure, half-close and resets, upgrades."""

from __future__ import annotations

import asyncio
import inspect
import socket
import ssl
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from proxy.upstream import (
    BodyError,
    BodyTimeout,
    ConnectError,
    ConnectionClosed,
    ConnectTimeout,
    PoolBusy,
    ProtocolError,
    ResponseTimeout,
)
from tests.ci_guard import require_tool
from tests.ports import held_port
from tests.upstream_kit import Server, answer, chunks, ok, pool_for, settle, until

# ---------------------------------------------------------------- request writing


async def test_get_raw_headers_in_order_and_keep_alive_reuse() -> None:
    resp_bytes = (b"HTTP/1.1 200 Fine\r\nSet-Cookie: a=1\r\nx-lower: v\r\nSet-Cookie: b=2\r\n"
                  b"Content-Length: 5\r\n\r\nhello")
    async with Server(answer(resp_bytes)) as srv, pool_for(srv) as pool:
        for _ in range(3):
            resp = await pool.request("GET", "/p/a?q=1&q=2", [("X-A", "1"), ("x-a", "2")])
            assert (resp.status, resp.reason, resp.version) == (200, "Fine", "1.1")
            assert resp.headers == [("Set-Cookie", "a=1"), ("x-lower", "v"),
                                    ("Set-Cookie", "b=2"), ("Content-Length", "5")]
            assert resp.content_length == 5 and not resp.chunked
            assert await resp.read() == b"hello"
            resp.release()
        assert srv.conns == 1
        assert srv.heads[0] == (b"GET /p/a?q=1&q=2 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                                b"X-A: 1\r\nx-a: 2\r\n\r\n" % srv.port)
        assert pool.stats() == {"open": 1, "idle": 1, "waiting": 0, "connecting": 0}


async def test_hop_by_hop_headers_removed_host_kept_prefix_applied() -> None:
    async with Server(answer(ok())) as srv:
        async with pool_for(srv.url + "/base/") as pool:
            headers = [("Connection", "keep-alive, X-Private"), ("Keep-Alive", "timeout=5"),
                       ("X-Private", "secret"), ("TE", "trailers"), ("Transfer-Encoding", "chunked"),
                       ("Upgrade", "h2c"), ("Proxy-Authorization", "Basic x"), ("Trailer", "X"),
                       ("Proxy-Connection", "close"), ("Host", "api.example"),
                       ("Content-Length", "0"), ("X-Keep", "1")]
            resp = await pool.request("GET", "/v1", headers)
            resp.release()
        assert srv.heads == [b"GET /base/v1 HTTP/1.1\r\nHost: api.example\r\nX-Keep: 1\r\n\r\n"]


async def test_header_injection_is_refused() -> None:
    async with Server(answer(ok())) as srv, pool_for(srv) as pool:
        with pytest.raises(ValueError):
            await pool.request("GET", "/x", [("X-A", "1\r\nX-Evil: 1")])
        with pytest.raises(ValueError):
            await pool.request("GET", "/x HTTP/1.1\r\nX: y")
        assert srv.conns == 0


async def test_bodiless_post_sends_content_length_zero_get_does_not() -> None:
    async with Server(answer(ok())) as srv, pool_for(srv) as pool:
        for method in ("POST", "GET", "DELETE", "OPTIONS"):
            (await pool.request(method, "/x")).release()
        assert [h.split(b"\r\n")[2] for h in srv.heads] == [
            b"Content-Length: 0", b"", b"Content-Length: 0", b""]


async def test_request_bodies_bytes_content_length_stream_and_chunked() -> None:
    async with Server(answer(ok())) as srv, pool_for(srv) as pool:
        (await pool.request("POST", "/b", [], b"abc")).release()
        (await pool.request("PUT", "/cl", [("Content-Length", "6")],
                            chunks(b"ab", b"", b"cdef"))).release()
        (await pool.request("POST", "/ch", [], chunks(b"xy", b"z" * 70000))).release()
        assert srv.conns == 1
        assert b"\r\nContent-Length: 3\r\n" in srv.heads[0]
        assert b"\r\nContent-Length: 6\r\n" in srv.heads[1]
        assert b"\r\nTransfer-Encoding: chunked\r\n" in srv.heads[2]
        assert srv.bodies == [b"abc", b"abcdef", b"xy" + b"z" * 70000]


async def test_request_body_shorter_or_longer_than_content_length() -> None:
    async with Server(answer(ok())) as srv, pool_for(srv) as pool:
        with pytest.raises(ValueError, match="shorter"):
            await pool.request("POST", "/x", [("Content-Length", "10")], chunks(b"abc"))
        with pytest.raises(ValueError, match="longer"):
            await pool.request("POST", "/x", [("Content-Length", "2")], chunks(b"abc"))
        assert pool.stats()["open"] == 0       # an incomplete request body: never reused


async def test_request_body_iterator_failure_closes_connection_and_propagates() -> None:
    async def broken() -> object:
        yield b"part"
        raise ConnectionResetError("the consumer went away")

    async with Server(answer(ok())) as srv, pool_for(srv) as pool:
        with pytest.raises(ConnectionResetError):
            await pool.request("POST", "/x", [], broken())   # type: ignore[arg-type]
        assert pool.stats()["open"] == 0


async def test_request_body_backpressure_upstream_not_reading() -> None:
    """An upstream that stops reading stops the body iterator (drain), and nothing is lost."""
    pulled = 0
    reading = asyncio.Event()

    async def body() -> object:
        nonlocal pulled
        for _ in range(512):            # 32 MiB
            pulled += 65536
            yield b"b" * 65536

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     srv: Server) -> None:
        await srv.read_request(reader, body=False)
        await reading.wait()
        n = 0
        while n < 512 * 65536:
            size = int((await reader.readuntil(b"\r\n")), 16)
            n += len(await reader.readexactly(size + 2)) - 2
        await reader.readuntil(b"\r\n\r\n")
        srv.bodies.append(b"%d" % n)
        writer.write(ok())
        await writer.drain()

    async with Server(script, rcvbuf=16384) as srv, pool_for(srv) as pool:
        task = asyncio.ensure_future(pool.request("POST", "/up", [], body()))  # type: ignore[arg-type]
        stalled_at = await settle(lambda: pulled)   # no progress while the upstream reads nothing
        assert stalled_at < 12 * 1024 * 1024        # bounded by socket buffers + write_high_water
        assert not task.done()
        reading.set()
        resp = await task
        assert resp.status == 200 and srv.bodies == [b"%d" % (512 * 65536)]
        resp.release()


async def test_expect_100_continue_body_waits_for_100() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     srv: Server) -> None:
        await srv.read_request(reader, body=False)
        await asyncio.sleep(0.2)
        srv.events.append(f"early:{len(reader._buffer)}")  # type: ignore[attr-defined]
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        srv.bodies.append(await reader.readexactly(5))
        writer.write(ok(b"done"))
        await writer.drain()
        await reader.read()

    async with Server(script) as srv, pool_for(srv) as pool:
        resp = await pool.request("POST", "/e", [("Expect", "100-continue")], b"12345")
        assert resp.status == 200 and await resp.read() == b"done"
        assert resp.informational == [(100, [])]
        assert srv.events == ["early:0"] and srv.bodies == [b"12345"]
        assert b"\r\nExpect: 100-continue\r\n" in srv.heads[0]
        resp.release()


async def test_expect_100_continue_final_answer_first_body_never_sent() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     srv: Server) -> None:
        await srv.read_request(reader, body=False)
        writer.write(b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 2\r\n\r\nno")
        await writer.drain()
        srv.bodies.append(await reader.read())      # what arrives until we close

    async with Server(script) as srv, pool_for(srv) as pool:
        resp = await pool.request("PUT", "/e", [("Expect", "100-continue")],
                                  chunks(b"never", b"sent"))
        assert resp.status == 417 and await resp.read() == b"no"
        resp.release()
        await until(lambda: len(srv.bodies) == 1)
        assert srv.bodies == [b""]          # the body was not sent, and the connection closed
        assert pool.stats()["open"] == 0


async def test_expect_100_continue_without_100_sends_body_after_expect_timeout() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     srv: Server) -> None:
        await srv.read_request(reader, body=False)      # never answers 100
        srv.bodies.append(await reader.readexactly(3))
        writer.write(ok())
        await writer.drain()
        await reader.read()

    async with Server(script) as srv, pool_for(srv, expect_timeout=0.2) as pool:
        loop = asyncio.get_running_loop()
        t = loop.time()
        resp = await pool.request("POST", "/e", [("Expect", "100-continue")], b"abc")
        assert 0.2 <= loop.time() - t < 2.0
        resp.release()
        assert srv.bodies == [b"abc"]


async def test_early_response_while_uploading_is_returned_and_connection_not_reused() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     srv: Server) -> None:
        await srv.read_request(reader, body=False)
        writer.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 3\r\n\r\nbig")
        await writer.drain()
        await asyncio.sleep(3600)       # reads nothing more

    async def endless() -> object:
        while True:
            yield b"x" * 65536
            await asyncio.sleep(0)

    async with Server(script, rcvbuf=16384) as srv, pool_for(srv) as pool:
        resp = await pool.request("POST", "/big", [], endless())   # type: ignore[arg-type]
        assert resp.status == 413 and await resp.read() == b"big"
        resp.release()
        await until(lambda: pool.stats()["open"] == 0)


async def test_caller_cancelled_mid_upload_or_waiting_for_head_closes_the_connection() -> None:
    gate = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     srv: Server) -> None:
        await srv.read_request(reader, body=False)
        await gate.wait()

    async def endless() -> object:
        while True:
            yield b"x" * 65536

    async with Server(script, rcvbuf=16384) as srv, pool_for(srv) as pool:
        for call in (pool.request("POST", "/up", [], endless()),  # type: ignore[arg-type]
                     pool.request("GET", "/wait")):
            task = asyncio.ensure_future(call)
            await until(lambda: pool.stats()["open"] == 1 and len(srv.heads) >= 1)
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert pool.stats() == {"open": 0, "idle": 0, "waiting": 0, "connecting": 0}
            srv.heads.clear()
        gate.set()


# ---------------------------------------------------------------- response framing


async def test_chunked_response_with_trailers() -> None:
    stream = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
              b"3;ext=1\r\nabc\r\n1\r\nd\r\n0\r\nX-Sum: 4\r\nX-Other: y\r\n\r\n")
    async with Server(answer(stream)) as srv, pool_for(srv) as pool:
        resp = await pool.request("GET", "/c")
        assert resp.chunked and resp.content_length is None
        assert [c async for c in resp] == [b"abc", b"d"]
        assert resp.trailers == [("X-Sum", "4"), ("X-Other", "y")]
        resp.release()
        (await pool.request("GET", "/c")).release()
        assert srv.conns == 1


async def test_close_delimited_body_ends_at_eof_and_is_not_reused() -> None:
    async with Server(answer(b"HTTP/1.1 200 OK\r\n\r\n", b"part1 ", b"part2", delay=0.02,
                             close=True)) as srv, pool_for(srv) as pool:
        resp = await pool.request("GET", "/x")
        assert await resp.read() == b"part1 part2" and resp.complete
        resp.release()
        resp = await pool.request("GET", "/x")
        assert await resp.read() == b"part1 part2"
        resp.release()
        assert srv.conns == 2


async def test_http10_response_without_length_is_close_delimited() -> None:
    async with Server(answer(b"HTTP/1.0 200 OK\r\nX: 1\r\n\r\nold", close=True)) as srv, \
            pool_for(srv) as pool:
        resp = await pool.request("GET", "/x")
        assert resp.version == "1.0" and await resp.read() == b"old" and not resp.keep_alive
        resp.release()


async def test_transfer_coding_not_ending_in_chunked_is_read_to_the_close() -> None:
    async with Server(answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                             b"3\r\nabc\r\n", close=True)) as srv, pool_for(srv) as pool:
        resp = await pool.request("GET", "/x")
        assert not resp.chunked and await resp.read() == b"3\r\nabc\r\n"
        resp.release()


async def test_head_response_has_no_body_and_connection_is_reused() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
    async with Server(answer(head, b"x" * 100)) as srv, pool_for(srv) as pool:
        resp = await pool.request("HEAD", "/h")
        assert resp.content_length == 100 and resp.complete and await resp.read() == b""
        resp.release()
        resp = await pool.request("GET", "/h")
        assert await resp.read() == b"x" * 100
        resp.release()
        assert srv.conns == 1


async def test_body_bytes_after_a_head_response_close_the_connection() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     srv: Server) -> None:
        while True:
            await srv.read_request(reader)
            writer.write(ok(b"oops"))          # a body on a HEAD answer: a broken upstream
            await writer.drain()

    async with Server(script) as srv, pool_for(srv) as pool:
        resp = await pool.request("HEAD", "/h")
        assert resp.status == 200 and await resp.read() == b""
        resp.release()
        await until(lambda: pool.stats()["open"] == 0)
        resp = await pool.request("GET", "/h")
        assert await resp.read() == b"oops"
        resp.release()
        assert srv.conns == 2


@pytest.mark.parametrize("status", [204, 304])
async def test_204_304_have_no_body_whatever_the_head_says(status: int) -> None:
    head = b"HTTP/1.1 %d X\r\nContent-Length: 7\r\n\r\n" % status
    async with Server(answer(head)) as srv, pool_for(srv) as pool:
        for _ in range(2):
            resp = await pool.request("GET", "/n")
            assert resp.status == status and await resp.read() == b""
            resp.release()
        assert srv.conns == 1


async def test_informational_responses_skipped_and_surfaced() -> None:
    stream = (b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
              b"HTTP/1.1 102 Processing\r\n\r\n" + ok(b"final"))
    async with Server(answer(stream)) as srv, pool_for(srv) as pool:
        resp = await pool.request("GET", "/i")
        assert resp.status == 200 and await resp.read() == b"final"
        assert resp.informational == [(103, [("Link", "</a.css>; rel=preload")]), (102, [])]
        resp.release()


async def test_too_many_informational_responses_refused() -> None:
    async with Server(answer(b"HTTP/1.1 102 P\r\n\r\n" * 5 + ok())) as srv, \
            pool_for(srv, max_informational=4) as pool:
        with pytest.raises(ProtocolError, match="1xx"):
            await pool.request("GET", "/i")


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nabc",
    b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-A : 1\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon\r\nContent-Length: 0\r\n\r\n",
])
async def test_invalid_framing_is_a_protocol_error_and_not_reused(head: bytes) -> None:
    async with Server(answer(head)) as srv, pool_for(srv) as pool:
        with pytest.raises(ProtocolError) as err:
            await pool.request("GET", "/bad")
        assert (err.value.status, err.value.type) == (502, "upstream_unavailable")
        assert pool.stats()["open"] == 0


async def test_bad_chunk_mid_body_is_a_body_error() -> None:
    stream = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n"
    async with Server(answer(stream)) as srv, pool_for(srv) as pool:
        resp = await pool.request("GET", "/bad")
        with pytest.raises(BodyError):
            await resp.read()
        resp.release()
        assert pool.stats()["open"] == 0


async def test_take_ready_hands_over_what_has_arrived_then_the_end_or_the_error() -> None:
    """``take_ready`` gives every chunk that has arrived, in order and at once (``()`` while
    none has: ``arrival()`` waits), None at the end; a broken body raises once the chunks
    before the break were taken, as iterating does."""
    release = asyncio.Event()
    served = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     srv: Server) -> None:
        nonlocal served
        while True:
            await srv.read_request(reader)
            served += 1
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"3\r\nabc\r\n2\r\nde\r\n")
            await writer.drain()
            await release.wait()
            writer.write(b"1\r\nf\r\n0\r\n\r\n" if served == 1 else b"1\r\nf\r\nzz\r\n")
            await writer.drain()

    async with Server(script) as srv, pool_for(srv) as pool:
        for broken in (False, True):
            release.clear()
            resp = await pool.request("GET", "/s")
            await until(lambda r=resp: r.buffered == 5)
            assert list(resp.take_ready() or ()) == [b"abc", b"de"]
            assert resp.buffered == 0 and resp.take_ready() == ()
            release.set()
            await asyncio.wait_for(resp.arrival(), 5)
            assert list(resp.take_ready() or ()) == [b"f"]
            if broken:
                with pytest.raises(BodyError):
                    resp.take_ready()
            else:
                await resp.arrival()        # (at once: the body has ended)
                assert resp.take_ready() is None and resp.complete
            resp.release()


async def test_take_ready_resumes_a_paused_connection() -> None:
    body = b"r" * (4 * 65536)
    async with Server(answer(ok(body))) as srv, \
            pool_for(srv, high_water=65536, low_water=16384) as pool:
        resp = await pool.request("GET", "/big")
        await settle(lambda: resp.buffered)
        conn = resp._conn
        assert conn is not None and conn.paused and resp.buffered < len(body)
        got = b"".join(resp.take_ready() or ())
        assert not conn.paused           # the chunks are the caller's now: reading goes on
        while (ready := resp.take_ready()) is not None:
            if not ready:
                await resp.arrival()
            got += b"".join(ready)
        assert got == body
        resp.release()


async def test_bare_lf_line_endings_tolerated() -> None:
    async with Server(answer(b"HTTP/1.1 200 OK\nX: 1\nContent-Length: 2\n\nok")) as srv, \
            pool_for(srv) as pool:
        resp = await pool.request("GET", "/lf")
        assert resp.headers == [("X", "1"), ("Content-Length", "2")] and await resp.read() == b"ok"
        resp.release()


async def test_head_size_header_count_and_field_limits() -> None:
    big = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 900) for i in range(80)) \
        + b"Content-Length: 0\r\n\r\n"
    many = b"HTTP/1.1 200 OK\r\n" + b"X: 1\r\n" * 20 + b"Content-Length: 0\r\n\r\n"
    field = b"HTTP/1.1 200 OK\r\nX: " + b"v" * 9000 + b"\r\nContent-Length: 0\r\n\r\n"
    for stream, cfg, match in ((big, {"max_head_bytes": 65536}, "head is over"),
                               (many, {"max_headers": 20}, "over 20 headers"),
                               (field, {}, "over 8190 bytes")):
        async with Server(answer(stream)) as srv, pool_for(srv, **cfg) as pool:
            with pytest.raises(ProtocolError, match=match):
                await pool.request("GET", "/big")
    async with Server(answer(many)) as srv, pool_for(srv, max_headers=21) as pool:
        (await pool.request("GET", "/ok")).release()


async def test_huge_head_never_buffered_whole() -> None:
    """An endless header value: refused once max_head_bytes (plus at most one read) arrived."""
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     srv: Server) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX: ")
        for _ in range(4096):
            writer.write(b"v" * 4096)       # 16 MiB of one header value
            await writer.drain()

    async with Server(script) as srv, pool_for(srv, max_field_bytes=1 << 30) as pool:
        with pytest.raises(ProtocolError, match="head is over 65536"):
            await pool.request("GET", "/x")


# ---------------------------------------------------------------- response backpressure


async def test_response_backpressure_consumer_that_stops_reading() -> None:
    total = 32 * 1024 * 1024
    sent = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     srv: Server) -> None:
        nonlocal sent
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        block = b"r" * 65536
        while sent < total:
            writer.write(block)
            await writer.drain()
            sent += len(block)

    async with Server(script) as srv, pool_for(srv, high_water=65536, low_water=16384) as pool:
        resp = await pool.request("GET", "/big")
        progress = await settle(lambda: sent)   # the upstream is held back (socket buffers)
        held = resp.buffered
        assert held <= 65536 + 262144          # high water plus at most one read
        assert progress < 16 * 1024 * 1024
        n = 0
        async for chunk in resp:
            n += len(chunk)
            assert resp.buffered <= 65536 + 262144
        assert n == total
        resp.release()


# ---------------------------------------------------------------- reuse rules


@pytest.mark.parametrize(("stream", "reused"), [
    (ok(), True),
    (ok(extra=b"Connection: close\r\n"), False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
    (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", True),
])
async def test_reuse_only_after_keep_alive(stream: bytes, reused: bool) -> None:
    async with Server(answer(stream)) as srv, pool_for(srv) as pool:
        for _ in range(2):
            resp = await pool.request("GET", "/r")
            await resp.read()
            resp.release()
        assert srv.conns == (1 if reused else 2)


async def test_incomplete_body_released_is_never_reused() -> None:
    async with Server(answer(ok(b"x" * 300000))) as srv, pool_for(srv) as pool:
        resp = await pool.request("GET", "/r")
        assert len(await resp.__anext__()) > 0 and not resp.complete
        resp.release()
        assert pool.stats()["open"] == 0
        resp = await pool.request("GET", "/r")
        assert len(await resp.read()) == 300000
        resp.release()
        assert srv.conns == 2


async def test_max_requests_per_connection() -> None:
    async with Server(answer(ok())) as srv, pool_for(srv, max_requests=2) as pool:
        for _ in range(5):
            (await pool.request("GET", "/r")).release()
        assert srv.conns == 3


async def test_idle_connection_closed_by_upstream_is_dropped_not_used() -> None:
    async with Server(answer(ok(), close=True)) as srv, pool_for(srv) as pool:
        # keep-alive announced, then the upstream closes: the pool sees the EOF while idle
        (await pool.request("POST", "/x", [], b"1")).release()
        await until(lambda: pool.stats()["open"] == 0)
        resp = await pool.request("POST", "/x", [], b"2")
        assert resp.status == 200
        resp.release()
        assert srv.bodies == [b"1", b"2"] and srv.conns == 2


async def test_idle_connection_that_receives_bytes_is_closed() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     srv: Server) -> None:
        await srv.read_request(reader)
        writer.write(ok())
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"garbage")
        await reader.read()

    async with Server(script) as srv, pool_for(srv) as pool:
        (await pool.request("GET", "/x")).release()
        assert pool.stats()["idle"] == 1
        await until(lambda: pool.stats()["open"] == 0)


# ---------------------------------------------------------------- retry rules


def stale_second() -> tuple[Server, list[bytes]]:
    """First connection: answers one request, then reads the next and closes unanswered (a
    keep-alive connection the upstream dropped as we reused it). Later connections answer."""
    seen: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     srv: Server) -> None:
        first = srv.conns == 1
        n = 0
        while True:
            head = await srv.read_request(reader)
            seen.append(head.split(b" ", 1)[0])
            n += 1
            if first and n == 2:
                return
            writer.write(ok())
            await writer.drain()

    return Server(script), seen


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE", "OPTIONS"])
async def test_idempotent_request_retried_once_on_a_stale_connection(method: str) -> None:
    srv, seen = stale_second()
    async with srv, pool_for(srv) as pool:
        (await pool.request("GET", "/warm")).release()
        body = b"data" if method == "PUT" else None
        resp = await pool.request(method, "/again", [], body)
        assert resp.status == 200
        resp.release()
        assert srv.conns == 2 and seen == [b"GET", method.encode(), method.encode()]


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_non_idempotent_request_that_may_have_arrived_is_never_retried(method: str) -> None:
    srv, seen = stale_second()
    async with srv, pool_for(srv) as pool:
        (await pool.request("GET", "/warm")).release()
        with pytest.raises(ConnectionClosed) as err:
            await pool.request(method, "/once", [], b"x")
        assert err.value.status == 502
        assert seen == [b"GET", method.encode()] and srv.conns == 1


async def test_streamed_body_already_consumed_is_not_retried() -> None:
    srv, seen = stale_second()
    async with srv, pool_for(srv) as pool:
        (await pool.request("GET", "/warm")).release()
        with pytest.raises(ConnectionClosed):
            await pool.request("PUT", "/stream", [], chunks(b"a", b"b"))
        assert seen == [b"GET", b"PUT"]


async def test_fresh_connection_closed_before_answer_is_not_retried() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     srv: Server) -> None:
        await srv.read_request(reader)

    async with Server(script) as srv, pool_for(srv) as pool:
        with pytest.raises(ConnectionClosed):
            await pool.request("GET", "/x")
        assert srv.conns == 1


async def test_retry_happens_once_only() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     srv: Server) -> None:
        first = srv.conns == 1
        await srv.read_request(reader)
        if first:
            writer.write(ok())
            await writer.drain()
            await srv.read_request(reader)
        # every later request: read and close unanswered

    async with Server(script) as srv, pool_for(srv) as pool:
        (await pool.request("GET", "/warm")).release()
        with pytest.raises(ConnectionClosed):
            await pool.request("GET", "/x")
        assert srv.conns == 2 and len(srv.heads) == 3


# ---------------------------------------------------------------- half-close, resets


async def test_upstream_half_close_after_complete_response() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     srv: Server) -> None:
        await srv.read_request(reader)
        writer.write(ok(b"full"))
        await writer.drain()
        writer.write_eof()                  # shutdown(SHUT_WR): we can still read
        srv.events.append(repr(await reader.read()))

    async with Server(script) as srv, pool_for(srv) as pool:
        resp = await pool.request("GET", "/x")
        assert await resp.read() == b"full"
        resp.release()
        await until(lambda: srv.events == ["b''"])   # we closed: not reused
        assert pool.stats()["open"] == 0


async def test_upstream_half_close_mid_body_is_a_body_error() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     srv: Server) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()
        writer.write_eof()
        await reader.read()

    async with Server(script) as srv, pool_for(srv) as pool:
        resp = await pool.request("GET", "/x")
        got = []
        with pytest.raises(BodyError) as err:
            async for chunk in resp:
                got.append(chunk)
        assert b"".join(got) == b"only part" and err.value.status == 502
        resp.release()


async def test_upstream_reset_mid_body_is_a_body_error() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     srv: Server) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\npart\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()            # RST

    async with Server(script) as srv, pool_for(srv) as pool:
        resp = await pool.request("GET", "/x")
        assert await resp.__anext__() == b"part"
        with pytest.raises(BodyError, match="broke mid-body"):
            await resp.__anext__()
        resp.release()


async def test_upstream_closes_mid_head() -> None:
    async with Server(answer(b"HTTP/1.1 200 OK\r\nContent-Le", close=True)) as srv, \
            pool_for(srv) as pool:
        with pytest.raises(ConnectionClosed):
            await pool.request("GET", "/x")


# ---------------------------------------------------------------- connect, deadlines


async def test_connect_refused_is_connect_error() -> None:
    with held_port() as port:          # bound, never listening: refused, and nobody's else
        async with pool_for(f"http://127.0.0.1:{port}") as pool:
            with pytest.raises(ConnectError) as err:
                await pool.request("GET", "/x")
            assert err.value.status == 502
        assert pool.stats() == {"open": 0, "idle": 0, "waiting": 0, "connecting": 0}


async def test_connect_timeout_swept() -> None:
    """A TLS upstream that accepts and never answers the handshake: the connect deadline."""
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     srv: Server) -> None:
        await asyncio.sleep(3600)

    async with Server(silent) as srv, \
            pool_for(f"https://127.0.0.1:{srv.port}", connect_timeout=0.2) as pool:
        pool.ssl_context = ssl.create_default_context()
        loop = asyncio.get_running_loop()
        t = loop.time()
        with pytest.raises(ConnectTimeout) as err:
            await pool.request("GET", "/x")
        assert 0.2 <= loop.time() - t < 2.0 and err.value.status == 504
        assert pool.stats()["open"] == 0


def _self_signed(directory: str) -> tuple[str, str]:
    """A certificate and key for 127.0.0.1, made with openssl."""
    openssl = require_tool("openssl", "apt-get install -y openssl")
    key, cert = str(Path(directory) / "k.pem"), str(Path(directory) / "c.pem")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


async def test_https_origin_over_tls() -> None:
    """A real TLS upstream: keep-alive reuse and a body larger than the buffers, through the
    TLS transport's pause/resume; the certificate is verified (the pool's ssl_context)."""
    with tempfile.TemporaryDirectory() as directory:
        cert, key = _self_signed(directory)
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(cert, key)
        body = bytes(range(256)) * 4096         # 1 MiB
        srv = Server(answer(ok(body)))
        srv.ssl = server_ctx
        async with srv, pool_for(f"https://127.0.0.1:{srv.port}",
                                 high_water=65536, low_water=16384) as pool:
            pool.ssl_context = ssl.create_default_context(cafile=cert)
            for _ in range(2):
                resp = await pool.request("GET", "/tls")
                assert resp.status == 200 and await resp.read() == body
                resp.release()
            assert srv.conns == 1
        srv2 = Server(answer(ok()))
        srv2.ssl = server_ctx
        async with srv2, pool_for(f"https://127.0.0.1:{srv2.port}") as pool:
            with pytest.raises(ConnectError):       # default trust store: not trusted
                await pool.request("GET", "/tls")


async def test_read_timeout_before_head() -> None:
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   srv: Server) -> None:
        await srv.read_request(reader)
        await reader.read()

    async with Server(mute) as srv, pool_for(srv, read_timeout=0.2) as pool:
        with pytest.raises(ResponseTimeout) as err:
            await pool.request("GET", "/x")
        assert (err.value.status, err.value.type) == (504, "upstream_timeout")
        assert pool.stats()["open"] == 0


async def test_read_timeout_mid_body_and_silence_not_total_time() -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    srv: Server) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await reader.read()

    async with Server(stall) as srv, pool_for(srv, read_timeout=0.2) as pool:
        resp = await pool.request("GET", "/x")
        assert await resp.__anext__() == b"abc"
        with pytest.raises(BodyTimeout) as err:
            await resp.__anext__()
        assert err.value.status == 504
        resp.release()
    # a dribble every 0.1 s for 1 s with read_timeout 0.3 s: never silent long enough
    async with Server(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
                             *([b"x"] * 10), delay=0.1)) as srv, \
            pool_for(srv, read_timeout=0.3) as pool:
        resp = await pool.request("GET", "/x")
        assert await resp.read() == b"x" * 10
        resp.release()


async def test_read_deadline_paused_while_the_caller_is_not_reading() -> None:
    async with Server(answer(ok(b"y" * 1_000_000))) as srv, \
            pool_for(srv, read_timeout=0.2, high_water=1024, low_water=512) as pool:
        resp = await pool.request("GET", "/x")
        await asyncio.sleep(0.6)            # our silence, not the upstream's
        assert len(await resp.read()) == 1_000_000
        resp.release()


# ---------------------------------------------------------------- pool limits


def gated(gate: asyncio.Event) -> Server:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     srv: Server) -> None:
        while True:
            await srv.read_request(reader)
            await gate.wait()
            writer.write(ok())
            await writer.drain()
    return Server(script)


async def test_total_limit_waits_bounded_then_pool_busy() -> None:
    gate = asyncio.Event()
    async with gated(gate) as srv, pool_for(srv, max_connections=1, pool_wait=0.2) as pool:
        first = asyncio.ensure_future(pool.request("GET", "/1"))
        await until(lambda: len(srv.heads) == 1)
        with pytest.raises(PoolBusy) as err:
            await pool.request("GET", "/2")
        assert err.value.status == 503 and len(srv.heads) == 1     # never sent
        second = asyncio.ensure_future(pool.request("GET", "/3"))
        await until(lambda: pool.stats()["waiting"] == 1)
        gate.set()
        (await first).release()
        (await second).release()
        assert srv.conns == 1 and len(srv.heads) == 2


async def test_per_host_limit() -> None:
    gate = asyncio.Event()
    async with gated(gate) as a, Server(answer(ok(b"b"))) as b, \
            pool_for(a, max_connections=4, max_per_host=1, pool_wait=5) as pool:
        held = asyncio.ensure_future(pool.request("GET", "/a1"))
        await until(lambda: len(a.heads) == 1)
        waiting = asyncio.ensure_future(pool.request("GET", "/a2"))
        await until(lambda: pool.stats()["waiting"] == 1)
        from proxy.upstream import Origin
        resp = await pool.request("GET", "/b", origin=Origin.parse(b.url))
        assert await resp.read() == b"b"        # another origin is not held up
        resp.release()
        assert a.conns == 1 and not waiting.done()
        gate.set()
        (await held).release()
        (await waiting).release()
        assert a.conns == 1


async def test_cancelled_waiter_gives_its_place_on() -> None:
    gate = asyncio.Event()
    async with gated(gate) as srv, pool_for(srv, max_connections=1) as pool:
        first = asyncio.ensure_future(pool.request("GET", "/1"))
        await until(lambda: len(srv.heads) == 1)
        waiter = asyncio.ensure_future(pool.request("GET", "/2"))
        await until(lambda: pool.stats()["waiting"] == 1)
        waiter.cancel()
        third = asyncio.ensure_future(pool.request("GET", "/3"))
        await asyncio.sleep(0.05)
        gate.set()
        (await first).release()
        (await third).release()
        assert waiter.cancelled() and [h.split(b" ")[1] for h in srv.heads] == [b"/1", b"/3"]


async def test_idle_timeout_closes_idle_connections() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     srv: Server) -> None:
        await srv.read_request(reader)
        writer.write(ok())
        await writer.drain()
        srv.events.append(repr(await reader.read()))    # EOF: we closed it

    async with Server(script) as srv, pool_for(srv, idle_timeout=0.2) as pool:
        (await pool.request("GET", "/x")).release()
        assert pool.stats()["idle"] == 1
        await until(lambda: srv.events == ["b''"])
        assert pool.stats()["open"] == 0


# ---------------------------------------------------------------- upgrades


async def test_websocket_upgrade_returns_the_raw_connection() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     srv: Server) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\nhello")
        await writer.drain()
        while data := await reader.read(100):
            writer.write(data.upper())

    async with Server(script) as srv, pool_for(srv) as pool:
        resp, up = await pool.upgrade("/ws", [("Sec-WebSocket-Key", "k")])
        assert resp.status == 101 and up is not None
        assert resp.headers[-1] == ("Sec-WebSocket-Accept", "x")
        assert srv.heads[0] == (b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nSec-WebSocket-Key: k\r\n"
                                b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n" % srv.port)
        assert await up.read() == b"hello"
        up.write(b"ping")
        assert await up.read() == b"PING"
        assert pool.stats()["open"] == 1        # held until closed
        up.close()
        assert pool.stats()["open"] == 0


async def test_upgrade_refused_is_a_plain_response() -> None:
    async with Server(answer(ok(b"no ws"))) as srv, pool_for(srv) as pool:
        resp, up = await pool.upgrade("/ws")
        assert up is None and resp.status == 200 and await resp.read() == b"no ws"
        resp.release()


async def test_unasked_101_is_a_protocol_error() -> None:
    async with Server(answer(b"HTTP/1.1 101 Switching\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\n")) \
            as srv, pool_for(srv) as pool:
        with pytest.raises(ProtocolError):
            await pool.request("GET", "/x")


# ---------------------------------------------------------------- the same on uvloop


def _uvloop_cases() -> Iterator[Any]:
    """Every async test above (each parameter set too), to run again on uvloop: the proxy
    runs on uvloop, whose transports differ from asyncio's (pytest-asyncio picks loops per
    test only through a conftest hook)."""
    for name, fn in list(globals().items()):
        if not name.startswith("test_") or not inspect.iscoroutinefunction(fn):
            continue
        marks = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
        if not marks:
            yield pytest.param(name, (), id=name)
            continue
        argnames, values = marks[0].args[0], marks[0].args[1]
        single = "," not in argnames if isinstance(argnames, str) else len(argnames) == 1
        for i, v in enumerate(values):
            yield pytest.param(name, (v,) if single else tuple(v), id=f"{name}[{i}]")


@pytest.mark.parametrize(("name", "args"), list(_uvloop_cases()))
def test_on_uvloop(name: str, args: tuple[Any, ...]) -> None:
    uvloop.run(globals()[name](*args))
