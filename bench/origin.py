"""Minimal fast origin for the benchmark (aiohttp on uvloop).

  GET /small  216-byte JSON
  GET /64k    65536-byte body (application/octet-stream)
  GET /sse    20-chunk text/event-stream, last event carries usage.total_tokens=42

Usage: python bench/origin.py PORT [--with-load]  (PORT 0: a free port; either way it
prints ``listening on 127.0.0.1:<port>`` once it listens: bench/run.py ``announced_port``)

``--with-load`` adds ``POST /_bench/load``: it runs bench/openloop.py's generator INSIDE this
process (JSON body: port, path, header, rate or sequential, duration, conns, stalls) and answers
with its JSON figures. bench/latency.py uses it so that the load generator and the origin
share one event loop on their CPU instead of two processes time-sliced by the kernel on it:
two busy processes on one CPU wait for each other's scheduler slice (milliseconds), which
made the harness alone (generator -> origin, no proxy) 3.6-4.2 ms at p99 at the rates of
the half-maximum runs; in one process it is 0.09-0.12 ms (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

import uvloop
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
import openloop  # bench/ is not a package: its directory on the path

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


async def load(request: web.Request) -> web.Response:
    """Run the open-loop generator in this process against ``port`` (the proxy under test)."""
    body = await request.json()
    a = argparse.Namespace(host="127.0.0.1", port=int(body["port"]), path=str(body["path"]),
                           rate=float(body.get("rate", 0.0)),
                           sequential=bool(body.get("sequential", False)),
                           duration=float(body["duration"]), conns=int(body.get("conns", 16)),
                           header=[str(h) for h in body.get("header", [])],
                           stalls=[str(f) for f in body.get("stalls", [])])
    return web.json_response(await openloop.main(a))


def build_app(with_load: bool = False) -> web.Application:
    app = web.Application()
    app.add_routes([web.get("/small", small), web.get("/64k", big), web.get("/sse", sse)])
    if with_load:
        app.add_routes([web.post("/_bench/load", load)])
    return app


if __name__ == "__main__":
    sock = socket.create_server(("127.0.0.1", int(sys.argv[1])), backlog=1024)
    print(f"listening on 127.0.0.1:{sock.getsockname()[1]}", flush=True)
    uvloop.install()
    web.run_app(build_app("--with-load" in sys.argv[2:]), sock=sock, access_log=None,
                print=None, backlog=1024)
