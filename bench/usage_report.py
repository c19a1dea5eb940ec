"""How fast the consumer usage report and page are for a busy customer.

    .venv/bin/python bench/usage_report.py [--days 90] [--runs 20]

Seeds one customer with a usage row for every minute of ``--days`` days on three meters (the
worst case: the ledger keeps one aggregate row per customer, key, meter and minute), starts
a real proxy on loopback with ``rules/example.yaml``, and times ``GET /_meter/usage`` (the
report the page renders) and ``GET /_meter/`` (the page itself): median and max of
``--runs`` calls, plus the sizes in bytes. Cold path: nothing here runs per proxied request.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy import config as config_mod  # noqa: E402
from proxy.app import start  # noqa: E402
from proxy.demo.upstream import build_app  # noqa: E402
from tests.conftest import ADMIN_TOKEN, write_config  # noqa: E402
from tests.servers import serve  # noqa: E402

Q = 1_000_000
METERS = ("api_calls", "llm_tokens", "gb_processed")


def seed(db: Path, cid: str, days: int, now: int) -> int:
    with sqlite3.connect(db) as c:
        (key_id,) = c.execute("SELECT key_id FROM api_keys WHERE customer_id=?",
                              (cid,)).fetchone()
        first = (now - days * 86400) // 60 * 60
        rows = [(cid, key_id, m, minute, "seed", (i % 7 + 1) * Q, 1, (i % 7 + 1) * Q, 0,
                 (i % 7 + 1) * Q)
                for i, minute in enumerate(range(first, now - 60, 60)) for m in METERS]
        c.executemany("INSERT INTO usage_minute (customer_id, key_id, meter, minute,"
                      " rules_version, quantity, requests, billable, covered, reported)"
                      " VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
        return len(rows)


async def timed(s: aiohttp.ClientSession, url: str, h: dict[str, str],
                runs: int) -> tuple[list[float], int]:
    times, size = [], 0
    for _ in range(runs):
        t0 = time.perf_counter()
        async with s.get(url, headers=h) as r:
            body = await r.read()
            assert r.status == 200, body[:200]
        times.append((time.perf_counter() - t0) * 1000)
        size = len(body)
    return times, size


async def main(days: int, runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with serve(build_app()) as upstream:
            path = write_config(Path(tmp), upstream,
                                (ROOT / "rules" / "example.yaml").read_text())
            server = await start(config_mod.load(path))
            try:
                url = f"http://127.0.0.1:{server.public_port}"
                admin = f"http://127.0.0.1:{server.admin_port}"
                ah = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
                async with aiohttp.ClientSession() as s:
                    async with s.post(admin + "/admin/customers", json={"id": "busy"},
                                      headers=ah) as r:
                        assert r.status in (200, 201)
                    async with s.post(admin + "/admin/customers/busy/keys",
                                      json={"name": "b"}, headers=ah) as r:
                        key = (await r.json())["key"]
                    server.rt.store.materialize()
                    n = seed(Path(tmp) / "meter.db", "busy", days, int(time.time()))
                    h = {"Authorization": f"Bearer {key}"}
                    await timed(s, url + "/_meter/usage", h, 2)           # warm the cache
                    report, rsize = await timed(s, url + "/_meter/usage", h, runs)
                    page, psize = await timed(s, url + "/_meter/", {}, runs)
            finally:
                await server.shutdown()
    print(f"{n} usage_minute rows ({days} days x {len(METERS)} meters, one per minute)")
    print(f"GET /_meter/usage: median {statistics.median(report):.1f} ms, "
          f"max {max(report):.1f} ms, {rsize} bytes")
    print(f"GET /_meter/:      median {statistics.median(page):.2f} ms, "
          f"max {max(page):.2f} ms, {psize} bytes")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--days", type=int, default=90)
    ap.add_argument("--runs", type=int, default=20)
    a = ap.parse_args()
    asyncio.run(main(a.days, a.runs))
