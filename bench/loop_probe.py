#!/usr/bin/env python3
"""What holds meterproxy's event loop, measured inside a running proxy (diagnosis, not a
figure of merit: the probe's own wrappers cost a few microseconds per call).

  # run meterproxy from CHECKOUT with the probe; at exit it writes $LOOP_PROBE_OUT.<pid>
  LOOP_PROBE_OUT=/tmp/probe .venv/bin/python bench/latency.py --reps 1 --payloads small,64k \\
      --meterproxy "$PWD/.venv/bin/python bench/loop_probe.py $PWD" \\
      --before "$PWD/.venv/bin/python bench/loop_probe.py /path/to/base/checkout"
  .venv/bin/python bench/loop_probe.py report /tmp/probe     # one block per proxy run
  # with OPENLOOP_DUMP=/tmp/ol also set for latency.py: what the slow requests overlapped
  .venv/bin/python bench/loop_probe.py correlate /tmp/probe /tmp/ol

Recorded, wall and thread CPU time (CPU time is not inflated by other processes taking the
CPU; a gap between them is waiting: preempted, or in a system call such as fsync):
every group commit (``Store._commit_now``), every materialize transaction, every WAL
checkpoint (which thread, mode, frames), steps of named background tasks over 0.2 ms,
garbage collections, loop lag (a 1 ms sleep that wakes late), and each strict request's
wait for its commit: committed inside ``record`` or not, from ``record`` to the commit that
resolved its future, and from that commit to the future's first callback (the waiting
task's wake-up runs right after it, in the same loop pass). ``report`` keeps the
span with load (from the first to the last lag sample).
"""

from __future__ import annotations

import asyncio
import atexit
import collections.abc
import gc
import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

clock = time.perf_counter
REC: dict[str, Any] = {"steps": [], "calls": [], "lag": [], "gc": [], "ck": [], "wait": [], "load": []}
T0 = clock()
REC["T0"] = T0          # perf_counter is CLOCK_MONOTONIC: comparable with bench/openloop.py's


class _Timed(collections.abc.Coroutine):  # type: ignore[type-arg]
    """A task's coroutine, each step timed."""

    def __init__(self, name: str, c: Any) -> None:
        self.n, self.c = name, c

    def _timed(self, fn: Callable[..., Any], *a: Any) -> Any:
        t = clock()
        try:
            return fn(*a)
        finally:
            if (d := clock() - t) > 0.0002:
                REC["steps"].append((t - T0, d, self.n))

    def send(self, v: Any) -> Any:
        return self._timed(self.c.send, v)

    def throw(self, *a: Any) -> Any:
        return self._timed(self.c.throw, *a)

    def close(self) -> None:
        self.c.close()

    def __await__(self) -> Any:
        return self

    def __iter__(self) -> Any:
        return self

    def __next__(self) -> Any:
        return self.send(None)


def install() -> None:
    import proxy.tasks as tasks
    from proxy.store import db

    spawn = tasks.spawn
    tasks.spawn = lambda name, coro: spawn(name, _Timed(name, coro))  # type: ignore[assignment]

    def timed(name: str, orig: Callable[..., Any]) -> Callable[..., Any]:
        def f(*a: Any, **k: Any) -> Any:
            t, c = clock(), time.thread_time()
            try:
                return orig(*a, **k)
            finally:
                REC["calls"].append((t - T0, clock() - t, name, time.thread_time() - c))
        return f

    db.Store._commit_now = timed("commit", db.Store._commit_now)  # type: ignore[method-assign]
    db.Store.materialize = timed("materialize", db.Store.materialize)  # type: ignore[method-assign]
    orig_ck = db.checkpoint

    def ck(conn: Any, mode: str = "PASSIVE") -> Any:
        t, c = clock(), time.thread_time()
        res = None
        try:
            res = orig_ck(conn, mode)
            return res
        finally:
            REC["ck"].append((t - T0, clock() - t, time.thread_time() - c, mode,
                              threading.current_thread() is threading.main_thread(),
                              list(res) if res else None))
    db.checkpoint = ck

    began: dict[int, float] = {}
    committed: dict[int, float] = {}
    record, on_success = db.Store.record, db.Store._on_success

    def woke(fut: Any) -> None:
        t, k = clock(), id(fut)
        t0, t1 = began.pop(k, t), committed.pop(k, t)
        REC["wait"].append((t0 - T0, False, t1 - t0, t - t1))

    def probed_record(self: db.Store, row: Any, wait: bool) -> Any:
        t = clock()
        fut = record(self, row, wait)
        if fut is not None:
            if fut.done():      # committed inside record (or failed there: not counted)
                committed.pop(id(fut), None)
                if not fut.cancelled() and fut.exception() is None:
                    REC["wait"].append((t - T0, True, clock() - t, 0.0))
            else:
                began[id(fut)] = t
                fut.add_done_callback(woke)
        return fut

    def probed_on_success(self: db.Store, rows: Any, seconds: float) -> None:
        t = clock()
        for r in rows:
            if (f := r.future) is not None:
                committed[id(f)] = t
        on_success(self, rows, seconds)
    if hasattr(db.Store, "_measure"):    # the group commit's load sample (a window each)
        measure = db.Store._measure

        def probed_measure(self: db.Store) -> None:
            before = (self._load_at, self._load_demand, self._spare_cpu)
            measure(self)
            if self._load_at != before[0]:
                span = self._load_at - before[0]
                REC["load"].append((clock() - T0, (self._load_demand - before[1]) / span,
                                    time.thread_time(), self._spare_cpu))
        db.Store._measure = probed_measure  # type: ignore[method-assign]
    db.Store.record = probed_record  # type: ignore[method-assign]
    db.Store._on_success = probed_on_success  # type: ignore[method-assign]

    starts: dict[int, float] = {}

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            starts[info["generation"]] = clock()
        else:
            s = starts.pop(info["generation"], clock())
            REC["gc"].append((s - T0, clock() - s, info["generation"]))
    gc.callbacks.append(on_gc)

    async def lag() -> None:
        while True:
            t = clock()
            await asyncio.sleep(0.001)
            REC["lag"].append((t - T0, clock() - t - 0.001))

    forever = db.Store.materialize_forever

    async def materialize_forever(self: db.Store, *a: Any, **k: Any) -> None:
        tasks.spawn("loop-probe-lag", lag())
        await forever(self, *a, **k)
    db.Store.materialize_forever = materialize_forever  # type: ignore[method-assign]

    def dump() -> None:
        if out := os.environ.get("LOOP_PROBE_OUT"):
            with open(f"{out}.{os.getpid()}", "w") as fh:
                json.dump(REC, fh)
    atexit.register(dump)


def _q(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


def report(prefix: str) -> None:
    import glob
    for f in sorted(glob.glob(prefix + ".*"), key=lambda p: int(p.rsplit(".", 1)[1])):
        with open(f) as fh:
            r = json.load(fh)
        if not r["lag"]:
            continue        # a CLI command (customers/keys create), not a served run
        t0, t1 = min(x[0] for x in r["lag"]), max(x[0] for x in r["lag"])
        span = t1 - t0
        print(f"== {r.get('root', '?')} (pid {f.rsplit('.', 1)[1]}), {span:.1f} s")
        for name in ("commit", "materialize"):
            c = [x for x in r["calls"] if x[2] == name and t0 <= x[0] <= t1]
            w, cpu = [x[1] for x in c], [x[3] for x in c]
            print(f"  {name:12} {len(c) / span:5.0f}/s  wall p50 {1e3 * _q(w, .5):.3f} p99 "
                  f"{1e3 * _q(w, .99):.3f} max {1e3 * max(w or [0]):.2f} ms | CPU p50 "
                  f"{1e3 * _q(cpu, .5):.3f} p99 {1e3 * _q(cpu, .99):.3f} max "
                  f"{1e3 * max(cpu or [0]):.2f} ms | {1e3 * sum(w) / span:.1f} ms/s")
        ws = [x for x in r.get("wait", []) if t0 <= x[0] <= t1]
        if ws:
            late = [x for x in ws if not x[1]]
            tot = [x[2] + x[3] for x in late]
            print(f"  strict wait   {len(ws)} rows, {100 * (len(ws) - len(late)) / len(ws):.0f}% "
                  f"committed in record | the others: record->commit p50 "
                  f"{1e3 * _q([x[2] for x in late], .5):.3f} p99 {1e3 * _q([x[2] for x in late], .99):.3f}"
                  f" ms, commit->wake p50 {1e3 * _q([x[3] for x in late], .5):.3f} p99 "
                  f"{1e3 * _q([x[3] for x in late], .99):.3f} ms, total p99 {1e3 * _q(tot, .99):.3f}"
                  f" max {1e3 * max(tot or [0]):.2f} ms")
            every = [x[2] + x[3] for x in ws]
            print(f"  strict wait   every row, record -> wake-up (in record: the commit): p50 "
                  f"{1e3 * _q(every, .5):.3f} p90 {1e3 * _q(every, .9):.3f} p99 "
                  f"{1e3 * _q(every, .99):.3f} max {1e3 * max(every):.2f} ms, mean "
                  f"{1e3 * sum(every) / len(every):.3f} ms")
        ld = [x for x in r.get("load", []) if t0 <= x[0] <= t1]
        if len(ld) > 1:
            cpu = [(b[2] - a[2]) / (b[0] - a[0]) for a, b in itertools.pairwise(ld)]
            print(f"  load windows  {len(ld)}: demand share " +
                  " ".join(f"{x[1]:.2f}" for x in ld) + " | CPU share " +
                  " ".join(f"{c:.2f}" for c in cpu) + " | group commits in " +
                  f"{sum(1 for x in ld if not x[3])} windows")
        for x in r["ck"]:
            if t0 <= x[0] <= t1:
                print(f"  checkpoint {x[3]:8} {'loop  ' if x[4] else 'thread'} wall "
                      f"{1e3 * x[1]:6.2f} ms CPU {1e3 * x[2]:5.2f} ms frames {x[5]}")
        by: dict[str, list[float]] = {}
        for t, d, n in r["steps"]:
            if t0 <= t <= t1 and n != "loop-probe-lag":
                by.setdefault(n, []).append(d)
        for n, ds in sorted(by.items(), key=lambda kv: -max(kv[1])):
            print(f"  task {n:20} steps over 0.2 ms: {len(ds)}, max {1e3 * max(ds):.2f} ms")
        for g in (0, 1, 2):
            ds = [x[1] for x in r["gc"] if x[2] == g and t0 <= x[0] <= t1]
            print(f"  gc gen{g}: {len(ds)}, max {1e3 * max(ds or [0]):.2f} ms")
        lag = [x[1] for x in r["lag"]]
        print(f"  loop lag: p50 {1e3 * _q(lag, .5):.2f} p99 {1e3 * _q(lag, .99):.2f} max "
              f"{1e3 * max(lag):.2f} ms")


def correlate(prefix: str, requests: str) -> None:
    """Which recorded events the slow requests of each probed open-loop run overlapped.
    ``requests``: the prefix ``OPENLOOP_DUMP`` gave bench/openloop.py (each run's requests
    with the time they were sent, on the same clock as the probe's). A request is slow at
    90% of its run's p99 or more (and at least 1.5 ms); an event overlaps it when it ran
    between its sending and its answer: a commit or materialize transaction over 0.5 ms, a
    checkpoint (in any thread), a named task's step over 0.2 ms, a collection, or the loop
    waking more than 1 ms late (LAG). Also prints when the slow requests came (clusters:
    seconds into the proxy's run, and how many)."""
    import collections
    import glob
    probes = []
    for f in glob.glob(prefix + ".*"):
        with open(f) as fh:
            r = json.load(fh)
        if r["lag"] and "T0" in r:
            probes.append((r["T0"] + r["lag"][0][0], r["T0"] + r["lag"][-1][0], r, f))
    for f in sorted(glob.glob(requests + ".*")):
        with open(f) as fh:
            res = json.load(fh)
        sends = [x[2] for x in res]
        match = [p for p in probes if sends and p[0] <= min(sends) and max(sends) <= p[1]]
        if not match:
            continue        # a run of a target without the probe (bare, nginx)
        r, t0 = match[0][2], match[0][2]["T0"]
        lats = sorted(x[0] for x in res)
        p99 = lats[int(0.99 * len(lats))]
        slow = sorted((x for x in res if x[0] >= max(0.0015, 0.9 * p99)), key=lambda x: x[2])
        ev = [(t0 + t, w, name) for t, w, name, _cpu in r["calls"] if w > 0.0005]
        ev += [(t0 + c[0], c[1], f"checkpoint-{c[3]}") for c in r["ck"]]
        ev += [(t0 + t, w, f"step-{n}") for t, w, n in r["steps"] if n != "loop-probe-lag"]
        ev += [(t0 + t, w, f"gc{g}") for t, w, g in r["gc"]]
        ev += [(t0 + t + 0.001, lag, "LAG") for t, lag in r["lag"] if lag > 0.001]
        print(f"== {f} ({match[0][3]}): {len(res)} requests, p50 {1e3 * lats[len(lats) // 2]:.2f}"
              f" p99 {1e3 * p99:.2f} ms, {len(slow)} slow")
        kinds: collections.Counter[tuple[str, ...]] = collections.Counter()
        for lat, _st, sent in slow:
            kinds[tuple(sorted({e[2] for e in ev if e[0] < sent + lat and e[0] + e[1] > sent}))] += 1
        for k, v in kinds.most_common(10):
            print(f"  {v:5d}  {', '.join(k) or '(nothing recorded)'}")
        clusters: list[list[float]] = []
        for _lat, _st, sent in slow:
            if clusters and sent - clusters[-1][-1] < 0.02:
                clusters[-1].append(sent)
            else:
                clusters.append([sent])
        print("  clusters: " + " ".join(f"{c[0] - t0:.3f}s:{len(c)}" for c in clusters[:40]))


if __name__ == "__main__":
    if sys.argv[1] == "report":
        report(sys.argv[2])
        sys.exit(0)
    if sys.argv[1] == "correlate":
        correlate(sys.argv[2], sys.argv[3])
        sys.exit(0)
    root = os.path.abspath(sys.argv.pop(1))
    sys.path.insert(0, root)
    REC["root"] = root
    install()
    from proxy.cli import main
    sys.exit(main())
