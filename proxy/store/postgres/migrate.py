"""Apply PostgreSQL migrations (proxy.store.postgres.schema) in order, exactly once.

The same scheme as SQLite's ``Store.open``: a numbered, append-only list and a stored count
of how many ran (``PRAGMA user_version`` there, ``meterproxy_schema.version`` here). Every
member runs ``migrate`` at start; a transaction-scoped advisory lock serializes them, so the
first applies what is missing and the others find nothing to do.
"""

from __future__ import annotations

from collections.abc import Sequence

from proxy.store.postgres.conn import Conn
from proxy.store.postgres.owners_schema import ALL_MIGRATIONS as MIGRATIONS

_LOCK = "SELECT pg_advisory_xact_lock(hashtext('meterproxy_migrate'))"


def pending(applied: int, migrations: Sequence[str]) -> list[tuple[int, str]]:
    """The migrations still to run after ``applied`` of them ran, numbered from 1.
    A database newer than this code (applied > len) is refused."""
    if applied > len(migrations):
        raise RuntimeError(f"database schema version {applied} is newer than this meterproxy "
                           f"({len(migrations)}): upgrade meterproxy")
    return [(i, migrations[i - 1]) for i in range(applied + 1, len(migrations) + 1)]


async def schema_version(conn: Conn) -> int:
    exists = await conn.fetchval("SELECT to_regclass('meterproxy_schema') IS NOT NULL")
    if not exists:
        return 0
    return int(await conn.fetchval("SELECT version FROM meterproxy_schema"))


async def migrate(conn: Conn, migrations: Sequence[str] = MIGRATIONS) -> int:
    """Bring the database to ``len(migrations)``; return the version it was at."""
    async with conn.transaction():
        await conn.execute(_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS meterproxy_schema (one BOOLEAN PRIMARY KEY DEFAULT TRUE "
            "CHECK (one), version INTEGER NOT NULL)")
        await conn.execute("INSERT INTO meterproxy_schema(version) VALUES (0) ON CONFLICT DO NOTHING")
        before = await schema_version(conn)
        for number, script in pending(before, migrations):
            await conn.execute(script)
            await conn.execute("UPDATE meterproxy_schema SET version = $1", number)
        return before
