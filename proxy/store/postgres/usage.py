"""The ``UsageLedger`` owner on PostgreSQL: the reads of the fleet's shipped usage.

Where usage lives in fleet mode:

- **record** (the hot path) is never a PostgreSQL round trip. Each member journals its
  rows in its own local SQLite ``Store`` exactly as the single process does (strict
  durability: durable in the local file before the response's last bytes leave), and
  ``proxy.store.postgres.shipping.Shipper`` ships the journal to ``usage_ledger`` in idempotent
  batches keyed ``(member_id, seq)``. So ``PostgresUsage.record`` delegates to the member's
  local recorder (``local``, the ``Store``), and raises when built without one (offline
  tools read, they never record).
- ``usage_ledger`` is the fleet's audit: one row per meter of a shipped request, in
  ``audit_seq`` order (``proxy.store.postgres.owners_schema``).
- ``usage_minute`` is kept by a trigger on ``usage_ledger`` in the shipping transaction,
  so every reader below sees each shipped row exactly once. The readers lag the hot path
  by the shipping interval; ``materialize`` ships now what the local journal holds (through
  ``shipping``, ``proxy.fleet.journal_shipping.JournalShipping``) and returns how many rows
  it shipped (0 without a journal: an offline reader).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from proxy.periods import default_usage_range, minute_bounds
from proxy.store.db import UsageRow
from proxy.store.postgres.pool import PgPool, retried
from proxy.store.protocols import AuditRecord, UsageDay, UsageTotal

_AUDIT_COLS = ("audit_seq, at_ms, request_id, customer_id, key_id, rule, rules_version, status,"
               " meter, quantity, credits, billable, flags, method, path")


# the retention's deletion, and the highest cutoff it ever deleted below (migration 14),
# in one statement: a reader of both in one snapshot never sees one without the other
_PRUNE_AUDIT = """
WITH gone AS (
    DELETE FROM usage_ledger WHERE audit_seq IN (
        SELECT audit_seq FROM usage_ledger ORDER BY audit_seq LIMIT $2) AND at_ms < $1
    RETURNING 1),
mark AS (
    UPDATE audit_pruned SET before_ms = $1
    WHERE id = 0 AND before_ms < $1 AND EXISTS (SELECT 1 FROM gone))
SELECT count(*) FROM gone
"""


class LocalRecorder(Protocol):
    """The member's local journal (``proxy.store.db.Store``)."""

    def record(self, row: UsageRow, wait: bool) -> asyncio.Future[None] | None: ...


class Shipping(Protocol):
    """Ships the member's journal to PostgreSQL (``JournalShipping``)."""

    async def ship_pending(self) -> int: ...


def _audit(r: Any) -> AuditRecord:
    return AuditRecord(*r)


class PostgresUsage:
    def __init__(self, pool: PgPool, local: LocalRecorder | None = None,
                 shipping: Shipping | None = None) -> None:
        self.pool = pool
        self.local = local
        self.shipping = shipping

    def record(self, row: UsageRow, wait: bool) -> asyncio.Future[None] | None:
        if self.local is None:
            raise RuntimeError("fleet mode records usage in the member's local journal;"
                               " this PostgresUsage has none (an offline reader)")
        return self.local.record(row, wait)

    async def materialize(self) -> int:
        return 0 if self.shipping is None else await self.shipping.ship_pending()

    async def usage(self, customer_id: str, start: float | None = None,
                    end: float | None = None, now: float | None = None
                    ) -> tuple[float, float, dict[str, UsageTotal]]:
        now = time.time() if now is None else now
        async with self.pool.acquire() as c:
            if start is None or end is None:
                anchor = await c.fetchval("SELECT billing_anchor FROM customers WHERE id=$1",
                                          customer_id)
                d_start, d_end = default_usage_range(anchor, now)
                start = d_start if start is None else start
                end = d_end if end is None else end
            lo, hi = minute_bounds(start, end)      # the minutes in [start, end)
            rows = await c.fetch(
                "SELECT meter, SUM(quantity), SUM(requests), SUM(billable), SUM(covered)"
                " FROM usage_minute WHERE customer_id=$1 AND minute>=$2 AND minute<$3"
                " GROUP BY meter ORDER BY meter", customer_id, lo, hi)
        return start, end, {r[0]: UsageTotal(*(int(v) for v in r[1:])) for r in rows}

    async def usage_days(self, customer_id: str, since: int, period: tuple[int, int],
                         trailing_from: int) -> list[UsageDay]:
        async with self.pool.acquire() as c:
            rows = await c.fetch(
                "SELECT meter, minute / 86400 * 86400 AS day, minute >= $1 AND minute < $2,"
                " minute > $3, SUM(quantity), SUM(billable), SUM(covered), SUM(requests)"
                " FROM usage_minute WHERE customer_id=$4 AND minute>=$5 GROUP BY 1, 2, 3, 4",
                period[0], period[1], trailing_from, customer_id, since)
        return [UsageDay(r[0], int(r[1]), bool(r[2]), bool(r[3]), *(int(v) for v in r[4:]))
                for r in rows]

    async def billable(self, start: int, end: int) -> dict[tuple[str, str], int]:
        async with self.pool.acquire() as c:
            rows = await c.fetch(
                "SELECT customer_id, meter, SUM(billable) FROM usage_minute WHERE minute>=$1"
                " AND minute<$2 GROUP BY 1, 2", int(start), int(end))
        return {(r[0], r[1]): int(r[2]) for r in rows}

    async def quantities(self, start: int, end: int) -> dict[tuple[str, str], int]:
        async with self.pool.acquire() as c:
            rows = await c.fetch(
                "SELECT customer_id, meter, SUM(quantity) FROM usage_minute WHERE minute>=$1"
                " AND minute<$2 GROUP BY 1, 2", int(start), int(end))
        return {(r[0], r[1]): int(r[2]) for r in rows}

    async def oldest_unstaged_minute(self) -> int | None:
        async with self.pool.acquire() as c:
            b = await c.fetchval("SELECT MIN(minute) FROM usage_minute"
                                 " WHERE billable > reported OR covered > reported_covered")
        return None if b is None else int(b)

    async def audit_stream(self, customer_id: str | None, start: float, end: float,
                           customers: Sequence[str] | None = None,
                           batch: int = 500) -> AsyncIterator[list[AuditRecord]]:
        """Keyset pages (no connection is held between batches): by ``audit_seq``, or for
        one customer by (``at_ms``, ``audit_seq``)."""
        lo, hi = (b * 1000 for b in minute_bounds(start, end))   # requests whose minute is in it
        among = list(customers) if customers else None
        last: tuple[int, int] = (lo - 1, 0) if customer_id is not None else (0, 0)
        while True:
            async with self.pool.acquire() as c:
                if customer_id is not None:
                    rows = await c.fetch(
                        f"SELECT {_AUDIT_COLS} FROM usage_ledger WHERE customer_id=$1"
                        " AND at_ms>=$2 AND at_ms<$3 AND (at_ms, audit_seq) > ($4, $5)"
                        " AND ($6::text[] IS NULL OR customer_id = ANY($6::text[]))"
                        " ORDER BY at_ms, audit_seq LIMIT $7",
                        customer_id, lo, hi, last[0], last[1], among, batch)
                else:
                    rows = await c.fetch(
                        f"SELECT {_AUDIT_COLS} FROM usage_ledger WHERE at_ms>=$1 AND at_ms<$2"
                        " AND audit_seq > $3"
                        " AND ($4::text[] IS NULL OR customer_id = ANY($4::text[]))"
                        " ORDER BY audit_seq LIMIT $5", lo, hi, last[1], among, batch)
            if not rows:
                return
            yield [_audit(r) for r in rows]
            last = (int(rows[-1]["at_ms"]), int(rows[-1]["audit_seq"]))
            if len(rows) < batch:
                return

    async def audit_for_request(self, request_id: str) -> list[AuditRecord]:
        async with self.pool.acquire() as c:
            rows = await c.fetch(f"SELECT {_AUDIT_COLS} FROM usage_ledger WHERE request_id=$1"
                                 " ORDER BY audit_seq", request_id)
        return [_audit(r) for r in rows]

    async def audit_versions(self, start: float, end: float) -> list[str]:
        async with self.pool.acquire() as c:
            rows = await c.fetch("SELECT DISTINCT rules_version FROM usage_ledger"
                                 " WHERE at_ms>=$1 AND at_ms<$2",
                                 *(b * 1000 for b in minute_bounds(start, end)))
        return [str(r[0]) for r in rows]

    @retried
    async def prune_audit(self, cutoff_ms: int, batch: int = 5000) -> int:
        """Among the ``batch`` oldest rows in commit order, those older than the cutoff
        (as SQLite: commit order is the index, no scan by time). The minutes keep their
        totals (the trigger fires on insert only), and members never resend a pruned row:
        a shipper starts from the larger of its journal's and ``members.last_shipped_seq``.
        A deletion raises ``audit_pruned.before_ms`` to the cutoff in the same statement
        (a start tells a row the retention pruned from one that never shipped by it)."""
        async with self.pool.acquire() as c:
            n = await c.fetchval(_PRUNE_AUDIT, cutoff_ms, batch)
        return int(n)
