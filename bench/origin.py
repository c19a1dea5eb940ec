"""Minimal fast origin for the benchmark (aiohttp on uvloop).

  GET /small  216-byte JSON
  GET /64k    65536-byte body (application/octet-stream)
  GET /sse    20-chunk text/event-stream, last event carries usage.total_tokens=42

Usage: python bench/origin.py PORT   (0: a free port; either way it prints
``listening on 127.0.0.1:<port>`` once it listens: bench/run.py ``announced_port``)
"""

from __future__ import annotations

import socket
import sys

import uvloop
from aiohttp import web

_prefix = b'{"id":"bench-small","object":"item","items":[{"id":1,"name":"widget"},{"id":2,"name":"gadget"}],"pad":"'
SMALL = _prefix + b"x" * (216 - len(_prefix) - 2) + b'"}'
assert len(SMALL) == 216
BIG = bytes(range(256)) * 256
assert len(BIG) == 65536
SSE_CHUNKS = [b'data: {"id":"c1","choices":[{"delta":{"content":"w%d "}}],"usage":null}\n\n' % i
              for i in range(19)] + [b'data: {"usage": {"total_tokens": 42}}\n\n']
assert len(SSE_CHUNKS) == 20


async def small(request: web.Request) -> web.Response:
    return web.Response(body=SMALL, content_type="application/json")


async def big(request: web.Request) -> web.Response:
    return web.Response(body=BIG, content_type="application/octet-stream")


async def sse(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)
    for chunk in SSE_CHUNKS:
        await resp.write(chunk)
    await resp.write_eof()
    return resp


def build_app() -> web.Application:
    app = web.Application()
    app.add_routes([web.get("/small", small), web.get("/64k", big), web.get("/sse", sse)])
    return app


if __name__ == "__main__":
    sock = socket.create_server(("127.0.0.1", int(sys.argv[1])), backlog=1024)
    print(f"listening on 127.0.0.1:{sock.getsockname()[1]}", flush=True)
    uvloop.install()
    web.run_app(build_app(), sock=sock, access_log=None, print=None, backlog=1024)
