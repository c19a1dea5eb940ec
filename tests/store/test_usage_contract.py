"""Contract of the ``UsageLedger`` owner (journal, audit, usage_minute)."""

from __future__ import annotations

import asyncio
import calendar
from pathlib import Path

import pytest

from proxy.credits.ledger import Entry, GrantState
from proxy.periods import period_bounds
from proxy.store.db import Store, UsageItem, UsageRow, connect
from proxy.store.protocols import NewGrant
from proxy.store.sqlite import open_reader
from proxy.store.usage import SqliteUsage
from proxy.units import QSCALE
from tests.store.conftest import Backend

NOV = calendar.timegm((2026, 11, 1, 0, 0, 0))
NOW = NOV + 20 * 86400 + 3600 + 17          # 2026-11-21T01:00:17Z


async def test_recorded_rows_count_exactly_once(backend: Backend) -> None:
    await backend.customer("c1")
    await backend.usage("c1", NOW - 30, quantity=3_000_000, billable=2_000_000, rid="r1")
    await backend.usage("c1", NOW - 20, quantity=1_000_000, rid="r2")
    assert await backend.storage.usage.materialize() == 0       # nothing left to move
    start, end, totals = await backend.storage.usage.usage("c1", NOV, NOW + 60)
    t = totals["api_calls"]
    # covered = quantity - billable
    assert (t.quantity, t.requests, t.billable, t.covered) == (4_000_000, 2, 3_000_000, 1_000_000)
    assert (start, end) == (NOV, NOW + 60)


async def test_record_never_blocks_and_debits_land_with_the_usage(backend: Backend) -> None:
    await backend.customer("c1")
    await backend.storage.ledger.create_grant(NewGrant(GrantState("g1", "c1", 10, 50, None, 1,
                                                                  "admin")))
    await backend.usage("c1", NOW, quantity=1, debits=[("api_calls", Entry("g1", "debit", 4))])
    snap = await backend.storage.ledger.load()
    assert snap.entries == [Entry("g1", "debit", 4)]
    (rec,) = await backend.storage.ledger.entries("c1")
    assert (rec.request_id, rec.meter) == ("r", "api_calls")


async def test_one_default_range_rule(backend: Backend) -> None:
    u = backend.storage.usage
    await backend.customer("cal")
    anchor = calendar.timegm((2026, 1, 15, 12, 0, 0))        # periods start on the 15th, 12:00
    await backend.customer("anch", anchor=anchor)
    for cid in ("cal", "anch"):
        await backend.usage(cid, NOV + 86400, quantity=1, rid=f"{cid}-early")     # Nov 2
        await backend.usage(cid, NOW - 60, quantity=10, rid=f"{cid}-late")        # Nov 21
    start, end, totals = await u.usage("cal", now=NOW)
    assert (start, end) == (NOV, NOW + 60)                  # the calendar month, to now + 60 s
    assert totals["api_calls"].quantity == 11
    start, end, totals = await u.usage("anch", now=NOW)
    assert start == calendar.timegm((2026, 11, 15, 12, 0, 0)) and end == NOW + 60
    assert totals["api_calls"].quantity == 10               # Nov 2 is in the previous period
    start, end, totals = await u.usage("nobody", now=NOW)
    assert (start, end, totals) == (NOV, NOW + 60, {})
    # explicit bounds win; a minute counts iff its start is in [start, end)
    late = (NOW - 60) // 60 * 60                        # the late request's minute
    _, _, totals = await u.usage("cal", late, late + 1, now=NOW)
    assert totals["api_calls"].quantity == 10
    _, _, totals = await u.usage("cal", late + 1, NOW + 60, now=NOW)   # its minute started before
    assert totals == {}
    late_minute = (NOW - 60) // 60 * 60
    _, _, totals = await u.usage("cal", NOV, late_minute, now=NOW)      # minutes < end
    assert totals["api_calls"].quantity == 1


async def test_usage_days_and_billable(backend: Backend) -> None:
    u = backend.storage.usage
    await backend.customer("c1")
    await backend.usage("c1", NOV + 100, quantity=5, billable=4, rid="a")
    await backend.usage("c1", NOV + 86400 + 5, quantity=7, billable=7, rid="b")
    days = await u.usage_days("c1", NOV, (NOV, NOV + 30 * 86400), NOV + 86400 - 1)  # minute > it
    got = sorted((d.day, d.in_period, d.in_trailing, d.quantity, d.billable, d.requests)
                 for d in days)
    assert got == [(NOV, True, False, 5, 4, 1), (NOV + 86400, True, True, 7, 7, 1)]
    assert await u.billable(NOV, NOV + 2 * 86400) == {("c1", "api_calls"): 11}
    assert await u.billable(NOV + 120, NOV + 2 * 86400) == {("c1", "api_calls"): 7}


async def test_audit_reads_and_prune(backend: Backend) -> None:
    u = backend.storage.usage
    await backend.customer("c1")
    await backend.customer("c2")
    await backend.usage("c1", NOV + 2, rid="x", version="v2")
    await backend.usage("c2", NOV + 1, rid="y", version="v1")
    await backend.usage("c1", NOV + 1, rid="x", version="v1")          # ids may repeat
    await backend.usage("c1", NOV + 61, rid="z", version="v3")         # the next minute
    rows = await u.audit_for_request("x")
    assert [(r.customer_id, r.rules_version, r.at_ms) for r in rows] == [
        ("c1", "v2", (NOV + 2) * 1000), ("c1", "v1", (NOV + 1) * 1000)]   # commit order
    assert (rows[0].method, rows[0].path, rows[0].status) == ("GET", "/x", 200)
    assert sorted(await u.audit_versions(NOV, NOV + 3)) == ["v1", "v2"]
    assert await u.audit_versions(NOV + 60, NOV + 120) == ["v3"]
    # the rows whose minute is in the range (periods.minute_bounds): minute NOV starts
    # before NOV + 2, minute NOV + 60 at or after NOV + 3
    assert await u.audit_versions(NOV + 2, NOV + 3) == []
    assert sorted(await u.audit_versions(NOV + 2, NOV + 61)) == ["v3"]
    one = [r.request_id for b in [b async for b in u.audit_stream("c1", NOV, NOV + 3)]
           for r in b]
    assert one == ["x", "x"]
    batches = [b async for b in u.audit_stream(None, NOV, NOV + 3, batch=2)]
    assert [len(b) for b in batches] == [2, 1]
    assert [r.request_id for b in batches for r in b] == ["x", "y", "x"]   # commit order
    only = [r.customer_id async for b in u.audit_stream(None, NOV, NOV + 3, ["c2"]) for r in b]
    assert only == ["c2"]
    assert await u.prune_audit((NOV + 2) * 1000, batch=1) == 0   # the oldest row is newer
    assert await u.prune_audit((NOV + 3) * 1000, batch=2) == 2
    assert await u.prune_audit((NOV + 3) * 1000, batch=2) == 1
    assert await u.prune_audit((NOV + 3) * 1000) == 0
    # usage aggregates are kept: billing does not depend on the audit
    assert (await u.billable(NOV, NOV + 60))[("c1", "api_calls")] == 0


async def test_concurrent_records_all_count(backend: Backend) -> None:
    await backend.customer("c1")
    await asyncio.gather(*(backend.usage("c1", NOW, quantity=1, rid=f"r{i}") for i in range(50)))
    _, _, totals = await backend.storage.usage.usage("c1", now=NOW)
    assert (totals["api_calls"].quantity, totals["api_calls"].requests) == (50, 50)


async def test_quantities_group_every_customer_and_meter(backend: Backend) -> None:
    u = backend.storage.usage
    await backend.customer("c1")
    await backend.customer("c2")
    await backend.usage("c1", NOV + 100, quantity=5, billable=0, rid="a")
    await backend.usage("c1", NOV + 130, quantity=2, billable=2, rid="b")
    await backend.usage("c2", NOV + 100, meter="tokens", quantity=9, rid="c")
    await backend.usage("c2", NOV + 86400, meter="tokens", quantity=4, rid="d")
    # quantity, billable or not; minutes in [start, end)
    assert await u.quantities(NOV, NOV + 86400) == {("c1", "api_calls"): 7,
                                                    ("c2", "tokens"): 9}
    assert await u.quantities(NOV + 120, NOV + 86400 + 60) == {("c1", "api_calls"): 2,
                                                               ("c2", "tokens"): 4}
    assert await u.quantities(NOV + 2 * 86400, NOV + 3 * 86400) == {}


@pytest.mark.parametrize("with_reader", [True, False], ids=["reader", "write_connection"])
async def test_audit_stream_holds_no_statement_between_batches(tmp_path: Path,
                                                                with_reader: bool) -> None:
    """The audit is read one statement per batch, resumed after the last row, on the reader
    (as the proxy runs) and on the write connection (a store composed without a reader):
    while the caller holds a batch (an export streamed to a slow client), the WAL's
    checkpoints finish, other reads through the same connection see what was committed
    since, and the rows come in the promised order (ties on ``at_ms`` by seq), none twice
    or missing."""
    path = tmp_path / "m.db"
    store = Store.open(path)
    reader = await open_reader(path) if with_reader else None
    other = connect(path)
    try:
        usage = SqliteUsage(store, reader)

        async def record(i: int, cid: str, at: float) -> None:
            row = UsageRow(f"r{i}", at, cid, "k", "rule", "v1", 200,
                           [UsageItem("api_calls", 1, 0, 1)], method="GET", path="/x")
            fut = store.record(row, wait=True)
            assert fut is not None
            await fut
            await usage.materialize()

        t = NOV + 5
        for i, cid in enumerate(["a", "b", "a", "a", "b", "a", "a"]):
            await record(i, cid, t if i < 5 else t - 1)     # the last two older: order moves
        by_seq = []
        async for batch in usage.audit_stream(None, NOV, NOV + 60, batch=2):
            assert len(batch) <= 2
            by_seq += [r.request_id for r in batch]
            # between two batches: nothing holds a read mark, so a TRUNCATE checkpoint from
            # another connection finishes (busy 0) ...
            assert other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
            if len(by_seq) == 2:
                # ... and a read through the same connection sees a row committed meanwhile
                await record(100, "c", NOV + 30)
                assert (await usage.audit_for_request("r100"))[0].customer_id == "c"
                _, _, totals = await usage.usage("c", NOV, NOV + 60)
                assert totals["api_calls"].quantity == 1
        assert by_seq == [f"r{i}" for i in range(7)] + ["r100"]
        of_a = [r.request_id async for b in usage.audit_stream("a", NOV, NOV + 60, batch=1)
                for r in b]
        assert of_a == ["r5", "r6", "r0", "r2", "r3"]       # at_ms, then seq
        among = [r.request_id async for b in usage.audit_stream(None, NOV, NOV + 60, ["b"], 1)
                 for r in b]
        assert among == ["r1", "r4"]
    finally:
        other.close()
        if reader is not None:
            await reader.close()
        store.close()


async def test_an_anchor_with_seconds_bills_its_boundary_minute_once(backend: Backend) -> None:
    """Stripe anchors keep their seconds (12:30:15). The minute 12:30:00 starts before the new
    period: staging bills it on the old invoice, and every reader agrees: the usage query
    (admin API, CLI), the usage report's ``usage_days``, the request reads (exports)."""
    u = backend.storage.usage
    anchor = calendar.timegm((2026, 1, 15, 12, 30, 15))
    await backend.customer("c1", "cus_c1", anchor=anchor)
    start = calendar.timegm((2026, 11, 15, 12, 30, 15))       # this period's start
    minute = start - 15                                        # 12:30:00, the boundary minute
    await backend.usage("c1", minute + 5, quantity=3 * QSCALE, rid="before")     # 12:30:05
    await backend.usage("c1", minute + 40, quantity=2 * QSCALE, rid="same-min")  # 12:30:40
    await backend.usage("c1", start + 600, quantity=QSCALE, rid="later")         # 12:40:15
    now = start + 3600
    cur = period_bounds(anchor, now)
    prev = period_bounds(anchor, start - 1)
    assert cur[0] == start and prev[1] == start

    s, _e, totals = await u.usage("c1", now=now)                 # the default: this period
    assert s == start and totals["api_calls"].billable == QSCALE
    _, _, totals = await u.usage("c1", *prev, now=now)
    assert totals["api_calls"].billable == 5 * QSCALE

    days = await u.usage_days("c1", prev[0], cur, int(now - 7 * 86400))
    assert sum(d.billable for d in days if d.in_period) == QSCALE

    async def export(lo: float, hi: float) -> list[str]:
        return [r.request_id async for b in u.audit_stream("c1", lo, hi) for r in b]

    assert await export(*cur) == ["later"]
    assert await export(*prev) == ["before", "same-min"]
    assert await u.audit_versions(*cur) == ["v1"]
    assert await u.audit_versions(start + 601, now) == []

    staged = await backend.storage.outbox.stage({"api_calls": ("api_calls", None)}, now=now)
    by_period: dict[int, int] = {}
    for ev in staged:
        p = period_bounds(anchor, ev.timestamp)[0]
        by_period[p] = by_period.get(p, 0) + ev.value
    assert by_period == {prev[0]: 5, start: 1}
