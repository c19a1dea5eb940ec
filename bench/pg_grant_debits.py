"""What grant-level debits (proxy/store/postgres/grant_debits.py) cost a shipping batch: the
same batches (50 customers, two grants each) shipped with credits on every row (each row
allocated to grants, one credit entry per row, grants.used and the account kept by the
migration-6 trigger) and with no credits (nothing allocated), on the PostgreSQL at
127.0.0.1:5432. Alternating runs, so machine noise hits both.

    .venv/bin/python bench/pg_grant_debits.py [batches] [rows per batch] [runs]
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
import uuid

import asyncpg

from proxy.credits.ledger import GrantState
from proxy.store.postgres.ledger import PostgresCreditLedger
from proxy.store.postgres.pool import PgPool, PoolSettings
from proxy.store.postgres.shipping import LocalRow, ShipItem, Shipper
from proxy.store.protocols import NewGrant

BASE = os.environ.get("METERPROXY_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
CUSTOMERS = 50


def _rows(start: int, n: int, credits: int) -> list[LocalRow]:
    return [LocalRow(s, f"r{s}", 1_767_225_600_000 + s * 7, f"c{s % CUSTOMERS}", "k", "rule",
                     "v1", 200, (ShipItem("calls", 10**6, credits=credits),))
            for s in range(start, start + n)]


async def _run(batches: int, size: int, credits: int) -> float:
    name = f"mp_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(f"{BASE}/postgres")
    await admin.execute(f'CREATE DATABASE "{name}"')
    pool = PgPool(PoolSettings(dsn=f"{BASE}/{name}", size=2))
    try:
        await pool.open()
        async with pool.acquire() as c:
            await c.executemany("INSERT INTO customers(id, created_at, updated_at)"
                                " VALUES ($1, 0, 0)", [(f"c{i}",) for i in range(CUSTOMERS)])
        ledger = PostgresCreditLedger(pool)
        for i in range(CUSTOMERS):
            for g, prio in (("promo", 10), ("pack", 50)):
                await ledger.create_grant(NewGrant(GrantState(
                    f"{g}{i}", f"c{i}", 10**15, prio, None, 0, "admin")))
        shipper = Shipper(pool, "m1", batch_size=size)
        started = time.perf_counter()
        for b in range(batches):
            await shipper.ship(_rows(1 + b * size, size, credits))
        return time.perf_counter() - started
    finally:
        await pool.close()
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


async def main() -> None:
    batches = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    per: dict[str, list[float]] = {"no credits": [], "credits on every row": []}
    for _ in range(runs):
        for label, credits in (("no credits", 0), ("credits on every row", 10**6)):
            per[label].append(1000 * await _run(batches, size, credits) / batches)
    for label, ms in per.items():
        print(f"{label:21} {batches} batches x {size} rows, {runs} runs: ms per batch"
              f" median {statistics.median(ms):.1f} (runs: {', '.join(f'{m:.1f}' for m in ms)})")


if __name__ == "__main__":
    asyncio.run(main())
