"""Fixtures for the PostgreSQL storage owners: a fresh database per test (``pg_dsn``, from
the fleet fixtures: dropped after the test) and ``member()``, which opens one more
``PostgresStorage`` (one fleet member, its own pool) on it, closed after the test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from proxy.store.postgres.pool import PoolSettings
from proxy.store.postgres.storage import PostgresStorage
from tests.fleet.conftest import pg_dsn as pg_dsn

MemberFactory = Callable[[], Awaitable[PostgresStorage]]


@pytest.fixture
async def member(pg_dsn: str) -> AsyncIterator[MemberFactory]:
    opened: list[PostgresStorage] = []

    async def make() -> PostgresStorage:
        s = await PostgresStorage.open(PoolSettings(dsn=pg_dsn, size=4))
        opened.append(s)
        return s

    yield make
    for s in opened:
        await s.close()


@pytest.fixture
async def pg(member: MemberFactory) -> PostgresStorage:
    return await member()
