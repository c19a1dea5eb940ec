"""proxy/request/wire.py: a body written by ``BodyWire`` (batches of chunks, one transport
write each) reaches the consumer byte for byte as aiohttp's ``StreamResponse.write`` (one
chunk at a time) puts it on the wire, for every framing aiohttp picks: chunked (HTTP/1.1, no
length), Content-Length, close-delimited (HTTP/1.0). A real aiohttp ``web.Server`` (the
public port's kind) on a loopback socket, read raw to the connection's end, on the stdlib
loop and on uvloop (the proxy's)."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import uvloop
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.request.wire import WRITEV_MIN, BodyWire, StreamedResponse

# (the per-second Date and the Server header would differ between two responses otherwise)
_FIXED = {"Date": "Sun, 29 Nov 2026 00:00:00 GMT", "Server": "test",
          "Content-Type": "text/event-stream"}

# (sizes below and above the table of size lines, and its edge)
# (and both sides of WRITEV_MIN: a batch with a chunk that large goes out as its pieces)
chunks = st.binary(min_size=0, max_size=300) | st.sampled_from([b"", b"0", b"\r\n", b"0\r\n\r\n"]) \
    | st.sampled_from([15, 16, 255, 256, 2047, 2048, 2049, 3000, WRITEV_MIN - 1, WRITEV_MIN,
                       70_000]).map(lambda n: b"y" * n)
batches = st.lists(st.lists(chunks, max_size=6), max_size=6)


async def _exchange(batches: list[list[bytes]], how: str, framing: str,
                    head_alone: bool = False, end: bool = False) -> tuple[bytes, int]:
    """What a raw client reads from a response whose body is ``batches``, written ``how``
    (``aiohttp``: ``StreamResponse.write`` per chunk; ``wire``: ``BodyWire.send`` per
    batch, the head with the first batch unless ``head_alone``, the end with the last if
    ``end``), and the writer's ``output_size`` once the response was written."""
    out: dict[str, Any] = {}

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        resp = StreamedResponse(headers=_FIXED) if how == "wire" else \
            web.StreamResponse(headers=_FIXED)
        if framing == "length":
            resp.content_length = sum(len(c) for b in batches for c in b)
        writer = await resp.prepare(request)
        assert writer is not None
        if how == "wire":
            wire = BodyWire(writer)
            if head_alone or not batches:
                wire.send(())
            for i, b in enumerate(batches):
                wire.send(b, end and i == len(batches) - 1)
        else:
            for b in batches:
                for c in b:
                    await resp.write(c)
        await resp.write_eof()
        out["size"] = resp.body_length      # (the writer's output_size, head and end included)
        return resp

    data = await _served(handler, b"GET / HTTP/1.0\r\n\r\n" if framing == "close" else _GET)
    return data, out["size"]


_GET = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


async def _served(handler: Any, request: bytes) -> bytes:
    """What a raw client reads to the connection's end after sending ``request`` to a real
    ``web.Server`` running ``handler`` on a loopback socket."""
    server = web.Server(handler)
    srv = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.sockets[0].getsockname()[1])
        writer.write(request)
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    finally:
        srv.close()
        await server.shutdown(1)
        await srv.wait_closed()
    return data


@settings(max_examples=80, deadline=None)
@given(batches, st.sampled_from(["chunked", "length", "close"]), st.booleans(), st.booleans())
def test_batches_reach_the_wire_as_chunk_at_a_time_writes_put_them(
        batches: list[list[bytes]], framing: str, head_alone: bool, end: bool) -> None:
    async def both() -> None:
        want, want_size = await _exchange(batches, "aiohttp", framing)
        got, got_size = await _exchange(batches, "wire", framing, head_alone, end)
        assert got == want
        assert got_size == want_size
        body = b"".join(c for b in batches for c in b)
        assert want.endswith(body if framing != "chunked" else b"0\r\n\r\n")
        if framing == "chunked":   # each non-empty chunk its own chunk on the wire
            frames = b"".join(b"%x\r\n%b\r\n" % (len(c), c) for b in batches for c in b if c)
            assert want.endswith(b"\r\n\r\n" + frames + b"0\r\n\r\n")

    asyncio.run(both())
    uvloop.run(both())          # (the proxy's loop: its transport's writelines is a writev)


async def test_a_closed_connection_is_refused_before_anything_is_written() -> None:
    seen: list[type[BaseException]] = []
    gone = asyncio.Event()

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        resp = StreamedResponse(headers=_FIXED)
        wire = BodyWire(await resp.prepare(request))
        wire.send([b"first"])
        await gone.wait()
        assert request.transport is not None
        request.transport.close()
        try:
            wire.send([b"second"])
        except ConnectionResetError as exc:
            seen.append(type(exc))
        return resp

    server = web.Server(handler)
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(server, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.sockets[0].getsockname()[1])
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.readuntil(b"5\r\nfirst\r\n")).startswith(b"HTTP/1.1 200")
        gone.set()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
    finally:
        srv.close()
        await server.shutdown(1)
    assert len(seen) == 1


class _Recording:
    """A transport wrapper noting what each write was handed (delegates everything)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.pieces: list[list[bytes]] = []

    def write(self, data: bytes) -> None:
        self.pieces.append([data])
        self.real.write(data)

    def writelines(self, data: Any) -> None:
        data = list(data)
        self.pieces.append(data)
        self.real.writelines(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


async def _one_piece(body: bytes) -> tuple[bytes, list[list[bytes]]]:
    """A ``web.Response`` with ``body`` (the proxy's one-piece answer of a body of at most
    64 KiB) on a real ``web.Server``, read raw: (the bytes on the wire, what the transport
    was handed per write)."""
    rec: dict[str, _Recording] = {}

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        rec["t"] = _Recording(request.protocol.transport)
        request.protocol.transport = rec["t"]  # type: ignore[assignment]
        return web.Response(body=body, headers=_FIXED)

    data = await _served(handler, _GET)
    return data, rec["t"].pieces


def test_a_one_piece_body_goes_to_the_transport_unjoined_with_the_same_bytes() -> None:
    """``write_without_joining`` (``meterproxy serve`` runs it at start): a one-piece
    response of WRITEV_MIN bytes or more (head and body) reaches the transport as the body
    object itself beside its head (uvloop: one writev; it was joined with the head into a
    new bytes first, a copy of the whole body), a smaller one joined as before; the bytes on
    the wire are the same either way, on uvloop (the proxy's loop) and on the stdlib loop."""
    from aiohttp import http_writer

    from proxy.request.wire import write_without_joining

    sizes = [0, 100, 2048, 8192, WRITEV_MIN, 65_536]
    saved = (http_writer.SKIP_WRITELINES, http_writer.MIN_PAYLOAD_FOR_WRITELINES)

    bodies = [b"z" * n for n in sizes]

    async def run(unjoined: bool) -> list[tuple[bytes, list[list[bytes]]]]:
        if unjoined:
            write_without_joining()
        return [await _one_piece(b) for b in bodies]

    try:
        for runner, applies in ((uvloop.run, True), (asyncio.run, sys.version_info < (3, 12))):
            # (on 3.12+ the stdlib loop's writelines is left to aiohttp's own choice)
            http_writer.SKIP_WRITELINES, http_writer.MIN_PAYLOAD_FOR_WRITELINES = True, 2048
            joined = runner(run(False))
            unjoined = runner(run(True))
            for body, (want, _), (got, pieces) in zip(bodies, joined, unjoined, strict=True):
                n = len(body)
                assert got == want, n
                handed = [p for w in pieces for p in w if p is body and n]
                if n >= WRITEV_MIN and applies:
                    assert len(pieces) == 1 and len(pieces[0]) == 2 and len(handed) == 1
                elif n:
                    assert not handed        # (joined with the head: a copy)
            assert [len(p) for _want, ps in joined for p in ps if len(ps) > 0] == [1] * 6
    finally:
        http_writer.SKIP_WRITELINES, http_writer.MIN_PAYLOAD_FOR_WRITELINES = saved
