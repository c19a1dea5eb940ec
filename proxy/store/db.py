"""Store: the one owner of the SQLite write connection, and the group commit.

Invariants
1. Only this object writes to the database file of a running proxy. It uses the stdlib
   ``sqlite3`` module inline on the event-loop thread (aiosqlite's writer thread starves
   on the GIL when the loop is saturated; see docs/PERFORMANCE.md). Each group commit is a single
   synchronous ``BEGIN IMMEDIATE .. COMMIT`` with no ``await`` inside, so nothing else on
   the loop can interleave with a transaction.
2. ``record()`` never blocks and never touches the disk: it appends to ``_pending``.
   In ``strict`` durability a commit is scheduled with ``call_soon`` the moment rows are
   waiting and no commit is running, so a request waits for about one commit. That commit
   is the cheapest durable write SQLite offers: one append per row to the index-free
   ``journal`` table. ``materialize()`` (every ``MATERIALIZE_INTERVAL``, before every flush
   and every read of usage, at start-up and at shutdown) moves journal rows into ``audit``,
   ``usage_minute`` and ``credit_entries`` and deletes them, in ONE transaction, so a row is
   counted exactly once whether the process dies before, during or after it. In
   ``batched`` a commit runs every ``commit_interval`` and writes the tables directly.
3. A row is either in ``_pending`` (memory) or committed: a failed commit rolls back and
   puts its rows back at the front of ``_pending``. ``fail_mode: closed`` fails the
   waiting requests (they answer 503 / abort, the row itself is kept and retried);
   ``open`` lets them through and only drops rows when the in-memory bound is hit,
   counting every dropped row.
4. WAL + ``synchronous=NORMAL``: a committed transaction survives ``kill -9``.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from proxy import metrics
from proxy.credits.ledger import Entry
from proxy.errors import MeteringUnavailable, StorageError
from proxy.store.schema import MIGRATIONS

log = logging.getLogger("meterproxy.store")

MATERIALIZE_INTERVAL = 0.1
_MATERIALIZE_BATCH = 20_000


@dataclass(slots=True)
class UsageItem:
    meter: str
    quantity: int          # micro-units measured
    credits: int = 0       # micro-credits debited
    billable: int = 0      # micro-units not covered by credits (goes to Stripe)
    flags: str = ""        # e.g. "unreadable", "abandoned"


@dataclass(slots=True)
class UsageRow:
    request_id: str
    at: float              # unix seconds (commit minute is derived from it)
    customer_id: str
    key_id: str
    rule: str
    rules_version: str
    status: int
    items: list[UsageItem]
    future: asyncio.Future[None] | None = field(default=None, repr=False)
    # credit debits made when this request settled: (meter, entry); same transaction
    debits: list[tuple[str, Entry]] = field(default_factory=list)
    method: str = ""
    path: str = ""


# The flat form of a usage row, as journaled and as written to the ledger tables:
# (request_id, at, customer, key, rule, rules_version, status, method, path,
#  [(meter, quantity, credits, billable, flags)], [(meter, grant_id, kind, amount)])
FlatRow = Sequence[Any]


def flatten(r: UsageRow) -> tuple[Any, ...]:
    return (r.request_id, r.at, r.customer_id, r.key_id, r.rule, r.rules_version, r.status,
            r.method, r.path, [(i.meter, i.quantity, i.credits, i.billable, i.flags)
                               for i in r.items],
            [(m, e.grant_id, e.kind, e.amount) for m, e in r.debits])


def encode_row(r: UsageRow) -> bytes:
    return orjson.dumps(flatten(r))


def decode_row(blob: bytes) -> UsageRow:
    rid, at, cid, kid, rule, ver, status, method, path, items, debits = orjson.loads(blob)
    return UsageRow(rid, at, cid, kid, rule, ver, status, [UsageItem(*i) for i in items],
                    debits=[(m, Entry(g, k, a)) for m, g, k, a in debits], method=method,
                    path=path)




def connect(path: Path, synchronous: str = "normal") -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False,
                           timeout=5.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=5000")
    _migrate(conn)
    return conn


def checkpoint(path: Path) -> tuple[int, int, int]:
    """One PASSIVE WAL checkpoint on a connection of its own (run in a worker thread)."""
    c = sqlite3.connect(str(path), timeout=1.0)
    try:
        busy, log_frames, done = c.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return int(busy), int(log_frames), int(done)
    finally:
        c.close()


def _migrate(conn: sqlite3.Connection) -> None:
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    for i, script in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _statements(script):
                conn.execute(stmt)
            conn.execute(f"PRAGMA user_version={i}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def _statements(script: str) -> Iterable[str]:
    buf = ""
    for line in script.splitlines(keepends=True):
        if line.strip().startswith("--"):
            continue
        buf += line
        if sqlite3.complete_statement(buf):
            yield buf.strip()
            buf = ""
    if buf.strip():
        yield buf.strip()


_AUDIT_SQL = ("INSERT INTO audit(request_id, at_ms, customer_id, key_id, rule, rules_version,"
              " status, meter, quantity, credits, billable, flags, method, path)"
              " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)")
_DEBIT_SQL = ("INSERT INTO credit_entries(customer_id, grant_id, kind, amount, request_id, meter,"
              " at_ms) VALUES (?,?,?,?,?,?,?)")
_USAGE_SQL = ("INSERT INTO usage_minute(customer_id, key_id, meter, minute, rules_version, quantity,"
              " requests, billable, covered) VALUES (?,?,?,?,?,?,?,?,?)"
              " ON CONFLICT(customer_id, key_id, meter, minute, rules_version) DO UPDATE SET"
              " quantity = quantity + excluded.quantity, requests = requests + excluded.requests,"
              " billable = billable + excluded.billable, covered = covered + excluded.covered")


class Store:
    """Owns the write connection. Create with ``Store.open`` inside a running loop."""

    def __init__(self, conn: sqlite3.Connection, *, durability: str, commit_interval: float,
                 fail_mode: str, max_pending_rows: int) -> None:
        self.conn = conn
        self.durability = durability
        self.commit_interval = commit_interval
        self.fail_mode = fail_mode
        self.max_pending_rows = max_pending_rows
        self.healthy = True
        self.last_error: str | None = None
        self._pending: list[UsageRow] = []
        self._scheduled = False
        self._closed = False
        self._retry_delay = 0.05
        self._loop = asyncio.get_running_loop()
        self._batch_task: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.path: Path | None = None
        self._journaled = 1     # unknown until the first materialize (recovery at open)

    @classmethod
    def open(cls, path: Path, *, synchronous: str = "normal", durability: str = "strict",
             commit_interval: float = 0.01, fail_mode: str = "closed",
             max_pending_rows: int = 200_000) -> Store:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = connect(path, synchronous)
            # checkpoints (and their fsync) run off the event loop: see checkpoint_forever
            conn.execute("PRAGMA wal_autocheckpoint=0")
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open {path}: {exc}") from exc
        store = cls(conn, durability=durability, commit_interval=commit_interval,
                    fail_mode=fail_mode, max_pending_rows=max_pending_rows)
        store.path = path
        recovered = store.materialize()     # rows a killed process left in the journal
        if recovered:
            log.info("recovered %d journaled usage rows", recovered)
        return store

    # ---- the journal -> tables ------------------------------------------------------

    def materialize(self, limit: int | None = None) -> int:
        """Move journaled rows into the ledger tables (all of them, or about ``limit``);
        returns how many. Each batch is one transaction: the rows are written and deleted
        from the journal atomically."""
        moved = 0
        conn = self.conn
        if self._journaled == 0:
            return 0        # nothing journaled since the last run
        batch_size = _MATERIALIZE_BATCH if limit is None else min(limit, _MATERIALIZE_BATCH)
        while limit is None or moved < limit:
            conn.execute("BEGIN IMMEDIATE")
            try:
                batch = conn.execute("SELECT seq, row FROM journal ORDER BY seq LIMIT ?",
                                     (batch_size,)).fetchall()
                if not batch:
                    conn.execute("COMMIT")
                    self._journaled = 0
                    return moved
                self._apply(conn, [orjson.loads(b) for _, b in batch])
                conn.execute("DELETE FROM journal WHERE seq <= ?", (batch[-1][0],))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            moved += len(batch)
        return moved

    def try_materialize(self) -> bool:
        """``materialize`` for readers: a storage failure is logged, not raised (the rows
        stay journaled; the read just lags)."""
        try:
            self.materialize()
        except sqlite3.Error as exc:
            log.warning("materializing the journal failed (will retry): %s", exc)
            return False
        return True

    async def materialize_forever(self, interval: float = MATERIALIZE_INTERVAL,
                                  slice_rows: int = 256) -> None:
        """Materialize in slices of ``slice_rows``, yielding to the loop between them, so a
        busy second never blocks requests for more than one slice (~2-4 ms)."""
        while True:
            await asyncio.sleep(interval)
            while self._journaled:
                try:
                    if self.materialize(limit=slice_rows) < slice_rows:
                        break
                except sqlite3.Error as exc:
                    log.warning("materializing the journal failed (will retry): %s", exc)
                    break
                await asyncio.sleep(0)

    async def checkpoint_forever(self, interval: float = 1.0) -> None:
        """Copy the WAL back into the database file from a worker thread, so a commit on the
        loop thread never pays for a checkpoint (SQLite's auto-checkpoint would run it inside
        an unlucky COMMIT, stalling every request for milliseconds)."""
        while True:
            await asyncio.sleep(interval)
            if self.path is None:
                continue
            try:
                await asyncio.to_thread(checkpoint, self.path)
            except sqlite3.Error as exc:
                log.warning("WAL checkpoint failed (will retry): %s", exc)

    # ---- hot path -------------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """False when a metered request must be refused up front (fail_mode closed)."""
        return self.healthy or self.fail_mode == "open"

    def record(self, row: UsageRow, wait: bool) -> asyncio.Future[None] | None:
        """Queue a usage row. With ``wait`` the returned future resolves once committed."""
        if wait:
            row.future = self._loop.create_future()
        self._pending.append(row)
        self._idle.clear()
        if not self._scheduled:
            self._scheduled = True
            if self.durability == "strict" and self.healthy:
                self._loop.call_soon(self._commit_now)
            else:
                delay = self.commit_interval if self.healthy else self._retry_delay
                self._loop.call_later(delay, self._commit_now)
        return row.future

    # ---- the group commit -----------------------------------------------------------

    def _commit_now(self) -> None:
        self._scheduled = False
        rows, self._pending = self._pending, []
        if not rows:
            self._idle.set()
            return
        started = time.perf_counter()
        try:
            self._write(rows)
        except sqlite3.Error as exc:
            self._on_failure(rows, exc)
        else:
            self._on_success(rows, time.perf_counter() - started)
        metrics.pending_usage_rows.set(len(self._pending))
        if self._pending and not self._scheduled:
            self._scheduled = True
            if self.healthy and self.durability == "strict":
                self._loop.call_soon(self._commit_now)
            else:
                self._loop.call_later(self.commit_interval if self.healthy else self._retry_delay,
                                      self._commit_now)
        elif not self._pending:
            self._idle.set()

    def _write(self, rows: Sequence[UsageRow]) -> None:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            if self.durability == "strict":
                conn.executemany("INSERT INTO journal(row) VALUES (?)",
                                 [(encode_row(r),) for r in rows])
            else:
                self._apply(conn, [flatten(r) for r in rows])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if self.durability == "strict":
            self._journaled += len(rows)

    @staticmethod
    def _apply(conn: sqlite3.Connection, rows: Sequence[FlatRow]) -> None:
        """Write flat rows into audit, usage_minute and credit_entries (caller owns the tx)."""
        audit: list[tuple[Any, ...]] = []
        debits: list[tuple[Any, ...]] = []
        agg: dict[tuple[str, str, str, int, str], list[int]] = {}
        for rid, at, cid, kid, rule, ver, status, method, path, items, row_debits in rows:
            at_ms = int(at * 1000)
            minute = int(at // 60) * 60
            for meter, gid, kind, amount in row_debits:
                debits.append((cid, gid, kind, amount, rid, meter, at_ms))
            for meter, q, credits, billable, flags in items:
                audit.append((rid, at_ms, cid, kid, rule, ver, status, meter, q, credits,
                              billable, flags, method, path))
                k = (cid, kid, meter, minute, ver)
                a = agg.get(k)
                if a is None:
                    agg[k] = [q, 1, billable, q - billable]
                else:
                    a[0] += q
                    a[1] += 1
                    a[2] += billable
                    a[3] += q - billable
        conn.executemany(_AUDIT_SQL, audit)
        conn.executemany(_USAGE_SQL, [(*k, *v) for k, v in agg.items()])
        if debits:
            conn.executemany(_DEBIT_SQL, debits)

    def _on_success(self, rows: Sequence[UsageRow], seconds: float) -> None:
        if not self.healthy:
            log.warning("storage recovered; %d rows committed", len(rows))
        self.healthy = True
        self.last_error = None
        self._retry_delay = 0.05
        metrics.commits_total.labels("ok").inc()
        metrics.commit_rows.observe(len(rows))
        metrics.commit_seconds.observe(seconds)
        for r in rows:
            if r.future is not None and not r.future.done():
                r.future.set_result(None)

    def _on_failure(self, rows: list[UsageRow], exc: sqlite3.Error) -> None:
        self.healthy = False
        self.last_error = f"{type(exc).__name__}: {exc}"
        self._retry_delay = min(self._retry_delay * 2, 1.0)
        metrics.commits_total.labels("error").inc()
        log.error("group commit of %d rows failed (%s); rows kept in memory", len(rows),
                  self.last_error)
        for r in rows:
            fut, r.future = r.future, None
            if fut is not None and not fut.done():
                if self.fail_mode == "closed":
                    fut.set_exception(MeteringUnavailable(self.last_error))
                else:
                    fut.set_result(None)
        keep = rows + self._pending
        overflow = len(keep) - self.max_pending_rows
        if overflow > 0:
            # only reachable after a long outage; fail_mode closed stops admitting long before
            del keep[:overflow]
            metrics.lost_usage_rows_total.inc(overflow)
            log.error("dropped %d usage rows: storage down and the memory bound was reached",
                      overflow)
        self._pending = keep

    # ---- lifecycle --------------------------------------------------------------------

    async def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every pending row is committed (or the timeout passes)."""
        if self._pending and not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._commit_now)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return self.try_materialize()

    def commit_pending(self) -> None:
        """Synchronous final commit (shutdown)."""
        if self._pending:
            self._commit_now()

    def execute_write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run a small write transaction (admin operations) on the owned connection."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    def data_version(self) -> int:
        return int(self.conn.execute("PRAGMA data_version").fetchone()[0])

    def close(self) -> None:
        self.commit_pending()
        self._closed = True
        try:
            self.materialize()
        except sqlite3.Error as exc:
            log.warning("final materialize failed; the journal keeps the rows: %s", exc)
        try:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("final WAL checkpoint failed: %s", exc)
        self.conn.close()
