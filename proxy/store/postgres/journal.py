"""A member's local SQLite journal shipped to PostgreSQL: the fleet's record path.

``UsageLedger.record`` in fleet mode appends to the member's own ``Store`` journal (strict
durability, no network round trip). ``JournalShipping`` moves what the journal holds into
the shared database, idempotently:

1. the rows' grant debits (``UsageRow.debits``) into ``credit_entries`` keyed
   ``(member_id, seq, index)``, ``ON CONFLICT DO NOTHING`` (one transaction);
2. the rows themselves through the fleet's ``Shipper`` (``usage_ledger`` keyed
   ``(member_id, seq)``, leases settled from the rows really inserted, the minutes kept by
   the trigger; one transaction), after which the watermark moves.

A crash between 1 and 2 resends both: 1 inserts nothing, 2 inserts the rows. So each row
is counted exactly once in audit, usage and credits (a reader may see a batch's debits a
moment before its usage).

Requirement on the journal (for the integration): ``seq`` must never be reused by one
member id. SQLite's ``INTEGER PRIMARY KEY`` reuses ``max(seq) + 1`` after the newest rows
are deleted, so a journal that deletes shipped rows must keep the newest one (or the member
id must change, e.g. pod id + boot number, whenever the journal starts empty).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from proxy.credits.ledger import Entry
from proxy.fleet.shipping import LocalRow, ShipItem, Shipper
from proxy.store.db import UsageRow, decode_row
from proxy.store.postgres.ledger import balance_change
from proxy.store.postgres.pool import PgPool


def to_local(seq: int, r: UsageRow) -> LocalRow:
    """Pure: a journal row as the shipper's ``LocalRow``."""
    return LocalRow(seq, r.request_id, int(r.at * 1000), r.customer_id, r.key_id, r.rule,
                    r.rules_version, r.status,
                    tuple(ShipItem(i.meter, i.quantity, i.credits, i.billable, i.flags)
                          for i in r.items), r.method, r.path)


class SqliteJournal:
    """The rows of a ``Store``'s ``journal`` table after a sequence number."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def rows_after(self, seq: int, limit: int) -> list[tuple[int, UsageRow]]:
        return [(int(s), decode_row(blob)) for s, blob in self.conn.execute(
            "SELECT seq, row FROM journal WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit))]


_DEBITS = """
INSERT INTO credit_entries (customer_id, grant_id, kind, amount, request_id, meter, at_ms,
                            member_id, member_seq, member_item)
SELECT c, NULLIF(g, ''), k, a, r, m, t, $1, s, i
FROM unnest($2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::text[],
            $8::bigint[], $9::bigint[], $10::smallint[]) AS x(c, g, k, a, r, m, t, s, i)
ORDER BY s, i
ON CONFLICT (member_id, member_seq, member_item) WHERE member_id IS NOT NULL DO NOTHING
RETURNING customer_id, grant_id, kind, amount
"""


class JournalShipping:
    """Ships one member's journal; ``ship_pending`` is ``UsageLedger.materialize``."""

    def __init__(self, pool: PgPool, member_id: str, journal: SqliteJournal,
                 batch_size: int = 1000) -> None:
        self.pool = pool
        self.member_id = member_id
        self.journal = journal
        self.shipper = Shipper(pool, member_id, batch_size)
        self._loaded = False

    async def _ship_debits(self, rows: Sequence[tuple[int, UsageRow]]) -> None:
        cols: list[list[object]] = [[] for _ in range(9)]
        for seq, r in rows:
            at_ms = int(r.at * 1000)
            for i, (meter, e) in enumerate(r.debits):
                for col, v in zip(cols, (r.customer_id, e.grant_id, e.kind, e.amount,
                                         r.request_id, meter, at_ms, seq, i), strict=True):
                    col.append(v)
        if not cols[0]:
            return
        async with self.pool.acquire() as c, c.transaction():
            back = await c.fetch(_DEBITS, self.member_id, *cols)
            change: dict[str, int] = {}
            for b in back:
                d = balance_change([Entry(b["grant_id"] or "", b["kind"], b["amount"])])
                change[b["customer_id"]] = change.get(b["customer_id"], 0) + d
            for cid in sorted(cid for cid, d in change.items() if d):
                await c.execute("UPDATE credit_accounts SET balance = balance + $2"
                                " WHERE customer_id = $1", cid, change[cid])

    async def ship_pending(self) -> int:
        """Ship every journal row after the watermark; returns how many rows shipped.
        Raises PgUnavailable (what was committed stays committed; the rest is resent)."""
        if not self._loaded:
            await self.shipper.load_watermark()
            self._loaded = True
        total = 0
        while rows := self.journal.rows_after(self.shipper.watermark, self.shipper.batch_size):
            await self._ship_debits(rows)
            await self.shipper.ship([to_local(s, r) for s, r in rows])
            total += len(rows)
        return total
