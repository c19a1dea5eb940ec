"""Client for bench/instructions.sh: N GET requests from 16 concurrent connections.

usage: python bench/cg_client.py URL N KEY
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import aiohttp


async def main(url: str, n: int, key: str, conc: int = 16) -> None:
    h = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc)) as s:
        # wait until the proxy under valgrind answers: its start-up alone can take many
        # minutes on a loaded machine; never send the measured requests before it is up
        deadline = time.monotonic() + float(os.environ.get("CG_WAIT", "3600"))
        while True:
            try:
                async with s.get(url, headers=h) as r:
                    await r.read()
                    break
            except aiohttp.ClientError:
                if time.monotonic() > deadline:
                    sys.exit("the proxy under test never answered")
                await asyncio.sleep(0.2)
        left = n

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                async with s.get(url, headers=h) as r:
                    await r.read()
                    assert r.status == 200, r.status

        t = time.time()
        await asyncio.gather(*(worker() for _ in range(conc)))
        print(f"{n} requests in {time.time() - t:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
