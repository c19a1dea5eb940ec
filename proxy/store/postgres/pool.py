"""``PgPool``: the one owner of a member's PostgreSQL connections (asyncpg).

Opened and closed as a pair. Every call site borrows a connection with ``acquire()``, which
also turns connection-level failures into ``PgUnavailable`` (proxy.store.postgres.errors).
Behind a transaction pooler (PgBouncer in transaction mode) prepared statements do not
survive between transactions: ``statement_cache_size=0`` turns asyncpg's cache off. Nothing
here holds a session-level lock or a temporary table, so a transaction pooler is safe.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import asyncpg

from proxy.store.postgres.conn import Conn
from proxy.store.postgres.errors import translated
from proxy.store.postgres.migrate import migrate


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """How to reach PostgreSQL; mirrors the ``storage`` config section."""

    dsn: str = field(repr=False)       # may carry a password: never in a repr or a log
    size: int = 10                    # most connections this member opens
    statement_cache_size: int = 100   # 0 behind a transaction pooler
    connect_timeout: float = 5.0      # seconds per connection attempt
    command_timeout: float = 5.0      # seconds per statement; past it: PgUnavailable


class PgPool:
    """A bounded asyncpg pool; ``open()`` also applies missing migrations."""

    def __init__(self, settings: PoolSettings) -> None:
        self.settings = settings
        self._pool: asyncpg.Pool | None = None
        self.statements = 0      # statements run on this pool's connections (capacity figures)

    async def open(self, run_migrations: bool = True) -> None:
        s = self.settings
        async with translated():
            self._pool = await asyncpg.create_pool(
                s.dsn, min_size=1, max_size=s.size, timeout=s.connect_timeout,
                command_timeout=s.command_timeout, statement_cache_size=s.statement_cache_size,
                init=self._init)
        if run_migrations:
            async with self.acquire() as conn:
                await migrate(conn)

    async def _init(self, conn: asyncpg.Connection) -> None:
        conn.add_query_logger(self._count)

    def _count(self, _record: object) -> None:
        self.statements += 1

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Conn]:
        """A pooled connection; connection failures surface as ``PgUnavailable``."""
        if self._pool is None:
            raise RuntimeError("PgPool is not open")
        async with translated(), self._pool.acquire(timeout=self.settings.connect_timeout) as conn:
            yield conn
