"""kill -9 under load (strict durability): every response a client fully received is in the
ledger after restart, and nothing is counted twice."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import aiohttp

from proxy.store.db import Store
from tests.conftest import ADMIN_TOKEN, write_config
from tests.helpers import wait_until
from tests.proxy_process import ProxyProcess

ROOT = Path(__file__).resolve().parent.parent
PER_RUN = 300     # fully received responses before each kill


async def test_sigkill_under_load_loses_no_received_response(tmp_path: Path,
                                                            upstream: str) -> None:
    cfg = write_config(tmp_path, upstream,
                       storage={"durability": "strict", "commit_interval": "300ms"})
    proxy = ProxyProcess(cfg, tmp_path / "proxy.log")    # free ports, kept across restarts
    proxy.spawn()
    received: list[str] = []
    try:
        await proxy.wait_ready()
        admin = proxy.admin_url
        ah = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with aiohttp.ClientSession() as s:
            keys = []
            for i in range(4):
                await s.post(admin + "/admin/customers", json={"id": f"k{i}"}, headers=ah)
                async with s.post(admin + f"/admin/customers/k{i}/keys", headers=ah) as r:
                    keys.append((await r.json())["key"])

        stop = asyncio.Event()

        async def client(i: int) -> None:
            h = {"Authorization": f"Bearer {keys[i % 4]}"}
            paths = ["/v1/items", "/v1/stream?chunks=3"]
            async with aiohttp.ClientSession() as s:
                n = 0
                while not stop.is_set():
                    n += 1
                    try:
                        async with s.get(proxy.url + paths[n % 2], headers=h) as r:
                            await r.read()  # raises if the body is cut short
                            if r.status == 200:
                                received.append(r.headers["X-Request-Id"])
                    except (TimeoutError, aiohttp.ClientError):
                        await asyncio.sleep(0.01)

        async def received_at_least(n: int) -> None:
            # however slow the machine: wait (with a deadline) for n responses, then kill
            # under load -- the 16 clients keep requests in flight all the time
            await wait_until(lambda: len(received), ok=lambda got: got >= n, timeout=120,
                             interval=0.01, what=f"{n} responses")

        tasks = [asyncio.ensure_future(client(i)) for i in range(16)]
        await received_at_least(PER_RUN)
        proxy.kill()
        killed_at = len(received)
        proxy.spawn()
        await proxy.wait_ready()
        await received_at_least(killed_at + PER_RUN)
        proxy.kill()
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        proxy.ensure_dead()
    assert killed_at >= PER_RUN and len(received) >= killed_at + PER_RUN
    # the last run was killed too: its journaled rows are recovered when the file is opened
    with sqlite3.connect(tmp_path / "meter.db") as raw:
        (journaled,) = raw.execute("SELECT COUNT(*) FROM journal").fetchone()
    store = Store.open(tmp_path / "meter.db")
    store.close()
    db = sqlite3.connect(tmp_path / "meter.db")
    assert db.execute("SELECT COUNT(*) FROM journal").fetchone()[0] == 0
    print(f"rows recovered from the journal after the last kill: {journaled}")
    ids = [r[0] for r in db.execute("SELECT request_id FROM audit WHERE meter IN "
                                    "('api_calls', 'units')")]
    assert len(ids) == len(set(ids)), "a request was recorded twice"
    missing = set(received) - set(ids)
    assert not missing, f"{len(missing)} fully received responses are not in the ledger"
    # the minute aggregates agree with the audit rows, exactly
    agg = dict(db.execute("SELECT meter, SUM(quantity) FROM usage_minute GROUP BY meter"))
    aud = dict(db.execute("SELECT meter, SUM(quantity) FROM audit GROUP BY meter"))
    assert agg == aud
