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


def _switch(comm: str, pid: int, cpu: int, t: str, prev: str, prev_pid: int, state: str,
            nxt: str, next_pid: int) -> str:
    """One sched_switch header line as ``perf script`` prints it (with call chains)."""
    return (f"{comm:>8} {pid:>5} [{cpu:03d}]  {t}: sched:sched_switch: prev_comm={prev} "
            f"prev_pid={prev_pid} prev_prio=120 prev_state={state} ==> next_comm={nxt} "
            f"next_pid={next_pid} next_prio=120")


# ``perf script`` of sched_switch with call chains (-g), as it prints them; trimmed stacks
STACKS = f"""\
{_switch("python", 10, 1, "2000.000100", "python", 10, "D", "swapper/1", 0)}
\tffffffff82266208 __schedule+0x628 ([kernel.kallsyms])
\tffffffff82266b73 schedule+0x23 ([kernel.kallsyms])
\tffffffff8226b4b6 down_write+0x66 ([kernel.kallsyms])
\tffffffff8226af4d rwsem_down_write_slowpath+0x21d ([kernel.kallsyms])
\tffffffff817dd9a3 ext4_da_get_block_prep+0x283 ([kernel.kallsyms])
\tffffffff816d69ac vfs_write+0x29c ([kernel.kallsyms])
\t           f64c7 __libc_pwrite+0x57 (/usr/lib/x86_64-linux-gnu/libc.so.6)

{_switch("swapper", 0, 1, "2000.002100", "swapper/1", 0, "R", "python", 10)}
\tffffffff82266208 __schedule+0x628 ([kernel.kallsyms])

{_switch("python", 10, 1, "2000.003000", "python", 10, "D", "swapper/1", 0)}
\tffffffff82266208 __schedule+0x628 ([kernel.kallsyms])
\tffffffff82266c3f io_schedule+0x3f ([kernel.kallsyms])
\tffffffff8172fdcb do_fsync+0x3b ([kernel.kallsyms])
\t           fed0a fdatasync+0x3a (/usr/lib/x86_64-linux-gnu/libc.so.6)

{_switch("python", 11, 0, "2000.003500", "python", 11, "D", "swapper/0", 0)}
\tffffffff8172fdcb do_fsync+0x3b ([kernel.kallsyms])

{_switch("swapper", 0, 1, "2000.007000", "swapper/1", 0, "R", "python", 10)}
\tffffffff82266208 __schedule+0x628 ([kernel.kallsyms])

{_switch("python", 10, 1, "2000.008000", "python", 10, "S", "swapper/1", 0)}
\tffffffff82266208 __schedule+0x628 ([kernel.kallsyms])
\tffffffff816d69ac vfs_write+0x29c ([kernel.kallsyms])

{_switch("swapper", 0, 1, "2000.009000", "swapper/1", 0, "R", "python", 10)}
"""


def test_the_loop_threads_d_waits_are_named_by_their_kernel_stack() -> None:
    """Thread 10 waits 2.0 ms reserving a block under i_data_sem, then 4.0 ms in an
    fdatasync; its S sleep (even inside a write) is no I/O wait; thread 11 is not asked."""
    got = cpu_split.d_stacks(STACKS, "10")
    assert got == {"write: block reservation (i_data_sem)": [pytest.approx(2.0)],
                   "fdatasync": [pytest.approx(4.0)]}
    assert cpu_split.classify(["__schedule", "schedule", "io_schedule", "folio_wait_bit",
                               "vfs_write"]) == "write: page or buffer wait"
    assert cpu_split.classify(["__schedule", "schedule", "x", "y", "z"]) \
        == "other: x < y < z"
