import asyncio, sys, aiohttp, time
async def main(url, n, key, conc=16):
    h = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc)) as s:
        for _ in range(2000):
            try:
                async with s.get(url, headers=h) as r:
                    await r.read(); break
            except aiohttp.ClientError:
                await asyncio.sleep(0.2)
        q = asyncio.Queue()
        for i in range(n): q.put_nowait(i)
        async def worker():
            while not q.empty():
                q.get_nowait()
                async with s.get(url, headers=h) as r:
                    await r.read()
                    assert r.status == 200, r.status
        t = time.time()
        await asyncio.gather(*(worker() for _ in range(conc)))
        print(f"{n} requests in {time.time()-t:.1f}s", file=sys.stderr)
asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
