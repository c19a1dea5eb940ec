"""bench/cpu_split.py: the off-CPU rule (time blocked in state D, per thread) on the real
output format of ``perf script -F time,trace`` for sched_switch."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import cpu_split

LINES = """\
  1005.000100: prev_comm=python prev_pid=10 prev_prio=120 prev_state=D ==> next_comm=swapper/1 next_pid=0 next_prio=120
  1005.000200: prev_comm=python prev_pid=11 prev_prio=139 prev_state=D ==> next_comm=swapper/0 next_pid=0 next_prio=120
  1005.000300: prev_comm=swapper/0 prev_pid=0 prev_prio=120 prev_state=R ==> next_comm=kw next_pid=99 next_prio=120
  1005.001600: prev_comm=swapper/1 prev_pid=0 prev_prio=120 prev_state=R ==> next_comm=python next_pid=10 next_prio=120
  1005.002000: prev_comm=python prev_pid=10 prev_prio=120 prev_state=S ==> next_comm=swapper/1 next_pid=0 next_prio=120
  1005.002500: prev_comm=swapper/1 prev_pid=0 prev_prio=120 prev_state=R ==> next_comm=python next_pid=10 next_prio=120
  1005.003200: prev_comm=kw prev_pid=99 prev_prio=120 prev_state=D ==> next_comm=python next_pid=11 next_prio=139
  1005.004000: prev_comm=python prev_pid=10 prev_prio=120 prev_state=D ==> next_comm=swapper/1 next_pid=0 next_prio=120
"""


def test_only_d_state_waits_of_the_given_threads_count_until_they_run_again() -> None:
    got = cpu_split.blocked_in_d(LINES, {"10", "11"})
    # 10: D at .0001, in at .0016 (1.5 ms); its S sleep is not counted; the D at .004
    # never ends in the record (not counted). 11: D at .0002, in at .0032 (3.0 ms).
    # 99 (not ours) blocked too: not reported.
    assert got == {"10": pytest.approx(1.5), "11": pytest.approx(3.0)}


def test_perf_groups() -> None:
    assert [cpu_split.perf_group(d) for d in (
        "[kernel.kallsyms]", "libpython3.11.so.1.0", "libsqlite3.so.0.8.6",
        "_sqlite3.cpython-311-x86_64-linux-gnu.so", "loop.cpython-311-x86_64-linux-gnu.so")] \
        == ["kernel", "python", "sqlite", "sqlite", "other C"]
