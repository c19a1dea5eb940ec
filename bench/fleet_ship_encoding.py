"""What a shipping batch's encoding costs the PostgreSQL server: the 16 array parameters
shipping used before, one ``json`` parameter, one ``jsonb`` parameter (what it uses now).

    .venv/bin/python bench/fleet_ship_encoding.py [--dsn postgresql://postgres@127.0.0.1:5432]
                                                  [--reps 20]

On a scratch database (dropped at the end), one connection ships 1,000-row batches without
credits, the three encodings alternating; per batch it records the wall time and the CPU
of the connection's backend process (``/proc/<pid>/stat``: the server must run on this
host; 10 ms ticks). Medians, the first two repetitions left out (warm-up).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from pathlib import Path

import asyncpg

from proxy.store.postgres.pool import PgPool, PoolSettings
from proxy.store.postgres.shipping import _SHIP, Batch

ARRAYS = """
INSERT INTO usage_ledger (customer_id, member_id, seq, item, request_id, at_ms, key_id, rule,
    rules_version, status, method, path, meter, quantity, credits, billable, flags)
SELECT c, $1, s, i, r, a, k, ru, v, st, m, p, me, q, cr, b, f
FROM unnest($2::text[], $3::bigint[], $4::smallint[], $5::text[], $6::bigint[], $7::text[],
            $8::text[], $9::text[], $10::int[], $11::text[], $12::text[], $13::text[],
            $14::bigint[], $15::bigint[], $16::bigint[], $17::text[])
     AS x(c, s, i, r, a, k, ru, v, st, m, p, me, q, cr, b, f)
ON CONFLICT DO NOTHING
RETURNING customer_id, credits
"""
MEMBER = ("INSERT INTO members(id, last_shipped_seq) VALUES ($1, $2) ON CONFLICT (id) DO "
          "UPDATE SET last_shipped_seq = GREATEST(members.last_shipped_seq, $2), "
          "last_seen = now()")
JSON = _SHIP.replace("jsonb_array_elements($2::jsonb)", "json_array_elements($2::json)")


def cpu(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


async def bench(dsn: str, reps: int) -> None:
    pool = PgPool(PoolSettings(dsn=dsn, size=1))
    await pool.open()
    seq = 0
    res: dict[str, list[tuple[float, float]]] = {"arrays": [], "json": [], "jsonb": []}
    try:
        async with pool.acquire() as conn:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            for _ in range(reps):
                for kind in res:
                    items: list[tuple[object, ...]] = []
                    for _ in range(1000):
                        seq += 1
                        items.append((f"c{seq % 50}", seq, 0, uuid.uuid4().hex,
                                      1_767_225_600_000 + seq, "k", "rule", "v1", 200, "GET",
                                      "/v1/items", "api_calls", 1_000_000, 0, 1_000_000, ""))
                    c0, t0 = cpu(pid), time.perf_counter()
                    if kind == "arrays":
                        async with conn.transaction():
                            cols = [list(c) for c in zip(*items, strict=True)]
                            await conn.fetch(ARRAYS, "m1", *cols)
                            await conn.execute(MEMBER, "m1", seq)
                    else:
                        b = Batch.of_items(items, 1000, seq)
                        await conn.fetch(_SHIP if kind == "jsonb" else JSON, "m1", b.payload(),
                                         seq)
                    res[kind].append((time.perf_counter() - t0, cpu(pid) - c0))
    finally:
        await pool.close()
    for kind, v in res.items():
        print(f"{kind:7} wall {statistics.median(x[0] for x in v[2:]) * 1000:6.1f} ms   "
              f"server CPU {statistics.median(x[1] for x in v[2:]) * 1000:5.1f} ms per batch")


async def main_async(base: str, reps: int) -> None:
    name = f"mp_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(f"{base}/postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            await bench(f"{base}/{name}", reps)
        finally:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432")
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    asyncio.run(main_async(a.dsn, a.reps))


if __name__ == "__main__":
    main()
