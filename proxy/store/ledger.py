"""The credit ledger on SQLite: the only writer of ``grants``, ``credit_entries``,
``grant_payments``, ``payment_links``, ``clawbacks`` and ``plan_invoices`` (the
``CreditLedger`` owner).

Debits settled by requests reach ``credit_entries`` through the group commit
(``proxy.store.db``), in the same transaction as their usage; every other entry is appended
here. The ledger is append-only; the in-memory book (``proxy.credits.book``) is rebuilt from
``load()`` at start-up.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any

from proxy.credits.ledger import Entry, GrantState, unrepay
from proxy.store.access import Writer
from proxy.store.keys import get_customer
from proxy.store.protocols import ClawbackDecision, EntryRecord, GrantFacts, LedgerEntry, LedgerSnapshot, NewGrant

_GRANT_COLS = "id, customer_id, amount, priority, expires_at, created_at, source, effective_at"


def _grant(r: Any) -> GrantState:
    gid, cid, amount, prio, expires, created, source, effective = r
    return GrantState(gid, cid, amount, prio, expires, created, source, effective_at=effective)


def _record_payments(c: sqlite3.Connection, grant_id: str, refs: Sequence[str],
                     paid: int) -> None:
    c.executemany("INSERT INTO grant_payments(ref, grant_id, paid) VALUES (?,?,?)"
                  " ON CONFLICT(ref, grant_id) DO UPDATE SET paid=max(paid, excluded.paid)",
                  [(r, grant_id, paid) for r in refs if r])


def insert_entries(conn: sqlite3.Connection, customer_id: str, entries: Sequence[Entry],
                   request_id: str | None = None, meter: str | None = None,
                   at: float | None = None) -> None:
    """Append entries inside the caller's transaction (a debt entry has no grant)."""
    at_ms = int((time.time() if at is None else at) * 1000)
    conn.executemany(
        "INSERT INTO credit_entries(customer_id, grant_id, kind, amount, request_id, meter, at_ms)"
        " VALUES (?,NULLIF(?, ''),?,?,?,?,?)",
        [(customer_id, e.grant_id, e.kind, e.amount, request_id, meter, at_ms) for e in entries])


def load(conn: sqlite3.Connection) -> LedgerSnapshot:
    grants = [_grant(r) for r in conn.execute(f"SELECT {_GRANT_COLS} FROM grants")]
    entries = [Entry(g or "", k, a) for g, k, a in conn.execute(
        "SELECT grant_id, kind, amount FROM credit_entries ORDER BY seq")]
    debts = {c: d for c, d in conn.execute(
        "SELECT customer_id, SUM(CASE kind WHEN 'debt' THEN amount ELSE -amount END)"
        " FROM credit_entries WHERE kind IN ('debt', 'repay') GROUP BY customer_id")}
    return LedgerSnapshot(grants, entries, debts)


def _linked_refs(conn: sqlite3.Connection, refs: Sequence[str]) -> list[str]:
    """``refs`` plus the invoices those payments paid (``payment_links``)."""
    marks = ",".join("?" * len(refs))
    linked = [r for (r,) in conn.execute(
        f"SELECT invoice_ref FROM payment_links WHERE payment_ref IN ({marks})", list(refs))]
    return list(dict.fromkeys([*refs, *linked]))


def next_period_grant(conn: sqlite3.Connection, grant_id: str) -> tuple[str, int] | None:
    """(id, carried) of the subscription's plan grant of the next period start whose
    previous period grant (the one ``previous_period_grant`` picks, as ``_close_previous``
    did) is ``grant_id``: a period granted anew after a write-off (``:paid:``) wins."""
    row = conn.execute("SELECT customer_id, idempotency_key, period_start FROM grants"
                       " WHERE id=?", (grant_id,)).fetchone()
    if row is None or row[1] is None or row[2] is None \
            or not str(row[1]).startswith("stripe:plan:"):
        return None
    cid, key, start = row
    prefix = ":".join(str(key).split(":")[:3]) + ":"
    nxt = conn.execute("SELECT id, period_start, carried FROM grants WHERE customer_id=? AND"
                       " substr(idempotency_key, 1, ?)=? AND period_start > ? ORDER BY"
                       " period_start, (idempotency_key LIKE '%:paid:%') DESC,"
                       " created_at DESC LIMIT 1",
                       (cid, len(prefix), prefix, start)).fetchone()
    if nxt is None:
        return None
    prev = conn.execute("SELECT id FROM grants WHERE customer_id=? AND substr(idempotency_key,"
                        " 1, ?)=? AND period_start < ? ORDER BY period_start DESC,"
                        " (idempotency_key LIKE '%:paid:%') DESC, created_at DESC LIMIT 1",
                        (cid, len(prefix), prefix, nxt[1])).fetchone()
    return (str(nxt[0]), int(nxt[2] or 0)) if prev is not None and prev[0] == grant_id else None


class SqliteCreditLedger:
    def __init__(self, db: Writer) -> None:
        self.db = db

    async def load(self) -> LedgerSnapshot:
        return load(self.db.conn)

    async def create_grant(self, new: NewGrant,
                           then: Callable[[GrantState], list[Entry]] | None = None
                           ) -> tuple[GrantState, bool]:
        g = new.grant

        def tx(c: sqlite3.Connection) -> tuple[GrantState, bool]:
            if get_customer(c, g.customer_id) is None:
                raise LookupError(f"no customer {g.customer_id!r}")
            if new.idempotency_key is not None:
                row = c.execute(f"SELECT {_GRANT_COLS} FROM grants WHERE customer_id=? AND"
                                " idempotency_key=?", (g.customer_id, new.idempotency_key)
                                ).fetchone()
                if row is not None:
                    old = _grant(row)
                    _record_payments(c, old.id, new.payment_refs, new.paid_minor)
                    return old, False
            c.execute("INSERT INTO grants(id, customer_id, amount, priority, expires_at, source,"
                      " idempotency_key, created_at, period_start, period_end, effective_at,"
                      " carried) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                      (g.id, g.customer_id, g.amount, g.priority, g.expires_at, g.source,
                       new.idempotency_key, g.created_at,
                       new.period[0] if new.period else None,
                       new.period[1] if new.period else None, g.effective_at,
                       min(max(new.carried, 0), g.amount)))
            _record_payments(c, g.id, new.payment_refs, new.paid_minor)
            extra = then(g) if then is not None else []
            if extra:
                insert_entries(c, g.customer_id, extra)
            return g, True

        out: tuple[GrantState, bool] = await self.db.write(tx)
        return out

    async def append(self, entries: Sequence[LedgerEntry]) -> None:
        def tx(c: sqlite3.Connection) -> None:
            for e in entries:
                insert_entries(c, e.customer_id, [e.entry], request_id=e.request_id,
                               meter=e.meter, at=e.at)

        self.db.execute_write(tx)

    async def undo_repay(self, customer_id: str, key: str, amount: int,
                         at: float) -> list[Entry]:
        def tx(c: sqlite3.Connection) -> list[Entry]:
            done = [Entry(g, k, a) for g, k, a in c.execute(
                "SELECT grant_id, kind, amount FROM credit_entries WHERE customer_id=? AND"
                " request_id=? ORDER BY seq", (customer_id, key))]
            if done:
                return done
            (net,) = c.execute("SELECT COALESCE(SUM(CASE kind WHEN 'debt' THEN amount ELSE"
                               " -amount END), 0) FROM credit_entries WHERE customer_id=?"
                               " AND kind IN ('debt', 'repay')", (customer_id,)).fetchone()
            repaid = [(str(g), int(n)) for g, n in c.execute(
                "SELECT grant_id, SUM(amount) FROM credit_entries WHERE customer_id=? AND"
                " kind='repay' GROUP BY grant_id HAVING SUM(amount) > 0"
                " ORDER BY MAX(seq) DESC", (customer_id,))]
            out = unrepay(repaid, min(amount, max(-int(net), 0)))
            insert_entries(c, customer_id, out, request_id=key, at=at)
            return out

        res: list[Entry] = self.db.execute_write(tx)
        return res

    async def entries(self, customer_id: str, limit: int = 200) -> list[EntryRecord]:
        rows = self.db.conn.execute(
            "SELECT seq, grant_id, kind, amount, request_id, meter, at_ms FROM credit_entries"
            " WHERE customer_id=? ORDER BY seq DESC LIMIT ?", (customer_id, limit)).fetchall()
        return [EntryRecord(*r) for r in rows]

    async def grant_ids(self, customer_id: str, key_prefix: str,
                        exclude_prefix: str | None = None) -> set[str]:
        sql = "SELECT id, idempotency_key FROM grants WHERE customer_id=? AND" \
              " substr(idempotency_key, 1, ?)=?"
        return {str(i) for i, k in self.db.conn.execute(
            sql, (customer_id, len(key_prefix), key_prefix))
            if exclude_prefix is None or not str(k).startswith(exclude_prefix)}

    async def has_grant(self, customer_id: str, idempotency_key: str) -> bool:
        return self.db.conn.execute("SELECT 1 FROM grants WHERE customer_id=? AND"
                                    " idempotency_key=?",
                                    (customer_id, idempotency_key)).fetchone() is not None

    async def previous_period_grant(self, customer_id: str, key_prefix: str,
                                    start: int) -> str | None:
        conn = self.db.conn
        later = conn.execute("SELECT 1 FROM grants WHERE customer_id=? AND substr(idempotency_key,"
                             " 1, ?)=? AND period_start > ?",
                             (customer_id, len(key_prefix), key_prefix, start)).fetchone()
        if later is not None:
            return None
        row = conn.execute("SELECT id FROM grants WHERE customer_id=? AND substr(idempotency_key,"
                           " 1, ?)=? AND period_start < ? ORDER BY period_start DESC,"
                           # a period's allowance granted anew after its invoice was written
                           # off (key ...:paid:<invoice>) is the one it ended with
                           " (idempotency_key LIKE '%:paid:%') DESC, created_at DESC LIMIT 1",
                           (customer_id, len(key_prefix), key_prefix, start)).fetchone()
        return str(row[0]) if row else None

    async def entry_total(self, grant_id: str, kind: str) -> int:
        (n,) = self.db.conn.execute("SELECT COALESCE(SUM(amount), 0) FROM credit_entries WHERE"
                                    " grant_id=? AND kind=?", (grant_id, kind)).fetchone()
        return int(n)

    async def grant_carried(self, grant_id: str) -> int:
        row = self.db.conn.execute("SELECT carried FROM grants WHERE id=?",
                                   (grant_id,)).fetchone()
        return int(row[0]) if row else 0

    async def followed_out(self, grant_id: str) -> int:
        k = f"carry:{grant_id}>"
        (n,) = self.db.conn.execute("SELECT COALESCE(SUM(credits), 0) FROM clawbacks WHERE"
                                    " substr(key, 1, ?)=?", (len(k), k)).fetchone()
        return int(n)

    async def paid_for(self, ref: str) -> int:
        (n,) = self.db.conn.execute("SELECT COALESCE(MAX(paid), 0) FROM grant_payments"
                                    " WHERE ref=?", (ref,)).fetchone()
        return int(n)

    async def plan_grant_for(self, customer_id: str, subscription: str,
                             at: int) -> tuple[str, int, int] | None:
        prefix = f"stripe:plan:{subscription}:"
        row = self.db.conn.execute(
            "SELECT id, period_start, period_end FROM grants WHERE customer_id=?"
            " AND substr(idempotency_key, 1, ?)=? AND period_start <= ? AND period_end > ?"
            " ORDER BY period_start DESC LIMIT 1",
            (customer_id, len(prefix), prefix, at, at)).fetchone()
        return (str(row[0]), int(row[1]), int(row[2])) if row else None

    async def subscription_customer(self, subscription: str) -> str | None:
        conn = self.db.conn
        for prefix in (f"stripe:plan:{subscription}:", f"stripe:planchange:{subscription}:"):
            row = conn.execute("SELECT customer_id FROM grants WHERE"
                               " substr(idempotency_key, 1, ?)=? ORDER BY created_at, id"
                               " LIMIT 1", (len(prefix), prefix)).fetchone()
            if row is not None:
                return str(row[0])
        row = conn.execute("SELECT customer_id FROM plan_invoices WHERE subscription=?"
                           " ORDER BY updated_at, invoice_id LIMIT 1", (subscription,)).fetchone()
        return str(row[0]) if row else None

    async def record_plan_invoice(self, invoice_id: str, grant_id: str, customer_id: str,
                                  subscription: str, state: str, at: int) -> None:
        if state not in ("open", "paid"):
            raise ValueError(f"a plan invoice is recorded open or paid, not {state!r}")
        self.db.execute_write(lambda c: c.execute(
            "INSERT INTO plan_invoices(invoice_id, grant_id, customer_id, subscription, state,"
            " updated_at) VALUES (?,?,?,?,?,?) ON CONFLICT(invoice_id) DO UPDATE SET"
            " state=excluded.state, updated_at=excluded.updated_at"
            " WHERE plan_invoices.state='open'",
            (invoice_id, grant_id, customer_id, subscription, state, at)))

    async def plan_invoice_state(self, invoice_id: str) -> str | None:
        row = self.db.conn.execute("SELECT state FROM plan_invoices WHERE invoice_id=?",
                                   (invoice_id,)).fetchone()
        return str(row[0]) if row else None

    async def open_plan_invoices(self, customer_id: str, subscription: str | None = None
                                 ) -> list[tuple[str, str]]:
        sql = "SELECT invoice_id, grant_id FROM plan_invoices WHERE customer_id=? AND state='open'"
        args: tuple[str, ...] = (customer_id,)
        if subscription is not None:
            sql, args = sql + " AND subscription=?", (*args, subscription)
        return [(str(i), str(g)) for i, g in self.db.conn.execute(
            sql + " ORDER BY invoice_id", args)]

    async def write_off_plan_invoice(self, invoice_id: str, at: int) -> bool:
        n: int = self.db.execute_write(lambda c: c.execute(
            "UPDATE plan_invoices SET state='unpaid', updated_at=? WHERE invoice_id=?"
            " AND state='open'", (at, invoice_id)).rowcount)
        return n == 1

    async def payment_customer(self, refs: Sequence[str]) -> str | None:
        refs = [r for r in refs if r]
        if not refs:
            return None
        conn = self.db.conn
        refs = _linked_refs(conn, refs)
        row = conn.execute(
            f"SELECT g.customer_id FROM grant_payments p JOIN grants g ON g.id = p.grant_id"
            f" WHERE p.ref IN ({','.join('?' * len(refs))}) LIMIT 1", refs).fetchone()
        return str(row[0]) if row else None

    async def link_payment(self, payment_refs: Sequence[str], invoice_ref: str) -> int:
        refs = [r for r in payment_refs if r]
        if not refs:
            return 0
        n: int = self.db.execute_write(lambda c: c.executemany(
            "INSERT OR IGNORE INTO payment_links(payment_ref, invoice_ref) VALUES (?,?)",
            [(r, invoice_ref) for r in refs]).rowcount)
        return n

    async def claw_back(self, customer_id: str, refs: Sequence[str], key: str, event_id: str,
                        returned_minor: int,
                        decide: Callable[[GrantFacts], ClawbackDecision | None],
                        ) -> list[tuple[str, int, list[Entry]]]:
        refs = [r for r in refs if r]
        if not refs:
            return []
        now = time.time()

        def tx(c: sqlite3.Connection) -> list[tuple[str, int, list[Entry]]]:
            refs_ = _linked_refs(c, refs)
            marks = ",".join("?" * len(refs_))
            rows = c.execute(f"SELECT grant_id, MAX(paid) FROM grant_payments WHERE ref IN"
                             f" ({marks}) GROUP BY grant_id ORDER BY grant_id", refs_).fetchall()
            out: list[tuple[str, int, list[Entry]]] = []

            def one(gid: str, paid: int | None, k: str,
                    follow_of: tuple[int, int] | None) -> None:
                """Decide on grant ``gid`` under row key ``k`` (``follow_of``: a follow of
                that many more carried credits into it, and that many more spent credits
                owed into it), then follow what the decision carries and owes on into the
                next period's grant (period starts only grow: it ends)."""
                prev = c.execute("SELECT credits FROM clawbacks WHERE key=?", (k,)).fetchone()
                sums = dict(c.execute(
                    "SELECT kind, SUM(amount) FROM credit_entries WHERE grant_id=?"
                    " GROUP BY kind", (gid,)).fetchall())
                (clawed,) = c.execute("SELECT COALESCE(SUM(credits), 0) FROM clawbacks"
                                      " WHERE grant_id=?", (gid,)).fetchone()
                (owed,) = c.execute("SELECT COALESCE(SUM(amount), 0) FROM credit_entries"
                                    " WHERE kind='debt' AND request_id=?",
                                    (f"clawback:{gid}",)).fetchone()
                nxt = next_period_grant(c, gid)
                successor, carried_out = nxt if nxt is not None else (None, 0)
                followed = owed_on = 0
                if successor is not None:
                    # into this successor only: a follow into a grant written off since
                    # (and granted anew, ``:paid:``) was subtracted from the new grant's
                    # carry (``WebhookReceiver._grant_plan``)
                    fk = f"carry:{gid}>{successor}:"
                    (followed,) = c.execute("SELECT COALESCE(SUM(credits), 0) FROM clawbacks"
                                            " WHERE substr(key, 1, ?)=?",
                                            (len(fk), fk)).fetchone()
                    (owed_on,) = c.execute("SELECT COALESCE(SUM(credits), 0) FROM clawbacks"
                                           " WHERE substr(key, 1, ?)=?",
                                           (len(f"owe:{gid}>"), f"owe:{gid}>")).fetchone()
                previous = prev[0] if prev else 0
                ok = "owe:" + k.removeprefix("carry:")
                owe_prev = 0
                if follow_of is not None:
                    row = c.execute("SELECT credits FROM clawbacks WHERE key=?", (ok,)).fetchone()
                    owe_prev = int(row[0]) if row else 0
                (carried_in,) = c.execute("SELECT carried FROM grants WHERE id=?",
                                          (gid,)).fetchone()
                (owed_into,) = c.execute("SELECT COALESCE(SUM(credits), 0) FROM clawbacks"
                                         " WHERE grant_id=? AND substr(key, 1, 4)='owe:'",
                                         (gid,)).fetchone()
                d = decide(GrantFacts(gid, paid, previous, sums, clawed, owed,
                                      int(carried_out), int(followed),
                                      None if follow_of is None else previous + follow_of[0],
                                      carried_in=int(carried_in or 0), successor=successor,
                                      owed_on=int(owed_on), owed_into=int(owed_into),
                                      owe_target=None if follow_of is None
                                      else owe_prev + follow_of[1], owe_previous=owe_prev))
                if d is None:
                    return
                for e in d.entries:
                    rid = f"clawback:{gid}" if e.kind == "debt" else k
                    insert_entries(c, customer_id, [e], request_id=rid, at=now)
                rows_ = [(k, d.credits)] if follow_of is None or follow_of[0] > 0 else []
                if follow_of is not None and follow_of[1] > 0:
                    rows_.append((ok, owe_prev + follow_of[1]))
                c.executemany("INSERT INTO clawbacks(key, customer_id, grant_id, minor, credits,"
                              " event_id, created_at) VALUES (?,?,?,?,?,?,?)"
                              " ON CONFLICT(key) DO UPDATE SET minor=excluded.minor,"
                              " credits=excluded.credits, event_id=excluded.event_id",
                              [(rk, customer_id, gid, returned_minor, credits, event_id, int(now))
                               for rk, credits in rows_])
                taken = d.credits - previous + (follow_of[1] if follow_of is not None else 0)
                out.append((gid, taken, d.entries))
                follow = d.follow if carried_out > 0 else 0
                if successor is not None and (follow > 0 or d.owe > 0):
                    one(successor, None, f"carry:{gid}>{successor}:{key}", (follow, d.owe))

            for gid, paid in rows:
                one(gid, paid, f"{key}:{gid}", None)
            return out

        res: list[tuple[str, int, list[Entry]]] = self.db.execute_write(tx)
        return res
