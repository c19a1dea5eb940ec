"""Pure credit-ledger math: burn order, allocation, expiry, projections, allowances.

Invariants (property-tested in tests/test_credits_ledger.py)
- Amounts are integers in micro-credits; nothing here sees a float.
- A grant's remaining amount is ``amount - sum(entries against it)`` and never below 0.
- Burn order: priority first (Stripe's convention: 0 is the highest priority, 100 the
  lowest), then the earliest expiry (no expiry burns last), then the oldest grant.
- An expired grant contributes nothing from its ``expires_at`` on, whether or not the expiry
  entry has been written yet. A grant contributes nothing before its ``effective_at``
  (finding 1: a renewal paid early is spendable from its period's start, not before).
- Incremental updates and a replay of the entries give identical results.
- Debt (docs/credits.md): usage a ``block`` customer consumed beyond its credits is a
  ``debt`` entry (no grant, ``grant_id == ""``); a later grant pays it back first with a
  ``repay`` entry (taken out of that grant like a debit). A customer's debt is
  ``sum(debt) - sum(repay)``, never below 0, and its balance is ``available - debt``.
- Claw-backs (docs/credits.md, "Carry chains"): a refund takes what it would have taken had
  it come first; what a refunded plan grant carried on and what it spent go on to the
  subscription's next period grant (``clawback_room``, ``clawback_take``, ``clawback_step``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

NO_EXPIRY = 2**62


@dataclass(slots=True)
class GrantState:
    id: str
    customer_id: str
    amount: int
    priority: int = 50
    expires_at: int | None = None       # unix seconds
    created_at: int = 0
    source: str = "admin"
    remaining: int = field(default=-1)  # projection; -1 = "not yet computed" (= amount)
    voided: bool = False
    effective_at: int | None = None     # unix seconds; None = from creation (Stripe's default)

    def __post_init__(self) -> None:
        if self.remaining < 0:
            self.remaining = self.amount

    def live(self, now: float) -> bool:
        """Spendable at ``now``: not voided, effective (``effective_at <= now``) and not
        expired (``now < expires_at``)."""
        return (not self.voided and (self.effective_at is None or self.effective_at <= now)
                and (self.expires_at is None or now < self.expires_at))

    def pending(self, now: float) -> bool:
        """Not effective yet (a renewal paid before its period starts)."""
        return self.effective_at is not None and now < self.effective_at

    def order_key(self) -> tuple[int, int, int, str]:
        return (self.priority, self.expires_at if self.expires_at is not None else NO_EXPIRY,
                self.created_at, self.id)


@dataclass(frozen=True, slots=True)
class Entry:
    grant_id: str
    kind: str          # debit | expire | void | refund | debt | repay
    amount: int        # > 0 takes credits out of the grant (refund: a clawback); debt: owed


DEBT = "debt"          # no grant: credits consumed beyond the balance (block customers)
REPAY = "repay"        # a grant's credits taken to pay back debt
REFUND = "refund"      # credits clawed back because the payment behind the grant was returned


def burn_order(grants: Iterable[GrantState]) -> list[GrantState]:
    return sorted(grants, key=GrantState.order_key)


def available(grants: Iterable[GrantState], now: float) -> int:
    return sum(g.remaining for g in grants if g.live(now))


def allocate(grants: Sequence[GrantState], cost: int, now: float) -> tuple[list[Entry], int]:
    """Take ``cost`` from live grants in burn order. Returns (debit entries, uncovered).

    ``grants`` must already be in burn order. Pure: the caller applies the entries."""
    if cost <= 0:
        return [], 0
    out: list[Entry] = []
    left = cost
    for g in grants:
        if left == 0:
            break
        if not g.live(now) or g.remaining <= 0:
            continue
        take = min(g.remaining, left)
        out.append(Entry(g.id, "debit", take))
        left -= take
    return out, left


def apply(grants: dict[str, GrantState], entries: Iterable[Entry]) -> None:
    """Apply entries to the projection (in place). ``debt`` entries touch no grant (the
    book keeps debt per customer; see ``debt_delta``)."""
    for e in entries:
        if e.kind == DEBT:
            continue
        g = grants[e.grant_id]
        g.remaining -= e.amount
        if e.kind == "void":
            g.voided = True
        if g.remaining < 0:
            raise ValueError(f"grant {g.id} would go below zero")


def expire_due(grants: Iterable[GrantState], now: float) -> list[Entry]:
    """Expiry entries for every grant whose ``expires_at`` has passed with credits left."""
    return [Entry(g.id, "expire", g.remaining) for g in grants
            if not g.voided and g.expires_at is not None and g.expires_at <= now
            and g.remaining > 0]


def replay(grants: Iterable[GrantState], entries: Iterable[Entry]) -> dict[str, GrantState]:
    """The projection recomputed from scratch: grants at full amount, then every entry."""
    fresh = {g.id: GrantState(g.id, g.customer_id, g.amount, g.priority, g.expires_at,
                              g.created_at, g.source, effective_at=g.effective_at)
             for g in grants}
    apply(fresh, entries)
    return fresh


def rollover_grant(allowance: int, previous_remaining: int, cap: int | None) -> int:
    """Amount of a new period's allowance grant under rollover: this period's allowance plus
    what is left of the last one, never more than ``cap`` in all (no cap: plain sum).
    Monthly reset is ``rollover_grant(allowance, 0, None)``."""
    total = allowance + max(previous_remaining, 0)
    if cap is not None:
        total = min(total, max(cap, allowance))
    return total


def carry(left: int, previous_amount: int, previous_carried: int, once: bool) -> int:
    """What a rollover carries from the previous period's grant that had ``left`` at its end.
    ``once`` (``rollover_expiry: next_period``): credits carried into a grant are spent first
    and are never carried again, so only the unspent part of its own allowance
    (``previous_amount - previous_carried``) moves on."""
    left = max(left, 0)
    return min(left, max(previous_amount - previous_carried, 0)) if once else left


def covered_quantity(quantity: int, cost: int, covered_cost: int) -> int:
    """Micro-units of ``quantity`` that ``covered_cost`` of its ``cost`` paid for (floor):
    the rest is billable. Full coverage covers everything; zero cost covers nothing."""
    if cost <= 0 or covered_cost <= 0:
        return 0
    if covered_cost >= cost:
        return quantity
    return quantity * covered_cost // cost


def debt_delta(entries: Iterable[Entry]) -> int:
    """How much the entries change a customer's debt: + each ``debt``, - each ``repay``."""
    return sum(e.amount if e.kind == DEBT else -e.amount if e.kind == REPAY else 0
               for e in entries)


def repay(grant: GrantState, debt: int, now: float) -> list[Entry]:
    """The entry that pays back ``debt`` out of a (new) live grant: as much as it holds."""
    if debt <= 0 or not grant.live(now) or grant.remaining <= 0:
        return []
    return [Entry(grant.id, REPAY, min(debt, grant.remaining))]


def unrepay(repaid: Iterable[tuple[str, int]], amount: int) -> list[Entry]:
    """Give back ``amount`` of debt repayments that paid a debt which was then withdrawn (a
    withheld request's: never billed, Store invariant 8): negative ``repay`` entries, taken
    from ``repaid`` ((grant, what its repay entries still net) in the order to undo, newest
    first), each at most what that grant repaid, ``min(amount, sum repaid)`` in all. A
    negative ``repay`` puts the credits back on its grant and, in ``debt_delta``, the debt
    it had cancelled back on the ledger's sum, which the withdrawn debt (never written)
    leaves at what is really owed."""
    out: list[Entry] = []
    left = max(amount, 0)
    for gid, net in repaid:
        if left == 0:
            break
        take = min(left, net)
        if take > 0:
            out.append(Entry(gid, REPAY, -take))
            left -= take
    return out


def settle_cost(grants: Sequence[GrantState], cost: int, now: float,
                debt_ok: bool) -> tuple[list[Entry], int]:
    """Settle one request cost: debit live grants in burn order (``allocate``); the uncovered
    rest is a ``debt`` entry when ``debt_ok`` (a block customer: never invoiced) and the
    returned remainder (billable overage) is then 0."""
    entries, uncovered = allocate(grants, cost, now)
    if debt_ok and uncovered > 0:
        return [*entries, Entry("", DEBT, uncovered)], 0
    return entries, uncovered


def clawback(grant: GrantState, credits: int, expired_left: int, spent_left: int) -> list[Entry]:
    """Entries that take back ``credits`` of a grant whose payment was refunded, disputed or
    credited. Layers, in order: what is still unused (a ``refund`` entry on the grant), then
    what expired unused and was not already counted by an earlier claw-back (nothing to
    take: it is gone), then what was spent, up to ``spent_left`` (a ``debt`` entry: paid
    back first by the next grant). Never more than the three layers hold."""
    return clawback_layers(grant, credits, expired_left, 0, spent_left)[0]


def clawback_layers(grant: GrantState, credits: int, expired_left: int, carried_left: int,
                    spent_left: int) -> tuple[list[Entry], int]:
    """``clawback`` with a fourth layer: what a rollover carried into the next period's
    grant and no earlier claw-back followed yet (``carried_left``). Layers, in order:
    unused (``refund`` entry), expired and not carried (absorbs, takes nothing), carried
    (returned as the second value: the caller takes it from the grant that received it),
    spent (``debt``, up to ``spent_left``). The expired layer goes before the carried one
    so that a refund after the renewal takes what the same refund before it would have:
    the carry takes only what is left, capped, and the cap's excess expires."""
    t = clawback_take(credits, 0, ClawbackRoom(grant.remaining, expired_left, carried_left,
                                               spent_left))
    return t.entries(grant.id), t.follow


@dataclass(frozen=True, slots=True)
class ClawbackRoom:
    """What a grant still has for claw-backs to take, layer by layer (below 0 counts 0)."""
    unused: int         # its remaining credit
    absorb: int         # expired, not carried on, and not counted by an earlier claw-back
    carried: int        # carried on into the next period's grant, not followed there yet
    spent: int          # spent (debits, repayments), not owed by an earlier claw-back yet


@dataclass(frozen=True, slots=True)
class ClawbackTake:
    """What one claw-back takes from one grant's layers (``clawback_take``)."""
    refund: int         # unused: a ``refund`` entry on the grant
    absorbed: int       # expired and not carried on: gone already, takes nothing
    follow: int         # carried on: taken from the next period's grant (its ``carried``)
    owed: int           # spent, and what of ``owed_in`` no layer held: owed by the customer

    def entries(self, grant_id: str) -> list[Entry]:
        """The entries when what is owed stays here as debt (no next period to owe it to)."""
        out = [Entry(grant_id, REFUND, self.refund)] if self.refund > 0 else []
        return [*out, Entry("", DEBT, self.owed)] if self.owed > 0 else out


def clawback_room(amount: int, remaining: int, sums: Mapping[str, int], clawed_total: int,
                  owed: int, carried_out: int, followed_out: int,
                  owed_into: int = 0) -> ClawbackRoom:
    """The layers of a grant of ``amount`` (``remaining`` left, ``sums``: kind -> total of
    its entries) that claw-backs have not taken yet: ``clawed_total`` is everything clawed
    back from it (any key, follows and debt owed into it included), ``owed`` what of that
    became debt or was owed on to the next period, ``carried_out`` what a rollover carried
    on into the next period's grant, ``followed_out`` what of that claw-backs followed
    there already. ``owed_into``: spent credits of earlier periods that claw-backs owed
    into this grant; had those refunds come first, the grant would have repaid them when
    it was made, so they count in its spent layer as its own repayments do."""
    refunded, expired = sums.get(REFUND, 0), sums.get("expire", 0)
    spent = amount - remaining - refunded - expired - sums.get("void", 0) + max(owed_into, 0)
    carried = min(max(carried_out, 0), expired)
    absorbed = clawed_total - refunded - owed - followed_out
    return ClawbackRoom(max(remaining, 0), max(expired - carried - absorbed, 0),
                        max(carried - followed_out, 0), max(spent - owed, 0))


def clawback_take(credits: int, owed_in: int, room: ClawbackRoom) -> ClawbackTake:
    """Take ``credits`` (a grant's share of a returned payment, or credits a claw-back
    followed into it: it held that much less from the start) and ``owed_in`` (spent credits
    of an earlier period's refunded grant: had the refund come first, this grant would
    have repaid them when it was made) from one grant's layers, in order: unused, expired
    and not carried on, carried on, spent. What ``credits`` finds no layer for is not
    taken (never more than the grant holds: a void or an earlier claw-back took it); what
    of ``owed_in`` no layer holds stays owed, as the spent layer does."""
    x = max(credits, 0) + max(owed_in, 0)
    refund = min(x, max(room.unused, 0))
    rest = x - refund
    absorbed = min(rest, max(room.absorb, 0))
    rest -= absorbed
    follow = min(rest, max(room.carried, 0))
    rest -= follow
    spent = min(rest, max(room.spent, 0))
    rest -= spent
    return ClawbackTake(refund, absorbed, follow, spent + min(rest, max(owed_in, 0)))


def clawback_step(grant: GrantState, room: ClawbackRoom, credits: int, owed_in: int,
                  owe_on: bool) -> tuple[list[Entry], int, int]:
    """One grant's part of a claw-back (``clawback_take``): (entries, credits to follow into
    the next period's grant, spent credits to owe on to it). ``owe_on``: the subscription's
    next period grant exists and is effective, so what is owed goes on to it (taken from its
    layers as if it had repaid it when it was made, which it would have had the refund
    come first); otherwise it is a ``debt`` entry here, repaid by the next grant."""
    t = clawback_take(credits, owed_in, room)
    if owe_on:
        return ([Entry(grant.id, REFUND, t.refund)] if t.refund > 0 else []), t.follow, t.owed
    return t.entries(grant.id), t.follow, 0


def clawback_credits(amount: int, paid_minor: int, returned_minor: int) -> int:
    """Credits of a grant of ``amount`` that ``returned_minor`` of the ``paid_minor`` its
    payment was worth take back (floor: a partial return never takes more than its share);
    nothing known about the payment's amount: all of it."""
    if returned_minor <= 0:
        return 0
    if paid_minor <= 0 or returned_minor >= paid_minor:
        return amount
    return amount * returned_minor // paid_minor
