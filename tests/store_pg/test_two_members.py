"""Two fleet members (two ``PostgresStorage`` objects, each with its own pool) racing on
the verbs where concurrency matters, on one real database: staging while usage ships
(never a unit staged twice or lost), webhook dedupe, alerts fired and claimed once, grant
idempotency, customer creation, dead-letter replay and claw-backs exactly once."""

from __future__ import annotations

import asyncio

from proxy.credits.ledger import Entry, GrantState
from proxy.store.postgres.shipping import Shipper
from proxy.store.postgres.storage import PostgresStorage
from proxy.store.protocols import ClawbackDecision, GrantFacts, NewAlert, NewGrant
from tests.store_pg.conftest import MemberFactory
from tests.store_pg.helpers import C, conflicts, usage_row

T0 = 1_767_225_600


async def _pair(member: MemberFactory) -> tuple[PostgresStorage, PostgresStorage]:
    return await member(), await member()


async def test_staging_races_shipping_and_another_stager(member: MemberFactory) -> None:
    a, b = await _pair(member)
    for cid in ("c1", "c2", "c3"):
        await a.customers.upsert(cid, None, None, None)
    shipped = 0
    done = asyncio.Event()

    async def ship_from(m: PostgresStorage, member_id: str, offset: int) -> None:
        nonlocal shipped
        shipper = Shipper(m.pool, member_id)
        seq = 0
        for _batch in range(40):
            rows = []
            for _ in range(5):
                seq += 1
                q = 300_001 + 7 * seq                  # fractions that never divide evenly
                rows.append(usage_row(seq, f"c{1 + seq % 3}", T0 + offset + seq % 2 * 3600,
                                      quantity=q, key=member_id))
                shipped += q
            await shipper.ship(rows)
            await asyncio.sleep(0)

    staged: list[int] = []

    async def stage_until_done(m: PostgresStorage) -> None:
        while not done.is_set():
            staged.extend(e.value for e in await m.outbox.stage({}, now=T0 + 10 * 86_400))
            await asyncio.sleep(0)

    stagers = [asyncio.ensure_future(stage_until_done(m)) for m in (a, b, a, b)]
    await asyncio.gather(ship_from(a, "m1", 0), ship_from(b, "m2", 50))
    done.set()
    await asyncio.gather(*stagers)
    staged.extend(e.value for e in await b.outbox.stage({}, now=T0 + 10 * 86_400))
    remainders = [v for cid in ("c1", "c2", "c3")
                  for v in (await a.outbox.remainders(cid)).values()]
    carried = sum(remainders)
    rows = await a.outbox.rows(limit=10_000)
    assert sum(staged) == sum(r.value for r in rows)
    assert sum(staged) * C + carried == shipped                     # every unit, once
    assert all(0 <= v < C for v in remainders)
    assert len({r.identifier for r in rows}) == len(rows)
    assert await a.usage.oldest_unstaged_minute() is None
    async with a.pool.acquire() as c:
        assert await c.fetchval("SELECT count(*) FROM usage_minute WHERE reported <> billable"
                                " OR reported_covered <> covered") == 0


async def test_a_webhook_is_stored_once_fleet_wide(member: MemberFactory) -> None:
    a, b = await _pair(member)
    got = await asyncio.gather(*(m.webhooks.record("evt_1", "invoice.paid", 1, "{}", i)
                                 for i, m in enumerate([a, b] * 10)))
    assert sorted(got) == [False] * 19 + [True]
    assert len(await b.webhooks.recent()) == 1


async def test_alerts_fire_once_and_are_claimed_once(member: MemberFactory) -> None:
    a, b = await _pair(member)
    crossing = [NewAlert(f"c{i}", "2026-01", "80%", "{}", 1) for i in range(20)]
    a.alerts.fire(crossing)
    b.alerts.fire(list(reversed(crossing)))
    await asyncio.gather(a.alerts.flush(), b.alerts.flush())   # (or the background commit)
    assert len(await a.alerts.fired()) == 20
    async with a.pool.acquire() as c:
        assert await c.fetchval("SELECT count(*) FROM alerts") == 20
    due = await b.alerts.due(5.0)
    assert len(due) == 20
    claims = await asyncio.gather(*(m.alerts.claim(r.id, 5.0, 100.0)
                                    for r in due for m in (a, b, a, b)))
    assert sorted(c for c in claims if c is not None) == [1] * 20
    assert claims.count(None) == 60


async def test_a_grant_is_created_once_and_deposited_once(member: MemberFactory) -> None:
    a, b = await _pair(member)
    await a.customers.upsert("acme", None, None, None)
    results = await asyncio.gather(*(
        m.ledger.create_grant(NewGrant(GrantState(f"g{i}", "acme", 700), "topup:1"))
        for i, m in enumerate([a, b] * 5)))
    assert sum(created for _g, created in results) == 1
    assert len({g.id for g, _c in results}) == 1
    async with a.pool.acquire() as c:
        assert await c.fetchval("SELECT balance FROM credit_accounts WHERE customer_id='acme'"
                                ) == 700
        assert await c.fetchval("SELECT count(*) FROM grants") == 1


async def test_a_new_customer_is_created_once(member: MemberFactory) -> None:
    a, b = await _pair(member)
    results = await asyncio.gather(*(m.customers.upsert("acme", None, None, None)
                                     for m in [a, b] * 5))
    assert sum(created for _c, created in results) == 1
    changed = await asyncio.gather(*(
        m.customers.change_suspension("newco", lambda s, w: ("suspended", "unpaid"))
        for m in [a, b] * 5))
    assert changed.count(True) == 1


async def test_a_dead_letter_is_replayed_once(member: MemberFactory) -> None:
    a, b = await _pair(member)
    await a.customers.upsert("acme", None, None, None)
    await Shipper(a.pool, "m1").ship([usage_row(1, "acme", T0)])
    (ev,) = await a.outbox.stage({}, now=T0 + 60)
    (row,) = await a.outbox.rows()
    await a.outbox.mark_dead(row.id, reason="bad", sink="stripe", at=1)
    replays = await asyncio.gather(*(m.outbox.replay(row.id) for m in [a, b] * 5))
    assert replays.count(True) == 1
    assert ev.value == 1


async def test_a_claw_back_takes_credits_once(member: MemberFactory) -> None:
    a, b = await _pair(member)
    await a.customers.upsert("acme", None, None, None)
    await a.ledger.create_grant(NewGrant(GrantState("g1", "acme", 1000), "buy:1",
                                         payment_refs=("pi_1",), paid_minor=1000))

    def decide(f: GrantFacts) -> ClawbackDecision | None:
        want = 400
        if f.previous_credits >= want:
            return None
        return ClawbackDecision(want, [Entry(f.grant_id, "void", want - f.previous_credits)])

    outs = await asyncio.gather(*(m.ledger.claw_back("acme", ["pi_1"], "refund:re_1", "evt", 400,
                                                     decide) for m in [a, b] * 4))
    assert sum(n for out in outs for _g, n, _e in out) == 400
    assert await a.ledger.entry_total("g1", "void") == 400
    async with a.pool.acquire() as c:
        assert await c.fetchval("SELECT balance FROM credit_accounts WHERE customer_id='acme'"
                                ) == 600


async def test_members_firing_one_set_in_opposite_orders_never_deadlock(
        member: MemberFactory) -> None:
    """Alert inserts are serialized fleet-wide: two members inserting the same alerts in
    opposite orders took the unique index's locks in opposite orders, and PostgreSQL
    aborted one every second (deadlock_timeout) until a statement timed out."""
    a, b = await _pair(member)
    before = conflicts("retried")
    for rnd in range(3):
        crossing = [NewAlert(f"c{i:03}", f"2026-0{rnd + 1}", "80%", "{}", 1) for i in range(300)]
        new = await asyncio.gather(a.alerts.fire_new(crossing),
                                   b.alerts.fire_new(list(reversed(crossing))),
                                   a.alerts.fire_new(crossing[::2] + crossing[1::2]),
                                   b.alerts.fire_new(crossing[1::2][::-1] + crossing[::2]))
        assert sorted(n.customer_id for got in new for n in got) == \
            [c.customer_id for c in crossing]                     # each inserted once
    assert conflicts("retried") == before                        # no transaction rolled back
