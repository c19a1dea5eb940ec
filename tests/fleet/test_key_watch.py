"""Key propagation on a real PostgreSQL: a change made through one member reaches another
member's cache within the stated bound, also after its listener connection is killed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from proxy.store.postgres.key_watch import KeyCache, KeyWatcher
from tests.fleet.conftest import PoolFactory, add_customer

BOUND = 1.0   # seconds, docs/fleet.md


async def _within(bound: float, cond: Callable[[], bool]) -> float:
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < bound, "not seen within the bound"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def test_revoke_on_one_member_is_seen_by_another(open_pool: PoolFactory, pg_dsn: str) -> None:
    a, b = await open_pool(), await open_pool()
    await add_customer(a, "acme")
    cache = KeyCache()
    watcher = KeyWatcher(b, pg_dsn, cache, poll_interval=0.5)
    await watcher.start()
    try:
        async with a.acquire() as conn:
            await conn.execute("INSERT INTO api_keys(key_id, customer_id, hash, prefix, created_at) "
                               "VALUES ('k1', 'acme', 'h1', 'mp_', 0), ('k2', 'acme', 'h2', 'mp_', 0)")
        await _within(BOUND, lambda: cache.lookup("h1") is not None and cache.lookup("h2") is not None)
        async with a.acquire() as conn:
            await conn.execute("UPDATE api_keys SET revoked_at = 1 WHERE key_id = 'k1'")
        await _within(BOUND, lambda: cache.lookup("h1") is None)
        assert cache.lookup("h2") is not None
        # kill the listener's backend; the next change must still arrive within the bound
        listener = watcher.listener
        assert listener is not None
        pid = listener.get_server_pid()
        async with a.acquire() as conn:
            assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
            await conn.execute("UPDATE api_keys SET revoked_at = 2 WHERE key_id = 'k2'")
        await _within(BOUND, lambda: cache.lookup("h2") is None)
        # and the listener comes back
        await _within(2.0, lambda: watcher.listener is not None
                      and not watcher.listener.is_closed()
                      and watcher.listener.get_server_pid() != pid)
    finally:
        await watcher.stop()


async def test_start_loads_every_existing_key_page_by_page(open_pool: PoolFactory, pg_dsn: str) -> None:
    pool = await open_pool()
    await add_customer(pool, "acme")
    async with pool.acquire() as conn:
        await conn.executemany("INSERT INTO api_keys(key_id, customer_id, hash, prefix, created_at) "
                               "VALUES ($1, 'acme', $2, 'mp_', 0)",
                               [(f"k{i}", f"h{i}") for i in range(25)])
    cache = KeyCache()
    watcher = KeyWatcher(pool, pg_dsn, cache, page=10)
    await watcher.start()
    try:
        assert len(cache.by_hash) == 25 and cache.version == 25
    finally:
        await watcher.stop()
