#!/usr/bin/env python3
"""What one materialize transaction holds the event loop for, in wall and CPU time, and the
WAL it writes: the Store alone (no proxy), rows recorded in group commits of B rows, then
materialized in slices as ``materialize_forever`` does every 100 ms. Wall-clock, so pin it
and run it on a quiet CPU (CPU time, which other processes do not inflate, is printed too);
callgrind (bench/store_cost.py) does not see the kernel's share (the WAL's write calls).

  taskset -c 1 .venv/bin/python bench/materialize_cost.py --ids random --slice 256
  taskset -c 1 .venv/bin/python bench/materialize_cost.py --ids ordered --slice 64 --audit 200000

--ids: ``ordered`` (time-ordered, as the proxy generates them since 2026-11-29) or ``random``
(32 random hex digits: generated before, and what many clients send); --audit preloads the
audit table with that many rows (a long-running proxy's), --pass-rows is one 100 ms pass
(384: half the bare maximum on the reference machine).

--reader: each pass is moved as a reader moves it instead of in ``materialize_forever``'s
slices, and the longest stretch the loop was held during it is printed (a task measuring
the time between its turns on the loop): ``block`` is one ``Store.materialize()`` (what the
admin API, the usage page and the flusher ran before 1 Dec 2026), ``catch-up`` is
``Store.catch_up()`` (64-row transactions, the loop served between them):

  taskset -c 1 .venv/bin/python bench/materialize_cost.py --pass-rows 1024 --reader block
  taskset -c 1 .venv/bin/python bench/materialize_cost.py --pass-rows 1024 --reader catch-up
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.request.pipeline import new_request_id
from proxy.store.db import MATERIALIZE_SLICE, Store, UsageItem, UsageRow, checkpoint


async def main(a: argparse.Namespace) -> None:
    rid = (lambda: os.urandom(16).hex()) if a.ids == "random" else new_request_id
    with tempfile.TemporaryDirectory() as d:
        store = Store.open(Path(d) / "m.db")
        if a.audit:
            with store.conn:
                store.conn.executemany(
                    "INSERT INTO audit(request_id, at_ms, customer_id, key_id, rule, "
                    "rules_version, status, meter, quantity, credits, billable, flags, method, "
                    "path) VALUES (?,1,'bench','k','all','v1',200,'api_calls',1,0,1,'','GET','/')",
                    [(rid(),) for _ in range(a.audit)])
        checkpoint(store.conn, "TRUNCATE")
        wall: list[float] = []
        held: list[float] = []
        cpu = 0.0
        rows = 0
        for _ in range(a.passes):
            for i in range(a.pass_rows):
                store.record(UsageRow(rid(), time.time(), "bench", "key_abcdef", "all", "v1abc",
                                      200, [UsageItem("api_calls", 1_000_000, 0, 1_000_000, "")],
                                      method="GET", path="/small"), wait=False)
                if i % a.commit_rows == a.commit_rows - 1:
                    store._commit_now()
            store._commit_now()
            if a.reader:
                held.append(await _reader_pass(store, a.reader))
                continue
            while True:
                t, c = time.perf_counter(), time.thread_time()
                n = store.materialize(limit=a.slice)
                cpu += time.thread_time() - c
                wall.append(time.perf_counter() - t)
                rows += n
                if n < a.slice:
                    break
        if a.reader:
            held.sort()
            print(f"reader {a.reader}, {a.pass_rows} rows waiting: the loop held p50 "
                  f"{1000 * held[len(held) // 2]:.3f} max {1000 * held[-1]:.3f} ms per pass")
        else:
            frames = checkpoint(store.conn, "PASSIVE")[1]
            wall.sort()
            print(f"ids {a.ids} slice {a.slice} audit {a.audit}: per transaction p50 "
                  f"{1000 * wall[len(wall) // 2]:.3f} p90 {1000 * wall[int(len(wall) * .9)]:.3f} "
                  f"max {1000 * wall[-1]:.3f} ms; CPU {1e6 * cpu / rows:.2f} us/row; "
                  f"WAL {frames / rows:.2f} frames/row (group commits and materialize)")
        store._closed = True
        store.conn.close()
        store._close_maint()


async def _reader_pass(store: Store, how: str) -> float:
    """One reader's pass over what waits; returns the longest time the loop was held."""
    longest = 0.0
    done = False

    async def ticker() -> None:
        nonlocal longest
        while not done:
            t = time.perf_counter()
            await asyncio.sleep(0)
            longest = max(longest, time.perf_counter() - t)

    tick = asyncio.ensure_future(ticker())
    await asyncio.sleep(0)          # the ticker is waiting for its turn
    if how == "block":
        store.materialize()
    else:
        await store.catch_up()
    done = True
    await tick
    return longest


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ids", choices=("ordered", "random"), default="ordered")
    ap.add_argument("--slice", type=int, default=MATERIALIZE_SLICE)
    ap.add_argument("--audit", type=int, default=0)
    ap.add_argument("--passes", type=int, default=40)
    ap.add_argument("--pass-rows", type=int, default=384)
    ap.add_argument("--commit-rows", type=int, default=2)
    ap.add_argument("--reader", choices=("block", "catch-up"))
    asyncio.run(main(ap.parse_args()))
