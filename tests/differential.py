"""Differential harness: one recording upstream on raw asyncio sockets, raw-socket clients,
and an offline HTTP/1.x message parser, so the bare aiohttp proxy (bench/bare_proxy.py) and
meterproxy can be compared on the exact bytes each side sees.

The upstream answers from a script chosen by the request's ``X-Case`` header
(``SCRIPT|KEY``: SCRIPT picks the answer, KEY files the recording, one per case and proxy) and
records every request's raw bytes (head, body exactly as framed) before it answers, so a
client that has read its response to the end can read the recording without waiting.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

CRLF = b"\r\n"

# ---------------------------------------------------------------- scripted responses


@dataclass(frozen=True)
class Script:
    """What the upstream does for one request: write ``parts`` in order, sleeping ``delay``
    seconds after each, then close the connection if ``close`` (else keep it alive).
    ``parts`` may depend on the request method (a HEAD answer has no body)."""

    parts: Callable[[str], Sequence[bytes]]
    delay: float = 0.0
    close: bool = False
    continue_first: bool = True     # answer ``Expect: 100-continue`` with 100 before the body


NOT_FOUND = Script(lambda m: [b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"], close=True)


class RecordingUpstream:
    """A raw asyncio HTTP/1.1 server in its own thread."""

    def __init__(self) -> None:
        self.scripts: dict[str, Script] = {}
        self.received: dict[str, list[bytes]] = defaultdict(list)
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.AbstractServer | None = None

    def start(self) -> RecordingUpstream:
        self._thread.start()
        assert self._ready.wait(10), "recording upstream did not start"
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def boot() -> None:
            self._server = await asyncio.start_server(self._conn, "127.0.0.1", 0,
                                                      limit=4 * 1024 * 1024)
            self.port = self._server.sockets[0].getsockname()[1]

        self.loop.run_until_complete(boot())
        self._ready.set()
        self.loop.run_forever()
        assert self._server is not None
        self._server.close()
        for t in asyncio.all_tasks(self.loop):
            t.cancel()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(CRLF + CRLF)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                _, headers = _split_head(head)
                name, _, key = _get(headers, b"x-case").decode().partition("|")
                script = self.scripts.get(name, NOT_FOUND)
                if _get(headers, b"expect").lower() == b"100-continue" and script.continue_first:
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = await _read_body(reader, headers)
                self.received[key].append(head + body)
                method = head.split(b" ", 1)[0].decode()
                for part in script.parts(method):
                    writer.write(part)
                    await writer.drain()
                    if script.delay:
                        await asyncio.sleep(script.delay)
                if script.close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


def _split_head(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    lines = head[:-4].split(CRLF)
    headers = []
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers.append((k, v.strip(b" \t")))
    return lines[0], headers


def _get(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes:
    for k, v in headers:
        if k.lower() == name:
            return v
    return b""


async def _read_body(reader: asyncio.StreamReader, headers: list[tuple[bytes, bytes]]) -> bytes:
    if _get(headers, b"transfer-encoding").lower() == b"chunked":
        raw = bytearray()
        while True:
            line = await reader.readuntil(CRLF)
            raw += line
            size = int(line.split(b";")[0], 16)
            if size == 0:
                while (t := await reader.readuntil(CRLF)) != CRLF:
                    raw += t
                raw += CRLF
                return bytes(raw)
            raw += await reader.readexactly(size + 2)
    n = int(_get(headers, b"content-length") or b"0")
    return await reader.readexactly(n) if n else b""


# ---------------------------------------------------------------- offline parser


@dataclass
class Message:
    """One HTTP message as parsed from raw bytes. ``framing`` is how its body was delimited:
    none, cl, chunked or close; ``complete`` is False when the bytes ended before the
    framing said the body ends (a truncated response)."""

    start: bytes
    headers: list[tuple[bytes, bytes]]
    framing: str
    body: bytes
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    complete: bool = True

    @property
    def status(self) -> int:
        return int(self.start.split(b" ")[1])

    def header(self, name: bytes) -> bytes:
        return _get(self.headers, name)

    def view(self, ignore: frozenset[bytes]) -> tuple[object, ...]:
        """What is compared: everything but the ignored header names (lower-case)."""
        return (self.start, tuple((k, v) for k, v in self.headers if k.lower() not in ignore),
                self.framing, self.body, tuple(self.trailers), self.complete)


def parse_stream(data: bytes, requests: bool, methods: Sequence[str] = ()) -> list[Message]:
    """Every message in ``data`` (what one side of a connection carried until EOF).
    ``methods`` are the request methods, in order, of the responses parsed (HEAD answers
    have no body); interim 1xx responses do not consume a method."""
    out: list[Message] = []
    pos = 0
    mi = 0
    while pos < len(data):
        end = data.find(CRLF + CRLF, pos)
        if end < 0:
            out.append(Message(data[pos:], [], "none", b"", complete=False))
            return out
        start, headers = _split_head(data[pos:end + 4])
        pos = end + 4
        te = _get(headers, b"transfer-encoding").lower()
        cl = _get(headers, b"content-length")
        if requests:
            bodiless = not te and not cl
            close_delimited = False
        else:
            status = int(start.split(b" ")[1])
            method = methods[mi] if mi < len(methods) else "GET"
            if status >= 200:
                mi += 1
            bodiless = status < 200 or status in (204, 304) or method == "HEAD"
            close_delimited = not te and not cl
        if bodiless:
            out.append(Message(start, headers, "none", b""))
            continue
        if te == b"chunked":
            body = bytearray()
            trailers: list[tuple[bytes, bytes]] = []
            complete = False
            while True:
                nl = data.find(CRLF, pos)
                if nl < 0:
                    break
                try:
                    size = int(data[pos:nl].split(b";")[0], 16)
                except ValueError:
                    break
                pos = nl + 2
                if size == 0:
                    if data[pos:pos + 2] == CRLF:
                        pos += 2
                        complete = True
                        break
                    tend = data.find(CRLF + CRLF, pos)
                    if tend < 0:
                        break
                    _, trailers = _split_head(b"x\r\n" + data[pos:tend + 4])
                    pos = tend + 4
                    complete = True
                    break
                if pos + size + 2 > len(data):
                    body += data[pos:pos + size]
                    pos = len(data)
                    break
                body += data[pos:pos + size]
                pos += size + 2
            out.append(Message(start, headers, "chunked", bytes(body), trailers, complete))
            continue
        if cl:
            n = int(cl)
            fixed = data[pos:pos + n]
            pos += n
            out.append(Message(start, headers, "cl", fixed, complete=len(fixed) == n))
            continue
        assert close_delimited
        out.append(Message(start, headers, "close", data[pos:]))
        pos = len(data)
    return out


# ---------------------------------------------------------------- raw client


def exchange(port: int, payload: Sequence[bytes], timeout: float = 15.0,
             gap: float = 0.0, half_close: bool = False) -> bytes:
    """Send ``payload`` (pieces, ``gap`` seconds apart) on one fresh connection (then shut
    down its sending side if ``half_close``), then read until the server closes it. The
    caller's last request asks for ``Connection: close`` (or is HTTP/1.0), so EOF marks the
    end of the last response."""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        for i, piece in enumerate(payload):
            if i and gap:
                time.sleep(gap)
            try:
                s.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break   # the server refused early; what it sent is still read below
        if half_close:
            s.shutdown(socket.SHUT_WR)      # the client is done sending, still reading
        chunks: list[bytes] = []
        while True:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                b = s.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError as exc:
                raise AssertionError(f"no EOF within {timeout}s; got {b''.join(chunks)[:300]!r}") \
                    from exc
            if not b:
                break
            chunks.append(b)
    return b"".join(chunks)
