"""The ``CreditLedger`` owner on PostgreSQL: ``grants``, ``credit_entries``,
``grant_payments``, ``payment_links``, ``clawbacks``, ``plan_invoices``, and the ``balance`` column of the
fleet's ``credit_accounts``.

Fleet credit leases escrow from ``credit_accounts.balance`` ("credits granted, less expired
and voided"); this owner keeps that balance in step with the ledger in the same transaction
as the entries: a new grant adds its amount, an ``expire``, ``void`` or ``refund`` entry
takes its amount out, and so does a claw-back's ``debt`` (spent credit taken back). (Spending
moves ``settled``/``escrowed``, owned by ``proxy.store.postgres.leases``; which grant it came
from is ``proxy.store.postgres.grant_debits``.) Every writer locks the customer's account row
before its grants, and a grant's ``expire``/``void`` amount is read from the shared ledger
under that lock (``grants.used``: every member's shipped spending).

Concurrency between members: a grant's idempotency key is UNIQUE per customer, and the
insert is ``ON CONFLICT DO NOTHING``: of two members creating the same grant, one creates
it and the other returns it (``created`` False) having written nothing. A claw-back takes a
transaction-scoped advisory lock on its key, so a repeat (on any member) decides on what
the first wrote. A repeated grant (key used) records its payment refs in the same
transaction, ``paid`` raised to the larger amount by ``ON CONFLICT DO UPDATE``. A plan
invoice's state moves with one conditional statement (``open`` -> ``paid``/``unpaid``, final
otherwise), so two members recording it decide on one row.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from proxy.credits.ledger import Entry, GrantState, unrepay
from proxy.store.postgres.conn import Conn
from proxy.store.postgres.pool import PgPool, retried
from proxy.store.protocols import (
    ClawbackDecision,
    EntryRecord,
    GrantFacts,
    LedgerEntry,
    LedgerSnapshot,
    NewGrant,
)

_GRANT_COLS = "id, customer_id, amount, priority, expires_at, created_at, source, effective_at"
_BALANCE_OUT = ("expire", "void", "refund")


_CLOSING = frozenset({"expire", "void"})   # at most once per grant (migration 5)


def balance_change(entries: Sequence[Entry]) -> int:
    """Pure: what appending ``entries`` does to the account balance (micro-credits): an
    expiry, a void or a claw-back's ``refund`` takes credit out of the balance leases are
    escrowed from (spending moves ``settled`` instead)."""
    return -sum(e.amount for e in entries if e.kind in _BALANCE_OUT)


async def _add_balance(c: Conn, customer_id: str, amount: int) -> None:
    if amount:
        await c.execute(
            "INSERT INTO credit_accounts(customer_id, balance, rev) VALUES ($1, $2,"
            " nextval('credit_rev')) ON CONFLICT (customer_id) DO UPDATE SET"
            " balance = credit_accounts.balance + EXCLUDED.balance, rev = EXCLUDED.rev",
            customer_id, amount)


async def lock_account(c: Conn, customer_id: str) -> None:
    """Take the customer's account row lock (first, the order every credit writer keeps:
    account, then grants), so no shipping batch changes its grants meanwhile."""
    await c.execute("SELECT 1 FROM credit_accounts WHERE customer_id = $1 FOR UPDATE",
                    customer_id)


_CLOSE = """
INSERT INTO credit_entries(customer_id, grant_id, kind, amount, request_id, meter, at_ms)
SELECT $1, g.id, $3, LEAST($7::bigint, g.amount - g.used), $4, $5, $6 FROM grants g
WHERE g.id = $2 AND g.customer_id = $1 AND (g.amount > g.used OR $3 = 'void')
ON CONFLICT (grant_id, kind) WHERE kind IN ('expire', 'void') DO NOTHING
RETURNING amount
"""


# a repayment takes at most what the grant still holds and what the customer still owes, as
# the shared ledger has them under the account lock (credit_accounts.debt: debt less repay,
# every member's, kept by the migration-6 trigger statement by statement)
_REPAY = """
INSERT INTO credit_entries(customer_id, grant_id, kind, amount, request_id, meter, at_ms)
SELECT $1, g.id, 'repay', LEAST($3::bigint, g.amount - g.used, a.debt), $4, $5, $6
FROM grants g JOIN credit_accounts a ON a.customer_id = g.customer_id
WHERE g.id = $2 AND g.customer_id = $1 AND LEAST($3::bigint, g.amount - g.used, a.debt) > 0
RETURNING amount
"""


async def insert_entries(c: Conn, customer_id: str, entries: Sequence[Entry],
                         request_id: str | None = None, meter: str | None = None,
                         at: float | None = None) -> list[Entry]:
    """Append entries inside the caller's transaction (a debt entry has no grant), under the
    customer's account lock; returns what was appended. A grant's ``expire`` or ``void``
    entry is appended at most once for the fleet, and its amount is never more than what the
    shared ledger says the grant still holds (``grants.used``: every member's shipped
    spending), whatever the caller computed from its own view (a member's book does not see
    the other members' spending until it reloads): a repeat, or an expiry with nothing
    left, appends nothing. A repayment (a positive ``repay``) is likewise capped by what the
    grant still holds and by the debt the shared ledger still shows: a member whose book
    has not seen another member's repayment of the same debt, or a write sent again after
    its outcome was unknown, repays nothing twice, so the ledger's debt never goes below 0
    (docs/fleet.md, "Repayments"). The balance moves by what was appended."""
    if not entries:
        return []
    await lock_account(c, customer_id)
    at_ms = int((time.time() if at is None else at) * 1000)
    appended: list[Entry] = []
    plain = [e for e in entries if e.kind not in _CLOSING and not _repays(e)]
    if plain:
        await c.executemany(
            "INSERT INTO credit_entries(customer_id, grant_id, kind, amount, request_id, meter,"
            " at_ms) VALUES ($1, NULLIF($2, ''), $3, $4, $5, $6, $7)",
            [(customer_id, e.grant_id, e.kind, e.amount, request_id, meter, at_ms)
             for e in plain])
        appended += plain
    for e in entries:
        if _repays(e):
            amount = await c.fetchval(_REPAY, customer_id, e.grant_id, e.amount, request_id,
                                      meter, at_ms)
            if amount is not None:
                appended.append(Entry(e.grant_id, e.kind, int(amount)))
    for e in entries:
        if e.kind in _CLOSING:
            amount = await c.fetchval(_CLOSE, customer_id, e.grant_id, e.kind, request_id,
                                      meter, at_ms, max(e.amount, 0))
            if amount is not None:
                appended.append(Entry(e.grant_id, e.kind, int(amount)))
    await _add_balance(c, customer_id, balance_change(appended))
    return appended


def _repays(e: Entry) -> bool:
    return e.kind == "repay" and e.amount > 0


async def _linked_refs(c: Conn, refs: Sequence[str]) -> list[str]:
    linked = [r[0] for r in await c.fetch(
        "SELECT invoice_ref FROM payment_links WHERE payment_ref = ANY($1::text[])", list(refs))]
    return list(dict.fromkeys([*refs, *linked]))


def _grant(r: Sequence[Any]) -> GrantState:
    gid, cid, amount, prio, expires, created, source, effective = r
    return GrantState(gid, cid, amount, prio, expires, created, source,
                      effective_at=None if effective is None else int(effective))


async def _record_payments(c: Conn, grant_id: str, refs: Sequence[str], paid: int) -> None:
    refs = [r for r in refs if r]
    if refs:
        await c.executemany(
            "INSERT INTO grant_payments(ref, grant_id, paid) VALUES ($1,$2,$3)"
            " ON CONFLICT (ref, grant_id) DO UPDATE"
            " SET paid = GREATEST(grant_payments.paid, EXCLUDED.paid)",
            [(r, grant_id, paid) for r in refs])


async def _next_period_grant(c: Conn, grant_id: str) -> tuple[str, int] | None:
    """(id, carried) of the next period's plan grant of ``grant_id``'s subscription (SQLite's
    ``proxy.store.ledger.next_period_grant``)."""
    row = await c.fetchrow("SELECT customer_id, idempotency_key, period_start FROM grants"
                           " WHERE id=$1", grant_id)
    if row is None or row[1] is None or row[2] is None \
            or not str(row[1]).startswith("stripe:plan:"):
        return None
    cid, key, start = row[0], str(row[1]), int(row[2])
    prefix = ":".join(key.split(":")[:3]) + ":"
    nxt = await c.fetchrow(
        "SELECT id, period_start, carried FROM grants WHERE customer_id=$1 AND"
        " starts_with(idempotency_key, $2) AND period_start > $3 ORDER BY period_start,"
        " (idempotency_key LIKE '%:paid:%') DESC, created_at DESC LIMIT 1", cid, prefix, start)
    if nxt is None:
        return None
    prev = await c.fetchval(
        "SELECT id FROM grants WHERE customer_id=$1 AND starts_with(idempotency_key, $2)"
        " AND period_start < $3 ORDER BY period_start DESC,"
        " (idempotency_key LIKE '%:paid:%') DESC, created_at DESC LIMIT 1", cid, prefix, nxt[1])
    return (str(nxt[0]), int(nxt[2] or 0)) if prev == grant_id else None


class PostgresCreditLedger:
    def __init__(self, pool: PgPool) -> None:
        self.pool = pool

    async def load(self) -> LedgerSnapshot:
        async with self.pool.acquire() as c, c.transaction(isolation="repeatable_read",
                                                          readonly=True):
            grants = [_grant(tuple(r)) for r in await c.fetch(
                f"SELECT {_GRANT_COLS} FROM grants ORDER BY created_at, id")]
            entries = [Entry(r[0] or "", r[1], int(r[2])) for r in await c.fetch(
                "SELECT grant_id, kind, amount FROM credit_entries ORDER BY seq")]
            debts = {r[0]: int(r[1]) for r in await c.fetch(
                "SELECT customer_id, SUM(CASE kind WHEN 'debt' THEN amount ELSE -amount END)"
                " FROM credit_entries WHERE kind IN ('debt', 'repay') GROUP BY customer_id")}
        return LedgerSnapshot(grants, entries, debts)

    @retried
    async def create_grant(self, new: NewGrant,
                           then: Callable[[GrantState], list[Entry]] | None = None
                           ) -> tuple[GrantState, bool]:
        g = new.grant
        async with self.pool.acquire() as c, c.transaction():
            if await c.fetchval("SELECT 1 FROM customers WHERE id=$1 FOR KEY SHARE",
                                g.customer_id) is None:
                raise LookupError(f"no customer {g.customer_id!r}")
            inserted = await c.fetchval(
                "INSERT INTO grants(id, customer_id, amount, priority, expires_at, source,"
                " idempotency_key, created_at, period_start, period_end, effective_at,"
                " carried) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12)"
                " ON CONFLICT (customer_id, idempotency_key) DO NOTHING RETURNING id",
                g.id, g.customer_id, g.amount, g.priority, g.expires_at, g.source,
                new.idempotency_key, g.created_at,
                new.period[0] if new.period else None, new.period[1] if new.period else None,
                g.effective_at, min(max(new.carried, 0), g.amount))
            if inserted is None:        # the key is used (possibly by another member just now)
                row = await c.fetchrow(f"SELECT {_GRANT_COLS} FROM grants WHERE customer_id=$1"
                                       " AND idempotency_key=$2", g.customer_id,
                                       new.idempotency_key)
                assert row is not None
                old = _grant(tuple(row))
                await _record_payments(c, old.id, new.payment_refs, new.paid_minor)
                return old, False
            await _record_payments(c, g.id, new.payment_refs, new.paid_minor)
            await _add_balance(c, g.customer_id, g.amount)
            extra = then(g) if then is not None else []
            await insert_entries(c, g.customer_id, extra)
            return g, True

    @retried
    async def append(self, entries: Sequence[LedgerEntry]) -> None:
        async with self.pool.acquire() as c, c.transaction():
            for e in entries:
                await insert_entries(c, e.customer_id, [e.entry], request_id=e.request_id,
                                     meter=e.meter, at=e.at)

    @retried
    async def undo_repay(self, customer_id: str, key: str, amount: int,
                         at: float) -> list[Entry]:
        async with self.pool.acquire() as c, c.transaction():
            await lock_account(c, customer_id)
            done = [Entry(r[0] or "", r[1], int(r[2])) for r in await c.fetch(
                "SELECT grant_id, kind, amount FROM credit_entries WHERE customer_id=$1 AND"
                " request_id=$2 ORDER BY seq", customer_id, key)]
            if done:
                return done
            net = int(await c.fetchval(
                "SELECT COALESCE(SUM(CASE kind WHEN 'debt' THEN amount ELSE -amount END), 0)"
                " FROM credit_entries WHERE customer_id=$1 AND kind IN ('debt', 'repay')",
                customer_id))
            repaid = [(str(r[0]), int(r[1])) for r in await c.fetch(
                "SELECT grant_id, SUM(amount) FROM credit_entries WHERE customer_id=$1 AND"
                " kind='repay' GROUP BY grant_id HAVING SUM(amount) > 0"
                " ORDER BY MAX(seq) DESC", customer_id)]
            return await insert_entries(c, customer_id,
                                        unrepay(repaid, min(amount, max(-net, 0))),
                                        request_id=key, at=at)

    async def entries(self, customer_id: str, limit: int = 200) -> list[EntryRecord]:
        async with self.pool.acquire() as c:
            rows = await c.fetch(
                "SELECT seq, grant_id, kind, amount, request_id, meter, at_ms FROM"
                " credit_entries WHERE customer_id=$1 ORDER BY seq DESC LIMIT $2",
                customer_id, limit)
        return [EntryRecord(*r) for r in rows]

    async def grant_ids(self, customer_id: str, key_prefix: str,
                        exclude_prefix: str | None = None) -> set[str]:
        async with self.pool.acquire() as c:
            rows = await c.fetch("SELECT id, idempotency_key FROM grants WHERE customer_id=$1"
                                 " AND starts_with(idempotency_key, $2)", customer_id, key_prefix)
        return {str(r[0]) for r in rows
                if exclude_prefix is None or not str(r[1]).startswith(exclude_prefix)}

    async def has_grant(self, customer_id: str, idempotency_key: str) -> bool:
        async with self.pool.acquire() as c:
            return await c.fetchval("SELECT 1 FROM grants WHERE customer_id=$1 AND"
                                    " idempotency_key=$2", customer_id,
                                    idempotency_key) is not None

    async def previous_period_grant(self, customer_id: str, key_prefix: str,
                                    start: int) -> str | None:
        async with self.pool.acquire() as c:
            later = await c.fetchval(
                "SELECT 1 FROM grants WHERE customer_id=$1 AND starts_with(idempotency_key, $2)"
                " AND period_start > $3 LIMIT 1", customer_id, key_prefix, start)
            if later is not None:
                return None
            gid = await c.fetchval(
                "SELECT id FROM grants WHERE customer_id=$1 AND starts_with(idempotency_key, $2)"
                " AND period_start < $3 ORDER BY period_start DESC,"
                # a period's allowance granted anew after its invoice was written off (key
                # ...:paid:<invoice>) is the one it ended with
                " (idempotency_key LIKE '%:paid:%') DESC, created_at DESC LIMIT 1",
                customer_id, key_prefix, start)
        return None if gid is None else str(gid)

    async def entry_total(self, grant_id: str, kind: str) -> int:
        async with self.pool.acquire() as c:
            return int(await c.fetchval("SELECT COALESCE(SUM(amount), 0) FROM credit_entries"
                                        " WHERE grant_id=$1 AND kind=$2", grant_id, kind))

    async def grant_carried(self, grant_id: str) -> int:
        async with self.pool.acquire() as c:
            n = await c.fetchval("SELECT carried FROM grants WHERE id=$1", grant_id)
        return 0 if n is None else int(n)

    async def followed_out(self, grant_id: str) -> int:
        k = f"carry:{grant_id}>"
        async with self.pool.acquire() as c:
            return int(await c.fetchval("SELECT COALESCE(SUM(credits), 0) FROM clawbacks"
                                        " WHERE substr(key, 1, $1)=$2", len(k), k))

    async def paid_for(self, ref: str) -> int:
        async with self.pool.acquire() as c:
            return int(await c.fetchval("SELECT COALESCE(MAX(paid), 0) FROM grant_payments"
                                        " WHERE ref=$1", ref))

    async def plan_grant_for(self, customer_id: str, subscription: str,
                             at: int) -> tuple[str, int, int] | None:
        async with self.pool.acquire() as c:
            row = await c.fetchrow(
                "SELECT id, period_start, period_end FROM grants WHERE customer_id=$1"
                " AND starts_with(idempotency_key, $2) AND period_start <= $3"
                " AND period_end > $3 ORDER BY period_start DESC LIMIT 1",
                customer_id, f"stripe:plan:{subscription}:", int(at))
        return None if row is None else (str(row[0]), int(row[1]), int(row[2]))

    async def subscription_customer(self, subscription: str) -> str | None:
        async with self.pool.acquire() as c:
            for prefix in (f"stripe:plan:{subscription}:",
                           f"stripe:planchange:{subscription}:"):
                cid = await c.fetchval(
                    "SELECT customer_id FROM grants WHERE starts_with(idempotency_key, $1)"
                    " ORDER BY created_at, id LIMIT 1", prefix)
                if cid is not None:
                    return str(cid)
            cid = await c.fetchval("SELECT customer_id FROM plan_invoices WHERE"
                                   " subscription=$1 ORDER BY updated_at, invoice_id LIMIT 1",
                                   subscription)
        return None if cid is None else str(cid)

    @retried
    async def record_plan_invoice(self, invoice_id: str, grant_id: str, customer_id: str,
                                  subscription: str, state: str, at: int) -> None:
        if state not in ("open", "paid"):
            raise ValueError(f"a plan invoice is recorded open or paid, not {state!r}")
        async with self.pool.acquire() as c:
            await c.execute(
                "INSERT INTO plan_invoices(invoice_id, grant_id, customer_id, subscription,"
                " state, updated_at) VALUES ($1,$2,$3,$4,$5,$6) ON CONFLICT (invoice_id)"
                " DO UPDATE SET state=EXCLUDED.state, updated_at=EXCLUDED.updated_at"
                " WHERE plan_invoices.state='open'",
                invoice_id, grant_id, customer_id, subscription, state, int(at))

    async def plan_invoice_state(self, invoice_id: str) -> str | None:
        async with self.pool.acquire() as c:
            st = await c.fetchval("SELECT state FROM plan_invoices WHERE invoice_id=$1",
                                  invoice_id)
        return None if st is None else str(st)

    async def open_plan_invoices(self, customer_id: str, subscription: str | None = None
                                 ) -> list[tuple[str, str]]:
        async with self.pool.acquire() as c:
            rows = await c.fetch(
                "SELECT invoice_id, grant_id FROM plan_invoices WHERE customer_id=$1 AND"
                " state='open' AND ($2::text IS NULL OR subscription=$2)"
                " ORDER BY invoice_id COLLATE \"C\"", customer_id, subscription)
        return [(str(r[0]), str(r[1])) for r in rows]

    @retried
    async def write_off_plan_invoice(self, invoice_id: str, at: int) -> bool:
        async with self.pool.acquire() as c:
            done = await c.fetchval(
                "UPDATE plan_invoices SET state='unpaid', updated_at=$2 WHERE invoice_id=$1"
                " AND state='open' RETURNING 1", invoice_id, int(at))
        return done is not None

    async def payment_customer(self, refs: Sequence[str]) -> str | None:
        refs = [r for r in refs if r]
        if not refs:
            return None
        async with self.pool.acquire() as c:
            all_refs = await _linked_refs(c, refs)
            cid = await c.fetchval(
                "SELECT g.customer_id FROM grant_payments p JOIN grants g ON g.id = p.grant_id"
                " WHERE p.ref = ANY($1::text[]) LIMIT 1", all_refs)
        return None if cid is None else str(cid)

    @retried
    async def link_payment(self, payment_refs: Sequence[str], invoice_ref: str) -> int:
        refs = list(dict.fromkeys(r for r in payment_refs if r))
        if not refs:
            return 0
        async with self.pool.acquire() as c:
            # in key order: members linking overlapping refs take the unique index's locks
            # in one order (in the caller's, two could deadlock; see alerts.py)
            rows = await c.fetch(
                "INSERT INTO payment_links(payment_ref, invoice_ref)"
                " SELECT r, $2 FROM unnest($1::text[]) AS r ORDER BY r ON CONFLICT DO NOTHING"
                " RETURNING payment_ref", refs, invoice_ref)
        return len(rows)

    @retried
    async def claw_back(self, customer_id: str, refs: Sequence[str], key: str, event_id: str,
                        returned_minor: int,
                        decide: Callable[[GrantFacts], ClawbackDecision | None],
                        ) -> list[tuple[str, int, list[Entry]]]:
        refs = [r for r in refs if r]
        if not refs:
            return []
        now = time.time()
        out: list[tuple[str, int, list[Entry]]] = []
        async with self.pool.acquire() as c, c.transaction():
            await c.execute("SELECT pg_advisory_xact_lock(hashtext('meterproxy_clawback:'"
                            " || $1))", key)
            await lock_account(c, customer_id)   # no shipping batch spends its grants now
            all_refs = await _linked_refs(c, refs)
            rows = await c.fetch("SELECT grant_id, MAX(paid) FROM grant_payments WHERE"
                                 " ref = ANY($1::text[]) GROUP BY grant_id ORDER BY grant_id",
                                 all_refs)
            async def one(gid: str, paid: int | None, k: str,
                          follow_of: tuple[int, int] | None) -> None:
                prev = await c.fetchval("SELECT credits FROM clawbacks WHERE key=$1", k)
                sums = {r[0]: int(r[1]) for r in await c.fetch(
                    "SELECT kind, SUM(amount) FROM credit_entries WHERE grant_id=$1"
                    " GROUP BY kind", gid)}
                clawed = int(await c.fetchval("SELECT COALESCE(SUM(credits), 0) FROM clawbacks"
                                              " WHERE grant_id=$1", gid))
                owed = int(await c.fetchval("SELECT COALESCE(SUM(amount), 0) FROM"
                                            " credit_entries WHERE kind='debt' AND"
                                            " request_id=$1", f"clawback:{gid}"))
                nxt = await _next_period_grant(c, gid)
                successor, carried_out = nxt if nxt is not None else (None, 0)
                followed = owed_on = 0
                if successor is not None:
                    # into this successor only (SQLite's claw_back says why)
                    fk, ok_ = f"carry:{gid}>{successor}:", f"owe:{gid}>"
                    followed = int(await c.fetchval(
                        "SELECT COALESCE(SUM(credits), 0) FROM clawbacks"
                        " WHERE substr(key, 1, $1)=$2", len(fk), fk))
                    owed_on = int(await c.fetchval(
                        "SELECT COALESCE(SUM(credits), 0) FROM clawbacks"
                        " WHERE substr(key, 1, $1)=$2", len(ok_), ok_))
                previous = int(prev) if prev is not None else 0
                ok = "owe:" + k.removeprefix("carry:")
                owe_prev = 0
                if follow_of is not None:
                    owe_prev = int(await c.fetchval("SELECT credits FROM clawbacks WHERE key=$1",
                                                    ok) or 0)
                carried_in = int(await c.fetchval("SELECT carried FROM grants WHERE id=$1",
                                                  gid) or 0)
                owed_into = int(await c.fetchval(
                    "SELECT COALESCE(SUM(credits), 0) FROM clawbacks WHERE grant_id=$1"
                    " AND substr(key, 1, 4)='owe:'", gid))
                d = decide(GrantFacts(gid, paid, previous, sums, clawed, owed, carried_out,
                                      followed,
                                      None if follow_of is None else previous + follow_of[0],
                                      carried_in=carried_in, successor=successor,
                                      owed_on=owed_on, owed_into=owed_into,
                                      owe_target=None if follow_of is None
                                      else owe_prev + follow_of[1], owe_previous=owe_prev))
                if d is None:
                    return
                for e in d.entries:
                    rid = f"clawback:{gid}" if e.kind == "debt" else k
                    await insert_entries(c, customer_id, [e], request_id=rid, at=now)
                    if e.kind == "debt":    # spent credit taken back: the balance owes it
                        await _add_balance(c, customer_id, -e.amount)
                rows_ = [(k, d.credits)] if follow_of is None or follow_of[0] > 0 else []
                if follow_of is not None and follow_of[1] > 0:
                    rows_.append((ok, owe_prev + follow_of[1]))
                for rk, credits in rows_:
                    await c.execute(
                        "INSERT INTO clawbacks(key, customer_id, grant_id, minor, credits,"
                        " event_id, created_at) VALUES ($1,$2,$3,$4,$5,$6,$7) ON CONFLICT (key)"
                        " DO UPDATE SET minor=EXCLUDED.minor, credits=EXCLUDED.credits,"
                        " event_id=EXCLUDED.event_id",
                        rk, customer_id, gid, returned_minor, credits, event_id, int(now))
                taken = d.credits - previous + (follow_of[1] if follow_of is not None else 0)
                out.append((gid, taken, d.entries))
                follow = d.follow if carried_out > 0 else 0
                if successor is not None and (follow > 0 or d.owe > 0):
                    await one(successor, None, f"carry:{gid}>{successor}:{key}", (follow, d.owe))

            for gid, paid in rows:
                await one(gid, None if paid is None else int(paid), f"{key}:{gid}", None)
        return out
