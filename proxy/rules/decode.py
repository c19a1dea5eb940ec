"""Bounded decoding of compressed response bodies, for inspection only.

Owns: :func:`new_decoder` (a ``Content-Encoding`` value -> a :class:`Decoder`) and
:class:`DecodingInspector` (decodes each chunk and feeds the plain bytes to the real
inspector).

The proxy asks the upstream for ``Accept-Encoding: identity`` whenever a rule reads the
response body, so this only runs when an upstream ignores that. The consumer still
receives the upstream's bytes untouched; only a decoded *copy* is inspected.

Invariants:
- Memory: one step yields at most ``PIECE`` decoded bytes (zlib and zstd ``max_length``;
  Brotli's ``output_buffer_limit`` stops growing its buffer past it, so a Brotli piece
  can reach ``2 * PIECE``), so a decompression bomb never materialises: each piece is
  fed to the inspector (itself bounded) and dropped.
- Work: decoding stops after ``limit`` decoded bytes; the body is then unreadable with
  the reason ``compressed_too_large`` (the usage's fallback applies).
- A corrupt stream or an encoding we cannot decode (several encodings, unknown names)
  makes the body unreadable (reason ``unreadable``); ``feed``/``result`` never raise.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import brotli

from proxy.errors import MeterproxyError

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

from proxy.rules.sse import BodyView, ResponseInspector

__all__ = ["PIECE", "DecodeError", "Decoder", "DecodingInspector", "new_decoder"]

PIECE = 64 * 1024
"""Most decoded bytes produced by one decoder step."""


class DecodeError(MeterproxyError):
    """The compressed stream is corrupt."""


class Decoder(Protocol):
    def decode(self, chunk: bytes) -> Iterator[bytes]:
        """The decoded bytes of ``chunk``, in pieces of at most ``2 * PIECE`` bytes."""
        ...


class _Zlib:
    """gzip (``wbits`` 16+15, several members allowed) and deflate (zlib-wrapped, or raw
    deflate as some servers send it: told apart by the first two bytes, RFC 1950's header
    check)."""

    __slots__ = ("_d", "_gzip", "_head")

    def __init__(self, gzip: bool) -> None:
        self._gzip = gzip
        self._d: Any = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzip else None
        self._head = b""

    def decode(self, chunk: bytes) -> Iterator[bytes]:
        data = chunk
        if self._d is None:              # deflate: wait for the two header bytes
            data = self._head + data
            if len(data) < 2:
                self._head = data
                return
            cmf, flg = data[0], data[1]
            wrapped = cmf & 0x0F == 8 and (cmf << 8 | flg) % 31 == 0
            self._d = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        more = True                      # output may be pending even with no input left
        while data or more:
            try:
                out = self._d.decompress(data, PIECE)
            except zlib.error as exc:
                raise DecodeError(str(exc)) from exc
            more = len(out) == PIECE
            if out:
                yield out
            if self._d.eof:
                rest = self._d.unused_data
                if not (self._gzip and rest):
                    return
                # another gzip member follows
                self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                data = rest
                more = True
                continue
            data = self._d.unconsumed_tail


class _Brotli:
    __slots__ = ("_d",)

    def __init__(self) -> None:
        self._d = brotli.Decompressor()

    def decode(self, chunk: bytes) -> Iterator[bytes]:
        d = self._d
        try:
            out = d.process(chunk, output_buffer_limit=PIECE)
            while True:
                if out:
                    yield out
                # a full buffer means more output may be pending, even when the decoder
                # says it can take more input
                if d.is_finished() or (len(out) < PIECE and d.can_accept_more_data()):
                    return
                out = d.process(b"", output_buffer_limit=PIECE)
        except brotli.error as exc:
            raise DecodeError(str(exc)) from exc


class _Zstd:
    __slots__ = ("_d",)

    def __init__(self) -> None:
        self._d = zstd.ZstdDecompressor()

    def decode(self, chunk: bytes) -> Iterator[bytes]:
        data = chunk
        try:
            while True:
                d = self._d
                if d.eof:
                    rest = d.unused_data + data if d.unused_data else data
                    if not rest:
                        return
                    self._d = d = zstd.ZstdDecompressor()   # another frame follows
                    data = rest
                out = d.decompress(data, PIECE)
                data = b""
                if out:
                    yield out
                if d.eof:
                    if not d.unused_data:
                        return
                    continue
                if d.needs_input:
                    return
        except zstd.ZstdError as exc:
            raise DecodeError(str(exc)) from exc


_DECODERS: dict[str, Callable[[], Decoder]] = {"gzip": lambda: _Zlib(True), "x-gzip": lambda: _Zlib(True),
             "deflate": lambda: _Zlib(False), "br": _Brotli, "zstd": _Zstd}


def new_decoder(content_encoding: str) -> Decoder | None:
    """A decoder for one ``Content-Encoding`` value; None when we cannot decode it (several
    encodings, or one we do not know)."""
    make = _DECODERS.get(content_encoding.strip().lower())
    return make() if make is not None else None


class DecodingInspector:
    """Decodes a compressed body and feeds the plain bytes to ``inner``; gives up (the body
    becomes unreadable, with a reason) past ``limit`` decoded bytes or on corrupt data."""

    __slots__ = ("_decoded", "_decoder", "_inner", "_limit", "_reason")

    def __init__(self, inner: ResponseInspector, content_encoding: str, limit: int) -> None:
        self._inner = inner
        self._decoder = new_decoder(content_encoding)
        self._limit = limit
        self._decoded = 0
        self._reason = "" if self._decoder is not None else "unreadable"

    @property
    def decoded_bytes(self) -> int:
        return self._decoded

    def feed(self, chunk: bytes) -> None:
        if self._reason:
            return
        assert self._decoder is not None
        try:
            for piece in self._decoder.decode(chunk):
                self._decoded += len(piece)
                if self._decoded > self._limit:
                    self._reason = "compressed_too_large"
                    return
                self._inner.feed(piece)
        except DecodeError:
            self._reason = "unreadable"

    def result(self) -> BodyView:
        if self._reason:
            return BodyView({}, malformed=True, reason=self._reason)
        return self._inner.result()
