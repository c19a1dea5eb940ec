"""The ``Maintenance`` owner on PostgreSQL.

The server owns its files: checkpoints, WAL size and page checks are PostgreSQL's (and the
operator's) job, so ``checkpoint_once`` does nothing and ``check_file`` has nothing local to
distrust. An unreachable server is not a reason to stop serving (members serve on their
leases and local journals), so it never fails readiness here; ``integrity_check`` reports it
(one round trip) for the caller to log.
"""

from __future__ import annotations

from proxy.store.postgres.errors import PgUnavailable
from proxy.store.postgres.pool import PgPool


class PostgresMaintenance:
    def __init__(self, pool: PgPool) -> None:
        self.pool = pool

    def check_file(self) -> str | None:
        return None

    async def checkpoint_once(self) -> None:
        return None

    async def integrity_check(self) -> str | None:
        try:
            async with self.pool.acquire() as c:
                await c.fetchval("SELECT 1")
        except PgUnavailable as exc:
            return f"PostgreSQL unreachable: {exc}"
        return None
