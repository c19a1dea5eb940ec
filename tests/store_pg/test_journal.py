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

from proxy.credits.ledger import Entry, GrantState
from proxy.fleet.journal_shipping import JournalShipping, Renumbering, to_local
from proxy.store.db import Store, UsageItem, UsageRow
from proxy.store.postgres.journal import SqliteJournal, ship_debits
from proxy.store.postgres.shipping import Batch
from proxy.store.postgres.storage import PostgresStorage
from proxy.store.protocols import NewGrant
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


async def _pruned_before(pg: PostgresStorage, ms: int) -> None:
    """As if the audit retention had deleted rows below ``ms`` and no later ones."""
    async with pg.pool.acquire() as c:
        await c.execute("UPDATE audit_pruned SET before_ms = $1", ms)


async def _recorded(live: PostgresStorage, rows: list[UsageRow]) -> None:
    for r in rows:
        fut = live.usage.record(r, True)
        assert fut is not None
        await fut


async def test_rows_numbered_under_seqs_another_journal_of_the_id_shipped_are_found_and_moved(
        pg: PostgresStorage, tmp_path: Path) -> None:
    """Two journals under member id m1 (a process killed, another under the same id on a new
    volume): the first's rows at or below the id's watermark that the ledger does not hold
    at their seq are found (``numbered_elsewhere``; its shipped, unpruned row is not), moved
    above every seq the journal held (``renumber_journal``, in order), and then ship; older
    than the retention cutoff they are only counted."""
    await pg.customers.upsert("acme", None, None, None)
    first = Store.open(tmp_path / "a.db", keep_journal=True)
    second = Store.open(tmp_path / "b.db", keep_journal=True)
    try:
        ship_a = JournalShipping(pg.pool, "m1", SqliteJournal(first.conn))
        live_a = PostgresStorage.on(pg.pool, local=first, shipping=ship_a)
        await _recorded(live_a, [_row(0)])
        assert await ship_a.ship_pending() == 1          # seq 1 shipped, not pruned
        await _recorded(live_a, [_row(1), _row(2)])      # seqs 2, 3: never shipped
        ship_b = JournalShipping(pg.pool, "m1", SqliteJournal(second.conn))
        live_b = PostgresStorage.on(pg.pool, local=second, shipping=ship_b)
        second.raise_journal_floor(await ship_b.resume())
        # seqs 2..5; the first two reuse r1's and r2's request ids (a client's X-Request-Id)
        await _recorded(live_b, [UsageRow(f"r{i + 1}" if i < 2 else f"r{10 + i}", T0 + 10 + i,
                                          "acme", "k1", "rule", "v1", 200,
                                          [UsageItem("api_calls", C, credits=0)])
                                 for i in range(4)])
        assert await ship_b.ship_pending() == 4
        watermark = await ship_a.resume()
        assert watermark == 5
        # the retention deleted rows below T0 + 3 s (r1, r2 are older): they may have shipped
        await _pruned_before(pg, (T0 + 3) * 1000)
        assert await ship_a.numbered_elsewhere(watermark) == Renumbering([], 0, 2)
        await _pruned_before(pg, T0 * 1000)
        found = await ship_a.numbered_elsewhere(watermark)
        assert found == Renumbering([2, 3], 0, 0)
        assert first.renumber_journal(found.seqs, watermark) == 2
        assert [(s, r.request_id) for s, r in SqliteJournal(first.conn).rows_after(0, 10)] \
            == [(1, "r0"), (6, "r1"), (7, "r2")]
        assert await ship_a.numbered_elsewhere(watermark) == Renumbering([], 0, 0)
        assert await ship_a.ship_pending() == 2
        first.prune_journal(ship_a.shipper.watermark)
        await _recorded(live_a, [_row(3)])               # above every seq it held
        assert [s for s, _r in SqliteJournal(first.conn).rows_after(0, 10)] == [8]
    finally:
        first.close()
        second.close()
    _s, _e, totals = await pg.usage.usage("acme", T0, T0 + 60)
    assert totals["api_calls"].requests == 7


async def test_a_row_whose_grant_debits_shipped_without_its_usage_is_not_renumbered(
        pg: PostgresStorage, tmp_path: Path) -> None:
    """A journal row carrying grant debits (journaled in single-process mode) whose debits
    shipped under its seq before its usage did (the member died between the two), the seq
    then taken by another journal of the id: not renumbered (under a new seq its credits
    would debit the grant a second time), only counted; the row without debits shipped is."""
    await pg.customers.upsert("acme", None, None, None)
    await pg.ledger.create_grant(NewGrant(GrantState("g1", "acme", 10 * C)))
    await _pruned_before(pg, T0 * 1000)
    first = Store.open(tmp_path / "a.db", keep_journal=True)
    second = Store.open(tmp_path / "b.db", keep_journal=True)
    try:
        for i in range(2):
            fut = first.record(UsageRow(f"r{i}", T0 + i, "acme", "k1", "rule", "v1", 200,
                                        [UsageItem("api_calls", C, credits=C)],
                                        debits=[("api_calls", Entry("g1", "debit", C))]), True)
            assert fut is not None
            await fut
        journal = SqliteJournal(first.conn)
        assert await ship_debits(pg.pool, "m1", journal.rows_after(0, 1)) == 1   # r0's only
        ship_b = JournalShipping(pg.pool, "m1", SqliteJournal(second.conn))
        live_b = PostgresStorage.on(pg.pool, local=second, shipping=ship_b)
        await _recorded(live_b, [UsageRow(f"b{i}", T0 + 10 + i, "acme", "k1", "rule", "v1",
                                          200, [UsageItem("api_calls", C)]) for i in range(2)])
        assert await ship_b.ship_pending() == 2          # seqs 1, 2 under m1
        ship_a = JournalShipping(pg.pool, "m1", journal)
        watermark = await ship_a.resume()
        found = await ship_a.numbered_elsewhere(watermark)
        assert found == Renumbering([2], 1, 0)
        assert first.renumber_journal(found.seqs, watermark) == 1
        assert [(s, r.request_id) for s, r in journal.rows_after(0, 10)] == [
            (1, "r0"), (3, "r1")]
        assert await ship_a.ship_pending() == 1
    finally:
        first.close()
        second.close()
    assert await pg.ledger.entry_total("g1", "debit") == 2 * C
    _s, _e, totals = await pg.usage.usage("acme", T0, T0 + 60)
    assert totals["api_calls"].requests == 3


async def test_batch_after_reads_the_same_columns_as_the_row_path(tmp_path: Path) -> None:
    """The running member ships ``batch_after``'s columns; tests and tools ship rows through
    ``Batch.of(to_local(...))`` and ``ship_debits``: both must say exactly the same."""
    store = Store.open(tmp_path / "journal.db", keep_journal=True)
    try:
        rows = [_row(0),
                UsageRow("r1", T0 + 1.2345, "beta", "k2", "chat", "v2", 201,
                         [UsageItem("in", 7 * C, credits=3, billable=5, flags="x"),
                          UsageItem("out", C)],
                         debits=[("in", Entry("g1", "debit", -3))], method="POST",
                         path="/v1/chat"),
                _row(2)]
        for r in rows:
            fut = store.record(r, True)
            assert fut is not None
            await fut
        journal = SqliteJournal(store.conn)
        got = journal.batch_after(1, 10)
        pairs = journal.rows_after(1, 10)
        none = journal.batch_after(3, 10)
    finally:
        store.close()
    want = Batch.of([to_local(s, r) for s, r in pairs])
    assert list(got.usage.items) == list(want.items)
    assert len(got.usage.items) == 3                      # one entry per usage item
    assert got.usage.payload() == want.payload()
    assert (got.usage.rows, got.usage.top, got.usage.credits) == (2, 3, True)
    assert (want.rows, want.top, want.credits) == (2, 3, True)
    assert [list(c) for c in got.debits] == [
        ["beta"], ["g1"], ["debit"], [-3], ["r1"], ["in"], [int((T0 + 1.2345) * 1000)],
        [2], [0]]
    assert (none.usage.rows, none.usage.top, none.usage.credits, none.debits) == \
        (0, 0, False, [])


async def test_a_batched_fleet_journal_ships_every_row_exactly_once(
        pg: PostgresStorage, tmp_path: Path) -> None:
    """``storage.durability: batched`` in fleet mode: the group commit (every
    ``commit_interval``) journals one row per usage row, as strict does, instead of writing
    local ledger tables nobody ships (found by review: nothing ever reached PostgreSQL)."""
    await pg.customers.upsert("acme", None, None, None)
    store = Store.open(tmp_path / "journal.db", keep_journal=True, durability="batched",
                       commit_interval=0.01)
    try:
        live = PostgresStorage.on(pg.pool, local=store, shipping=JournalShipping(
            pg.pool, "m1", SqliteJournal(store.conn)))
        for i in range(5):
            live.usage.record(_row(i), False)     # batched: nobody waits for the commit
        assert await store.drain(5)
        assert store.journal_rows_after(0) == 5                 # one journal row each
        assert store.conn.execute("SELECT count(*) FROM audit").fetchone()[0] == 0
        assert await live.usage.materialize() == 5
        assert await live.usage.materialize() == 0              # nothing shipped twice
    finally:
        store.close()
    _s, _e, totals = await pg.usage.usage("acme", T0, T0 + 60)
    assert totals["api_calls"].requests == 5
    async with pg.pool.acquire() as c:
        assert await c.fetchval("SELECT count(*) FROM usage_ledger") == 5
