"""The baseline: a bare aiohttp pass-through proxy on uvloop, no metering.

One ClientSession with a keep-alive pool; the body is streamed back chunk by chunk.
Usage: python bench/bare_proxy.py PORT UPSTREAM_URL   (PORT 0: a free port; either way it
prints ``listening on 127.0.0.1:<port>`` once it listens: bench/run.py ``announced_port``)
"""

from __future__ import annotations

import socket
import sys

import aiohttp
import uvloop
from aiohttp import web
from multidict import CIMultiDict

HOP = frozenset(("connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                 "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length"))


def build_app(upstream: str) -> web.Application:
    app = web.Application()

    async def on_startup(app: web.Application) -> None:
        app["session"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256), auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            cookie_jar=aiohttp.DummyCookieJar())

    async def on_cleanup(app: web.Application) -> None:
        await app["session"].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        headers = CIMultiDict((k, v) for k, v in request.headers.items()
                              if k.lower() not in HOP)
        data = request.content if request.body_exists else None
        async with app["session"].request(request.method, upstream + request.path_qs,
                                          headers=headers, data=data,
                                          allow_redirects=False) as up:
            out = CIMultiDict((k, v) for k, v in up.headers.items() if k.lower() not in HOP)
            resp = web.StreamResponse(status=up.status, headers=out)
            if up.content_length is not None:
                resp.content_length = up.content_length
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


if __name__ == "__main__":
    upstream = sys.argv[2].rstrip("/")
    sock = socket.create_server(("127.0.0.1", int(sys.argv[1])), backlog=1024)
    print(f"listening on 127.0.0.1:{sock.getsockname()[1]}", flush=True)
    uvloop.install()
    web.run_app(build_app(upstream), sock=sock, access_log=None, print=None, backlog=1024)
