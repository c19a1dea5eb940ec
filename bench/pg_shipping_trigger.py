"""What the usage-minutes trigger (proxy/store/postgres/owners_schema.py) costs a shipping
batch: the same batches shipped into a database migrated without it (the fleet schema only)
and with it (ALL_MIGRATIONS), on the PostgreSQL at 127.0.0.1:5432.

    .venv/bin/python bench/pg_shipping_trigger.py [batches] [rows per batch]
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid

import asyncpg

from proxy.store.postgres.migrate import migrate
from proxy.store.postgres.owners_schema import ALL_MIGRATIONS
from proxy.store.postgres.pool import PgPool, PoolSettings
from proxy.store.postgres.schema import MIGRATIONS
from proxy.store.postgres.shipping import LocalRow, ShipItem, Shipper

BASE = os.environ.get("METERPROXY_TEST_PG", "postgresql://postgres@127.0.0.1:5432")


def _rows(start: int, n: int) -> list[LocalRow]:
    return [LocalRow(s, f"r{s}", 1_767_225_600_000 + s * 7, f"c{s % 50}", "k", "rule", "v1",
                     200, (ShipItem("tokens", 1234, billable=1234), ShipItem("calls", 10**6)))
            for s in range(start, start + n)]


async def _run(migrations: tuple[str, ...], batches: int, size: int) -> float:
    name = f"mp_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(f"{BASE}/postgres")
    await admin.execute(f'CREATE DATABASE "{name}"')
    pool = PgPool(PoolSettings(dsn=f"{BASE}/{name}", size=2))
    try:
        await pool.open(run_migrations=False)
        async with pool.acquire() as c:
            await migrate(c, migrations)
        shipper = Shipper(pool, "m1", batch_size=size)
        started = time.perf_counter()
        for b in range(batches):
            await shipper.ship(_rows(1 + b * size, size))
        return time.perf_counter() - started
    finally:
        await pool.close()
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


async def main() -> None:
    batches = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    for label, migrations in (("fleet schema only", MIGRATIONS), ("with the trigger", ALL_MIGRATIONS)):
        secs = await _run(migrations, batches, size)
        print(f"{label:18} {batches} batches x {size} rows: {secs:.2f} s,"
              f" {1000 * secs / batches:.1f} ms per batch")


if __name__ == "__main__":
    asyncio.run(main())
