"""The "postgres" backend of the storage contract tests (``tests/store/conftest.py``): a
fresh database on the PostgreSQL at 127.0.0.1:5432 (dropped after the test), one member
whose ``usage.record`` journals into a local SQLite ``Store`` and whose ``materialize``
ships that journal, and a second member (``peer``) with a pool of its own. ``data_version``
is in its default (unwatched) mode; ``tests/store_pg/test_owners.py`` covers ``watch``."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg

from proxy.fleet.journal_shipping import JournalShipping
from proxy.store.db import Store
from proxy.store.postgres.journal import SqliteJournal
from proxy.store.postgres.pool import PgPool, PoolSettings
from proxy.store.postgres.storage import PostgresStorage, as_storage, ensure_schema
from tests.ci_guard import skip_or_fail

if TYPE_CHECKING:
    from tests.store.conftest import Backend

PG_BASE = os.environ.get("METERPROXY_TEST_PG", "postgresql://postgres@127.0.0.1:5432")


@asynccontextmanager
async def fresh_database() -> AsyncIterator[str]:
    """A DSN to a brand-new database, dropped (connections forced off) on exit."""
    name = f"mp_store_{uuid.uuid4().hex[:12]}"
    try:
        admin = await asyncpg.connect(f"{PG_BASE}/postgres", timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        skip_or_fail(f"PostgreSQL is not reachable at {PG_BASE} ({exc})")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"{PG_BASE}/{name}"
        finally:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@asynccontextmanager
async def postgres_backend(tmp_path: Path) -> AsyncIterator[Backend]:
    from tests.store.conftest import Backend

    async with fresh_database() as dsn:
        store = Store.open(tmp_path / "journal.db", keep_journal=True)    # as app.py opens it
        pool = PgPool(PoolSettings(dsn=dsn, size=4))
        peer: PostgresStorage | None = None
        main: PostgresStorage | None = None
        try:
            await pool.open(run_migrations=False)
            await ensure_schema(pool)
            shipping = JournalShipping(pool, "member-a", SqliteJournal(store.conn))
            main = PostgresStorage.on(pool, local=store, shipping=shipping)
            peer = await PostgresStorage.open(PoolSettings(dsn=dsn, size=4))
            other = as_storage(peer)
            yield Backend("postgres", as_storage(main), lambda: other)
        finally:
            if peer is not None:
                await peer.close()
            if main is not None:
                await main.close()
            await pool.close()
            store.close()
