"""Property tests of the pure credit ledger (hypothesis)."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from proxy.credits.book import CreditBook
from proxy.credits.ledger import (
    Entry,
    GrantState,
    allocate,
    available,
    burn_order,
    covered_quantity,
    expire_due,
    replay,
    rollover_grant,
)

grant_st = st.builds(
    lambda i, amount, prio, exp, created: GrantState(f"g{i}", "c", amount, prio, exp, created),
    st.integers(0, 10_000), st.integers(1, 10**9), st.integers(0, 100),
    st.one_of(st.none(), st.integers(1, 100)), st.integers(0, 50))

op_st = st.one_of(
    st.tuples(st.just("debit"), st.integers(0, 3 * 10**9)),
    st.tuples(st.just("tick"), st.integers(1, 30)),
    st.tuples(st.just("void"), st.integers(0, 20)),
    st.tuples(st.just("later"), st.integers(1, 30)),   # time passes, expiries not swept yet
)


@given(st.lists(grant_st, min_size=1, max_size=8, unique_by=lambda g: g.id),
       st.lists(op_st, max_size=40))
@example([GrantState("g1", "c", 10, 0, 5, 0), GrantState("g2", "c", 10, 50, None, 0)],
         [("tick", 5), ("debit", 7)])                      # settle at expires_at
@example([GrantState("g1", "c", 10, 0, 5, 0)], [("tick", 5), ("debit", 3)])
@example([GrantState("g1", "c", 10, 0, 5, 0), GrantState("g2", "c", 10, 50, None, 0)],
         [("later", 5), ("debit", 7)])                     # expired, not yet swept
def test_balance_equals_grants_minus_entries_and_replay_agrees(grants: list[GrantState],
                                                              ops: list[tuple[str, int]]) -> None:
    book = CreditBook()
    book.load(grants, [])
    log: list[Entry] = []
    now = 0
    for kind, arg in ops:
        if kind == "later":
            now += arg
        elif kind == "tick":
            now += arg
            due = book.due_expiries(now)
            book.apply(due)
            log.extend(due)
        elif kind == "void":
            g = sorted(book.all_grants(), key=lambda g: g.id)[arg % len(grants)]
            if not g.voided:
                e = Entry(g.id, "void", g.remaining)
                book.apply([e])
                log.append(e)
        else:
            before = {g.id: g.remaining for g in book.all_grants()}
            avail = book.balance("c", now)
            hold = book.try_hold("c", 0, now, block=False)
            assert hold is not None
            [(entries, uncovered)] = book.settle(hold, [arg], now)
            log.extend(entries)
            # covered + uncovered == cost; never more than was available
            assert sum(e.amount for e in entries) + uncovered == arg
            assert sum(e.amount for e in entries) == min(arg, avail)
            # burn order: a grant is touched only if every live grant before it is empty now
            order = [g for g in burn_order(book.all_grants()) if before[g.id] > 0 and g.live(now)]
            touched = {e.grant_id for e in entries}
            # only live grants are debited, swept or not
            assert touched <= {g.id for g in book.all_grants() if g.live(now)}
            for i, g in enumerate(order):
                if g.id in touched:
                    assert all(h.remaining == 0 for h in order[:i])
        for g in book.all_grants():
            assert g.remaining >= 0                       # no grant below zero
        total = sum(g.amount for g in grants)
        assert sum(g.remaining for g in book.all_grants()) == total - sum(e.amount for e in log)
        # the projection recomputed from the ledger equals the incremental one
        fresh = replay(grants, log)
        assert {k: v.remaining for k, v in fresh.items()} == \
            {g.id: g.remaining for g in book.all_grants()}
        assert available(fresh.values(), now) == book.balance("c", now)


@given(st.lists(grant_st, min_size=1, max_size=6, unique_by=lambda g: g.id),
       st.integers(0, 200))
@example([GrantState("g", "c", 10, 50, 100, 0)], 100)     # now == expires_at: expired
@example([GrantState("g", "c", 10, 50, 100, 0)], 99)
def test_expired_grants_leave_the_balance_at_expires_at(grants: list[GrantState],
                                                        now: int) -> None:
    live = sum(g.amount for g in grants if g.expires_at is None or now < g.expires_at)
    assert available(grants, now) == live
    due = expire_due(grants, now)
    assert {e.grant_id for e in due} == {g.id for g in grants
                                         if g.expires_at is not None and g.expires_at <= now}


@given(st.integers(0, 10**12), st.integers(-10**6, 10**12), st.one_of(st.none(),
                                                                    st.integers(0, 10**12)))
def test_rollover_never_exceeds_cap(allowance: int, previous: int, cap: int | None) -> None:
    amount = rollover_grant(allowance, previous, cap)
    assert amount >= allowance
    if cap is not None:
        assert amount <= max(cap, allowance)
    else:
        assert amount == allowance + max(previous, 0)


@given(st.integers(0, 10**12), st.integers(1, 10**9), st.integers(0, 10**9))
@example(10, 3, 1)           # 3.33 -> 3: covered rounds DOWN, the rest is billed
@example(10, 3, 2)           # 6.67 -> 6
@example(10, 3, 3)           # full coverage
@example(7, 2, 0)
def test_covered_quantity_is_the_floor_of_the_covered_share(q: int, cost: int,
                                                            covered_cost: int) -> None:
    """covered = floor(q * covered_cost / cost) (never more: the remainder is billed), and
    everything when the whole cost was covered."""
    c = covered_quantity(q, cost, covered_cost)
    if covered_cost >= cost:
        assert c == q
    else:
        assert c * cost <= q * covered_cost < (c + 1) * cost


def test_burn_order_priority_then_expiry_then_age() -> None:
    gs = [GrantState("late", "c", 10, 50, None, 1), GrantState("soon", "c", 10, 50, 100, 5),
          GrantState("top", "c", 10, 0, None, 9), GrantState("old", "c", 10, 50, None, 0)]
    assert [g.id for g in burn_order(gs)] == ["top", "soon", "old", "late"]
    entries, left = allocate(burn_order(gs), 25, 0)
    assert [(e.grant_id, e.amount) for e in entries] == [("top", 10), ("soon", 10), ("old", 5)]
    assert left == 0


def test_grow_without_available_credit_holds_nothing_more() -> None:
    """A bill customer's hold grown by a late request hint takes only what is available:
    with nothing left, the hold stays as it was (never a phantom unit)."""
    book = CreditBook()
    book.load([GrantState("g1", "c", 10, 0, None, 0)], [])
    hold = book.try_hold("c", 10, 1.0, block=False)
    assert hold is not None and hold.amount == 10 and book.available("c", 1.0) == 0
    assert book.grow(hold, 5, 1.0, block=False)
    assert hold.amount == 10 and book.held("c") == 10
    assert not book.grow(hold, 5, 1.0, block=True)      # a block customer is refused instead
    assert hold.amount == 10
