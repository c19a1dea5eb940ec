"""CreditService: grants, voids and expiries, persisted through the one writer, then
applied to the in-memory book. Also the credit detail the admin API shows.

Order of every change: write the ledger (one transaction on the Store's connection), then
update the book. A crash between the two is harmless: the book is rebuilt from the ledger
at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sqlite3
import time
from typing import Any

from proxy.credits.book import CreditBook
from proxy.credits.ledger import Entry, GrantState, clawback, clawback_credits, repay
from proxy.store.db import Store
from proxy.store.keys import InvalidInput, get_customer
from proxy.timeutil import rfc3339
from proxy.units import UnitError, fmt_micro, to_micro

log = logging.getLogger("meterproxy.credits")

_GRANT_COLS = "id, customer_id, amount, priority, expires_at, created_at, source, effective_at"


def _grant_row(r: Any) -> GrantState:
    gid, cid, amount, prio, expires, created, source, effective = r
    return GrantState(gid, cid, amount, prio, expires, created, source, effective_at=effective)


def load_book(conn: sqlite3.Connection) -> CreditBook:
    grants = [_grant_row(r) for r in conn.execute(f"SELECT {_GRANT_COLS} FROM grants")]
    entries = [Entry(g or "", k, a) for g, k, a in conn.execute(
        "SELECT grant_id, kind, amount FROM credit_entries ORDER BY seq")]
    debts = {c: d for c, d in conn.execute(
        "SELECT customer_id, SUM(CASE kind WHEN 'debt' THEN amount ELSE -amount END)"
        " FROM credit_entries WHERE kind IN ('debt', 'repay') GROUP BY customer_id")}
    book = CreditBook()
    book.load(grants, entries, debts)
    return book


def insert_entries(conn: sqlite3.Connection, customer_id: str, entries: list[Entry],
                   request_id: str | None = None, meter: str | None = None,
                   at: float | None = None) -> None:
    at_ms = int((time.time() if at is None else at) * 1000)
    conn.executemany(
        "INSERT INTO credit_entries(customer_id, grant_id, kind, amount, request_id, meter, at_ms)"
        " VALUES (?,NULLIF(?, ''),?,?,?,?,?)",
        [(customer_id, e.grant_id, e.kind, e.amount, request_id, meter, at_ms) for e in entries])


def _record_payment(c: sqlite3.Connection, grant_id: str,
                    payment: tuple[tuple[str, ...], int] | None) -> None:
    if payment is not None:
        refs, paid = payment
        c.executemany("INSERT INTO grant_payments(ref, grant_id, paid) VALUES (?,?,?)"
                      " ON CONFLICT(ref, grant_id) DO UPDATE SET paid=max(paid, excluded.paid)",
                      [(r, grant_id, paid) for r in refs if r])


def linked_refs(conn: sqlite3.Connection, refs: list[str]) -> list[str]:
    """``refs`` plus the invoices those payments paid (``payment_links``)."""
    marks = ",".join("?" * len(refs))
    linked = [r for (r,) in conn.execute(
        f"SELECT invoice_ref FROM payment_links WHERE payment_ref IN ({marks})", refs)]
    return list(dict.fromkeys([*refs, *linked]))


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
    def __init__(self, store: Store, book: CreditBook) -> None:
        self.store = store
        self.book = book
        self._wake = asyncio.Event()

    # ---- grants --------------------------------------------------------------------------

    def grant(self, customer_id: str, credits: object, *, expires_at: int | None = None,
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
        if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 100:
            raise InvalidInput("priority must be an integer from 0 (burns first) to 100")
        prio: int = priority
        if effective_at is not None and expires_at is not None and effective_at >= expires_at:
            raise InvalidInput("effective_at must be before expires_at")

        def tx(c: sqlite3.Connection) -> tuple[GrantState, bool]:
            if get_customer(c, customer_id) is None:
                raise LookupError(f"no customer {customer_id!r}")
            if idempotency_key is not None:
                row = c.execute(f"SELECT {_GRANT_COLS} FROM grants WHERE customer_id=? AND"
                                " idempotency_key=?", (customer_id, idempotency_key)).fetchone()
                if row is not None:
                    old = _grant_row(row)
                    _record_payment(c, old.id, payment)
                    return old, False
            g = GrantState("grt_" + secrets.token_hex(8), customer_id, amount, prio,
                           expires_at, int(time.time()), source, effective_at=effective_at)
            c.execute("INSERT INTO grants(id, customer_id, amount, priority, expires_at, source,"
                      " idempotency_key, created_at, period_start, period_end, effective_at,"
                      " carried) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                      (g.id, customer_id, amount, prio, expires_at, source, idempotency_key,
                       g.created_at, period[0] if period else None, period[1] if period else None,
                       effective_at, min(max(carried, 0), amount)))
            _record_payment(c, g.id, payment)
            repaid = self.book.repayment(g, time.time())
            if repaid:
                insert_entries(c, customer_id, repaid)
            return g, True

        g, created = self.store.execute_write(tx)
        if created:
            self.book.add_grant(g)
            repaid = self.book.repayment(g, time.time())
            if repaid:
                self.book.apply(repaid, customer_id)
            self._wake.set()
            log.info("granted %s credits to %s (%s, %s)", fmt_micro(amount), customer_id, g.id,
                     source)
            return g, True
        return self.book.grant(g.id) or g, False

    def repay_due(self, now: float | None = None) -> int:
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
                def tx(c: sqlite3.Connection, cid: str = cid,
                       entries: list[Entry] = entries) -> None:
                    insert_entries(c, cid, entries, at=now)

                self.store.execute_write(tx)
                self.book.apply(entries, cid)
                n += len(entries)
        return n

    def void(self, grant_id: str) -> GrantState:
        g = self.book.grant(grant_id)
        if g is None:
            raise LookupError(f"no grant {grant_id!r}")
        if g.voided:
            return g
        entry = Entry(g.id, "void", g.remaining)
        self.store.execute_write(lambda c: insert_entries(c, g.customer_id, [entry]))
        self.book.apply([entry])
        return g

    # ---- claw-backs (refunds, disputes, credit notes) --------------------------------------

    def claw_back(self, customer_id: str, refs: list[str], returned_minor: int, key: str,
                  event_id: str, fallback_paid: int = 0) -> list[dict[str, Any]]:
        """Take back the share of every grant paid by the payment named by ``refs`` (invoice,
        charge, payment intent or checkout session ids) that ``returned_minor`` of it is.
        ``key`` names the return: the same key is applied once, and a later event with the
        same key and a larger (cumulative) amount takes only the difference (Stripe's
        ``amount_refunded`` is cumulative). Unused credit goes first (``refund`` entry),
        expired credit absorbs its share, spent credit becomes debt (docs/credits.md)."""
        refs = [r for r in refs if r]
        if not refs:
            return []
        now = time.time()

        def tx(c: sqlite3.Connection) -> tuple[list[dict[str, Any]], list[Entry]]:
            refs_ = linked_refs(c, refs)
            marks = ",".join("?" * len(refs_))
            rows = c.execute(f"SELECT grant_id, MAX(paid) FROM grant_payments WHERE ref IN"
                             f" ({marks}) GROUP BY grant_id ORDER BY grant_id", refs_).fetchall()
            out: list[dict[str, Any]] = []
            applied: list[Entry] = []
            for gid, paid in rows:
                g = self.book.grant(gid)
                if g is None or g.customer_id != customer_id:
                    continue
                target = clawback_credits(g.amount, paid or fallback_paid, returned_minor)
                k = f"{key}:{gid}"
                prev = c.execute("SELECT credits FROM clawbacks WHERE key=?", (k,)).fetchone()
                delta = target - (prev[0] if prev else 0)
                if delta <= 0:
                    continue
                sums = dict(c.execute(
                    "SELECT kind, SUM(amount) FROM credit_entries WHERE grant_id=?"
                    " GROUP BY kind", (gid,)).fetchall())
                (clawed,) = c.execute("SELECT COALESCE(SUM(credits), 0) FROM clawbacks"
                                      " WHERE grant_id=?", (gid,)).fetchone()
                (owed,) = c.execute("SELECT COALESCE(SUM(amount), 0) FROM credit_entries"
                                    " WHERE kind='debt' AND request_id=?",
                                    (f"clawback:{gid}",)).fetchone()
                refunded = sums.get("refund", 0)
                # from the book: debits still in the group-commit buffer count as spent
                spent = g.amount - g.remaining - refunded - sums.get("expire", 0) \
                    - sums.get("void", 0)
                # expired credit an earlier claw-back already counted = clawed - refunded - owed
                expired_left = sums.get("expire", 0) - (clawed - refunded - owed)
                entries = clawback(g, delta, expired_left, spent - owed)
                for e in entries:
                    rid = f"clawback:{gid}" if e.kind == "debt" else k
                    insert_entries(c, customer_id, [e], request_id=rid, at=now)
                c.execute("INSERT INTO clawbacks(key, customer_id, grant_id, minor, credits,"
                          " event_id, created_at) VALUES (?,?,?,?,?,?,?)"
                          " ON CONFLICT(key) DO UPDATE SET minor=excluded.minor,"
                          " credits=excluded.credits, event_id=excluded.event_id",
                          (k, customer_id, gid, returned_minor, target, event_id, int(now)))
                out.append({"grant_id": gid, "credits": fmt_micro(delta),
                            "unused_taken": fmt_micro(sum(e.amount for e in entries
                                                          if e.kind == "refund")),
                            "debt": fmt_micro(sum(e.amount for e in entries
                                                  if e.kind == "debt"))})
                applied.extend(entries)
            return out, applied

        res: tuple[list[dict[str, Any]], list[Entry]] = self.store.execute_write(tx)
        out, applied = res
        if applied:
            self.book.apply(applied, customer_id)
            log.info("clawed back from %s (%s): %s", customer_id, key, out)
        return out

    def payment_customer(self, refs: list[str]) -> str | None:
        """The customer whose grant a payment (by any of its ids) paid for, if any."""
        refs = [r for r in refs if r]
        if not refs:
            return None
        refs = linked_refs(self.store.conn, refs)
        row = self.store.conn.execute(
            f"SELECT g.customer_id FROM grant_payments p JOIN grants g ON g.id = p.grant_id"
            f" WHERE p.ref IN ({','.join('?' * len(refs))}) LIMIT 1", refs).fetchone()
        return str(row[0]) if row else None

    def link_payment(self, payment_refs: list[str], invoice_ref: str) -> int:
        """Remember that a payment (intent / charge) paid an invoice; returns new links."""
        refs = [r for r in payment_refs if r]
        if not refs:
            return 0
        n: int = self.store.execute_write(lambda c: c.executemany(
            "INSERT OR IGNORE INTO payment_links(payment_ref, invoice_ref) VALUES (?,?)",
            [(r, invoice_ref) for r in refs]).rowcount)
        return n

    # ---- expiry ---------------------------------------------------------------------------

    def expire_due(self, now: float | None = None) -> int:
        """Write expiry entries for grants past ``expires_at`` (the book already excludes them
        from the balance at that instant; this makes the ledger say so too)."""
        now = time.time() if now is None else now
        due = self.book.due_expiries(now)
        if not due:
            return 0
        owners = {e.grant_id: self.book.grant(e.grant_id) for e in due}

        def tx(c: sqlite3.Connection) -> None:
            for e in due:
                g = owners[e.grant_id]
                assert g is not None
                insert_entries(c, g.customer_id, [e], at=g.expires_at)

        self.store.execute_write(tx)
        self.book.apply(due)
        return len(due)

    async def run_expiry(self, max_sleep: float = 60.0) -> None:
        while True:
            now = time.time()
            self.expire_due(now)
            self.repay_due(now)
            nxt = min((t for t in (self.book.next_expiry(now), self.book.next_effective(now))
                       if t is not None), default=None)
            delay = max_sleep if nxt is None else min(max_sleep, max(0.0, nxt - now))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

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

    def entries(self, customer_id: str, limit: int = 200) -> list[dict[str, Any]]:
        rows = self.store.conn.execute(
            "SELECT seq, grant_id, kind, amount, request_id, meter, at_ms FROM credit_entries"
            " WHERE customer_id=? ORDER BY seq DESC LIMIT ?", (customer_id, limit)).fetchall()
        return [{"seq": s, "grant_id": g, "kind": k, "credits": fmt_micro(a), "request_id": r,
                 "meter": m, "at": rfc3339(t / 1000)} for s, g, k, a, r, m, t in rows]
