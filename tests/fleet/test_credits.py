"""``FleetCredits`` (the request path's credit book in fleet mode) on a real LeaseBook and
PostgreSQL: a hold is a lease debit, settlement replaces it by the actual cost (less comes
back, more is debt the next refill pays first), a release returns the hold, and a refund
never goes to a lease that did not escrow it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.credits.book import Hold
from proxy.fleet.book import Decision, LeaseBook
from proxy.fleet.credits import FleetCredits, shadow_split
from proxy.fleet.sizing import LeasePolicy
from proxy.store.postgres.leases import LeaseStore
from proxy.store.postgres.pool import PgPool
from tests.fleet.conftest import add_customer

C = 1_000_000


def _credits(pool: PgPool, floor: int = 10 * C) -> FleetCredits:
    return FleetCredits(LeaseBook(LeaseStore(pool, "m1", LeasePolicy(floor=floor))))


async def test_hold_settle_release_move_the_lease(pool: PgPool) -> None:
    await add_customer(pool, "acme", 100 * C)
    fc = _credits(pool)
    assert not fc.has_credits("acme")             # no lease yet: nothing to show
    hold = await fc.admit("acme", 2 * C, 0.0)
    assert isinstance(hold, Hold) and hold.amount == 2 * C and hold.debt_ok
    granted = fc.leases.held["acme"].granted
    assert fc.has_credits("acme") and fc.available("acme", 0.0) == granted - 2 * C
    # less than held: the difference comes back
    assert fc.settle(hold, [C], 0.0) == [([], 0)]
    assert fc.available("acme", 0.0) == granted - C
    # a release gives the whole hold back; twice is once
    h2 = fc.try_hold("acme", 3 * C, 0.0, block=True)
    assert h2 is not None and fc.available("acme", 0.0) == granted - 4 * C
    fc.release(h2)
    fc.release(h2)
    assert fc.available("acme", 0.0) == granted - C
    # more than held: beyond the lease is debt, paid from the next refill before admitting
    h3 = fc.try_hold("acme", C, 0.0, block=True)
    assert h3 is not None
    fc.settle(h3, [granted + 5 * C], 0.0)
    assert fc.available("acme", 0.0) < 0
    assert fc.try_hold("acme", C, 0.0, block=True) is None
    h4 = await fc.admit("acme", C, 0.0)              # refills: the debt is covered first
    assert isinstance(h4, Hold)
    assert fc.leases.held["acme"].spent == 2 * C + granted + 5 * C


async def test_grow_takes_more_of_the_lease_or_refuses(pool: PgPool) -> None:
    await add_customer(pool, "acme", 4 * C)
    fc = _credits(pool, floor=C)
    hold = await fc.admit("acme", C, 0.0)
    assert isinstance(hold, Hold)
    left = fc.available("acme", 0.0)
    assert fc.grow(hold, left, 0.0, block=True) and hold.amount == C + left
    assert not fc.grow(hold, C, 0.0, block=True)


async def test_nothing_to_lease_is_insufficient(pool: PgPool) -> None:
    await add_customer(pool, "poor", 0)
    fc = _credits(pool)
    assert await fc.admit("poor", C, 0.0) is Decision.INSUFFICIENT


async def test_a_refund_never_goes_to_a_lease_that_did_not_escrow_it(pool: PgPool) -> None:
    await add_customer(pool, "acme", 100 * C)
    fc = _credits(pool)
    hold = await fc.admit("acme", 2 * C, 0.0)
    assert isinstance(hold, Hold)
    old = fc.leases.held["acme"]
    # the lease was lost and a new one taken meanwhile (expired, reaped, granted again)
    fc.leases.held["acme"] = type(old)(old.lease_id + 1000, old.granted, 0, old.usable_until_ms)
    fc.release(hold)
    assert fc.leases.held["acme"].spent == 0


@given(st.lists(st.integers(0, 10**9), max_size=8), st.integers(0, 10**10))
def test_shadow_split_charges_at_most_the_hold_in_order(costs: list[int], held: int) -> None:
    uncovered, left = shadow_split(costs, held)
    charged = [c - u for c, u in zip(costs, uncovered, strict=True)]
    assert all(0 <= u <= c for c, u in zip(costs, uncovered, strict=True))
    assert sum(charged) + left == held and left >= 0
    assert sum(charged) == min(sum(costs), held)
    # in order: once a cost is not fully covered, the hold is spent and so are all later ones
    for i, u in enumerate(uncovered):
        if u:
            assert left == 0
            assert uncovered[i + 1:] == costs[i + 1:]


async def test_a_shadow_hold_charges_at_most_itself(pool: PgPool) -> None:
    """Shadow mode: a post-response cost above the hold is billed (uncovered), not debt;
    less than the hold returns the rest to the lease."""
    await add_customer(pool, "acme", 100 * C)
    fc = FleetCredits(LeaseBook(LeaseStore(pool, "m1", LeasePolicy(floor=10 * C))),
                      shadow=True)
    hold = await fc.admit("acme", 2 * C, 0.0)
    assert isinstance(hold, Hold) and not hold.debt_ok
    assert fc.settle(hold, [3 * C], 0.0) == [([], C)]
    assert fc.leases.held["acme"].spent == 2 * C
    small = await fc.admit("acme", 2 * C, 0.0)
    assert isinstance(small, Hold)
    assert fc.settle(small, [C, 0], 0.0) == [([], 0), ([], 0)]
    assert fc.leases.held["acme"].spent == 3 * C
