"""bench/stalls.py: which requests the latency benchmark leaves out of its calm table (a
pure function: the same rule for every target, so it must neither keep a stalled request
nor drop a clean one), and the detector itself seeing a CPU taken away."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import wait_until

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_stalls", BENCH / "stalls.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


stalls = _load()


def test_requests_overlapping_a_stall_or_its_drain_are_left_out_and_no_others() -> None:
    windows = [(10.0, 10.002)]                  # a 2 ms stall: its drain lasts to 10.004
    samples = [(9.990, 0.001),                  # ended before it: kept
               (9.999, 0.002),                  # in flight when it began: left out
               (10.001, 0.0005),                # sent during it: left out
               (10.003, 0.0005),                # sent while the backlog drained: left out
               (10.005, 0.0005)]                # after the drain: kept
    kept, left_out, stalled = stalls.outside(samples, windows)
    assert kept == [0.001, 0.0005]
    assert left_out == 3
    assert abs(stalled - 2.0) < 1e-6


@given(st.lists(st.tuples(st.floats(0, 10), st.floats(0.0001, 0.05)), max_size=40),
       st.lists(st.tuples(st.floats(0, 10), st.floats(0.0001, 0.02)), max_size=10))
def test_a_request_is_kept_exactly_when_no_stall_span_touches_it(
        reqs: list[tuple[float, float]], stalls_: list[tuple[float, float]]) -> None:
    windows = sorted((s, s + d) for s, d in stalls_)
    kept, left_out, _ = stalls.outside(reqs, windows)
    expect = [d for t, d in reqs
              if not any(s <= t + d and t <= e + (e - s) for s, e in windows)]
    assert sorted(kept) == sorted(expect)
    assert left_out == len(reqs) - len(expect)


async def test_the_detector_records_a_span_in_which_a_higher_priority_task_held_its_cpu(
        tmp_path: Path) -> None:
    """A SCHED_FIFO task above the detector spins on its CPU for 20 ms: the detector (FIFO
    priority 1, which no normal process can delay) wakes late and writes that span."""
    out = tmp_path / "stalls.txt"
    cpu = sorted(os.sched_getaffinity(0))[0]
    det = await asyncio.create_subprocess_exec(
        sys.executable, str(BENCH / "stalls.py"), "--cpu", str(cpu), "--out", str(out))
    try:
        # the detector opens its output once it runs at SCHED_FIFO on its CPU
        await wait_until(out.exists, what="the detector's output file")
        spin = (f"import os, time; os.sched_setaffinity(0, {{{cpu}}}); "
                "os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(2)); "
                "t = time.monotonic_ns(); print(t, flush=True)\n"
                "while time.monotonic_ns() - t < 20_000_000: pass\n"
                "print(time.monotonic_ns())")
        spinner = await asyncio.create_subprocess_exec(sys.executable, "-c", spin,
                                                       stdout=asyncio.subprocess.PIPE)
        printed, _ = await asyncio.wait_for(spinner.communicate(), 30)
        assert spinner.returncode == 0
        began, ended = (int(x) / 1e9 for x in printed.split())


        def covered() -> bool:
            return any(s <= began + 0.002 and e >= ended - 0.002 and e - s >= 0.015
                       for s, e in stalls.read_windows([str(out)]))
        await wait_until(covered, timeout=5,
                         what=f"a recorded stall covering {began:.4f}-{ended:.4f}")
    finally:
        det.terminate()
        await asyncio.wait_for(det.wait(), 10)
    assert det.returncode == 0
