"""CreditBook: the in-memory credit state the request path reads and changes.

The one place admission, reservation and debit happen. Every method is synchronous and
contains no ``await``, so on the single event-loop thread each call is a critical section:
two concurrent requests can never both spend the same credit.

Bound on overspend (docs/credits.md): a request is admitted only if its fixed cost plus
its reservation (``proxy.credits.reserve``: a request hint, else a learned high percentile,
never below ``estimate``) fits in ``available``; when it settles it is debited what it
actually measured. The balance can therefore fall short by at most the sum, over the
requests in flight, of (actual cost - held amount). That shortfall is never taken from a
grant (no grant goes below zero): for a ``block`` customer it becomes *debt* (a ``debt``
entry, paid back first out of the next grant, never reported to Stripe); for a ``bill``
customer it is billed as overage.

Expiry at admission (finding 10): a request is settled against the grants as they were
live when it was *admitted* (``Hold.admitted_at``), and a grant's expiry entry is deferred
while a request admitted before its ``expires_at`` is still in flight, so a request
admitted at t=999 on a grant expiring at 1000 and settled at 1001 is covered by it.

Persistence: the book only changes memory. Debit entries travel with the request's usage
row into the same group-commit transaction (``UsageRow.debits``); grants, voids and
expiries are written by ``proxy.credits.service`` before the book is told.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from proxy.credits.ledger import (
    DEBT,
    Entry,
    GrantState,
    apply,
    available,
    burn_order,
    debt_delta,
    expire_due,
    repay,
    settle_cost,
)

DEFERRED_EXPIRY_RETRY = 1.0     # seconds between checks while an expiry waits for a request


@dataclass(slots=True, eq=False)
class Hold:
    customer_id: str
    amount: int
    released: bool = False
    admitted_at: float = 0.0
    debt_ok: bool = False       # block customer, enforced: what is not covered becomes debt
    # its settlement waits for the customer's monetary account to open
    # (``proxy.request.settle``): the settlement releases it, not the request's end
    settle_later: bool = False


class CreditBook:
    def __init__(self) -> None:
        self._grants: dict[str, list[GrantState]] = {}     # customer -> burn order
        self._by_id: dict[str, GrantState] = {}
        self._held: defaultdict[str, int] = defaultdict(int)
        self._inflight: defaultdict[str, int] = defaultdict(int)
        self._debt: defaultdict[str, int] = defaultdict(int)
        self._holds: dict[str, set[Hold]] = {}

    # ---- loading and changes from the service layer ----------------------------------

    def load(self, grants: Iterable[GrantState], entries: Iterable[Entry],
             debts: dict[str, int] | None = None) -> None:
        """``debts``: customer -> outstanding debt (``debt`` minus ``repay`` entries)."""
        by_id = {g.id: g for g in grants}
        apply(by_id, entries)
        self._debt = defaultdict(int, {c: d for c, d in (debts or {}).items() if d > 0})
        per: dict[str, list[GrantState]] = defaultdict(list)
        for g in by_id.values():
            per[g.customer_id].append(g)
        self._by_id = by_id
        self._grants = {c: burn_order(gs) for c, gs in per.items()}

    def replace(self, customer_id: str, grants: Iterable[GrantState], debt: int) -> None:
        """Replace one customer's grants (their ``remaining`` already projected) and debt by
        a fresher view: fleet mode reloads the customers whose shared ledger moved
        (``proxy.fleet.runtime``). Holds and in-flight counts are kept."""
        for g in self._grants.pop(customer_id, ()):
            self._by_id.pop(g.id, None)
        gs = list(grants)
        for g in gs:
            self._by_id[g.id] = g
        if gs:
            self._grants[customer_id] = burn_order(gs)
        if debt > 0:
            self._debt[customer_id] = debt
        else:
            self._debt.pop(customer_id, None)

    def add_grant(self, g: GrantState) -> bool:
        """Add a grant just created; False (nothing changed) when the book already holds
        it: a fresher view loaded it first (fleet mode's refresh of a customer whose shared
        ledger moved can land while ``CreditService.grant`` awaits the write). Added twice,
        its credits could be spent twice until the next refresh."""
        if g.id in self._by_id:
            return False
        self._by_id[g.id] = g
        self._grants[g.customer_id] = burn_order([*self._grants.get(g.customer_id, []), g])
        return True

    def apply(self, entries: Iterable[Entry], customer_id: str | None = None) -> None:
        """Apply entries; ``debt``/``repay`` entries also change ``customer_id``'s debt."""
        entries = list(entries)
        apply(self._by_id, entries)
        if customer_id is not None:
            self._debt[customer_id] += debt_delta(entries)

    def withdraw(self, customer_id: str, entries: Iterable[Entry]) -> int:
        """Undo a settlement whose usage row was dropped (Store invariant 8: a withheld
        answer is never billed): each debit goes back to its grant and a ``debt`` entry is
        no longer owed. Returns how much of the withdrawn debt a grant had already repaid
        (a ``repay`` entry is written at once, before the row's commit): the debt owed is
        then less than the debt withdrawn, and those credits must go back to the grants
        that repaid them (``CreditService.withdraw``: negative ``repay`` entries)."""
        repaid = 0
        for e in entries:
            if e.kind == DEBT:
                left = self._debt.get(customer_id, 0) - e.amount
                if left > 0:
                    self._debt[customer_id] = left
                else:
                    repaid -= left
                    self._debt.pop(customer_id, None)
            elif (g := self._by_id.get(e.grant_id)) is not None:
                g.remaining += e.amount
        return repaid

    def reduce_debt(self, customer_id: str, amount: int) -> None:
        """Lower ``customer_id``'s debt by ``amount`` (never below zero) with no grant
        involved: repayments of a withdrawn debt that the ledger counts against debt made
        since (``CreditService.give_back_due``)."""
        left = self._debt.get(customer_id, 0) - max(amount, 0)
        if left > 0:
            self._debt[customer_id] = left
        else:
            self._debt.pop(customer_id, None)

    def debt(self, customer_id: str) -> int:
        return self._debt.get(customer_id, 0)

    def indebted(self) -> list[str]:
        return [c for c, d in self._debt.items() if d > 0]

    def next_effective(self, now: float) -> float | None:
        """When the next grant that is not effective yet becomes effective (its customer's
        debt is then repaid out of it)."""
        return min((float(g.effective_at) for g in self._by_id.values()
                    if g.effective_at is not None and g.effective_at > now and not g.voided
                    and self._debt.get(g.customer_id, 0) > 0), default=None)

    def repayment(self, g: GrantState, now: float) -> list[Entry]:
        """What a new grant pays back of its customer's debt (pure; not applied)."""
        return repay(g, self.debt(g.customer_id), now)

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
        """Live credits left, before holds, minus debt (negative while in debt)."""
        return available(self._grants.get(customer_id, ()), now) - self._debt.get(customer_id, 0)

    def available(self, customer_id: str, now: float) -> int:
        """What a new request may spend: balance minus what in-flight requests hold."""
        return self.balance(customer_id, now) - self._held[customer_id]

    def held(self, customer_id: str) -> int:
        return self._held[customer_id]

    def inflight(self, customer_id: str) -> int:
        return self._inflight[customer_id]

    def try_hold(self, customer_id: str, amount: int, now: float, block: bool,
                 debt_ok: bool = False) -> Hold | None:
        """Admission. ``block``: refuse (None) unless ``amount`` fits in ``available``.
        Otherwise hold what fits (possibly nothing) and admit. ``debt_ok``: at settlement,
        what the grants do not cover becomes debt instead of overage."""
        avail = self.available(customer_id, now)
        if block and amount > avail:
            return None
        take = max(0, min(amount, avail))
        self._held[customer_id] += take
        self._inflight[customer_id] += 1
        hold = Hold(customer_id, take, False, now, debt_ok)
        holds = self._holds.get(customer_id)
        if holds is None:
            holds = self._holds[customer_id] = set()
        holds.add(hold)
        return hold

    def grow(self, hold: Hold, extra: int, now: float, block: bool) -> bool:
        """Raise a hold by ``extra`` (a request hint read after admission). ``block``: False,
        and the hold unchanged, unless ``extra`` fits in ``available``."""
        if extra <= 0:
            return True
        avail = self.available(hold.customer_id, now)
        if block and extra > avail:
            return False
        take = max(0, min(extra, avail))
        self._held[hold.customer_id] += take
        hold.amount += take
        return True

    def release(self, hold: Hold) -> None:
        if hold.released:
            return
        hold.released = True
        self._held[hold.customer_id] -= hold.amount
        self._inflight[hold.customer_id] -= 1
        holds = self._holds.get(hold.customer_id)
        if holds is not None:
            holds.discard(hold)

    def settle(self, hold: Hold, costs: list[int], now: float) -> list[tuple[list[Entry], int]]:
        """Release the hold and debit each cost in burn order, against the grants live when
        the request was admitted; returns, per cost, the entries (debits, and a ``debt``
        entry for what a debt_ok hold leaves uncovered) and the uncovered remainder
        (overage; 0 for debt_ok). Applied to memory immediately."""
        self.release(hold)
        grants = self._grants.get(hold.customer_id, [])
        at = hold.admitted_at
        out: list[tuple[list[Entry], int]] = []
        for cost in costs:
            entries, uncovered = settle_cost(grants, cost, at, hold.debt_ok)
            apply(self._by_id, entries)
            if hold.debt_ok and entries and entries[-1].kind == "debt":
                self._debt[hold.customer_id] += entries[-1].amount
            out.append((entries, uncovered))
        return out

    # ---- expiry -----------------------------------------------------------------------------

    def _oldest_admission(self, customer_id: str) -> float | None:
        holds = self._holds.get(customer_id)
        return min((h.admitted_at for h in holds), default=None) if holds else None

    def _deferred(self, g: GrantState) -> bool:
        """A grant past expiry that a request admitted before its expiry may still settle on."""
        oldest = self._oldest_admission(g.customer_id)
        return oldest is not None and g.expires_at is not None and oldest < g.expires_at

    def expiry_deferred(self, grant_id: str) -> bool:
        """A request admitted before the grant's ``expires_at`` is still in flight: what the
        grant has left is not final yet (its expiry entry waits, and so must a rollover's
        close of it)."""
        g = self._by_id.get(grant_id)
        return g is not None and self._deferred(g)

    def due_expiries(self, now: float) -> list[Entry]:
        return [e for e in expire_due(self._by_id.values(), now)
                if not self._deferred(self._by_id[e.grant_id])]

    def next_expiry(self, now: float) -> float | None:
        times = [float(g.expires_at) if not (g.expires_at <= now and self._deferred(g))
                 else now + DEFERRED_EXPIRY_RETRY
                 for g in self._by_id.values()
                 if g.expires_at is not None and g.remaining > 0 and not g.voided]
        return min(times) if times else None
