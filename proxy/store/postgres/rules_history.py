"""The ``RulesHistory`` owner on PostgreSQL: ``rules_versions``. The first member to load a
version keeps its text and time (``ON CONFLICT DO NOTHING``)."""

from __future__ import annotations

from proxy.store.postgres.pool import PgPool, retried
from proxy.store.protocols import RulesText


class PostgresRulesHistory:
    def __init__(self, pool: PgPool) -> None:
        self.pool = pool

    @retried
    async def remember(self, version: str, files: str, at: int) -> bool:
        async with self.pool.acquire() as c:
            return await c.fetchval(
                "INSERT INTO rules_versions(version, first_loaded_at, files) VALUES ($1,$2,$3)"
                " ON CONFLICT (version) DO NOTHING RETURNING true", version, at, files
            ) is not None

    async def get(self, version: str) -> RulesText | None:
        async with self.pool.acquire() as c:
            row = await c.fetchrow("SELECT files, first_loaded_at FROM rules_versions"
                                   " WHERE version=$1", version)
        return None if row is None else RulesText(version, str(row[0]), int(row[1]))

    async def newest(self) -> str | None:
        async with self.pool.acquire() as c:
            v = await c.fetchval("SELECT version FROM rules_versions ORDER BY"
                                 " first_loaded_at DESC, ord DESC LIMIT 1")
        return None if v is None else str(v)
