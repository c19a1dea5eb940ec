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

Leans on aiohttp internals (like ``proxy.limits``): the ``StreamWriter`` a ``web.Server``
request has (``chunked``, ``output_size``, ``_compress``, its protocol's ``transport``,
``_paused`` and ``_drain_helper``) and that ``StreamResponse.prepare`` sends the head at
once; tests/test_request_wire.py fails if an aiohttp upgrade changes them.
"""

from __future__ import annotations

from collections.abc import Collection

from aiohttp import ClientConnectionResetError
from aiohttp.abc import AbstractStreamWriter
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_writer import StreamWriter

_CRLF = b"\r\n"


class BodyWire:
    """Writes the body of one prepared ``StreamResponse`` (head already sent)."""

    __slots__ = ("chunked", "protocol", "writer")

    def __init__(self, writer: AbstractStreamWriter | None) -> None:
        # (what web.Server gives every request; compression is never enabled by the proxy)
        assert isinstance(writer, StreamWriter) and writer._compress is None
        self.writer = writer
        self.chunked = writer.chunked
        self.protocol: BaseProtocol = writer.protocol

    def send(self, chunks: Collection[bytes]) -> None:
        """Write ``chunks`` in one transport write: each non-empty one as a chunk of its own
        when the body is chunked (an empty one would end the body: skipped, as
        ``StreamResponse.write`` skips it), else as they are. Raises
        ``ClientConnectionResetError`` (nothing written) when the consumer's connection is
        closing or gone."""
        transport = self.protocol.transport
        if transport is None or transport.is_closing():
            raise ClientConnectionResetError("Cannot write to closing transport")
        if self.chunked:
            parts: list[bytes] = []
            for chunk in chunks:
                if chunk:
                    parts += (b"%x\r\n" % len(chunk), chunk, _CRLF)
            data = b"".join(parts)
        elif len(chunks) == 1:
            (data,) = chunks
        else:
            data = b"".join(chunks)
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
