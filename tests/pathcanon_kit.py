"""Shared pieces for the request-target tests: a rule set shaped like the adversarial
review's (issue 9), an upstream that records the raw target it received per request id,
and a raw-socket HTTP/1.1 client (client libraries normalize targets; this one sends the
bytes it is given)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import orjson
from aiohttp import web

Q = 1_000_000

RULES = """\
version: 1
meters:
  api_calls: {stripe_event_name: api_calls}
  llm_tokens: {stripe_event_name: llm_tokens}
rules:
  - name: health
    match: {path: /healthz}
    auth: none
  - name: docs
    match: {path: "/docs/**"}
    auth: none
  - name: chat
    match: {methods: [POST], path: /v1/chat/completions}
    usage:
      - {meter: llm_tokens, preset: openai_chat, credits: 0.001, estimate: 1000}
  - name: premium
    match: {methods: [POST], path: /v1/models/premium-x/infer}
    usage:
      - {meter: api_calls, quantity: 1, credits: 10}
  - name: cafe
    match: {path: "/v1/caf\\u00e9"}
    usage:
      - {meter: api_calls, quantity: 1, credits: 3}
  - name: spaced
    match: {path: "/v1/a b"}
    usage:
      - {meter: api_calls, quantity: 1, credits: 4}
  - name: catch-all
    match: {path: "/**"}
    usage:
      - {meter: api_calls, quantity: 1, credits: 1}
"""

CHAT_TOKENS = 500           # what the upstream reports for /v1/chat/completions


class RecordingUpstream:
    """Records ``raw_path`` and its own decoded ``path`` per X-Request-Id. Answers the
    chat completion path (as it routes it) with a usage block, everything else with
    ``{"ok": true}``."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[str, str, str]] = {}    # rid -> (method, raw, path)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        rid = request.headers.get("X-Request-Id", "")
        self.seen[rid] = (request.method, request.raw_path, request.path)
        if request.headers.get("Upgrade", "").lower() == "websocket":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for msg in ws:
                await ws.send_str(f"{request.raw_path}:{msg.data}")
            return ws
        if request.path == "/v1/chat/completions":
            return web.json_response({"choices": [], "usage": {
                "prompt_tokens": 200, "completion_tokens": CHAT_TOKENS - 200,
                "total_tokens": CHAT_TOKENS}})
        return web.json_response({"ok": True})


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        return orjson.loads(self.body)


async def raw_request(port: int, method: bytes, target: bytes,
                      headers: list[tuple[bytes, bytes]] = (), body: bytes = b"",  # type: ignore[assignment]
                      timeout: float = 10.0) -> RawResponse:
    """One request on its own connection (``Connection: close``), the target byte for
    byte; reads until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = [method + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1",
                b"Connection: close", b"Content-Length: " + str(len(body)).encode()]
        head += [k + b": " + v for k, v in headers]
        writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()
    head_b, _, rest = data.partition(b"\r\n\r\n")
    lines = head_b.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    hdrs: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    if hdrs.get("transfer-encoding", "").lower() == "chunked":
        out = bytearray()
        while rest:
            size_s, _, rest = rest.partition(b"\r\n")
            size = int(size_s.split(b";")[0], 16)
            if size == 0:
                break
            out += rest[:size]
            rest = rest[size + 2:]
        rest = bytes(out)
    return RawResponse(status, hdrs, rest)
