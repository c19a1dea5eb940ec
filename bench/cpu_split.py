#!/usr/bin/env python3
"""Where each target's CPU goes per request at one fixed open-loop rate: one table.

  .venv/bin/python bench/cpu_split.py                      # bare, strict; small; 2,000/s
  .venv/bin/python bench/cpu_split.py --rate 2500 --payload 64k --perf
  .venv/bin/python bench/cpu_split.py --before "$PWD/.venv/bin/python \
      bench/checkout_proxy.py /tmp/snap" --before-dir /dev/shm   # strict on tmpfs beside it

At a fixed rate the proxy's loop is idle between requests, so the tail of the latency is a
queueing matter: what decides it is how much CPU the loop thread spends per request, in
user space *and* in the kernel. callgrind (``bench/instructions.sh``) counts user-space
instructions only, at saturation, where a strict group commit carries many rows; this
counts wall CPU per request at a moderate rate (about one commit per request or two), per
thread, from ``/proc/<pid>/task/*/stat``, and what the process wrote (``/proc/<pid>/io``:
write calls, and bytes sent to storage). ``--perf`` adds a ``perf record`` of the proxy
(4,999 Hz) and splits its samples by shared object (the interpreter, the kernel, SQLite,
...) in microseconds per request; ``--offcpu`` records the system's ``sched_switch`` events
instead and reports, per proxy thread, the time it spent blocked in the kernel waiting for
I/O (state ``D``: an ``fdatasync``, a page under writeback); ``--offcpu --stacks`` also
splits the loop thread's waits by kernel stack (``STACK_CLASSES``).

Pinning as in bench/latency.py: origin and load generator (inside the origin's process)
on CPU 0, the proxy on CPU 1. Targets are restarted for every run and interleaved per rep;
each figure is the median over the reps. Needs a quiet machine for the wall-clock columns;
the CPU and I/O columns are counts, but other processes on the proxy's CPU still inflate
them (caches, time slices), so compare targets of one run only.
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import latency
import run

CLK = os.sysconf("SC_CLK_TCK")
PERF_HZ = 4999


def thread_cpu(pid: int) -> dict[str, tuple[float, float]]:
    """Thread name (with its tid's rank: the loop thread is the process's own) -> (user s,
    system s)."""
    out: dict[str, tuple[float, float]] = {}
    for task in sorted(Path(f"/proc/{pid}/task").iterdir(), key=lambda p: int(p.name)):
        try:
            raw = (task / "stat").read_text()
        except FileNotFoundError:
            continue
        name = raw[raw.index("(") + 1:raw.rindex(")")]
        f = raw.rsplit(")", 1)[1].split()
        key = "loop" if int(task.name) == pid else f"{name}:{task.name}"
        out[key] = (int(f[11]) / CLK, int(f[12]) / CLK)
    return out


def process_io(pid: int) -> dict[str, int]:
    lines = Path(f"/proc/{pid}/io").read_text().splitlines()
    return {k: int(v) for k, v in (line.split(": ") for line in lines)}


def perf_group(dso: str) -> str:
    if dso == "[kernel.kallsyms]":
        return "kernel"
    if dso.startswith("libpython"):
        return "python"
    if "sqlite3" in dso:
        return "sqlite"
    return "other C"


def perf_split(data: Path, n: int) -> dict[str, float]:
    """us per request by shared object (grouped: the kernel, the interpreter, SQLite and
    its binding, other C code), from a perf record of the proxy."""
    out = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "-n",
                          "--sort", "dso", "--stdio"], capture_output=True, text=True).stdout
    split: dict[str, float] = {}
    for line in out.splitlines():
        m = re.match(r"\s+[\d.]+%\s+(\d+)\s+(\S+)", line)
        if m:
            dso = perf_group(m.group(2))
            split[dso] = split.get(dso, 0.0) + int(m.group(1)) / PERF_HZ / n * 1e6
    return split


def offcpu(data: Path, tids: set[str]) -> dict[str, float]:
    """ms blocked in state D per proxy thread, from a perf record of sched_switch."""
    return blocked_in_d(subprocess.run(["perf", "script", "-i", str(data), "-F", "time,trace"],
                                       capture_output=True, text=True).stdout, tids)


# the loop thread's waits in state D by kernel stack: the first rule whose every word is in
# the stack's function names names the wait (``--stacks``)
STACK_CLASSES = (
    ("fdatasync", ("do_fsync",)),
    ("write: block reservation (i_data_sem)", ("vfs_write", "ext4_da_get_block_prep",
                                                "rwsem_down")),
    ("write: page or buffer wait", ("vfs_write", "io_schedule")),
    ("write: other", ("vfs_write",)),
    ("truncate", ("do_truncate",)),
    ("read", ("vfs_read",)),
)


# the first stack seen of each class (``--stacks -v`` prints them)
EXAMPLES: dict[str, list[str]] = {}


def classify(stack: list[str]) -> str:
    funcs = " ".join(stack)
    for name, words in STACK_CLASSES:
        if all(w in funcs for w in words):
            if name == "write: page or buffer wait":    # where in the write: its ext4 step
                step = next((f for f in stack if f.startswith("ext4_")), "")
                return f"{name} ({step})" if step else name
            return name
    return "other: " + " < ".join(f for f in stack[2:5])


def d_stacks(out: str, tid: str) -> dict[str, list[float]]:
    """``perf script`` of sched_switch with call chains -> each wait of ``tid`` in state D
    (ms) grouped by ``classify`` of its kernel stack."""
    head = re.compile(r"\s([\d.]+):\s+sched:sched_switch:.* prev_pid=(\d+) .*prev_state=(\S+)"
                      r" ==> .* next_pid=(\d+)")
    waits: dict[str, list[float]] = defaultdict(list)
    since: tuple[float, str] | None = None
    stack: list[str] | None = None
    pending_t: float | None = None
    for line in [*out.splitlines(), ""]:
        if line[:1] in ("\t", " ") and stack is not None:
            parts = line.split()
            if len(parts) >= 2:
                stack.append(parts[1].split("+", 1)[0])
            continue
        if stack is not None and pending_t is not None:    # the stack of a D switch-out
            since = (pending_t, classify(stack))
            EXAMPLES.setdefault(since[1], stack)
        stack, pending_t = None, None
        m = head.search(line)
        if not m:
            continue
        t, prev, state, nxt = float(m.group(1)), m.group(2), m.group(3), m.group(4)
        if nxt == tid and since is not None:
            waits[since[1]].append((t - since[0]) * 1000)
            since = None
        if prev == tid and state.startswith("D"):
            stack, pending_t = [], t
    return dict(waits)


def blocked_in_d(out: str, tids: set[str]) -> dict[str, float]:
    """``perf script -F time,trace`` lines of sched_switch -> ms each of ``tids`` spent
    between being switched out in state D (uninterruptible: waiting for I/O) and being
    switched in again."""
    since: dict[str, float] = {}
    blocked: dict[str, float] = defaultdict(float)
    pat = re.compile(r"\s*([\d.]+):\s+prev_comm=.* prev_pid=(\d+) .*prev_state=(\S+) ==> "
                     r"next_comm=.* next_pid=(\d+)")
    for line in out.splitlines():
        m = pat.match(line)
        if not m:
            continue
        t, prev, state, nxt = float(m.group(1)), m.group(2), m.group(3), m.group(4)
        if prev in tids and state.startswith("D"):
            since[prev] = t
        if nxt in since:
            blocked[nxt] += (t - since.pop(nxt)) * 1000
    return dict(blocked)


def one(s: run.Setup, target: str, a: argparse.Namespace, oport: int, tag: str,
        work: Path) -> dict[str, float]:
    p, port, _db = s.start(target)
    try:
        latency.in_origin(oport, port, a.payload, "half", a.rate, 1.0, s.header,
                          a.connections, [])                                  # warm-up
        rec = None
        data = work / f"perf-{tag}.data"
        if a.perf or a.offcpu:
            what = (["-e", "sched:sched_switch", "-a", *(["-g"] if a.stacks else [])]
                    if a.offcpu
                    else ["-F", str(PERF_HZ), "-p", str(p.pid)])
            rec = subprocess.Popen(["perf", "record", "-q", "-o", str(data), *what],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
        starts = None
        sdata = work / f"perf-starts-{tag}.data"
        if a.wal_starts:
            # the WAL header: 32 bytes at offset 0, written once per generation (the database
            # file's own writes are whole pages)
            starts = subprocess.Popen(["perf", "record", "-q", "-o", str(sdata), "-e",
                                       "syscalls:sys_enter_pwrite64", "--filter",
                                       "count == 32 && pos == 0", "-p", str(p.pid)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
        cpu0, io0 = thread_cpu(p.pid), process_io(p.pid)
        r = latency.in_origin(oport, port, a.payload, "half", a.rate, a.duration, s.header,
                              a.connections, [])
        cpu1, io1 = thread_cpu(p.pid), process_io(p.pid)
        tids = {str(p.pid)} | {k.rsplit(":", 1)[1] for k in cpu1 if ":" in k}
        for proc in (rec, starts):
            if proc is not None:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=120)
    finally:
        run.stop(p)
    n = int(r["ok_2xx"])      # type: ignore[call-overload]
    if n != r.get("sent", n) or set(r.get("statuses", {})) - {"200"}:     # type: ignore[arg-type]
        # not every request answered 200: what, and the proxy's log (it logs warnings)
        run.log(f"  {tag}: sent {r.get('sent')}, statuses {r.get('statuses')}")
        logf = s.work / f"{target}.log"
        if logf.exists():
            for line in logf.read_text(errors="replace").splitlines()[-15:]:
                run.log(f"    {line}")
    res: dict[str, float] = {"requests": n, "p50_ms": float(r["p50_ms"]),  # type: ignore[arg-type]
                             "p99_ms": float(r["p99_ms"])}                 # type: ignore[arg-type]
    other_user = other_sys = 0.0
    for k, (u1, s1) in cpu1.items():
        u0, s0 = cpu0.get(k, (0.0, 0.0))
        if k == "loop":
            res["loop_user_us"] = (u1 - u0) / n * 1e6
            res["loop_sys_us"] = (s1 - s0) / n * 1e6
        else:
            other_user += u1 - u0
            other_sys += s1 - s0
    res["threads_us"] = (other_user + other_sys) / n * 1e6
    res["write_calls"] = (io1["syscw"] - io0["syscw"]) / n
    res["storage_bytes"] = (io1["write_bytes"] - io0["write_bytes"]) / n
    if a.perf and rec is not None:
        res.update({f"perf:{k}": v for k, v in perf_split(data, n).items()})
    if a.offcpu and rec is not None:
        blocked = offcpu(data, tids)
        res["loop_D_ms"] = blocked.pop(str(p.pid), 0.0)
        res["threads_D_ms"] = sum(blocked.values())
        if a.stacks:
            script = subprocess.run(["perf", "script", "-i", str(data)], capture_output=True,
                                    text=True).stdout
            for name, ms in sorted(d_stacks(script, str(p.pid)).items(),
                                   key=lambda kv: -sum(kv[1])):
                run.log(f"  {tag} loop D: {name}: {len(ms)} x, {sum(ms):.1f} ms, "
                        f"longest {max(ms):.1f} ms")
                res[f"D:{name}"] = sum(ms)
                if a.verbose:
                    run.log("    " + " < ".join(EXAMPLES.get(name, [])))
    if starts is not None:
        lines = subprocess.run(["perf", "script", "-i", str(sdata), "-F", "tid"],
                               capture_output=True, text=True).stdout.split()
        res["wal_starts_loop"] = sum(t == str(p.pid) for t in lines)
        res["wal_starts_threads"] = sum(t != str(p.pid) for t in lines)
    data.unlink(missing_ok=True)
    sdata.unlink(missing_ok=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=2000.0, help="requests/s (open loop)")
    ap.add_argument("--payload", default="small", choices=list(run.PAYLOADS))
    ap.add_argument("--targets", default="bare,strict")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--meterproxy", default=f"{run.PY} -m proxy",
                    help="command that runs meterproxy")
    ap.add_argument("--before", metavar="CMD", help="a second meterproxy command (another "
                    "checkout), run beside each target as TARGET@before")
    ap.add_argument("--before-dir", metavar="DIR", help="the --before target's databases in "
                    "a new directory under DIR (/dev/shm: on tmpfs)")
    how = ap.add_mutually_exclusive_group()
    ap.add_argument("--wal-starts", action="store_true", help="count the WAL generations "
                     "begun (its header written: perf record of pwrite64, 32 bytes at offset "
                     "0), on the loop thread and in other threads")
    how.add_argument("--perf", action="store_true", help="split the proxy's CPU by shared "
                    "object (perf record)")
    how.add_argument("--offcpu", action="store_true", help="time each proxy thread spent "
                    "blocked on I/O (perf record of sched_switch, system-wide)")
    ap.add_argument("--stacks", action="store_true", help="with --offcpu: the loop "
                    "thread's waits by kernel stack (fdatasync, block reservation, ...)")
    ap.add_argument("-v", "--verbose", action="store_true", help="with --stacks: one whole "
                    "kernel stack of each wait")
    a = ap.parse_args()
    if a.stacks and not a.offcpu:
        ap.error("--stacks needs --offcpu")
    if (a.perf or a.offcpu or a.wal_starts) and not shutil.which("perf"):
        run.log("--perf/--offcpu need perf (apt-get install -y linux-perf)")
        return 2
    targets = [x for x in a.targets.split(",") if x]
    atexit.register(run._cleanup)
    signal.signal(signal.SIGINT, run._on_signal)
    signal.signal(signal.SIGTERM, run._on_signal)
    work = Path(tempfile.mkdtemp(prefix="metercpu-"))
    atexit.register(shutil.rmtree, work, True)
    origin, oport = run.spawn_on_port_0([run.PY, str(run.BENCH / "origin.py"), "0",
                                         "--with-load"], work / "origin.log", 0)
    run.wait_http(f"http://127.0.0.1:{oport}/small", origin)
    s = run.Setup(work, f"http://127.0.0.1:{oport}", a.meterproxy.split())
    setups = {t: s for t in targets}
    if a.before:
        bdir = Path(tempfile.mkdtemp(prefix="metercpu-before-", dir=a.before_dir))
        atexit.register(shutil.rmtree, bdir, True)
        sb = run.Setup(bdir, f"http://127.0.0.1:{oport}", a.before.split())
        for t in [t for t in targets if t not in ("bare", "nginx")]:
            targets.insert(targets.index(t) + 1, f"{t}@before")
            setups[f"{t}@before"] = sb
    runs: dict[str, list[dict[str, float]]] = {t: [] for t in targets}
    for rep in range(1, a.reps + 1):
        for t in targets:
            r = one(setups[t], t.split("@")[0], a, oport, f"{rep}-{t}", work)
            runs[t].append(r)
            run.log(f"rep{rep} {t:14} " + " ".join(
                f"{k} {v:.1f}" for k, v in r.items() if not k.startswith("perf:")))
    run.stop(origin)
    cols = ["loop_user_us", "loop_sys_us", "threads_us", "write_calls", "storage_bytes",
            "p50_ms", "p99_ms"]
    if a.offcpu:
        cols += ["loop_D_ms", "threads_D_ms"]
    if a.wal_starts:
        cols += ["wal_starts_loop", "wal_starts_threads"]
    dsos = [f"perf:{g}" for g in ("python", "kernel", "sqlite", "other C")] if a.perf else []
    if a.stacks:        # every wait class seen in any run, ms per run (0 where absent)
        dsos += sorted({k for rs in runs.values() for r in rs for k in r if k[:2] == "D:"})
    lines = [f"CPU per request at {a.rate:g} requests/s ({a.payload}, {a.connections} "
             f"connections, {a.duration:g} s runs, median of {a.reps} interleaved reps)", "",
             "| target | " + " | ".join(c.replace("_", " ") for c in cols + dsos) + " |",
             "| --- |" + " --- |" * (len(cols) + len(dsos))]
    for t in targets:
        cells = [run.med([r.get(c, 0.0) for r in runs[t]]) for c in cols + dsos]
        lines.append(f"| {t} | " + " | ".join(f"{x:.3f}" if c.endswith("_ms") else f"{x:.1f}"
                                             for c, x in zip(cols + dsos, cells,
                                                             strict=True)) + " |")
    lines += ["", "us: microseconds of CPU per request (loop: the process's main thread, "
              "which runs the event loop; threads: every other thread of the proxy); write "
              "calls: write system calls per request (sockets and files); storage bytes: "
              "bytes per request the proxy caused to be written to the block device; D: ms "
              "per run blocked on I/O; perf: us per request in each shared object; D:<wait>: ms "
              "per run the loop thread was blocked there (--stacks); wal starts: WAL generations begun "
              "per run, by the loop thread and by other threads (--wal-starts)"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
