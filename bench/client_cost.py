"""CPU per request of the upstream client alone: proxy.upstream's pool vs a tuned aiohttp
ClientSession (no auto-decompress, one read timeout), N sequential GETs of the bench origin's
/small on uvloop, process CPU time (so a busy machine slows it less than wall clock).
Both send the same request head (aiohttp adds `Accept: */*`, so the pool is given it).

usage: python bench/origin.py PORT & python bench/client_cost.py http://127.0.0.1:PORT [N]
"""

from __future__ import annotations

import sys
import time

import aiohttp
import uvloop

from proxy.upstream import UpstreamPool


async def main(url: str, n: int) -> None:
    pool = UpstreamPool(url)
    head = [("Accept", "*/*")]
    for _ in range(200):
        r = await pool.request("GET", "/small", head)
        await r.read()
        r.release()
    t = time.process_time()
    for _ in range(n):
        r = await pool.request("GET", "/small", head)
        await r.read()
        r.release()
    pool_us = (time.process_time() - t) / n * 1e6
    await pool.close()
    async with aiohttp.ClientSession(
            auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None, sock_read=60),
            skip_auto_headers=("User-Agent", "Accept-Encoding")) as s:
        for _ in range(200):
            async with s.get(url + "/small") as resp:
                await resp.read()
        t = time.process_time()
        for _ in range(n):
            async with s.get(url + "/small") as resp:
                await resp.read()
        aio_us = (time.process_time() - t) / n * 1e6
    print(f"CPU per sequential GET /small ({n}): proxy.upstream {pool_us:.1f} us, "
          f"aiohttp ClientSession {aio_us:.1f} us ({aio_us / pool_us:.1f}x)")


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 5000))
