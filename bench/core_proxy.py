"""The "core" variant: a minimal pass-through proxy on aiohttp's low-level ``web.Server``
(no Application, no router) forwarding through proxy.upstream's keep-alive pool of asyncio
Protocols parsing with httptools, on uvloop. No metering: it measures the forwarding core
against bench/bare_proxy.py in the same run.

A body that has fully arrived with its head (small responses) is answered with one
``web.Response``; anything else is streamed chunk by chunk like the bare proxy.
Usage: python bench/core_proxy.py PORT UPSTREAM_URL   (PORT 0: a free port; it prints
``listening on 127.0.0.1:<port>`` once it listens)
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvloop
from aiohttp import web
from multidict import CIMultiDict

from proxy.errors import UpstreamError
from proxy.upstream import PoolConfig, UpstreamPool

HOP = frozenset(("connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                 "trailer", "trailers", "transfer-encoding", "upgrade", "content-length"))


def _no_host(headers: object) -> list[tuple[str, str]]:
    # like the bare proxy: the upstream gets its own Host (the pool drops hop-by-hop itself)
    return [(k, v) for k, v in headers.items() if k.lower() != "host"]  # type: ignore[attr-defined]


def make_handler(pool: UpstreamPool) -> web.Server:
    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        body = None
        if request.body_exists:
            body = request.content.iter_any()
            if request.version >= (1, 1) and \
                    request.headers.get("Expect", "").lower() == "100-continue":
                # what aiohttp's Application does (its router's expect handler); web.Server
                # does not. The upstream gets Expect too and answers its own 100 to the pool.
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            up = await pool.request(request.method, request.raw_path, _no_host(request.headers),
                                    body)
        except UpstreamError as exc:
            return web.Response(status=exc.status, text=f"{exc.type}: {exc}\n")
        try:
            out: CIMultiDict[str] = CIMultiDict()
            for k, v in up.headers:
                if k.lower() not in HOP:
                    out.add(k, v)
            status = up.status
            if request.method == "HEAD" or status in (204, 304):
                resp = web.StreamResponse(status=status, headers=out)
                if up.content_length is not None:
                    resp.content_length = up.content_length
                await resp.prepare(request)
                await resp.write_eof()
                return resp
            if up.complete and up.content_length is not None:
                return web.Response(status=status, headers=out, body=await up.read())
            resp = web.StreamResponse(status=status, headers=out)
            if up.content_length is not None:
                resp.content_length = up.content_length
            await resp.prepare(request)
            async for chunk in up:
                await resp.write(chunk)
            await resp.write_eof()
            return resp
        finally:
            up.release()

    return web.Server(handle, access_log=None)


async def main(port: int, upstream: str) -> None:
    loop = asyncio.get_running_loop()
    pool = UpstreamPool(upstream, PoolConfig(max_connections=256, max_per_host=256))
    server = make_handler(pool)
    srv = await loop.create_server(server, "127.0.0.1", port, backlog=1024)
    print(f"listening on 127.0.0.1:{srv.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    srv.close()
    await server.shutdown(1.0)
    await pool.close()


if __name__ == "__main__":
    uvloop.install()
    asyncio.run(main(int(sys.argv[1]), sys.argv[2].rstrip("/")))
