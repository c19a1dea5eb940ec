"""Contract of the ``Outbox`` owner (proxy.store.protocols.Outbox), for every backend."""

from __future__ import annotations

import asyncio
import time

from proxy.pricing import TransformQuantity
from proxy.units import QSCALE
from tests.store.conftest import Backend

NAMES = {"api_calls": ("api_calls", None)}
HOUR = 3600
T0 = 1_700_000_000 // HOUR * HOUR          # an hour boundary


async def _staged(b: Backend, units: float = 3.0, cid: str = "c1", at: float = T0 + 10) -> int:
    await b.customer(cid, f"cus_{cid}")
    await b.usage(cid, at, quantity=int(units * QSCALE))
    staged = await b.storage.outbox.stage(NAMES, now=at + 100)
    assert len(staged) == 1
    (row,) = await b.storage.outbox.rows(customer_id=cid, limit=1)
    return row.id


async def test_stage_floors_carries_and_is_idempotent(backend: Backend) -> None:
    ob = backend.storage.outbox
    await backend.customer("c1", "cus_1")
    await backend.usage("c1", T0 + 10, quantity=2_500_000)
    first = await ob.stage(NAMES, now=T0 + 100)
    assert [(e.customer_id, e.event_name, e.value, e.window_start) for e in first] == [
        ("c1", "api_calls", 2, T0)]
    assert await ob.stage(NAMES, now=T0 + 100) == []            # nothing new: nothing staged
    assert await ob.remainders("c1") == {"api_calls:api_calls": 500_000}
    await backend.usage("c1", T0 + 20, quantity=700_000, rid="r2")
    second = await ob.stage(NAMES, now=T0 + 200)
    assert [e.value for e in second] == [1]                    # 0.5 carried + 0.7 = 1.2
    assert await ob.remainders("c1") == {"api_calls:api_calls": 200_000}
    rows = await ob.rows()
    assert len({r.identifier for r in rows}) == 2              # identifiers never repeat
    assert all(r.status == "pending" and r.attempts == 0 for r in rows)


async def test_stage_with_a_transform_reports_the_period_total_delta(backend: Backend) -> None:
    ob = backend.storage.outbox
    await backend.customer("c1", "cus_1")
    t = {"api_calls": TransformQuantity(1000, "up")}
    await backend.usage("c1", T0 + 10, quantity=1 * QSCALE)
    assert [e.value for e in await ob.stage(NAMES, t, now=T0 + 100)] == [1]   # ceil(1/1000)
    await backend.usage("c1", T0 + 20, quantity=998 * QSCALE, rid="r2")
    assert await ob.stage(NAMES, t, now=T0 + 200) == []        # ceil(999/1000) still 1


async def test_concurrent_staging_never_stages_a_unit_twice(backend: Backend) -> None:
    await backend.customer("c1", "cus_1")
    await backend.usage("c1", T0 + 10, quantity=5 * QSCALE)
    peer = backend.peer()
    got = await asyncio.gather(backend.storage.outbox.stage(NAMES, now=T0 + 100),
                               peer.outbox.stage(NAMES, now=T0 + 100),
                               backend.storage.outbox.stage(NAMES, now=T0 + 100))
    assert sum(e.value for batch in got for e in batch) == 5
    assert sum(r.value for r in await backend.storage.outbox.rows()) == 5


async def test_due_orders_by_id_limits_and_respects_next_attempt(backend: Backend) -> None:
    ob = backend.storage.outbox
    await backend.customer("c1", "cus_1")
    for i in range(3):
        await backend.usage("c1", T0 + i * HOUR + 5, quantity=QSCALE, rid=f"r{i}")
    await ob.stage(NAMES, now=T0 + 3 * HOUR)
    due = await ob.due(T0 + 3 * HOUR)
    assert [d.id for d in due] == sorted(d.id for d in due) and len(due) == 3
    assert due[0].stripe_customer_id == "cus_1" and due[0].value == 1
    assert len(await ob.due(T0, limit=2)) == 2
    await ob.retry_at(due[0].id, T0 + 10 * HOUR, "x" * 600)
    assert [d.id for d in await ob.due(T0 + 9 * HOUR)] == [due[1].id, due[2].id]
    assert [d.id for d in await ob.due(T0 + 10 * HOUR)] == [d.id for d in due]
    (row,) = await ob.rows(outbox_id=due[0].id)
    assert row.status == "pending" and row.last_error == "x" * 500


async def test_begin_attempt_counts_before_the_call(backend: Backend) -> None:
    oid = await _staged(backend)
    ob = backend.storage.outbox
    await ob.begin_attempt([oid])
    await ob.begin_attempt([oid])
    assert [d.attempts for d in await ob.due(float("inf"))] == [2]
    assert (await backend.peer().outbox.due(float("inf")))[0].attempts == 2   # durable


async def test_mark_sent_is_final_and_clears_the_error(backend: Backend) -> None:
    oid = await _staged(backend)
    ob = backend.storage.outbox
    await ob.retry_at(oid, 0, "boom")
    await ob.mark_sent(oid, sink="meter_events", outcome="delivered", at=T0 + 500)
    await ob.mark_sent(oid, sink="meter_events", outcome="delivered", at=T0 + 500)
    (row,) = await ob.rows(outbox_id=oid)
    assert (row.status, row.sent_at, row.sink, row.outcome, row.last_error) == (
        "sent", T0 + 500, "meter_events", "delivered", None)
    assert await ob.due(float("inf")) == []
    assert await ob.counts() == type(await ob.counts())(0, 0, 0)


async def test_dry_run_keeps_attempts_and_requeue_is_idempotent(backend: Backend) -> None:
    """``attempts`` (real calls made: a real sink's Idempotency-Keys) is never reset, so a
    row a real sink tried before a dry run is never given one of its old keys again."""
    oid = await _staged(backend)
    ob = backend.storage.outbox
    await ob.begin_attempt([oid])
    await ob.mark_dry_run(oid, sink="dry_run", outcome="dry_run")
    (row,) = await ob.rows(status="dry_run")
    assert (row.id, row.attempts) == (oid, 1)
    assert (await ob.counts()).dry_run == 1
    assert await ob.requeue_dry_run() == 1
    assert await ob.requeue_dry_run() == 0
    (row,) = await ob.rows(outbox_id=oid)
    assert (row.status, row.sink, row.outcome) == ("pending", None, None)
    assert [d.id for d in await ob.due(0)] == [oid]


async def test_dead_letters_replay_once_and_restamp(backend: Backend) -> None:
    oid = await _staged(backend)
    ob = backend.storage.outbox
    assert await ob.replay(oid) is False                       # pending, not dead
    await ob.mark_dead(oid, reason="r" * 600, sink="meter_events", at=T0 + 9)
    (row,) = await ob.rows(status="dead")
    assert (row.dead_at, row.last_error) == (T0 + 9, "r" * 500)
    assert await ob.due(float("inf")) == []                    # never resent while dead
    assert (await ob.counts()).dead == 1
    assert await ob.replay(oid, restamp_at=T0 + 999) is True
    assert await ob.replay(oid) is False                       # a second replay changes nothing
    (row,) = await ob.rows(outbox_id=oid)
    assert (row.status, row.timestamp, row.dead_at) == ("pending", T0 + 999, None)
    assert await ob.replay(123456) is False


async def test_make_due_touches_only_pending_rows(backend: Backend) -> None:
    a = await _staged(backend, cid="a")
    b = await _staged(backend, cid="b")
    ob = backend.storage.outbox
    await ob.retry_at(a, T0 + 10 * HOUR, "later")
    await ob.retry_at(b, T0 + 10 * HOUR, "later")
    await ob.mark_dead(b, reason="x", sink="s", at=1)
    assert await ob.make_due([a, b, 999]) == 1
    assert [d.id for d in await ob.due(0)] == [a]


async def test_rows_filters_newest_first(backend: Backend) -> None:
    a = await _staged(backend, cid="a")
    b = await _staged(backend, cid="b")
    ob = backend.storage.outbox
    assert [r.id for r in await ob.rows()] == [b, a]
    assert [r.id for r in await ob.rows(limit=1)] == [b]
    assert [r.id for r in await ob.rows(customer_id="a")] == [a]
    assert await ob.rows(status="sent") == []
    (row,) = await ob.rows(outbox_id=a)
    assert (row.customer_id, row.meter, row.event_name, row.covered, row.value) == (
        "a", "api_calls", "api_calls", False, 3)


async def test_lag_sources_and_reconciliation_views(backend: Backend) -> None:
    ob = backend.storage.outbox
    assert await ob.oldest_pending_created() is None
    assert await backend.storage.usage.oldest_unstaged_minute() is None
    await backend.customer("c1", "cus_1")
    await backend.usage("c1", T0 + 70, quantity=2 * QSCALE)
    assert await backend.storage.usage.oldest_unstaged_minute() == T0 + 60
    await ob.stage(NAMES, now=T0 + 100)
    assert await backend.storage.usage.oldest_unstaged_minute() is None
    assert await ob.oldest_pending_created() == T0 + 100
    (oid,) = [r.id for r in await ob.rows()]
    (h,) = await ob.hour_totals(T0, T0 + HOUR)
    assert (h.customer_id, h.event_name, h.hour, h.total, h.pending, h.sent, h.rows) == (
        "c1", "api_calls", T0, 2, 2, 0, 1)
    await ob.mark_sent(oid, sink="s", outcome="delivered", at=T0 + 200)
    (h,) = await ob.hour_totals(T0, T0 + HOUR)
    assert (h.sent, h.pending, h.dead, h.last_sent_at) == (2, 0, 0, T0 + 200)
    assert await ob.hour_totals(T0 + HOUR, T0 + 2 * HOUR) == []
    (r,) = await ob.rows_in_hour("c1", "api_calls", T0)
    assert (r[0], r[2]) == (oid, "sent") and r[1].startswith("mp_")


async def test_first_attempt_time_is_kept_cleared_for_uncalled_rows_and_by_replay(
        backend: Backend) -> None:
    """``first_attempt_at``: the start of the first call Stripe may have applied (the
    flusher's resend horizon counts from it). Set once by ``begin_attempt``; cleared by a
    ``retry_at`` saying that attempt's call was never made; cleared by the replay of a row
    dead-lettered as unconfirmed, kept by any other replay."""
    from proxy.store.outbox import UNCONFIRMED

    a = await _staged(backend, cid="a")
    b = await _staged(backend, cid="b")
    ob = backend.storage.outbox

    async def first() -> dict[int, float | None]:
        return {d.id: d.first_attempt_at for d in await ob.due(float("inf"))}

    assert await first() == {a: None, b: None}
    await ob.begin_attempt([a, b], at=T0 + 0.25)
    await ob.begin_attempt([a], at=T0 + 99.5)              # a later attempt keeps the first
    assert await first() == {a: T0 + 0.25, b: T0 + 0.25}
    assert (await backend.peer().outbox.due(float("inf")))[0].first_attempt_at == T0 + 0.25
    await ob.retry_at(b, 0, "behind a failed event", not_called=T0 + 0.25)
    await ob.retry_at(a, 0, "behind a failed event", not_called=T0 + 99.5)   # not its first
    assert await first() == {a: T0 + 0.25, b: None}
    # the uncalled attempt is undone (its key was never used): attempts > 0 means a call
    assert {d.id: d.attempts for d in await ob.due(float("inf"))} == {a: 2, b: 0}
    await ob.begin_attempt([b], at=T0 + 7.75)
    await ob.retry_at(b, 0, "timeout")                     # called: kept
    assert await first() == {a: T0 + 0.25, b: T0 + 7.75}
    await ob.mark_dead(a, reason=f"{UNCONFIRMED}: first sent 20.5 h ago", sink="s", at=T0)
    await ob.mark_dead(b, reason="no active meter", sink="s", at=T0)
    before = time.time()
    assert await ob.replay(a) and await ob.replay(b, restamp_at=T0 + 5)
    after = await first()
    # the unconfirmed one's horizon starts over at its replay; any other keeps its first call
    assert before <= (after[a] or 0) <= time.time() and after[b] == T0 + 7.75
