"""The one place asyncpg's exceptions are translated.

``PgUnavailable``: the database could not be reached or answered too late (connection refused
or cut, timeout, server shutting down). Callers treat it as "PostgreSQL is unreachable" and
keep serving on what they hold (leases, journal).

``PgConflict``: PostgreSQL aborted the transaction to resolve a deadlock (SQLSTATE 40P01) or a
serialization failure (40001). The server rolled it back whole, so nothing of it was written
and running it again is safe: ``PgPool.retrying`` (and the ``retried`` decorator on the
owners' verbs) re-runs it a bounded number of times; one that still conflicts then surfaces
as ``StorageUnavailable`` (503 ``storage_unavailable``, nothing written).

Every other database error is a bug or a constraint and propagates unchanged. No store code
runs SERIALIZABLE transactions or sets ``lock_timeout``: a lock wait ends at
``command_timeout`` as a ``PgUnavailable``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from proxy.errors import StorageOutcomeUnknown, StorageUnavailable


class PgUnavailable(StorageOutcomeUnknown):
    """PostgreSQL is unreachable or did not answer in time (``command_timeout``: also a
    write that waited that long for a row lock another session holds). Whether a write in
    flight committed is unknown (the connection may have been cut after the server received
    its COMMIT), so on an HTTP surface it is a 503 ``storage_outcome_unknown`` with
    ``Retry-After``, never the SQLite lock's "nothing was written"."""


class PgConflict(StorageUnavailable):
    """PostgreSQL rolled the transaction back to break a deadlock (40P01) or a serialization
    failure (40001): nothing of it was written, and it may be run again as a whole. On an HTTP
    surface (once the retries are spent) a 503 ``storage_unavailable`` with ``Retry-After``."""


_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.ConnectionDoesNotExistError,
)


def is_unavailable(exc: BaseException) -> bool:
    return isinstance(exc, _UNAVAILABLE)


@asynccontextmanager
async def translated() -> AsyncIterator[None]:
    """Turn connection-level failures inside the block into ``PgUnavailable``, and a
    deadlock or serialization failure into ``PgConflict``."""
    try:
        yield
    except _UNAVAILABLE as exc:
        raise PgUnavailable(f"{type(exc).__name__}: {exc}") from exc
    except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError) as exc:
        raise PgConflict(f"PostgreSQL rolled the transaction back ({exc.sqlstate}: {exc});"
                         " nothing was written") from exc
