"""The Store's journal: strict commits append to it; materialize moves rows into the ledger
exactly once, including after a crash that left rows behind."""

from __future__ import annotations

import asyncio
import itertools
import os
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import metrics
from proxy.credits.ledger import Entry
from proxy.store.db import (
    CATCH_UP_ROWS,
    GROUP_COMMIT_SHARE,
    INLINE_COMMIT_SHARE,
    LOAD_WINDOW,
    MAINTENANCE_NICE,
    MATERIALIZE_SLICE,
    QUIET_SLICE,
    SLICE_GAP,
    WAL_FILE_FACTOR,
    Store,
    UsageItem,
    UsageRow,
    decode_row,
    encode_row,
    journal_rows,
    read_schedstat,
    spare_after,
)
from tests.helpers import wait_until


def _row(i: int) -> UsageRow:
    return UsageRow(f"r{i}", time.time(), "c", "k", "rule", "v1", 200,
                    [UsageItem("m", 1_000_000 + i, 0, 1_000_000 + i, "")], method="GET",
                    path="/x")


def _migrate_to(conn: sqlite3.Connection, version: int) -> None:
    """The schema as an older version left it: migrations 1 to ``version`` on ``conn``."""
    from proxy.store.db import _statements
    from proxy.store.schema import MIGRATIONS
    for i, script in enumerate(MIGRATIONS[:version], start=1):
        for stmt in _statements(script):
            conn.execute(stmt)
        conn.execute(f"PRAGMA user_version={i}")


def _commit_each(store: Store, ids: Iterable[int]) -> None:
    """``_row(i)`` for each id, each in a group commit of its own (one journal frame each)."""
    for i in ids:
        store.record(_row(i), wait=False)
        store._commit_now()


@given(st.text(max_size=20), st.integers(0, 10**15), st.lists(st.integers(0, 10**9), max_size=3))
def test_journal_encoding_round_trips(rid: str, q: int, debits: list[int]) -> None:
    r = UsageRow(rid, 1234.5, "c", "k", "rule", "v", 201, [UsageItem("m", q, 1, q, "unreadable")],
                 debits=[("m", Entry(f"g{i}", "debit", d)) for i, d in enumerate(debits)],
                 method="POST", path="/p")
    back = decode_row(encode_row(r))
    assert back == r


async def test_rows_left_in_the_journal_are_recovered_exactly_once(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    store = Store.open(db)
    for i in range(5):
        store.record(_row(i), wait=True)
    await store.drain()            # commits to the journal, then materializes
    for i in range(5, 8):
        store.record(_row(i), wait=True)
    store._commit_now()            # committed to the journal, not yet materialized ...
    store.conn.close()             # ... and the process "dies"
    with sqlite3.connect(db) as c:      # one journal row holds the group commit's 3 rows
        assert c.execute("SELECT COUNT(*) FROM journal").fetchone()[0] == 1
    again = Store.open(db)          # recovery at open
    again.materialize()
    again.close()
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT COUNT(*) FROM journal").fetchone()[0] == 0
        rows = c.execute("SELECT request_id FROM audit ORDER BY seq").fetchall()
        (total,) = c.execute("SELECT SUM(quantity) FROM usage_minute").fetchone()
    assert [r[0] for r in rows] == [f"r{i}" for i in range(8)]
    assert total == sum(1_000_000 + i for i in range(8))


def _ledger(db: Path) -> tuple[list[str], int]:
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT COUNT(*) FROM journal").fetchone()[0] == 0
        ids = [r[0] for r in c.execute("SELECT request_id FROM audit ORDER BY seq")]
        (total,) = c.execute("SELECT SUM(quantity) FROM usage_minute").fetchone()
    return ids, total


async def test_materialize_applies_what_this_process_journaled_without_reading_it_back(
        tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    store = Store.open(db)
    for i in range(4):
        store.record(_row(i), wait=True)
    store._commit_now()
    store.record(_row(4), wait=True)
    store._commit_now()
    # the rows it moves are the ones in memory (the journal's text is not decoded again):
    # proven by spoiling the journal's copy, which a read-back would apply instead
    store.conn.execute("UPDATE journal SET row = '[]'")
    assert store.materialize() == 5
    store.close()
    assert _ledger(db) == ([f"r{i}" for i in range(5)], sum(1_000_000 + i for i in range(5)))


async def test_a_journal_row_this_process_did_not_write_is_still_moved_exactly_once(
        tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    store = Store.open(db)
    store.record(_row(0), wait=True)
    store._commit_now()
    # a row appears in the journal behind the store's back (the old one-row-per-request
    # form, as bytes): the in-memory copy no longer matches, so the journal is read back
    store.conn.execute("INSERT INTO journal(row) VALUES (?)", (encode_row(_row(1)).encode(),))
    store.record(_row(2), wait=True)
    store._commit_now()
    assert store.materialize() == 3
    store.record(_row(3), wait=True)     # the journal was seen empty: mirrored again
    store._commit_now()
    assert store._mirror_ok
    store.close()
    assert _ledger(db) == ([f"r{i}" for i in range(4)], sum(1_000_000 + i for i in range(4)))


async def test_a_fleet_member_ships_group_commit_rows_one_usage_row_per_seq(
        tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    store = Store.open(db)
    for i in range(3):
        store.record(_row(i), wait=True)
    store._commit_now()
    store.conn.close()              # killed before materializing, restarted as a fleet member
    member = Store.open(db, keep_journal=True)
    rows = member.conn.execute("SELECT row FROM journal ORDER BY seq").fetchall()
    member.close()
    assert [decode_row(r).request_id for (r,) in rows] == ["r0", "r1", "r2"]


async def test_a_fleet_journal_pruned_of_every_shipped_row_never_reuses_a_seq(
        tmp_path: Path) -> None:
    """``prune_journal`` deletes the newest shipped row too: ``journal_seq.hwm`` (migration
    13) is what keeps a seq from being reused, across restarts as well. (It used to keep the
    newest row, which a process under another member id then shipped again.)"""
    db = tmp_path / "s.db"
    member = Store.open(db, keep_journal=True)
    _commit_each(member, range(3))
    assert member.prune_journal(3) == 3
    assert member.journal_rows_after(0) == 0
    _commit_each(member, [3])
    assert [s for (s,) in member.conn.execute("SELECT seq FROM journal")] == [4]
    assert member.prune_journal(4) == 1
    member.close()
    member = Store.open(db, keep_journal=True)
    _commit_each(member, [4])
    seqs = [s for (s,) in member.conn.execute("SELECT seq FROM journal")]
    member.close()
    assert seqs == [5]


async def test_a_journal_records_the_member_id_its_rows_ship_under(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    member = Store.open(db, keep_journal=True)
    assert member.journal_owner() is None          # a new file: nobody journaled yet
    member.set_journal_owner("host-a:8080")
    member.close()
    member = Store.open(db, keep_journal=True)
    assert member.journal_owner() == "host-a:8080"
    member.set_journal_owner("host-b:8080")
    owner = member.journal_owner()
    member.close()
    assert owner == "host-b:8080"


def _unit_row(i: int) -> UsageRow:
    return UsageRow(f"r{i}", time.time(), "c", "k", "rule", "v1", 200,
                    [UsageItem("m", 1_000_000, 0, 1_000_000, "")], method="GET", path="/x")


async def test_a_journal_seq_is_never_reused_so_the_mirror_cannot_take_another_s_row(
        tmp_path: Path) -> None:
    """Two Stores on one file (a rolling restart's new process opening while the old one
    drains): the new one's recovery empties the journal. Were seq 1 reused for the old
    one's next group commit, its in-memory mirror would delete that row as its own
    already-moved chunk (one row deleted, one expected): the old chunk applied twice and
    the new rows lost. With seqs never reused the check sees the difference and reads back."""
    db = tmp_path / "s.db"
    a = Store.open(db)
    for i in range(300):                      # one group commit of 300 rows
        a.record(_unit_row(i), wait=False)
    a._commit_now()
    b = Store.open(db)                        # recovery moves A's 300 rows; journal empty
    b.conn.close()
    for i in range(300, 310):                 # A's next group commit
        a.record(_unit_row(i), wait=False)
    a._commit_now()
    a.materialize(limit=256)
    a.materialize()
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT COUNT(*) FROM journal").fetchone()[0] == 0
        assert c.execute("SELECT SUM(quantity) FROM usage_minute").fetchone()[0] == \
            310 * 1_000_000
        assert {r[0] for r in c.execute("SELECT request_id FROM audit")} == \
            {f"r{i}" for i in range(310)}
        # both seqs were deleted: the high-water mark covers them (migration 13)
        assert c.execute("SELECT hwm FROM journal_seq").fetchone()[0] == 2


def _wal_frames(db: Path) -> int:
    """Frames in the WAL now (a passive checkpoint on a fresh connection counts them)."""
    with sqlite3.connect(db) as c:
        return int(c.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1])


def _maint_threads(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


async def test_checkpoints_run_in_one_worker_thread_only_in_the_loops_idle_time(
        tmp_path: Path) -> None:
    """The passive checkpoint (and quick_check) copies megabytes per second under load: on a
    CPU it shares with the event loop it must take the loop's idle time, and give the CPU
    back the moment a request wakes the loop (at niceness +10 it kept it for a scheduler
    slice, 1-3 ms: SCHED_IDLE is preempted by any normal thread at its wake-up)."""
    store = Store.open(tmp_path / "s.db")
    for i in range(3):
        store.record(_row(i), wait=False)
    store._commit_now()
    await store.checkpoint_once()
    assert await store.integrity_check() is None
    # (the SCHED_IDLE pool's thread; a pass that copied every frame back also started the
    # niced one, for the write that starts the WAL over: _start_over_checkpoint)
    maint = _maint_threads("meterproxy-maint_")
    assert len(maint) == 1 and maint[0].native_id is not None
    assert os.sched_getscheduler(maint[0].native_id) == os.SCHED_IDLE
    assert os.sched_getscheduler(threading.get_native_id()) == os.SCHED_OTHER   # the loop
    store.close()


async def test_a_checkpoint_pass_starved_of_cpu_moves_the_next_ones_to_a_niced_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SCHED_IDLE thread gets almost no CPU while the loop keeps its CPU busy, and an
    unprivileged thread cannot leave SCHED_IDLE: a pass still running after one interval
    (here it waits for the maintenance lock, held by the test) moves the following passes to
    a second thread at MAINTENANCE_NICE, for STARVED_HOLD seconds, then back."""
    monkeypatch.setattr("proxy.store.db.STARVED_HOLD", 0.5)
    store = Store.open(tmp_path / "s.db")
    store.record(_row(1), wait=False)
    store._commit_now()
    starved = metrics.wal_checkpoints_total.labels("passive", "starved")._value.get()
    passes: list[str] = []      # the thread of each passive pass
    first = store._passive_checkpoint

    def on_thread() -> int | None:
        passes.append(threading.current_thread().name)
        return first()

    monkeypatch.setattr(store, "_passive_checkpoint", on_thread)
    assert store._maint_lock.acquire(blocking=False)
    asyncio.get_running_loop().call_later(0.3, store._maint_lock.release)
    began = time.monotonic()
    await store.checkpoint_once(starve_after=0.05)
    assert time.monotonic() - began >= 0.25         # it still waited for its pass
    assert metrics.wal_checkpoints_total.labels("passive", "starved")._value.get() == \
        starved + 1
    assert passes == ["meterproxy-maint_0"]
    _commit_each(store, [2])            # (a tick with nothing written since the WAL's start-over
    await store.checkpoint_once(starve_after=0.05)   # skips its pass) on the niced thread now
    assert passes == ["meterproxy-maint_0", "meterproxy-maint-nice_0"]
    nice = _maint_threads("meterproxy-maint-nice")
    assert len(nice) == 1 and nice[0].native_id is not None
    assert os.sched_getscheduler(nice[0].native_id) == os.SCHED_OTHER
    loop_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert os.getpriority(os.PRIO_PROCESS, nice[0].native_id) == loop_nice + MAINTENANCE_NICE
    # a pass on the niced thread is never counted as starved, however long it waits
    assert store._maint_lock.acquire(blocking=False)
    asyncio.get_running_loop().call_later(0.15, store._maint_lock.release)
    _commit_each(store, [3])
    await store.checkpoint_once(starve_after=0.05)
    assert metrics.wal_checkpoints_total.labels("passive", "starved")._value.get() == \
        starved + 1
    loop = asyncio.get_running_loop()                # STARVED_HOLD over: back to SCHED_IDLE
    await wait_until(lambda: loop.time() >= store._starved_until, what="STARVED_HOLD to end")
    seen: list[int] = []
    real = store._passive_checkpoint

    def spy() -> int | None:
        seen.append(os.sched_getscheduler(0))
        return real()

    monkeypatch.setattr(store, "_passive_checkpoint", spy)
    _commit_each(store, [4])
    await store.checkpoint_once()
    assert seen == [os.SCHED_IDLE]
    store.close()


async def test_an_oversized_wal_restarts_in_place_up_to_twice_its_limit(
        tmp_path: Path) -> None:
    """Over wal_truncate_size of frames the loop's checkpoint copies the last frames and
    lets the next commit restart the WAL from its beginning. A file up to WAL_FILE_FACTOR x
    wal_truncate_size is rewritten in place (cutting it at each restart cost the next commit
    1.5-1.9 ms of CPU, and regrowing it stalled commits behind the pass's fsync); a larger
    one is cut to that size by the commit. The loop never waits for an ftruncate of the
    whole WAL (7-15 ms at 20 MB) while busy: only a tick with nothing written since the
    previous one truncates a file over that size to zero."""
    limit = 64 * 1024
    db = tmp_path / "s.db"
    store = Store.open(db, wal_truncate_size=limit)
    wal = tmp_path / "s.db-wal"
    restarts = metrics.wal_checkpoints_total.labels("truncate", "ok")._value.get()
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")      # the schema's frames
    for i in range(24):
        store.record(_row(i), wait=False)
        store._commit_now()         # one journal frame each: over 64 KiB, under 128 KiB
    before = wal.stat().st_size
    assert limit < before <= WAL_FILE_FACTOR * limit
    await store.checkpoint_once()
    assert metrics.wal_checkpoints_total.labels("truncate", "ok")._value.get() == restarts + 1
    store.record(_row(1000), wait=False)
    store._commit_now()                         # starts the WAL again from its beginning ...
    assert wal.stat().st_size == before         # ... over the old frames: not cut
    assert _wal_frames(db) <= 2
    # writes go on, the WAL holds less than the limit: no restart
    for i in range(1001, 1005):
        store.record(_row(i), wait=False)
        store._commit_now()
        await store.checkpoint_once()
    assert metrics.wal_checkpoints_total.labels("truncate", "ok")._value.get() == restarts + 1
    await store.checkpoint_once()               # a quiet tick: the file is within 2x
    assert wal.stat().st_size == before
    for i in range(1005, 1200):                 # a burst far over 2x the limit
        store.record(_row(i), wait=False)
        store._commit_now()
    store.materialize()
    assert wal.stat().st_size > 4 * limit
    await store.checkpoint_once()               # restart: the maintenance thread's first
    assert wal.stat().st_size <= WAL_FILE_FACTOR * limit   # write after it cuts to 2x
    store.record(_row(2000), wait=False)
    store._commit_now()
    assert wal.stat().st_size <= WAL_FILE_FACTOR * limit
    for i in range(2001, 2200):
        store.record(_row(i), wait=False)
        store._commit_now()
    assert wal.stat().st_size > WAL_FILE_FACTOR * limit
    await store.checkpoint_once()               # restart: cut to 2x at once ...
    assert wal.stat().st_size == WAL_FILE_FACTOR * limit
    await store.checkpoint_once()               # ... so an idle tick has nothing to cut
    assert wal.stat().st_size == WAL_FILE_FACTOR * limit
    assert wal.read_bytes()[:4] != bytes(4)     # (the WAL's header: not truncated to zero)
    store.close()
    ids, _ = _ledger(db)
    assert sorted(ids) == sorted([f"r{i}" for i in range(24)] + [f"r{i}" for i in range(1000, 1200)]
                                 + [f"r{i}" for i in range(2000, 2200)])


async def test_serving_materializes_in_small_transactions_yielding_between_them(
        tmp_path: Path) -> None:
    """materialize_forever moves the journal in transactions of at most 64 rows (plus the
    rest of one group commit), each one a short hold of the event loop (~0.4 ms; 256-row
    slices held it 1.3-2 ms); every row is still moved exactly once."""
    store = Store.open(tmp_path / "s.db")
    for i in range(300):
        store.record(_row(i), wait=False)
        if i % 3 == 2:
            store._commit_now()         # group commits of 3 rows
    per_tx: list[int] = []
    ticks = 0

    def trace(sql: str) -> None:
        if sql.startswith("BEGIN"):
            per_tx.append(0)
        elif sql.startswith("INSERT INTO audit"):
            per_tx[-1] += sql.count("),(") + 1      # audit rows in this statement

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    store.conn.set_trace_callback(trace)
    tick = asyncio.ensure_future(ticker())
    task = asyncio.ensure_future(store.materialize_forever(interval=0.001))
    await wait_until(lambda: store._journaled == 0)
    task.cancel()
    tick.cancel()
    store.conn.set_trace_callback(None)
    assert sum(per_tx) == 300
    assert max(per_tx) <= 64 + 2 and len(per_tx) >= 300 // (64 + 2)
    assert ticks >= len(per_tx)         # the loop ran other work between the transactions
    store.close()
    ids, _ = _ledger(tmp_path / "s.db")
    assert sorted(ids) == sorted(f"r{i}" for i in range(300))


async def test_materialize_slices_spread_out_unless_a_backlog_waits(tmp_path: Path) -> None:
    """Between two of materialize_forever's slices the loop is free for SLICE_GAP while at
    most CATCH_UP_ROWS rows wait in the mirror (a request in flight meets one slice of a
    tick, not all of them back to back), and not at all above it (a backlog is caught up
    as before); every row is moved exactly once."""
    rows = CATCH_UP_ROWS + 8 * MATERIALIZE_SLICE
    store = Store.open(tmp_path / "s.db")
    for i in range(rows):
        store.record(_row(i), wait=False)
        if i % 4 == 3:
            store._commit_now()         # group commits of 4 rows
    begun: list[tuple[float, int]] = []         # (when, rows still in the mirror)

    def trace(sql: str) -> None:
        if sql.startswith("BEGIN"):
            begun.append((time.monotonic(), store._mirror_rows))

    store.conn.set_trace_callback(trace)
    task = asyncio.ensure_future(store.materialize_forever(interval=0.001))
    await wait_until(lambda: store._journaled == 0, timeout=30)
    task.cancel()
    store.conn.set_trace_callback(None)
    gaps = [(b[0] - a[0], a[1]) for a, b in itertools.pairwise(begun)]
    # after a slice that left more than CATCH_UP_ROWS waiting: the next one at once
    caught_up = [g for g, left in gaps if left - MATERIALIZE_SLICE > CATCH_UP_ROWS]
    spread = [g for g, left in gaps if left <= CATCH_UP_ROWS]
    assert len(caught_up) >= 6 and len(spread) >= CATCH_UP_ROWS // (MATERIALIZE_SLICE + 4) - 1
    assert statistics.median(caught_up) < SLICE_GAP / 2
    assert min(spread) >= SLICE_GAP - 0.002     # (the loop may run a timer ~1 ms early)
    store.close()
    ids, _ = _ledger(tmp_path / "s.db")
    assert sorted(ids) == sorted(f"r{i}" for i in range(rows))


async def test_readers_catch_up_in_slices_with_the_loop_served_between(tmp_path: Path) -> None:
    """``Store.catch_up`` (every admin request, the consumer's usage page and exports, the
    flusher, the credit book) moves what waits in the journal in MATERIALIZE_SLICE
    transactions with the loop served between them: at 6,400 rows/s a reader found up to
    ~1,000 rows and moved them in one block, every request stopped for ~5 ms. Every row
    journaled before the call is in the ledger when it returns, the last of them too, even
    while new rows keep coming faster than a slice moves them (it does not chase them: it
    returns), and each row is moved once."""
    rows = 40 * MATERIALIZE_SLICE + 4       # (the last group commit: a slice of its own)
    store = Store.open(tmp_path / "s.db")
    for i in range(rows):
        store.record(_row(i), wait=False)
        if i % 4 == 3:
            store._commit_now()         # group commits of 4 rows
    ticks = 0
    begun: list[tuple[int, int]] = []       # (loop ticks so far, rows still in the mirror)

    def trace(sql: str) -> None:
        if sql.startswith("BEGIN"):
            begun.append((ticks, store._mirror_rows))

    async def serve() -> None:      # other work on the loop: 80 rows a turn, more than a slice
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1
            for i in range(80):
                store.record(_row(rows + 80 * ticks + i), wait=False)
                if i % 4 == 3:
                    store._commit_now()

    store.conn.set_trace_callback(trace)
    server = asyncio.ensure_future(serve())
    moved = await asyncio.wait_for(store.catch_up(), 30)
    server.cancel()
    store.conn.set_trace_callback(None)
    assert moved >= rows and len(begun) >= rows // (MATERIALIZE_SLICE + 4)
    for (t0, left0), (t1, left1) in itertools.pairwise(begun):
        assert t1 > t0, "two slices ran without the loop serving anything between them"
        assert left0 - left1 <= MATERIALIZE_SLICE + 3     # at most one slice's rows moved
    with sqlite3.connect(tmp_path / "s.db") as c:
        ids = [r[0] for r in c.execute("SELECT request_id FROM audit")]
    assert set(ids) >= {f"r{i}" for i in range(rows)}
    store.close()
    ids, _ = _ledger(tmp_path / "s.db")
    assert len(ids) == len(set(ids))


# A second, real process on the same file: opens a Store (its recovery moves and deletes
# whatever the journal holds), commits group commits of its own, materializes some of them
# (deleting the newest journal rows), and exits.
_OTHER_PROCESS = """
import asyncio, sys, time
from pathlib import Path
from proxy.store.db import Store, UsageItem, UsageRow

async def main(db: str, first: int, n: int) -> None:
    s = Store.open(Path(db))
    for i in range(first, first + n):
        s.record(UsageRow(f"r{i}", time.time(), "c", "k", "rule", "v1", 200,
                          [UsageItem("m", 1_000_000, 0, 1_000_000, "")]), wait=False)
        s._commit_now()
    s.close()                   # materializes: the journal is empty again

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


def _other_process(db: Path, first: int, n: int) -> None:
    import subprocess
    import sys
    subprocess.run([sys.executable, "-c", _OTHER_PROCESS, str(db), str(first), str(n)],
                   check=True, cwd=Path(__file__).resolve().parent.parent, timeout=60)


async def test_journal_seqs_are_never_reused_across_processes_and_restarts(
        tmp_path: Path) -> None:
    """Every seq the journal ever takes is recorded by a test trigger: across this
    process's restarts and a real second process emptying the journal in between (also
    while this one holds committed, unmaterialized rows in its mirror), no seq comes twice,
    and every usage row reaches the ledger exactly once."""
    db = tmp_path / "s.db"
    Store.open(db).close()
    with sqlite3.connect(db) as c:
        c.executescript("CREATE TABLE seen (seq INTEGER NOT NULL);"
                        "CREATE TRIGGER seen AFTER INSERT ON journal"
                        " BEGIN INSERT INTO seen VALUES (NEW.seq); END;")
    n = 0
    for _ in range(3):
        a = Store.open(db)                      # a restart of this process
        for _ in range(3):
            a.record(_unit_row(n), wait=False)
            n += 1
            a._commit_now()                     # committed, mirrored, not materialized
        _other_process(db, n, 4)                # empties the journal, then reuses nothing
        n += 4
        for _ in range(2):
            a.record(_unit_row(n), wait=False)
            n += 1
            a._commit_now()
        a.materialize(limit=1)
        a.close()
        _other_process(db, n, 2)                # a restart of the other one
        n += 2
    with sqlite3.connect(db) as c:
        seqs = [s for (s,) in c.execute("SELECT seq FROM seen ORDER BY rowid")]
        assert c.execute("SELECT COUNT(*) FROM journal").fetchone()[0] == 0
        assert sorted(r for (r,) in c.execute("SELECT request_id FROM audit")) == \
            sorted(f"r{i}" for i in range(n))
        assert c.execute("SELECT SUM(quantity) FROM usage_minute").fetchone()[0] == \
            n * 1_000_000
    assert len(seqs) == n                       # one journal row per group commit of one
    assert seqs == sorted(seqs) and len(set(seqs)) == n


async def test_a_journal_row_inserted_at_a_used_seq_is_moved_above_every_used_one(
        tmp_path: Path) -> None:
    """Whoever writes the file (an older version's ``INSERT INTO journal(row)`` during a
    rolling upgrade, for which SQLite picks max(seq) + 1 of an emptied journal: a used seq;
    or an explicit seq), the row is committed above the high-water mark; the Store's own
    next seq is above those, and every row is moved exactly once."""
    db = tmp_path / "s.db"
    store = Store.open(db)
    for i in range(3):
        store.record(_unit_row(i), wait=False)
        store._commit_now()
    assert store.materialize() == 3           # seqs 1-3 deleted: the mark is 3
    raw = sqlite3.connect(db, isolation_level=None)
    raw.execute("INSERT INTO journal(row) VALUES (?)", (encode_row(_unit_row(3)),))
    raw.execute("INSERT INTO journal(seq, row) VALUES (2, ?)", (encode_row(_unit_row(4)),))
    raw.execute("INSERT INTO journal(seq, row) VALUES (3, ?)", (encode_row(_unit_row(5)),))
    assert [s for (s,) in raw.execute("SELECT seq FROM journal")] == [4, 5, 6]
    raw.close()
    store.record(_unit_row(6), wait=False)
    store._commit_now()
    assert store._mirror[-1][0] == 7
    store.close()               # the journal held other rows: read back, in seq order
    assert _ledger(db)[0] == [f"r{i}" for i in range(7)]


def test_migration_15_dates_rows_attempted_before_it_from_their_creation(tmp_path: Path) -> None:
    """``outbox.first_attempt_at`` (the flusher's resend horizon counts from it): a row an
    older version attempted gets its creation time (at or before its first call, so its
    horizon ends early, never late); a row never attempted gets none."""
    from proxy.store.db import connect
    from proxy.store.schema import MIGRATIONS
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db, isolation_level=None)
    _migrate_to(conn, 14)
    for oid, attempts in ((1, 3), (2, 0)):
        conn.execute("INSERT INTO outbox(id, identifier, customer_id, meter, event_name, value,"
                     " window_start, timestamp, created_at, attempts) VALUES"
                     " (?, ?, 'c', 'm', 'm', 1, 0, 0, ?, ?)", (oid, f"mp_{oid}", 1000 + oid, attempts))
    conn.close()
    conn = connect(db)
    assert conn.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
    assert conn.execute("SELECT id, first_attempt_at FROM outbox ORDER BY id").fetchall() == [
        (1, 1001), (2, None)]
    conn.close()


def test_migration_13_continues_the_autoincrement_count(tmp_path: Path) -> None:
    """A database written with AUTOINCREMENT (migration 11) whose journal was emptied: the
    first seq after migration 13 is above every seq used before it."""
    from proxy.store.db import _JOURNAL_INSERT, connect
    from proxy.store.schema import MIGRATIONS
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db, isolation_level=None)
    _migrate_to(conn, 12)
    for _ in range(5):
        conn.execute("INSERT INTO journal(row) VALUES ('[]')")
    conn.execute("DELETE FROM journal WHERE seq >= 4")      # the newest ones moved
    conn.close()
    conn = connect(db)
    assert conn.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
    assert [s for (s,) in conn.execute("SELECT seq FROM journal")] == [1, 2, 3]
    assert conn.execute("SELECT hwm FROM journal_seq").fetchone() == (5,)
    assert conn.execute(_JOURNAL_INSERT, ("[]",)).lastrowid == 6
    conn.close()


def _apply_one_insert_per_item(conn: sqlite3.Connection, rows: list[Any]) -> None:
    """The reference: materialization as it was before the chunked audit inserts (one
    audit INSERT per usage item, in order)."""
    from proxy.store.db import _AUDIT_SQL, _DEBIT_SQL, _USAGE_SQL
    audit, debits = [], []
    agg: dict[tuple[Any, ...], list[int]] = {}
    for rid, at, cid, kid, rule, ver, status, method, path, items, row_debits in rows:
        at_ms = int(at * 1000)
        minute = int(at // 60) * 60
        for meter, gid, kind, amount in row_debits:
            debits.append((cid, gid, kind, amount, rid, meter, at_ms))
        for meter, q, credits, billable, flags in items:
            audit.append((rid, at_ms, cid, kid, rule, ver, status, meter, q, credits,
                          billable, flags, method, path))
            a = agg.setdefault((cid, kid, meter, minute, ver), [0, 0, 0, 0])
            a[0] += q
            a[1] += 1
            a[2] += billable
            a[3] += q - billable
    conn.executemany(_AUDIT_SQL, audit)
    conn.executemany(_USAGE_SQL, [(*k, *v) for k, v in agg.items()])
    conn.executemany(_DEBIT_SQL, debits)


_flat_rows = st.lists(st.tuples(
    st.text(max_size=6), st.floats(1.7e9, 1.7e9 + 600), st.sampled_from(["c1", "c2"]),
    st.sampled_from(["k1", "k2"]), st.just("rule"), st.sampled_from(["v1", "v2"]),
    st.sampled_from([200, 404]), st.just("POST"), st.just("/p"),
    st.lists(st.tuples(st.sampled_from(["m1", "m2", "m3"]), st.integers(0, 10**15),
                       st.integers(0, 10**9), st.integers(0, 10**15),
                       st.sampled_from(["", "unreadable"])), max_size=4),
    st.lists(st.builds(lambda m, gk, a: (m, *gk, a), st.sampled_from(["m1", "m2"]),
                       st.sampled_from([("g", "debit"), ("", "debt")]),
                       st.integers(1, 10**9)), max_size=2)),
    max_size=70)


@settings(max_examples=150, deadline=None)
@given(st.lists(_flat_rows, min_size=1, max_size=3))
def test_materialize_writes_the_same_ledger_as_one_insert_per_item(
        batches: list[list[Any]]) -> None:
    """Store._apply (audit rows in multi-row statements) against the reference (one INSERT
    per usage item): every table of the ledger is identical, audit seqs included, over
    successive materialize transactions of any size (around the chunk size and its rest)."""
    import tempfile

    from proxy.store.db import connect
    with tempfile.TemporaryDirectory() as d:
        new, old = connect(Path(d) / "new.db"), connect(Path(d) / "old.db")
        for c in (new, old):
            c.execute("INSERT INTO customers(id, created_at, updated_at) VALUES ('c1', 0, 0),"
                      " ('c2', 0, 0)")
            c.execute("INSERT INTO grants(id, customer_id, amount, source, created_at)"
                      " VALUES ('g', 'c1', 5, 'admin', 0)")
        for rows in batches:
            for c, apply in ((new, Store._apply), (old, _apply_one_insert_per_item)):
                c.execute("BEGIN IMMEDIATE")
                apply(c, rows)
                c.execute("COMMIT")
        for table in ("audit", "usage_minute", "credit_entries"):
            q = f"SELECT * FROM {table} ORDER BY 1, 2, 3, 4, 5"
            assert new.execute(q).fetchall() == old.execute(q).fetchall()
        new.close()
        old.close()


# rows of one context (customer, key, rule, version, status, method, path; item meter and
# flags), now and then another: runs of rows whose audit rows share every shared column, and
# runs broken by one value (a path 1.0 is equal to 1, and stored as the text "1.0")
_ctx = st.tuples(st.sampled_from(["c1", "c2"]), st.sampled_from(["k1", "k2"]),
                 st.sampled_from(["v1", "v2"]), st.sampled_from([200, 200.0, 404]),
                 st.sampled_from(["GET", "POST"]), st.sampled_from(["/p", "/q", "", 1, 1.0]),
                 st.sampled_from(["m1", "m2"]), st.sampled_from(["", "unreadable"]))
_shared_rows = st.builds(
    lambda main, others, picks, qs: [
        (f"r{i}", 1.7e9 + i, c, k, "rule", v, status, method, path,
         [(meter, q, 0, q, flags)], [])
        for i, ((c, k, v, status, method, path, meter, flags), q) in enumerate(zip(
            [others[p % len(others)] if others and p % 7 == 0 else main for p in picks],
            qs, strict=False))],
    _ctx, st.lists(_ctx, max_size=3), st.lists(st.integers(0, 60), min_size=1, max_size=70),
    st.lists(st.integers(0, 10**12), min_size=70, max_size=70))


@settings(max_examples=120, deadline=None)
@given(st.lists(_shared_rows, min_size=1, max_size=3))
def test_materialize_of_rows_sharing_a_context_writes_the_same_ledger_as_one_insert_per_item(
        batches: list[list[Any]]) -> None:
    """Audit rows that share every column but their own five are inserted by a statement that
    binds the shared values once: the ledger is the reference's, audit seqs and each value's
    SQLite type included (a value equal to the others but of another type is not shared)."""
    import tempfile

    from proxy.store.db import connect
    with tempfile.TemporaryDirectory() as d:
        new, old = connect(Path(d) / "new.db"), connect(Path(d) / "old.db")
        for rows in batches:
            for c, apply in ((new, Store._apply), (old, _apply_one_insert_per_item)):
                c.execute("BEGIN IMMEDIATE")
                apply(c, rows)
                c.execute("COMMIT")
        for table in ("audit", "usage_minute"):
            q = f"SELECT *, typeof(status), typeof(path) FROM {table} ORDER BY 1, 2, 3, 4, 5" \
                if table == "audit" else f"SELECT * FROM {table} ORDER BY 1, 2, 3, 4, 5"
            assert new.execute(q).fetchall() == old.execute(q).fetchall()
        new.close()
        old.close()


def test_audit_values_equal_but_of_another_type_are_not_bound_once(tmp_path: Path) -> None:
    """A shared column's values must be equal and of one type to be bound once: a path 1.0
    among paths 1 is stored as the text "1.0", as one INSERT per item stores it."""
    from proxy.store.db import connect
    rows = [(f"r{i}", 1.7e9, "c1", "k1", "rule", "v1", 200, "GET", 1.0 if i == 2 else 1,
             [("m1", 5, 0, 5, "")], []) for i in range(4)]
    got = []
    for name, apply in (("new", Store._apply), ("old", _apply_one_insert_per_item)):
        c = connect(tmp_path / f"{name}.db")
        c.execute("BEGIN IMMEDIATE")
        apply(c, rows)
        c.execute("COMMIT")
        got.append(c.execute("SELECT request_id, path, typeof(path) FROM audit"
                             " ORDER BY seq").fetchall())
        c.close()
    assert got[0] == got[1]
    assert got[0][2] == ("r2", "1.0", "text")


async def test_two_processes_committing_to_one_file_move_each_row_exactly_once(
        tmp_path: Path) -> None:
    """A rolling restart's overlap: both Stores commit while the other's rows sit in the
    journal. A's mirrored group commits are seqs 1 and 3; B's recovery moved seq 1 and B
    committed seq 2 in between. A must not take B's row for its own moved one (the count
    of rows up to seq 3 is 2 either way): each row reaches the ledger exactly once."""
    db = tmp_path / "s.db"
    a = Store.open(db)
    a.record(_unit_row(0), wait=False)
    a._commit_now()                           # seq 1, mirrored by A
    b = Store.open(db)                        # recovery moves seq 1: the journal is empty
    b.record(_unit_row(1), wait=False)
    b._commit_now()                           # seq 2, mirrored by B
    a.record(_unit_row(2), wait=False)
    a._commit_now()                           # seq 3
    a.materialize()
    b.materialize()
    a.close()
    b.close()
    ids, total = _ledger(db)
    assert sorted(ids) == ["r0", "r1", "r2"]
    assert total == 3 * 1_000_000


_OPEN_PROCESS = """
import sys
from pathlib import Path
from proxy.store.db import connect
connect(Path(sys.argv[1])).close()
"""


def test_two_processes_upgrading_one_file_at_once_both_open_it(tmp_path: Path) -> None:
    """Two processes of the new version start on a database at migration 12 (a rolling
    upgrade's two replicas, or the CLI next to the proxy): each reads ``user_version`` 12
    and waits for the write lock; the one that runs second must not apply migration 13 again
    (``table journal_seq already exists``: it would fail to start)."""
    import subprocess
    import sys

    from proxy.store.schema import MIGRATIONS
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    _migrate_to(conn, 12)
    conn.execute("BEGIN IMMEDIATE")              # both starters wait for this lock
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN_PROCESS, str(db)],
                              cwd=Path(__file__).resolve().parent.parent,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(1.5)                              # both read user_version 12, then wait
    conn.execute("ROLLBACK")
    conn.close()
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)


@pytest.mark.xfail(strict=True, reason=(
    "a rolling upgrade's overlap with a pre-merge binary: its mirror check still counts a"
    " range DELETE (the d8aecdb defect), so it takes the new processes' rows for its own"
    " already-moved ones; migration 13 does not make that check fail (needs an upgrade"
    " that stops the old process before the new one writes, or a schema change the old"
    " check trips on)"))
async def test_a_pre_merge_process_in_the_overlap_does_not_lose_the_new_processes_rows(
        tmp_path: Path) -> None:
    """The older binary (migrations 1-12) still running on the migrated file, emulated by
    its exact statements: ``INSERT INTO journal(row)`` with ``lastrowid`` as its mirror seq,
    and its materialize's ``DELETE FROM journal WHERE seq <= last`` accepted when the count
    equals its group commits. Its rows r0, r1 are moved by a new process's recovery, the
    new one commits r2 and r3, the old one r4: every row must reach the ledger once."""
    import orjson

    from proxy.store.db import flatten
    db = tmp_path / "s.db"
    Store.open(db).close()                       # the new binary migrated the file
    old = sqlite3.connect(db, isolation_level=None)
    mirror: list[tuple[int, list[Any]]] = []

    def old_commit(i: int) -> None:
        flats = [flatten(_unit_row(i))]
        cur = old.execute("INSERT INTO journal(row) VALUES (?)", (orjson.dumps(flats).decode(),))
        assert cur.lastrowid is not None
        mirror.append((cur.lastrowid, flats))

    old_commit(0)
    old_commit(1)
    new = Store.open(db)                         # recovery moves r0, r1 (read back)
    for i in (2, 3):
        new.record(_unit_row(i), wait=False)
        new._commit_now()
    old_commit(4)
    old.execute("BEGIN IMMEDIATE")               # the older binary's materialize
    Store._apply(old, [f for _, fl in mirror for f in fl])
    if old.execute("DELETE FROM journal WHERE seq <= ?", (mirror[-1][0],)).rowcount \
            == len(mirror):
        old.execute("COMMIT")
    else:
        old.execute("ROLLBACK")
        old.execute("BEGIN IMMEDIATE")           # it reads the journal back instead
        Store._apply(old, journal_rows(
            [b for (b,) in old.execute("SELECT row FROM journal ORDER BY seq")]))
        old.execute("DELETE FROM journal")
        old.execute("COMMIT")
    old.close()
    new.close()
    assert sorted(_ledger(db)[0]) == [f"r{i}" for i in range(5)]


async def test_a_strict_row_no_other_request_can_join_is_committed_before_record_returns(
        tmp_path: Path) -> None:
    """With ``alone`` true (no other request in flight) a waited-for strict row is committed
    inside ``record``: the request's wait ends without a loop iteration. With another request
    in flight too, while the loop thread has CPU to spare (it wanted less than
    GROUP_COMMIT_SHARE of one in the last window). With another request in flight on a busy
    loop, or a row nobody waits for, the group commit runs on the next iteration, where the
    other rows of that iteration join it; the sampling timer goes back to commits in
    ``record`` after a window below INLINE_COMMIT_SHARE."""
    db = tmp_path / "s.db"
    store = Store.open(db)
    others = 0
    store.alone = lambda: others == 0
    journal = "SELECT count(*) FROM journal"
    fut = store.record(_row(0), wait=True)
    assert fut is not None and fut.done() and fut.result() is None
    assert not store._pending and not store._scheduled and store._idle.is_set()
    assert store.conn.execute(journal).fetchone()[0] == 1
    others = 1
    opened = store._load_at                         # the timer samples an idle window
    await wait_until(lambda: store._load_at > opened, what="a load sample")
    assert store._spare_cpu                         # CPU to spare
    spare = store.record(_row(1), wait=True)
    assert spare is not None and spare.done() and spare.result() is None
    assert not store._pending and store.conn.execute(journal).fetchone()[0] == 2
    _burn(store)                                    # the loop thread busy for a window
    first = store.record(_row(2), wait=True)
    second = store.record(_row(3), wait=True)
    assert first is not None and second is not None and not first.done()
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert store.conn.execute(journal).fetchone()[0] == 3       # one group
    # the timer's next sample, of a window spent waiting: at once again
    await wait_until(lambda: store._spare_cpu, what="an idle window sampled")
    again = store.record(_row(4), wait=True)
    assert again is not None and again.done()
    others = 0
    assert store.record(_row(5), wait=False) is None
    assert store._pending and store._scheduled      # not committed on the caller's path
    await store.drain()
    store.close()
    assert store._load_timer is None                # no sampling after close
    assert _ledger(db) == ([f"r{i}" for i in range(6)], sum(1_000_000 + i for i in range(6)))
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    assert (f"wanted {GROUP_COMMIT_SHARE:.0%} of a CPU or more over {LOAD_WINDOW * 1000:.0f} ms"
            f" (until it wants less than {INLINE_COMMIT_SHARE:.0%};") in readme  # its promise


def _burn(store: Store) -> float:
    """Keep the loop thread runnable (no await) for a whole sampling window, then take the
    sample, as a saturated loop does; the window starts fresh first. Returns the CPU time
    the thread got over its wall time (below 1 when something else took the CPU). Time the
    hypervisor steals from the VM counts as neither running nor waiting: a window that lost
    more than 1 - GROUP_COMMIT_SHARE of itself that way is tried again."""
    loop = asyncio.get_running_loop()
    got = 1.0
    for _ in range(10):
        time.sleep(LOAD_WINDOW / 2)                 # (not runnable: the window may start)
        store._measure()
        t0, c0 = loop.time(), time.thread_time()
        while loop.time() - t0 < 1.5 * LOAD_WINDOW:
            pass
        store._measure()
        got = (time.thread_time() - c0) / (loop.time() - t0)
        if not store._spare_cpu:
            break
    return got


@given(st.booleans(), st.floats(min_value=0.0, max_value=4.0))
def test_the_commit_mode_changes_only_past_the_far_threshold(spare: bool, share: float) -> None:
    """Hysteresis: a loop with CPU to spare goes to group commits only at
    GROUP_COMMIT_SHARE or more, and back only below INLINE_COMMIT_SHARE; a window between
    the two keeps the mode (the commits' own CPU does not flip it every window)."""
    after = spare_after(spare, share)
    if share >= GROUP_COMMIT_SHARE:
        assert after is False
    elif share < INLINE_COMMIT_SHARE:
        assert after is True
    else:
        assert after is spare


def test_a_schedstat_is_read_as_time_on_a_cpu_plus_time_waiting_for_one(
        tmp_path: Path) -> None:
    """``/proc/<pid>/task/<tid>/schedstat`` holds nanoseconds on a CPU, nanoseconds
    runnable and waiting, and timeslices; all zeros (a kernel that keeps no scheduler
    statistics), anything unreadable or no file is None, and the store then uses the CPU
    time. The real file of this thread reads as at least its CPU time."""
    f = tmp_path / "schedstat"
    for text, want in (("1500000000 250000000 42\n", 1.75), ("0 0 0\n", None),
                       ("12\n", None), ("x y z\n", None), ("", None)):
        f.write_text(text)
        assert read_schedstat(str(f)) == want, text
    assert read_schedstat(str(tmp_path / "none")) is None
    cpu = time.thread_time()
    mine = read_schedstat(f"/proc/self/task/{threading.get_native_id()}/schedstat")
    assert mine is not None and mine >= cpu - 0.01


def _burn_beside_a_hog(store: Store) -> float:
    """``_burn`` with this process and another that spins pinned to the same CPU."""
    mine = os.sched_getaffinity(0)
    cpu = min(mine)
    hog = subprocess.Popen([sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{cpu}}})\n"
                            "print('pinned', flush=True)\nwhile True: pass"],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert hog.stdout is not None and hog.stdout.readline() == "pinned\n"
        os.sched_setaffinity(0, {cpu})              # the hog spins on that CPU from now on
        return _burn(store)
    finally:
        os.sched_setaffinity(0, mine)
        hog.kill()
        hog.communicate()


async def test_a_loop_that_shares_its_cpu_is_busy_to_the_group_commit(tmp_path: Path) -> None:
    """The load sample counts the time the loop thread waited for a CPU, not only the CPU
    it got: a loop that wants all of a CPU another process also wants gets about half of it
    and must still count as saturated (group commits save CPU exactly then)."""
    store = Store.open(tmp_path / "s.db")
    store.alone = lambda: False
    if store._schedstat is None:
        store.close()
        pytest.skip("this kernel keeps no scheduler statistics (/proc/self/task/<tid>/schedstat):"
                    " the store measures the loop's CPU time instead")
    got = _burn_beside_a_hog(store)
    assert got < 0.75, got                          # it did share the CPU
    assert not store._spare_cpu
    fut = store.record(_row(0), wait=True)
    assert fut is not None and not fut.done()       # a group commit
    await asyncio.wait_for(fut, 5)
    store.close()


async def test_with_synchronous_full_rows_share_a_commit_however_idle_the_loop(
        tmp_path: Path) -> None:
    """Under ``synchronous: full`` every commit flushes the disk on the loop thread (time its
    CPU demand does not show): a strict row commits inside ``record`` only when alone, and no
    load sampling runs."""
    db = tmp_path / "s.db"
    store = Store.open(db, synchronous="full")
    assert store._load_timer is None and store._schedstat is None
    assert not store._spare_cpu                     # however idle: no commit of its own
    others = 1
    store.alone = lambda: others == 0
    first = store.record(_row(0), wait=True)
    second = store.record(_row(1), wait=True)
    assert first is not None and second is not None and not first.done()
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert store.conn.execute("SELECT count(*) FROM journal").fetchone()[0] == 1
    others = 0
    alone = store.record(_row(2), wait=True)
    assert alone is not None and alone.done()
    store.close()
    assert _ledger(db)[0] == ["r0", "r1", "r2"]


async def test_rows_recorded_in_a_group_share_one_commit_even_alone(tmp_path: Path) -> None:
    """``Store.grouped``: a strict row recorded alone commits inside ``record`` (one
    transaction each); inside the block none does, and one group commit at its end takes
    them all (the settlements made in a burst after a monetary account's opening), every
    waiter resolved by it. A commit already scheduled takes them the same way."""
    db = tmp_path / "s.db"
    store = Store.open(db)
    store.alone = lambda: True
    journal = "SELECT count(*) FROM journal"
    try:
        with store.grouped():
            futs = [store.record(_row(i), wait=True) for i in range(50)]
            assert not any(f is None or f.done() for f in futs)
        await asyncio.wait_for(asyncio.gather(*futs), 5)     # type: ignore[arg-type]
        assert store.conn.execute(journal).fetchone()[0] == 1
        alone = store.record(_row(50), wait=True)
        assert alone is not None and alone.done()            # outside: at once, its own
        assert store.conn.execute(journal).fetchone()[0] == 2
        assert store.record(_row(51), wait=False) is None    # schedules a commit
        with store.grouped():
            second = store.record(_row(52), wait=True)
        assert second is not None
        await asyncio.wait_for(second, 5)
        assert store.conn.execute(journal).fetchone()[0] == 3
        with store.grouped():
            pass                                             # nothing recorded: no commit
        assert not store._scheduled
    finally:
        store.close()
    assert _ledger(db)[0] == [f"r{i}" for i in range(53)]


async def test_quiet_moments_materialize_short_slices(tmp_path: Path) -> None:
    """``quiet`` (no request in flight) moves one QUIET_SLICE transaction of the journal on
    the next loop iteration once that many rows wait, whether or not requests overlapped
    before (a block of the loop is best run when no request is in flight); one slice is
    scheduled at a time; every row is moved exactly once, the oldest first."""
    db = tmp_path / "s.db"
    store = Store.open(db)
    store.alone = lambda: True
    journal = "SELECT count(*) FROM journal"

    def waiting() -> int:
        return int(store.conn.execute(journal).fetchone()[0])

    for i in range(QUIET_SLICE - 1):
        store.record(_row(i), wait=True)        # (requests overlapping: no quiet moment)
    store.quiet()
    await asyncio.sleep(0)
    assert waiting() == QUIET_SLICE - 1          # too few rows
    store.record(_row(QUIET_SLICE - 1), wait=True)
    assert waiting() == QUIET_SLICE
    store.quiet()               # the next quiet moment, with enough rows: however few came before
    await asyncio.sleep(0)
    assert waiting() == 0
    for i in range(QUIET_SLICE, 3 * QUIET_SLICE + 3):
        store.record(_row(i), wait=True)
    store.quiet()
    store.quiet()                       # one slice scheduled at a time
    assert waiting() == 2 * QUIET_SLICE + 3      # not on the caller's path
    await asyncio.sleep(0)
    assert waiting() == QUIET_SLICE + 3
    ids = [r[0] for r in store.conn.execute("SELECT request_id FROM audit ORDER BY seq")]
    assert ids == [f"r{i}" for i in range(2 * QUIET_SLICE)]
    store.quiet()
    await asyncio.sleep(0)
    assert waiting() == 3
    store.quiet()
    await asyncio.sleep(0)
    assert waiting() == 3                        # fewer than QUIET_SLICE rows wait
    store.close()
    assert _ledger(db) == ([f"r{i}" for i in range(3 * QUIET_SLICE + 3)],
                           sum(1_000_000 + i for i in range(3 * QUIET_SLICE + 3)))


def _alone_with_rows(db: Path, n: int) -> Store:
    """A store whose requests are always alone (each strict row commits inside ``record``,
    one group commit each, as at one connection) with ``_row(0)`` .. ``_row(n - 1)``
    journaled and mirrored."""
    store = Store.open(db)
    store.alone = lambda: True
    for i in range(n):
        store.record(_row(i), wait=True)
    return store


def _journal_left(store: Store) -> int:
    """Journal rows as the loop's connection sees them now (``_conn``: inside an open
    slice's transaction, not finishing it as ``Store.conn`` does)."""
    return int(store._conn.execute("SELECT count(*) FROM journal").fetchone()[0])


async def test_a_quiet_slice_takes_three_loop_iterations_and_the_loop_runs_between_them(
        tmp_path: Path) -> None:
    """The slice's transaction is made in three steps (BEGIN and the ledger rows, the
    journal's DELETE, COMMIT), one per loop iteration: callbacks queued meanwhile (a
    request arriving) run between them."""
    db = tmp_path / "s.db"
    store = _alone_with_rows(db, QUIET_SLICE + 2)
    ran: list[tuple[int, bool]] = []

    def between() -> None:             # what the loop runs while the slice is open
        sl = store._slice
        ran.append((-1 if sl is None else sl.step, store._conn.in_transaction))
        if sl is not None:
            store._loop.call_soon(between)

    store.quiet()
    store._loop.call_soon(between)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    await wait_until(lambda: store._slice is None, what="the slice's end")
    assert ran[:3] == [(1, True), (2, True), (-1, False)]
    assert _journal_left(store) == 2 and store._mirror_rows == 2 and store._mirror_ok
    store.close()
    assert _ledger(db)[0] == [f"r{i}" for i in range(QUIET_SLICE + 2)]


async def test_anything_that_needs_the_connection_during_a_slice_finishes_it_first(
        tmp_path: Path) -> None:
    """A read through ``Store.conn`` while a slice's transaction is open would run inside
    it (and see the ledger rows before the journal's DELETE): the slice is finished first.
    A strict row recorded then commits after it, once; close() finishes an open one."""
    db = tmp_path / "s.db"
    store = _alone_with_rows(db, QUIET_SLICE)
    store.quiet()
    await asyncio.sleep(0)
    assert store._slice is not None and store._slice.step == 1     # BEGIN and the ledger rows
    assert _journal_left(store) == QUIET_SLICE                      # (inside it: not deleted)
    assert store.conn.execute("SELECT (SELECT count(*) FROM journal),"
                              " (SELECT count(*) FROM audit)").fetchone() == (0, QUIET_SLICE)
    assert store._slice is None and not store._conn.in_transaction

    store.record(_row(QUIET_SLICE), wait=True)
    for i in range(QUIET_SLICE + 1, 2 * QUIET_SLICE + 1):
        store.record(_row(i), wait=True)
    store.quiet()
    await asyncio.sleep(0)
    assert store._slice is not None
    fut = store.record(_row(2 * QUIET_SLICE + 1), wait=True)       # during the slice
    assert fut is not None
    await asyncio.wait_for(fut, 5)
    assert store._slice is None and store.healthy
    store.record(_row(2 * QUIET_SLICE + 2), wait=True)
    for i in range(2 * QUIET_SLICE + 3, 3 * QUIET_SLICE + 3):
        store.record(_row(i), wait=True)
    store.quiet()
    await asyncio.sleep(0)
    assert store._slice is not None
    store.close()                                                   # with the slice open
    assert _ledger(db) == ([f"r{i}" for i in range(3 * QUIET_SLICE + 3)],
                           sum(1_000_000 + i for i in range(3 * QUIET_SLICE + 3)))


async def test_a_quiet_slice_that_finds_other_rows_in_the_journal_rolls_back(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The journal's DELETE must remove exactly the slice's group commits: when another
    process moved them first, the slice rolls back (nothing applied twice) and the journal
    is read back from then on."""
    db = tmp_path / "s.db"
    store = _alone_with_rows(db, QUIET_SLICE)
    other = Store.open(db)      # another process's store on the same file moves them first
    other.close()               # (at open: rows in the journal are recovered)
    assert _journal_left(store) == 0
    store.quiet()
    await asyncio.sleep(0)
    await wait_until(lambda: store._slice is None, what="the slice's end")
    assert not store._mirror_ok
    assert "held other rows" in caplog.text
    store.close()
    assert _ledger(db) == ([f"r{i}" for i in range(QUIET_SLICE)],
                           sum(1_000_000 + i for i in range(QUIET_SLICE)))


async def test_a_quiet_slice_that_meets_a_foreign_lock_leaves_the_mirror_for_the_next(
        tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    store = _alone_with_rows(db, QUIET_SLICE)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    store.quiet()
    await asyncio.sleep(0)
    assert store._slice is None and not store._conn.in_transaction    # BEGIN refused
    assert store._mirror_ok and store._mirror_rows == QUIET_SLICE
    holder.execute("ROLLBACK")
    holder.close()
    store.quiet()
    await asyncio.sleep(0)
    await wait_until(lambda: store._slice is None, what="the slice's end")
    assert store._mirror_ok and store._mirror_rows == 0 and _journal_left(store) == 0
    store.close()
    assert _ledger(db)[0] == [f"r{i}" for i in range(QUIET_SLICE)]


async def test_a_quiet_slice_open_when_the_file_is_replaced_writes_nothing_more(
        tmp_path: Path) -> None:
    """The store breaks while a slice's transaction is open (its file replaced under it):
    the slice is rolled back, never committed into the file that is no longer the
    database; the rows stay in its journal."""
    db = tmp_path / "s.db"
    store = _alone_with_rows(db, QUIET_SLICE)
    store.quiet()
    await asyncio.sleep(0)
    assert store._slice is not None
    for suffix in ("", "-wal", "-shm"):          # (the open connection keeps its files)
        os.rename(f"{db}{suffix}", tmp_path / f"old.db{suffix}")
    sqlite3.connect(db).close()                 # another file at the path
    assert store.check_file() is not None
    await wait_until(lambda: store._slice is None, what="the slice's end")
    assert not store._conn.in_transaction
    store.close()
    with sqlite3.connect(tmp_path / "old.db") as c:
        assert c.execute("SELECT count(*) FROM audit").fetchone()[0] == 0
        assert c.execute("SELECT count(*) FROM journal").fetchone()[0] == QUIET_SLICE


async def test_a_lone_row_recorded_inside_a_write_transaction_waits_for_the_next_iteration(
        tmp_path: Path) -> None:
    """Committed inline, the journal's autocommit INSERT would join a transaction the
    connection has open (and be rolled back with it): such a row is left to the next loop
    iteration, when that transaction is over, and the store stays healthy."""
    db = tmp_path / "s.db"
    store = Store.open(db)
    store.alone = lambda: True
    store.conn.execute("BEGIN IMMEDIATE")
    fut = store.record(_row(0), wait=True)
    assert fut is not None and not fut.done() and store._scheduled
    store.conn.execute("ROLLBACK")
    await asyncio.wait_for(fut, 5)
    assert store.healthy and fut.result() is None
    store.close()
    assert _ledger(db) == (["r0"], 1_000_000)


async def test_a_lone_row_whose_inline_commit_fails_returns_the_failed_future(
        tmp_path: Path) -> None:
    """A waited-for strict row committed inside ``record`` (``alone``) that fails to commit
    (SQLITE_FULL here: the file may not grow) must hand its caller the future carrying the
    failure (fail_mode closed: the request answers 503), never None, which means "nothing to
    wait for" and lets the answer out; a withheld row is dropped and withdrawn."""
    from proxy.errors import MeteringUnavailable

    db = tmp_path / "s.db"
    store = Store.open(db)
    store.alone = lambda: True
    withdrawn: list[str] = []
    store.on_withdraw = lambda r: withdrawn.append(r.request_id)
    (pages,) = store.conn.execute("PRAGMA page_count").fetchone()
    store.conn.execute(f"PRAGMA max_page_count = {pages}")
    for i in range(1000):
        row = _row(i)
        row.path = "/" + "p" * 2000            # a page fills in two rows
        row.withhold = True
        fut = store.record(row, wait=True)
        assert fut is not None, f"row {i}: record returned no future to wait for"
        assert fut.done()                       # committed (or failed) inline
        if fut.exception() is not None:
            assert isinstance(fut.exception(), MeteringUnavailable)
            break
    else:
        raise AssertionError("the database never refused to grow")
    assert withdrawn == [f"r{i}"] and not store.healthy
    store.conn.execute("PRAGMA max_page_count = 1073741823")
    await wait_until(lambda: store.healthy)
    store.close()
    assert _ledger(db)[0] == [f"r{j}" for j in range(i)]


async def test_customers_are_found_by_stripe_id_through_an_index(tmp_path: Path) -> None:
    """Migration 17: the usage page asks on every view which customers share the viewer's
    Stripe customer (``by_stripe_id``); without the index that read every customer."""
    store = Store.open(tmp_path / "s.db")
    try:
        plan = " ".join(str(r[-1]) for r in store.conn.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM customers WHERE stripe_customer_id=? ORDER BY id",
            ("cus_1",)))
        assert "USING INDEX customers_stripe_customer" in plan, plan
    finally:
        store.close()
