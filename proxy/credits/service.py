"""CreditService: grants, voids and expiries, persisted through the ``CreditLedger`` owner
(``proxy.store.protocols``), then applied to the in-memory book. Also the credit detail the
admin API shows.

Order of every change: write the ledger (one verb, one transaction), then update the
book. A crash between the two is harmless: the book is rebuilt from the ledger
at start-up. In fleet mode (``reload`` set) the expiry task's writes (expiries, repayments,
give-backs) update the book by reading their customers back from the shared ledger, so a
write whose outcome was unknown (``StorageOutcomeUnknown``) is retried and never applied
twice (docs/fleet.md, "Repayments").
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from proxy.credits.book import CreditBook
from proxy.credits.ledger import Entry, GrantState, clawback_credits, clawback_room, clawback_step, repay
from proxy.errors import InvalidInput, StorageOutcomeUnknown, StorageUnavailable
from proxy.store.db import Store
from proxy.store.ledger import SqliteCreditLedger
from proxy.store.protocols import ClawbackDecision, CreditLedger, GrantFacts, LedgerEntry, LedgerSnapshot, NewGrant
from proxy.tasks import wait_event
from proxy.timeutil import rfc3339
from proxy.units import UnitError, fmt_micro, to_micro

log = logging.getLogger("meterproxy.credits")
EXPIRY_RETRY = 1.0      # seconds before an expiry pass whose write failed runs again
# what the expiry task retries: nothing written (SQLite locked, a PostgreSQL conflict), or
# PostgreSQL's outcome unknown (every write of the task is idempotent there: ``run_expiry``)
RETRIED: tuple[type[Exception], ...] = (StorageUnavailable, StorageOutcomeUnknown, sqlite3.Error)


def load_book(snapshot: LedgerSnapshot) -> CreditBook:
    """The in-memory book rebuilt from the ledger (``CreditLedger.load``)."""
    book = CreditBook()
    book.load(snapshot.grants, snapshot.entries, snapshot.debts)
    return book


def grant_json(g: GrantState, now: float) -> dict[str, Any]:
    return {"grant_id": g.id, "customer_id": g.customer_id, "credits": fmt_micro(g.amount),
            "remaining": fmt_micro(g.remaining if g.live(now) or g.pending(now) else 0),
            "priority": g.priority,
            "expires_at": rfc3339(g.expires_at) if g.expires_at is not None else None,
            "effective_at": rfc3339(g.effective_at) if g.effective_at is not None else None,
            "pending": g.pending(now),
            "expired": g.expires_at is not None and g.expires_at <= now,
            "voided": g.voided, "source": g.source, "created_at": rfc3339(g.created_at)}


class CreditService:
    def __init__(self, store: Store, book: CreditBook,
                 ledger: CreditLedger | None = None) -> None:
        self.store = store
        self.book = book
        self.ledger: CreditLedger = ledger if ledger is not None else SqliteCreditLedger(store)
        self._wake = asyncio.Event()
        # the monetary credits mode: micro-credits in one minor unit of a monetary
        # customer's currency (1 for a unit-mode customer); a grant is rounded down to it,
        # since a Stripe credit grant holds whole minor units (proxy.credits.mirror)
        self.quantum: Callable[[str], int] = lambda _customer_id: 1
        # called with a customer id when credits left one of its grants without a request
        # spending them (a claw-back's refund, a repayment of debt): the monetary mode's
        # Stripe credit grants must shrink too (proxy.credits.mirror)
        self.on_taken: Callable[[str], None] | None = None
        # key -> (customer, credits): repayments of a withdrawn debt still to give back
        # (``withdraw``), written by the expiry task (retried there if the write fails)
        self._give_back: dict[str, tuple[str, int]] = {}
        # fleet mode: the book is a view of the shared ledger (proxy.fleet.runtime); after
        # the expiry task writes, the customers it wrote for are read back from the ledger
        # (``reload``) instead of having the computed entries applied, so the book holds what
        # the ledger holds whichever attempt of a write whose outcome was unknown committed
        self.reload: Callable[[list[str]], Awaitable[None]] | None = None
        self._stale: set[str] = set()       # customers to read back (``resync``)

    def wake(self) -> None:
        """Re-plan the expiry loop (the book changed from outside: fleet mode's reload)."""
        self._wake.set()

    # ---- grants --------------------------------------------------------------------------

    async def grant(self, customer_id: str, credits: object, *, expires_at: int | None = None,
              priority: object = 50, source: str = "admin", idempotency_key: str | None = None,
              period: tuple[int, int] | None = None,
              payment: tuple[tuple[str, ...], int] | None = None,
              effective_at: int | None = None, carried: int = 0) -> tuple[GrantState, bool]:
        """Create a grant (idempotent on ``idempotency_key`` per customer). A new grant pays
        back the customer's debt first (a ``repay`` entry in the same transaction; a grant
        that is not effective yet repays once it is: ``repay_due``).
        ``payment``: the Stripe references (invoice, charge, payment intent, session) and the
        amount paid in minor units, kept so a refund, dispute or credit note can claw back;
        recorded on an existing grant too (a renewal granted when its invoice was created,
        then paid). ``effective_at``: spendable from then (None: at once); it may be in the
        past (a renewal paid after its period started is effective from the period start)."""
        try:
            amount = to_micro(credits)
        except UnitError as exc:
            raise InvalidInput(f"credits: {exc}") from exc
        if amount <= 0:
            raise InvalidInput("credits must be a positive decimal string")
        if (q := self.quantum(customer_id)) > 1:
            amount -= amount % q
            if amount <= 0:
                raise InvalidInput("credits of a monetary customer are money: at least one "
                                   "minor unit of its currency (0.01 USD, 1 JPY)")
        if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 100:
            raise InvalidInput("priority must be an integer from 0 (burns first) to 100")
        prio: int = priority
        if effective_at is not None and expires_at is not None and effective_at >= expires_at:
            raise InvalidInput("effective_at must be before expires_at")

        new = NewGrant(GrantState("grt_" + secrets.token_hex(8), customer_id, amount, prio,
                                  expires_at, int(time.time()), source,
                                  effective_at=effective_at),
                       idempotency_key, period, payment[0] if payment else (),
                       payment[1] if payment else 0, carried=min(max(carried, 0), amount))
        g, created = await self.ledger.create_grant(
            new, lambda g: self.book.repayment(g, time.time()))
        if created:
            # already in the book: a refresh read it back from the ledger, with the
            # repayments written at its creation (repaying again from this fresh copy would
            # take them twice)
            repaid = (self.book.repayment(g, time.time()) if self.book.add_grant(g)
                      else [])
            if repaid:
                self.book.apply(repaid, customer_id)
                if self.on_taken is not None:
                    self.on_taken(customer_id)
                if self.reload is not None:
                    # the shared ledger caps a repayment by the debt it still shows (another
                    # member may have repaid it): read the customer back now
                    await self._read_back(customer_id)
            self._wake.set()
            log.info("granted %s credits to %s (%s, %s)", fmt_micro(amount), customer_id, g.id,
                     source)
            return g, True
        return self.book.grant(g.id) or g, False

    async def repay_due(self, now: float | None = None) -> int:
        """Repay debt out of grants that have become effective since they were made (a
        renewal paid before its period): what ``grant`` could not take at creation."""
        now = time.time() if now is None else now
        n = 0
        for cid in self.book.indebted():
            entries: list[Entry] = []
            debt = self.book.debt(cid)
            for g in self.book.grants(cid):
                left = debt - sum(e.amount for e in entries)
                entries += repay(g, left, now)
            if entries:
                self._mark(cid)
                await self.ledger.append([LedgerEntry(cid, e, at=now) for e in entries])
                self._mark(cid)
                if self.reload is None:
                    self.book.apply(entries, cid)
                n += len(entries)
                if self.on_taken is not None:
                    self.on_taken(cid)
        await self.resync()
        return n

    # ---- a withheld request's settlement undone (Store invariant 8) --------------------------

    def withdraw(self, customer_id: str, entries: Iterable[Entry], key: str) -> int:
        """Undo the settlement of a row that will never be committed (its answer withheld:
        never billed). Synchronous (``Store._on_failure``): the book gives the debits back
        and drops the debt at once. What of that debt a grant made meanwhile had already
        repaid (its ``repay`` entry is in the ledger) is given back to that grant by
        ``give_back_due`` (negative ``repay`` entries, under ``key``), run by the expiry
        task at once and again every second while the write fails; until it is written
        those credits count in neither the balance nor the debt. Returns that amount."""
        repaid = self.book.withdraw(customer_id, entries)
        if repaid > 0:
            self._give_back[key] = (customer_id, repaid)
            self._wake.set()
            log.warning("withdrawn settlement %s of %s: %s credits of its debt were already "
                        "repaid; giving them back", key, customer_id, fmt_micro(repaid))
        return repaid

    def give_back_pending(self) -> int:
        """Repayments of withdrawn debt not written back yet (micro-credits)."""
        return sum(n for _, n in self._give_back.values())

    async def give_back_due(self, now: float | None = None) -> int:
        """Write the give-backs ``withdraw`` left (each once: ``undo_repay`` is idempotent
        on its key) and put the credits back on their grants in the book. A storage error
        leaves the rest pending (the caller retries)."""
        now = time.time() if now is None else now
        n = 0
        for key, (cid, amount) in list(self._give_back.items()):
            self._mark(cid)
            entries = await self.ledger.undo_repay(cid, key, amount, now)
            self._mark(cid)
            del self._give_back[key]
            if self.reload is None:
                # what the ledger did not give back, its debt sum kept against a debt made
                # since the withdrawal (a claw-back's, a row committed meanwhile): those
                # repayments now pay that debt, in the book as in the ledger
                self.book.reduce_debt(cid, amount + sum(e.amount for e in entries))
                self._give_back_applied(cid, entries)
            elif entries:
                log.info("gave back %s credits of unmatched repayments to %s",
                         fmt_micro(-sum(e.amount for e in entries)), cid)
                if self.on_taken is not None:
                    self.on_taken(cid)
            n += len(entries)
        await self.resync()
        return n

    async def give_back_unmatched(self, debts: dict[str, int]) -> int:
        """At start-up (the journal materialized: every committed debt is in the ledger), a
        customer whose ledger debt is negative holds repayments of a debt that was never
        committed (a withdrawal whose give-back did not get written, or a crash between a
        grant's ``repay`` and the debt's commit): give them back. Fleet mode passes the
        shared ledger's negative debts (``Fleet.overpaid``: over-repayments written before
        repayments were capped; members starting together give each back once, since
        ``undo_repay`` caps under the account lock: docs/fleet.md, "Repayments"). Written at
        once; if storage refuses or the outcome is unknown, left pending for the expiry task
        (start-up goes on). Returns the entries written."""
        for cid, d in sorted(debts.items()):
            if d < 0:
                self._give_back[f"unmatched:{cid}:{secrets.token_hex(8)}"] = (cid, -d)
        if not self._give_back:
            return 0
        try:
            return await self.give_back_due()
        except RETRIED as exc:
            log.warning("repayments of uncommitted debt not given back yet (the expiry task "
                        "retries): %s", exc)
            return 0

    def _give_back_applied(self, customer_id: str, entries: list[Entry]) -> None:
        if not entries:
            return
        # grants only: the debt these repayments cancelled was withdrawn from the book
        self.book.apply(entries)
        log.info("gave back %s credits of repaid withdrawn debt to %s",
                 fmt_micro(-sum(e.amount for e in entries)), customer_id)
        if self.on_taken is not None:
            self.on_taken(customer_id)

    async def void(self, grant_id: str) -> GrantState:
        g = self.book.grant(grant_id)
        if g is None:
            raise LookupError(f"no grant {grant_id!r}")
        if g.voided:
            return g
        entry = Entry(g.id, "void", g.remaining)
        self._mark(g.customer_id)
        await self.ledger.append([LedgerEntry(g.customer_id, entry)])
        if self.reload is None:
            self.book.apply([entry])
            return g
        # fleet mode: read back, never applied (a refresh pass between the commit and here
        # has read the void already: applying it again took the grant below zero)
        await self._read_back(g.customer_id)
        return self.book.grant(grant_id) or g

    # ---- claw-backs (refunds, disputes, credit notes) --------------------------------------

    async def claw_back(self, customer_id: str, refs: list[str], returned_minor: int, key: str,
                  event_id: str, fallback_paid: int = 0,
                  whole_grant: bool = False) -> list[dict[str, Any]]:
        """Take back the share of every grant paid by the payment named by ``refs`` (invoice,
        charge, payment intent or checkout session ids) that ``returned_minor`` of it is.
        ``key`` names the return: the same key is applied once, and a later event with the
        same key and a larger (cumulative) amount takes only the difference (Stripe's
        ``amount_refunded`` is cumulative). Unused credit goes first (``refund`` entry),
        expired credit absorbs its share, credit a rollover carried into the next period's
        grant is taken from that grant, spent credit becomes debt, or is owed on to the
        subscription's next period grant once that is effective, which takes both through
        its own layers (docs/credits.md, "Carry chains": a refund takes what it would have
        taken had it come first). A grant's share is of what its own payment bought: its amount
        minus what a rollover carried into it; ``whole_grant`` (a renewal written off
        unpaid, which is granted anew with its carry if paid later) takes the share of the
        whole amount."""
        refs = [r for r in refs if r]
        if not refs:
            return []
        if self.reload is not None:
            # fleet mode: the book is a view of the shared ledger as last reloaded. The
            # decision reads each grant from it, the next period's grant a follow or an
            # owed share goes to included (another member may have granted it since): read
            # the customer back first
            self._mark(customer_id)
            await self.resync([customer_id])

        def decide(f: GrantFacts) -> ClawbackDecision | None:
            g = self.book.grant(f.grant_id)
            if g is None or g.customer_id != customer_id:
                return None
            # the grant's own payment bought its amount minus what a rollover carried into
            # it (that part was bought by the previous payment, whose refund follows it)
            own = g.amount if whole_grant else g.amount - min(max(f.carried_in, 0), g.amount)
            target = f.follow_target if f.follow_target is not None else \
                clawback_credits(own, f.paid_minor or fallback_paid, returned_minor)
            delta = target - f.previous_credits
            owed_in = 0 if f.owe_target is None else f.owe_target - f.owe_previous
            if delta <= 0 and owed_in <= 0:
                return None
            # what the grant holds: the book's view or the ledger's, whichever is less. A
            # single process's book also counts debits still in the group-commit buffer; a
            # fleet member's book is a view of the shared ledger as last reloaded, and the
            # ledger (read under the account lock) also has what other members shipped
            # since: spent credit, never unused credit to refund. What earlier claw-backs
            # owed (debt here, or owed on to the next period) is not spent credit left to
            # take
            remaining = min(g.remaining, g.amount - sum(f.sums.values()))
            room = clawback_room(g.amount, remaining, f.sums, f.clawed_total,
                                 f.owed + f.owed_on, f.carried_out, f.followed_out,
                                 f.owed_into + max(owed_in, 0))
            # what is owed goes on to the next period's grant once it is effective: had the
            # refund come first, that grant would have repaid it when it was made
            # (docs/credits.md, "Carry chains"); else it is debt, repaid by the next grant
            nxt = self.book.grant(f.successor) if f.successor is not None else None
            entries, follow, owe = clawback_step(
                g, room, max(delta, 0), max(owed_in, 0),
                nxt is not None and not nxt.pending(time.time()))
            return ClawbackDecision(max(target, f.previous_credits), entries, follow, owe)

        self._mark(customer_id)     # (fleet mode: an outcome unknown leaves it marked)
        done = await self.ledger.claw_back(customer_id, refs, key, event_id, returned_minor,
                                           decide)
        out: list[dict[str, Any]] = []
        applied: list[Entry] = []
        for gid, delta, entries in done:
            out.append({"grant_id": gid, "credits": fmt_micro(delta),
                        "unused_taken": fmt_micro(sum(e.amount for e in entries
                                                      if e.kind == "refund")),
                        "debt": fmt_micro(sum(e.amount for e in entries if e.kind == "debt"))})
            applied.extend(entries)
        if applied:
            if self.reload is None:
                self.book.apply(applied, customer_id)
            else:
                # fleet mode: the book is a view of the shared ledger, and a refresh pass
                # (Fleet.refresh_credits) may have run between the commit and here (the
                # connection's release is an await): it read these entries back already,
                # and applying them again took the refund twice, or raised with the grant
                # below zero after the commit. Read the customer back instead, as the
                # expiry task and the repayments do
                await self._read_back(customer_id)
            log.info("clawed back from %s (%s): %s", customer_id, key, out)
            if self.on_taken is not None:
                self.on_taken(customer_id)
        return out

    async def payment_customer(self, refs: list[str]) -> str | None:
        """The customer whose grant a payment (by any of its ids) paid for, if any."""
        return await self.ledger.payment_customer(refs)

    async def link_payment(self, payment_refs: list[str], invoice_ref: str) -> int:
        """Remember that a payment (intent / charge) paid an invoice; returns new links."""
        return await self.ledger.link_payment(payment_refs, invoice_ref)

    # ---- expiry ---------------------------------------------------------------------------

    async def expire_due(self, now: float | None = None) -> int:
        """Write expiry entries for grants past ``expires_at`` (the book already excludes them
        from the balance at that instant; this makes the ledger say so too)."""
        now = time.time() if now is None else now
        due = self.book.due_expiries(now)
        if not due:
            return 0
        owners = {e.grant_id: self.book.grant(e.grant_id) for e in due}

        rows = []
        for e in due:
            g = owners[e.grant_id]
            assert g is not None
            rows.append(LedgerEntry(g.customer_id, e, at=g.expires_at))
            self._mark(g.customer_id)
        await self.ledger.append(rows)
        if self.reload is None:
            self.book.apply(due)
            return len(due)
        for r in rows:
            self._mark(r.customer_id)
        await self.resync()
        for e in due:
            # read back with credit left: the grant was closed already (an expiry is entered
            # once per grant), and credit given back to it since (a negative ``repay``) is
            # past its expiry all the same; not counted again, nor tried again every pass
            if (g := self.book.grant(e.grant_id)) is not None and g.expires_at is not None \
                    and g.expires_at <= now:
                g.remaining = 0
        return len(due)

    async def _read_back(self, customer_id: str) -> None:
        """Fleet mode, after a write for ``customer_id``: read it back from the shared
        ledger now; if that fails it stays marked and the expiry task, woken, tries again."""
        self._mark(customer_id)
        try:
            await self.resync([customer_id])
        except RETRIED:
            self._wake.set()

    def _mark(self, customer_id: str) -> None:
        """Fleet mode: ``customer_id``'s book is to be read back from the ledger. Marked
        before a write is sent (so a write whose outcome is unknown leaves it marked) and
        again once the write returned (so a read-back that ran while the write was in flight
        and cleared the mark does not stand for it)."""
        if self.reload is not None:
            self._stale.add(customer_id)

    async def resync(self, customers: list[str] | None = None) -> None:
        """Fleet mode: read the marked customers (or those of ``customers`` that are marked)
        back from the shared ledger; a storage error leaves them marked (the expiry task
        tries again)."""
        if self.reload is None:
            return
        todo = sorted(self._stale if customers is None else self._stale.intersection(customers))
        if todo:
            await self.reload(todo)
            self._stale.difference_update(todo)

    async def run_expiry(self, max_sleep: float = 60.0) -> None:
        while True:
            now = time.time()
            retry: float | None = None
            try:
                await self.resync()
                await self.give_back_due(now)
                await self.expire_due(now)
                await self.repay_due(now)
            except RETRIED as exc:
                # Nothing written (a write lock held by another process, a PostgreSQL
                # conflict): the book is told only after a write, so nothing was applied.
                # Outcome unknown (PostgreSQL cut or too slow, ``StorageOutcomeUnknown``):
                # the write may have committed, and sending it again is safe there, since
                # every write of this task is idempotent on PostgreSQL (an expiry: once per
                # grant, capped by what the grant holds; a repayment: capped by what the
                # grant holds and the debt still owed, under the account lock; a give-back:
                # once per key), and the book is then read back from the ledger
                # (``reload``), not applied. Either way try again shortly instead of ending
                # the task for good (docs/credits.md, "Settlement").
                log.warning("credit expiry/repayment not written or not confirmed (retrying"
                            " in %.0f s): %s", EXPIRY_RETRY, exc)
                retry = now + EXPIRY_RETRY
            if self._stale and retry is None:
                retry = now         # a grant's repayment to read back (``grant``)
            nxt = min((t for t in (self.book.next_expiry(now), self.book.next_effective(now),
                                   retry)
                       if t is not None), default=None)
            delay = max_sleep if nxt is None else min(max_sleep, max(0.0, nxt - now))
            self._wake.clear()
            await wait_event(self._wake, delay)

    # ---- views ------------------------------------------------------------------------------

    def summary(self, customer_id: str, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        b = self.book
        return {"balance": fmt_micro(b.balance(customer_id, now)),
                "debt": fmt_micro(b.debt(customer_id)),
                "available": fmt_micro(b.available(customer_id, now)),
                "reserved": fmt_micro(b.held(customer_id)),
                "requests_in_flight": b.inflight(customer_id),
                "grants": [grant_json(g, now) for g in b.grants(customer_id)]}

    async def entries(self, customer_id: str, limit: int = 200) -> list[dict[str, Any]]:
        rows = await self.ledger.entries(customer_id, limit)
        return [{"seq": e.seq, "grant_id": e.grant_id, "kind": e.kind,
                 "credits": fmt_micro(e.amount), "request_id": e.request_id, "meter": e.meter,
                 "at": rfc3339(e.at_ms / 1000)} for e in rows]
