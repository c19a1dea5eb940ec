"""Response and request bodies through a running proxy and real upstreams: identity is
asked for, compressed bodies are decoded for inspection (bounded), over-cap bodies are
scanned, abandoned streams bill the reservation, openai_chat streams get usage even when
the client did not ask, and every fallback is counted and explained."""

from __future__ import annotations

import asyncio
import gzip
import sqlite3
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import brotli
import orjson
import pytest
from aiohttp import web

from proxy import cli
from proxy.metrics import REGISTRY
from tests.conftest import Proxy, ProxyFactory
from tests.helpers import wait_until
from tests.servers import serve

try:
    from compression import zstd  # type: ignore[import-not-found,unused-ignore]
except ImportError:
    from backports import zstd  # type: ignore[no-redef,unused-ignore]

Q = 1_000_000

RULES = """\
version: 1
meters:
  llm_tokens: {stripe_event_name: llm_tokens}
  units: {stripe_event_name: units}
rules:
  - name: chat
    match: {methods: [POST], path: "/v1/chat/**"}
    usage:
      - {meter: llm_tokens, preset: openai_chat, estimate: 1000}
  - name: messages
    match: {methods: [POST], path: /v1/messages}
    usage:
      - {meter: llm_tokens, preset: anthropic_messages, estimate: 1000}
  - name: responses
    match: {methods: [POST], path: /v1/responses}
    usage:
      - {meter: llm_tokens, preset: openai_responses, estimate: 1000}
  - name: stream
    match: {path: /v1/stream}
    usage:
      - {meter: units, quantity: response.json.units}
  - name: echo
    match: {methods: [POST], path: /v1/echo}
    usage:
      - {meter: units, quantity: request.json.n}
  - name: plain
    match: {path: "/v1/plain"}
    usage:
      - {meter: units, quantity: 1}
"""

USAGE = {"prompt_tokens": 300, "completion_tokens": 21, "total_tokens": 321}
JSON_BODY = orjson.dumps({"id": "c1", "object": "chat.completion",
                          "choices": [{"message": {"content": "hello " * 200}}],
                          "usage": USAGE})


def compress(encoding: str, data: bytes) -> bytes:
    if encoding == "gzip":
        return gzip.compress(data)
    if encoding == "deflate":
        return zlib.compress(data)
    if encoding == "br":
        return bytes(brotli.compress(data))
    assert encoding == "zstd"
    return bytes(zstd.compress(data))


def chat_events(with_usage: bool = True) -> list[bytes]:
    ev = [b"data: " + orjson.dumps({"id": "c", "choices": [{"delta": {"content": f"w{i}"}}],
                                    "usage": None}) + b"\n\n" for i in range(3)]
    if with_usage:
        ev.append(b"data: " + orjson.dumps({"id": "c", "choices": [], "usage": USAGE})
                  + b"\n\n")
    ev.append(b"data: [DONE]\n\n")
    return ev


def fallbacks(rule: str, meter: str, reason: str) -> float:
    v = REGISTRY.get_sample_value("meterproxy_quantity_fallback_total",
                                  {"rule": rule, "meter": meter, "reason": reason})
    return v or 0.0


class Upstream:
    """An upstream whose answers each test shapes; it records what it received."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str], bytes]] = []
        self.release = asyncio.Event()
        self.routes: dict[str, Callable[[web.Request], Any]] = {}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append((request.path, dict(request.headers), body))
        resp: web.StreamResponse = await self.routes[request.path](request)
        return resp


@pytest.fixture
async def up() -> Any:
    u = Upstream()
    async with serve(u.app()) as url:
        u.url = url  # type: ignore[attr-defined]
        yield u


async def start(make_proxy: ProxyFactory, up: Upstream) -> tuple[Proxy, dict[str, str]]:
    p = await make_proxy(upstream_url=up.url, rules_text=RULES)  # type: ignore[attr-defined]
    key = await p.customer_with_key("c")
    return p, {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


async def wait_totals(p: Proxy, want: dict[tuple[str, str], int]) -> None:
    """Poll the ledger (rows of abandoned responses commit without being awaited)."""
    await wait_until(p.ledger_totals, ok=lambda got: got == want, what=f"the ledger at {want}")


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
async def test_upstream_ignoring_identity_is_decoded(make_proxy: ProxyFactory, up: Upstream,
                                                      encoding: str) -> None:
    sent = compress(encoding, JSON_BODY)

    async def always_compressed(request: web.Request) -> web.Response:
        return web.Response(body=sent, headers={"Content-Type": "application/json",
                                                "Content-Encoding": encoding})

    up.routes["/v1/chat/completions"] = always_compressed
    p, h = await start(make_proxy, up)
    async with aiohttp.ClientSession(auto_decompress=False) as s, s.post(
            p.url + "/v1/chat/completions", data=b'{"model": "m"}',
            headers={**h, "Accept-Encoding": "gzip, deflate, br, zstd"}) as r:
        assert r.status == 200
        assert r.headers["Content-Encoding"] == encoding
        assert await r.read() == sent               # passed through, byte for byte
    assert up.seen[0][1]["Accept-Encoding"] == "identity"
    assert p.ledger_totals() == {("c", "llm_tokens"): 321 * Q}


async def test_upstream_honouring_identity(make_proxy: ProxyFactory, up: Upstream) -> None:
    async def negotiated(request: web.Request) -> web.Response:
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            return web.Response(body=gzip.compress(JSON_BODY), headers={
                "Content-Type": "application/json", "Content-Encoding": "gzip"})
        return web.Response(body=JSON_BODY, content_type="application/json")

    up.routes["/v1/chat/completions"] = negotiated
    up.routes["/v1/plain"] = negotiated
    p, h = await start(make_proxy, up)
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.post(p.url + "/v1/chat/completions", data=b"{}",
                          headers={**h, "Accept-Encoding": "gzip"}) as r:
            assert "Content-Encoding" not in r.headers
            assert await r.read() == JSON_BODY
        # a rule that does not read the body leaves the client's Accept-Encoding alone
        async with s.get(p.url + "/v1/plain", headers={**h, "Accept-Encoding": "gzip"}) as r:
            assert r.headers["Content-Encoding"] == "gzip"
            assert gzip.decompress(await r.read()) == JSON_BODY
    assert up.seen[1][1]["Accept-Encoding"] == "gzip"
    assert p.ledger_totals() == {("c", "llm_tokens"): 321 * Q, ("c", "units"): 1 * Q}


@pytest.mark.parametrize("encoding", ["gzip", "br"])
async def test_compressed_sse(make_proxy: ProxyFactory, up: Upstream, encoding: str) -> None:
    stream = compress(encoding, b"".join(chat_events()))

    async def sse(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Content-Encoding": encoding})
        await resp.prepare(request)
        for i in range(0, len(stream), 7):          # many small chunks
            await resp.write(stream[i:i + 7])
        await resp.write_eof()
        return resp

    up.routes["/v1/chat/completions"] = sse
    p, h = await start(make_proxy, up)
    async with aiohttp.ClientSession(auto_decompress=False) as s, s.post(
            p.url + "/v1/chat/completions",
            data=b'{"stream": true, "stream_options": {"include_usage": true}}',
            headers=h) as r:
        assert await r.read() == stream
    assert p.ledger_totals() == {("c", "llm_tokens"): 321 * Q}


@pytest.mark.parametrize("where", ["start", "end"])
async def test_two_megabyte_body(make_proxy: ProxyFactory, up: Upstream, where: str) -> None:
    pad = {"choices": [{"logprobs": {"content": [
        {"token": "tok", "logprob": -0.5, "top_logprobs": [{"token": "x", "logprob": -1}]}
    ] * 30000}}]}
    doc = {"usage": USAGE, **pad} if where == "start" else {**pad, "usage": USAGE}
    body = orjson.dumps(doc)
    assert 2_000_000 < len(body) < 3_000_000

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    up.routes["/v1/chat/completions"] = big
    p, h = await start(make_proxy, up)
    before = fallbacks("chat", "llm_tokens", "over_cap")
    async with p.session.post(p.url + "/v1/chat/completions", data=b"{}", headers=h) as r:
        assert await r.read() == body
    assert p.ledger_totals() == {("c", "llm_tokens"): 321 * Q}
    assert fallbacks("chat", "llm_tokens", "over_cap") == before


async def test_decompression_bomb(make_proxy: ProxyFactory, up: Upstream) -> None:
    c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [c.compress(b'{"pad": "')]
    block = b"0" * (1 << 20)
    parts += [c.compress(block) for _ in range(256)]             # 256 MiB decoded
    parts.append(c.compress(b'", "usage": {"total_tokens": 5}}') + c.flush())
    bomb = b"".join(parts)
    assert len(bomb) < 1 << 20

    async def send_bomb(request: web.Request) -> web.Response:
        return web.Response(body=bomb, headers={"Content-Type": "application/json",
                                                "Content-Encoding": "gzip"})

    up.routes["/v1/chat/completions"] = send_bomb
    p, h = await start(make_proxy, up)
    before = fallbacks("chat", "llm_tokens", "compressed_too_large")
    tracemalloc.start()
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as s, s.post(
                p.url + "/v1/chat/completions", data=b"{}", headers=h) as r:
            assert await r.read() == bomb
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, peak            # nowhere near the 256 MiB it decodes to
    # decoding stopped at 16 x max_inspect_bytes: billed the reservation (estimate: 1000)
    assert p.ledger_totals() == {("c", "llm_tokens"): 1000 * Q}
    assert fallbacks("chat", "llm_tokens", "compressed_too_large") == before + 1


async def test_abandoned_before_usage_bills_the_estimate(make_proxy: ProxyFactory,
                                                          up: Upstream, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    events = chat_events()

    async def stalls_before_usage(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for e in events[:3]:
            await resp.write(e)
        await up.release.wait()
        for e in events[3:]:
            await resp.write(e)
        await resp.write_eof()
        return resp

    up.routes["/v1/chat/completions"] = stalls_before_usage
    p, h = await start(make_proxy, up)
    before = fallbacks("chat", "llm_tokens", "stream_abandoned")
    async with aiohttp.ClientSession() as s:
        r = await s.post(p.url + "/v1/chat/completions",
                         data=b'{"stream": true, "stream_options": {"include_usage": true}}',
                         headers={**h, "X-Request-Id": "abandon-1"})
        for e in events[:3]:
            assert await r.content.readuntil(b"\n\n") == e
        r.close()                                   # the consumer walks away
    # the usage chunk is held back by the upstream until the abandonment is recorded
    await wait_totals(p, {("c", "llm_tokens"): 1000 * Q})
    up.release.set()
    assert fallbacks("chat", "llm_tokens", "stream_abandoned") == before + 1
    with p.db() as db:
        flags = db.execute("SELECT flags FROM audit WHERE request_id='abandon-1'").fetchone()[0]
    assert flags == "abandoned,unreadable,fallback_stream_abandoned"
    capsys.readouterr()
    assert cli.main(["explain", "abandon-1", "--db", str(tmp_path / "meter.db")]) == 0
    out = capsys.readouterr().out
    assert "on_unreadable unset: the reservation, estimate 1000" in out
    assert "recorded quantity 1000" in out
    assert "flag fallback_stream_abandoned: the response ended early" in out


async def test_stream_usage_added_for_client_that_did_not_ask(proxy: Proxy) -> None:
    """The shared example upstream behaves as OpenAI does: usage only when asked for."""
    key = await proxy.customer_with_key("s")
    h = {"Authorization": f"Bearer {key}"}
    async with proxy.session.post(proxy.url + "/v1/chat/completions", headers=h,
                                  data=b'{"stream": true}') as r:
        got = await r.read()
    # what the client would have got without the proxy: no usage anywhere but the
    # "usage": null the upstream adds to each chunk once asked
    want = b"".join(b"data: " + orjson.dumps({"id": "chatcmpl-1", "choices": [
        {"delta": {"content": f"w{i} "}}], "usage": None}) + b"\n\n" for i in range(5))
    assert got == want + b"data: [DONE]\n\n"
    assert proxy.ledger_totals() == {("s", "llm_tokens"): 42 * Q, ("s", "api_calls"): 1 * Q}
    # a client that asks gets the usage chunk, unchanged
    async with proxy.session.post(
            proxy.url + "/v1/chat/completions", headers=h,
            data=b'{"stream": true, "stream_options": {"include_usage": true}}') as r:
        got = await r.read()
    usage = {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}
    assert got == want + b"data: " + orjson.dumps(
        {"id": "chatcmpl-1", "choices": [], "usage": usage}) + b"\n\ndata: [DONE]\n\n"
    assert proxy.ledger_totals() == {("s", "llm_tokens"): 84 * Q, ("s", "api_calls"): 2 * Q}


async def test_stream_usage_request_as_upstream_sees_it(make_proxy: ProxyFactory,
                                                        up: Upstream) -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(body=JSON_BODY, content_type="application/json")

    up.routes["/v1/chat/completions"] = ok
    p, h = await start(make_proxy, up)
    for body in (b'{"model": "m", "stream": true}', b'{"stream": false}',
                 b'{"\\u0073tream": true}',
                 b'{"stream": true, "stream_options": {"include_usage": true}}'):
        async with p.session.post(p.url + "/v1/chat/completions", data=body, headers=h) as r:
            assert r.status == 200
    sent = [(hd["Content-Length"], b) for _, hd, b in up.seen]
    added = b'{"stream_options":{"include_usage":true},"model": "m", "stream": true}'
    asked = b'{"stream": true, "stream_options": {"include_usage": true}}'
    escaped = b'{"stream_options":{"include_usage":true},"\\u0073tream": true}'
    assert sent == [(str(len(added)), added), ("17", b'{"stream": false}'),
                    (str(len(escaped)), escaped), (str(len(asked)), asked)]


async def test_compressed_request_body_is_refused_where_read(make_proxy: ProxyFactory,
                                                             up: Upstream) -> None:
    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    up.routes["/v1/echo"] = echo
    up.routes["/v1/plain"] = echo
    p, h = await start(make_proxy, up)
    body = gzip.compress(b'{"n": 3}')
    hz = {**h, "Content-Encoding": "gzip"}
    async with p.session.post(p.url + "/v1/echo", data=body, headers=hz) as r:
        assert r.status == 415
        assert (await r.json())["error"]["type"] == "unsupported_content_encoding"
    async with p.session.post(p.url + "/v1/plain", data=body, headers=hz) as r:
        # not read: passed through still compressed (the upstream decoded it)
        assert r.status == 200 and await r.read() == b'{"n": 3}'
    assert up.seen[0][1]["Content-Encoding"] == "gzip" and up.seen[0][1]["Content-Length"] \
        == str(len(body))
    async with p.session.post(p.url + "/v1/echo", data=b'{"n": 3}', headers=h) as r:
        assert r.status == 200
    assert [s[0] for s in up.seen] == ["/v1/plain", "/v1/echo"]
    assert p.ledger_totals() == {("c", "units"): 4 * Q}


@pytest.mark.parametrize("encodings", [("identity", "gzip"), ("identity, gzip",),
                                       (" gzip ",)])
async def test_every_content_encoding_of_a_read_request_body_is_checked(
        make_proxy: ProxyFactory, up: Upstream, encodings: tuple[str, ...]) -> None:
    """A compressed body hidden behind a first ``Content-Encoding: identity`` (a second header
    line, or a list) is refused too: the upstream decodes it, the proxy could not read it and
    would bill the fallback instead of the tokens used."""
    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    up.routes["/v1/echo"] = echo
    p, h = await start(make_proxy, up)
    hz = [*h.items(), *(("Content-Encoding", e) for e in encodings)]
    async with p.session.post(p.url + "/v1/echo", data=gzip.compress(b'{"n": 3}'),
                              headers=hz) as r:
        assert r.status == 415
        assert (await r.json())["error"]["type"] == "unsupported_content_encoding"
    assert up.seen == []


@pytest.mark.parametrize("pad", [0, 100_000])      # the small-body path, and streamed
async def test_usage_chunk_removed_from_a_sized_stream(make_proxy: ProxyFactory, up: Upstream,
                                                       pad: int) -> None:
    events = chat_events()
    events.insert(0, b": " + b"p" * pad + b"\n\n" if pad else b"")
    body = b"".join(events)

    async def sized(request: web.Request) -> web.Response:     # Content-Length, not chunked
        return web.Response(body=body, headers={"Content-Type": "text/event-stream"})

    up.routes["/v1/chat/completions"] = sized
    p, h = await start(make_proxy, up)
    async with p.session.post(p.url + "/v1/chat/completions", data=b'{"stream": true}',
                              headers=h) as r:
        got = await r.read()
        length = r.headers.get("Content-Length")
    want = b"".join(e for e in events if b'"choices":[]' not in e)
    assert got == want and len(want) == len(body) - len(events[4])
    assert length == (str(len(want)) if not pad else None)      # large: sent chunked
    assert orjson.loads(up.seen[0][2])["stream_options"] == {"include_usage": True}
    assert p.ledger_totals() == {("c", "llm_tokens"): 321 * Q}


async def test_stripped_stream_still_holds_its_end_for_the_commit(
        make_proxy: ProxyFactory, up: Upstream, tmp_path: Path) -> None:
    """strict: with the usage chunk removed, the stream's end is still released only after
    its row is committed; a commit that fails closes the connection without a clean end."""
    async def sse(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for e in chat_events():
            await resp.write(e)
        await resp.write_eof()
        return resp

    up.routes["/v1/chat/completions"] = sse
    p, h = await start(make_proxy, up)
    store = p.server.rt.store
    store.conn.execute("PRAGMA busy_timeout=50")
    blocker = sqlite3.connect(str(tmp_path / "meter.db"), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")      # commits fail: "database is locked"
    try:
        async with p.session.post(p.url + "/v1/chat/completions", data=b'{"stream": true}',
                                  headers=h) as r:
            assert r.status == 200
            got = b""
            with pytest.raises(aiohttp.ClientPayloadError):
                async for chunk in r.content.iter_any():
                    got += chunk
        events = chat_events()
        assert got == b"".join(events[:3]) + events[4]   # everything but the usage chunk
    finally:                                            # ... and the end: it never came
        blocker.execute("ROLLBACK")
        blocker.close()


# ---------------------------------------------------------------- the presets' usage shapes


def sse_events(events: list[tuple[str, dict[str, Any]]]) -> list[bytes]:
    return [f"event: {name}\n".encode() + b"data: " + orjson.dumps(data) + b"\n\n"
            for name, data in events]


async def send_events(request: web.Request, events: list[bytes]) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for e in events:
        await resp.write(e)
    await resp.write_eof()
    return resp


def audit(p: Proxy) -> dict[str, tuple[int, str]]:
    """Each request's (quantity, flags), by request id."""
    with p.db() as db:
        return {rid: (q, flags) for rid, q, flags in db.execute(
            "SELECT request_id, quantity, flags FROM audit")}


# Anthropic's usage: ``input_tokens`` counts only the tokens after the last cache breakpoint;
# the prompt cache's tokens are reported apart (written, read), and are billed by Anthropic
ANTHROPIC_USAGE = {
    "cached": {"input_tokens": 17, "cache_creation_input_tokens": 2_000,
               "cache_read_input_tokens": 100_000, "output_tokens": 40},
    "uncached": {"input_tokens": 17, "cache_creation_input_tokens": 0,
                 "cache_read_input_tokens": 0, "output_tokens": 40},
    "older-api": {"input_tokens": 17, "output_tokens": 40},        # no cache fields at all
}


def anthropic_events(usage: dict[str, int]) -> list[bytes]:
    start = {**usage, "output_tokens": 1}
    return sse_events([
        ("message_start", {"type": "message_start",
                           "message": {"id": "msg_1", "type": "message", "usage": start}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "Hello"}}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                           "usage": {"output_tokens": usage["output_tokens"]}}),
        ("message_stop", {"type": "message_stop"})])


@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_prompt_cache_tokens_are_billed(make_proxy: ProxyFactory, up: Upstream,
                                                        stream: bool) -> None:
    """``anthropic_messages`` bills input + cache creation + cache read + output tokens: a
    consumer whose 100k-token system prompt is read from the cache is billed for it (before,
    input + output alone: 57 tokens). An answer without the cache fields (older API versions)
    is billed input + output, read, not the fallback (estimate 1000)."""
    async def messages(request: web.Request) -> web.StreamResponse:
        usage = ANTHROPIC_USAGE[request.headers["X-Request-Id"]]
        if stream:
            return await send_events(request, anthropic_events(usage))
        return web.json_response({"id": "msg_1", "type": "message", "role": "assistant",
                                  "content": [{"type": "text", "text": "Hello"}],
                                  "stop_reason": "end_turn", "usage": usage})

    up.routes["/v1/messages"] = messages
    p, h = await start(make_proxy, up)
    for rid in ANTHROPIC_USAGE:
        async with p.session.post(p.url + "/v1/messages", json={"stream": stream},
                                  headers={**h, "X-Request-Id": rid}) as r:
            assert r.status == 200
            await r.read()
    assert audit(p) == {"cached": (102_057 * Q, ""), "uncached": (57 * Q, ""),
                        "older-api": (57 * Q, "")}


@pytest.mark.parametrize(("last", "extra"), [
    ("response.completed", {"status": "completed"}),
    ("response.incomplete", {"status": "incomplete",
                             "incomplete_details": {"reason": "max_output_tokens"}}),
    ("response.failed", {"status": "failed",
                         "error": {"code": "server_error", "message": "The model failed."}}),
])
async def test_openai_responses_stream_bills_the_usage_its_last_event_carries(
        make_proxy: ProxyFactory, up: Upstream, last: str, extra: dict[str, Any]) -> None:
    """A Responses stream ends in ``response.completed``, ``response.incomplete`` (the
    ``max_output_tokens`` reached, a content filter) or ``response.failed``; each carries
    ``response.usage``, and the tokens it counts are billed (before, only ``completed`` was
    read: the other two billed the fallback, here the estimate 1000)."""
    usage = {"input_tokens": 300, "output_tokens": 64, "total_tokens": 364}
    events = sse_events([
        ("response.created", {"type": "response.created",
                              "response": {"id": "resp_1", "status": "in_progress",
                                           "usage": None}}),
        ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "w"}),
        (last, {"type": last, "response": {"id": "resp_1", **extra, "usage": usage}})])

    async def responses(request: web.Request) -> web.StreamResponse:
        return await send_events(request, events)

    up.routes["/v1/responses"] = responses
    p, h = await start(make_proxy, up)
    async with p.session.post(p.url + "/v1/responses", json={"stream": True},
                              headers={**h, "X-Request-Id": "r1"}) as r:
        assert r.status == 200
        assert await r.read() == b"".join(events)
    assert audit(p) == {"r1": (364 * Q, "")}


def lax_bool(value: object) -> bool | None:
    """What pydantic's lax mode makes of a ``bool`` field (vLLM's and SGLang's request models,
    FastAPI's): None when it refuses the value (the request is answered 422)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("0", "off", "f", "false", "n", "no"):
        return False
    if isinstance(value, str) and value.lower() in ("1", "on", "t", "true", "y", "yes"):
        return True
    return None


STREAM_VALUES = [b"true", b"1", b"1.0", b'"true"', b'"True"', b'"1"', b'"yes"', b'"on"',
                 b'"false"', b'"0"', b'"no"', b"0", b"0.0", b"-0", b"false", b"null", b'""']


@pytest.mark.parametrize("reads", ["pydantic", "truthiness"])
async def test_a_stream_asked_for_loosely_still_reports_its_usage(
        make_proxy: ProxyFactory, up: Upstream, reads: str) -> None:
    """An OpenAI-compatible upstream that reads ``"stream"`` loosely streams for more than
    ``true``: pydantic's lax mode (vLLM, SGLang) for 1, 1.0, "true", "1", "yes"...; a
    handler testing the value's truth (``if body.get("stream")``) for any non-empty string,
    "false" and "0" included. Each such request gets ``include_usage`` and is billed its
    tokens (before, only ``true`` did: the others streamed without usage and billed the
    estimate, 1000). A request no such upstream streams (false, null, 0, "") is forwarded as
    sent, so vLLM's check (``stream_options`` refused, 400, when the raw ``stream`` is falsy)
    never turns it into an error."""
    async def chat(request: web.Request) -> web.StreamResponse:
        doc = orjson.loads(await request.read())
        raw = doc.get("stream")
        if doc.get("stream_options") and not raw:
            return web.json_response({"error": "Stream options can only be defined when "
                                               "`stream=True`."}, status=400)
        streams = lax_bool(raw) if reads == "pydantic" and raw is not None else bool(raw)
        if streams is None:
            return web.json_response({"error": "stream: not a valid boolean"}, status=422)
        if not streams:
            return web.Response(body=JSON_BODY, content_type="application/json")
        so = doc.get("stream_options")
        usage = isinstance(so, dict) and so.get("include_usage") is True
        return await send_events(request, chat_events(with_usage=usage))

    up.routes["/v1/chat/completions"] = chat
    p, h = await start(make_proxy, up)
    answered: dict[str, int] = {}
    for value in STREAM_VALUES:
        body = b'{"model": "m", "stream": ' + value + b"}"
        async with p.session.post(p.url + "/v1/chat/completions", data=body,
                                  headers={**h, "X-Request-Id": value.decode()}) as r:
            answered[value.decode()] = r.status
            got = await r.read()
        assert b'"choices":[]' not in got          # the usage chunk the client did not ask for
        sent = up.seen[-1][2]
        streams = lax_bool(orjson.loads(value)) if reads == "pydantic" else bool(
            orjson.loads(value))
        if not orjson.loads(value):                 # no upstream streams it: left as sent
            assert sent == body, sent
        elif streams:
            assert orjson.loads(sent)["stream_options"] == {"include_usage": True}, sent
    refused = {'""'} if reads == "pydantic" else set()
    assert answered == {v.decode(): 422 if v.decode() in refused else 200
                        for v in STREAM_VALUES}
    assert audit(p) == {v.decode(): (321 * Q, "") for v in STREAM_VALUES
                        if v.decode() not in refused}
