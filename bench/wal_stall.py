#!/usr/bin/env python3
"""Where a strict group commit's write blocks, without the proxy (issue 13's disk tail).

A writer thread appends one journal row per "group commit" (one autocommit INSERT of a
~``--row-bytes`` blob into a WAL database, ``synchronous=NORMAL``, no auto-checkpoint: the
strict store's write) at ``--rate`` commits per second; each INSERT's wall time is recorded.
Alongside, a second connection (the store's maintenance thread) moves the journal into a
table and checkpoints the WAL the way ``Store`` does: a PASSIVE pass every
``--checkpoint-interval`` seconds and a RESTART when the WAL passed ``--restart-mib``.

  .venv/bin/python bench/wal_stall.py --dir /work/tmp-wal --seconds 10
  .venv/bin/python bench/wal_stall.py --dir /dev/shm/wal --seconds 10      # tmpfs
  .venv/bin/python bench/wal_stall.py --dir /work/tmp-wal --no-checkpoint

Variants that isolate the trigger:
  --no-checkpoint       nothing but the appends (the WAL grows; no fsync at all)
  --fsync-only          the second thread only fdatasyncs the WAL every interval (no copy)
  --raw                 no SQLite: plain pwrite of 4120-byte frames at the WAL's offsets

Prints per variant: commits, p50/p99/max INSERT time, and how many took over 1 / 5 ms.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import threading
import time
from collections.abc import Callable


def _open(path: str) -> sqlite3.Connection:
    c = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA synchronous=NORMAL")
    c.execute("PRAGMA wal_autocheckpoint=0")
    c.execute(f"PRAGMA journal_size_limit={64 * 1024 * 1024}")
    c.execute("PRAGMA busy_timeout=0")
    return c


def _maintenance(db: str, stop: threading.Event, a: argparse.Namespace,
                 events: list[tuple[float, float, str]]) -> None:
    c = _open(db)
    c.execute("PRAGMA busy_timeout=2000")
    wal = db + "-wal"
    while not stop.wait(a.checkpoint_interval):
        t0 = time.perf_counter()
        if a.fsync_only:
            fd = os.open(wal, os.O_RDONLY)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
            events.append((t0, time.perf_counter(), "fdatasync"))
            continue
        _busy, log, done = c.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        t2 = time.perf_counter()
        events.append((t0, t2, f"passive {done}/{log}"))
        if os.path.getsize(wal) > a.restart_mib * 1024 * 1024 and done == log:
            c.execute("PRAGMA wal_checkpoint(RESTART)")
            events.append((t2, time.perf_counter(), "restart"))
    c.close()


Result = tuple[list[float], list[float], list[tuple[float, float, str]]]
Events = list[tuple[float, float, str]]


def _paced(a: argparse.Namespace, write: Callable[[float], float | None],
           background: Callable[[threading.Event], None] | None) -> tuple[
               list[float], list[float]]:
    """``write(now)`` at ``--rate`` for ``--seconds`` with ``background(stop)`` running in a
    thread meanwhile; ``write`` returns the start of the write it timed (None: not timed).
    The start and the duration of each timed write."""
    stop = threading.Event()
    th = None if background is None else threading.Thread(target=background, args=(stop,))
    if th is not None:
        th.start()
    starts: list[float] = []
    times: list[float] = []
    period = 1.0 / a.rate
    nxt = time.perf_counter()
    end = nxt + a.seconds
    try:
        while (now := time.perf_counter()) < end:
            if now < nxt:
                time.sleep(nxt - now)
            nxt += period
            t0 = write(now)
            if t0 is not None:
                starts.append(t0)
                times.append(time.perf_counter() - t0)
    finally:
        stop.set()
        if th is not None:
            th.join()
    return starts, times


def _run_sqlite(a: argparse.Namespace, d: str) -> Result:
    db = os.path.join(d, "t.db")
    c = _open(db)
    c.execute("CREATE TABLE journal (seq INTEGER PRIMARY KEY, row TEXT NOT NULL)")
    c.execute("CREATE TABLE moved (seq INTEGER PRIMARY KEY, row TEXT NOT NULL)")
    blob = "x" * a.row_bytes
    if a.prefill_mib:
        # the WAL's blocks allocated and written up front (zeros past its last frame: not
        # valid frames, the checksum chain ends there), so appends overwrite, never extend
        with open(db + "-wal", "ab") as f:
            size = int(a.prefill_mib * 1024 * 1024)
            if a.fallocate:     # unwritten extents: allocated, nothing written
                os.posix_fallocate(f.fileno(), 0, size)
            else:
                f.write(b"\0" * (size - f.tell()))
                f.flush()
            os.fsync(f.fileno())
    events: Events = []
    moved = time.perf_counter()

    def append(now: float) -> float | None:
        nonlocal moved
        if now - moved > 0.1:
            # the store's materialize, on the same thread as the commits (every 0.1 s): its
            # own transaction, timed apart from the appends
            moved = now
            t0 = time.perf_counter()
            try:
                c.execute("BEGIN IMMEDIATE")
                c.execute("INSERT INTO moved (row) SELECT row FROM journal")
                c.execute("DELETE FROM journal")
                c.execute("COMMIT")
            except sqlite3.OperationalError:    # the RESTART holds the lock: next time
                if c.in_transaction:
                    c.execute("ROLLBACK")
            events.append((t0, time.perf_counter(), "materialize"))
        t0 = time.perf_counter()
        try:
            c.execute("INSERT INTO journal (row) VALUES (?)", (blob,))
        except sqlite3.OperationalError:
            # the RESTART holds the lock: the store holds the rows until it ends (not an
            # append's time: counted apart)
            events.append((t0, time.perf_counter(), "held"))
            return None
        return t0

    def maintenance(stop: threading.Event) -> None:
        _maintenance(db, stop, a, events)

    try:
        starts, times = _paced(a, append, None if a.no_checkpoint else maintenance)
    finally:
        c.close()
    return starts, times, events


def _run_raw(a: argparse.Namespace, d: str) -> Result:
    path = os.path.join(d, "raw-wal")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    frame = b"y" * 4120
    events: Events = []
    off = 32
    limit = a.restart_mib * 1024 * 1024

    def syncer(stop: threading.Event) -> None:
        while not stop.wait(a.checkpoint_interval):
            t0 = time.perf_counter()
            os.fdatasync(fd)
            events.append((t0, time.perf_counter(), "fdatasync"))

    def append(now: float) -> float:
        nonlocal off
        t0 = time.perf_counter()
        os.pwrite(fd, frame, off)
        off += len(frame)
        if off > limit:
            off = 32        # the WAL starts over (a RESTART)
        return t0

    try:
        starts, times = _paced(a, append, None if a.no_checkpoint else syncer)
    finally:
        os.close(fd)
    return starts, times, events


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--row-bytes", type=int, default=3000)
    ap.add_argument("--checkpoint-interval", type=float, default=1.0)
    ap.add_argument("--restart-mib", type=float, default=4.0)
    ap.add_argument("--prefill-mib", type=float, default=0.0)
    ap.add_argument("--fallocate", action="store_true",
                    help="--prefill-mib with posix_fallocate instead of written zeros")
    ap.add_argument("--no-checkpoint", action="store_true")
    ap.add_argument("--fsync-only", action="store_true")
    ap.add_argument("--raw", action="store_true")
    ap.add_argument("--show-slow", type=float, default=0.0,
                    help="list the commits slower than this many ms with the maintenance "
                         "step they overlapped")
    a = ap.parse_args()
    d = os.path.join(a.dir, f"wal-stall-{os.getpid()}")
    os.makedirs(d)
    try:
        t_start = time.perf_counter()
        starts, times, events = (_run_raw if a.raw else _run_sqlite)(a, d)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    ms = sorted(t * 1000 for t in times)
    q = statistics.quantiles(ms, n=100)
    print(f"{len(ms)} writes: p50 {q[49]:.3f} ms, p99 {q[98]:.3f} ms, max {ms[-1]:.1f} ms, "
          f">1 ms {sum(t > 1 for t in ms)}, >5 ms {sum(t > 5 for t in ms)}, "
          f"blocked total {sum(t for t in ms if t > 1):.0f} ms")
    kinds: dict[str, list[float]] = {}
    for s, e, k in events:
        kinds.setdefault(k.split()[0], []).append((e - s) * 1000)
    for k, v in kinds.items():
        print(f"  maintenance {k}: {len(v)} x, median {statistics.median(v):.1f} ms, "
              f"max {max(v):.1f} ms")
    if a.show_slow:
        for t0, t in zip(starts, times, strict=True):
            if t * 1000 > a.show_slow:
                over = [f"{k} ({(s - t0) * 1000:+.1f} ms, {(e - s) * 1000:.1f} ms)"
                        for s, e, k in events if s < t0 + t and e > t0 and k != "held"]
                print(f"  at {t0 - t_start:7.3f} s: {t * 1000:6.1f} ms  during "
                      f"{', '.join(over) or 'nothing'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
