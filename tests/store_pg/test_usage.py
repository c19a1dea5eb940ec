"""The PostgreSQL ``UsageLedger``: reads of the shipped usage ledger (minutes kept by the
trigger exactly once per shipped row, the audit in commit order, prune), and ``record``
delegating to the member's local journal."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from proxy.credits.ledger import Entry, GrantState
from proxy.fleet.journal_shipping import JournalShipping, to_local
from proxy.store.db import Store, UsageItem, UsageRow
from proxy.store.postgres.journal import SqliteJournal, ship_debits
from proxy.store.postgres.storage import PostgresStorage
from proxy.store.protocols import NewGrant
from tests.store_pg.conftest import MemberFactory
from tests.store_pg.helpers import C, ship, usage_row

T0 = 1_767_225_600          # 2026-01-01T00:00:00Z


async def test_minutes_count_each_shipped_row_once(pg: PostgresStorage) -> None:
    await pg.customers.upsert("acme", None, None, None)
    rows = [usage_row(1, "acme", T0 + 10, quantity=2 * C, billable=C, extra_meter="calls"),
            usage_row(2, "acme", T0 + 20, quantity=3 * C),
            usage_row(3, "acme", T0 + 86_400 + 5, quantity=4 * C)]
    assert await ship(pg, "m1", rows) == 4
    assert await ship(pg, "m1", rows) == 0                 # a resend is a no-op
    assert await ship(pg, "m2", rows[:1]) == 2             # another member's own rows count
    start, end, totals = await pg.usage.usage("acme", T0, T0 + 2 * 86_400)
    assert (start, end) == (T0, T0 + 2 * 86_400)
    assert {m: (t.quantity, t.requests, t.billable, t.covered) for m, t in totals.items()} == {
        "api_calls": (11 * C, 4, 9 * C, 2 * C), "calls": (2 * C, 2, 2 * C, 0)}
    # the default range is the customer's billing period (calendar month), end now + 60 s
    start, end, totals = await pg.usage.usage("acme", now=T0 + 86_400 + 30)
    assert (start, end) == (T0, T0 + 86_400 + 90)
    assert totals["api_calls"].quantity == 11 * C
    assert await pg.usage.billable(T0, T0 + 60) == {("acme", "api_calls"): 5 * C,
                                                    ("acme", "calls"): 2 * C}
    days = await pg.usage.usage_days("acme", T0, (T0, T0 + 86_400), T0 + 3600)
    assert sorted((d.meter, d.day, d.in_period, d.in_trailing, d.quantity, d.requests)
                  for d in days) == [
        ("api_calls", T0, True, False, 7 * C, 3),
        ("api_calls", T0 + 86_400, False, True, 4 * C, 1),
        ("calls", T0, True, False, 2 * C, 2)]
    assert await pg.usage.materialize() == 0


async def test_audit_in_commit_order_per_customer_by_time_and_pruned(
        pg: PostgresStorage) -> None:
    await ship(pg, "m1", [usage_row(1, "a", T0 + 30, extra_meter="calls", version="v1"),
                          usage_row(2, "b", T0 + 10, version="v2")])
    await ship(pg, "m2", [usage_row(1, "a", T0 + 20, request_id="shared"),
                          usage_row(2, "a", T0 + 40, request_id="shared")])
    everything = [r async for batch in pg.usage.audit_stream(None, T0, T0 + 60, batch=2)
                  for r in batch]
    assert [(r.customer_id, r.request_id, r.meter) for r in everything] == [
        ("a", "req-a-1", "api_calls"), ("a", "req-a-1", "calls"), ("b", "req-b-2", "api_calls"),
        ("a", "shared", "api_calls"), ("a", "shared", "api_calls")]
    assert [r.seq for r in everything] == sorted(r.seq for r in everything)
    batches = [len(b) async for b in pg.usage.audit_stream(None, T0, T0 + 60, batch=2)]
    assert batches == [2, 2, 1]
    one = [r async for b in pg.usage.audit_stream("a", T0, T0 + 60, batch=1) for r in b]
    assert [r.at_ms for r in one] == [(T0 + 20) * 1000, (T0 + 30) * 1000, (T0 + 30) * 1000,
                                      (T0 + 40) * 1000]
    among = [r async for b in pg.usage.audit_stream(None, T0, T0 + 60, customers=["b"])
             for r in b]
    assert [(r.customer_id, r.rules_version, r.method, r.path, r.status) for r in among] == [
        ("b", "v2", "POST", "/v1/x", 200)]
    # the rows whose minute starts in the range (periods.minute_bounds): all of minute T0
    # for [T0, T0 + 1), none for [T0 + 15, T0 + 35) (minute T0 starts before it)
    window = [r async for b in pg.usage.audit_stream(None, T0, T0 + 1) for r in b]
    assert sorted(r.at_ms // 1000 - T0 for r in window) == [10, 20, 30, 30, 40]
    assert [r async for b in pg.usage.audit_stream(None, T0 + 15, T0 + 35) for r in b] == []
    assert [r.meter for r in await pg.usage.audit_for_request("req-a-1")] == ["api_calls",
                                                                             "calls"]
    assert len(await pg.usage.audit_for_request("shared")) == 2
    assert sorted(await pg.usage.audit_versions(T0, T0 + 60)) == ["v1", "v2"]
    assert await pg.usage.audit_versions(T0 + 31, T0 + 60) == []
    async with pg.pool.acquire() as c:
        await c.execute("UPDATE audit_pruned SET before_ms = 0")
    assert await pg.usage.prune_audit((T0 + 30) * 1000, batch=1) == 0   # oldest is at 30
    assert await _pruned_before(pg) == 0             # nothing deleted: not raised
    assert await pg.usage.prune_audit((T0 + 31) * 1000, batch=1) == 1
    assert await _pruned_before(pg) == (T0 + 31) * 1000
    assert await pg.usage.prune_audit((T0 + 31) * 1000) == 3
    assert await pg.usage.prune_audit((T0 + 31) * 1000) == 0
    assert await pg.usage.prune_audit((T0 + 35) * 1000) == 0    # deletes nothing: not raised
    assert await _pruned_before(pg) == (T0 + 31) * 1000
    left = [r async for b in pg.usage.audit_stream(None, T0, T0 + 60) for r in b]
    assert [r.at_ms // 1000 - T0 for r in left] == [40]
    # pruning the audit keeps the totals
    _s, _e, totals = await pg.usage.usage("a", T0, T0 + 60)
    assert totals["api_calls"].requests == 3


async def _pruned_before(pg: PostgresStorage) -> int:
    async with pg.pool.acquire() as c:
        return int(await c.fetchval("SELECT before_ms FROM audit_pruned"))


async def test_record_goes_to_the_local_journal(member: MemberFactory, tmp_path: Path) -> None:
    offline = await member()
    row = UsageRow("r1", T0, "acme", "k1", "rule", "v1", 200, [UsageItem("api_calls", C)])
    with pytest.raises(RuntimeError, match="local journal"):
        offline.usage.record(row, True)
    store = Store.open(tmp_path / "journal.db", keep_journal=True)
    try:
        live = PostgresStorage.on(offline.pool, local=store)
        fut = live.usage.record(row, True)
        assert fut is not None
        await asyncio.wait_for(fut, 5)
        (n,) = store.conn.execute("SELECT COUNT(*) FROM journal").fetchone()
        assert n == 1
    finally:
        store.close()


async def test_a_crash_between_debits_and_rows_ships_each_once(
        pg: PostgresStorage, tmp_path: Path) -> None:
    await pg.customers.upsert("acme", None, None, None)
    await pg.ledger.create_grant(NewGrant(GrantState("g1", "acme", 10 * C)))
    store = Store.open(tmp_path / "journal.db", keep_journal=True)   # as app.py opens a member's
    try:
        for i in range(3):
            row = UsageRow(f"r{i}", T0 + i, "acme", "k1", "rule", "v1", 200,
                           [UsageItem("api_calls", C, credits=C)],
                           debits=[("api_calls", Entry("g1", "debit", C))])
            fut = store.record(row, True)
            assert fut is not None
            await fut
        journal = SqliteJournal(store.conn)
        # the member died after the debits committed, before the rows did
        assert await ship_debits(pg.pool, "m1", journal.rows_after(0, 2)) == 2
        shipping = JournalShipping(pg.pool, "m1", journal)
        live = PostgresStorage.on(pg.pool, local=store, shipping=shipping)
        assert await live.usage.materialize() == 3
        assert await live.usage.materialize() == 0
        # a restart starts from the shipped watermark; a full resend inserts nothing
        again = JournalShipping(pg.pool, "m1", journal)
        assert await again.ship_pending() == 0
        every = journal.rows_after(0, 10)
        assert await ship_debits(pg.pool, "m1", every) == 0
        assert (await again.shipper.ship([to_local(s, r) for s, r in every])).inserted == 0
    finally:
        store.close()
    assert await pg.ledger.entry_total("g1", "debit") == 3 * C
    _s, _e, totals = await pg.usage.usage("acme", T0, T0 + 60)
    assert (totals["api_calls"].quantity, totals["api_calls"].requests) == (3 * C, 3)
    assert len([r async for b in pg.usage.audit_stream("acme", T0, T0 + 60) for r in b]) == 3
