"""The "floor" target: aiohttp's low-level ``web.Server`` answering a constant 216-byte JSON
body itself (the same handler shape as bench/core_proxy.py, no upstream), on uvloop. What
the core costs above it is the upstream pool plus the glue.
Usage: python bench/server_floor.py PORT [UPSTREAM_URL (ignored)]
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvloop
from aiohttp import web
from multidict import CIMultiDict

BODY = b'{"pad":"' + b"x" * 206 + b'"}'
assert len(BODY) == 216


async def handle(request: web.BaseRequest) -> web.StreamResponse:
    out: CIMultiDict[str] = CIMultiDict((("Content-Type", "application/json"),))
    return web.Response(status=200, headers=out, body=BODY)


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = web.Server(handle, access_log=None)
    srv = await loop.create_server(server, "127.0.0.1", port, backlog=1024)
    print(f"listening on 127.0.0.1:{srv.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    srv.close()
    await server.shutdown(1.0)


if __name__ == "__main__":
    uvloop.install()
    asyncio.run(main(int(sys.argv[1])))
