"""Store: the one owner of the SQLite write connection, and the group commit.

Invariants
1. Only this object writes to the database file of a running proxy. It uses the stdlib
   ``sqlite3`` module inline on the event-loop thread (aiosqlite's writer thread starves
   on the GIL when the loop is saturated; see docs/PERFORMANCE.md). Each group commit is a single
   synchronous ``BEGIN IMMEDIATE .. COMMIT`` with no ``await`` inside, so nothing else on
   the loop can interleave with a transaction.
2. ``record()`` never waits: it appends to ``_pending``. In ``strict`` durability a commit
   is scheduled with ``call_soon`` the moment rows are waiting and no commit is running, so
   a request waits for about one commit; when no other request is in flight (``alone``: no
   other row could join it), or, with ``synchronous=NORMAL``, while the loop thread has CPU
   to spare (``_measure``, every ``LOAD_WINDOW``: group commits from a window in which it
   wanted ``GROUP_COMMIT_SHARE`` of a CPU or more until one below ``INLINE_COMMIT_SHARE``;
   a commit per request costs little then), that commit runs inside ``record`` (a lock in
   the way is retried on a timer as always, invariant 5), saving the request two loop
   iterations. That commit is the cheapest durable write SQLite offers: ONE row appended
   to the index-free ``journal`` table holding every usage row of the group commit, by a
   single autocommit ``INSERT`` (its own transaction; a fleet member appends one journal
   row per usage row, shipped by seq). ``materialize()`` (every ``MATERIALIZE_INTERVAL``
   in slices ``SLICE_GAP`` apart unless a backlog waits, one short slice whenever the last
   request in flight finishes (``quiet``), before every flush
   and every read of usage, at start-up and at shutdown) moves journal rows into ``audit``,
   ``usage_minute`` and ``credit_entries`` and deletes them, in ONE transaction, so a row is
   counted exactly once whether the process dies before, during or after it. It applies
   the rows this process journaled from memory (``_mirror``, no read-back and decode) when
   the journal up to the newest of them holds exactly the mirrored journal rows (each
   deleted by its seq, nothing else left at or below it; seqs are never reused, across
   processes and restarts: ``_JOURNAL_INSERT``), else it rolls back and reads the
   journal. In ``batched`` a commit runs every ``commit_interval`` and writes the tables
   directly, except in fleet mode (``keep_journal``), where every commit, strict or
   batched, appends one journal row per usage row (the journal is what ships).
3. A row is either in ``_pending`` (memory) or committed: a failed commit rolls back and
   puts its rows back at the front of ``_pending``. ``fail_mode: closed`` fails the
   waiting requests (they answer 503 / abort, the row itself is kept and retried);
   ``open`` lets them through and only drops rows when the in-memory bound is hit,
   counting every dropped row.
4. WAL + ``synchronous=NORMAL``: a committed transaction survives ``kill -9``.
5. No SQLite call on the loop thread ever waits for a lock: the write connection has
   ``busy_timeout=0``. A commit that finds the database locked (another process, or our
   own checkpoint) is retried on a timer (``_BUSY_RETRY``) for up to ``lock_wait``; only
   then does ``fail_mode`` decide. ``/healthz``, unmetered routes and committed work never
   wait for it. A small write (``execute_write``) that finds it locked is rolled back and
   raised as ``DatabaseBusy`` (the one translation: still a ``sqlite3.OperationalError``,
   and a 503 ``storage_unavailable`` on HTTP); ``write`` waits for it on a timer first, up
   to ``lock_wait``, then raises ``StorageUnavailable``.
6. The WAL stays bounded: a PASSIVE checkpoint in a worker thread (``SCHED_IDLE``: only
   in the loop's idle time; a niced thread while the loop is busy or after a pass starved)
   copies the WAL back every ``checkpoint_interval`` without blocking writers; when the WAL
   still holds more than ``wal_truncate_size`` of frames a ``RESTART`` checkpoint in the
   niced maintenance thread (non-blocking: skipped when a reader or writer is in the way;
   meanwhile the group commits hold their rows, for up to ``lock_wait`` as for any lock,
   and the loop keeps serving) copies
   the rest, and the same thread, still inside that hold, makes the first write of the
   WAL's new generation (``_start_wal_over``: its header and that header's fdatasync;
   also after a passive pass that copied every frame back, after which ticks skip their
   pass while nothing is written by anyone: ``_start_over_off_the_loop``), so
   the WAL starts from its beginning, rewriting the file in
   place up to ``WAL_FILE_FACTOR`` x ``wal_truncate_size`` (``journal_size_limit``) and
   cutting a larger one to that; a tick with nothing written since the previous one
   truncates a WAL file over that size to zero bytes and allocates its blocks again up to
   that size (``preallocate_wal``, as ``Store.open`` does), in the niced maintenance thread
   (busy_timeout 0: it never waits holding the write lock; a commit meanwhile is retried
   on the timer, invariant 5). Between those, a read transaction of the maintenance thread
   (the WAL pin, ``_repin``) keeps a mark on the WAL's last frames, so a pass that copies
   every other frame never lets a commit start a new generation; the RESTART, the idle
   TRUNCATE, ``close()`` and a write refused by another connection's lock
   (``_foreign_lock``: another process's RESTART or TRUNCATE waits for the pin holding the
   write lock) end it first. The pin reads no row and writes nothing.
7. The file under the path is the file we write: its (device, inode) is recorded at open
   and compared at every checkpoint tick and every readiness probe. Deleted, replaced or
   corrupt (``PRAGMA quick_check`` every ``integrity_check_interval``, or a corruption
   error from a commit) makes the store *broken*: readiness fails with the reason, no
   further write is attempted (nothing is written into a deleted inode, the checkpoint
   never recreates a file at the path) and ``fail_mode`` decides for metered requests.
8. A row whose request withholds its answer when the commit fails (``UsageRow.withhold``:
   the 503 ``metering_unavailable`` of a buffered response) is dropped on that failure in
   ``fail_mode: closed`` and its credit debits are handed to ``on_withdraw`` (refunded in
   memory; ``CreditService.withdraw`` writes back what of its debt a grant already repaid):
   a 503 that withheld the answer is never billed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson

from proxy import metrics
from proxy.credits.ledger import Entry
from proxy.errors import MeteringUnavailable, StorageError, StorageUnavailable
from proxy.store.memlock import LockedFile, lock_file
from proxy.store.schema import MIGRATIONS
from proxy.tasks import wait_event

log = logging.getLogger("meterproxy.store")
T = TypeVar("T")

MATERIALIZE_INTERVAL = 0.1
_MIRROR_MAX_ROWS = 100_000     # journal rows kept in memory for materialize (then read back)
_MATERIALIZE_BATCH = 20_000
# rows per materialize transaction while serving (whole group commits: a slice may exceed it
# by one commit's rows): ~0.4 ms of blocked loop each. 256 blocked it 1.3-2 ms at a time, the
# largest share of strict's latency tail; below 64 the fixed cost per transaction (its
# COMMIT's WAL frames) grows the cost per row (docs/PERFORMANCE.md, "Strict latency tail")
MATERIALIZE_SLICE = 64
# rows per materialize transaction run the moment no request is in flight (``Store.quiet``):
# ~0.15-0.35 ms in all, in three steps on three loop iterations (``_quiet_slice``); only
# started once that many rows wait (smaller ones cost more per row: the transaction's fixed
# ~60-100 us)
QUIET_SLICE = 16
# ``committed_for``'s poll (seconds)
_COMMITTED_POLL = 0.005
# between two of materialize_forever's slices: a pause while at most CATCH_UP_ROWS rows wait
# in the mirror (the slices of one tick spread out: a request in flight meets one of them,
# not all; 64 rows per 10 ms still moves 6,400 rows/s), none above it (catching up, as
# after a burst or a start with a journal to read back)
SLICE_GAP = 0.01
CATCH_UP_ROWS = 1024
# retry delays of a group commit that found the database locked (seconds; the last repeats)
_BUSY_RETRY = (0.001, 0.002, 0.005, 0.01, 0.02)
# SQLite primary result codes
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_CORRUPT, _SQLITE_NOTADB = 5, 6, 11, 26
# niceness of the fallback checkpoint thread and of quick_check's thread (see
# _idle_thread_priority), and of the checkpoint thread where SCHED_IDLE is not available
MAINTENANCE_NICE = 10
# how long checkpoints stay on the fallback thread after a pass starved (seconds)
STARVED_HOLD = 60.0
# a pass runs on the niced thread, never the SCHED_IDLE one, when the loop thread used more
# than this share of a CPU since the previous pass (it would starve there)
LOOP_BUSY_SHARE = 0.75
# a waited-for strict row commits inside ``record`` (no group commit) while the loop thread
# has CPU to spare: with it a commit per request costs little, and the group commit's two
# loop iterations (its callback, then the waiting task's wake-up) are what a strict request
# waits for in a burst; a saturated loop shares one commit among the rows of an iteration
# (docs/PERFORMANCE.md, "The group commit's two loop iterations"). Sampled every
# LOAD_WINDOW seconds (``Store._measure``): the thread's demand for a CPU, its time on one
# plus its time waiting for one (``/proc/self/task/<tid>/schedstat``: a CPU the sidecar shares
# with the API, a CPU quota or another thread taking it still count as demand), over the
# window's wall time. Group commits from a window at GROUP_COMMIT_SHARE or more until one
# below INLINE_COMMIT_SHARE (the commits' own CPU does not flip the mode every window). The
# window is long enough that a burst of a few tens of milliseconds does not switch it.
GROUP_COMMIT_SHARE = 0.95
INLINE_COMMIT_SHARE = 0.85
LOAD_WINDOW = 0.25


def read_schedstat(path: str) -> float | None:
    """Seconds on a CPU plus seconds runnable and waiting for one, from a thread's
    ``schedstat`` file (nanoseconds on a CPU, nanoseconds waiting, timeslices); None when
    unreadable or when it shows no time on a CPU (a kernel that keeps no scheduler
    statistics writes zeros; the thread read has run). One open and read (~10 us)."""
    try:
        with open(path, "rb") as fh:
            on_cpu, waited = fh.read(128).split()[:2]
        ns = int(on_cpu), int(waited)
    except (OSError, ValueError):
        return None
    return (ns[0] + ns[1]) / 1e9 if ns[0] > 0 else None


def spare_after(spare: bool, share: float) -> bool:
    """The commit mode after a load sample: True (commits inside ``record``) while the loop
    thread wanted less than GROUP_COMMIT_SHARE of a CPU, and, once it wanted that much or
    more, only again below INLINE_COMMIT_SHARE (``spare`` is the mode before the sample)."""
    return share < (GROUP_COMMIT_SHARE if spare else INLINE_COMMIT_SHARE)


# a WAL restart cuts the file to this many times wal_truncate_size (journal_size_limit):
# a load writing less per tick restarts it in place, never freeing and re-allocating blocks
WAL_FILE_FACTOR = 2


def _lower_thread_priority() -> None:
    """The calling thread runs at ``MAINTENANCE_NICE`` (Linux: niceness is per thread).
    Elsewhere, or without permission, it keeps the process's priority."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                       os.getpriority(os.PRIO_PROCESS, 0) + MAINTENANCE_NICE)


def _idle_thread_priority() -> None:
    """The checkpoint thread (PASSIVE passes) runs under ``SCHED_IDLE`` (Linux,
    per thread, no privilege needed): on a CPU it shares with the event loop it runs only in
    the loop's idle time, and a request waking the loop preempts it at once. At
    ``MAINTENANCE_NICE`` it kept the CPU for up to a scheduler slice (~1-3 ms) after the
    loop woke: the largest part of strict's p99 at half the maximum rate after the WAL's
    truncation (docs/PERFORMANCE.md, "The WAL and the maintenance thread"). Elsewhere:
    ``MAINTENANCE_NICE``. A SCHED_IDLE thread gets almost no CPU while the loop keeps its CPU
    busy, and an unprivileged thread cannot leave SCHED_IDLE again, so passes move to a
    second thread at ``MAINTENANCE_NICE`` while the loop is busy or after one starved
    (``Store._maint_pool_now``)."""
    try:
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):
        _lower_thread_priority()


def _code(exc: sqlite3.Error) -> int:
    return int(getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF


def is_busy(exc: sqlite3.Error) -> bool:
    """The database is locked by another connection (SQLITE_BUSY / SQLITE_LOCKED)."""
    return _code(exc) in (_SQLITE_BUSY, _SQLITE_LOCKED)


def is_corrupt(exc: sqlite3.Error) -> bool:
    return _code(exc) in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


class DatabaseBusy(StorageUnavailable, sqlite3.OperationalError):
    """A write transaction found the database locked and was rolled back (nothing written).
    The one translation of SQLITE_BUSY / SQLITE_LOCKED for small writes: still a
    ``sqlite3.OperationalError`` with the original result code (``is_busy`` is true, so
    background callers that catch ``sqlite3.Error`` and retry keep working) and an
    ``HttpError`` (503 ``storage_unavailable`` with ``Retry-After``) that every HTTP surface
    answers through ``proxy.http_errors``."""

    def __init__(self, message: str, code: int = _SQLITE_BUSY) -> None:
        super().__init__(message)
        code = code if code in (_SQLITE_BUSY, _SQLITE_LOCKED) else _SQLITE_BUSY
        self.sqlite_errorcode = code
        self.sqlite_errorname = "SQLITE_BUSY" if code == _SQLITE_BUSY else "SQLITE_LOCKED"


def _busy_message(exc: sqlite3.Error, waited: float | None = None) -> str:
    how = f" for {waited:.1f}s (storage.lock_wait)" if waited is not None else ""
    return f"the database is locked by another process{how}; nothing was written, retry " \
           f"shortly ({exc})"


def _busy(exc: sqlite3.Error) -> DatabaseBusy:
    return DatabaseBusy(_busy_message(exc), _code(exc))


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
    # the request answers 503 (withholding the response) if this row fails to commit:
    # such a row is dropped, never committed later (fail_mode closed)
    withhold: bool = False
    # the row's flat form (``flatten``), when its maker built it along with the row (the
    # settlement's common case: no per-row flattening in the group commit); must equal
    # ``flatten`` of the fields above, and is never changed
    flat: tuple[Any, ...] | None = field(default=None, repr=False, compare=False)


# The flat form of a usage row, as journaled and as written to the ledger tables:
# (request_id, at, customer, key, rule, rules_version, status, method, path,
#  [(meter, quantity, credits, billable, flags)], [(meter, grant_id, kind, amount)])
FlatRow = Sequence[Any]


def flatten(r: UsageRow) -> tuple[Any, ...]:
    if r.flat is not None:
        return r.flat
    return (r.request_id, r.at, r.customer_id, r.key_id, r.rule, r.rules_version, r.status,
            r.method, r.path, [(i.meter, i.quantity, i.credits, i.billable, i.flags)
                               for i in r.items],
            [(m, e.grant_id, e.kind, e.amount) for m, e in r.debits] if r.debits else [])


def encode_row(r: UsageRow) -> str:
    """The journal's form of a row: JSON text (a ``str`` parameter binds without sqlite3's
    adapter lookup, which a ``bytes`` one goes through: ~3k instructions per row)."""
    return orjson.dumps(flatten(r)).decode()


def _encode_flat(flat: tuple[Any, ...]) -> tuple[str]:
    return (orjson.dumps(flat).decode(),)


def journal_rows(blobs: Iterable[bytes | str]) -> list[Any]:
    """The flat rows in journal rows: a fleet member's journal row is one flat row, a group
    commit's (since 2026-11) a list of them (told apart by the first element: a flat row's
    is its request id, a string)."""
    out: list[Any] = []
    for b in blobs:
        v = orjson.loads(b)
        if v and isinstance(v[0], list):
            out += v
        else:
            out.append(v)
    return out


def decode_row(blob: bytes | str) -> UsageRow:
    rid, at, cid, kid, rule, ver, status, method, path, items, debits = orjson.loads(blob)
    return UsageRow(rid, at, cid, kid, rule, ver, status, [UsageItem(*i) for i in items],
                    debits=[(m, Entry(g, k, a)) for m, g, k, a in debits], method=method,
                    path=path)




def connect(path: Path, synchronous: str = "normal", *, create: bool = True,
            busy_timeout_ms: int = 5000) -> sqlite3.Connection:
    """A write connection. The Store's (on the loop thread) uses ``busy_timeout_ms=0``: a
    locked database is an immediate error it retries on a timer, never a blocking wait.
    Other processes (the CLI) may wait."""
    uri = f"{path.resolve().as_uri()}?mode={'rwc' if create else 'rw'}"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False,
                           timeout=busy_timeout_ms / 1000)
    try:
        conn.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
        conn.execute("PRAGMA foreign_keys=ON")
        _migrate(conn)
    except BaseException:
        conn.close()              # e.g. not a database: the file is not held open
        raise
    return conn


def open_existing(path: Path, busy_timeout_ms: int = 1000) -> sqlite3.Connection:
    """A connection to a database file that must already exist (``mode=rw``: never creates
    an empty file at the path). For worker threads: it may wait for locks."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True,
                           isolation_level=None, check_same_thread=False,
                           timeout=busy_timeout_ms / 1000)
    conn.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
    return conn


def file_id(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def preallocate_wal(conn: sqlite3.Connection, wal: Path, size: int) -> bool | None:
    """Allocate the WAL file's disk blocks up to ``size`` bytes (``posix_fallocate``: no
    byte is written, the new range reads as zeros), holding ``conn``'s write lock so no
    commit and no truncate moves the file's end meanwhile. False when the database is
    locked (busy: the caller tries again later); None when nothing was done for a reason a
    retry does not remove soon: the WAL file does not exist, or the file system refused
    (ENOSPC, EOPNOTSUPP: logged).

    Why: on ext4 a commit that appends to the WAL past its allocated blocks reserves new
    ones under the inode's ``i_data_sem``, which a concurrent ``fdatasync`` of the WAL (the
    maintenance thread's checkpoint) holds while its writeback allocates the blocks written
    before: the commit's ``pwrite``, on the event loop, waited 2-14 ms for it, several times
    a second while the WAL grew (``bench/wal_stall.py``). Writes inside allocated blocks
    never wait for it. Zeros past the WAL's last frame are not frames (SQLite ends the WAL
    at the first frame whose salt or checksum does not match), as are the old frames it
    leaves after a restart."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if is_busy(exc):
            return False
        raise
    try:
        try:
            fd = os.open(wal, os.O_RDWR | os.O_CLOEXEC)     # never created here
        except FileNotFoundError:
            return None
        try:
            have = os.fstat(fd).st_size
            if have < size:
                os.posix_fallocate(fd, have, size - have)
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("could not preallocate the WAL %s to %d bytes (%s); it grows as "
                    "written", wal, size, exc)
        return None
    finally:
        conn.execute("ROLLBACK")
    return True


def data_version(conn: sqlite3.Connection) -> int:
    """``PRAGMA data_version`` of ``conn``: moves when another connection commits."""
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


def checkpoint(conn: sqlite3.Connection, mode: str = "PASSIVE") -> tuple[int, int, int]:
    """One WAL checkpoint: (busy, frames in the WAL, frames copied back)."""
    busy, log_frames, done = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
    return int(busy), int(log_frames), int(done)


def quick_check(path: Path, expect: tuple[int, int]) -> str | None:
    """``PRAGMA quick_check`` on a fresh connection (a long-lived one could answer from its
    page cache); None when the file is sound. Run in a worker thread. The file is opened
    only if it is still the one the store writes (``expect``), so a replaced file's foreign
    WAL is never applied to it."""
    if file_id(path) != expect:
        return None     # reported by the identity check
    conn = open_existing(path)
    try:
        rows = conn.execute("PRAGMA quick_check(5)").fetchall()
    except sqlite3.DatabaseError as exc:
        if is_busy(exc):
            return None
        return f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    found = [str(r[0]) for r in rows]
    return None if found == ["ok"] else "; ".join(found)[:500]


def run_write(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], Any]) -> Any:
    """``fn`` in one ``BEGIN IMMEDIATE .. COMMIT``; on any error rolled back and re-raised,
    a locked database as ``DatabaseBusy``."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    except DatabaseBusy:
        raise
    except sqlite3.OperationalError as exc:
        if is_busy(exc):
            raise _busy(exc) from exc
        raise
    return result


def _migrate(conn: sqlite3.Connection) -> None:
    # the version is read again under the write lock: another process (a second replica,
    # the CLI) may have migrated the file while this one waited for it
    while conn.execute("PRAGMA user_version").fetchone()[0] < len(MIGRATIONS):
        conn.execute("BEGIN IMMEDIATE")
        try:
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version < len(MIGRATIONS):
                for stmt in _statements(MIGRATIONS[version]):
                    conn.execute(stmt)
                conn.execute(f"PRAGMA user_version={version + 1}")
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


# a journal row's seq: above every seq the journal ever held (present rows: max(seq);
# deleted ones: journal_seq.hwm, kept by a trigger), so one is never reused, across
# processes and restarts (schema migration 13; the mirror's check relies on it)
_JOURNAL_INSERT = ("INSERT INTO journal(seq, row) VALUES (max(coalesce((SELECT max(seq) FROM"
                   " journal), 0), (SELECT hwm FROM journal_seq WHERE id = 0)) + 1, ?)")

_AUDIT_SQL = ("INSERT INTO audit(request_id, at_ms, customer_id, key_id, rule, rules_version,"
              " status, meter, quantity, credits, billable, flags, method, path)"
              " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)")
# materializing the mirror (Store._materialize_mirrored)
_RAISE_HWM = "UPDATE journal_seq SET hwm = ?1 WHERE id = 0 AND hwm < ?1"
_DELETE_UPTO = "DELETE FROM journal WHERE seq <= ? RETURNING seq"

_AUDIT_COLS = 14
# audit rows per statement when materializing (Store._apply)
_AUDIT_CHUNK = 16
# _AUDIT_ROWS[n]: one INSERT of n audit rows (1 <= n <= _AUDIT_CHUNK)
_AUDIT_ROWS = ("", *(_AUDIT_SQL + ",(?,?,?,?,?,?,?,?,?,?,?,?,?,?)" * (n - 1)
                     for n in range(1, _AUDIT_CHUNK + 1)))
# _AUDIT_SHARED[n]: the same INSERT of n audit rows for rows that share every column but
# their own five (request_id, at_ms, quantity, credits, billable): those bound once for all
# n rows. Parameters column by column (?1..?n the request ids, ?n+1..?2n at_ms, ...), then
# the shared values, so the caller slices them out of the flat audit list without a loop.
_AUDIT_OWN = (0, 1, 8, 9, 10)                       # offsets in an audit row of 14 values
_AUDIT_SHARE = (2, 3, 4, 5, 6, 7, 11, 12, 13)       # customer_id .. meter, flags, method, path


def _audit_shared_sql(n: int) -> str:
    slot = {o: k * n for k, o in enumerate(_AUDIT_OWN)}     # + row index + 1
    fixed = {o: 5 * n + k + 1 for k, o in enumerate(_AUDIT_SHARE)}
    rows = ("(" + ",".join(f"?{slot[o] + j + 1}" if o in slot else f"?{fixed[o]}"
                           for o in range(_AUDIT_COLS)) + ")" for j in range(n))
    return _AUDIT_SQL[:_AUDIT_SQL.index(" VALUES ")] + " VALUES " + ",".join(rows)


_AUDIT_SHARED = ("", *(_audit_shared_sql(n) for n in range(1, _AUDIT_CHUNK + 1)))


def _audit_statement(audit: list[Any], start: int, n: int) -> tuple[str, list[Any]]:
    """The statement and parameters that insert the ``n`` audit rows of the flat ``audit``
    list from ``start``: ``_AUDIT_SHARED[n]`` when the rows share every shared column (the
    values equal and of one type: a value SQLite would store differently is not shared),
    else ``_AUDIT_ROWS[n]``. Either inserts the same rows in the same order."""
    end = start + n * _AUDIT_COLS
    shared: list[Any] = []
    for o in _AUDIT_SHARE:
        col = audit[start + o:end:_AUDIT_COLS]
        v = col[0]
        if col.count(v) != n or (type(v) is not str and len(set(map(type, col))) != 1):
            return _AUDIT_ROWS[n], audit[start:end]     # (equal strs are of one type)
        shared.append(v)
    params: list[Any] = []
    for o in _AUDIT_OWN:
        params += audit[start + o:end:_AUDIT_COLS]
    params += shared
    return _AUDIT_SHARED[n], params


_DEBIT_SQL = ("INSERT INTO credit_entries(customer_id, grant_id, kind, amount, request_id, meter,"
              " at_ms) VALUES (?,NULLIF(?, ''),?,?,?,?,?)")   # a debt entry has no grant
_USAGE_SQL = ("INSERT INTO usage_minute(customer_id, key_id, meter, minute, rules_version, quantity,"
              " requests, billable, covered) VALUES (?,?,?,?,?,?,?,?,?)"
              " ON CONFLICT(customer_id, key_id, meter, minute, rules_version) DO UPDATE SET"
              " quantity = quantity + excluded.quantity, requests = requests + excluded.requests,"
              " billable = billable + excluded.billable, covered = covered + excluded.covered")


async def _outlast(job: asyncio.Future[Any]) -> None:
    """A cancelled tick's wait for its maintenance job, which runs on regardless: until it
    has returned, whatever further cancellations arrive meanwhile (a second one, e.g. the
    shutdown awaiting the tick cancelled in turn, ended the wait at once: the tick's
    ``finally`` then ended the hold with the thread still holding the write lock, or the
    loop's connection in the start-over's open transaction). Bounded by the job."""
    while not job.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait((job,))
    if not job.cancelled():
        job.exception()     # (retrieved: the tick is over)


async def _run_out(job: asyncio.Future[T]) -> T:
    """A maintenance job's result; a cancelled tick ends only once the job has returned
    (``_outlast``): the thread may hold the write lock until then, and the write that
    follows (the final flush) must never find our own lock in its way."""
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        await _outlast(job)
        raise


@dataclass(slots=True)
class _QuietSlice:
    """A quiet slice under way (``Store._quiet_slice``): its rows, their group commits'
    seqs, and the next step (0: BEGIN and the ledger rows, 1: the journal's DELETE, 2:
    COMMIT)."""

    flats: list[tuple[Any, ...]]
    seqs: list[tuple[int]]
    step: int = 0


class Store:
    """Owns the write connection. Create with ``Store.open`` inside a running loop."""

    def __init__(self, conn: sqlite3.Connection, *, durability: str, commit_interval: float,
                 fail_mode: str, max_pending_rows: int, lock_wait: float = 2.0,
                 wal_truncate_size: int = 16 * 1024 * 1024, wal_memory_lock: bool = False) -> None:
        self._conn = conn
        self.durability = durability
        self.commit_interval = commit_interval
        self.fail_mode = fail_mode
        self.max_pending_rows = max_pending_rows
        self.lock_wait = lock_wait
        self.wal_truncate_size = wal_truncate_size
        # the preallocated WAL's pages locked in memory (proxy.store.memlock); set and
        # replaced only where the WAL is preallocated (open, the maintenance thread's
        # TRUNCATE under _maint_lock), closed by close()
        self.wal_memory_lock = wal_memory_lock
        self._wal_lock: LockedFile | None = None
        self._wal_lock_warned = False
        # the WAL's blocks are owed their preallocation (and its lock): a commit held the
        # write lock when open or an idle TRUNCATE tried; each tick retries
        # (``_reallocate_wal``, under a hold) until one gets it
        self._prealloc_owed = False
        self._lock_owed = False         # preallocated under a hold, its lock not yet taken
        self.healthy = True
        self.last_error: str | None = None
        # deleted / replaced / corrupt: permanent for this process (restart after repair)
        self.broken: str | None = None
        self.on_withdraw: Callable[[UsageRow], None] | None = None
        # True when no request other than the caller's can record a row before its commit
        # (set by the composition root: no other request in flight); ``record`` then commits
        # a strict row at once instead of on the next loop iteration
        self.alone: Callable[[], bool] | None = None
        # a strict store under ``synchronous=NORMAL``: its loop's load is sampled (under
        # FULL each commit waits for a disk flush on the loop thread, which its CPU demand
        # does not show, so rows always share one unless alone) ...
        self._spare_rule = durability == "strict" and \
            int(conn.execute("PRAGMA synchronous").fetchone()[0]) < 2
        # ... and while its loop thread has CPU to spare (``_measure``, every LOAD_WINDOW) a
        # strict row that someone waits for commits inside ``record`` too, whether or not
        # other requests are in flight (where ``alone`` is set: a store serving requests);
        # never without the rule
        self._spare_cpu = self._spare_rule
        self._load_at = 0.0             # loop time of the window's start
        self._load_demand = 0.0         # the loop thread's CPU demand until then (seconds)
        self._load_timer: asyncio.TimerHandle | None = None
        self._schedstat: str | None = None      # the loop thread's schedstat file, if kept
        self._quiet_scheduled = False
        # the quiet slice whose transaction is open (``_quiet_slice``), None when none is
        self._slice: _QuietSlice | None = None
        # a RESTART checkpoint running in the maintenance thread holds the write lock:
        # group commits wait for its end instead of meeting the lock (``checkpoint_once``)
        self._restarting = False
        self._restart_idle = threading.Event()
        self._restart_idle.set()
        self._hold_over_event = asyncio.Event()     # set whenever no hold is on (loop side)
        self._hold_over_event.set()
        self._restart_began = 0.0       # loop time the RESTART was handed to its thread
        # the last passive pass copied every frame back (set in its thread): the next
        # write would start the WAL over on the loop (``_start_over_checkpoint``)
        self._pass_complete = False
        # the loop connection is used by the maintenance thread during a start-over
        # (``_start_wal_over``, inside a hold): that and any use by the loop thread exclude
        # each other. The thread holds this lock for the start-over; the loop takes it
        # without waiting (``_claim_conn``, ``data_version``), and once the loop has used
        # the connection during a hold (past ``lock_wait``) no start-over begins in it
        self._conn_lock = threading.Lock()
        self._conn_claimed = False
        self._version = 0       # the last data_version read (answered during a start-over)
        # (total_changes, data_version) right after the last start-over after a passive
        # pass; while both stay, ticks skip their pass (``_start_over_off_the_loop``)
        self._started_over: tuple[int, int] | None = None
        # ends the group commits' hold once the RESTART has held the lock for lock_wait
        self._hold_timer: asyncio.TimerHandle | None = None
        self._pending: list[UsageRow] = []
        self._scheduled = False
        self._closed = False
        self._retry_delay = 0.05
        self._busy_since: float | None = None
        self._busy_tries = 0
        self._loop = asyncio.get_running_loop()
        self._batch_task: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.path: Path | None = None
        self._file_id: tuple[int, int] | None = None
        self._maint: sqlite3.Connection | None = None     # worker-thread checkpoints
        # the WAL pin (``_repin``): a read transaction on one of two connections of the
        # maintenance thread (used only there, under _maint_lock) whose snapshot leaves
        # frames uncopied, so a passive pass that copies every other frame back never lets
        # the next commit start a new WAL generation (and sync its header) on the loop
        self._pin: sqlite3.Connection | None = None
        self._pin_conns: list[sqlite3.Connection] = []
        self._pin_off = False       # close() has begun: no pin any more (``_repin``)
        # the worker thread for checkpoint passes, in the loop's idle time
        self._maint_pool = ThreadPoolExecutor(1, "meterproxy-maint", _idle_thread_priority)
        # while the loop is busy, and after a pass starved there until _starved_until (loop
        # time): passes run on this one (MAINTENANCE_NICE), started on first use
        self._maint_fallback: ThreadPoolExecutor | None = None
        # quick_check: its own niced thread (started on first use): starved under SCHED_IDLE
        # its read transaction would pin the WAL (no restart) for as long as it waited
        self._check_pool: ThreadPoolExecutor | None = None
        self._starved_until = 0.0
        self._cpu_mark = (time.thread_time(), time.monotonic())    # the loop thread's CPU
        self._tick_changes = -1     # conn.total_changes at the previous checkpoint tick
        # bytes per WAL frame (page + frame header): the passive pass's frame count -> size
        self._frame_bytes = int(conn.execute("PRAGMA page_size").fetchone()[0]) + 24
        # held by the worker thread while it uses _maint, and by close(): a connection
        # closed while another thread steps a statement on it can crash the process
        self._maint_lock = threading.Lock()
        self._journaled = 1     # unknown until the first materialize (recovery at open)
        self.keep_journal = False   # fleet mode: the journal is shipped, never materialized
        # The journal's rows in memory, as committed: (last seq, flat rows) per group
        # commit, valid only while ``_mirror_ok`` (the journal holds exactly these rows).
        # ``materialize`` then applies them without reading and decoding the journal back;
        # it checks that its DELETE removed exactly as many rows, else it rolls back and
        # reads the journal instead. Invalid until the journal was seen empty (at open).
        self._mirror: deque[tuple[int, list[tuple[Any, ...]]]] = deque()
        self._mirror_rows = 0
        self._mirror_ok = False
        self._cur = conn.cursor()       # one cursor for the hot statements (no cursor per call)
        self._pending_gauge = 0

    @classmethod
    def open(cls, path: Path, *, synchronous: str = "normal", durability: str = "strict",
             commit_interval: float = 0.01, fail_mode: str = "closed",
             max_pending_rows: int = 200_000, lock_wait: float = 2.0,
             wal_truncate_size: int = 16 * 1024 * 1024, keep_journal: bool = False,
             wal_memory_lock: bool = False) -> Store:
        """``keep_journal`` (fleet mode): every group commit, whatever ``durability``,
        appends one journal row per usage row; the journal is never moved into the local
        tables, it is shipped to the fleet's ledger and pruned with ``prune_journal``.
        ``wal_memory_lock``: the preallocated WAL's pages are locked in memory
        (``_lock_wal``)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        opened: list[sqlite3.Connection] = []     # closed again if opening fails part-way
        try:
            # start-up may wait for a lock (nothing is served yet); the loop never does
            conn = connect(path, synchronous, busy_timeout_ms=5000)
            opened.append(conn)
            ident = file_id(path)
            # checkpoints (and their fsync) run off the event loop: see checkpoint_forever
            conn.execute("PRAGMA wal_autocheckpoint=0")
            # a restart cuts the WAL file only above WAL_FILE_FACTOR x wal_truncate_size:
            # below, it is rewritten in place (see checkpoint_once)
            conn.execute(f"PRAGMA journal_size_limit={WAL_FILE_FACTOR * int(wal_truncate_size)}")
            # busy_timeout 0: its TRUNCATE holds the write lock while it waits for
            # readers; it must give up at once instead (a PASSIVE pass never waits)
            maint = open_existing(path, busy_timeout_ms=0)
            opened.append(maint)
        except (sqlite3.Error, OSError) as exc:
            for c in reversed(opened):
                c.close()
            raise StorageError(f"cannot open {path}: {exc}") from exc
        store = cls(conn, durability=durability, commit_interval=commit_interval,
                    fail_mode=fail_mode, max_pending_rows=max_pending_rows,
                    lock_wait=lock_wait, wal_truncate_size=wal_truncate_size,
                    wal_memory_lock=wal_memory_lock)
        store.path = path
        store._file_id = ident
        store._maint = maint
        store.keep_journal = keep_journal
        try:
            recovered = store.materialize()     # rows a killed process left in the journal
            if keep_journal:
                store._split_group_rows()
        except BaseException:
            maint.close()
            conn.close()
            raise
        if recovered:
            log.info("recovered %d journaled usage rows", recovered)
        try:
            if done := store._preallocate_wal(conn):
                store._lock_wal()
            else:       # busy (False): owed; refused (None): the next idle TRUNCATE tries
                store._prealloc_owed = done is False
        except sqlite3.Error as exc:    # not busy: its BEGIN IMMEDIATE failed (I/O, read-only)
            maint.close()
            conn.close()
            raise StorageError(f"cannot open {path}: {exc}") from exc
        conn.execute("PRAGMA busy_timeout=0")
        store._start_sampling()         # (last: a failed open leaves no timer behind)
        return store

    # ---- file identity, integrity, WAL size ---------------------------------------------

    def check_file(self) -> str | None:
        """The reason the database file can no longer be trusted, or None. Cheap (one
        ``stat``): called every checkpoint tick and by every readiness probe."""
        if self.broken is None and self.path is not None and self._file_id is not None:
            try:
                now = file_id(self.path)
            except FileNotFoundError:
                self._break(f"database file {self.path} was deleted while open; restore it "
                            "and restart (writes stopped so nothing goes to the deleted file)")
            except OSError as exc:
                self._break(f"database file {self.path} cannot be checked: {exc}")
            else:
                if now != self._file_id:
                    self._break(f"database file {self.path} was replaced by another file "
                                "while open; restart to use it (writes stopped)")
        return self.broken

    def stop_metering(self, reason: str) -> None:
        """Refuse metered work from now on, as a broken store does (``storage.fail_mode``
        decides: closed answers 503, open forwards unbilled), with ``reason`` in /readyz:
        fleet mode, when another process claimed this member id (``proxy.fleet.runtime``)."""
        self._break(reason)

    def _break(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
            log.error("storage is broken: %s", reason)
            metrics.storage_broken.set(1)
        self.healthy = False
        self.last_error = reason

    def wal_bytes(self) -> int:
        if self.path is None:
            return 0
        try:
            return os.stat(f"{self.path}-wal").st_size
        except OSError:
            return 0

    async def checkpoint_forever(self, interval: float = 1.0,
                                 integrity_interval: float = 300.0) -> None:
        """Keep the WAL bounded and watch the file. Every ``interval``: the identity check,
        a PASSIVE checkpoint in a worker thread (copies the WAL back without blocking
        writers; SQLite's auto-checkpoint would run it inside an unlucky COMMIT on the loop),
        then, if the WAL is still over ``wal_truncate_size``, a non-blocking RESTART in the
        niced maintenance thread: only the frames written since the passive pass remain to
        copy."""
        next_integrity = self._loop.time() + integrity_interval
        while True:
            await asyncio.sleep(interval)
            if self._closed or self.check_file() is not None:
                continue
            if self.healthy is False and not self._pending and not self._scheduled:
                self._scheduled = True      # nothing queued to prove recovery: probe
                self._loop.call_soon(self._commit_now)
            await self.checkpoint_once(starve_after=interval)
            if integrity_interval > 0 and self._loop.time() >= next_integrity:
                next_integrity = self._loop.time() + integrity_interval
                await self.integrity_check()
            metrics.sqlite_wal_bytes.set(self.wal_bytes())

    def _passive_checkpoint(self, unpin: bool = False) -> int | None:
        """Worker thread: one PASSIVE checkpoint on the maintenance connection (after
        ending the WAL pin when ``unpin``: the pass then copies every frame, before a
        RESTART); the number of frames in the WAL (None when the store is closing). A pass
        that left frames uncopied moves the pin to the WAL's current end (``_repin``)."""
        with self._maint_lock:
            if self._maint is not None:
                if unpin:
                    self._unpin()
                _busy, log_frames, done = checkpoint(self._maint, "PASSIVE")
                if 0 <= done < log_frames:
                    self._repin()
                self._pass_complete = 0 < log_frames == done and self._pin is None
                return log_frames
        return None

    def _repin(self) -> None:
        """Worker thread, under ``_maint_lock``, while frames are left uncopied (after a
        passive pass that left some, or a start-over's write): a read transaction begun
        now on the spare pin connection, then the previous one ended.

        Why: once a passive pass has copied every frame back, SQLite starts the WAL over at
        the next write, which writes a new header and fdatasyncs it (``synchronous=NORMAL``)
        under the write lock: in the loop's commit, or in the hold of a start-over
        (``_start_over_off_the_loop``), where the group commits wait for it (1-46 ms on a
        virtual disk, about once a second at moderate rates: the largest part of strict's
        latency tail; docs/PERFORMANCE.md, "Fewer WAL generations: the WAL pin"). A writer
        starts the WAL over only when no reader holds a read mark on a WAL frame (SQLite's
        ``walRestartLog`` takes read locks 1..N exclusively); a reader that began while
        frames were uncopied holds such a mark, so the next commit appends instead. The pin
        also stops passes at its snapshot: each pass copies the frames up to the previous
        pass's end, one tick late. The WAL then starts over only at a RESTART (the WAL over
        ``wal_truncate_size``) or an idle TRUNCATE, both of which end the pin first
        (``_unpin``). A pin that cannot begin (I/O error) keeps the previous one; nothing
        is read or written through it, and it changes no data: only when the WAL starts
        over."""
        if self.path is None or self._pin_off:
            return
        if not self._pin_conns:
            conns: list[sqlite3.Connection] = []
            try:
                conns += (open_existing(self.path, busy_timeout_ms=0) for _ in range(2))
                # opened by path: only on the file the store writes. (A file replaced since
                # the tick's identity check, a restored backup, was opened, and closing the
                # last connection to it checkpointed our WAL into it.) SQLite reads nothing
                # before the first statement, so the file under the path now is the one
                # these connections opened
                same = file_id(self.path) == self._file_id
            except (sqlite3.Error, OSError) as exc:
                log.warning("could not open the WAL pin's connections: %s", exc)
                same = False
            if not same:
                for c in conns:
                    c.close()
                return      # (deleted or replaced: the tick's identity check breaks the store)
            self._pin_conns = conns
        spare = self._pin_conns[1] if self._pin is self._pin_conns[0] else self._pin_conns[0]
        try:
            spare.execute("BEGIN")
            spare.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        except sqlite3.Error as exc:    # (busy: a moment of another process's recovery)
            (log.info if is_busy(exc) else log.warning)(
                "could not pin the WAL (a pass that copies every frame may let the next "
                "commit start a generation): %s", exc)
            with contextlib.suppress(sqlite3.Error):
                if spare.in_transaction:
                    spare.execute("ROLLBACK")
            return
        self._unpin()
        self._pin = spare

    def _unpin(self) -> None:
        """Worker thread (or close), under ``_maint_lock``: end the WAL pin's read
        transaction, so a RESTART or TRUNCATE can finish and a pass copy every frame."""
        pin, self._pin = self._pin, None
        if pin is not None:
            with contextlib.suppress(sqlite3.Error):
                pin.execute("ROLLBACK")

    def _drop_pin(self) -> None:
        """Worker thread: ``_unpin`` (``_foreign_lock``)."""
        with self._maint_lock:
            self._unpin()

    def _foreign_lock(self) -> None:
        """Loop thread: a write found the database locked by another connection. Another
        process's FULL, RESTART or TRUNCATE checkpoint (an operator's, a backup tool's) takes
        the write lock and then waits, for its whole busy timeout, until every reader has left
        the WAL; the pin never leaves by itself (each move begins the new read transaction
        before ending the old one), so that checkpoint held the write lock for its whole busy
        timeout, then failed, and the group commits met the lock all that time (past
        ``lock_wait``, ``fail_mode`` decided). The pin is ended (in the niced maintenance
        thread: a pass may hold ``_maint_lock``); such a checkpoint then finishes, and no
        pass pins again while it holds the checkpoint lock."""
        if self._pin is not None and not self._closed:
            with contextlib.suppress(RuntimeError):     # the pool is shut down (closing)
                self._loop.run_in_executor(self._niced_pool(), self._drop_pin)

    def _truncate_checkpoint(self) -> int | None:
        """Worker thread: a TRUNCATE checkpoint on the maintenance connection (busy_timeout
        0: a reader or writer in the way makes it give up at once), then the emptied WAL's
        blocks allocated again (``_preallocate_wal``; a commit in between makes it skip: the
        WAL then grows as written); 1 when it could not finish, None when the store is
        closing."""
        with self._maint_lock:
            if self._maint is not None:
                self._unpin()
                busy = checkpoint(self._maint, "TRUNCATE")[0]
                if not busy:
                    # the cut dropped the locked pages: lock the new blocks once allocated
                    self._unlock_wal()
                    self._prealloc_owed = True
                    self._reallocate_wal_locked()
                return busy
        return None

    @property
    def wal_prealloc_bytes(self) -> int:
        """The WAL file's preallocated size: ``journal_size_limit``, the size SQLite cuts
        it back to at a restart, so restarts never free the blocks (``preallocate_wal``)."""
        return WAL_FILE_FACTOR * self.wal_truncate_size

    def _preallocate_wal(self, conn: sqlite3.Connection) -> bool | None:
        if self.path is None:
            return None
        return preallocate_wal(conn, Path(f"{self.path}-wal"), self.wal_prealloc_bytes)

    def _lock_wal(self) -> None:
        """The preallocated WAL's pages locked in memory (``wal_memory_lock``), right after
        ``_preallocate_wal`` allocated them (open; the maintenance thread, under
        ``_maint_lock``): a commit's partial-page ``pwrite`` then never waits on the loop
        for a block read back after the kernel's proactive reclaim evicted it
        (``proxy.store.memlock``). Not permitted (``RLIMIT_MEMLOCK``): one warning, the
        store runs on unlocked; ``meterproxy_wal_locked_bytes`` says which."""
        if not self.wal_memory_lock or self.path is None or self.wal_prealloc_bytes <= 0:
            return
        self._unlock_wal()
        try:
            self._wal_lock = lock_file(Path(f"{self.path}-wal"), self.wal_prealloc_bytes)
        except OSError as exc:
            if not self._wal_lock_warned:
                self._wal_lock_warned = True
                log.warning("could not lock the WAL's %d bytes in memory (%s): commits may "
                            "wait for WAL blocks read back after the kernel reclaimed them; "
                            "give the process CAP_IPC_LOCK or an RLIMIT_MEMLOCK of at least "
                            "that size, or set storage.wal_memory_lock: false "
                            "(docs/resources.md)", self.wal_prealloc_bytes, exc)
            return
        metrics.wal_locked_bytes.inc(self._wal_lock.size)

    def _unlock_wal(self) -> None:
        lock, self._wal_lock = self._wal_lock, None
        if lock is not None:
            lock.close()
            metrics.wal_locked_bytes.dec(lock.size)

    def _reallocate_wal(self) -> int | None:
        """Niced maintenance thread, as the job of a hold (``_restart_off_the_loop``: the
        group commits hold their rows meanwhile instead of meeting our write lock): the
        owed preallocation; its lock follows after the hold (``_lock_owed_wal``). 1 when
        still owed (busy), 0 otherwise, None when the store is closing."""
        with self._maint_lock:
            if self._maint is None:
                return None
            return self._reallocate_wal_locked(lock=False)

    def _lock_owed_wal(self) -> None:
        """Niced maintenance thread: the lock of a preallocation made under a hold."""
        with self._maint_lock:
            if self._maint is not None and self._lock_owed:
                self._lock_owed = False
                self._lock_wal()

    def _reallocate_wal_locked(self, lock: bool = True) -> int:
        """Under ``_maint_lock``: allocate the WAL's blocks if owed, then lock its pages
        (now, or by ``_lock_owed_wal`` when not ``lock``); 1 when a commit holding the write
        lock leaves them owed for the next tick, else 0."""
        if not self._prealloc_owed or self._maint is None:
            return 0
        try:
            done = self._preallocate_wal(self._maint)
        except sqlite3.Error as exc:      # not busy (I/O): tried again next tick
            log.warning("could not preallocate the WAL (will retry): %s", exc)
            return 1
        if done is not False:
            # done, or refused for a reason a retry every tick would only log again (the
            # file system's ENOSPC/EOPNOTSUPP, no WAL file): the next idle TRUNCATE tries
            self._prealloc_owed = False
        if done:
            if lock:
                self._lock_wal()
            else:
                self._lock_owed = True
        return 1 if self._prealloc_owed else 0

    @property
    def wal_locked_bytes(self) -> int:
        """How many bytes of the WAL file are locked in memory now (0: none)."""
        lock = self._wal_lock
        return 0 if lock is None else lock.size

    def _restart_checkpoint(self) -> int | None:
        """Worker thread: a RESTART checkpoint on the maintenance connection (busy_timeout
        0: a reader in the way makes it give up at once), then the WAL's start-over
        (``_start_wal_over``); its busy flag, None when the store is closing. A job of
        ``_restart_off_the_loop``."""
        with self._maint_lock:
            if self._maint is not None:
                self._unpin()
                busy = checkpoint(self._maint, "RESTART")[0]
                if not busy and not self._closed and self._start_wal_over():
                    self._repin()
                return busy
        return None

    def _start_over_checkpoint(self) -> int | None:
        """Worker thread, inside the loop's hold, after a passive pass that copied every
        frame back: the first write after that starts the WAL over (SQLite restarts it
        without a RESTART once no frame is left to copy), so it is made here
        (``_start_wal_over``) rather than in the loop's next commit. 0 when it was made, 1
        when not, None when the store is closing. A job of ``_restart_off_the_loop``."""
        with self._maint_lock:
            if self._maint is not None and not self._closed:
                if not self._start_wal_over():
                    return 1
                self._repin()
                return 0
        return None

    def _start_wal_over(self) -> bool:
        """Worker thread, right after a RESTART and still inside the loop's hold (the group
        commits keep their rows and other writes on the loop connection wait for
        ``_restart_idle``): the first write after a restart starts the WAL over, writing
        its new header and ``fdatasync``-ing it (SQLite, ``synchronous=NORMAL``). In the
        first group commit after every restart that sync stopped the loop for 1-46 ms
        (docs/PERFORMANCE.md, "The WAL header sync off the loop"). It is done here, on the
        loop's own connection (``check_same_thread=False``; SQLite serializes calls on one
        connection): a write on another connection would move the loop connection's
        ``PRAGMA data_version``, which the key cache reads to notice the CLI's changes.
        The write: ``user_version`` (page 1) rewritten with its own value, read and written
        in one IMMEDIATE transaction (a migration by another process in between is not
        undone), no row changed (``total_changes``, the idle tick's test, stays). Locked
        (another process writes) or failed: skipped, the loop's next commit syncs the
        header as before."""
        with self._conn_lock:
            if not self._conn_claimed and not self._closed:
                return self._start_wal_over_locked()
        return False

    def _wal_salts(self) -> bytes | None:
        """The WAL header's salts (bytes 16-23: new ones in every generation), None when
        unreadable."""
        try:
            fd = os.open(f"{self.path}-wal", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            return os.pread(fd, 8, 16)
        except OSError:
            return None
        finally:
            os.close(fd)

    def _start_wal_over_locked(self) -> bool:
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error:
            return False
        try:
            salts = self._wal_salts()
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            conn.execute(f"PRAGMA user_version={int(version)}")
            conn.execute("COMMIT")
            # a generation begun here (not one a commit of the loop began after the pass,
            # which this write then only appended to)
            if salts is None or self._wal_salts() != salts:
                metrics.wal_start_overs_total.inc()
        except sqlite3.Error as exc:
            log.warning("starting the WAL over after a restart failed (the next commit "
                        "does it): %s", exc)
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            return False
        return True

    def _await_restart(self) -> None:
        """A write on the loop connection outside the group commit (an admin or ledger
        write, a direct materialize) while the maintenance thread's RESTART holds the write
        lock: wait for it on the loop thread (at most ``lock_wait``), as it waited for the
        RESTART when that ran on the loop. Rare: the RESTART takes ~1-15 ms once per tick
        at most, and the group commits, the timer's materialization and the quiet slices
        wait for it without blocking instead. One budget per RESTART, counted from its
        start (the group commits' too): a stalled one (its fdatasync) blocks the loop at
        most ``lock_wait`` in all, not ``lock_wait`` per read or write; past it the write
        finds the lock (a read lags, ``write`` retries on the timer)."""
        if self._restarting:
            left = self._restart_began + self.lock_wait - self._loop.time()
            if left > 0:
                self._restart_idle.wait(left)
            if not self._claim_conn():
                raise DatabaseBusy("the database is locked: the WAL's start-over after a "
                                   "restart has the connection; nothing was written")

    def _claim_conn(self) -> bool:
        """Loop thread, during a hold: may the loop use its connection now? False while the
        maintenance thread's start-over has it (a statement of ours would join that
        transaction, or wait on SQLite's connection mutex through its fdatasync): the
        caller treats it as a lock. True otherwise, and then no start-over begins until
        the hold ends."""
        if not self._restarting:
            return True
        if not self._conn_lock.acquire(blocking=False):
            return False
        self._conn_claimed = True
        self._conn_lock.release()
        return True

    def _niced_pool(self) -> ThreadPoolExecutor:
        if self._maint_fallback is None:
            self._maint_fallback = ThreadPoolExecutor(1, "meterproxy-maint-nice",
                                                      _lower_thread_priority)
        return self._maint_fallback

    async def _in_niced_thread(self, fn: Callable[..., T], *args: Any) -> T | None:
        """``fn(*args)`` in the niced maintenance thread, awaited as ``_run_out`` does (a
        cancelled tick ends only once it has returned); None when the pool is shut down
        (closing: nothing ran)."""
        try:
            job = self._loop.run_in_executor(self._niced_pool(), fn, *args)
        except RuntimeError:
            return None
        return await _run_out(job)

    def _maint_pool_now(self, window: float) -> ThreadPoolExecutor:
        """The thread for the next pass (called on the loop thread): the SCHED_IDLE one,
        unless the loop thread used more than ``LOOP_BUSY_SHARE`` of a CPU since the
        previous pass, measured over at least ``window`` seconds (there the pass would get
        almost no CPU, hold the checkpoint lock and keep the WAL from restarting), or a
        pass starved less than ``STARVED_HOLD`` ago: then the ``MAINTENANCE_NICE`` one."""
        cpu, now = time.thread_time(), time.monotonic()
        span = now - self._cpu_mark[1]
        busy = span >= window and (cpu - self._cpu_mark[0]) / span > LOOP_BUSY_SHARE
        self._cpu_mark = (cpu, now)
        if busy or self._loop.time() < self._starved_until:
            return self._niced_pool()
        return self._maint_pool

    def _close_maint(self) -> None:
        with self._maint_lock:     # waits for a checkpoint still running in its thread
            self._pin_off = True
            self._unpin()
            for c in self._pin_conns:
                c.close()
            self._pin_conns = []
            if self._maint is not None:
                self._maint.close()
                self._maint = None
        self._maint_pool.shutdown(wait=False)
        for pool in (self._maint_fallback, self._check_pool):
            if pool is not None:
                pool.shutdown(wait=False)

    async def _restart_off_the_loop(
            self, job: Callable[[], int | None] | None = None) -> int | None:
        """The RESTART in the niced maintenance thread (not the SCHED_IDLE one: it holds
        the write lock). On the loop it waited in ``fdatasync`` for the WAL's writeback and
        the device's cache flush, 1-15 ms with the whole loop stopped (docs/PERFORMANCE.md,
        "The RESTART off the loop"). Meanwhile the group commits hold their rows (no busy
        retry, nothing refused), the loop goes on serving, and at its end one commit takes
        every row that waited."""
        work = self._restart_checkpoint if job is None else job
        self._finish_slice()        # (its write lock would refuse the job)

        def held() -> int | None:       # the thread ends the hold on the loop connection
            try:
                return work()
            finally:
                self._restart_idle.set()

        self._restarting = True
        self._hold_over_event.clear()
        self._conn_claimed = False
        self._restart_began = self._loop.time()
        self._restart_idle.clear()          # (before the thread can set it)
        try:
            restarting = self._loop.run_in_executor(self._niced_pool(), held)
        except RuntimeError:        # the pool is shut down (closing): no RESTART, no hold
            self._restarting = False
            self._hold_over_event.set()
            self._restart_idle.set()
            return None
        try:
            return await asyncio.shield(restarting)
        except asyncio.CancelledError:
            # the thread holds the write lock until it returns (and, in the start-over, the
            # loop's connection): a cancelled tick ends only after it (the final commit that
            # follows must not find our own lock, nor the start-over's transaction)
            await _outlast(restarting)
            raise
        finally:
            if not self._restart_idle.is_set():     # the thread never ran (shut down)
                self._restart_idle.set()
            self._restarting = False
            self._hold_over_event.set()
            if self._hold_timer is not None:
                self._hold_timer.cancel()
                self._hold_timer = None
            if (self._pending or self._scheduled) and not self._closed:
                self._scheduled = True
                self._loop.call_soon(self._commit_now)

    async def _start_over_off_the_loop(self) -> None:
        """The last passive pass copied every frame back: the next write starts the WAL
        over and fdatasyncs its new header; it is made in the maintenance thread, under the
        same hold as a RESTART, not in the loop's next commit. Once it is made, the ticks
        that follow with nothing written by anyone since skip their passive pass
        (``_started_over``): copying the start-over's own frame back would let the loop's
        next commit start yet another generation (and sync its header) on the loop."""
        if await self._restart_off_the_loop(self._start_over_checkpoint) == 0:
            self._started_over = (self._conn.total_changes, self.data_version())

    async def checkpoint_once(self, starve_after: float = 1.0) -> None:
        """One tick of WAL upkeep: the PASSIVE pass in the maintenance thread, then in the
        niced maintenance thread a RESTART when the WAL holds more than
        ``wal_truncate_size`` of frames (``_restart_off_the_loop``), or a TRUNCATE when
        nothing was written since the previous tick. The pass runs on the
        ``MAINTENANCE_NICE`` thread instead of the SCHED_IDLE one while the loop keeps its
        CPU busy (``_maint_pool_now``); a SCHED_IDLE pass still running after
        ``starve_after`` seconds (saturation began during it) moves the next passes there
        for ``STARVED_HOLD`` seconds, so the WAL stays bounded at saturation."""
        if self._maint is None or self.broken is not None:
            return
        if self._started_over is not None:
            mark = (self._conn.total_changes, self.data_version())
            if mark == self._started_over and self.wal_bytes() <= self.wal_prealloc_bytes:
                return      # nothing written since the start-over: its frame stays uncopied
            self._started_over = None
        log_frames: int | None = None
        try:
            pool = self._maint_pool_now(starve_after / 2)
            fut = self._loop.run_in_executor(pool, self._passive_checkpoint)
            if pool is self._maint_pool:
                done, _ = await asyncio.wait((fut,), timeout=starve_after)
                if not done:
                    self._starved_until = self._loop.time() + STARVED_HOLD
                    metrics.wal_checkpoints_total.labels("passive", "starved").inc()
                    log.info("a WAL checkpoint pass waited over %.1f s for CPU; the next "
                             "ones run at nice +%d for %.0f s", starve_after,
                             MAINTENANCE_NICE, STARVED_HOLD)
            log_frames = await fut
            metrics.wal_checkpoints_total.labels("passive", "ok").inc()
        except sqlite3.Error as exc:
            metrics.wal_checkpoints_total.labels("passive", "error").inc()
            if is_corrupt(exc):
                self._break(f"database corrupt: {exc}")
                return
            log.warning("WAL checkpoint failed (will retry): %s", exc)
        if self._closed or self.check_file() is not None:
            return
        if self._prealloc_owed:
            # under a hold, as a RESTART (in the niced thread: it holds the write lock): a
            # group commit meanwhile holds its rows instead of meeting our own lock (which
            # it would take for another process's, ending the WAL pin); the lock after the
            # hold (mlock may read the WAL back from disk)
            if await self._restart_off_the_loop(self._reallocate_wal) is None:
                return
            if self._lock_owed:
                await self._in_niced_thread(self._lock_owed_wal)
        # The WAL's size is the frames it holds (the passive pass counted them; -1: another
        # connection held the checkpoint lock, so the file's size stands in, but only above
        # the preallocated size: below, it is mostly zeros). Over
        # wal_truncate_size: a RESTART copies the frames written since the pass and lets
        # the next commit start the WAL from its beginning. There SQLite cuts the file to
        # journal_size_limit = WAL_FILE_FACTOR x wal_truncate_size; a smaller file is
        # rewritten in place. Cutting it at every restart (to wal_truncate_size, as before)
        # cost the next commit 1.5-1.9 ms of CPU freeing blocks, and the WAL's regrowth
        # allocating them again stalled commits for up to ~6 ms behind the pass's fsync
        # (docs/PERFORMANCE.md, "The WAL and the maintenance thread"). When nothing was
        # written since the previous tick (an idle store) a file over that size is
        # truncated to zero bytes (TRUNCATE: 7-15 ms at 20 MB, off the loop).
        changes = self._conn.total_changes
        idle = changes == self._tick_changes
        self._tick_changes = changes
        try:
            if idle:
                if self.wal_bytes() <= self.wal_prealloc_bytes:
                    if self._pass_complete and log_frames is not None:
                        await self._start_over_off_the_loop()
                    return
                # in the niced maintenance thread (never the SCHED_IDLE one: it holds the
                # write lock, and a burst starting meanwhile would starve it there): the
                # ftruncate of the whole file never holds the loop; a commit meanwhile
                # finds the lock taken and is retried on the timer (invariant 5)
                cut = await self._in_niced_thread(self._truncate_checkpoint)
                if cut is None:
                    return
                busy = cut
            else:
                if log_frames is None or log_frames < 0:
                    # uncounted: the file's size stands in only past its preallocated
                    # size (preallocate_wal: below it, zeros past the last frame count
                    # as bytes too); the next tick's pass counts the frames
                    held = self.wal_bytes()
                    if held <= self.wal_prealloc_bytes:
                        return
                else:
                    held = log_frames * self._frame_bytes
                if held <= self.wal_truncate_size:
                    if self._pass_complete and log_frames is not None:
                        await self._start_over_off_the_loop()
                    return
                # the pinned pass left the last tick's frames: a second pass without the
                # pin copies them outside the hold, so the RESTART copies only what is
                # written meanwhile
                if self._pin is not None and \
                        await self._in_niced_thread(self._passive_checkpoint, True) is None:
                    return
                restarted = await self._restart_off_the_loop()
                if restarted is None:
                    return
                busy = restarted
        except sqlite3.Error as exc:
            metrics.wal_checkpoints_total.labels("truncate", "error").inc()
            if is_corrupt(exc):
                self._break(f"database corrupt: {exc}")
            elif not is_busy(exc):
                log.warning("WAL truncate failed (will retry): %s", exc)
            return
        metrics.wal_checkpoints_total.labels("truncate", "busy" if busy else "ok").inc()

    async def integrity_check(self) -> str | None:
        """``PRAGMA quick_check`` in a worker thread; a problem breaks the store. A closed
        store is not checked (its threads are gone): the answer is what it knew."""
        if self.path is None or self._file_id is None or self.broken is not None \
                or self._closed:
            return self.broken
        try:
            if self._check_pool is None:
                self._check_pool = ThreadPoolExecutor(1, "meterproxy-check",
                                                      _lower_thread_priority)
            problem = await self._loop.run_in_executor(self._check_pool, quick_check,
                                                       self.path, self._file_id)
        except (sqlite3.Error, OSError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if problem is not None:
            self._break(f"database corrupt (quick_check): {problem}")
        return self.broken

    # ---- the journal -> tables ------------------------------------------------------

    def materialize(self, limit: int | None = None) -> int:
        """Move journaled rows into the ledger tables (all of them, or about ``limit``);
        returns how many. Each batch is one transaction: the rows are written and deleted
        from the journal atomically."""
        moved = 0
        conn = self._conn
        if self._journaled == 0 or self.broken is not None or self.keep_journal:
            return 0        # nothing journaled since the last run / never into a lost file
        self._finish_slice()
        self._await_restart()
        batch_size = _MATERIALIZE_BATCH if limit is None else min(limit, _MATERIALIZE_BATCH)
        while self._mirror_ok and (limit is None or moved < limit):
            n = self._materialize_mirrored(batch_size)
            if n is None:
                break       # the mirror did not match the journal: read it back instead
            if n == 0:
                self._journaled = 0
                return moved
            moved += n
        while limit is None or moved < limit:
            conn.execute("BEGIN IMMEDIATE")
            try:
                batch = conn.execute("SELECT seq, row FROM journal ORDER BY seq LIMIT ?",
                                     (batch_size,)).fetchall()
                if not batch:
                    conn.execute("COMMIT")
                    self._journaled = 0
                    self._mirror.clear()        # the journal is empty: mirror it from now on
                    self._mirror_rows = 0
                    self._mirror_ok = True
                    return moved
                flat = journal_rows([b for _, b in batch])
                self._apply(conn, flat)
                conn.execute("DELETE FROM journal WHERE seq <= ?", (batch[-1][0],))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            moved += len(flat)
        return moved

    def _materialize_mirrored(self, batch_size: int) -> int | None:
        """One materialize transaction from the in-memory mirror: the oldest group commits,
        about ``batch_size`` rows. Returns how many rows moved (0: the journal is empty), or
        None when the journal did not hold exactly the mirrored rows (rolled back; the mirror
        is dropped and the journal is read back)."""
        if not self._mirror:
            return 0
        flats, seqs = self._mirror_batch(batch_size)
        cur = self._cur
        cur.execute("BEGIN IMMEDIATE")
        try:
            self._apply(self._conn, flats, cur)
            if not self._delete_journaled(seqs):
                return None
            cur.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                cur.execute("ROLLBACK")
            self._drop_mirror()
            raise
        self._unmirror(seqs, flats)
        return len(flats)

    def _mirror_batch(self, size: int) -> tuple[list[tuple[Any, ...]], list[tuple[int]]]:
        """The oldest mirrored group commits, about ``size`` rows (whole group commits):
        their flat rows and their seqs, ascending (committed in this order)."""
        flats: list[tuple[Any, ...]] = []
        seqs: list[tuple[int]] = []
        for seq, rows in self._mirror:
            flats += rows
            seqs.append((seq,))
            if len(flats) >= size:
                break
        return flats, seqs

    def _delete_journaled(self, seqs: list[tuple[int]]) -> bool:
        """Inside a materialize transaction from the mirror: delete the journal rows of
        ``seqs``. The journal up to the newest of them must have held exactly these rows
        (seqs are never reused): the seqs deleted are theirs. (Counting them took another
        process's row for one of ours that a third had already moved.) The high-water mark
        is raised once first, so its trigger only compares per row. False when it held
        others: rolled back, the mirror dropped (the journal is read back)."""
        cur = self._cur
        cur.execute(_RAISE_HWM, seqs[-1])
        if cur.execute(_DELETE_UPTO, seqs[-1]).fetchall() == seqs:
            return True
        cur.execute("ROLLBACK")
        self._drop_mirror()
        log.warning("the journal held other rows than the ones committed by this process; "
                    "reading it back")
        return False

    def _unmirror(self, seqs: list[tuple[int]], flats: list[tuple[Any, ...]]) -> None:
        """The group commits of ``seqs`` (the mirror's oldest) were moved and committed."""
        for _ in range(len(seqs)):
            self._mirror.popleft()
        self._mirror_rows -= len(flats)

    def _drop_mirror(self) -> None:
        self._mirror.clear()
        self._mirror_rows = 0
        self._mirror_ok = False
        self._journaled = max(self._journaled, 1)

    def _split_group_rows(self) -> None:
        """Fleet mode ships the journal one usage row per seq: the group commit rows a
        single-process run left (killed before it materialized them) become one row per
        usage row, appended in order."""
        def tx(c: sqlite3.Connection) -> None:
            for seq, blob in c.execute("SELECT seq, row FROM journal WHERE row LIKE '[[%'"
                                       " ORDER BY seq").fetchall():
                c.execute("DELETE FROM journal WHERE seq = ?", (seq,))
                c.executemany(_JOURNAL_INSERT,
                              [(orjson.dumps(r).decode(),) for r in orjson.loads(blob)])
        self.execute_write(tx)

    def prune_journal(self, shipped: int) -> int:
        """Fleet mode: delete every journal row up to ``shipped`` (their seq is in the
        fleet's ledger), the newest too: a seq is never reused all the same, the delete
        trigger keeps ``journal_seq.hwm`` at least the deleted seq and a new row takes
        ``max(max(seq), hwm) + 1`` (migration 13). Returns rows deleted."""
        def tx(c: sqlite3.Connection) -> int:
            return c.execute("DELETE FROM journal WHERE seq <= ?", (shipped,)).rowcount
        return int(self.execute_write(tx))

    def renumber_journal(self, seqs: Sequence[int], above: int) -> int:
        """Fleet mode, at start (before any row is journaled): give the journal rows at
        ``seqs`` new seqs above ``above`` (the member id's shipped watermark) and every seq
        the journal held (``max(max(seq), hwm)``, migration 13), in their order: rows this
        journal numbered under seqs another process of its member id shipped
        (``JournalShipping.numbered_elsewhere``), so they ship as new rows instead of being
        taken for those. One transaction; returns the rows moved."""
        def tx(c: sqlite3.Connection) -> int:
            top = int(c.execute("SELECT max(coalesce((SELECT max(seq) FROM journal), 0),"
                                " (SELECT hwm FROM journal_seq WHERE id = 0), ?)",
                                (above,)).fetchone()[0])
            moved = 0
            for i, seq in enumerate(sorted(seqs), 1):
                moved += c.execute("UPDATE journal SET seq = ? WHERE seq = ?",
                                   (top + i, seq)).rowcount
            return moved
        return int(self.execute_write(tx))

    def journal_owner(self) -> str | None:
        """Fleet mode: the member id this journal's rows ship under (None: never recorded,
        a new file or one from before migration 16)."""
        row = self.conn.execute("SELECT member_id FROM journal_owner WHERE id = 0").fetchone()
        return None if row is None else str(row[0])

    def set_journal_owner(self, member_id: str) -> None:
        """Fleet mode: record that this journal's rows ship under ``member_id`` from now on
        (``proxy.fleet.runtime``, at start, once nothing of an earlier id is left to ship)."""
        def tx(c: sqlite3.Connection) -> None:
            c.execute("INSERT INTO journal_owner (id, member_id) VALUES (0, ?) ON CONFLICT (id)"
                      " DO UPDATE SET member_id = excluded.member_id", (member_id,))
        self.execute_write(tx)

    def raise_journal_floor(self, seq: int) -> None:
        """Fleet mode, at start: every new journal row takes a seq above ``seq`` (the shared
        ledger's last shipped seq for this member id). A journal that starts empty under a
        member id that shipped before would otherwise reuse shipped seqs, whose rows the
        shipper skips as shipped and then prunes."""
        def tx(c: sqlite3.Connection) -> None:
            c.execute(_RAISE_HWM, (seq,))
        self.execute_write(tx)

    def journal_rows_after(self, seq: int) -> int:
        """How many journal rows have a seq above ``seq`` (fleet mode: not shipped yet)."""
        return int(self.conn.execute("SELECT count(*) FROM journal WHERE seq > ?",
                                     (seq,)).fetchone()[0])

    def try_materialize(self) -> bool:
        """``materialize`` for readers: a storage failure is logged, not raised (the rows
        stay journaled; the read just lags)."""
        try:
            self.materialize()
        except sqlite3.Error as exc:
            log.warning("materializing the journal failed (will retry): %s", exc)
            return False
        return True

    def pending_for(self, customer_id: str) -> bool:
        """Does the group commit still hold a row of ``customer_id`` (recorded, not yet
        committed)? True without looking while commits fail (rows wait then, up to
        ``max_pending_rows``, and a caller polling would scan them all each time)."""
        return not self.healthy or any(r.customer_id == customer_id for r in self._pending)

    @contextlib.contextmanager
    def grouped(self) -> Iterator[None]:
        """The rows recorded inside the block share one group commit, scheduled at its end:
        ``record`` commits none of them on its own (a strict one alone would commit at
        once, one transaction per row). For rows made in a burst on the loop (the
        settlements that waited for a monetary account's opening)."""
        if self._scheduled:         # a commit is already scheduled: it takes them all
            yield
            return
        self._scheduled = True
        try:
            yield
        finally:
            self._scheduled = False
            if self._pending and not self._closed:
                self._schedule_commit()

    async def committed_for(self, customer_id: str, timeout: float | None = None) -> bool:
        """Wait until the group commit holds no row of ``customer_id`` (``pending_for``):
        every row of it recorded before the call is then committed (a strict store commits
        at once; a batched one within ``commit_interval``). False if it still holds one
        after ``timeout`` seconds (default: two commit intervals, a lock's wait and a
        second; past that, storage is not taking writes)."""
        if timeout is None:
            timeout = 2 * self.commit_interval + self.lock_wait + 1.0
        # polled: the rows are owned by the group commit, which has no per-customer event
        deadline = self._loop.time() + timeout
        while self.pending_for(customer_id):
            if self._loop.time() >= deadline:
                return False
            await asyncio.sleep(_COMMITTED_POLL)
        return True

    async def catch_up(self) -> int:
        """``materialize`` for the readers on the loop (the admin API, the consumer's usage
        page and exports, the flusher's staging, the credit book): every row journaled
        before the call is in the ledger tables when it returns, moved in
        ``MATERIALIZE_SLICE`` transactions with the loop served between them, never in one
        block (at 6,400 rows/s a reader found up to ~1,000 rows waiting: ~5 ms with every
        request stopped). A RESTART in the maintenance thread holding the write lock is
        waited for without blocking the loop (``_await_restart`` would block it), at most
        ``lock_wait`` from its start; past that, a start-over still holding the loop's
        connection is a lock (``DatabaseBusy``), and no statement runs on that connection
        meanwhile. Rows journaled during the call may stay for the next pass. Returns rows
        moved; raises what ``materialize`` raises (``try_catch_up``: logged)."""
        if self._journaled == 0 or self.broken is not None or self.keep_journal \
                or self._closed:
            return 0
        conn = self._conn
        newest: int | None = None
        moved = 0
        while True:
            # no statement on the loop's connection during a hold: the start-over runs its
            # transaction on it in the maintenance thread. Waited for here without blocking,
            # within the RESTART's budget; past it, ``_await_restart`` no longer waits and
            # only claims the connection (DatabaseBusy while the start-over still has it)
            # (a loop: another hold may begin before this task resumes)
            while self._restarting and \
                    (left := self._restart_began + self.lock_wait - self._loop.time()) > 0:
                await wait_event(self._hold_over_event, left)
            self._await_restart()
            self._finish_slice()
            if newest is None:
                newest = conn.execute("SELECT max(seq) FROM journal").fetchone()[0]
                if newest is None:
                    return 0
            n = self.materialize(limit=MATERIALIZE_SLICE)
            moved += n
            if n < MATERIALIZE_SLICE:
                break       # the journal is empty
            oldest = conn.execute("SELECT min(seq) FROM journal").fetchone()[0]
            if oldest is None or oldest > newest:
                break       # every row journaled before the call has moved
            await asyncio.sleep(0)
        return moved

    async def try_catch_up(self) -> bool:
        """``catch_up`` for readers: a storage failure is logged, not raised (the rows stay
        journaled; the read just lags)."""
        try:
            await self.catch_up()
        except sqlite3.Error as exc:
            log.warning("materializing the journal failed (will retry): %s", exc)
            return False
        return True

    async def materialize_forever(self, interval: float = MATERIALIZE_INTERVAL,
                                  slice_rows: int = MATERIALIZE_SLICE) -> None:
        """Materialize in slices of ``slice_rows``, yielding to the loop between them, so a
        busy second never blocks requests for more than one slice (~0.4 ms), and pausing
        ``SLICE_GAP`` between them unless more than ``CATCH_UP_ROWS`` wait."""
        while True:
            await asyncio.sleep(interval)
            while self._journaled:
                if self.broken is not None or self._restarting:
                    break       # (a RESTART in the maintenance thread: the next tick)
                try:
                    if self.materialize(limit=slice_rows) < slice_rows:
                        break
                except sqlite3.Error as exc:
                    if is_corrupt(exc):
                        self._break(f"database corrupt: {exc}")
                    elif not is_busy(exc):      # a foreign lock: simply retried next tick
                        log.warning("materializing the journal failed (will retry): %s", exc)
                    break
                await asyncio.sleep(0 if self._mirror_rows > CATCH_UP_ROWS or
                                    not self._mirror_ok else SLICE_GAP)

    def quiet(self) -> None:
        """The last request in flight has finished (called by the admission step, after its
        response was handed to the transport): one ``QUIET_SLICE`` materialize transaction
        runs on the next loop iteration if that many journaled rows wait. A block of the
        loop delays the requests in flight during it, so it is best run when none is: only
        one that arrives during it waits, and a 16-row slice (~0.15 ms) delays it less than
        a 64-row one (~0.35 ms), for ~1.7x the CPU per row. Under a load that leaves no
        quiet moment, ``materialize_forever``'s cheaper 64-row slices move the journal and
        keep it bounded: at most a tick's rows plus ``CATCH_UP_ROWS`` wait while the mirror
        holds them (above that the slices follow each other at once)."""
        if not self._quiet_scheduled and \
                self._mirror_ok and self._mirror_rows >= QUIET_SLICE and not self._closed:
            self._quiet_scheduled = True
            self._loop.call_soon(self._quiet_slice)

    def _quiet_slice(self) -> None:
        """One ``QUIET_SLICE`` materialize transaction from the mirror, in three steps on
        three loop iterations: ``BEGIN`` and the ledger rows, the journal's ``DELETE``
        (checked, as in ``_materialize_mirrored``), the ``COMMIT`` (~0.1 ms each at most).
        Made in one block, it held up a request that arrived during it for the whole
        slice (~0.3 ms: at one connection one request in sixteen, the p99); now such a
        request waits for one step, is forwarded, and by the time its commit comes the
        slice is over. Anything else that needs the connection meanwhile (a group commit,
        a storage owner, materialize, a checkpoint's hold, close) first finishes the slice
        at once (``_finish_slice``): no statement ever runs inside its transaction, and no
        commit waits longer than behind the one-block slice."""
        self._quiet_scheduled = False
        if self._closed or self.broken is not None or self._restarting or \
                self._slice is not None or self._journaled == 0 or self.keep_journal or \
                not self._mirror_ok:
            return
        flats, seqs = self._mirror_batch(QUIET_SLICE)
        if not seqs:
            return
        try:
            self._cur.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:    # nothing is open: the mirror stands
            if is_corrupt(exc):
                self._break(f"database corrupt: {exc}")
            elif not is_busy(exc):      # busy: a foreign lock (the timer's pass retries)
                log.warning("materializing the journal failed (will retry): %s", exc)
            return
        self._slice = sl = _QuietSlice(flats, seqs)
        self._slice_step(sl)

    def _slice_step(self, sl: _QuietSlice) -> None:
        """A loop callback: ``sl``'s next step, then the next one scheduled (unless
        something finished it meanwhile: a later slice takes its own steps)."""
        if self._slice is sl and not self._step_slice(sl):
            self._loop.call_soon(self._slice_step, sl)

    def _finish_slice(self) -> None:
        """The open quiet slice's remaining steps, now (on the loop thread)."""
        while (sl := self._slice) is not None and not self._step_slice(sl):
            pass

    def _step_slice(self, sl: _QuietSlice) -> bool:
        """One step of ``sl`` (its transaction is open); True when the slice is over
        (committed, found the journal holding other rows, failed, or the store broke
        meanwhile: rolled back)."""
        cur = self._cur
        try:
            if self.broken is not None:     # (deleted, replaced, corrupt: never write)
                raise sqlite3.DatabaseError(self.broken)
            if sl.step == 0:
                sl.step = 1
                self._apply(self._conn, sl.flats, cur)
                return False
            if sl.step == 1:
                if not self._delete_journaled(sl.seqs):
                    self._slice = None
                    return True
                sl.step = 2
                return False
            cur.execute("COMMIT")
        except BaseException as exc:
            self._slice = None
            if self._conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    cur.execute("ROLLBACK")
            if not isinstance(exc, sqlite3.Error):
                self._drop_mirror()
                raise
            if is_corrupt(exc):
                self._break(f"database corrupt: {exc}")
            if self.broken is None:
                log.warning("materializing the journal failed (will retry): %s", exc)
            self._drop_mirror()
            return True
        self._slice = None
        self._unmirror(sl.seqs, sl.flats)
        return True

    # ---- hot path -------------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """False when a metered request must be refused up front (fail_mode closed)."""
        return self.healthy or self.fail_mode == "open"

    def record(self, row: UsageRow, wait: bool) -> asyncio.Future[None] | None:
        """Queue a usage row. With ``wait`` the returned future resolves once committed."""
        # (kept here: a commit that fails takes the future off the row, having set its
        # exception, and the inline commit below has run by the time this returns)
        fut = row.future = self._loop.create_future() if wait else None
        if not self._pending:
            self._idle.clear()      # (idle is only ever set with nothing pending)
        self._pending.append(row)
        if not self._scheduled:
            self._scheduled = True
            if self.durability == "strict" and self.healthy:
                if self._slice is not None:
                    self._finish_slice()    # (a commit now goes after it, not 2 hops later)
                if wait and (alone := self.alone) is not None \
                        and (alone() or self._spare_cpu) \
                        and not self._conn.in_transaction:
                    # no other request can add a row to this group commit, or the loop has
                    # CPU to spare for a commit of its own: commit now, and the caller's
                    # wait ends without the two loop hops (the commit's callback, then the
                    # waiting task's wake-up)
                    self._commit_now()
                else:
                    self._loop.call_soon(self._commit_now)
            else:
                delay = self.commit_interval if self.healthy else self._retry_delay
                self._loop.call_later(delay, self._commit_now)
        elif self._restarting and (hold := self._hold_timer) is not None \
                and len(self._pending) > self.max_pending_rows:
            # the rows the RESTART holds passed the memory bound: the write is tried now
            # (once: it meets the lock, fail_mode decides and the retries take over)
            hold.cancel()
            self._hold_timer = None
            self._loop.call_soon(self._hold_over)
        return fut

    def _start_sampling(self) -> None:
        """Loop thread, at the end of a successful ``open``: the load samples of a strict
        store under ``synchronous=NORMAL`` begin. The demand is read from the loop thread's
        ``/proc/self/task/<tid>/schedstat`` when the kernel keeps it, else the thread's CPU
        time stands for it (a CPU it shares then looks spare: logged). The source is chosen
        here; ``_demand`` only ever falls back from the file to the CPU time, starting a new
        window."""
        if not self._spare_rule or self._closed:
            return
        path = f"/proc/self/task/{threading.get_native_id()}/schedstat"
        if (demand := read_schedstat(path)) is None:    # no file, or zeros: none kept
            log.info("no scheduler statistics for the loop thread (%s): its CPU time stands "
                     "for its demand for a CPU; a CPU it shares with other processes then "
                     "looks spare to the group commit", path)
            demand = time.thread_time()
        else:
            self._schedstat = path
        self._load_at, self._load_demand = self._loop.time(), demand
        self._load_timer = self._loop.call_later(LOAD_WINDOW, self._sample)

    def _demand(self) -> float | None:
        """Seconds the loop thread has run on a CPU or waited, runnable, for one (its
        schedstat); its CPU time where the kernel keeps no schedstat. None once a read of
        the schedstat failed: from then on the CPU time (``_measure`` starts a new window)."""
        if (path := self._schedstat) is None:
            return time.thread_time()
        if (got := read_schedstat(path)) is None:
            self._schedstat = None
            log.warning("the loop thread's scheduler statistics became unreadable (%s): its "
                        "CPU time stands for its demand for a CPU from now on", path)
        return got

    def _sample(self) -> None:
        """The timer, every ``LOAD_WINDOW``: one ``_measure``, then the next."""
        self._load_timer = None
        if self._closed:
            return
        self._measure()
        self._load_timer = self._loop.call_later(LOAD_WINDOW, self._sample)

    def _measure(self) -> None:
        """One load sample: did the loop thread want less than a CPU's
        ``GROUP_COMMIT_SHARE`` since the previous sample (``INLINE_COMMIT_SHARE`` once it
        wanted more)? A span under half a window (a late timer right after a sample) keeps
        the previous answer."""
        now = self._loop.time()
        if (span := now - self._load_at) >= LOAD_WINDOW / 2:
            if (demand := self._demand()) is None:      # the source changed: a new window
                self._load_at, self._load_demand = now, time.thread_time()
            else:
                self._spare_cpu = spare_after(self._spare_cpu, (demand - self._load_demand) / span)
                self._load_at, self._load_demand = now, demand

    # ---- the group commit -----------------------------------------------------------

    def _commit_now(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        if self._slice is not None:
            self._finish_slice()    # (its transaction would take in this commit's write)
        if self._restarting and len(self._pending) <= self.max_pending_rows:
            held = self._loop.time() - self._restart_began
            if held < self.lock_wait:
                # the maintenance thread's RESTART holds the write lock: the rows stay
                # pending (no busy retry, the loop is not blocked) and its end schedules
                # this commit; past max_pending_rows the write is tried, meets the lock and
                # fail_mode decides
                self._scheduled = True
                if self._hold_timer is None:
                    self._hold_timer = self._loop.call_later(self.lock_wait - held,
                                                             self._hold_over)
                return
        rows, self._pending = self._pending, []
        if not rows and self.healthy:
            self._idle.set()
            return
        if self._restarting and self._busy_since is None:
            # the RESTART has held the write lock for lock_wait (a stalled fdatasync), or
            # past max_pending_rows: like any lock (invariant 5), the write is tried and,
            # still locked, fail_mode decides at once
            self._busy_since = self._restart_began
            self._busy_tries = 0
            metrics.commits_total.labels("locked").inc()
        started = time.perf_counter()
        try:
            if self.broken is not None:
                raise sqlite3.DatabaseError(self.broken)
            if self._restarting and not self._claim_conn():
                # the start-over has the connection: as a lock (invariant 5)
                raise DatabaseBusy("the WAL's start-over after a restart has the connection")
            if rows:
                self._write(rows)
            else:
                self._probe()
        except sqlite3.Error as exc:
            if is_busy(exc) and self._wait_for_lock(rows):
                return
            if is_corrupt(exc):
                self._break(f"database corrupt: {exc}")
            self._busy_since = None
            self._on_failure(rows, exc)
        else:
            self._busy_since = None
            self._on_success(rows, time.perf_counter() - started)
        if (n := len(self._pending)) != self._pending_gauge:
            self._pending_gauge = n         # (a Gauge takes a lock per set: only on changes)
            metrics.pending_usage_rows.set(n)
        if (self._pending or not self.healthy) and not self._scheduled and self.broken is None:
            # unhealthy with nothing queued: an empty transaction probes for recovery, so
            # admission (``accepting``) reopens once the database takes writes again
            self._schedule_commit()
        elif not self._pending:
            self._idle.set()

    def _schedule_commit(self) -> None:
        """The next group commit, as ``record`` schedules it when it does not commit at
        once: on the next loop iteration for a healthy strict store, else after
        ``commit_interval`` (batched) or the retry delay (unhealthy)."""
        self._scheduled = True
        if self.healthy and self.durability == "strict":
            self._loop.call_soon(self._commit_now)
        else:
            self._loop.call_later(self.commit_interval if self.healthy else self._retry_delay,
                                  self._commit_now)

    def _hold_over(self) -> None:
        """The RESTART still holds the write lock ``lock_wait`` after it began, or the rows
        it holds passed ``max_pending_rows``: they are tried now (``_commit_now``: fail_mode
        decides if the lock is still there)."""
        self._hold_timer = None
        if self._restarting and self._scheduled and not self._closed:
            self._commit_now()

    def _wait_for_lock(self, rows: list[UsageRow]) -> bool:
        """Another connection holds the write lock: put the rows back and retry on a timer
        (the loop keeps serving) until ``lock_wait`` has passed since the first refusal.
        False when the wait is over (the caller treats it as a failed commit)."""
        now = self._loop.time()
        if len(rows) + len(self._pending) > self.max_pending_rows:
            return False    # the memory bound: fail_mode applies at once, not after lock_wait
        if self._busy_since is None:
            self._busy_since = now
            self._busy_tries = 0
            metrics.commits_total.labels("locked").inc()
            self._foreign_lock()
        elif now - self._busy_since >= self.lock_wait or not self.healthy:
            return False
        self._pending[:0] = rows
        delay = _BUSY_RETRY[min(self._busy_tries, len(_BUSY_RETRY) - 1)]
        self._busy_tries += 1
        self._scheduled = True
        self._loop.call_later(delay, self._commit_now)
        return True

    def _probe(self) -> None:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("COMMIT")

    def _write(self, rows: Sequence[UsageRow]) -> None:
        cur = self._cur
        strict = self.durability == "strict"
        flats = [r.flat if r.flat is not None else flatten(r) for r in rows]
        if strict and not self.keep_journal:
            # one journal row for the whole group commit: one insert, one bound value, and
            # no BEGIN/COMMIT around it (a single statement in autocommit mode is its own
            # transaction: all or nothing, committed when it returns)
            if self._conn.in_transaction:    # it would join that one, not commit: never
                raise sqlite3.OperationalError("cannot start a transaction within a transaction")
            cur.execute(_JOURNAL_INSERT, (orjson.dumps(flats).decode(),))
            self._journaled += len(rows)
            if self._mirror_ok:
                if self._mirror_rows + len(flats) > _MIRROR_MAX_ROWS:
                    self._drop_mirror()     # materializing lags far behind: read it back
                else:
                    last = cur.lastrowid
                    assert last is not None
                    self._mirror.append((last, flats))
                    self._mirror_rows += len(flats)
            return
        cur.execute("BEGIN IMMEDIATE")
        try:
            if self.keep_journal:
                # fleet mode, strict or batched (batched only changes when this commit
                # runs): one journal row per usage row, shipped and pruned by seq; never
                # the local ledger tables, which nothing ships
                cur.executemany(_JOURNAL_INSERT, map(_encode_flat, flats))
            else:
                self._apply(self._conn, flats, cur)
            cur.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                cur.execute("ROLLBACK")
            raise
        if self.keep_journal:
            self._journaled += len(rows)

    @staticmethod
    def _apply(conn: sqlite3.Connection, rows: Sequence[FlatRow],
               cur: sqlite3.Cursor | None = None) -> None:
        """Write flat rows into audit, usage_minute and credit_entries (caller owns the tx)."""
        audit: list[Any] = []       # the audit rows' values, _AUDIT_COLS a row, in order
        debits: list[tuple[Any, ...]] = []
        agg: dict[tuple[str, str, str, int, str], list[int]] = {}
        for rid, at, cid, kid, rule, ver, status, method, path, items, row_debits in rows:
            at_ms = int(at * 1000)
            minute = int(at // 60) * 60
            for meter, gid, kind, amount in row_debits:
                debits.append((cid, gid, kind, amount, rid, meter, at_ms))
            for meter, q, credits, billable, flags in items:
                audit += (rid, at_ms, cid, kid, rule, ver, status, meter, q, credits,
                          billable, flags, method, path)
                k = (cid, kid, meter, minute, ver)
                a = agg.get(k)
                if a is None:
                    agg[k] = [q, 1, billable, q - billable]
                else:
                    a[0] += q
                    a[1] += 1
                    a[2] += billable
                    a[3] += q - billable
        c = conn.cursor() if cur is None else cur
        # the audit rows in statements of _AUDIT_CHUNK rows, then one for the rest: the same
        # rows in the same order (so the same seqs) as one INSERT per row, with one
        # statement execution (cursor opening, VDBE set-up and halt) per chunk; a chunk whose
        # rows share their customer, key, rule, version, status, meter, flags, method and
        # path binds those once (_audit_statement)
        chunk = _AUDIT_CHUNK * _AUDIT_COLS
        for i in range(0, len(audit), chunk):
            c.execute(*_audit_statement(audit, i, min(len(audit) - i, chunk) // _AUDIT_COLS))
        c.executemany(_USAGE_SQL, [(*k, *v) for k, v in agg.items()])
        if debits:
            c.executemany(_DEBIT_SQL, debits)

    def _on_success(self, rows: Sequence[UsageRow], seconds: float) -> None:
        if not self.healthy:
            log.warning("storage recovered; %d rows committed", len(rows))
        self.healthy = True
        self.last_error = None
        self._retry_delay = 0.05
        if not rows:
            return      # a recovery probe
        metrics.commits_ok.inc()
        metrics.commit_rows.observe(len(rows))
        metrics.commit_seconds.observe(seconds)
        for r in rows:
            if (f := r.future) is not None and not f.done():
                f.set_result(None)

    def _on_failure(self, rows: list[UsageRow], exc: sqlite3.Error) -> None:
        self.healthy = False
        self.last_error = self.broken or f"{type(exc).__name__}: {exc}"
        self._retry_delay = min(self._retry_delay * 2, 1.0)
        metrics.commits_total.labels("error").inc()
        if rows:
            log.error("group commit of %d rows failed (%s); rows kept in memory", len(rows),
                      self.last_error)
        keep: list[UsageRow] = []
        withdrawn = 0
        for r in rows:
            fut, r.future = r.future, None
            if fut is not None and not fut.done():
                if self.fail_mode == "closed":
                    fut.set_exception(MeteringUnavailable(self.last_error))
                    if r.withhold:
                        # the consumer gets 503 instead of the answer: never bill it later
                        withdrawn += 1
                        if self.on_withdraw is not None:
                            self.on_withdraw(r)
                        continue
                else:
                    fut.set_result(None)
            keep.append(r)
        if withdrawn:
            metrics.withdrawn_usage_rows_total.inc(withdrawn)
        keep += self._pending
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
        if not await wait_event(self._idle, timeout):
            return False
        return self.try_materialize()

    def commit_pending(self) -> None:
        """Synchronous final commit (shutdown: nothing is served any more, so this one may
        wait up to ``lock_wait`` for a lock)."""
        if self._pending and not self._closed:
            try:
                self._await_restart()
            except DatabaseBusy:
                return      # the start-over still has the connection: close() counts them
            self._restarting = False        # (its end is awaited: this commit may run)
            self._hold_over_event.set()
            self._conn.execute(f"PRAGMA busy_timeout={int(self.lock_wait * 1000)}")
            try:
                self._commit_now()
            finally:
                self._conn.execute("PRAGMA busy_timeout=0")

    def execute_write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run a small write transaction on the owned connection. Never waits for a lock
        (``busy_timeout`` 0): a foreign lock is an immediate ``DatabaseBusy`` (rolled back,
        nothing written) for the caller to report or retry; ``write`` waits for it."""
        if self.broken is not None:
            raise sqlite3.OperationalError(self.broken)
        self._finish_slice()
        self._await_restart()
        return run_write(self._conn, fn)

    async def write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """``execute_write`` that waits for a foreign lock the way a group commit does:
        retried on a timer (``_BUSY_RETRY``; the loop keeps serving) for up to ``lock_wait``,
        then ``StorageUnavailable`` (503 ``storage_unavailable`` on HTTP; not a
        ``sqlite3.Error``: callers catch it as ``StorageUnavailable``, which PostgreSQL's
        ``PgUnavailable`` also is). Without a lock in the way it runs at once, with no
        ``await`` before the transaction."""
        started: float | None = None
        tries = 0
        while True:
            try:
                return self.execute_write(fn)
            except DatabaseBusy as exc:
                now = self._loop.time()
                if started is None:
                    started = now
                    if not self._restarting:    # (not our own RESTART or start-over)
                        self._foreign_lock()
                if now - started >= self.lock_wait or self._closed:
                    raise StorageUnavailable(_busy_message(exc, now - started)) from exc
            await asyncio.sleep(_BUSY_RETRY[min(tries, len(_BUSY_RETRY) - 1)])
            tries += 1

    @property
    def conn(self) -> sqlite3.Connection:
        """The write connection, for the storage owners' reads and writes on the loop
        thread: a quiet slice whose transaction is open is finished first (a statement
        would otherwise run inside it)."""
        if self._slice is not None:
            self._finish_slice()
        return self._conn

    def data_version(self) -> int:
        """``PRAGMA data_version`` of the loop connection (the key cache's poll). During a
        start-over in the maintenance thread: the last answer, without waiting for the
        connection (the next poll reads it)."""
        gated = self._restarting
        if gated and not self._conn_lock.acquire(blocking=False):
            return self._version
        try:
            self._version = data_version(self._conn)
        finally:
            if gated:
                self._conn_lock.release()
        return self._version

    def close(self) -> None:
        try:
            self._close()
        finally:
            self._unlock_wal()      # (after the connections: no commit meets an evicted page)
            if (timer := self._load_timer) is not None:
                timer.cancel()
                self._load_timer = None

    def _close(self) -> None:
        if self._closed:
            return          # closed already (a second close, e.g. a shutdown's finally)
        self._finish_slice()
        if self.check_file() is not None:
            if self._pending:
                metrics.lost_usage_rows_total.inc(len(self._pending))
                log.error("%d usage rows not committed at shutdown: %s", len(self._pending),
                          self.broken)
            self._pending = []
            self._closed = True
            self._close_maint()         # (waits for a maintenance job: it may use conn)
            self._conn.close()
            return
        # a RESTART or start-over still running in the maintenance thread may be using the
        # connection: its end first (shutdown may wait for it: one fdatasync)
        self._restart_idle.wait()
        # no WAL pin from here on: another process's checkpoint waiting for it (holding the
        # write lock) would make the final commit below wait lock_wait and fail, and the
        # final TRUNCATE would wait for it too; a pass still running (a cancelled tick's)
        # does not pin again (_pin_off)
        with self._maint_lock:
            self._pin_off = True
            self._unpin()
        self.commit_pending()
        if self._pending:
            metrics.lost_usage_rows_total.inc(len(self._pending))
            log.error("%d usage rows could not be committed at shutdown (%s)",
                      len(self._pending), self.last_error)
            self._pending = []
        self._closed = True
        # shutdown may wait for a lock: nothing is served any more
        self._conn.execute(f"PRAGMA busy_timeout={int(max(self.lock_wait, 1.0) * 1000)}")
        try:
            self.materialize()
        except sqlite3.Error as exc:
            log.warning("final materialize failed; the journal keeps the rows: %s", exc)
        try:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("final WAL checkpoint failed: %s", exc)
        self._close_maint()
        self._conn.close()
