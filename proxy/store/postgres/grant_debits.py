"""Grant-level credit entries for the fleet's shipped usage, and the per-grant state every
member reads back from the shared ledger.

A member admits against a lease (an amount, not a grant), so which grant a spend came from
is decided where every member's spending meets: in the shipping transaction
(``proxy.store.postgres.shipping.Shipper.ship``), for the usage items that transaction
really inserted (a resend inserts no usage and so allocates nothing):

1. the customers' ``credit_accounts`` rows are already locked (``leases.settle``, sorted),
   then their grants with credit left are read ``FOR UPDATE``;
2. each item's credits are taken from the grants live at the item's time, in burn order
   (priority, then earliest expiry, then oldest: ``proxy.credits.ledger.settle_cost``, the
   rule a single process applies), items in ``(seq, item)`` order; what the grants do not
   cover is a ``debt`` entry (fleet credits are enforced for ``overage: block`` customers,
   whose shortfall is debt, as in a single process);
3. the entries are inserted keyed ``(member_id, seq, index)`` like every shipped entry.

The trigger of migration 6 (``proxy.store.postgres.owners_schema``) keeps ``grants.used``,
``credit_accounts.debt`` and ``credit_accounts.rev`` in step in the same transaction, so
``grant_states`` reads a customer's per-grant state in one indexed query and ``changed``
finds the customers whose state moved since a revision. A grant's ``expire``/``void``
amount is computed from the same ``used`` under the account lock
(``proxy.store.postgres.ledger.insert_entries``), never from a member's own view.

Usage admitted before a grant's expiry but shipped after its expiry entry was written finds
nothing left on that grant: it is debited from the next grant in burn order, or is debt.
That is at most what members admitted for the customer before the expiry and had not
shipped yet (about ``fleet.ship_interval`` of its spending; docs/fleet.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.credits.ledger import Entry, GrantState, apply, burn_order, settle_cost
from proxy.store.postgres.conn import Conn
from proxy.store.postgres.pool import PgPool


@dataclass(frozen=True, slots=True)
class ShippedItem:
    """One usage item a shipping batch really inserted, with the credits it spent."""

    customer_id: str
    seq: int
    item: int
    at_ms: int
    request_id: str
    meter: str
    credits: int


@dataclass(frozen=True, slots=True)
class Allocated:
    """One credit entry of a shipped item (``grant_id`` "" for debt)."""

    customer_id: str
    seq: int
    index: int            # within the journal row (member_item)
    at_ms: int
    request_id: str
    meter: str
    entry: Entry


def allocate_items(grants: Mapping[str, Sequence[GrantState]],
                   items: Iterable[ShippedItem]) -> list[Allocated]:
    """Pure: the entries of ``items`` (taken in ``(seq, item)`` order) against ``grants``
    (customer -> its grants with ``remaining`` from the shared ledger; changed in place as
    they are spent). Each item's entries sum to its credits; no grant goes below zero; a
    grant is used only if live at the item's time."""
    by_id = {g.id: g for gs in grants.values() for g in gs}
    ordered = {c: burn_order(gs) for c, gs in grants.items()}
    out: list[Allocated] = []
    index: dict[int, int] = {}
    for it in sorted(items, key=lambda i: (i.seq, i.item)):
        if it.credits <= 0:
            continue
        entries, _ = settle_cost(ordered.get(it.customer_id, []), it.credits,
                                 it.at_ms / 1000, debt_ok=True)
        apply(by_id, entries)
        for e in entries:
            k = index.get(it.seq, 0)
            index[it.seq] = k + 1
            out.append(Allocated(it.customer_id, it.seq, k, it.at_ms, it.request_id,
                                 it.meter, e))
    return out


_GRANT_COLS = ("id, customer_id, amount, priority, expires_at, created_at, source,"
               " effective_at, used")


def _state(r: Any) -> GrantState:
    """A ``grants`` row (``_GRANT_COLS``) as its state: ``remaining`` = amount - used."""
    gid, cid, amount, prio, expires, created, source, effective, used = r
    return GrantState(str(gid), str(cid), int(amount), int(prio),
                      None if expires is None else int(expires), int(created), str(source),
                      remaining=max(int(amount) - int(used), 0),
                      effective_at=None if effective is None else int(effective))


INSERT_ENTRIES = """
INSERT INTO credit_entries (customer_id, grant_id, kind, amount, request_id, meter, at_ms,
                            member_id, member_seq, member_item)
SELECT c, NULLIF(g, ''), k, a, r, m, t, $1, s, i
FROM unnest($2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::text[],
            $8::bigint[], $9::bigint[], $10::smallint[]) AS x(c, g, k, a, r, m, t, s, i)
ORDER BY s, i
ON CONFLICT (member_id, member_seq, member_item) WHERE member_id IS NOT NULL DO NOTHING
"""


async def debit_grants(conn: Conn, member_id: str, items: Sequence[ShippedItem]) -> int:
    """Inside the shipping transaction, after ``leases.settle`` locked the customers'
    accounts: write the grant-level entries of ``items``. Returns how many."""
    spending = [i for i in items if i.credits > 0]
    if not spending:
        return 0
    customers = sorted({i.customer_id for i in spending})
    rows = await conn.fetch(
        f"SELECT {_GRANT_COLS} FROM grants WHERE customer_id = ANY($1::text[])"
        " AND used < amount ORDER BY id FOR UPDATE", customers)
    grants: dict[str, list[GrantState]] = {}
    for r in rows:
        g = _state(r)
        grants.setdefault(g.customer_id, []).append(g)
    done = allocate_items(grants, spending)
    cols: list[list[object]] = [[] for _ in range(9)]
    for a in done:
        for col, v in zip(cols, (a.customer_id, a.entry.grant_id, a.entry.kind, a.entry.amount,
                                 a.request_id, a.meter, a.at_ms, a.seq, a.index), strict=True):
            col.append(v)
    await conn.execute(INSERT_ENTRIES, member_id, *cols)
    return len(done)


# ---- what every member reads back ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class CustomerCredits:
    """A customer's per-grant state from the shared ledger."""

    customer_id: str
    grants: list[GrantState]
    debt: int


async def changed(pool: PgPool, since: int) -> tuple[list[str], int]:
    """Customers whose credit state moved after revision ``since`` (every customer with an
    account for ``since`` < 0), and the highest revision seen."""
    async with pool.acquire() as c:
        rows = await c.fetch("SELECT customer_id, rev FROM credit_accounts WHERE rev > $1",
                             since)
    top = max((int(r["rev"]) for r in rows), default=max(since, 0))
    return sorted(str(r["customer_id"]) for r in rows), top


async def grant_states(pool: PgPool, customers: Sequence[str]) -> list[CustomerCredits]:
    """The customers' grants (``remaining`` = amount less every entry against the grant;
    voided flagged) and debt, as the shared ledger has them now (one snapshot)."""
    if not customers:
        return []
    async with pool.acquire() as c, c.transaction(isolation="repeatable_read", readonly=True):
        rows = await c.fetch(
            f"SELECT {_GRANT_COLS}, EXISTS (SELECT 1 FROM credit_entries e WHERE"
            " e.grant_id = g.id AND e.kind = 'void') AS voided FROM grants g"
            " WHERE customer_id = ANY($1::text[]) ORDER BY created_at, id", list(customers))
        debts = {str(r[0]): int(r[1]) for r in await c.fetch(
            "SELECT customer_id, debt FROM credit_accounts WHERE customer_id = ANY($1::text[])",
            list(customers))}
    per: dict[str, list[GrantState]] = {cid: [] for cid in customers}
    for r in rows:
        g = _state(tuple(r)[:9])
        g.voided = bool(r["voided"])
        per.setdefault(g.customer_id, []).append(g)
    return [CustomerCredits(cid, gs, max(debts.get(cid, 0), 0)) for cid, gs in per.items()]


async def overpaid(pool: PgPool) -> dict[str, int]:
    """Customers whose ledger debt (``credit_accounts.debt``: debt less repay) is below 0,
    with that debt: repayments of a debt that does not exist (written before repayments
    were capped by the debt under the account lock: two members' views repaying the same
    debt). ``CreditService.give_back_unmatched`` gives them back."""
    async with pool.acquire() as c:
        rows = await c.fetch("SELECT customer_id, debt FROM credit_accounts WHERE debt < 0"
                             " ORDER BY customer_id")
    return {str(r[0]): int(r[1]) for r in rows}
