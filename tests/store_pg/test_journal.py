"""A member's journal in fleet mode: every recorded row reaches the fleet's ledger once.

Shipping keys rows by ``(member_id, seq)``. The fleet runtime opens the member's Store with
``keep_journal`` (the journal is never materialized into local tables, so no row is deleted
before it ships) and prunes shipped rows with ``prune_journal``, which always keeps the
newest row: SQLite's ``INTEGER PRIMARY KEY`` restarts at max + 1, so a seq is never reused.
(Found by review with a plain Store, where both rows were lost; these tests use the Store as
the fleet runtime opens it.)
"""

from __future__ import annotations

from pathlib import Path

from proxy.fleet.journal_shipping import JournalShipping
from proxy.store.db import Store, UsageItem, UsageRow
from proxy.store.postgres.journal import SqliteJournal
from proxy.store.postgres.storage import PostgresStorage
from tests.store_pg.helpers import C

T0 = 1_767_225_600


def _row(i: int) -> UsageRow:
    return UsageRow(f"r{i}", T0 + i, "acme", "k1", "rule", "v1", 200,
                    [UsageItem("api_calls", C, credits=0)])


async def test_usage_recorded_after_the_journal_was_materialized_is_shipped(
        pg: PostgresStorage, tmp_path: Path) -> None:
    await pg.customers.upsert("acme", None, None, None)
    store = Store.open(tmp_path / "journal.db", keep_journal=True)
    try:
        live = PostgresStorage.on(pg.pool, local=store, shipping=JournalShipping(
            pg.pool, "m1", SqliteJournal(store.conn)))
        fut = live.usage.record(_row(0), True)
        assert fut is not None
        await fut
        assert await live.usage.materialize() == 1       # shipped: watermark 1
        assert store.materialize() == 0                  # the journal task: never moves rows
        store.prune_journal(1)                           # shipped rows pruned, newest kept
        fut = live.usage.record(_row(1), True)           # seq 2, never 1 again
        assert fut is not None
        await fut
        shipped = await live.usage.materialize()
    finally:
        store.close()
    _s, _e, totals = await pg.usage.usage("acme", T0, T0 + 60)
    assert totals["api_calls"].requests == 2
    assert shipped == 1


async def test_usage_materialized_locally_before_shipping_is_still_shipped(
        pg: PostgresStorage, tmp_path: Path) -> None:
    await pg.customers.upsert("acme", None, None, None)
    store = Store.open(tmp_path / "journal.db", keep_journal=True)
    try:
        live = PostgresStorage.on(pg.pool, local=store, shipping=JournalShipping(
            pg.pool, "m1", SqliteJournal(store.conn)))
        fut = live.usage.record(_row(0), True)
        assert fut is not None
        await fut
        assert store.materialize() == 0  # the journal task ran before the shipping pass
        await live.usage.materialize()
    finally:
        store.close()
    _s, _e, totals = await pg.usage.usage("acme", T0, T0 + 60)
    assert "api_calls" in totals and totals["api_calls"].requests == 1
