"""``PgPool``: the one owner of a member's PostgreSQL connections (asyncpg).

Opened and closed as a pair. Every call site borrows a connection with ``acquire()``, which
also turns connection-level failures into ``PgUnavailable`` (proxy.store.postgres.errors).
Behind a transaction pooler (PgBouncer in transaction mode) prepared statements do not
survive between transactions: ``statement_cache_size=0`` turns asyncpg's cache off. Nothing
here holds a session-level lock or a temporary table, so a transaction pooler is safe.

A deadlock or serialization failure (``PgConflict``: PostgreSQL rolled the transaction back
whole) is run again: ``retrying(run)`` calls ``run`` up to ``CONFLICT_ATTEMPTS`` times, with
a jittered exponential pause between tries (``proxy.backoff``), and counts each retry and
each give-up in ``meterproxy_fleet_pg_conflicts_total``. The ``retried`` decorator does this
for an owner's verb (a method of an object with a ``pool``): the verb is re-run whole, so it
must be one transaction (or one statement) with no effect outside the database before its
commit, and must not call another retried verb (the attempts would multiply).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

import asyncpg

from proxy import metrics
from proxy.backoff import backoff
from proxy.store.postgres.conn import Conn
from proxy.store.postgres.errors import PgConflict, translated
from proxy.store.postgres.migrate import migrate

log = logging.getLogger("meterproxy.fleet")

T = TypeVar("T")
P = ParamSpec("P")

CONFLICT_ATTEMPTS = 5          # tries in all of a transaction PostgreSQL keeps rolling back
CONFLICT_FIRST = 0.02          # seconds: the first pause; doubles, jittered, up to the cap
CONFLICT_CAP = 0.5


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

    async def retrying(self, run: Callable[[], Awaitable[T]]) -> T:
        """``await run()``, run again on ``PgConflict`` (see the module doc); the last
        attempt's ``PgConflict`` propagates (503 ``storage_unavailable``)."""
        attempt = 1
        while True:
            try:
                return await run()
            except PgConflict as exc:
                if attempt >= CONFLICT_ATTEMPTS:
                    metrics.fleet_pg_conflicts_total.labels("exhausted").inc()
                    log.warning("PostgreSQL conflict, gave up after %d attempts: %s",
                                attempt, exc)
                    raise
                metrics.fleet_pg_conflicts_total.labels("retried").inc()
                await asyncio.sleep(backoff(attempt, first=CONFLICT_FIRST, cap=CONFLICT_CAP))
                attempt += 1


class _HasPool(Protocol):
    pool: PgPool


S = TypeVar("S", bound=_HasPool)


def retried(verb: Callable[Concatenate[S, P], Coroutine[Any, Any, T]]
            ) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
    """Run an owner's verb through ``self.pool.retrying``: re-run whole on a deadlock or a
    serialization failure. Only for a verb that is one transaction (or one statement) with
    no effect outside the database before it commits."""

    async def run(owner: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await owner.pool.retrying(lambda: verb(owner, *args, **kwargs))

    functools.update_wrapper(run, verb)
    return run
