"""Usage and audit on SQLite (the ``UsageLedger`` owner): the only writer of ``journal``,
``audit`` and ``usage_minute``.

Writes go through the group commit of ``proxy.store.db.Store`` (``record`` and
``materialize`` are the Store's own; this owner adds the reads and the audit prune). Large
reads (the admin usage view, exports, the customer report) go through the optional
read-only ``aiosqlite`` connection, off the event-loop thread, as before.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiosqlite

from proxy.periods import default_usage_range, minute_bounds
from proxy.store.access import Writer
from proxy.store.db import Store, UsageRow
from proxy.store.protocols import AuditRecord, UsageDay, UsageTotal

_AUDIT_COLS = ("seq, at_ms, request_id, customer_id, key_id, rule, rules_version, status,"
               " meter, quantity, credits, billable, flags, method, path")


def prune_audit(conn: sqlite3.Connection, cutoff_ms: int, batch: int = 5000) -> int:
    """Delete the oldest audit rows (by seq, which grows with time: no index on at_ms is
    needed, keeping every commit one index lighter). Inside the caller's transaction."""
    cur = conn.execute("DELETE FROM audit WHERE seq IN (SELECT seq FROM audit ORDER BY seq"
                       " LIMIT ?) AND at_ms < ?", (batch, cutoff_ms))
    return int(cur.rowcount)


class SqliteUsage:
    """``db``: the running proxy's ``Store`` (record and materialize are its group commit), or
    a ``Direct`` connection for offline readers (which neither record nor materialize)."""

    def __init__(self, db: Writer, reader: aiosqlite.Connection | None = None) -> None:
        self.store = db
        self.reader = reader

    async def _all(self, sql: str, args: Sequence[Any]) -> list[Any]:
        if self.reader is not None:
            async with self.reader.execute(sql, tuple(args)) as cur:
                return list(await cur.fetchall())
        return self.store.conn.execute(sql, tuple(args)).fetchall()

    def record(self, row: UsageRow, wait: bool) -> asyncio.Future[None] | None:
        if not isinstance(self.store, Store):
            raise RuntimeError("usage is recorded only by the running proxy's Store")
        return self.store.record(row, wait)

    async def materialize(self) -> int:
        return await self.store.catch_up() if isinstance(self.store, Store) else 0

    async def usage(self, customer_id: str, start: float | None = None,
                    end: float | None = None, now: float | None = None
                    ) -> tuple[float, float, dict[str, UsageTotal]]:
        now = time.time() if now is None else now
        if start is None or end is None:
            row = self.store.conn.execute("SELECT billing_anchor FROM customers WHERE id=?",
                                          (customer_id,)).fetchone()
            d_start, d_end = default_usage_range(row[0] if row else None, now)
            start = d_start if start is None else start
            end = d_end if end is None else end
        lo, hi = minute_bounds(start, end)          # the minutes in [start, end)
        rows = await self._all(
            "SELECT meter, SUM(quantity), SUM(requests), SUM(billable), SUM(covered)"
            " FROM usage_minute WHERE customer_id=? AND minute>=? AND minute<?"
            " GROUP BY meter ORDER BY meter", (customer_id, lo, hi))
        return start, end, {m: UsageTotal(q, n, b, c) for m, q, n, b, c in rows}

    async def usage_days(self, customer_id: str, since: int, period: tuple[int, int],
                         trailing_from: int) -> list[UsageDay]:
        rows = await self._all(
            "SELECT meter, minute / 86400 * 86400 AS day, minute >= ? AND minute < ?,"
            " minute > ?, SUM(quantity), SUM(billable), SUM(covered), SUM(requests)"
            " FROM usage_minute WHERE customer_id=? AND minute>=? GROUP BY 1, 2, 3, 4",
            (period[0], period[1], trailing_from, customer_id, since))
        return [UsageDay(m, d, bool(p), bool(t), q, b, c, n) for m, d, p, t, q, b, c, n in rows]

    async def billable(self, start: int, end: int) -> dict[tuple[str, str], int]:
        rows = await self._all(
            "SELECT customer_id, meter, SUM(billable) FROM usage_minute WHERE minute>=? AND"
            " minute<? GROUP BY 1, 2", (int(start), int(end)))
        return {(c, m): int(b) for c, m, b in rows}

    async def quantities(self, start: int, end: int) -> dict[tuple[str, str], int]:
        rows = await self._all(
            "SELECT customer_id, meter, SUM(quantity) FROM usage_minute WHERE minute>=? AND"
            " minute<? GROUP BY 1, 2", (int(start), int(end)))
        return {(c, m): int(q) for c, m, q in rows}

    async def oldest_unstaged_minute(self) -> int | None:
        (b,) = self.store.conn.execute(
            "SELECT MIN(minute) FROM usage_minute INDEXED BY usage_minute_unreported"
            " WHERE billable > reported OR covered > reported_covered").fetchone()
        return None if b is None else int(b)

    async def audit_stream(self, customer_id: str | None, start: float, end: float,
                           customers: Sequence[str] | None = None,
                           batch: int = 500) -> AsyncIterator[list[AuditRecord]]:
        lo, hi = minute_bounds(start, end)          # the requests whose minute is in it
        sql = f"SELECT {_AUDIT_COLS} FROM audit WHERE at_ms>=? AND at_ms<?"
        args: list[Any] = [lo * 1000, hi * 1000]
        if customer_id is not None:
            sql += " AND customer_id=?"
            args.append(customer_id)
        if customers:
            sql += f" AND customer_id IN ({','.join('?' * len(customers))})"
            args.extend(customers)
        # keyset pages, one finished statement per batch, resumed after the last row (as
        # PostgreSQL's): never a statement left open across the caller's awaits. The caller
        # is an export streamed to a client that reads as slowly as it likes; an open
        # statement would hold its connection's read transaction for that long: on the
        # reader, every other read through it (usage reports, the admin's listings) would
        # see the data as it was when the export began, and the WAL's checkpoints would
        # wait for its read mark (the WAL grows); on the write connection it would read
        # inside quiet materialize slices' transactions (rows they may still roll back)
        by_seq = customer_id is None
        after = " AND seq>?" if by_seq else " AND (at_ms, seq)>(?, ?)"
        order = " ORDER BY seq LIMIT ?" if by_seq else " ORDER BY at_ms, seq LIMIT ?"
        last: tuple[Any, ...] = ()
        while True:
            page_sql, page_args = sql + (after if last else "") + order, (*args, *last, batch)
            if self.reader is not None:
                async with self.reader.execute(page_sql, page_args) as cur:
                    page = list(await cur.fetchall())
            else:
                page = self.store.conn.execute(page_sql, page_args).fetchall()
            if not page:
                return
            recs = [AuditRecord(*r) for r in page]
            yield recs
            if len(page) < batch:
                return
            last = (recs[-1].seq,) if by_seq else (recs[-1].at_ms, recs[-1].seq)

    async def audit_for_request(self, request_id: str) -> list[AuditRecord]:
        return [AuditRecord(*r) for r in self.store.conn.execute(
            f"SELECT {_AUDIT_COLS} FROM audit WHERE request_id=? ORDER BY seq", (request_id,))]

    async def audit_versions(self, start: float, end: float) -> list[str]:
        lo, hi = minute_bounds(start, end)
        return [str(v) for (v,) in self.store.conn.execute(
            "SELECT DISTINCT rules_version FROM audit WHERE at_ms>=? AND at_ms<?",
            (lo * 1000, hi * 1000))]

    async def prune_audit(self, cutoff_ms: int, batch: int = 5000) -> int:
        n: int = self.store.execute_write(lambda c: prune_audit(c, cutoff_ms, batch))
        return n
