"""Grant-level entries for the fleet's shipped usage, on a real PostgreSQL: which grant each
spend came from (burn order, live at the request's time, debt beyond), exactly once per
shipped row; the per-grant state every member reads back; an expiry or void computed from
the shared ledger, not from a member's stale view; a claw-back seeing every member's
spending."""

from __future__ import annotations

import asyncio
from functools import partial

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.credits.book import CreditBook
from proxy.credits.ledger import Entry, GrantState
from proxy.credits.service import CreditService
from proxy.fleet.sizing import LeasePolicy
from proxy.store.postgres import leases
from proxy.store.postgres.grant_debits import ShippedItem, allocate_items, changed, grant_states
from proxy.store.postgres.leases import LeaseStore
from proxy.store.postgres.ledger import PostgresCreditLedger
from proxy.store.postgres.pool import PgPool
from proxy.store.postgres.shipping import LocalRow, ShipItem, Shipper
from proxy.store.protocols import LedgerEntry, NewGrant
from tests.fleet.conftest import PoolFactory, add_customer

C = 1_000_000
NOW = 1_800_000_000


# ---- the pure allocation ----------------------------------------------------------------

grant_st = st.builds(
    lambda i, amount, prio, exp, eff: GrantState(f"g{i}", "c", amount, prio, exp, i, "admin",
                                                 effective_at=eff),
    st.integers(0, 5), st.integers(1, 50), st.sampled_from([0, 50, 100]),
    st.one_of(st.none(), st.integers(0, 100)), st.one_of(st.none(), st.integers(0, 100)))


@settings(max_examples=300)
@given(st.lists(grant_st, max_size=5, unique_by=lambda g: g.id),
       st.lists(st.tuples(st.integers(0, 40), st.integers(0, 120)), max_size=12))
def test_each_item_is_allocated_exactly_its_credits(grants: list[GrantState],
                                                    spends: list[tuple[int, int]]) -> None:
    amounts = {g.id: g.amount for g in grants}
    items = [ShippedItem("c", seq, 0, at * 1000, f"r{seq}", "m", credits)
             for seq, (credits, at) in enumerate(spends, 1)]
    out = allocate_items({"c": grants}, items)
    by_grant: dict[str, int] = {}
    for it in items:
        mine = [a for a in out if a.seq == it.seq]
        assert sum(a.entry.amount for a in mine) == it.credits     # debits + debt = credits
        assert [a.index for a in mine] == list(range(len(mine)))   # unique keys per row
        for a in mine:
            assert a.entry.amount > 0
            if a.entry.kind == "debt":
                assert a.entry.grant_id == ""
                # debt only once every grant live at that time is spent
                assert all(g.remaining == 0 or not g.live(it.at_ms / 1000) for g in grants)
                continue
            g = next(x for x in grants if x.id == a.entry.grant_id)
            assert g.live(it.at_ms / 1000)
            by_grant[g.id] = by_grant.get(g.id, 0) + a.entry.amount
    for gid, used in by_grant.items():
        assert used <= amounts[gid]                                  # never below zero


def test_burn_order_is_priority_then_earliest_expiry() -> None:
    grants = [GrantState("late", "c", 5, 50, None, 1), GrantState("soon", "c", 5, 50, NOW, 2),
              GrantState("first", "c", 5, 10, None, 3)]
    out = allocate_items({"c": grants}, [ShippedItem("c", 1, 0, 1000, "r", "m", 12),
                                         ShippedItem("c", 2, 0, 1000, "r2", "m", 7)])
    assert [(a.seq, a.index, a.entry) for a in out] == [
        (1, 0, Entry("first", "debit", 5)), (1, 1, Entry("soon", "debit", 5)),
        (1, 2, Entry("late", "debit", 2)), (2, 0, Entry("late", "debit", 3)),
        (2, 1, Entry("", "debt", 4))]


# ---- on PostgreSQL ------------------------------------------------------------------------

def _row(seq: int, customer: str, credits: int, at: int = NOW) -> LocalRow:
    return LocalRow(seq, f"r{seq}", at * 1000, customer, "k", "chat", "v1", 200,
                    (ShipItem("api_calls", C, credits=credits),))


async def _grant(pool: PgPool, gid: str, amount: int, priority: int = 50,
                 expires_at: int | None = None, created: int = 0) -> None:
    await PostgresCreditLedger(pool).create_grant(NewGrant(GrantState(
        gid, "acme", amount, priority, expires_at, created, "admin")))


async def _entries(pool: PgPool) -> list[tuple[str | None, str, int, str | None, int | None]]:
    async with pool.acquire() as c:
        rows = await c.fetch("SELECT grant_id, kind, amount, member_id, member_seq"
                             " FROM credit_entries ORDER BY seq")
    return [tuple(r) for r in rows]  # type: ignore[misc]


async def test_shipping_from_two_members_debits_grants_once_in_burn_order(pool: PgPool) -> None:
    await add_customer(pool, "acme")
    await _grant(pool, "plan", 10 * C, priority=50, expires_at=NOW + 3600, created=1)
    await _grant(pool, "pack", 10 * C, priority=50, created=2)
    await _grant(pool, "promo", 3 * C, priority=10, expires_at=NOW + 60, created=3)
    a, b = Shipper(pool, "a"), Shipper(pool, "b")
    await a.ship([_row(1, "acme", 2 * C), _row(2, "acme", 2 * C)])     # promo 3, plan 1
    await b.ship([_row(1, "acme", 8 * C)])                             # plan 8
    await a.ship([_row(1, "acme", 2 * C), _row(3, "acme", 12 * C)])    # a resend; plan 1, pack 10, debt 1
    assert await _entries(pool) == [
        ("promo", "debit", 2 * C, "a", 1), ("promo", "debit", C, "a", 2),
        ("plan", "debit", C, "a", 2), ("plan", "debit", 8 * C, "b", 1),
        ("plan", "debit", C, "a", 3), ("pack", "debit", 10 * C, "a", 3),
        (None, "debt", C, "a", 3)]
    state = {g.id: g for g in (await grant_states(pool, ["acme"]))[0].grants}
    assert {gid: g.remaining for gid, g in state.items()} == {"plan": 0, "pack": 0, "promo": 0}
    assert (await grant_states(pool, ["acme"]))[0].debt == C
    async with pool.acquire() as c:
        acct = await leases.account(c, "acme")
    # the account agrees with the grants: 23 granted, 24 spent, 1 of it debt
    assert (acct.balance, acct.settled, acct.available) == (23 * C, 24 * C, -C)


async def test_usage_is_debited_from_grants_live_at_its_time(pool: PgPool) -> None:
    await add_customer(pool, "acme")
    await _grant(pool, "old", 5 * C, priority=0, expires_at=NOW, created=1)
    await _grant(pool, "new", 5 * C, priority=50, created=2)
    await Shipper(pool, "a").ship([_row(1, "acme", 2 * C, at=NOW - 1),
                                   _row(2, "acme", 2 * C, at=NOW)])
    assert [e[:3] for e in await _entries(pool)] == [("old", "debit", 2 * C),
                                                     ("new", "debit", 2 * C)]


async def test_changed_names_the_customers_whose_credits_moved(pool: PgPool) -> None:
    await add_customer(pool, "acme")
    await add_customer(pool, "zeta")
    await _grant(pool, "g1", 5 * C)
    everyone, rev = await changed(pool, -1)
    assert everyone == ["acme", "zeta"]
    assert (await changed(pool, rev))[0] == []
    await Shipper(pool, "a").ship([_row(1, "acme", C)])
    got, rev2 = await changed(pool, rev)
    assert got == ["acme"] and rev2 > rev


async def test_an_expiry_from_a_stale_view_takes_only_what_is_left(pool: PgPool) -> None:
    """A member's book loaded before two other members spent 6 of the grant's 10 still says
    10 remain; the expiry entry it writes takes the 4 the shared ledger says are left."""
    await add_customer(pool, "acme")
    await _grant(pool, "g1", 10 * C, expires_at=NOW + 10)
    ledger = PostgresCreditLedger(pool)
    stale = CreditBook()
    snap = await ledger.load()
    stale.load(snap.grants, snap.entries, snap.debts)
    await Shipper(pool, "a").ship([_row(1, "acme", 2 * C)])
    await Shipper(pool, "b").ship([_row(1, "acme", 4 * C)])
    service = CreditService(None, stale, ledger)  # type: ignore[arg-type]
    assert stale.due_expiries(NOW + 11) == [Entry("g1", "expire", 10 * C)]
    assert await service.expire_due(NOW + 11) == 1
    assert [e[:3] for e in await _entries(pool)][-1] == ("g1", "expire", 4 * C)
    # a second member's own stale expiry appends nothing
    await ledger.append([LedgerEntry("acme", Entry("g1", "expire", 10 * C))])
    async with pool.acquire() as c:
        acct = await leases.account(c, "acme")
    assert (acct.balance, acct.settled, acct.available) == (6 * C, 6 * C, 0)
    g = (await grant_states(pool, ["acme"]))[0].grants[0]
    assert g.remaining == 0


async def test_a_void_takes_what_is_left_fleet_wide(pool: PgPool) -> None:
    await add_customer(pool, "acme")
    await _grant(pool, "g1", 10 * C)
    await Shipper(pool, "b").ship([_row(1, "acme", 7 * C)])
    await PostgresCreditLedger(pool).append([LedgerEntry("acme", Entry("g1", "void", 10 * C))])
    g = (await grant_states(pool, ["acme"]))[0].grants[0]
    assert (g.remaining, g.voided) == (0, True)
    async with pool.acquire() as c:
        acct = await leases.account(c, "acme")
    assert (acct.balance, acct.available) == (7 * C, 0)


async def test_a_claw_back_sees_every_members_spending(pool: PgPool) -> None:
    """A refund of a whole pack after two members spent 6 of its 10: 4 unused are taken
    back (refund) and 6 spent become debt; the balance follows."""
    await add_customer(pool, "acme")
    ledger = PostgresCreditLedger(pool)
    await ledger.create_grant(NewGrant(GrantState("pack", "acme", 10 * C, 50, None, 0, "stripe"),
                                       "stripe:in_1", payment_refs=("ch_1",), paid_minor=1000))
    await Shipper(pool, "a").ship([_row(1, "acme", 2 * C)])
    await Shipper(pool, "b").ship([_row(1, "acme", 4 * C)])
    book = CreditBook()
    state = await grant_states(pool, ["acme"])
    book.replace(state[0].customer_id, state[0].grants, state[0].debt)
    service = CreditService(None, book, ledger)  # type: ignore[arg-type]
    out = await service.claw_back("acme", ["ch_1"], 1000, "refund:ch_1", "evt_1")
    assert out == [{"grant_id": "pack", "credits": "10", "unused_taken": "4", "debt": "6"}]
    async with pool.acquire() as c:
        acct = await leases.account(c, "acme")
    assert (acct.balance, acct.settled, acct.available) == (0, 6 * C, -6 * C)
    assert (await grant_states(pool, ["acme"]))[0].debt == 6 * C


async def test_a_lease_then_shipping_keeps_grants_and_account_in_step(pool: PgPool) -> None:
    await add_customer(pool, "acme")
    await _grant(pool, "g1", 10 * C)
    store = LeaseStore(pool, "a", LeasePolicy(floor=4 * C))
    got = await store.grant("acme", 0, C)
    assert got.amount == 4 * C
    await Shipper(pool, "a").ship([_row(1, "acme", 3 * C)])
    async with pool.acquire() as c:
        acct = await leases.account(c, "acme")
    assert (acct.settled, acct.escrowed) == (3 * C, C)
    assert (await grant_states(pool, ["acme"]))[0].grants[0].remaining == 7 * C


async def test_expiry_racing_two_shipping_members_never_over_allocates(
        open_pool: PoolFactory) -> None:
    """Two members ship batches while a third expires the grant from a view that saw none
    of it: whatever the interleaving, the grant's entries sum to exactly its amount (debits
    plus the expiry of what was left), every credit shipped is entered once (debits on the
    two grants plus debt), and the account's balance is the grants less the expiry."""
    pools = [await open_pool() for _ in range(3)]
    pool = pools[0]
    await add_customer(pool, "acme")
    await _grant(pool, "soon", 50 * C, priority=0, expires_at=NOW + 10, created=1)
    await _grant(pool, "rest", 100 * C, priority=50, created=2)
    ships = [Shipper(pools[0], "a", batch_size=5), Shipper(pools[1], "b", batch_size=5)]

    async def member(i: int) -> None:
        for b in range(10):
            await ships[i].ship([_row(b * 5 + k, "acme", C, at=NOW + 20 * (k % 2) - 10)
                                 for k in range(1, 6)])
            await asyncio.sleep(0)

    async def expire() -> None:
        await asyncio.sleep(0.01)
        await PostgresCreditLedger(pools[2]).append(
            [LedgerEntry("acme", Entry("soon", "expire", 50 * C))])

    await asyncio.gather(member(0), member(1), expire())
    async with pool.acquire() as c:
        per = {(r[0], r[1]): int(r[2]) for r in await c.fetch(
            "SELECT COALESCE(grant_id, ''), kind, SUM(amount) FROM credit_entries"
            " GROUP BY 1, 2")}
        acct = await leases.account(c, "acme")
        used = dict(await c.fetch("SELECT id, used FROM grants"))
    soon = sum(v for (g, _), v in per.items() if g == "soon")
    assert soon == 50 * C and used["soon"] == 50 * C
    spent = sum(v for (g, k), v in per.items() if k in ("debit", "debt"))
    assert spent == 100 * C                          # 2 members x 10 batches x 5 rows x 1
    assert used["rest"] == per.get(("rest", "debit"), 0) <= 100 * C
    assert acct.balance == 150 * C - per[("soon", "expire")]
    assert acct.settled == 100 * C


async def _plan_grant(ledger: PostgresCreditLedger, gid: str, start: int, end: int,
                      charge: str) -> None:
    await ledger.create_grant(NewGrant(
        GrantState(gid, "acme", 50 * C, 50, end, start, "stripe"),
        f"stripe:plan:sub_1:{start}", (start, end), (charge,), 2000))


async def _stale_service(pool: PgPool, ledger: PostgresCreditLedger, spent: int) -> CreditService:
    """A member's credit service whose book was read from the shared ledger just before
    member "b" shipped ``spent`` of acme's usage (not reloaded here: a stale book)."""
    book = CreditBook()
    [state] = await grant_states(pool, ["acme"])
    book.replace(state.customer_id, state.grants, state.debt)
    await Shipper(pool, "b").ship([_row(1, "acme", spent)])
    return CreditService(None, book, ledger)  # type: ignore[arg-type]


async def test_a_claw_back_on_a_stale_book_owes_what_other_members_spent(pool: PgPool) -> None:
    """docs/credits.md ("Carry chains") in fleet mode: period 0's 50 all spent, period 1's
    grant (50, effective) loaded into this member's book, then another member ships 50 of
    spending out of it before this member reloads. Period 0's payment refunded here: its
    50 spent are owed on to period 1's grant, which the shared ledger shows fully spent, so
    they are debt (50), as had the refund come first (period 1's grant repays 50 at
    creation and the spending is then debt). Before the fix the decision took the stale
    book's 50 as unused: a ``refund`` entry of 50 on a grant already spent (grants.used
    100 of 50) and no debt: 50 credits given away."""
    await add_customer(pool, "acme")
    ledger = PostgresCreditLedger(pool)
    await _plan_grant(ledger, "p0", NOW - 40, NOW - 10, "ch_0")
    await ledger.append([LedgerEntry("acme", Entry("p0", "debit", 50 * C), "r0")])
    await _plan_grant(ledger, "p1", NOW - 10, NOW + 20, "ch_1")
    service = await _stale_service(pool, ledger, 50 * C)
    out = await service.claw_back("acme", ["ch_0"], 2000, "refund:ch_0", "evt_1")
    assert [(r["grant_id"], r["unused_taken"], r["debt"]) for r in out] == [
        ("p0", "0", "0"), ("p1", "0", "50")]
    async with pool.acquire() as c:
        used = {str(r[0]): int(r[1]) for r in await c.fetch("SELECT id, used FROM grants")}
    assert used == {"p0": 50 * C, "p1": 50 * C}
    [state] = await grant_states(pool, ["acme"])
    assert state.debt == 50 * C


async def test_a_claw_back_follows_a_carry_into_a_renewal_another_member_granted(
        pool: PgPool) -> None:
    """Period 0's 50, unspent, rolled over into period 1's grant (50 + 50 carried) by
    another member (its grant and period 0's expiry in the shared ledger), then period 0's
    payment refunded on this member before its book reloaded. The 50 carried follow into
    period 1's grant (refunded first, it would have held 50): a ``refund`` entry of 50 on
    it. Before the fix the follow was decided on this member's book, which did not hold
    the renewal yet: nothing taken, while period 0's claw-back recorded its 50 as taken,
    so no redelivery took them either: 50 credits given away."""
    await add_customer(pool, "acme")
    ledger = PostgresCreditLedger(pool)
    await _plan_grant(ledger, "p0", NOW - 40, NOW - 10, "ch_0")
    book = CreditBook()
    [state] = await grant_states(pool, ["acme"])
    book.replace(state.customer_id, state.grants, state.debt)
    service = CreditService(None, book, ledger)  # type: ignore[arg-type]
    service.reload = partial(_reload, pool, book)   # fleet mode (proxy/app.py)
    # another member's renewal: period 0 closed, its 50 carried
    await ledger.append([LedgerEntry("acme", Entry("p0", "expire", 50 * C))])
    await ledger.create_grant(NewGrant(
        GrantState("p1", "acme", 100 * C, 50, NOW + 20, NOW - 10, "stripe"),
        f"stripe:plan:sub_1:{NOW - 10}", (NOW - 10, NOW + 20), ("ch_1",), 2000,
        carried=50 * C))
    out = await service.claw_back("acme", ["ch_0"], 2000, "refund:ch_0", "evt_1")
    assert ("p1", "50", "0") in [(r["grant_id"], r["unused_taken"], r["debt"]) for r in out]
    [state] = await grant_states(pool, ["acme"])
    assert ({g.id: g.remaining for g in state.grants}, state.debt) == (
        {"p0": 0, "p1": 50 * C}, 0)
    assert {g.id: g.remaining for g in book.grants("acme")} == {"p0": 0, "p1": 50 * C}


async def _reload(pool: PgPool, book: CreditBook, customers: list[str]) -> None:
    """What a member's ``Fleet.reload_credits`` does (proxy/fleet/runtime.py)."""
    for cc in await grant_states(pool, customers):
        book.replace(cc.customer_id, cc.grants, cc.debt)


async def test_a_rollover_on_a_stale_book_carries_only_what_the_ledger_expired(
        pool: PgPool) -> None:
    """A rollover renewal processed on a member whose book has not seen another member's
    shipped spending of the previous period's grant (50, 30 of it spent elsewhere):
    ``WebhookReceiver._close_previous`` expires what the shared ledger says is left (20,
    capped under the account lock) and carries that, 20. Before the fix it carried the
    stale book's 50 while expiring 20: 30 spent credits carried into the new period."""
    from proxy.webhooks import WebhookReceiver
    from tests.test_plan_lifecycle import CFG

    await add_customer(pool, "acme")
    ledger = PostgresCreditLedger(pool)
    await _plan_grant(ledger, "p0", NOW - 40, NOW + 20, "ch_0")
    service = await _stale_service(pool, ledger, 30 * C)
    hooks = WebhookReceiver(None, None, service, CFG, clock=lambda: NOW + 20)  # type: ignore[arg-type]
    assert await hooks._close_previous("acme", "sub_1", NOW + 20, False) == (20 * C, "p0")
    assert await ledger.entry_total("p0", "expire") == 20 * C
