#!/usr/bin/env python3
"""Raw SQLite costs behind the strict store's WAL handling (no proxy, no Store):

1. the checkpoint that bounds the WAL, run (as the Store does) after a PASSIVE pass over
   ~5,800 frames with ~50 more frames written since: TRUNCATE (ftruncate to zero) vs
   RESTART (the next commit starts the WAL over, cut to journal_size_limit);
2. the journal append of one group commit, with and without AUTOINCREMENT (which also
   writes ``sqlite_sequence``: a second WAL frame per commit).

  taskset -c 1 .venv/bin/python bench/wal_cost.py        # wall clock: run it on a quiet CPU
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time


def _db(d: str, autoincrement: bool = False) -> sqlite3.Connection:
    c = sqlite3.connect(os.path.join(d, "t.db"), isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA synchronous=NORMAL")
    c.execute("PRAGMA wal_autocheckpoint=0")
    c.execute(f"PRAGMA journal_size_limit={16 * 1024 * 1024}")
    c.execute("CREATE TABLE journal (seq INTEGER PRIMARY KEY"
              f"{' AUTOINCREMENT' if autoincrement else ''}, row BLOB NOT NULL)")
    return c


def checkpoints() -> None:
    row = "x" * 300
    for mode in ("TRUNCATE", "RESTART"):
        with tempfile.TemporaryDirectory() as d:
            c = _db(d)
            other = sqlite3.connect(os.path.join(d, "t.db"), isolation_level=None)
            took, cpu = [], []
            for _ in range(5):
                for _ in range(5000):
                    c.execute("INSERT INTO journal(row) VALUES (?)", (row,))
                other.execute("PRAGMA wal_checkpoint(PASSIVE)")    # the worker thread's pass
                for _ in range(50):
                    c.execute("INSERT INTO journal(row) VALUES (?)", (row,))
                size = os.stat(os.path.join(d, "t.db-wal")).st_size
                t, tc = time.perf_counter(), time.thread_time()
                c.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
                took.append(time.perf_counter() - t)
                cpu.append(time.thread_time() - tc)
            other.close()
            c.close()
        print(f"{mode:8} checkpoint after a passive pass ({size / 1e6:.1f} MB WAL): "
              + ", ".join(f"{1e3 * x:.2f}" for x in took) + " ms wall; CPU "
              + ", ".join(f"{1e3 * x:.2f}" for x in cpu) + " ms")


def appends() -> None:
    row = "x" * 250
    for ai in (True, False):
        with tempfile.TemporaryDirectory() as d:
            c = _db(d, ai)
            cur = c.cursor()
            took = []
            for _ in range(5):
                for _ in range(200):
                    t = time.perf_counter()
                    cur.execute("INSERT INTO journal(row) VALUES (?)", (row,))
                    took.append(time.perf_counter() - t)
                c.execute("BEGIN IMMEDIATE")
                c.execute("DELETE FROM journal")
                c.execute("COMMIT")
            c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            for _ in range(100):
                cur.execute("INSERT INTO journal(row) VALUES (?)", (row,))
            frames = os.stat(os.path.join(d, "t.db-wal")).st_size / (4096 + 24) / 100
            c.close()
        took.sort()
        print(f"journal append {'with' if ai else 'without'} AUTOINCREMENT: p50 "
              f"{1e6 * took[len(took) // 2]:.1f} us, p90 {1e6 * took[int(len(took) * .9)]:.1f} us, "
              f"{frames:.2f} WAL frames per commit")


if __name__ == "__main__":
    checkpoints()
    appends()
