#!/usr/bin/env python3
"""A CPU stall detector for the wall-clock benchmarks (like rt-tests' cyclictest).

  python bench/stalls.py --cpu 1 --out /tmp/stalls-cpu1.txt [--period-us 1000]
      [--threshold-us 250]

Pinned to one CPU at SCHED_FIFO priority 1 (root), it sleeps ``--period-us`` at a time and
writes a line ``<start_ns> <end_ns>`` (CLOCK_MONOTONIC, the clock of Python's
``time.perf_counter`` and ``time.monotonic`` on Linux) for every wake-up later than
``--threshold-us``: a span in which that CPU ran nothing of normal priority. A real-time
thread preempts every normal process at once, so the proxy under test, the origin and the
load generator (all normal priority) cannot delay it: what delays it is the host taking the
virtual CPU away (steal), interrupts, or the kernel running with preemption off. On this
project's machine (a VM) such stalls of 1-20 ms come and go with the host's load, and each
one stalls every request in flight on that CPU for its length.

``bench/latency.py`` runs one per pinned CPU and reports each run's p50/p99 also without the
requests that overlapped a stall (or were sent within one stall length after it, while the
backlog drained), applying the same rule to every target; a target whose own code stalled
its CPU would show more stalls than bare in the same run, which the table states.
"""

from __future__ import annotations

import argparse
import bisect
import os
import signal
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--period-us", type=int, default=1000)
    ap.add_argument("--threshold-us", type=int, default=250)
    a = ap.parse_args()
    os.sched_setaffinity(0, {a.cpu})
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except PermissionError:
        print("stalls.py: SCHED_FIFO needs root (or CAP_SYS_NICE)", file=sys.stderr)
        return 2
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    period = a.period_us * 1000
    threshold = a.threshold_us * 1000
    clock = time.monotonic_ns
    with open(a.out, "w", buffering=1) as out:     # line-buffered: readable while running
        due = clock() + period
        while not stop:
            delay = due - clock()
            if delay > 0:
                time.sleep(delay / 1e9)
            now = clock()
            if now - due > threshold:
                out.write(f"{due} {now}\n")
            due = max(due + period, now + period // 2)
    return 0



def read_windows(paths: list[str]) -> list[tuple[float, float]]:
    """The stalls recorded so far in these files, as (start, end) seconds on the
    ``time.perf_counter`` clock, sorted by start."""
    out: list[tuple[float, float]] = []
    for path in paths:
        try:
            with open(path) as fh:
                for line in fh:
                    parts = line.split()
                    if len(parts) == 2:
                        out.append((int(parts[0]) / 1e9, int(parts[1]) / 1e9))
        except FileNotFoundError:
            continue
    out.sort()
    return out


def outside(samples: list[tuple[float, float]], windows: list[tuple[float, float]]
            ) -> tuple[list[float], int, float]:
    """The latencies of the (send time, latency) samples that neither overlapped a stall nor
    were sent within one stall length after it ended (the backlog it left draining), the
    number left out, and the stalled time (ms) within the samples' span."""
    if not samples:
        return [], 0, 0.0
    first = min(t for t, _ in samples)
    last = max(t + d for t, d in samples)
    spans = [(s, e + (e - s)) for s, e in windows if e >= first and s <= last]
    stalled = sum(min(e, last) - max(s, first) for s, e in windows
                  if e >= first and s <= last) * 1e3
    merged: list[list[float]] = []
    for s, e in sorted(spans):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    starts = [m[0] for m in merged]
    kept: list[float] = []
    for t, d in samples:
        i = bisect.bisect_right(starts, t + d) - 1      # the last span starting before the end
        if i >= 0 and merged[i][1] >= t:
            continue
        kept.append(d)
    return kept, len(samples) - len(kept), stalled


if __name__ == "__main__":
    sys.exit(main())
