"""Property: a valid response stream parses to the same response however it is split
across reads. The upstream writes the stream in random segments (TCP_NODELAY, a drain and
a short pause between segments, so the pool receives them as separate reads) and answers
the same stream twice on one connection; both parses must equal what was generated."""

from __future__ import annotations

import asyncio
import socket

from hypothesis import example, given
from hypothesis import strategies as st

from tests.upstream_kit import Server, pool_for

TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-",
                min_size=1, max_size=12).filter(
    lambda n: n.lower() not in ("content-length", "transfer-encoding", "connection", "trailer",
                                "keep-alive", "upgrade"))
VALUE = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=40)


@st.composite
def responses(draw: st.DrawFn) -> dict[str, object]:
    status = draw(st.sampled_from([200, 201, 202, 400, 404, 418, 500, 503]))
    reason = draw(st.sampled_from(["OK", "Whatever", "X Y Z", ""]))
    headers = draw(st.lists(st.tuples(TOKEN, VALUE), max_size=24))
    body = draw(st.binary(max_size=4096))
    framing = draw(st.sampled_from(["cl", "chunked", "close"]))
    trailers = draw(st.lists(st.tuples(TOKEN, VALUE), max_size=3)) if framing == "chunked" else []
    info = draw(st.lists(st.sampled_from([100, 102, 103]), max_size=2))
    head = b"".join(b"HTTP/1.1 %d X\r\n\r\n" % s for s in info)
    head += b"HTTP/1.1 %d %s\r\n" % (status, reason.encode())
    all_headers = list(headers)
    if framing == "cl":
        all_headers.append(("Content-Length", str(len(body))))
        payload = body
    elif framing == "chunked":
        all_headers.append(("Transfer-Encoding", "chunked"))
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=6)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p)
        payload += b"0\r\n" + b"".join(b"%s: %s\r\n" % (k.encode(), v.encode())
                                       for k, v in trailers) + b"\r\n"
    else:
        all_headers.append(("Connection", "close"))
        payload = body
    head += b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in all_headers) + b"\r\n"
    stream = head + payload
    splits = sorted(set(draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=12))))
    return {"status": status, "reason": reason, "headers": all_headers, "body": body,
            "framing": framing, "trailers": trailers, "info": info, "stream": stream,
            "splits": splits}


def _segments(stream: bytes, splits: list[int]) -> list[bytes]:
    cuts = [s for s in splits if 0 < s < len(stream)]
    return [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]


async def _exchange(case: dict[str, object]) -> list[tuple[object, ...]]:
    stream = case["stream"]
    splits = case["splits"]
    assert isinstance(stream, bytes) and isinstance(splits, list)
    close = case["framing"] == "close"

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     srv: Server) -> None:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            await srv.read_request(reader)
            for seg in _segments(stream, splits):
                writer.write(seg)
                await writer.drain()
                await asyncio.sleep(0.001)
            if close:
                return

    got: list[tuple[object, ...]] = []
    async with Server(script) as srv, pool_for(srv) as pool:
        for _ in range(2):
            resp = await pool.request("GET", "/f")
            body = b"".join([c async for c in resp])
            got.append((resp.status, resp.reason, resp.headers, body, resp.trailers,
                        [s for s, _ in resp.informational], resp.complete))
            resp.release()
        got.append(("connections", srv.conns))
    return got


@given(responses())
@example({"status": 200, "reason": "OK", "headers": [("Transfer-Encoding", "chunked")],
          "body": b"abc", "framing": "chunked",
          "trailers": [("X-T", "1")], "info": [100],
          "stream": b"HTTP/1.1 100 X\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n",
          "splits": list(range(1, 80))})        # byte by byte
def test_any_split_of_a_valid_response_parses_the_same(case: dict[str, object]) -> None:
    got = asyncio.run(_exchange(case))
    expected = (case["status"], case["reason"], case["headers"], case["body"],
                case["trailers"], case["info"], True)
    assert got[:2] == [expected, expected]
    assert got[2] == ("connections", 2 if case["framing"] == "close" else 1)
