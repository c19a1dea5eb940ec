"""An example upstream API: the demo's guarded service, and the tests' and benchmark's.

Endpoints (knobs are query parameters so a test can shape any answer):
  GET  /healthz
  GET  /v1/items[?status=N&delay_ms=N&size=N]   JSON (size pads the body to N bytes)
  POST /v1/echo                                   echoes the request body
  POST /v1/chat/completions                       OpenAI-style; {"stream": true} -> SSE
  POST /v1/messages                               Anthropic-style; {"stream": true} -> SSE
  POST /v1/responses                              OpenAI Responses-style; {"stream": true} -> SSE
  POST /v1/models/{model}/infer                   JSON
  GET  /v1/stream?chunks=N&chunk_delay_ms=N&die_after=N   SSE counting events
  GET  /ws                                         WebSocket echo
Token counts: ``prompt_tokens`` / ``completion_tokens`` in the JSON body (default 12 / 30).
``?die_after=K`` on a stream closes the connection abruptly after K events.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import orjson
from aiohttp import web


def _int(request: web.Request, name: str, default: int) -> int:
    try:
        return int(request.query.get(name, default))
    except ValueError:
        return default


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        data = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        data = {}
    return data if isinstance(data, dict) else {}


async def _delay(request: web.Request) -> None:
    d = _int(request, "delay_ms", 0)
    if d:
        await asyncio.sleep(d / 1000)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def items(request: web.Request) -> web.Response:
    await _delay(request)
    status = _int(request, "status", 200)
    size = _int(request, "size", 0)
    body: dict[str, Any] = {"items": [{"id": 1, "name": "widget"}, {"id": 2, "name": "gadget"}]}
    raw = orjson.dumps(body)
    if size > len(raw):
        body["pad"] = "x" * (size - len(raw) - 10)
        raw = orjson.dumps(body)
    return web.Response(status=status, body=raw, content_type="application/json")


async def echo(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": request.content_type})
    await resp.prepare(request)
    async for chunk in request.content.iter_any():
        await resp.write(chunk)
    await resp.write_eof()
    return resp


async def _sse(request: web.Request, events: list[tuple[str | None, Any]]) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)
    gap = _int(request, "chunk_delay_ms", 0)
    die_after = _int(request, "die_after", -1)
    for i, (event, data) in enumerate(events):
        if i == die_after:
            assert request.transport is not None
            request.transport.abort()
            return resp
        head = f"event: {event}\n" if event else ""
        payload = data if isinstance(data, str) else orjson.dumps(data).decode()
        await resp.write(f"{head}data: {payload}\n\n".encode())
        if gap:
            await asyncio.sleep(gap / 1000)
    await resp.write_eof()
    return resp


def _tokens(body: dict[str, Any]) -> tuple[int, int]:
    return int(body.get("prompt_tokens", 12)), int(body.get("completion_tokens", 30))


async def chat(request: web.Request) -> web.StreamResponse:
    body = await _json_body(request)
    await _delay(request)
    p, c = _tokens(body)
    usage = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
    if not body.get("stream"):
        return web.json_response({"id": "chatcmpl-1", "object": "chat.completion",
                                  "choices": [{"message": {"role": "assistant",
                                                           "content": "Hello!"}}],
                                  "usage": usage})
    words = max(1, _int(request, "chunks", 5))
    # as OpenAI does: usage only when asked for (stream_options.include_usage), then as
    # "usage": null on every chunk and one last chunk with no choices that carries it
    so = body.get("stream_options")
    with_usage = isinstance(so, dict) and so.get("include_usage") is True
    events: list[tuple[str | None, Any]] = [
        (None, {"id": "chatcmpl-1", "choices": [{"delta": {"content": f"w{i} "}}],
                **({"usage": None} if with_usage else {})})
        for i in range(words)]
    if with_usage:
        events.append((None, {"id": "chatcmpl-1", "choices": [], "usage": usage}))
    events.append((None, "[DONE]"))
    return await _sse(request, events)


async def messages(request: web.Request) -> web.StreamResponse:
    body = await _json_body(request)
    await _delay(request)
    p, c = _tokens(body)
    if not body.get("stream"):
        return web.json_response({"id": "msg_1", "type": "message",
                                  "content": [{"type": "text", "text": "Hello!"}],
                                  "usage": {"input_tokens": p, "output_tokens": c}})
    words = max(1, _int(request, "chunks", 5))
    events: list[tuple[str | None, Any]] = [
        ("message_start", {"type": "message_start",
                           "message": {"id": "msg_1", "usage": {"input_tokens": p,
                                                                "output_tokens": 1}}})]
    for i in range(words):
        events.append(("content_block_delta", {"type": "content_block_delta",
                                               "delta": {"type": "text_delta", "text": f"w{i}"}}))
        # cumulative output tokens so far, as Anthropic reports them
        events.append(("message_delta", {"type": "message_delta",
                                         "usage": {"output_tokens": c * (i + 1) // words}}))
    events.append(("message_stop", {"type": "message_stop"}))
    return await _sse(request, events)


async def responses(request: web.Request) -> web.StreamResponse:
    body = await _json_body(request)
    await _delay(request)
    p, c = _tokens(body)
    usage = {"input_tokens": p, "output_tokens": c, "total_tokens": p + c}
    if not body.get("stream"):
        return web.json_response({"id": "resp_1", "object": "response", "usage": usage})
    events: list[tuple[str | None, Any]] = [
        ("response.created", {"type": "response.created", "response": {"id": "resp_1"}}),
        ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "Hi"}),
        ("response.completed", {"type": "response.completed",
                                "response": {"id": "resp_1", "usage": usage}})]
    return await _sse(request, events)


async def infer(request: web.Request) -> web.Response:
    await _json_body(request)
    await _delay(request)
    return web.json_response({"model": request.match_info["model"], "output": [0.1, 0.2]})


async def stream(request: web.Request) -> web.StreamResponse:
    n = _int(request, "chunks", 10)
    return await _sse(request, [(None, {"i": i, "units": i + 1}) for i in range(n)])


async def ws(request: web.Request) -> web.WebSocketResponse:
    sock = web.WebSocketResponse()
    await sock.prepare(request)
    async for msg in sock:
        if msg.type == web.WSMsgType.TEXT:
            await sock.send_str("echo:" + msg.data)
    return sock


def build_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.add_routes([
        web.get("/healthz", healthz),
        web.get("/v1/items", items),
        web.post("/v1/items", items),
        web.post("/v1/echo", echo),
        web.post("/v1/upload", echo),
        web.post("/v1/chat/completions", chat),
        web.post("/v1/messages", messages),
        web.post("/v1/responses", responses),
        web.post("/v1/models/{model}/infer", infer),
        web.get("/v1/stream", stream),
        web.get("/ws", ws),
    ])
    return app


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 9000
    web.run_app(build_app(), host="127.0.0.1", port=port, access_log=None)
