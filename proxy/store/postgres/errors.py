"""The one place asyncpg's exceptions are translated.

``PgUnavailable``: the database could not be reached or answered too late (connection refused
or cut, timeout, server shutting down). Callers treat it as "PostgreSQL is unreachable" and
keep serving on what they hold (leases, journal); every other database error is a bug or a
constraint and propagates unchanged. No store code runs SERIALIZABLE transactions or sets
``lock_timeout``: a lock wait ends at ``command_timeout`` as a ``PgUnavailable``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from proxy.errors import StorageOutcomeUnknown


class PgUnavailable(StorageOutcomeUnknown):
    """PostgreSQL is unreachable or did not answer in time (``command_timeout``: also a
    write that waited that long for a row lock another session holds). Whether a write in
    flight committed is unknown (the connection may have been cut after the server received
    its COMMIT), so on an HTTP surface it is a 503 ``storage_outcome_unknown`` with
    ``Retry-After``, never the SQLite lock's "nothing was written"."""


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
    """Turn connection-level failures inside the block into ``PgUnavailable``."""
    try:
        yield
    except _UNAVAILABLE as exc:
        raise PgUnavailable(f"{type(exc).__name__}: {exc}") from exc
