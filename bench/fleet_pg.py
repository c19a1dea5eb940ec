"""What one PostgreSQL carries for a fleet: lease grants, shipping batches and fenced flusher
transactions per second, each measured alone against a fresh database.

    .venv/bin/python bench/fleet_pg.py [--dsn postgresql://postgres@127.0.0.1:5432] [--seconds 5]

Creates a scratch database, 1,000 customers with large balances, then runs for ``--seconds``
each: ``--workers`` concurrent members taking leases (proxy.store.postgres.leases.LeaseStore.grant)
on random customers; members shipping 1,000-row batches (proxy.store.postgres.shipping.Shipper, with
lease settlement); a leader claiming and marking sent 100 outbox rows per fenced transaction
(proxy.store.postgres.leader). The database is dropped at the end. The client runs on the same machine
as the server, so both share its cores: treat the figures as a floor for a dedicated server.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable

import asyncpg

from proxy.fleet.sizing import LeasePolicy
from proxy.store.postgres import leases
from proxy.store.postgres.leader import Leadership, claim_outbox, mark_sent
from proxy.store.postgres.leases import LeaseStore
from proxy.store.postgres.pool import PgPool, PoolSettings
from proxy.store.postgres.shipping import LocalRow, ShipItem, Shipper

C = 1_000_000
CUSTOMERS = 1000


async def _for(seconds: float, workers: int, op: Callable[[int], Awaitable[int]]) -> tuple[int, int]:
    """Run ``op(worker)`` in a loop on each worker until time is up: (calls, units done)."""
    end = time.monotonic() + seconds
    calls = units = 0

    async def loop(w: int) -> None:
        nonlocal calls, units
        while time.monotonic() < end:
            done = await op(w)   # not `units += await ...`: that reads units before the await
            units += done
            calls += 1

    await asyncio.gather(*(loop(w) for w in range(workers)))
    return calls, units


async def bench(dsn: str, seconds: float, workers: int) -> None:
    pool = PgPool(PoolSettings(dsn=dsn, size=workers + 2))
    await pool.open()
    try:
        async with pool.acquire() as conn:
            await conn.executemany("INSERT INTO customers(id, created_at, updated_at) VALUES ($1, 0, 0)",
                                   [(f"c{i}",) for i in range(CUSTOMERS)])
            for i in range(CUSTOMERS):
                await leases.deposit(conn, f"c{i}", 10**9 * C)
        policy = LeasePolicy(floor=10 * C)
        stores = [LeaseStore(pool, f"m{w}", policy) for w in range(workers)]
        rng = random.Random(1)

        async def grant(w: int) -> int:
            await stores[w].grant(f"c{rng.randrange(CUSTOMERS)}", 0, C)
            return 1

        calls, _ = await _for(seconds, workers, grant)
        print(f"lease grants            {calls / seconds:9.0f} /s  ({workers} members)")

        shippers = [Shipper(pool, f"m{w}") for w in range(workers)]
        seqs = [0] * workers

        async def ship(w: int) -> int:
            rows = []
            for _ in range(1000):
                seqs[w] += 1
                rows.append(LocalRow(seqs[w], uuid.uuid4().hex, 0, f"c{rng.randrange(CUSTOMERS)}",
                                     "k", "r", "v", 200, (ShipItem("api_calls", C, credits=C),)))
            return (await shippers[w].ship(rows)).inserted

        calls, rows = await _for(seconds, workers, ship)
        print(f"shipping batches        {calls / seconds:9.1f} /s  of 1,000 rows "
              f"({rows / seconds:.0f} rows/s, {workers} members)")

        async with pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO outbox(identifier, customer_id, meter, event_name, value, "
                "window_start, timestamp, created_at) SELECT 'mp_b_' || g, 'c1', 'api_calls', "
                "'api_calls', 1, 0, 0, 0 FROM generate_series(1, 200000) g")
        lead = Leadership(pool, "flusher", "leader", ttl_ms=60_000)
        await lead.try_lead()

        async def flush(_w: int) -> int:
            ids = await claim_outbox(lead, 100, now=0.0)
            await mark_sent(lead, ids, 1, "bench")
            return len(ids)

        calls, sent = await _for(seconds, 1, flush)
        print(f"fenced flusher txns     {2 * calls / seconds:9.0f} /s  "
              f"(claim + mark sent of 100 rows: {sent / seconds:.0f} events/s)")
    finally:
        await pool.close()


async def main_async(base: str, seconds: float, workers: int) -> None:
    name = f"mp_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(f"{base}/postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            await bench(f"{base}/{name}", seconds, workers)
        finally:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432",
                    help="server URI without a database name")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()
    asyncio.run(main_async(args.dsn, args.seconds, args.workers))


if __name__ == "__main__":
    main()
