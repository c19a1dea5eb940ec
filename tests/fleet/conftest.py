"""Fixtures for fleet tests: a fresh PostgreSQL database per test (dropped after it), pools
opened on it with the schema migrated, and customers with credit accounts.

PostgreSQL must be listening on 127.0.0.1:5432 with trust auth for user ``postgres`` (the
project machine runs it); override with ``METERPROXY_TEST_PG`` (a DSN without a database
name). Missing: skipped locally, a failure under CI=true (tests/ci_guard.py).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from proxy.store.postgres import leases
from proxy.store.postgres.pool import PgPool, PoolSettings
from tests.ci_guard import skip_or_fail

PG_BASE = os.environ.get("METERPROXY_TEST_PG", "postgresql://postgres@127.0.0.1:5432")


def via_relay(port: int, dsn: str) -> str:
    """``dsn`` (a test database on PG_BASE) reached through a relay listening on ``port``
    (the ``relay`` fixture: tests/fleet/tcp_cut.py)."""
    return dsn.replace(PG_BASE, f"postgresql://postgres@127.0.0.1:{port}")

# the fleet soak (docs/testing.md) runs only when asked for: a profile, not a skip
collect_ignore = [] if os.environ.get("METERPROXY_FLEET_SOAK") else ["test_members_soak.py"]


@pytest.fixture
async def pg_dsn() -> AsyncIterator[str]:
    """A DSN to a brand-new, empty database; dropped (connections forced off) afterwards."""
    name = f"mp_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = await asyncpg.connect(f"{PG_BASE}/postgres", timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        skip_or_fail(f"PostgreSQL is not reachable at {PG_BASE} ({exc}); start it "
                     "(Debian: apt-get install postgresql, then "
                     "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start)")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield f"{PG_BASE}/{name}"
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


PoolFactory = Callable[..., Awaitable[PgPool]]


@pytest.fixture
async def open_pool(pg_dsn: str) -> AsyncIterator[PoolFactory]:
    """``await open_pool(dsn=None, **settings)``: an open, migrated pool, closed after the test."""
    pools: list[PgPool] = []

    async def make(dsn: str | None = None, **kw: object) -> PgPool:
        pool = PgPool(PoolSettings(dsn=dsn or pg_dsn, **kw))  # type: ignore[arg-type]
        pools.append(pool)
        await pool.open()
        return pool

    yield make
    for p in pools:
        await p.close()


@pytest.fixture
async def pool(open_pool: PoolFactory) -> PgPool:
    return await open_pool()


async def add_customer(pool: PgPool, customer_id: str, credits_micro: int = 0) -> None:
    """A customer row and its credit account holding ``credits_micro``."""
    async with pool.acquire() as conn:
        await conn.execute("INSERT INTO customers(id, created_at, updated_at) VALUES ($1, 0, 0)",
                           customer_id)
        await leases.deposit(conn, customer_id, credits_micro)
