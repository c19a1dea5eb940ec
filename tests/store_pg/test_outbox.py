"""The PostgreSQL ``Outbox`` owner against its contract, on usage shipped to a real
database: floor-and-carry staging (exact in integers), period-cut windows, transforms, and
every state change of a row."""

from __future__ import annotations

import re

from proxy.pricing import TransformQuantity
from proxy.store.postgres.storage import PostgresStorage
from tests.store_pg.helpers import C, ship, usage_row

T0 = 1_767_225_600          # 2026-01-01T00:00:00Z


async def test_staging_floors_carries_and_never_stages_twice(pg: PostgresStorage) -> None:
    await pg.customers.upsert("acme", "cus_1", None, None)
    rows = [usage_row(1, "acme", T0 + 10, quantity=1_500_000),
            usage_row(2, "acme", T0 + 70, quantity=1_500_000),
            usage_row(3, "acme", T0 + 130, quantity=1_500_000),
            usage_row(4, "acme", T0 + 3605, quantity=700_000)]
    assert await ship(pg, "m1", rows[:3]) == 3
    assert await pg.usage.oldest_unstaged_minute() == T0
    staged = await pg.outbox.stage({"api_calls": ("api_requests", None)}, now=T0 + 7200)
    assert [(e.customer_id, e.event_name, e.value, e.window_start, e.timestamp)
            for e in staged] == [("acme", "api_requests", 4, T0, T0 + 179)]
    assert await pg.outbox.remainders("acme") == {"api_calls:api_requests": 500_000}
    assert await pg.usage.oldest_unstaged_minute() is None
    assert await pg.outbox.stage({"api_calls": ("api_requests", None)}, now=T0 + 7200) == []
    # a resend of shipped rows adds nothing; the next hour carries the remainder
    assert await ship(pg, "m1", rows) == 1
    staged = await pg.outbox.stage({"api_calls": ("api_requests", None)}, now=T0 + 7200)
    assert [(e.value, e.window_start, e.timestamp) for e in staged] == [(1, T0 + 3600, T0 + 3659)]
    assert await pg.outbox.remainders("acme") == {"api_calls:api_requests": 200_000}
    listed = await pg.outbox.rows()
    total = sum(e.value for e in listed) * C + 200_000
    assert total == 3 * 1_500_000 + 700_000
    install = listed[0].identifier.split("_")[1]
    assert all(re.fullmatch(rf"mp_{install}_{e.id}_[0-9a-f]{{8}}", e.identifier)
               for e in listed), [e.identifier for e in listed]
    assert [e.id for e in listed] == sorted((e.id for e in listed), reverse=True)


async def test_covered_usage_is_its_own_event(pg: PostgresStorage) -> None:
    await pg.customers.upsert("acme", None, None, None)
    await ship(pg, "m1", [usage_row(1, "acme", T0 + 5, meter="m", quantity=3 * C, billable=C)])
    staged = await pg.outbox.stage({"m": ("m_billed", "m_covered")}, now=T0 + 3600)
    assert sorted((e.event_name, e.covered, e.value) for e in staged) == [
        ("m_billed", False, 1), ("m_covered", True, 2)]


async def test_a_mid_hour_anchor_cuts_the_window(pg: PostgresStorage) -> None:
    await pg.customers.upsert("acme", None, None, None,
                              billing=lambda _c: (T0 + 1800, 0))     # periods start at :30
    await ship(pg, "m1", [usage_row(1, "acme", T0 + 60), usage_row(2, "acme", T0 + 2400)])
    staged = await pg.outbox.stage({}, now=T0 + 7200)
    assert [(e.value, e.window_start, e.timestamp) for e in staged] == [
        (1, T0, T0 + 119), (1, T0 + 1800, T0 + 2459)]


async def test_a_transformed_meter_reports_the_change_of_the_period_total(
        pg: PostgresStorage) -> None:
    await pg.customers.upsert("acme", None, None, None)
    t = {"tok": TransformQuantity(divide_by=1000, round="up")}
    await ship(pg, "m1", [usage_row(1, "acme", T0 + 5, meter="tok", quantity=C)])
    assert [e.value for e in await pg.outbox.stage({}, t, now=T0 + 60)] == [1]
    await ship(pg, "m1", [usage_row(2, "acme", T0 + 65, meter="tok", quantity=5 * C)])
    assert await pg.outbox.stage({}, t, now=T0 + 120) == []       # ceil(6/1000) is still 1
    assert await pg.outbox.remainders("acme") == {}


async def test_every_state_change_of_a_row(pg: PostgresStorage) -> None:
    await pg.customers.upsert("acme", "cus_1", None, None)
    await ship(pg, "m1", [usage_row(i, "acme", T0 + 3600 * (i - 1)) for i in range(1, 5)])
    staged = await pg.outbox.stage({}, now=T0 + 5 * 3600)
    assert len(staged) == 4
    a, b, c, d = sorted(e.id for e in await pg.outbox.rows())
    now = T0 + 5 * 3600
    due = await pg.outbox.due(now)
    assert [(e.id, e.value, e.attempts, e.stripe_customer_id) for e in due] == [
        (a, 1, 0, "cus_1"), (b, 1, 0, "cus_1"), (c, 1, 0, "cus_1"), (d, 1, 0, "cus_1")]
    assert [e.id for e in await pg.outbox.due(now, limit=2)] == [a, b]
    await pg.outbox.begin_attempt([a, b])
    await pg.outbox.mark_sent(a, sink="stripe", outcome="ok", at=now)
    await pg.outbox.retry_at(b, now + 100, "x" * 600)
    assert [e.id for e in await pg.outbox.due(now)] == [c, d]
    assert [e.id for e in await pg.outbox.due(now + 100)] == [b, c, d]
    (rb,) = await pg.outbox.rows(outbox_id=b)
    assert (rb.attempts, rb.last_error, rb.status) == (1, "x" * 500, "pending")
    (ra,) = await pg.outbox.rows(status="sent")
    assert (ra.id, ra.sent_at, ra.sink, ra.outcome, ra.attempts) == (a, now, "stripe", "ok", 1)
    await pg.outbox.mark_dead(c, reason="r" * 600, sink="stripe", at=now + 1)
    await pg.outbox.mark_dry_run(d, sink="dry_run", outcome="logged")
    counts = await pg.outbox.counts()
    assert (counts.pending, counts.dead, counts.dry_run) == (1, 1, 1)
    (rc,) = await pg.outbox.rows(status="dead")
    assert (rc.id, rc.dead_at, len(rc.last_error or "")) == (c, now + 1, 500)
    assert await pg.outbox.make_due([a, b, c]) == 1                # only b is pending
    assert [e.id for e in await pg.outbox.due(now)] == [b]
    assert await pg.outbox.replay(c, restamp_at=now + 50) is True
    assert await pg.outbox.replay(c) is False
    assert await pg.outbox.replay(999_999) is False
    (rc,) = await pg.outbox.rows(outbox_id=c)
    assert (rc.status, rc.timestamp, rc.dead_at) == ("pending", now + 50, None)
    async with pg.pool.acquire() as conn:
        dl = await conn.fetchrow("SELECT reason, replayed_at FROM dead_letters"
                                 " WHERE outbox_id=$1", c)
    assert dl is not None and dl["reason"] == "r" * 500 and dl["replayed_at"] is not None
    assert await pg.outbox.requeue_dry_run() == 1
    assert await pg.outbox.requeue_dry_run() == 0
    (rd,) = await pg.outbox.rows(outbox_id=d)
    assert (rd.status, rd.attempts, rd.sink, rd.outcome) == ("pending", 0, None, None)
    assert await pg.outbox.oldest_pending_created() == now
    assert [e.id for e in await pg.outbox.rows(customer_id="acme", limit=2)] == [d, c]
    assert await pg.outbox.rows(customer_id="other") == []
    totals = await pg.outbox.hour_totals(T0, T0 + 2 * 3600)
    assert sorted((h.hour, h.total, h.sent, h.pending, h.dead, h.last_sent_at, h.rows)
                  for h in totals) == [(T0, 1, 1, 0, 0, now, 1), (T0 + 3600, 1, 0, 1, 0, 0, 1)]
    assert [(i, s) for i, _ident, s in await pg.outbox.rows_in_hour("acme", "api_calls",
                                                                       T0 + 3600)] == [
        (b, "pending")]
