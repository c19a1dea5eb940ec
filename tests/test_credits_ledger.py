"""Property tests of the pure credit ledger (hypothesis)."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from proxy.credits.book import CreditBook
from proxy.credits.ledger import (
    DEBT,
    ClawbackRoom,
    Entry,
    GrantState,
    allocate,
    apply,
    available,
    burn_order,
    carry,
    clawback,
    clawback_credits,
    clawback_layers,
    clawback_room,
    clawback_step,
    clawback_take,
    covered_quantity,
    expire_due,
    repay,
    replay,
    rollover_grant,
    settle_cost,
    unrepay,
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


# ---- the book's boundaries (each pins a rule a mutation-testing survivor broke) ----------


@given(st.integers(1, 10**6), st.integers(0, 10**6), st.integers(0, 10**6))
def test_grow_raises_the_hold_by_what_fits(grant: int, first: int, extra: int) -> None:
    """A hint read after admission raises the hold (and the customer's held total) by what
    is still available, never more; a grant with an expiry checks it at ``now``."""
    book = CreditBook()
    book.load([GrantState("g", "c", grant, expires_at=100)], [])
    hold = book.try_hold("c", first, 10.0, block=False)
    assert hold is not None
    before = hold.amount
    avail = book.available("c", 10.0)
    assert book.grow(hold, extra, 10.0, block=False)
    assert hold.amount == before + min(extra, avail)
    assert book.held("c") == hold.amount


def test_grow_by_one_micro_unit_and_by_nothing() -> None:
    book = CreditBook()
    book.load([GrantState("g", "c", 10, expires_at=5)], [])
    hold = book.try_hold("c", 10, 0.0, block=True)
    assert hold is not None and book.available("c", 0.0) == 0
    book2 = CreditBook()
    book2.load([GrantState("g", "c", 10)], [])
    h2 = book2.try_hold("c", 3, 0.0, block=True)
    assert h2 is not None
    assert book2.grow(h2, 1, 0.0, block=True) and h2.amount == 4   # one micro-unit is grown
    assert book2.grow(h2, 0, 0.0, block=True) and h2.amount == 4   # nothing: admitted as is
    # the grant expired under the hold: available is now negative, yet growing by nothing
    # is not a refusal
    assert book.available("c", 6.0) < 0
    assert book.grow(hold, 0, 6.0, block=True)
    assert hold.amount == 10


def test_indebted_lists_only_positive_debt() -> None:
    book = CreditBook()
    book.load([GrantState("g", "c", 10), GrantState("h", "d", 10)], [], {"c": 5, "d": 1})
    assert sorted(book.indebted()) == ["c", "d"]        # one micro-unit is debt
    book.apply([Entry("g", "repay", 5)], "c")           # repaid to exactly zero
    assert book.debt("c") == 0
    assert book.indebted() == ["d"]


def test_next_effective_only_pending_grants_of_indebted_customers() -> None:
    book = CreditBook()
    assert book.next_effective(0) is None                                # no grants at all
    book.load([GrantState("now", "c", 10),                               # effective from creation
               GrantState("past", "c", 10, effective_at=5),              # already effective
               GrantState("due", "c", 10, effective_at=20),              # effective at exactly now
               GrantState("void", "c", 10, effective_at=30, voided=True),
               GrantState("free", "e", 10, effective_at=25)],            # e owes nothing
              [], {"c": 1})
    assert book.next_effective(20) is None
    book.add_grant(GrantState("next", "c", 10, effective_at=40))
    assert book.next_effective(20) == 40.0                               # a debt of one micro-unit
    assert book.next_effective(10) == 20.0


def test_next_expiry_of_a_deferred_grant() -> None:
    """A grant whose expiry waits for a request admitted before it is retried a second
    later, once it is due; before that its own expiry is the next one."""
    book = CreditBook()
    book.load([GrantState("g", "c", 10, expires_at=100)], [])
    hold = book.try_hold("c", 1, 0.0, block=False)
    assert hold is not None
    assert book.next_expiry(10) == 100.0                 # not due yet: its own time
    assert book.next_expiry(100) == 101.0                # due exactly now, deferred: retried


def test_pending_until_effective_at() -> None:
    g = GrantState("g", "c", 10, effective_at=50)
    assert g.pending(49.5) and not g.live(49.5)
    assert not g.pending(50) and g.live(50)              # effective at exactly effective_at


def test_clawback_of_one_micro_unit() -> None:
    assert clawback(GrantState("g", "c", 10), 1, 0, 0) == [Entry("g", "refund", 1)]
    spent = GrantState("g", "c", 10, remaining=0)
    assert clawback(spent, 1, 0, 5) == [Entry("", "debt", 1)]


def test_replace_swaps_one_customers_grants_and_debt_keeping_holds() -> None:
    """Fleet mode's reload of one customer (``CreditBook.replace``): that customer's grants
    and debt are the fresher view's, every other customer's are untouched, and what
    in-flight requests hold is kept."""
    book = CreditBook()
    book.load([GrantState("a1", "c", 10, priority=1), GrantState("a2", "c", 20),
               GrantState("b1", "d", 30)], [], {"c": 5, "d": 2})
    hold = book.try_hold("c", 4, 0.0, block=False)
    assert hold is not None
    book.replace("c", [GrantState("a3", "c", 7, priority=9), GrantState("a4", "c", 8, priority=2)],
                 1)
    assert book.grant("a1") is None and book.grant("a2") is None
    assert [g.id for g in book.grants("c")] == ["a4", "a3"]          # in burn order
    assert [book.grant("a3"), book.grant("a4")] == book.grants("c")[::-1]
    assert book.debt("c") == 1 and sorted(book.indebted()) == ["c", "d"]
    assert book.balance("c", 0.0) == 15 - 1
    assert book.held("c") == 4 and book.inflight("c") == 1
    assert [g.id for g in book.grants("d")] == ["b1"] and book.debt("d") == 2
    book.replace("c", [], 0)                                         # nothing left, debt repaid
    assert book.grants("c") == [] and book.grant("a3") is None and book.grant("a4") is None
    assert book.debt("c") == 0 and book.indebted() == ["d"]
    assert book.balance("c", 0.0) == 0 and book.held("c") == 4
    assert book.balance("d", 0.0) == 28
    # a customer the book has not seen (no grants, no debt) arrives with the fresher view
    book.replace("e", [GrantState("e1", "e", 3)], 0)
    assert book.grants("e") == [book.grant("e1")] and book.balance("e", 0.0) == 3
    assert book.debt("e") == 0


@given(st.integers(1, 10**6), st.integers(0, 3 * 10**6), st.integers(0, 10**6))
def test_withdrawing_a_settlement_restores_the_book_exactly(grant: int, cost: int,
                                                            earlier_debt: int) -> None:
    """A withheld answer is never billed (Store invariant 8): ``withdraw`` of a settlement's
    entries gives each debit back to its grant and drops the debt it made, leaving the
    book as it was before that settlement (balance, remaining, debt), whatever part of the
    cost became debt and whatever debt the customer already had."""
    book = CreditBook()
    book.load([GrantState("g", "c", grant)], [])
    if earlier_debt:
        book.apply([Entry("", "debt", earlier_debt)], "c")
    before = (book.balance("c", 1.0), book.grant("g").remaining, book.debt("c"))  # type: ignore[union-attr]
    hold = book.try_hold("c", 0, 1.0, block=False, debt_ok=True)    # (admitted whatever)
    assert hold is not None
    [(entries, uncovered)] = book.settle(hold, [cost], 1.0)
    assert uncovered == 0
    book.withdraw("c", entries)
    g = book.grant("g")
    assert g is not None
    assert (book.balance("c", 1.0), g.remaining, book.debt("c")) == before


# ---- claw-backs that follow a rollover carry, and give-backs of withdrawn debt ------------

@given(st.integers(1, 10**12), st.integers(0, 10**12), st.integers(0, 10**12),
       st.integers(-5, 10**12), st.integers(-5, 10**12), st.integers(-5, 10**12))
def test_clawback_layers_take_each_layer_in_order_never_more_than_it_holds(
        amount: int, remaining: int, credits: int, expired: int, carried: int,
        spent: int) -> None:
    """unused (refund), then expired and not carried (absorbs), then carried (followed into
    the receiving grant), then spent (debt): each layer is taken only once the ones before
    it are exhausted, never more than it holds, and without a carried layer it is
    ``clawback``."""
    g = GrantState("g", "c", amount, remaining=min(remaining, amount))
    entries, follow = clawback_layers(g, credits, expired, carried, spent)
    refund = sum(e.amount for e in entries if e.kind == "refund")
    debt = sum(e.amount for e in entries if e.kind == "debt")
    assert refund == min(credits, g.remaining)
    after_expiry = max(credits - refund - max(expired, 0), 0)
    assert follow == min(after_expiry, max(carried, 0))
    assert debt == min(after_expiry - follow, max(spent, 0))
    assert refund + follow + debt <= credits
    assert all(e.amount > 0 for e in entries) and follow >= 0
    assert clawback_layers(g, credits, expired, 0, spent)[0] == clawback(g, credits, expired,
                                                                         spent)


@given(st.integers(-5, 10**6), st.integers(-5, 10**6),
       st.tuples(*[st.integers(-5, 10**6)] * 4))
def test_clawback_take_owes_on_every_owed_credit_and_takes_each_layer_in_order(
        credits: int, owed_in: int, layers: tuple[int, int, int, int]) -> None:
    """The layers are taken in order, each only once the ones before it are exhausted and
    never beyond what it holds; what ``credits`` finds no layer for is not taken, but spent
    credits owed in are never dropped (what no layer holds of them stays owed)."""
    room = ClawbackRoom(*layers)
    t = clawback_take(credits, owed_in, room)
    x, (unused, absorb, carried, spent) = max(credits, 0) + max(owed_in, 0), \
        [max(n, 0) for n in layers]
    assert t.refund == min(x, unused)
    assert t.absorbed == min(x - t.refund, absorb)
    assert t.follow == min(x - t.refund - t.absorbed, carried)
    beyond = x - t.refund - t.absorbed - t.follow - min(x - t.refund - t.absorbed - t.follow,
                                                        spent)
    assert t.owed == min(x - t.refund - t.absorbed - t.follow, spent) + min(beyond,
                                                                             max(owed_in, 0))
    assert max(owed_in, 0) <= t.refund + t.absorbed + t.follow + t.owed <= x
    g = GrantState("g", "c", 10**7)
    assert clawback_step(g, room, credits, owed_in, True)[1:] == (t.follow, t.owed)
    assert clawback_step(g, room, credits, owed_in, False) == (t.entries("g"), t.follow, 0)


@given(st.lists(st.integers(-5, 10**9), max_size=6), st.integers(-5, 10**10))
@example([1, 5], 3)         # one micro-credit repaid by the newest grant: given back too
@example([4], 1)            # one micro-credit to give back
def test_unrepay_gives_back_at_most_what_each_grant_repaid_newest_first(
        nets: list[int], amount: int) -> None:
    repaid = [(f"g{i}", n) for i, n in enumerate(nets)]
    out = unrepay(repaid, amount)
    assert all(e.kind == "repay" and e.amount < 0 for e in out)
    given_back = -sum(e.amount for e in out)
    assert given_back == min(max(amount, 0), sum(n for n in nets if n > 0))
    net = dict(repaid)
    assert all(-e.amount <= net[e.grant_id] for e in out)
    assert len({e.grant_id for e in out}) == len(out)
    # newest first: a grant is touched only once every earlier one with credit is exhausted
    order = [gid for gid, n in repaid if n > 0]
    touched = [e.grant_id for e in out]
    assert touched == order[:len(touched)]
    assert all(-e.amount == net[e.grant_id] for e in out[:-1])


@given(st.integers(0, 10**9), st.integers(1, 10**9), st.integers(0, 10**9),
       st.integers(0, 10**9))
def test_a_withdrawn_debt_gives_back_exactly_what_was_repaid_of_it(
        prior: int, withdrawn: int, other: int, grant: int) -> None:
    """A book with ``prior`` debt, then a request's ``withdrawn`` debt and another's
    ``other`` (both not committed), then a grant repaying what it can; the first request is
    withdrawn. What ``withdraw`` reports as repaid, given back by ``unrepay`` from the
    ledger's unmatched repayments, leaves the ledger's debt (once ``other`` commits) equal
    to the book's, and the grant's credit equal to the book's."""
    book = CreditBook()
    book.add_grant(GrantState("g", "c", grant))
    book.apply([Entry("", "debt", prior + withdrawn + other)], "c")
    rep = book.repayment(book.grant("g") or GrantState("x", "c", 1), 0)
    book.apply(rep, "c")
    ledger = [Entry("", "debt", prior), *rep]       # written: the prior debt and the repay
    back = book.withdraw("c", [Entry("", "debt", withdrawn)])
    assert 0 <= back <= withdrawn
    ledger_debt = sum(e.amount if e.kind == "debt" else -e.amount for e in ledger)
    undo = unrepay([("g", sum(e.amount for e in rep))], min(back, max(-ledger_debt, 0)))
    assert -sum(e.amount for e in undo) == back
    book.apply(undo)                                # grants only (CreditService.give_back_due)
    ledger += [*undo, Entry("", "debt", other)]     # the give-back, then the other commits
    assert sum(e.amount if e.kind == "debt" else -e.amount for e in ledger) == book.debt("c")
    g = book.grant("g")
    assert g is not None
    assert replay([GrantState("g", "c", grant)], ledger)["g"].remaining == g.remaining


# ---- a refund takes what it would have taken had it come first (docs/credits.md, "Carry
# chains"): one subscription's rollover plan grants, as the webhooks, the credit service and
# the ledger's claw-back walk make them, in pure form

class _Chain:
    """One rollover subscription's period grants (``allowance`` each, renewals carrying what
    is left, ``once`` for ``rollover_expiry: next_period``, capped at ``cap``), the
    customer's debt, and the claw-back facts the ledger keeps per grant (``clawbacks`` rows:
    everything clawed from the grant, its debt, what it owed on and followed out)."""

    def __init__(self, allowance: int, cap: int | None, once: bool) -> None:
        self.allowance, self.cap, self.once = allowance, cap, once
        self.grants: list[GrantState] = []
        self.carried: list[int] = []
        self.sums: list[dict[str, int]] = []
        self.clawed: list[int] = []
        self.owed: list[int] = []
        self.owed_on: list[int] = []
        self.followed: list[int] = []
        self.owed_into: list[int] = []
        self.debt = 0
        self.taken: dict[int, int] = {}        # refunded period -> credits its key took

    def _apply(self, i: int, e: Entry) -> None:
        if e.kind == DEBT:
            self.debt += e.amount
            return
        apply({self.grants[i].id: self.grants[i]}, [e])
        self.sums[i][e.kind] = self.sums[i].get(e.kind, 0) + e.amount
        if e.kind == "repay":
            self.debt -= e.amount

    def renew(self) -> None:
        """The next period's grant: the previous one closed (``_close_previous``: its rest
        expires, ``carry`` of it goes on, capped), then the debt repaid out of it."""
        i = len(self.grants)
        amount = self.allowance
        if i:
            prev = self.grants[-1]
            if prev.remaining > 0:
                self._apply(i - 1, Entry(prev.id, "expire", prev.remaining))
            amount = rollover_grant(self.allowance, carry(
                self.sums[i - 1].get("expire", 0), prev.amount, self.carried[-1], self.once),
                self.cap)
        self.grants.append(GrantState(f"p{i}", "c", amount))
        self.carried.append(amount - self.allowance)
        for lst in (self.sums,):
            lst.append({})
        for n in (self.clawed, self.owed, self.owed_on, self.followed, self.owed_into):
            n.append(0)
        for e in repay(self.grants[i], self.debt, 0):
            self._apply(i, e)

    def spend(self, cost: int) -> None:
        """A block customer's request settled on the current grant (what it does not cover
        becomes debt)."""
        for e in settle_cost(self.grants[-1:], cost, 0, True)[0]:
            self._apply(len(self.grants) - 1, e)

    def refund(self, k: int, paid: int, returned: int) -> None:
        """Period ``k``'s payment refunded (cumulative ``returned`` of ``paid``): its share
        of what that payment bought (``CreditService.claw_back``), walked along the chain as
        the ledger's ``claw_back`` does."""
        target = clawback_credits(self.grants[k].amount - self.carried[k], paid, returned)
        delta = target - self.taken.get(k, 0)
        if delta > 0:
            self.taken[k] = target
            self._claw(k, delta, 0)

    def _claw(self, i: int, credits: int, owed_in: int) -> None:
        g, nxt = self.grants[i], i + 1 < len(self.grants)
        carried_out = self.carried[i + 1] if nxt else 0
        room = clawback_room(g.amount, g.remaining, self.sums[i], self.clawed[i],
                             self.owed[i] + self.owed_on[i], carried_out, self.followed[i],
                             self.owed_into[i] + owed_in)
        entries, follow, owe = clawback_step(g, room, credits, owed_in, nxt)
        self.clawed[i] += credits + owed_in
        self.owed_into[i] += owed_in
        for e in entries:
            self._apply(i, e)
            if e.kind == DEBT:
                self.owed[i] += e.amount
        follow = follow if carried_out > 0 else 0
        if nxt and (follow or owe):
            self.followed[i] += follow
            self.owed_on[i] += owe
            self._claw(i + 1, follow, owe)

    def balance(self) -> int:
        """What the customer holds: the live (newest) grant's credit minus the debt."""
        return self.grants[-1].remaining - self.debt


def _run_chain(allowance: int, cap: int | None, once: bool, spends: list[int],
               refunds: list[tuple[int, int, int, bool]]) -> _Chain:
    """The periods, each renewed then spent ``spends[i]``; ``refunds``: (period refunded,
    cumulative amount returned of 100, the period it arrives in, before that period's
    spends), applied in list order where they coincide."""
    ch = _Chain(allowance, cap, once)
    for i, cost in enumerate(spends):
        ch.renew()
        for before in (True, False):
            if not before:
                ch.spend(cost)
            for k, returned, at, b in refunds:
                if at == i and b == before:
                    ch.refund(k, 100, returned)
    return ch


_chain_st = st.integers(2, 5).flatmap(lambda n: st.tuples(
    st.integers(1, 60), st.one_of(st.none(), st.integers(0, 200)), st.booleans(),
    st.lists(st.integers(0, 120), min_size=n, max_size=n)))


@given(_chain_st, st.data())
@example((50, 70, True, [30, 0, 0]), None)      # tests/test_review_credits.py: 70 either way
def test_a_refund_takes_what_it_would_have_taken_had_it_come_first(
        chain: tuple[int, int | None, bool, list[int]], data: st.DataObject | None) -> None:
    """Refund order does not matter. One subscription's rollover grants (any allowance, a
    cap or none, either ``rollover_expiry``), any spending in each period (a block
    customer: what the grant does not cover is debt, repaid by the next grant), and up to
    four refunds, each of one period's payment (any share; several of one payment are
    cumulative, as ``amount_refunded`` is): however many renewals come between the end of
    a refunded period and its refund, in whatever order the refunds arrive and whether
    before or after a period's spending, the customer ends with the balance it would have
    had, had each refund come at the end of its period, before the next renewal.

    The form that holds: the grants are the one subscription's plan grants and the
    customer has no others (a pack or admin grant would have repaid the debt of a refund
    that came first: the claw-back cannot know which), nothing is voided or written off,
    and each next period's grant is effective when the refund comes."""
    allowance, cap, once, spends = chain
    n = len(spends)
    if data is None:
        refunds = [(0, 100, n - 1, False)]
    else:
        refunds = []
        for _ in range(data.draw(st.integers(1, 4), "refunds")):
            k = data.draw(st.integers(0, n - 1), "refunded period")
            at = data.draw(st.integers(k, n - 1), "period the refund arrives in")
            refunds.append((k, data.draw(st.integers(1, 130), "returned (of 100 paid)"), at,
                            at > k and data.draw(st.booleans(), "before its spending")))
    # in the order they arrive; one payment's cumulative refunds only grow
    refunds.sort(key=lambda r: (r[2], not r[3]))
    grown: dict[int, int] = {}
    for i, (k, returned, at, before) in enumerate(refunds):
        grown[k] = max(grown.get(k, 0), returned)
        refunds[i] = (k, grown[k], at, before)
    first = _run_chain(allowance, cap, once, spends, [(k, r, k, False) for k, r in grown.items()])
    later = _run_chain(allowance, cap, once, spends, refunds)
    assert later.balance() == first.balance()
    # the ledger reloaded (every grant replayed from its entries) holds what the book holds
    entries = [Entry(g.id, kind, n) for g, sums in zip(later.grants, later.sums, strict=True)
               for kind, n in sums.items()]
    assert {g.id: g.remaining for g in replay(later.grants, entries).values()} == {
        g.id: g.remaining for g in later.grants}


def test_the_spent_layer_is_what_earlier_claw_backs_have_not_owed_yet() -> None:
    """A grant of 100 that spent all of it, 30 of which an earlier claw-back already owed
    (as debt, or on to the next period): 70 of its spent layer are left to owe."""
    room = clawback_room(100, 0, {}, clawed_total=30, owed=30, carried_out=0, followed_out=0)
    assert room == ClawbackRoom(0, 0, 0, 70)


def test_a_step_that_owes_on_still_refunds_the_unused_credits_it_took() -> None:
    """With the next period's grant effective (``owe_on``), the spent share goes on to it,
    but the unused credits taken here are a ``refund`` entry of exactly that amount."""
    g = GrantState("g", "c", 100)
    entries, follow, owed = clawback_step(g, ClawbackRoom(5, 0, 0, 20), 25, 0, owe_on=True)
    assert entries == [Entry("g", "refund", 5)]
    assert (follow, owed) == (0, 20)
