"""Shipping a member's journal to the shared usage ledger, in idempotent batches.

Each journal row carries the member's own sequence number; in the ledger a row is keyed
``(customer_id, member_id, seq, item)``. One batch is one transaction:

1. ``INSERT ... SELECT FROM unnest(...) ON CONFLICT DO NOTHING RETURNING`` (one statement,
   array parameters: no temporary staging table, so a transaction pooler is fine);
2. settle the members' leases and the customers' accounts from the rows that came back
   only (proxy.store.postgres.leases.settle): a row shipped twice settles once; then the
   same rows' credits become grant-level entries (which grant each spend came from, or
   debt: proxy.store.postgres.grant_debits);
3. ``members.last_shipped_seq`` moves to the batch's highest seq;
4. commit, and only then the local watermark advances.

A crash anywhere before 4 leaves the watermark behind: the batch is sent again and step 1
inserts nothing. A crash after the commit but before the local watermark moved does the
same. So totals in the ledger are exact whatever fails when. PostgreSQL unreachable: the
batch stays in the journal and the next pass retries it (``ship_pending`` returns).

``LocalRow`` is a simple stand-in for ``proxy.store.db.UsageRow`` plus its journal
sequence; wave 2 adapts the journal's rows to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from proxy.store.postgres.errors import PgUnavailable
from proxy.store.postgres.grant_debits import ShippedItem, debit_grants
from proxy.store.postgres.leases import settle
from proxy.store.postgres.pool import PgPool

log = logging.getLogger("meterproxy.fleet.shipping")


@dataclass(frozen=True, slots=True)
class ShipItem:
    meter: str
    quantity: int         # micro-units
    credits: int = 0      # micro-credits debited (settles the lease)
    billable: int = 0     # micro-units for Stripe
    flags: str = ""


@dataclass(frozen=True, slots=True)
class LocalRow:
    seq: int              # the member's journal sequence (strictly increasing)
    request_id: str
    at_ms: int
    customer_id: str
    key_id: str
    rule: str
    rules_version: str
    status: int
    items: tuple[ShipItem, ...]
    method: str = ""
    path: str = ""


class Journal(Protocol):
    """Where rows to ship come from (the member's local journal)."""

    def rows_after(self, seq: int, limit: int) -> Sequence[LocalRow]: ...


@dataclass(frozen=True, slots=True)
class Shipped:
    rows: int             # journal rows in the batch
    inserted: int         # ledger items that were new (the rest were resends)
    watermark: int


_INSERT = """
INSERT INTO usage_ledger (customer_id, member_id, seq, item, request_id, at_ms, key_id, rule,
    rules_version, status, method, path, meter, quantity, credits, billable, flags)
SELECT c, $1, s, i, r, a, k, ru, v, st, m, p, me, q, cr, b, f
FROM unnest($2::text[], $3::bigint[], $4::smallint[], $5::text[], $6::bigint[], $7::text[],
            $8::text[], $9::text[], $10::int[], $11::text[], $12::text[], $13::text[],
            $14::bigint[], $15::bigint[], $16::bigint[], $17::text[])
     AS x(c, s, i, r, a, k, ru, v, st, m, p, me, q, cr, b, f)
ON CONFLICT DO NOTHING
RETURNING customer_id, credits, seq, item, at_ms, request_id, meter
"""


def _columns(member_rows: Sequence[LocalRow]) -> list[list[object]]:
    cols: list[list[object]] = [[] for _ in range(16)]
    for r in member_rows:
        for i, it in enumerate(r.items):
            for col, v in zip(cols, (r.customer_id, r.seq, i, r.request_id, r.at_ms, r.key_id,
                                     r.rule, r.rules_version, r.status, r.method, r.path,
                                     it.meter, it.quantity, it.credits, it.billable, it.flags),
                              strict=True):
                col.append(v)
    return cols


class Shipper:
    """One per member: moves journal rows after ``watermark`` into the shared ledger."""

    def __init__(self, pool: PgPool, member_id: str, batch_size: int = 1000) -> None:
        self.pool = pool
        self.member_id = member_id
        self.batch_size = batch_size
        self.watermark = 0

    async def load_watermark(self) -> int:
        """The database's view of this member's last shipped seq (0 for a new member)."""
        async with self.pool.acquire() as conn:
            v = await conn.fetchval("SELECT last_shipped_seq FROM members WHERE id = $1",
                                    self.member_id)
        self.watermark = max(self.watermark, int(v or 0))
        return self.watermark

    async def ship(self, rows: Sequence[LocalRow]) -> Shipped:
        """Ship one batch in one transaction; the watermark moves after the commit."""
        if not rows:
            return Shipped(0, 0, self.watermark)
        top = max(r.seq for r in rows)
        async with self.pool.acquire() as conn, conn.transaction():
            back = await conn.fetch(_INSERT, self.member_id, *_columns(rows))
            spent: dict[str, int] = {}
            for b in back:
                spent[b["customer_id"]] = spent.get(b["customer_id"], 0) + b["credits"]
            await settle(conn, self.member_id, spent)
            await debit_grants(conn, self.member_id, [
                ShippedItem(b["customer_id"], b["seq"], b["item"], b["at_ms"], b["request_id"],
                            b["meter"], b["credits"]) for b in back if b["credits"]])
            await conn.execute(
                "INSERT INTO members(id, last_shipped_seq) VALUES ($1, $2) ON CONFLICT (id) DO "
                "UPDATE SET last_shipped_seq = GREATEST(members.last_shipped_seq, $2), "
                "last_seen = now()", self.member_id, top)
        self.watermark = max(self.watermark, top)
        return Shipped(len(rows), len(back), self.watermark)

    async def ship_pending(self, journal: Journal) -> int:
        """Ship everything after the watermark, batch by batch; returns rows shipped.
        Stops quietly at the first ``PgUnavailable`` (the rows stay in the journal)."""
        total = 0
        while True:
            rows = journal.rows_after(self.watermark, self.batch_size)
            if not rows:
                return total
            try:
                done = await self.ship(rows)
            except PgUnavailable as exc:
                log.warning("shipping paused, PostgreSQL unreachable: %s", exc)
                return total
            total += done.rows

    async def run(self, journal: Journal, interval: float, stop: asyncio.Event) -> None:
        """Ship every ``interval`` seconds until ``stop`` is set, then once more (drain)."""
        while not stop.is_set():
            await self.ship_pending(journal)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
        await self.ship_pending(journal)
