"""``PgPool.retrying`` on a real PostgreSQL: a deadlock (40P01) or a serialization failure
(40001) provoked by a second session is run again whole and commits exactly once; the
retries are counted in ``meterproxy_fleet_pg_conflicts_total``. (Retries spent: 503
``storage_unavailable`` on real member processes, tests/fleet/test_members_keys.py.)"""

from __future__ import annotations

import asyncio
import time

import asyncpg

from proxy.credits.ledger import GrantState
from proxy.store.postgres import leases
from proxy.store.postgres.shipping import LocalRow, ShipItem, Shipper
from proxy.store.postgres.storage import PostgresStorage
from proxy.store.protocols import NewGrant
from tests.store_pg.conftest import MemberFactory
from tests.store_pg.helpers import conflicts

C = 1_000_000


async def lock_waiters(watch: asyncpg.Connection, holder: asyncpg.Connection,
                       within: float = 10.0) -> None:
    """Return once a session waits for a lock ``holder``'s transaction holds (from the lock
    table: a wait that just ended is not counted; polled every 5 ms)."""
    deadline = time.monotonic() + within
    while not await watch.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
            holder.get_server_pid()):
        assert time.monotonic() < deadline, "nobody waits for the lock"
        await asyncio.sleep(0.005)


async def _balance(s: PostgresStorage, cid: str) -> int:
    async with s.pool.acquire() as c:
        return int(await c.fetchval("SELECT balance FROM credit_accounts WHERE customer_id=$1",
                                    cid))


async def test_a_deadlock_with_another_session_is_retried_and_commits_once(
        pg: PostgresStorage, pg_dsn: str) -> None:
    await pg.customers.upsert("acme", None, None, None)
    await pg.ledger.create_grant(NewGrant(GrantState("g1", "acme", 100 * C), "k1"))
    other = await asyncpg.connect(pg_dsn)
    watch = await asyncpg.connect(pg_dsn)
    retried, exhausted = conflicts("retried"), conflicts("exhausted")
    try:
        tx = other.transaction()
        await tx.start()
        # the other session must not be the one PostgreSQL picks to break the cycle
        await other.execute("SET LOCAL deadlock_timeout = '60s'")
        await other.execute("UPDATE credit_accounts SET balance = balance"
                            " WHERE customer_id = 'acme'")
        # create_grant: the customer row FOR KEY SHARE, the grant, then the account (waits)
        made = asyncio.ensure_future(pg.ledger.create_grant(
            NewGrant(GrantState("g2", "acme", 5 * C), "k2")))
        await lock_waiters(watch, other)
        # closes the cycle: the member's backend detects it after its deadlock_timeout (1 s)
        await other.execute("SELECT 1 FROM customers WHERE id = 'acme' FOR UPDATE")
        await tx.commit()
        g, created = await asyncio.wait_for(made, 10)
    finally:
        await other.close()
        await watch.close()
    assert created and g.id == "g2"
    assert conflicts("retried") - retried == 1
    assert conflicts("exhausted") == exhausted
    # the rolled-back attempt left nothing: the grant and its deposit are there once
    assert await _balance(pg, "acme") == 105 * C
    async with pg.pool.acquire() as c:
        assert await c.fetchval("SELECT count(*) FROM grants WHERE customer_id='acme'") == 2


async def test_a_serialization_failure_while_shipping_is_retried_and_settles_once(
        member: MemberFactory, pg_dsn: str) -> None:
    """With ``default_transaction_isolation = 'repeatable read'`` on the database (an
    operator's setting), a batch whose settlement waits for an account row another session
    updates and commits fails with 40001; it is shipped again whole, and settled once."""
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute("SELECT 1")
        name = await admin.fetchval("SELECT current_database()")
        await admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_isolation'
                            " = 'repeatable read'")
    finally:
        await admin.close()
    pg = await member()          # its connections start with the database's new default
    async with pg.pool.acquire() as c:
        await c.execute("INSERT INTO customers(id, created_at, updated_at) VALUES"
                        " ('acme', 0, 0)")
        await leases.deposit(c, "acme", 100 * C)
        assert await c.fetchval("SHOW transaction_isolation") == "repeatable read"
    rows = [LocalRow(i, f"r{i}", 1000 + i, "acme", "k", "chat", "v1", 200,
                     (ShipItem("llm_tokens", 7 * C, credits=C, billable=7 * C),))
            for i in range(1, 4)]
    other = await asyncpg.connect(pg_dsn)
    watch = await asyncpg.connect(pg_dsn)
    retried = conflicts("retried")
    try:
        tx = other.transaction()
        await tx.start()
        await other.execute("UPDATE credit_accounts SET balance = balance + 1"
                            " WHERE customer_id = 'acme'")
        shipped = asyncio.ensure_future(Shipper(pg.pool, "m1").ship(rows))
        await lock_waiters(watch, other)  # the settlement waits for the account row
        await tx.commit()                # ... which changed under its snapshot: 40001
        done = await asyncio.wait_for(shipped, 10)
    finally:
        await other.close()
        await watch.close()
    assert (done.rows, done.inserted, done.watermark) == (3, 3, 3)
    assert conflicts("retried") - retried == 1
    async with pg.pool.acquire() as c:
        acct = await leases.account(c, "acme")
        assert await c.fetchval("SELECT count(*) FROM usage_ledger") == 3
        assert await c.fetchval("SELECT last_shipped_seq FROM members WHERE id='m1'") == 3
    assert (acct.balance, acct.settled, acct.escrowed) == (100 * C + 1, 3 * C, 0)
