"""The ``backend`` fixture the storage contract tests run against.

Every test in ``tests/store/`` takes ``backend`` and uses only the verbs of
``proxy.store.protocols`` (``backend.storage``), so the same tests hold every backend to the
same contract.

Adding a backend (e.g. PostgreSQL): write an async context manager factory
``async def _postgres(tmp_path) -> AsyncIterator[Backend]`` that creates a FRESH database
(PostgreSQL on 127.0.0.1:5432, trust auth, user postgres: ``CREATE DATABASE`` a unique name,
run the migrations, and ``DROP DATABASE`` it on exit), builds its ``Storage`` and a
``peer()`` that returns a second ``Storage`` on the same database through a connection of its
own (another fleet member), then register it in ``FACTORIES`` under "postgres". The
``backend`` fixture is parametrized by ``FACTORIES``, so every contract test runs once per
backend with no other change.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from proxy.credits.ledger import Entry
from proxy.store.db import Store, UsageItem, UsageRow, connect
from proxy.store.protocols import Storage
from proxy.store.sqlite import SqliteStorage, as_storage, offline, open_reader
from tests.store_pg.backend import postgres_backend


@dataclass
class Backend:
    name: str
    storage: Storage
    peer: Callable[[], Storage]              # another member on the same database
    _closers: list[Callable[[], None]] = field(default_factory=list)

    async def customer(self, cid: str, stripe_id: str | None = None,
                       anchor: int | None = None) -> None:
        def billing(_c: object) -> tuple[object, object]:
            return anchor, 0

        await self.storage.customers.upsert(cid, stripe_id, None, None,
                                            billing if anchor is not None else None)

    async def usage(self, cid: str, at: float, meter: str = "api_calls", quantity: int = 0,
                    billable: int | None = None, *, rid: str = "r", key: str = "k",
                    version: str = "v1", debits: list[tuple[str, Entry]] | None = None) -> None:
        """Record one metered request durably (strict: the future of its group commit)."""
        row = UsageRow(rid, at, cid, key, "rule", version, 200,
                       [UsageItem(meter, quantity, 0,
                                  quantity if billable is None else billable)],
                       debits=debits or [], method="GET", path="/x")
        fut = self.storage.usage.record(row, wait=True)
        assert fut is not None
        await fut
        await self.storage.usage.materialize()


@asynccontextmanager
async def _sqlite(tmp_path: Path) -> AsyncIterator[Backend]:
    path = tmp_path / "contract.db"
    store = Store.open(path)
    reader = await open_reader(path)      # as the proxy runs: large reads off the loop thread
    conns: list[sqlite3.Connection] = []

    def peer() -> Storage:
        conn = connect(path)
        conns.append(conn)
        return as_storage(offline(conn))

    try:
        yield Backend("sqlite", as_storage(SqliteStorage.on(store, reader)), peer)
    finally:
        for c in conns:
            c.close()
        await reader.close()
        store.close()


FACTORIES: dict[str, Callable[[Path], AbstractAsyncContextManager[Backend]]] = {
    "sqlite": _sqlite,
    "postgres": postgres_backend,
}


@pytest.fixture(params=sorted(FACTORIES))
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """One fresh, empty store per test, for each backend in ``FACTORIES``."""
    async with FACTORIES[request.param](tmp_path) as b:
        yield b
