"""Fenced leadership on a real PostgreSQL: one leader, failover within the stated bound, and a
deposed leader's writes refused (the outbox rows stay as the new leader left them)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from proxy.store.postgres.leader import Deposed, Leadership, claim_outbox, mark_sent
from proxy.store.postgres.pool import PgPool
from tests.helpers import wait_until
from tests.stripe_double.fixture import RunningDouble

TTL = 600


async def _outbox(pool: PgPool, n: int) -> None:
    async with pool.acquire() as conn:
        await conn.executemany(
            "INSERT INTO outbox(identifier, customer_id, meter, event_name, value, window_start, "
            "timestamp, created_at) VALUES ($1, 'acme', 'api_calls', 'api_calls', 1, 0, 0, 0)",
            [(f"mp_x_{i}",) for i in range(n)])


async def _states(pool: PgPool) -> list[tuple[str, int | None]]:
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT status, claim_fence FROM outbox ORDER BY id")
    return [(r[0], r[1]) for r in rows]


async def test_one_leader_then_failover_and_the_deposed_cannot_write(pool: PgPool) -> None:
    await _outbox(pool, 4)
    a = Leadership(pool, "flusher", "a", ttl_ms=TTL)
    b = Leadership(pool, "flusher", "b", ttl_ms=TTL)
    assert await a.try_lead() and a.fence == 1
    assert not await b.try_lead()
    assert await a.try_lead() and a.fence == 1            # renewal keeps the fence
    claimed = await claim_outbox(a, 2, now=0.0)
    assert len(claimed) == 2
    last_renewal = time.monotonic()
    # a pauses (stops renewing); b tries every ttl/3 as a member does
    for _ in range(50):
        if await b.try_lead():
            break
        await asyncio.sleep(TTL / 3 / 1000)
    took = (time.monotonic() - last_renewal) * 1000
    assert b.fence == 2
    assert TTL * 0.9 <= took <= b.failover_bound_ms + 200
    # a's own clock already tells it that it lost the lease
    assert not a.leads()
    with pytest.raises(Deposed):
        await mark_sent(a, claimed, 1, "meter_events")
    # even with a clock that stalled (it still believes it leads), the database refuses it
    a._until_ms = a.clock() + 60_000
    assert a.leads()
    with pytest.raises(Deposed):
        await mark_sent(a, claimed, 1, "meter_events")
    assert a.fence is None
    assert await _states(pool) == [("pending", 1)] * 2 + [("pending", None)] * 2
    mine = await claim_outbox(b, 10, now=0.0)
    assert len(mine) == 4
    assert await mark_sent(b, mine, 2, "meter_events") == 4
    assert await _states(pool) == [("sent", 2)] * 4


async def test_resign_hands_over_at_once(pool: PgPool) -> None:
    a = Leadership(pool, "flusher", "a", ttl_ms=60_000)
    b = Leadership(pool, "flusher", "b", ttl_ms=60_000)
    assert await a.try_lead()
    assert not await b.try_lead()
    await a.resign()
    assert await b.try_lead() and b.fence == 2
    with pytest.raises(Deposed):
        async with a.fenced():
            pass


async def test_duties_are_independent(pool: PgPool) -> None:
    a = Leadership(pool, "flusher", "a")
    b = Leadership(pool, "reaper", "b")
    assert await a.try_lead() and await b.try_lead()
    assert (a.fence, b.fence) == (1, 1)


async def test_a_leader_never_claims_a_row_twice(pool: PgPool) -> None:
    await _outbox(pool, 3)
    a = Leadership(pool, "flusher", "a")
    assert await a.try_lead()
    first = await claim_outbox(a, 2, now=0.0)
    second = await claim_outbox(a, 2, now=0.0)
    assert len(first) == 2 and len(second) == 1 and not set(first) & set(second)
    assert await claim_outbox(a, 2, now=0.0) == []


async def test_the_flushers_outbox_verbs_refuse_a_deposed_leader(pool: PgPool) -> None:
    """The outbox the flusher really uses (``Fleet.flusher_outbox``: every verb in a fenced
    transaction): once another member leads, the old leader can neither mark a row sent or
    dead, nor count an attempt, nor schedule a retry, nor stage, even with a stalled clock
    that still says it leads. The rows stay as they were."""
    from proxy.fleet.runtime import FencedPool
    from proxy.store.postgres.outbox import PostgresOutbox

    await _outbox(pool, 3)
    a = Leadership(pool, "flusher", "a", ttl_ms=TTL)
    b = Leadership(pool, "flusher", "b", ttl_ms=TTL)
    assert await a.try_lead()
    old = PostgresOutbox(FencedPool(pool, a))
    ids = [d.id for d in await old.due(now=1.0)]
    assert len(ids) == 3
    await old.mark_sent(ids[0], sink="meter_events", outcome="sent", at=1)   # while leading
    await wait_until(b.try_lead, timeout=5, interval=TTL / 3 / 1000, what="b takes over")
    a._until_ms = a.clock() + 60_000        # a stalled clock: a believes it still leads
    assert a.leads()

    async def rows() -> list[tuple[str, int, float, str | None]]:
        async with pool.acquire() as conn:
            got = await conn.fetch("SELECT status, attempts, next_attempt_at, last_error"
                                   " FROM outbox ORDER BY id")
        return [tuple(r) for r in got]  # type: ignore[misc]

    before = await rows()
    for verb in (lambda: old.mark_sent(ids[1], sink="meter_events", outcome="sent", at=2),
                 lambda: old.mark_dead(ids[1], reason="x", sink="meter_events", at=2),
                 lambda: old.begin_attempt(ids[1:]),
                 lambda: old.retry_at(ids[2], 99.0, "boom"),
                 lambda: old.stage({"api_calls": ("api_calls", None)})):
        a._until_ms = a.clock() + 60_000
        a.fence = 1
        with pytest.raises(Deposed):
            await verb()
    assert await rows() == before
    assert before[0][0] == "sent" and before[1][0] == before[2][0] == "pending"
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 0
    new = PostgresOutbox(FencedPool(pool, b))
    await new.mark_dead(ids[1], reason="x", sink="meter_events", at=3)
    assert (await rows())[1][0] == "dead"


async def test_a_leader_that_learns_it_was_deposed_mid_flush_makes_no_further_call(
        pool: PgPool, tmp_path: Path,
        stripe_double_factory: Callable[..., Awaitable[RunningDouble]]) -> None:
    """The flusher's leader is deposed while its flush waits on a call (four customers, one
    call at a time). Its next outbox write raises ``Deposed``: from then on it must start no
    call to Stripe (the new leader resends those rows after its hold; a deposed leader that
    goes on calling overlaps it, docs/fleet.md: "calls for one customer and meter never
    overlap across a failover"). Its clock is stalled: it would still believe it leads."""
    from proxy.fleet.journal_shipping import JournalShipping
    from proxy.fleet.runtime import ERRORS, FencedPool
    from proxy.flusher import Flusher
    from proxy.store.db import Store
    from proxy.store.postgres.journal import SqliteJournal
    from proxy.store.postgres.outbox import PostgresOutbox
    from proxy.store.postgres.storage import PostgresStorage
    from proxy.stripe.client import StripeClient
    from proxy.stripe.meter_events import MeterEventsSink
    from tests.stripe_double.fixture import TEST_API_KEY

    double = await stripe_double_factory()
    st = double.state
    st.add_meter("api_calls")
    st.processing_gate = asyncio.Event()
    now = int(time.time())
    async with pool.acquire() as conn:
        for i in range(4):
            await conn.execute("INSERT INTO customers(id, stripe_customer_id, created_at,"
                               " updated_at) VALUES ($1, $2, 0, 0)", f"c{i}", f"cus_{i}")
            await conn.execute(
                "INSERT INTO outbox(identifier, customer_id, meter, event_name, value,"
                " window_start, timestamp, created_at) VALUES ($1, $2, 'api_calls',"
                " 'api_calls', 1, $3, $3, $3)", f"mp_x_{i}", f"c{i}", now)
    a = Leadership(pool, "flusher", "a", ttl_ms=TTL)
    b = Leadership(pool, "flusher", "b", ttl_ms=TTL)
    assert await a.try_lead()
    store = Store.open(tmp_path / "a.db", keep_journal=True)
    storage = PostgresStorage.on(pool, local=store, shipping=JournalShipping(
        pool, "a", SqliteJournal(store.conn)))
    conn_ = StripeClient(TEST_API_KEY, api_base=double.url, meter_events_base=double.url,
                         timeout=5.0)
    flusher = Flusher(store, MeterEventsSink(conn_), lambda: {"api_calls": ("api_calls", None)},
                      rate=0, concurrency=1, outbox=PostgresOutbox(FencedPool(pool, a)),
                      usage=storage.usage, leads=a.leads, errors=ERRORS)

    def calls() -> int:
        return sum(1 for r in st.call_log if r.path == "/v1/billing/meter_events")

    try:
        flush = asyncio.ensure_future(flusher.flush(force=True))
        await wait_until(calls, ok=lambda n: n == 1, timeout=10,
                         interval=0.01, what="the first call at Stripe")
        await wait_until(b.try_lead, timeout=5, interval=TTL / 3 / 1000, what="b takes over")
        a._until_ms = a.clock() + 60_000     # a stalled clock: a believes it still leads
        st.processing_gate.set()             # the call in flight ends; a learns it is deposed
        with pytest.raises(Deposed):
            await flush
        await asyncio.sleep(0.5)
        assert calls() == 1
    finally:
        await flusher.close()
        store.close()


async def test_a_new_leader_holds_a_key_whose_call_the_old_leader_may_still_be_making(
        pool: PgPool, tmp_path: Path,
        stripe_double_factory: Callable[..., Awaitable[RunningDouble]]) -> None:
    """Failover with the old leader's call still running at Stripe for customer c0, and a
    newer row for c0 staged meanwhile (never attempted). The new leader holds the row the
    old one attempted for ``ambiguous_hold``; it must hold the newer row of the same customer
    and meter too, or its call overlaps the old leader's (docs/fleet.md: "calls for one
    customer and meter never overlap across a failover"; Stripe answers 429)."""
    from proxy.fleet.journal_shipping import JournalShipping
    from proxy.fleet.runtime import ERRORS, FencedPool
    from proxy.flusher import Flusher
    from proxy.store.db import Store
    from proxy.store.postgres.journal import SqliteJournal
    from proxy.store.postgres.outbox import PostgresOutbox
    from proxy.store.postgres.storage import PostgresStorage
    from proxy.stripe.client import StripeClient
    from proxy.stripe.meter_events import MeterEventsSink
    from tests.stripe_double.fixture import TEST_API_KEY

    double = await stripe_double_factory()
    st = double.state
    st.add_meter("api_calls")
    st.processing_gate = asyncio.Event()
    now = int(time.time())

    async def row(identifier: str) -> None:
        async with pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO outbox(identifier, customer_id, meter, event_name, value,"
                " window_start, timestamp, created_at) VALUES ($1, 'c0', 'api_calls',"
                " 'api_calls', 1, $2, $2, $2)", identifier, now)

    async with pool.acquire() as conn:
        await conn.execute("INSERT INTO customers(id, stripe_customer_id, created_at,"
                           " updated_at) VALUES ('c0', 'cus_0', 0, 0)")
    await row("mp_x_1")
    opened: list[tuple[Flusher, Store]] = []

    def flusher(lead: Leadership) -> Flusher:
        store = Store.open(tmp_path / f"{lead.member_id}.db", keep_journal=True)
        storage = PostgresStorage.on(pool, local=store, shipping=JournalShipping(
            pool, lead.member_id, SqliteJournal(store.conn)))
        conn = StripeClient(TEST_API_KEY, api_base=double.url, meter_events_base=double.url,
                            timeout=5.0)
        f = Flusher(store, MeterEventsSink(conn), lambda: {"api_calls": ("api_calls", None)},
                    rate=0, ambiguous_hold=10.0, outbox=PostgresOutbox(FencedPool(pool, lead)),
                    usage=storage.usage, leads=lead.leads, errors=ERRORS)
        opened.append((f, store))
        return f

    def calls() -> int:
        return sum(1 for r in st.call_log if r.path == "/v1/billing/meter_events")

    a = Leadership(pool, "flusher", "a", ttl_ms=TTL)
    b = Leadership(pool, "flusher", "b", ttl_ms=TTL)
    try:
        assert await a.try_lead()
        old = asyncio.ensure_future(flusher(a).flush(force=True))
        await wait_until(calls, ok=lambda n: n == 1, timeout=10, interval=0.01,
                         what="the old leader's call at Stripe")
        await row("mp_x_2")                  # newer usage of the same customer and meter
        await wait_until(b.try_lead, timeout=5, interval=TTL / 3 / 1000, what="b takes over")
        b.ttl_ms = 60_000                    # b keeps the duty through the test
        assert await b.try_lead()
        new = flusher(b)
        new.took_over()                      # as Fleet.lead_forever does
        report = await new.flush(force=True)
        assert st.concurrency_violations == [], report.to_json()
        assert report.attempted == 0 and report.retrying == 2
        st.processing_gate.set()
        with pytest.raises(Deposed):
            await old
    finally:
        st.processing_gate.set()
        for f, store in opened:
            await f.close()
            store.close()
