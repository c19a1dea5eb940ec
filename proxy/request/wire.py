"""A streamed response body written straight to the consumer's transport: the chunks that
have arrived from the upstream go out in one transport write, each its own chunk of a
chunked body, with the same bytes and framing aiohttp's ``StreamResponse.write`` puts on
the wire one chunk at a time.

Per chunk, ``StreamResponse.write`` runs two coroutines (``StreamResponse.write``, then
``StreamWriter.write``), a join of the chunk-size line, the chunk and CRLF, and one
transport write (a ``send`` system call on uvloop when its buffer is empty). ``BodyWire``
frames a whole batch in one join and one write, and the caller waits only when the
connection's protocol has paused writing (its transport is over the high-water mark).

Backpressure: aiohttp's ``write`` checked the protocol's pause only after 64 KiB written
since its last check; the caller here checks after every batch (``paused``, ``drain``), so
at most one batch (what the upstream connection had buffered: its high water plus one
read) is handed to a paused transport.

The head and the end: a ``StreamedResponse`` leaves its serialized head to ``BodyWire``,
which sends it with the first batch when chunks are ready at ``prepare()`` (else alone, at
once: ``send(())``); ``send(..., end=True)`` adds the terminating chunk when the caller
knows the batch is the body's last, and ``StreamResponse.write_eof`` then writes nothing.
No byte waits for another: a response whose head, body and end have all arrived goes out
in one write instead of 22 (head, 20 chunks, end). A batch with a chunk of ``WRITEV_MIN``
bytes or more is handed over as its pieces (``transport.writelines``: uvloop sends them in
one ``writev``), not joined: the join copied every byte of a large streamed body once more
than the bare proxy does. (A Content-Length body of at most 64 KiB is not streamed: it is
answered in one piece, ``proxy.request.stream``.)

Leans on aiohttp internals (like ``proxy.limits``): the ``StreamWriter`` a ``web.Server``
request has (``chunked``, ``output_size``, ``_compress``, ``_headers_buf``,
``_headers_written``, ``_eof``, its protocol's ``transport``, ``_paused`` and
``_drain_helper``) and ``StreamResponse._send_headers_immediately``;
tests/test_request_wire.py fails if an aiohttp upgrade changes them.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Collection

from aiohttp import ClientConnectionResetError, http_writer, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_writer import StreamWriter

_CRLF = b"\r\n"
_LAST = b"0\r\n\r\n"
# the chunk-size lines of the sizes most stream events have, made once (formatting one costs
# about as much as the rest of a chunk's framing)
_SIZE_LINES = tuple(b"%x\r\n" % n for n in range(2048))
# a batch with a chunk this large is written as its pieces (one writev), not joined first:
# below it the join is cheaper than the writev's per-piece buffer set-up
WRITEV_MIN = 16384


def write_without_joining() -> None:
    """Let aiohttp hand a response's head and body (or a chunk and its framing) to the
    transport as pieces instead of joining them into one new bytes first.

    aiohttp's ``StreamWriter`` joins them on Python before 3.12.9 (``SKIP_WRITELINES``: the
    fix of CVE-2024-12254 in asyncio's own socket transport, whose ``writelines`` on
    3.12.0-3.12.8 and 3.13.0-3.13.1 could grow without bound); on 3.11 asyncio's
    ``writelines`` is that same join, and uvloop's is one ``writev`` of the pieces (no copy,
    nothing buffered but references). So a one-piece response of 16 KiB to 64 KiB
    (``proxy.request.stream``) copied its whole body once more than needed: about 65k
    instructions of a 64 KiB response's ~625k (docs/PERFORMANCE.md). Turned off where
    neither transport can be hurt: Python before 3.12, or a uvloop loop running (as
    ``meterproxy serve`` always runs). Process-wide: a module global of aiohttp, read at
    each write (left alone if a later aiohttp no longer has it)."""
    if not getattr(http_writer, "SKIP_WRITELINES", False):
        return
    if sys.version_info < (3, 12) or type(asyncio.get_running_loop()).__module__.startswith(
            "uvloop"):
        http_writer.SKIP_WRITELINES = False
        # (below WRITEV_MIN the join is cheaper than writev's per-piece set-up, as for BodyWire)
        http_writer.MIN_PAYLOAD_FOR_WRITELINES = WRITEV_MIN


class StreamedResponse(web.StreamResponse):
    """A ``StreamResponse`` whose ``prepare()`` serializes the head without sending it: the
    ``BodyWire`` made from its writer sends it."""

    _send_headers_immediately = False


class BodyWire:
    """Writes the head (if still unsent) and the body of one prepared ``StreamResponse``."""

    __slots__ = ("chunked", "head", "protocol", "writer")

    def __init__(self, writer: AbstractStreamWriter | None) -> None:
        # (what web.Server gives every request; compression is never enabled by the proxy)
        assert isinstance(writer, StreamWriter) and writer._compress is None
        self.writer = writer
        self.chunked = writer.chunked
        self.protocol: BaseProtocol = writer.protocol
        self.head: bytes | None = None
        if writer._headers_buf and not writer._headers_written:
            # the head is ours to send now; a consumer already gone fails here, as
            # StreamResponse.prepare fails when it sends the head itself
            self._check()
            self.head = writer._headers_buf
            writer._headers_buf = None
            writer._headers_written = True

    def _check(self) -> asyncio.Transport:
        transport = self.protocol.transport
        if transport is None or transport.is_closing():
            raise ClientConnectionResetError("Cannot write to closing transport")
        return transport

    def send(self, chunks: Collection[bytes], end: bool = False) -> None:
        """Write the head if unsent and ``chunks``, in one transport write: each non-empty
        chunk as a chunk of its own when the body is chunked (an empty one would end the
        body: skipped, as ``StreamResponse.write`` skips it), else as they are; ``end``:
        the body's end too (the terminating chunk of a chunked body; ``write_eof()`` then
        writes nothing). Raises ``ClientConnectionResetError`` (nothing written) when the
        consumer's connection is closing or gone."""
        transport = self._check()
        head = self.head
        if head is None:
            parts: list[bytes] = []
        else:
            parts = [head]
            self.head = None
        large = False
        if self.chunked:
            lines = _SIZE_LINES
            for chunk in chunks:
                if chunk:
                    n = len(chunk)
                    if n < 2048:
                        parts += (lines[n], chunk, _CRLF)
                    else:
                        parts += (b"%x\r\n" % n, chunk, _CRLF)
                        large = large or n >= WRITEV_MIN
            if end:
                parts.append(_LAST)
                self.writer._eof = True
        else:
            for chunk in chunks:
                if len(chunk) >= WRITEV_MIN:
                    large = True
                    break
            parts += chunks
        if not parts:
            return
        if large and len(parts) > 1:
            self.writer.output_size += sum(map(len, parts))
            transport.writelines(parts)
            return
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if data:
            self.writer.output_size += len(data)
            transport.write(data)

    @property
    def paused(self) -> bool:
        """The consumer's transport is over its high-water mark: ``drain()`` before more."""
        return self.protocol._paused

    async def drain(self) -> None:
        """Wait until the transport is below its low-water mark again. Raises
        ``ConnectionError`` when the connection is lost meanwhile (or already was)."""
        await self.protocol._drain_helper()
