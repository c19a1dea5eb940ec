"""CreditBook: the in-memory credit state the request path reads and changes.

The one place admission, reservation and debit happen. Every method is synchronous and
contains no ``await``, so on the single event-loop thread each call is a critical section:
two concurrent requests can never both spend the same credit.

Bound on overspend (README, "Credits"): a request is admitted only if its fixed cost plus
its reservation (``estimate``) fits in ``available``; when it settles it is debited what
it actually measured. The balance can therefore fall short by at most the sum, over the
requests in flight, of (actual variable cost - reserved estimate); that shortfall is never
taken from a grant (no grant goes below zero): it is billed as overage.

Persistence: the book only changes memory. Debit entries travel with the request's usage
row into the same group-commit transaction (``UsageRow.debits``); grants, voids and
expiries are written by ``proxy.credits.service`` before the book is told.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from proxy.credits.ledger import Entry, GrantState, allocate, apply, available, burn_order, expire_due


@dataclass(slots=True)
class Hold:
    customer_id: str
    amount: int
    released: bool = False


class CreditBook:
    def __init__(self) -> None:
        self._grants: dict[str, list[GrantState]] = {}     # customer -> burn order
        self._by_id: dict[str, GrantState] = {}
        self._held: defaultdict[str, int] = defaultdict(int)
        self._inflight: defaultdict[str, int] = defaultdict(int)

    # ---- loading and changes from the service layer ----------------------------------

    def load(self, grants: Iterable[GrantState], entries: Iterable[Entry]) -> None:
        by_id = {g.id: g for g in grants}
        apply(by_id, entries)
        per: dict[str, list[GrantState]] = defaultdict(list)
        for g in by_id.values():
            per[g.customer_id].append(g)
        self._by_id = by_id
        self._grants = {c: burn_order(gs) for c, gs in per.items()}

    def add_grant(self, g: GrantState) -> None:
        self._by_id[g.id] = g
        self._grants[g.customer_id] = burn_order([*self._grants.get(g.customer_id, []), g])

    def apply(self, entries: Iterable[Entry]) -> None:
        apply(self._by_id, entries)

    def grant(self, grant_id: str) -> GrantState | None:
        return self._by_id.get(grant_id)

    def grants(self, customer_id: str) -> list[GrantState]:
        return list(self._grants.get(customer_id, ()))

    def all_grants(self) -> list[GrantState]:
        return list(self._by_id.values())

    # ---- the hot path ---------------------------------------------------------------------

    def has_credits(self, customer_id: str) -> bool:
        """True once a customer has ever been granted credits (pay-as-you-go otherwise)."""
        return customer_id in self._grants

    def balance(self, customer_id: str, now: float) -> int:
        """Live credits left, before holds."""
        return available(self._grants.get(customer_id, ()), now)

    def available(self, customer_id: str, now: float) -> int:
        """What a new request may spend: balance minus what in-flight requests hold."""
        return self.balance(customer_id, now) - self._held[customer_id]

    def held(self, customer_id: str) -> int:
        return self._held[customer_id]

    def inflight(self, customer_id: str) -> int:
        return self._inflight[customer_id]

    def try_hold(self, customer_id: str, amount: int, now: float, block: bool) -> Hold | None:
        """Admission. ``block``: refuse (None) unless ``amount`` fits in ``available``.
        Otherwise hold what fits (possibly nothing) and admit."""
        avail = self.available(customer_id, now)
        if block and amount > avail:
            return None
        take = max(0, min(amount, avail))
        self._held[customer_id] += take
        self._inflight[customer_id] += 1
        return Hold(customer_id, take)

    def release(self, hold: Hold) -> None:
        if hold.released:
            return
        hold.released = True
        self._held[hold.customer_id] -= hold.amount
        self._inflight[hold.customer_id] -= 1

    def settle(self, hold: Hold, costs: list[int], now: float) -> list[tuple[list[Entry], int]]:
        """Release the hold and debit each cost in burn order; returns, per cost, the debit
        entries and the uncovered remainder (overage). Applied to memory immediately."""
        self.release(hold)
        grants = self._grants.get(hold.customer_id, [])
        out: list[tuple[list[Entry], int]] = []
        for cost in costs:
            entries, uncovered = allocate(grants, cost, now)
            apply(self._by_id, entries)
            out.append((entries, uncovered))
        return out

    # ---- expiry -----------------------------------------------------------------------------

    def due_expiries(self, now: float) -> list[Entry]:
        return expire_due(self._by_id.values(), now)

    def next_expiry(self, now: float) -> float | None:
        times = [g.expires_at for g in self._by_id.values()
                 if g.expires_at is not None and g.remaining > 0 and not g.voided]
        return float(min(times)) if times else None
