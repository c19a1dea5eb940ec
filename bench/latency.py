#!/usr/bin/env python3
"""Added latency over the bare aiohttp proxy: one command, one table.

  .venv/bin/python bench/latency.py            # 3 reps, small / 64k / sse (~6 min)
  .venv/bin/python bench/latency.py --quick    # 1 rep, 2 s runs (~1.5 min)

Two loads per payload, each measured for every target in the same run, interleaved
(``for rep: for payload: for target``), every target restarted per measurement; bare runs
first in every rep and the other targets take turns after it (rep 2 starts with the second,
and so on): the target right after bare read 0.02-0.15 ms slower at SSE's p50 whatever its
code (docs/PERFORMANCE.md, "materialize slices without bursts"), so a fixed order would bias
an A/B:

- one connection: one request at a time (``bench/openloop.py --sequential``): the latency
  a request sees with no queueing at all;
- half the bare maximum: open loop (fixed-rate schedule, ``bench/openloop.py``) at half the
  bare proxy's median closed-loop maximum (wrk, measured first in this run).

The load generator runs inside the origin's process (``bench/origin.py --with-load``), on
the origin's event loop: two busy processes on CPU 0 wait for each other's scheduler slice,
which alone put the harness's p99 at 3.6-4.2 ms at the half-maximum rates, more than the
difference being measured (``--load-process``: the generator as its own process, as
before, for comparison; docs/PERFORMANCE.md).

p50 and p99 of each run; the table gives each target's median over the repetitions and its
added latency (the median of the per-repetition differences to bare, paired because the
reps are interleaved). Pinning like bench/run.py: origin and load generators on CPU 0, the
proxy under test on CPU 1. After every meterproxy run its ledger is checked against the 2xx
the client received (exactly: open loop and sequential runs end cleanly). Targets as in
bench/run.py: bare, nginx, strict, batched. The goal (issue 13): p50 at most +0.10 ms and
p99 at most +0.20 ms over bare, for strict, at both loads. Wall-clock figures need a quiet
machine: other processes on either CPU, and time the hypervisor steals from this VM
(printed per run and summed at the end: `steal` in /proc/stat), move the p99 by
milliseconds.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run

LOADS = ("1conn", "half")
CLK = os.sysconf("SC_CLK_TCK")


def in_origin(oport: int, port: int, payload: str, load: str, rate: float, duration: float,
              header: str, conns: int, stall_files: list[str]) -> dict[str, object]:
    """One run of the generator inside the origin's process (``POST /_bench/load``)."""
    spec: dict[str, object] = {"port": port, "path": run.PAYLOADS[payload], "header": [header],
                               "duration": duration, "conns": conns, "stalls": stall_files}
    if load == "1conn":
        spec["sequential"] = True
    else:
        spec["rate"] = rate
    req = urllib.request.Request(f"http://127.0.0.1:{oport}/_bench/load",
                                 data=json.dumps(spec).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=duration + 60) as resp:
        out: dict[str, object] = json.loads(resp.read())
    return out


def in_process(port: int, payload: str, load: str, rate: float, duration: float, header: str,
               conns: int, stall_files: list[str]) -> dict[str, object]:
    """One run of bench/openloop.py as its own process on CPU 0 (``--load-process``)."""
    cmd = [*run.pin(0), run.PY, str(run.BENCH / "openloop.py"), "--port", str(port),
           "--path", run.PAYLOADS[payload], "--header", header, "--duration", str(duration)]
    for f in stall_files:
        cmd += ["--stalls", f]
    if load == "1conn":
        cmd += ["--sequential"]
    else:
        cmd += ["--rate", f"{rate:.1f}", "--conns", str(conns)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    if res.returncode != 0:
        raise RuntimeError(f"openloop failed: {res.stderr}")
    out: dict[str, object] = json.loads(res.stdout)
    return out


def steal_ms() -> float:
    """CPU time the hypervisor took from this machine's CPUs so far (``steal`` in
    /proc/stat, all CPUs, in ms; 0 where the kernel does not report it). While a run is
    measured, stolen time stalls the proxy, the origin or the load generator for whole
    host scheduler slices (milliseconds), whatever the code under test does."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
    except OSError:
        return 0.0
    return int(fields[8]) * 1000 / CLK if fields[0] == "cpu" and len(fields) > 8 else 0.0


def measure(s: run.Setup, target: str, payload: str, load: str, rate: float,
            a: argparse.Namespace, oport: int) -> dict[str, object]:
    p, port, db = s.start(target)
    try:
        sent = 0
        for duration in (a.warmup, a.duration):
            stolen = steal_ms()
            if a.load_process:
                out = in_process(port, payload, load, rate, duration, s.header, a.ol_conns,
                                 a.stall_files)
            else:
                out = in_origin(oport, port, payload, load, rate, duration, s.header,
                                a.ol_conns, a.stall_files)
            out["steal_ms"] = steal_ms() - stolen
            sent += int(out["ok_2xx"])  # type: ignore[call-overload]
    finally:
        rc = run.stop(p)
    out["exit_code"] = rc
    if db is not None:
        out["ledger"] = run.check_ledger(db, sent, 0, payload)
    return out


def in_turn(targets: list[str], rep: int) -> list[str]:
    """The order of a rep's runs: bare (first in ``targets``), then the others rotated by
    ``rep - 1``, so each of them follows bare in turn."""
    rest = targets[1:]
    k = (rep - 1) % len(rest) if rest else 0
    return targets[:1] + rest[k:] + rest[:k]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 rep, 2 s runs")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per measured run")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--max-duration", type=float, default=4.0,
                    help="seconds of each wrk run that finds the bare maximum")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections")
    ap.add_argument("--ol-conns", type=int, default=16, help="open-loop initial connections")
    ap.add_argument("--payloads", default=",".join(run.PAYLOADS))
    ap.add_argument("--targets", default="bare,strict")
    ap.add_argument("--json", help="also write every run's figures here")
    ap.add_argument("--load-process", action="store_true",
                    help="run the load generator as its own process on CPU 0 (the method "
                         "before 2026-12: its p99 includes the kernel time-slicing it with "
                         "the origin)")
    ap.add_argument("--no-stalls", action="store_true",
                    help="do not run bench/stalls.py's CPU stall detectors (no calm table)")
    ap.add_argument("--meterproxy", default=f"{run.PY} -m proxy")
    ap.add_argument("--before", metavar="CMD",
                    help="also run every meterproxy target with this command (e.g. another "
                         "checkout's code), interleaved, as TARGET@before: an A/B under the "
                         "same machine noise")
    ap.add_argument("--before-dir", metavar="DIR",
                    help="the --before target's files (its databases) in a new directory "
                         "under DIR instead of the run's work directory: /dev/shm puts them "
                         "on tmpfs, a ceiling for what the disk costs")
    a = ap.parse_args()
    if a.quick:
        a.reps, a.duration, a.warmup, a.max_duration = 1, 2.0, 0.5, 2.0
    payloads = [x for x in a.payloads.split(",") if x]
    targets = [x for x in a.targets.split(",") if x]
    if not targets or targets[0] != "bare":
        ap.error("--targets must start with bare (the base of every difference)")
    if not shutil.which("wrk"):
        run.log("needs wrk (apt-get install -y wrk)")
        return 2
    if "nginx" in targets and not os.path.exists(run.NGINX):
        run.log("nginx not installed (apt-get install -y nginx-light)")
        return 2

    atexit.register(run._cleanup)
    signal.signal(signal.SIGINT, run._on_signal)
    signal.signal(signal.SIGTERM, run._on_signal)
    work = Path(tempfile.mkdtemp(prefix="meterlatency-"))
    a.stall_files = []
    if not a.no_stalls:
        if os.geteuid() != 0:
            run.log("not root: no CPU stall detectors (bench/stalls.py needs SCHED_FIFO); "
                    "only the raw percentiles are reported")
        else:
            for cpu in (0, 1):
                out_file = work / f"stalls-cpu{cpu}.txt"
                run.spawn([run.PY, str(run.BENCH / "stalls.py"), "--cpu", str(cpu), "--out",
                           str(out_file)], work / f"stalls-cpu{cpu}.log", None)
                a.stall_files.append(str(out_file))
    origin, oport = run.spawn_on_port_0([run.PY, str(run.BENCH / "origin.py"), "0", "--with-load"],
                                        work / "origin.log", 0)
    run.wait_http(f"http://127.0.0.1:{oport}/small", origin)
    s = run.Setup(work, f"http://127.0.0.1:{oport}", a.meterproxy.split())
    setups = {t: s for t in targets}
    if a.before:
        bdir = (Path(tempfile.mkdtemp(prefix="meterlatency-before-", dir=a.before_dir))
                if a.before_dir else work / "before")
        bdir.mkdir(exist_ok=True)
        if a.before_dir:
            atexit.register(shutil.rmtree, bdir, True)
        sb = run.Setup(bdir, f"http://127.0.0.1:{oport}", a.before.split())
        for t in list(targets[1:]):
            if t != "nginx":
                targets.insert(targets.index(t) + 1, f"{t}@before")
                setups[f"{t}@before"] = sb
    t0 = time.monotonic()

    # the bare maximum per payload (closed loop), median of the reps
    bare_max: dict[str, float] = {}
    for pl in payloads:
        rps = []
        for _ in range(a.reps):
            p, port, _db = s.start("bare")
            try:
                url = f"http://127.0.0.1:{port}{run.PAYLOADS[pl]}"
                run.run_wrk(url, s.header, a.connections, 1.0)
                rps.append(run.run_wrk(url, s.header, a.connections, a.max_duration)["rps"])
            finally:
                run.stop(p)
        bare_max[pl] = run.med(rps)
        run.log(f"bare max {pl}: {bare_max[pl]:.0f} rps (reps {[round(x) for x in rps]})")

    runs: dict[str, list[dict[str, object]]] = {}
    failures: list[str] = []
    for rep in range(1, a.reps + 1):
        for pl in payloads:
            for load in LOADS:
                for t in in_turn(targets, rep):
                    r = measure(setups[t], t.split("@")[0], pl, load, bare_max[pl] / 2, a,
                                oport)
                    runs.setdefault(f"{t}/{pl}/{load}", []).append(r)
                    lg = r.get("ledger")
                    if isinstance(lg, dict) and not lg["ok"]:
                        failures.append(f"{t} {pl} {load} rep{rep}: {lg['problems']}")
                    run.log(f"rep{rep} {pl:5} {load:5} {t:7} p50 {r['p50_ms']:.3f} p99 "
                            f"{r['p99_ms']:.3f} ms  2xx {r['ok_2xx']}  steal "
                            f"{r['steal_ms']:.0f} ms"
                            + (f"  calm p50 {r['calm_p50_ms']:.3f} p99 {r['calm_p99_ms']:.3f}"
                               f" ms (left out {r['calm_left_out']}, stalled "
                               f"{r['stalled_ms']:.1f} ms)" if "calm_p99_ms" in r else "")
                            + (f"  ledger {'ok' if lg['ok'] else 'FAIL'}"
                               if isinstance(lg, dict) else ""))
    run.stop(origin)

    def cell(t: str, pl: str, load: str, q: str) -> str:
        mine = [float(r[q]) for r in runs[f"{t}/{pl}/{load}"]]  # type: ignore[arg-type]
        if t == "bare":
            return f"{run.med(mine):.3f}"
        base = [float(r[q]) for r in runs[f"bare/{pl}/{load}"]]  # type: ignore[arg-type]
        added = run.med([x - y for x, y in zip(mine, base, strict=True)])
        return f"{run.med(mine):.3f} ({added:+.3f})"

    lines = [f"Latency in ms, median of {a.reps} interleaved reps (added over bare, paired "
             f"per rep); {a.duration:g} s per run; half = open loop at half the bare "
             "maximum (" + ", ".join(f"{pl} {bare_max[pl] / 2:.0f}/s" for pl in payloads)
             + f"); {time.monotonic() - t0:.0f} s",
             "",
             "| target | payload | 1 connection p50 | 1 connection p99 | half max p50 "
             "| half max p99 |",
             "| --- | --- | --- | --- | --- | --- |"]
    for pl in payloads:
        for t in targets:
            lines.append(f"| {t} | {pl} | {cell(t, pl, '1conn', 'p50_ms')} | "
                         f"{cell(t, pl, '1conn', 'p99_ms')} | {cell(t, pl, 'half', 'p50_ms')}"
                         f" | {cell(t, pl, 'half', 'p99_ms')} |")
    every = [float(r["steal_ms"]) for v in runs.values() for r in v]  # type: ignore[arg-type]
    lines += ["", f"Hypervisor steal during the measured runs: median {run.med(every):.0f} ms, "
              f"max {max(every):.0f} ms per run ({sum(x > 0 for x in every)} of {len(every)} "
              "runs had some); each stolen slice stalls a CPU for milliseconds, so where most "
              "runs had steal the p99 columns measure the host more than the proxy."]
    if a.stall_files:
        lines += ["", "The same runs without the requests a CPU stall delayed (bench/stalls.py: "
                  "a span over 0.25 ms in which a pinned CPU ran nothing of normal priority; "
                  "left out: the requests in flight during one or sent within one stall "
                  "length after it, the same rule for every target):", "",
                  "| target | payload | 1 connection p50 | 1 connection p99 | half max p50 "
                  "| half max p99 | left out (1 conn / half) | stalled ms per run |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for pl in payloads:
            for t in targets:
                share = []
                for load in LOADS:
                    rs = runs[f"{t}/{pl}/{load}"]
                    left = sum(int(r["calm_left_out"]) for r in rs)  # type: ignore[call-overload]
                    total = sum(int(r["ok_2xx"]) for r in rs)  # type: ignore[call-overload]
                    share.append(f"{100 * left / max(total, 1):.1f}%")
                stalled = run.med([float(r["stalled_ms"])  # type: ignore[arg-type]
                                   for load in LOADS for r in runs[f"{t}/{pl}/{load}"]])
                lines.append(f"| {t} | {pl} | {cell(t, pl, '1conn', 'calm_p50_ms')} | "
                             f"{cell(t, pl, '1conn', 'calm_p99_ms')} | "
                             f"{cell(t, pl, 'half', 'calm_p50_ms')} | "
                             f"{cell(t, pl, 'half', 'calm_p99_ms')} | {' / '.join(share)} | "
                             f"{stalled:.1f} |")
    if failures:
        lines += ["", "LEDGER CHECK FAILED: " + "; ".join(failures)]
    print("\n".join(lines))
    if a.json:
        Path(a.json).write_text(json.dumps({"bare_max": bare_max, "runs": runs}, indent=1,
                                           default=str))
    shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
