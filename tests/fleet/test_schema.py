"""The PostgreSQL schema: migrations apply once, concurrently safe, and mirror SQLite's tables."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import asyncpg
import pytest

from proxy.store.postgres.migrate import migrate, pending, schema_version
from proxy.store.postgres.owners_schema import ALL_MIGRATIONS as MIGRATIONS
from proxy.store.postgres.schema import MIGRATIONS as FLEET_MIGRATIONS
from proxy.store.schema import MIGRATIONS as SQLITE_MIGRATIONS

BEFORE_6 = len(FLEET_MIGRATIONS) + 4        # migrations 1-5: the fleet's list, owners 2-5
BEFORE_9 = len(FLEET_MIGRATIONS) + 7        # migrations 1-8
BEFORE_10 = BEFORE_9 + 1
BEFORE_11 = BEFORE_10 + 1
BEFORE_12 = BEFORE_11 + 1

FLEET_TABLES = {"credit_accounts", "credit_leases", "members", "usage_ledger", "dead_letters",
                "leader_leases", "meterproxy_schema"}
# SQLite tables a fleet keeps elsewhere: the per-member journal stays local; the audit is the
# usage ledger (one row per usage item, keyed by member and sequence); journal_seq is the
# local journal's high-water mark, journal_owner the member id its rows ship under
LOCAL_ONLY = {"journal", "journal_seq", "journal_owner", "audit"}


def test_pending_numbers_from_one_and_refuses_a_newer_database() -> None:
    assert pending(0, ("a", "b")) == [(1, "a"), (2, "b")]
    assert pending(1, ("a", "b")) == [(2, "b")]
    assert pending(2, ("a", "b")) == []
    with pytest.raises(RuntimeError, match="newer"):
        pending(3, ("a", "b"))


async def test_concurrent_migrations_apply_once(pg_dsn: str) -> None:
    conns = [await asyncpg.connect(pg_dsn) for _ in range(3)]
    try:
        before = await asyncio.gather(*(migrate(c) for c in conns))
        assert sorted(before) == [0, len(MIGRATIONS), len(MIGRATIONS)]
        assert await schema_version(conns[0]) == len(MIGRATIONS)
        assert await migrate(conns[1]) == len(MIGRATIONS)
    finally:
        for c in conns:
            await c.close()


async def test_every_sqlite_table_and_column_exists_in_postgres(pg_dsn: str, tmp_path: Path) -> None:
    lite = sqlite3.connect(tmp_path / "s.db")
    try:
        for script in SQLITE_MIGRATIONS:
            lite.executescript(script)
        tables = {r[0] for r in lite.execute("SELECT name FROM sqlite_master WHERE type='table'"
                                                " AND name NOT LIKE 'sqlite_%'")}
        sqlite_cols = {t: {r[1] for r in lite.execute(f"PRAGMA table_info({t})")} for t in tables}
    finally:
        lite.close()
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn)
        rows = await conn.fetch("SELECT table_name, column_name FROM information_schema.columns "
                                "WHERE table_schema = 'public'")
    finally:
        await conn.close()
    pg_cols: dict[str, set[str]] = {}
    for r in rows:
        pg_cols.setdefault(r["table_name"], set()).add(r["column_name"])
    for t in tables - LOCAL_ONLY:
        assert t in pg_cols, t
        assert sqlite_cols[t] <= pg_cols[t], (t, sqlite_cols[t] - pg_cols[t])
    assert set(pg_cols) >= FLEET_TABLES
    assert {"version"} <= pg_cols["api_keys"]
    assert {"claim_fence"} <= pg_cols["outbox"]


async def test_key_versions_increase_with_every_change(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn)
        await conn.execute("INSERT INTO customers(id, created_at, updated_at) VALUES ('c', 0, 0)")
        await conn.execute("INSERT INTO api_keys(key_id, customer_id, hash, prefix, created_at) "
                           "VALUES ('k1', 'c', 'h1', 'p', 0), ('k2', 'c', 'h2', 'p', 0)")
        first = await conn.fetch("SELECT version FROM api_keys ORDER BY key_id")
        await conn.execute("UPDATE api_keys SET revoked_at = 5 WHERE key_id = 'k1'")
        after = await conn.fetchval("SELECT version FROM api_keys WHERE key_id = 'k1'")
        assert [r[0] for r in first] == [1, 2]
        assert after == 3
    finally:
        await conn.close()


async def test_migration_6_backfills_grant_use_and_debt_from_existing_entries(pg_dsn: str) -> None:
    """A database with grants and entries from before migration 6: ``grants.used`` and
    ``credit_accounts.debt`` start from the entries already there, and the trigger keeps
    them from then on."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn, MIGRATIONS[:BEFORE_6])
        await conn.execute("INSERT INTO customers(id, created_at, updated_at) VALUES ('c', 0, 0)")
        await conn.execute("INSERT INTO credit_accounts(customer_id, balance, settled)"
                           " VALUES ('c', 30, 5)")
        await conn.execute("INSERT INTO grants(id, customer_id, amount, source, created_at)"
                           " VALUES ('g1', 'c', 10, 'admin', 0), ('g2', 'c', 20, 'admin', 0)")
        await conn.execute(
            "INSERT INTO credit_entries(customer_id, grant_id, kind, amount, at_ms) VALUES"
            " ('c', 'g1', 'debit', 4, 0), ('c', 'g1', 'expire', 6, 0), ('c', NULL, 'debt', 9, 0),"
            " ('c', 'g2', 'repay', 5, 0), ('c', 'g2', 'debit', 1, 0)")
        await migrate(conn, MIGRATIONS)
        used = dict(await conn.fetch("SELECT id, used FROM grants ORDER BY id"))
        assert used == {"g1": 10, "g2": 6}
        assert await conn.fetchval("SELECT debt FROM credit_accounts") == 4
        await conn.execute("INSERT INTO credit_entries(customer_id, grant_id, kind, amount,"
                           " at_ms) VALUES ('c', 'g2', 'debit', 3, 0), ('c', NULL, 'debt', 2, 0)")
        assert await conn.fetchval("SELECT used FROM grants WHERE id = 'g2'") == 9
        assert await conn.fetchval("SELECT debt FROM credit_accounts") == 6
    finally:
        await conn.close()


async def test_migration_6_gives_spending_kept_only_as_settled_to_the_grants(
        pg_dsn: str) -> None:
    """Before migration 6 a fleet kept its shipped spending only in
    ``credit_accounts.settled``: the backfill gives it to the grants in burn order (priority,
    earliest expiry, oldest), each up to what it has left, so a grant of 10 with 6 spent
    reads 4 left and its expiry takes 4, not 10 (which would charge the 6 spent again)."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn, MIGRATIONS[:BEFORE_6])
        await conn.execute("INSERT INTO customers(id, created_at, updated_at) VALUES"
                           " ('acme', 0, 0), ('zed', 0, 0)")
        await conn.execute(
            "INSERT INTO grants(id, customer_id, amount, priority, expires_at, source,"
            " created_at) VALUES ('late', 'acme', 10, 50, NULL, 'admin', 0),"
            " ('soon', 'acme', 10, 50, 100, 'admin', 5), ('first', 'acme', 3, 10, NULL,"
            " 'admin', 9), ('z', 'zed', 10, 50, NULL, 'admin', 0)")
        await conn.execute("INSERT INTO credit_accounts(customer_id, balance, settled) VALUES"
                           " ('acme', 23, 9), ('zed', 10, 30)")
        await migrate(conn, MIGRATIONS)
        used = dict(await conn.fetch("SELECT id, used FROM grants ORDER BY id"))
        # acme: 9 spent -> 3 from 'first' (priority 10), 6 from 'soon' (expires first)
        # zed: 30 spent beyond its one grant of 10 -> the grant is used up, no more
        assert used == {"first": 3, "soon": 6, "late": 0, "z": 10}
    finally:
        await conn.close()


async def test_migration_9_counts_debt_shipped_before_the_customers_account(
        pg_dsn: str) -> None:
    """Before ``leases.settle`` made a customer's account, usage shipped as debt for a
    customer without one (never granted, admitted offline) was counted neither in
    ``settled`` nor in ``debt``; a first grant made the account later (balance 50, debt 0).
    Migration 9 counts the 7 in both: the debt its grant repays, and settled (what leases
    can still escrow is what the grant holds once it has repaid: 43)."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn, MIGRATIONS[:BEFORE_9])
        await conn.execute("INSERT INTO customers(id, created_at, updated_at) VALUES"
                           " ('c', 0, 0), ('d', 0, 0)")
        await conn.execute("INSERT INTO credit_entries(customer_id, grant_id, kind, amount,"
                           " at_ms) VALUES ('c', NULL, 'debt', 7, 0), ('d', NULL, 'debt', 2, 0)")
        await conn.execute("INSERT INTO credit_accounts(customer_id, balance) VALUES ('c', 50)")
        await conn.execute("INSERT INTO grants(id, customer_id, amount, source, created_at)"
                           " VALUES ('g', 'c', 50, 'admin', 0)")
        assert await conn.fetchval("SELECT debt FROM credit_accounts") == 0
        await migrate(conn, MIGRATIONS)
        rows = {r[0]: tuple(r[1:]) for r in await conn.fetch(
            "SELECT customer_id, balance, settled, debt FROM credit_accounts")}
        assert rows == {"c": (50, 7, 7), "d": (0, 2, 2)}
    finally:
        await conn.close()


async def test_migration_10_keeps_true_ups_and_lets_one_be_sending(pg_dsn: str) -> None:
    """A true-up's parameters are frozen before its invoice item is created (``sending``,
    with its Stripe customer): the rows written before stay as they were."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn, MIGRATIONS[:BEFORE_10])
        await conn.execute("INSERT INTO trueups VALUES ('c', 100, 200, 1000, 400, 600, 'usd',"
                           " 'sent', 'ii_1', 7)")
        await migrate(conn, MIGRATIONS)
        assert [tuple(r) for r in await conn.fetch(
            "SELECT customer_id, status, invoice_item, stripe_customer_id FROM trueups")] == [
            ("c", "sent", "ii_1", None)]
        await conn.execute("INSERT INTO trueups VALUES ('c', 200, 300, 1000, 400, 600, 'usd',"
                           " 'sending', NULL, 8, 'cus_c')")
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("INSERT INTO trueups VALUES ('c', 300, 400, 1000, 400, 600,"
                               " 'usd', 'pending', NULL, 9, 'cus_c')")
    finally:
        await conn.close()


async def test_migration_11_dates_rows_attempted_before_it_from_their_creation(pg_dsn: str) -> None:
    """``outbox.first_attempt_at`` (the flusher's resend horizon counts from it): a row an
    older version attempted gets its creation time, one never attempted none."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn, MIGRATIONS[:BEFORE_11])
        for oid, attempts in ((1, 3), (2, 0)):
            await conn.execute(
                "INSERT INTO outbox(id, identifier, customer_id, meter, event_name, value,"
                " window_start, timestamp, created_at, attempts) VALUES"
                " ($1, $2, 'c', 'm', 'm', 1, 0, 0, $3, $4)", oid, f"mp_{oid}", 1000 + oid, attempts)
        await migrate(conn, MIGRATIONS)
        assert [tuple(r) for r in await conn.fetch(
            "SELECT id, first_attempt_at FROM outbox ORDER BY id")] == [(1, 1001.0), (2, None)]
    finally:
        await conn.close()


async def test_migration_12_leaves_members_and_the_flusher_unclaimed(pg_dsn: str) -> None:
    """Rows from before migration 12 have no instance: the member id is free to claim, and
    the duty's holder keeps its lease (its fence grows once the claiming process takes it)."""
    from proxy.store.postgres import members
    from proxy.store.postgres.leader import Leadership
    from proxy.store.postgres.pool import PgPool, PoolSettings

    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn, MIGRATIONS[:BEFORE_12])
        await conn.execute("INSERT INTO members(id, last_shipped_seq) VALUES ('m', 7)")
        await conn.execute("INSERT INTO leader_leases VALUES ('flusher', 'm', 3,"
                           " now() - interval '1 s')")
        await migrate(conn, MIGRATIONS)
        assert await conn.fetchval("SELECT instance FROM members") is None
    finally:
        await conn.close()
    pool = PgPool(PoolSettings(dsn=pg_dsn))
    await pool.open()
    try:
        assert await members.claim(pool, "m", "i", 600) is None
        lead = Leadership(pool, "flusher", "m", ttl_ms=600, instance="i")
        assert await lead.try_lead() and lead.fence == 4
        async with pool.acquire() as c:
            assert await c.fetchval("SELECT last_shipped_seq FROM members") == 7
    finally:
        await pool.close()


async def test_every_sqlite_index_on_a_shared_table_exists_in_postgres(
        pg_dsn: str, tmp_path: Path) -> None:
    """An index SQLite has on a table the fleet shares (customers by Stripe customer id:
    migration 17 / owner migration 13) exists in PostgreSQL under the same name."""
    lite = sqlite3.connect(tmp_path / "s.db")
    try:
        for script in SQLITE_MIGRATIONS:
            lite.executescript(script)
        wanted = {(r[0], r[1]) for r in lite.execute(
            "SELECT name, tbl_name FROM sqlite_master WHERE type='index' AND sql IS NOT NULL")
            if r[1] not in LOCAL_ONLY}
    finally:
        lite.close()
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn)
        have = {(r[0], r[1]) for r in await conn.fetch(
            "SELECT indexname, tablename FROM pg_indexes WHERE schemaname = current_schema()")}
    finally:
        await conn.close()
    assert ("customers_stripe_customer", "customers") in wanted
    assert wanted <= have, sorted(wanted - have)
