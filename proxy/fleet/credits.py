"""``FleetCredits``: the request path's credit surface (what ``proxy.request.admission`` and
``proxy.request.settle`` call on a ``CreditBook``) over the member's ``LeaseBook``.

Fleet mode enforces credits for customers with ``overage: block`` (the ones a 402 is for):

- **admission** (``admit``, async, before the admission critical section): the request's
  admission cost (constant quantities' cost plus the reservation for quantities known only
  afterwards) is debited from the member's lease; without enough lease, one synchronous
  refill; ``INSUFFICIENT`` is a 402, ``UNAVAILABLE`` (PostgreSQL away, ``fail_mode:
  closed``) a 503. The ``Hold`` carries that amount.
- **settlement** (``settle``): the actual cost replaces the hold in the lease's count: less
  returns the difference to the lease, more spends beyond it (the lease goes negative: that
  is debt, paid from the next refill before anything more is admitted on this member). The
  usage row carries the actual cost as its credits, and shipping settles exactly that in
  the database (within the lease, else straight to ``settled``).
- nothing here writes grant-level debit entries: the fleet's spend is the shipped usage
  ledger settled against ``credit_accounts``.

Customers without ``overage: block`` are never refused for credits. Those holding grants
with credit left (``has_credits``, from the shared ledger as the member last reloaded it) are
charged through a lease like block customers, but with a hold that is not ``debt_ok``: what
the lease cannot cover is admitted uncharged and billed as overage, and a post-response cost
above the hold is billed for the excess (as a single process covers a ``bill`` customer's
usage with its credits first). Customers without credits are not gated and make no database
round trip.

Overspend, fleet-wide: 0 for rules whose cost is known at admission (constant quantities);
for quantities known only after the response, at most the sum over requests in flight of
(actual - hold), each paid back as debt before the member admits the customer again.
"""

from __future__ import annotations

from proxy.credits.book import CreditBook, Hold
from proxy.credits.ledger import Entry
from proxy.fleet.book import Decision, LeaseBook


def shadow_split(costs: list[int], held: int) -> tuple[list[int], int]:
    """Pure: each cost's uncovered part when ``held`` covers the costs in order, and what of
    ``held`` is left over."""
    out = []
    for c in costs:
        take = min(max(c, 0), held)
        held -= take
        out.append(c - take)
    return out, held


class FleetCredits(CreditBook):
    """A ``CreditBook`` for the request path whose admission and settlement are the
    member's leases (the grant-level book stays empty: see the module doc)."""

    def __init__(self, leases: LeaseBook, shadow: bool = False) -> None:
        super().__init__()
        self.leases = leases
        self.shadow = shadow      # credits.enforcement: shadow (the hold is not debt_ok)
        # the credit service's book, reloaded from the shared ledger (proxy.fleet.runtime):
        # which customers hold grants (set by the composition root)
        self.shared: CreditBook | None = None
        self._lease_of: dict[int, int] = {}      # id(hold) -> the lease it was debited from

    async def admit(self, customer_id: str, cost: int, now: float) -> Hold | Decision:
        """Debit ``cost`` from the lease (refilling once if needed): the hold, or the
        refusal's decision (INSUFFICIENT: 402; UNAVAILABLE: 503)."""
        d = await self.leases.admit(customer_id, cost)
        if d in (Decision.ADMIT, Decision.ADMIT_OWED):
            return self._hold(customer_id, cost, now)
        return d

    async def lease_admit(self, customer_id: str, cost: int, now: float) -> Hold | str:
        """``admit`` for the request path (``proxy.request.admission.LeaseAdmit``): the
        hold, or the refusal's name ("insufficient", "unavailable")."""
        got = await self.admit(customer_id, cost, now)
        return got.value if isinstance(got, Decision) else got

    def _hold(self, customer_id: str, cost: int, now: float) -> Hold:
        hold = Hold(customer_id, cost, admitted_at=now, debt_ok=not self.shadow)
        self.leases.hold_opened(customer_id)      # the lease is not idle until it ends
        h = self.leases.held.get(customer_id)
        if h is not None:
            self._lease_of[id(hold)] = h.lease_id
        return hold

    def _adjust(self, hold: Hold, delta: int) -> None:
        """Move the lease's count by ``delta``: a refund only to the lease the hold was
        debited from (a later lease never escrowed it); an excess to whatever lease is held
        (without one it is settled as debt when the row ships)."""
        self.leases.hold_closed(hold.customer_id)
        lease_id = self._lease_of.pop(id(hold), None)
        h = self.leases.held.get(hold.customer_id)
        if h is None or (delta < 0 and h.lease_id != lease_id):
            return
        h.spent += delta       # negative: back to the lease; beyond granted: debt

    # ---- the CreditBook surface the request path uses ------------------------------------

    def has_credits(self, customer_id: str) -> bool:
        """A lease is held for the customer, or the shared ledger has credit left on one of
        its grants (a customer without ``overage: block`` is then admitted through a lease
        too, never refused: see ``proxy.request.admission.admit_leased``)."""
        if customer_id in self.leases.held:
            return True
        shared = self.shared
        return shared is not None and any(g.remaining > 0 and not g.voided
                                          for g in shared.grants(customer_id))

    def available(self, customer_id: str, now: float) -> int:
        """What this member may still admit for the customer without asking (its lease)."""
        h = self.leases.held.get(customer_id)
        return 0 if h is None else h.remaining

    def try_hold(self, customer_id: str, amount: int, now: float, block: bool,
                 debt_ok: bool = False) -> Hold | None:
        """Synchronous admission against the held lease only (no refill)."""
        if self.leases.try_admit(customer_id, amount):
            return self._hold(customer_id, amount, now)
        return None

    def grow(self, hold: Hold, extra: int, now: float, block: bool) -> bool:
        if extra <= 0 or self.leases.try_admit(hold.customer_id, extra):
            hold.amount += max(extra, 0)
            return True
        return False

    def release(self, hold: Hold) -> None:
        """Not billable, or refused after admission: the whole hold goes back to the lease."""
        if not hold.released:
            hold.released = True
            self._adjust(hold, -hold.amount)

    def settle(self, hold: Hold, costs: list[int], now: float) -> list[tuple[list[Entry], int]]:
        """The actual costs replace the hold; each cost is fully charged in credits (the
        grant-level entries are written when the row ships: proxy.store.postgres.grant_debits).
        Under ``credits.enforcement: shadow`` (a hold that is not ``debt_ok``) nothing
        becomes debt: the costs are charged up to the hold, the rest is uncovered (billed)."""
        if hold.released:
            return [([], 0) for _ in costs]
        hold.released = True
        if hold.debt_ok:
            self._adjust(hold, sum(costs) - hold.amount)
            return [([], 0) for _ in costs]
        out, left = shadow_split(costs, hold.amount)
        self._adjust(hold, -left)
        return [([], u) for u in out]
