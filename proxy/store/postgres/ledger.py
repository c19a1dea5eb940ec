"""The ``CreditLedger`` owner on PostgreSQL: ``grants``, ``credit_entries``,
``grant_payments``, ``payment_links``, ``clawbacks``, and the ``balance`` column of the
fleet's ``credit_accounts``.

Fleet credit leases escrow from ``credit_accounts.balance`` ("credits granted, less expired
and voided"); this owner keeps that balance in step with the ledger in the same transaction
as the entries: a new grant adds its amount, an ``expire`` or ``void`` entry takes its
amount out. (Spending moves ``settled``/``escrowed``, owned by ``proxy.store.postgres.leases``.)

Concurrency between members: a grant's idempotency key is UNIQUE per customer, and the
insert is ``ON CONFLICT DO NOTHING``: of two members creating the same grant, one creates
it and the other returns it (``created`` False) having written nothing. A claw-back takes a
transaction-scoped advisory lock on its key, so a repeat (on any member) decides on what
the first wrote.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from proxy.credits.ledger import Entry, GrantState
from proxy.store.postgres.conn import Conn
from proxy.store.postgres.pool import PgPool
from proxy.store.protocols import (
    ClawbackDecision,
    EntryRecord,
    GrantFacts,
    LedgerEntry,
    LedgerSnapshot,
    NewGrant,
)

_GRANT_COLS = "id, customer_id, amount, priority, expires_at, created_at, source"
_BALANCE_OUT = ("expire", "void")


def balance_change(entries: Sequence[Entry]) -> int:
    """Pure: what appending ``entries`` does to the account balance (micro-credits)."""
    return -sum(e.amount for e in entries if e.kind in _BALANCE_OUT)


async def _add_balance(c: Conn, customer_id: str, amount: int) -> None:
    if amount:
        await c.execute(
            "INSERT INTO credit_accounts(customer_id, balance) VALUES ($1, $2) ON CONFLICT"
            " (customer_id) DO UPDATE SET balance = credit_accounts.balance + EXCLUDED.balance",
            customer_id, amount)


async def insert_entries(c: Conn, customer_id: str, entries: Sequence[Entry],
                         request_id: str | None = None, meter: str | None = None,
                         at: float | None = None) -> None:
    """Append entries inside the caller's transaction (a debt entry has no grant)."""
    if not entries:
        return
    at_ms = int((time.time() if at is None else at) * 1000)
    await c.executemany(
        "INSERT INTO credit_entries(customer_id, grant_id, kind, amount, request_id, meter,"
        " at_ms) VALUES ($1, NULLIF($2, ''), $3, $4, $5, $6, $7)",
        [(customer_id, e.grant_id, e.kind, e.amount, request_id, meter, at_ms)
         for e in entries])
    await _add_balance(c, customer_id, balance_change(entries))


async def _linked_refs(c: Conn, refs: Sequence[str]) -> list[str]:
    linked = [r[0] for r in await c.fetch(
        "SELECT invoice_ref FROM payment_links WHERE payment_ref = ANY($1::text[])", list(refs))]
    return list(dict.fromkeys([*refs, *linked]))


def _grant(r: Sequence[object]) -> GrantState:
    return GrantState(*r)  # type: ignore[arg-type]


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
                " idempotency_key, created_at, period_start, period_end)"
                " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)"
                " ON CONFLICT (customer_id, idempotency_key) DO NOTHING RETURNING id",
                g.id, g.customer_id, g.amount, g.priority, g.expires_at, g.source,
                new.idempotency_key, g.created_at,
                new.period[0] if new.period else None, new.period[1] if new.period else None)
            if inserted is None:        # the key is used (possibly by another member just now)
                row = await c.fetchrow(f"SELECT {_GRANT_COLS} FROM grants WHERE customer_id=$1"
                                       " AND idempotency_key=$2", g.customer_id,
                                       new.idempotency_key)
                assert row is not None
                return _grant(tuple(row)), False
            refs = [r for r in new.payment_refs if r]
            if refs:
                await c.executemany("INSERT INTO grant_payments(ref, grant_id, paid)"
                                    " VALUES ($1,$2,$3) ON CONFLICT DO NOTHING",
                                    [(r, g.id, new.paid_minor) for r in refs])
            await _add_balance(c, g.customer_id, g.amount)
            extra = then(g) if then is not None else []
            await insert_entries(c, g.customer_id, extra)
            return g, True

    async def append(self, entries: Sequence[LedgerEntry]) -> None:
        async with self.pool.acquire() as c, c.transaction():
            for e in entries:
                await insert_entries(c, e.customer_id, [e.entry], request_id=e.request_id,
                                     meter=e.meter, at=e.at)

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
                " AND period_start < $3 ORDER BY period_start DESC LIMIT 1",
                customer_id, key_prefix, start)
        return None if gid is None else str(gid)

    async def entry_total(self, grant_id: str, kind: str) -> int:
        async with self.pool.acquire() as c:
            return int(await c.fetchval("SELECT COALESCE(SUM(amount), 0) FROM credit_entries"
                                        " WHERE grant_id=$1 AND kind=$2", grant_id, kind))

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

    async def link_payment(self, payment_refs: Sequence[str], invoice_ref: str) -> int:
        refs = list(dict.fromkeys(r for r in payment_refs if r))
        if not refs:
            return 0
        async with self.pool.acquire() as c:
            rows = await c.fetch(
                "INSERT INTO payment_links(payment_ref, invoice_ref)"
                " SELECT r, $2 FROM unnest($1::text[]) AS r ON CONFLICT DO NOTHING"
                " RETURNING payment_ref", refs, invoice_ref)
        return len(rows)

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
            all_refs = await _linked_refs(c, refs)
            rows = await c.fetch("SELECT grant_id, MAX(paid) FROM grant_payments WHERE"
                                 " ref = ANY($1::text[]) GROUP BY grant_id ORDER BY grant_id",
                                 all_refs)
            for gid, paid in rows:
                k = f"{key}:{gid}"
                prev = await c.fetchval("SELECT credits FROM clawbacks WHERE key=$1", k)
                sums = {r[0]: int(r[1]) for r in await c.fetch(
                    "SELECT kind, SUM(amount) FROM credit_entries WHERE grant_id=$1"
                    " GROUP BY kind", gid)}
                clawed = int(await c.fetchval("SELECT COALESCE(SUM(credits), 0) FROM clawbacks"
                                              " WHERE grant_id=$1", gid))
                owed = int(await c.fetchval("SELECT COALESCE(SUM(amount), 0) FROM"
                                            " credit_entries WHERE kind='debt' AND"
                                            " request_id=$1", f"clawback:{gid}"))
                previous = int(prev) if prev is not None else 0
                d = decide(GrantFacts(gid, None if paid is None else int(paid), previous, sums,
                                      clawed, owed))
                if d is None:
                    continue
                for e in d.entries:
                    rid = f"clawback:{gid}" if e.kind == "debt" else k
                    await insert_entries(c, customer_id, [e], request_id=rid, at=now)
                await c.execute(
                    "INSERT INTO clawbacks(key, customer_id, grant_id, minor, credits, event_id,"
                    " created_at) VALUES ($1,$2,$3,$4,$5,$6,$7) ON CONFLICT (key) DO UPDATE"
                    " SET minor=EXCLUDED.minor, credits=EXCLUDED.credits,"
                    " event_id=EXCLUDED.event_id",
                    k, customer_id, gid, returned_minor, d.credits, event_id, int(now))
                out.append((gid, d.credits - previous, d.entries))
        return out
