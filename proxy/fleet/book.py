"""``LeaseBook``: a member's local admission against the credit leases it holds.

Admission is local and synchronous (``try_admit``: no I/O, atomic on the event loop): a
request of fixed cost c is admitted only if the held lease has ``c`` left and the holder's
own deadline has not passed. When it has not, ``admit`` makes one synchronous refill (one
in flight per customer; concurrent requests wait for the same one) and tries again, and
answers ``INSUFFICIENT`` (402) only when a refill granted nothing. After such an empty
grant, requests for that customer are answered 402 locally for ``empty_backoff_ms`` (a
customer out of credit does not cost a database statement per request; a top-up is seen
within that time). So, fleet-wide:

- fixed-cost admissions never exceed the balance (each admitted cost sits inside a lease the
  database escrowed; a lease is never spent past the holder's deadline, which precedes the
  database's ``expires_at`` by the drift margin);
- a balance is spent to the last quantum: leases are whole multiples of the cost that asked
  for them, and a book answers 402 only after the database had nothing left to give.

PostgreSQL unreachable (``PgUnavailable`` from the refill, or a ``PgConflict`` its retries did
not clear): the held lease keeps serving until spent or past its deadline; then ``fail_mode``
decides: ``closed`` answers ``UNAVAILABLE`` (503); ``open`` admits up to ``offline_allowance``
micro-credits per customer as ``ADMIT_OWED`` (the usage is journaled and shipped like any other and settles as debt),
which bounds the extra overspend per outage to members x allowance.

The book counts what it admitted (``spent``) per lease; the journal rows carrying those
credits reach the database through ``proxy.store.postgres.shipping``, which settles the lease.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from proxy import tasks
from proxy.fleet import sizing
from proxy.fleet.clock import monotonic_ms
from proxy.store.postgres.errors import PgConflict, PgUnavailable
from proxy.store.postgres.leases import Grant, LeaseStore
from proxy.store.postgres.members import Superseded

log = logging.getLogger("meterproxy.fleet.book")


class Decision(enum.Enum):
    ADMIT = "admit"
    ADMIT_OWED = "admit_owed"        # fail_mode open, database unreachable, lease spent
    INSUFFICIENT = "insufficient"    # 402: the database had nothing left to lease
    UNAVAILABLE = "unavailable"      # 503: fail_mode closed, database unreachable, lease spent


@dataclass(slots=True)
class Held:
    """One customer's lease as this member sees it."""

    lease_id: int
    granted: int          # the lease's whole grant (from the database)
    spent: int            # admitted against it here
    usable_until_ms: int  # the holder's deadline (its monotonic clock)
    used_ms: int = 0      # the last admission against it (or grant for one), same clock

    @property
    def remaining(self) -> int:
        return self.granted - self.spent


class LeaseBook:
    """Admission for one member; all state is in memory, owned by one event loop."""

    def __init__(self, store: LeaseStore, fail_mode: Literal["closed", "open"] = "closed",
                 offline_allowance: int = 0, clock: Callable[[], int] = monotonic_ms) -> None:
        self.store = store
        self.policy = store.policy
        self.fail_mode = fail_mode
        self.offline_allowance = offline_allowance
        self.clock = clock
        self.held: dict[str, Held] = {}
        self.owed: dict[str, int] = {}            # admitted without a lease (fail_mode open)
        self._rate: dict[str, int] = {}           # micro-credits / s, smoothed
        self._rate_at: dict[str, tuple[int, int]] = {}  # customer -> (since ms, spent since)
        self._refills: dict[str, asyncio.Future[Grant | None]] = {}
        self._empty_until: dict[str, int] = {}     # customer -> no refill before (ms)
        self._releasing: dict[str, asyncio.Future[int]] = {}   # a return in flight
        # a return sent and not known to have committed (the database unreachable, or its
        # reply lost): customer -> (lease id, spent), sent again before anything else
        self._unreturned: dict[str, tuple[int, int]] = {}
        self.holding: dict[str, int] = {}          # customer -> request holds not yet ended
        self.rtt_ms = 50
        self.refills = 0                           # grant statements issued
        self.idle_returns = 0                      # leases returned for being idle
        # called with the refusal when a grant finds the member id claimed by another
        # process (the runtime stops metering: proxy.fleet.runtime.Fleet._supersede)
        self.on_superseded: Callable[[Superseded], None] | None = None
        self.superseded = False                    # then: no more statements, no leases

    # -- the hot path ---------------------------------------------------------------------
    def try_admit(self, customer_id: str, cost: int) -> bool:
        """Admit against the held lease, or not; never does I/O."""
        h = self.held.get(customer_id)
        now = self.clock()
        if h is None or h.remaining < cost or now >= h.usable_until_ms:
            return False
        h.spent += cost
        h.used_ms = now
        self._count(customer_id, cost, now)
        return True

    async def admit(self, customer_id: str, cost: int) -> Decision:
        """Local first; else synchronous refills until one grants nothing."""
        while True:
            if self.try_admit(customer_id, cost):
                self._refill_ahead(customer_id, cost)
                return Decision.ADMIT
            if self.clock() < self._empty_until.get(customer_id, 0):
                return Decision.INSUFFICIENT
            got = await self._refill(customer_id, cost)
            if got is None:
                return self._unreachable(customer_id, cost)
            if got.amount == 0 and not self.try_admit(customer_id, cost):
                self._empty_until[customer_id] = self.clock() + self.policy.empty_backoff_ms
                return Decision.INSUFFICIENT
            if got.amount == 0:
                return Decision.ADMIT

    def _unreachable(self, customer_id: str, cost: int) -> Decision:
        if self.fail_mode == "closed":
            return Decision.UNAVAILABLE
        owed = self.owed.get(customer_id, 0)
        if owed + cost > self.offline_allowance:
            return Decision.UNAVAILABLE
        self.owed[customer_id] = owed + cost
        return Decision.ADMIT_OWED

    # -- refills ----------------------------------------------------------------------------
    def _refill(self, customer_id: str, quantum: int) -> asyncio.Future[Grant | None]:
        """The refill in flight for the customer, or a new one. A finished refill is never
        handed out again: its done callback (which forgets it) may not have run yet, and
        awaiting a finished future does not yield, so ``admit`` would loop on the same
        grant without ever letting the event loop run."""
        fut = self._refills.get(customer_id)
        if fut is None or fut.done():
            fut = tasks.spawn(f"lease-refill-{customer_id}", self._grant(customer_id, quantum))
            self._refills[customer_id] = fut

            def forget(f: asyncio.Future[Grant | None]) -> None:
                if self._refills.get(customer_id) is f:
                    del self._refills[customer_id]
            fut.add_done_callback(forget)
        return fut

    def _refill_ahead(self, customer_id: str, quantum: int) -> None:
        h = self.held[customer_id]
        if customer_id in self._refills:
            return
        left = h.usable_until_ms - self.clock()
        if sizing.should_refill(h.remaining, self._rate.get(customer_id, 0), self.rtt_ms,
                                self.policy.lead_ms, left, self.policy.ttl_ms):
            self._refill(customer_id, quantum)

    async def _grant(self, customer_id: str, quantum: int) -> Grant | None:
        """One grant statement; None when PostgreSQL is unreachable."""
        if self.superseded:
            return None
        releasing = self._releasing.get(customer_id)
        if releasing is not None:
            # the return's statement cuts the lease to what was spent: a grant committed
            # before it would be cut too, and this book would spend credit nobody escrowed
            await asyncio.wait((releasing,))
        if (unreturned := self._unreturned.get(customer_id)) is not None:
            try:
                await self._return(customer_id, *unreturned)
            except (PgUnavailable, PgConflict) as exc:
                log.warning("returning %s's lease before a refill failed, PostgreSQL "
                            "unreachable or conflicting: %s", customer_id, exc)
                return None
        wanted = sizing.want(self._rate.get(customer_id, 0), self.policy.cover_ms)
        sent = self.clock()
        try:
            got = await self.store.grant(customer_id, wanted, quantum)
        except Superseded as exc:
            log.warning("lease refill for %s refused: %s", customer_id, exc)
            self.supersede(exc)
            return None
        except (PgUnavailable, PgConflict) as exc:
            log.warning("lease refill for %s failed, PostgreSQL unreachable or conflicting: %s",
                        customer_id, exc)
            return None
        self.refills += 1
        self.rtt_ms = max(1, self.clock() - sent)
        self.owed.pop(customer_id, None)   # the database is back: a new allowance next outage
        if got.amount > 0:
            self._empty_until.pop(customer_id, None)
        if got.lease_id is None or got.granted_total is None:
            self.held.pop(customer_id, None)
            return got
        h = self.held.get(customer_id)
        if h is None or h.lease_id != got.lease_id:
            # a lease this book has not seen may be one an earlier process of this member
            # held (same member id after a restart): what it had not reported may already be
            # spent, in a journal not yet shipped. Only the part granted now is trusted; the
            # rest returns through release and the reaper.
            h = Held(got.lease_id, got.granted_total, got.granted_total - got.amount, 0)
            self.held[customer_id] = h
        h.granted = got.granted_total
        h.used_ms = self.clock()          # a grant is asked for an admission
        if got.amount > 0:
            h.usable_until_ms = sizing.usable_until_ms(sent, self.policy.ttl_ms,
                                                       self.policy.drift_margin_ppm)
        return got

    async def wait_refills(self) -> None:
        """Wait for the refills in flight (before release at shutdown); errors are ignored:
        the next request that needs a lease asks again."""
        await asyncio.gather(*self._refills.values(), return_exceptions=True)

    async def renew(self, customer_id: str) -> bool:
        """Push the held lease's expiry; False (and the lease forgotten) if it is gone."""
        sent = self.clock()
        got = await self.store.renew(customer_id)
        h = self.held.get(customer_id)
        if got is None or h is None or got[0] != h.lease_id:
            self.held.pop(customer_id, None)
            return False
        h.usable_until_ms = sizing.usable_until_ms(sent, self.policy.ttl_ms,
                                                   self.policy.drift_margin_ppm)
        return True

    def supersede(self, exc: Superseded) -> None:
        """Another process holds this member id: no lease is used or asked for again (the
        leases under the id are that process's), and the runtime is told once."""
        if self.superseded:
            return
        self.superseded = True
        self.held.clear()
        if (tell := self.on_superseded) is not None:
            tell(exc)

    # -- holds ------------------------------------------------------------------------------
    def hold_opened(self, customer_id: str) -> None:
        """A request holds credit admitted here (``proxy.fleet.credits``): until it ends
        (``hold_closed``) the customer's lease is not idle."""
        self.holding[customer_id] = self.holding.get(customer_id, 0) + 1

    def hold_closed(self, customer_id: str) -> None:
        n = self.holding.get(customer_id, 0) - 1
        if n > 0:
            self.holding[customer_id] = n
        else:
            self.holding.pop(customer_id, None)

    # -- returns ----------------------------------------------------------------------------
    async def _return(self, customer_id: str, lease_id: int, spent: int) -> int:
        """One return statement (``LeaseStore.release``). It runs to its end even if the
        caller is cancelled (shutdown), and a refill for the customer waits for it
        (``_grant``). Until it is known to have committed it is remembered
        (``_unreturned``) and sent again before the customer's next grant and at each
        ``release_idle``: the statement gives back nothing twice while no grant comes
        between (it cuts the lease to ``max(spent, reported)``)."""
        self._unreturned[customer_id] = (lease_id, spent)

        async def send() -> int:
            back = await self.store.release(customer_id, lease_id, spent)
            if self._unreturned.get(customer_id) == (lease_id, spent):
                del self._unreturned[customer_id]
            return back
        fut = tasks.spawn(f"lease-return-{customer_id}", send())
        self._releasing[customer_id] = fut

        def forget(f: asyncio.Future[int]) -> None:
            if self._releasing.get(customer_id) is f:
                del self._releasing[customer_id]
            if not f.cancelled():
                f.exception()          # retrieved: a failure is remembered, and logged once
        fut.add_done_callback(forget)
        return await asyncio.shield(fut)

    def idle(self, customer_id: str) -> bool:
        """The customer's lease had no admission for ``policy.idle_ms``, no request admitted
        here still holds credit on it, and no refill is in flight for it."""
        h = self.held.get(customer_id)
        return (h is not None and customer_id not in self.holding
                and customer_id not in self._refills
                and self.clock() - h.used_ms >= self.policy.idle_ms)

    async def release_idle(self) -> int:
        """Return every idle lease (``idle``), and send again returns that failed: credit
        no request here is using goes back to the balance, where every member can lease it.
        A failure leaves that return for the next pass and goes on with the others.
        Also forgets what the book keeps per customer for customers with no lease here: the
        spend rate of a returned lease's customer (its next lease is sized from the floor
        again) and a 402 backoff that ended, so the book holds state for active customers
        only. Returns the micro-credits given back."""
        now = self.clock()
        for customer_id in [c for c, until in self._empty_until.items() if until <= now]:
            del self._empty_until[customer_id]
        total = await self._resend_failed()
        for customer_id in list(self.held):
            if self.idle(customer_id):       # checked again: the loop awaits between leases
                back = await self._try_return(customer_id, self.held.pop(customer_id))
                total += back
                self.idle_returns += back > 0
                if customer_id not in self.held:
                    self._rate.pop(customer_id, None)
                    self._rate_at.pop(customer_id, None)
        return total

    async def _resend_failed(self) -> int:
        """The returns that failed before (``_unreturned``; none in flight, no lease held
        for the customer since), sent again; the micro-credits they gave back."""
        total = 0
        for customer_id in list(self._unreturned):
            if customer_id not in self._releasing and customer_id not in self.held:
                total += await self._try_return(customer_id, None)
        return total

    async def _try_return(self, customer_id: str, h: Held | None) -> int:
        """``h``'s return, or the customer's unreturned one again; 0 when it failed (logged;
        remembered for the next pass)."""
        got = (h.lease_id, h.spent) if h is not None else self._unreturned.get(customer_id)
        if got is None:
            return 0
        try:
            return await self._return(customer_id, *got)
        except (PgUnavailable, PgConflict) as exc:
            log.warning("returning %s's lease failed, PostgreSQL unreachable or conflicting "
                        "(sent again before its next refill and at the next pass): %s",
                        customer_id, exc)
            return 0

    async def release_all(self) -> int:
        """Shutdown: every lease held, after the refills and returns in flight, and the
        returns that failed before; a return that fails is logged and the others go on."""
        await self.wait_refills()
        await asyncio.gather(*self._releasing.values(), return_exceptions=True)
        total = await self._resend_failed()
        for customer_id in list(self.held):
            total += await self._try_return(customer_id, self.held.pop(customer_id))
        return total

    # -- rate -------------------------------------------------------------------------------
    def _count(self, customer_id: str, cost: int, now: int) -> None:
        since, spent = self._rate_at.get(customer_id, (now, 0))
        spent += cost
        if now - since >= 1000:
            self._rate[customer_id] = sizing.ewma_rate(self._rate.get(customer_id, 0), spent,
                                                       now - since)
            since, spent = now, 0
        self._rate_at[customer_id] = (since, spent)

