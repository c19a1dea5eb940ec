#!/usr/bin/env python3
"""meterproxy benchmark: bare aiohttp pass-through proxy (baseline) vs meterproxy with
strict and batched durability, same run, interleaved repetitions, medians reported; nginx
`proxy_pass` (bench/nginx_conf.py, one process, keep-alive upstream pool) runs in the same
interleaving as the reference an operator would otherwise deploy.

  .venv/bin/python bench/run.py            # full run (~6 min)
  .venv/bin/python bench/run.py --quick    # smoke check (~1 min)

Closed loop (max throughput): wrk -t1 -c C -d D, pinned to CPU 0 with the origin; the
proxy under test on CPU 1. Open loop (added latency): bench/openloop.py at half the
bare proxy's median max rate per payload. CPU per request from /proc/PID/stat.
Every meterproxy process is stopped with SIGTERM after its run and its ledger checked
against the 2xx responses the clients saw.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PY = sys.executable
PAYLOADS = {"small": "/small", "64k": "/64k", "sse": "/sse"}
TARGETS = ("bare", "nginx", "strict", "batched")
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
ADMIN_TOKEN = "bench-admin-token"
CLK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1

RULES = """\
version: 1
meters:
  api_calls: {stripe_event_name: api_calls}
  llm_tokens: {stripe_event_name: llm_tokens}
rules:
  - name: small
    match: {path: /small}
    usage:
      - {meter: api_calls, quantity: 1}
  - name: big
    match: {path: /64k}
    usage:
      - {meter: api_calls, quantity: 1}
  - name: sse
    match: {path: /sse}
    usage:
      - {meter: llm_tokens, preset: openai_chat}
      - {meter: api_calls, quantity: 1}
"""

_procs: list[subprocess.Popen[bytes]] = []


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cleanup() -> None:
    for p in _procs:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
                p.wait(5)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                p.kill()


def _on_signal(signum: int, frame: object) -> None:
    _cleanup()
    sys.exit(128 + signum)


def free_port() -> int:
    """A port that was free a moment ago (another process may take it before it is bound):
    only for a server that cannot listen on port 0 and say which port it got (meterproxy at
    log level warning, nginx); start those with ``start_on_free_ports``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PORT_TRIES = 5
_ANNOUNCED = re.compile(rb"listening on 127\.0\.0\.1:(\d+)")


def log_size(logfile: Path) -> int:
    return logfile.stat().st_size if logfile.exists() else 0


def announced_port(logfile: Path, since: int, p: subprocess.Popen[bytes],
                   timeout: float = 20) -> int:
    """The port a bench server started on port 0 bound (origin.py, bare_proxy.py,
    core_proxy.py print ``listening on 127.0.0.1:<port>`` once they listen), read from its
    log after byte ``since``: no pick-then-bind race."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with logfile.open("rb") as fh:
            fh.seek(since)
            found = _ANNOUNCED.search(fh.read())
        if found is not None:
            return int(found.group(1))
        if p.poll() is not None:
            raise RuntimeError(f"{logfile}: exited with {p.returncode} before listening")
        time.sleep(0.02)
    raise RuntimeError(f"{logfile}: no 'listening on' line after {timeout}s")


def spawn_on_port_0(cmd: list[str], logfile: Path, cpu: int | None
                    ) -> tuple[subprocess.Popen[bytes], int]:
    """``spawn`` a bench server whose port argument is 0; returns it and the port it bound."""
    since = log_size(logfile)
    p = spawn(cmd, logfile, cpu)
    return p, announced_port(logfile, since, p)


def in_use(logfile: Path, since: int) -> bool:
    """The log (after byte ``since``) says a bind failed: address already in use."""
    text = logfile.read_bytes()[since:].decode(errors="replace").lower()
    return "address already in use" in text or "errno 98" in text


def start_on_free_ports(start: Callable[[], tuple[subprocess.Popen[bytes], int]],
                        logfile: Path) -> tuple[subprocess.Popen[bytes], int]:
    """``start()`` picks its ports with ``free_port``, spawns and waits until it answers;
    when the server exited because a port was taken meanwhile, again on new ports (up to
    ``PORT_TRIES`` times)."""
    for i in range(PORT_TRIES):
        since = log_size(logfile)
        try:
            return start()
        except RuntimeError:
            if i == PORT_TRIES - 1 or not in_use(logfile, since):
                raise
    raise AssertionError("unreachable")


def pin(cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu)] if cpu is not None and shutil.which("taskset") else []


def spawn(cmd: list[str], logfile: Path, cpu: int | None) -> subprocess.Popen[bytes]:
    fh = logfile.open("ab")
    p = subprocess.Popen(pin(cpu) + cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                         start_new_session=True)
    _procs.append(p)
    return p


def stop(p: subprocess.Popen[bytes], timeout: float = 30) -> int:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            p.kill()
            p.wait()
            raise RuntimeError(f"pid {p.pid} did not stop within {timeout}s of SIGTERM") from exc
    if p in _procs:
        _procs.remove(p)
    return p.returncode


def wait_http(url: str, p: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """Poll until the server answers any HTTP status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {p.returncode} before it was ready")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url}: not ready after {timeout}s")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK  # utime, stime (fields 14, 15)


# ---------------------------------------------------------------- load generators

def run_wrk(url: str, header: str, conns: int, duration: float) -> dict[str, float]:
    cmd = [*pin(0), "wrk", "-t1", f"-c{conns}", f"-d{max(1, round(duration))}s", "--latency", "-H", header, url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30).stdout
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m or not rps:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    total = int(m.group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    bad = int(non2xx.group(1)) if non2xx else 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = sum(int(x) for x in sock.groups()) if sock else 0
    return {"requests": total, "ok_2xx": total - bad, "non_2xx": bad, "socket_errors": errors,
            "rps": float(rps.group(1))}


def run_openloop(port: int, path: str, header: str, rate: float, duration: float,
                 conns: int) -> dict[str, float]:
    cmd = [*pin(0), PY, str(BENCH / "openloop.py"), "--port", str(port), "--path", path,
           "--rate", f"{rate:.1f}", "--duration", str(duration), "--conns", str(conns),
           "--header", header]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    if res.returncode != 0:
        raise RuntimeError(f"openloop failed: {res.stderr}")
    return json.loads(res.stdout)


# ---------------------------------------------------------------- targets

class Setup:
    def __init__(self, work: Path, origin_url: str, mp: list[str]) -> None:
        self.work, self.origin_url, self.mp = work, origin_url, mp
        (work / "rules.yaml").write_text(RULES)
        self.template = work / "template.db"
        subprocess.run([*self.mp, "customers", "create", "bench", "--db", str(self.template)],
                       check=True, capture_output=True, cwd=ROOT)
        out = subprocess.run([*self.mp, "keys", "create", "--customer", "bench", "--db", str(self.template)],
                             check=True, capture_output=True, cwd=ROOT).stdout
        self.key = json.loads(out)["key"]
        self.header = f"Authorization: Bearer {self.key}"
        self.n = 0

    def start(self, target: str) -> tuple[subprocess.Popen[bytes], int, Path | None]:
        self.n += 1
        logf = self.work / f"{target}.log"
        if target == "bare":       # on port 0: it says which port it bound
            p, port = spawn_on_port_0([PY, str(BENCH / "bare_proxy.py"), "0", self.origin_url],
                                      logf, 1)
            wait_http(f"http://127.0.0.1:{port}/small", p)
            return p, port, None
        db = None
        if target != "nginx":
            db = self.work / f"run{self.n}-{target}.db"
            shutil.copy(self.template, db)

        def attempt() -> tuple[subprocess.Popen[bytes], int]:
            port = free_port()
            if target == "nginx":
                sys.path.insert(0, str(BENCH))
                import nginx_conf
                prefix = self.work / f"nginx{self.n}"
                conf = nginx_conf.write(prefix, port, int(self.origin_url.rsplit(":", 1)[1]))
                p = spawn([NGINX, "-e", "stderr", "-p", str(prefix), "-c", str(conf)], logf, 1)
            else:
                cfg = {
                    "listen": f"127.0.0.1:{port}",
                    "admin_listen": f"127.0.0.1:{free_port()}",
                    "upstream": {"url": self.origin_url},
                    "rules": str(self.work / "rules.yaml"),
                    # METERPROXY_BENCH_STORAGE: JSON merged into the storage section
                    # (e.g. '{"wal_truncate_size": "64MiB"}')
                    "storage": {"path": str(db), "durability": target,
                                "commit_interval": "10ms", "fail_mode": "closed",
                                **json.loads(os.environ.get("METERPROXY_BENCH_STORAGE", "{}"))},
                    "admin": {"token": ADMIN_TOKEN},
                    "stripe": {"sink": "dry_run", "flush_interval": "1h"},
                    "log_level": "warning",
                }
                cfgf = self.work / f"run{self.n}-{target}.yaml"
                cfgf.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
                p = spawn([*self.mp, "serve", "--config", str(cfgf)], logf, 1)
            try:
                wait_http(f"http://127.0.0.1:{port}/small", p)
                if p.poll() is not None:    # what answered was not ours
                    raise RuntimeError(f"{target}: exited with {p.returncode} at start")
            except RuntimeError:
                stop(p)
                raise
            return p, port

        p, port = start_on_free_ports(attempt, logf)
        return p, port, db


def ledger(db: Path) -> dict[str, float]:
    with sqlite3.connect(db) as c:
        rows = dict(c.execute("SELECT meter, SUM(quantity) FROM usage_minute "
                              "WHERE customer_id='bench' GROUP BY meter").fetchall())
        audit = c.execute("SELECT COUNT(*) FROM audit WHERE customer_id='bench' "
                          "AND meter='api_calls'").fetchone()[0]
    return {"api_calls": (rows.get("api_calls") or 0) / 1e6,
            "llm_tokens": (rows.get("llm_tokens") or 0) / 1e6, "audit_api_calls": audit}


def check_ledger(db: Path, ok_2xx: int, slack: int, payload: str) -> dict[str, object]:
    """ledger must equal the 2xx the client counted; ``slack`` allows for requests wrk cut
    at the end of its duration (delivered and billed by the proxy, not counted by wrk)."""
    lg = ledger(db)
    calls = int(lg["api_calls"])
    problems = []
    if calls < ok_2xx:
        problems.append(f"LOST USAGE: ledger {calls} < client 2xx {ok_2xx}")
    if calls > ok_2xx + slack:
        problems.append(f"ledger {calls} > client 2xx {ok_2xx} + in-flight slack {slack}")
    if lg["audit_api_calls"] != calls:
        problems.append(f"audit rows {lg['audit_api_calls']} != usage_minute {calls}")
    # an SSE response cut by wrk at the end is billed for the tokens delivered (maybe 0)
    if payload == "sse" and not 42 * ok_2xx <= lg["llm_tokens"] <= 42 * calls:
        problems.append(f"llm_tokens {lg['llm_tokens']} not within 42 x [{ok_2xx}, {calls}]")
    return {"ledger_api_calls": calls, "client_2xx": ok_2xx, "slack": slack,
            "ok": not problems, "problems": problems}


# ---------------------------------------------------------------- phases

def closed_loop(s: Setup, target: str, payload: str, a: argparse.Namespace) -> dict[str, object]:
    p, port, db = s.start(target)
    url = f"http://127.0.0.1:{port}{PAYLOADS[payload]}"
    try:
        warm = run_wrk(url, s.header, a.connections, a.warmup)
        c0, t0 = cpu_seconds(p.pid), time.monotonic()
        res = run_wrk(url, s.header, a.connections, a.duration)
        c1 = cpu_seconds(p.pid)
        res["cpu_util"] = (c1 - c0) / (time.monotonic() - t0)
        res["cpu_us_per_req"] = (c1 - c0) / max(res["requests"], 1) * 1e6
    finally:
        rc = stop(p)
    res["exit_code"] = rc
    if db is not None:
        res["ledger"] = check_ledger(db, int(warm["ok_2xx"] + res["ok_2xx"]),
                                     2 * a.connections, payload)
    return res


def open_loop(s: Setup, target: str, payload: str, rate: float,
              a: argparse.Namespace) -> dict[str, object]:
    p, port, db = s.start(target)
    try:
        warm = run_openloop(port, PAYLOADS[payload], s.header, rate, a.warmup, a.ol_conns)
        res = run_openloop(port, PAYLOADS[payload], s.header, rate, a.open_duration, a.ol_conns)
    finally:
        rc = stop(p)
    res["exit_code"] = rc
    if db is not None:
        res["ledger"] = check_ledger(db, int(warm["ok_2xx"] + res["ok_2xx"]), 0, payload)
    return res


def med(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke check: 1 rep, short runs")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=float, default=4.0, help="closed-loop seconds per run")
    ap.add_argument("--open-duration", type=float, default=4.0, help="open-loop seconds per run")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--connections", type=int, default=32, help="wrk connections")
    ap.add_argument("--ol-conns", type=int, default=16, help="open-loop initial connections")
    ap.add_argument("--payloads", default=",".join(PAYLOADS))
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--out", default=str(BENCH), help="where results.json / RESULTS.md go")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--meterproxy", default=f"{PY} -m proxy",
                    help="command that runs the meterproxy CLI (default: %(default)s)")
    a = ap.parse_args()
    if a.quick:
        a.reps, a.duration, a.open_duration, a.warmup = 1, 2.0, 2.0, 1.0
    payloads = [x for x in a.payloads.split(",") if x]
    targets = [x for x in a.targets.split(",") if x]
    if "bare" not in targets:
        ap.error("the bare baseline is needed for ratios and the open-loop rate")

    missing = [t for t in ("wrk", "taskset") if not shutil.which(t)]
    if "nginx" in targets and not os.path.exists(NGINX):
        missing.append("nginx")
    if missing:
        log(f"missing tools: {', '.join(missing)}. Install with: apt-get install -y wrk "
            "util-linux nginx-light (or drop nginx: --targets bare,strict,batched)")
        return 2
    if NCPU < 2:
        log("warning: fewer than 2 CPUs; pinning disabled is not supported, results are noisy")

    atexit.register(_cleanup)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    work = Path(tempfile.mkdtemp(prefix="meterbench-"))
    t_start = time.monotonic()
    origin, oport = spawn_on_port_0([PY, str(BENCH / "origin.py"), "0"], work / "origin.log", 0)
    wait_http(f"http://127.0.0.1:{oport}/small", origin)
    s = Setup(work, f"http://127.0.0.1:{oport}", a.meterproxy.split())
    log(f"work dir {work}; origin :{oport}; {a.reps} reps x {targets} x {payloads}")

    closed: dict[str, dict[str, list[dict[str, object]]]] = {
        t: {pl: [] for pl in payloads} for t in targets}
    opened: dict[str, dict[str, list[dict[str, object]]]] = {
        t: {pl: [] for pl in payloads} for t in targets}
    failures: list[str] = []

    def note(kind: str, t: str, pl: str, rep: int, r: dict[str, object]) -> None:
        lg = r.get("ledger")
        if isinstance(lg, dict) and not lg["ok"]:
            failures.append(f"{kind} {t} {pl} rep{rep}: {'; '.join(lg['problems'])}")
        if r.get("exit_code") not in (0, None, -15):
            failures.append(f"{kind} {t} {pl} rep{rep}: exit code {r['exit_code']}")

    for rep in range(1, a.reps + 1):
        for pl in payloads:
            for t in targets:
                r = closed_loop(s, t, pl, a)
                closed[t][pl].append(r)
                note("closed", t, pl, rep, r)
                lgs = r.get("ledger", {})
                log(f"closed rep{rep} {pl:5} {t:7} {r['rps']:8.0f} rps  "
                    f"{r['cpu_us_per_req']:6.0f} us/req cpu {r['cpu_util']:.2f}  "
                    f"non2xx {r['non_2xx']} err {r['socket_errors']}"
                    + (f"  ledger {'ok' if lgs['ok'] else 'FAIL'} "
                       f"({lgs['ledger_api_calls']} vs {lgs['client_2xx']})" if lgs else ""))

    bare_max = {pl: med([r["rps"] for r in closed["bare"][pl]]) for pl in payloads}
    rates = {pl: bare_max[pl] / 2 for pl in payloads}
    for rep in range(1, a.reps + 1):
        for pl in payloads:
            for t in targets:
                r = open_loop(s, t, pl, rates[pl], a)
                opened[t][pl].append(r)
                note("open", t, pl, rep, r)
                lgs = r.get("ledger", {})
                log(f"open   rep{rep} {pl:5} {t:7} @{rates[pl]:.0f}/s p50 {r['p50_ms']:.3f} "
                    f"p99 {r['p99_ms']:.3f} ms  2xx {r['ok_2xx']}/{r['sent']} "
                    f"lag99 {r['send_lag_p99_ms']:.2f}"
                    + (f"  ledger {'ok' if lgs['ok'] else 'FAIL'}" if lgs else ""))
    stop(origin)
    elapsed = time.monotonic() - t_start

    summary: dict[str, dict[str, dict[str, float]]] = {}
    for t in targets:
        summary[t] = {}
        for pl in payloads:
            c, o = closed[t][pl], opened[t][pl]
            row = {"rps": med([r["rps"] for r in c]),
                   "cpu_us_per_req": med([r["cpu_us_per_req"] for r in c]),
                   "cpu_util": med([r["cpu_util"] for r in c]),
                   "p50_ms": med([r["p50_ms"] for r in o]),
                   "p99_ms": med([r["p99_ms"] for r in o])}
            row["ratio"] = row["rps"] / bare_max[pl]
            summary[t][pl] = row
    if "nginx" in targets:
        for t in targets:
            for pl in payloads:
                summary[t][pl]["ratio_to_nginx"] = summary[t][pl]["rps"] / summary["nginx"][pl]["rps"]
    for t in targets:
        for pl in payloads:
            row, base = summary[t][pl], summary["bare"][pl]
            row["added_cpu_us"] = row["cpu_us_per_req"] - base["cpu_us_per_req"]
            # paired per repetition (interleaved), then the median of the differences
            o, ob = opened[t][pl], opened["bare"][pl]
            row["added_p50_ms"] = med([x["p50_ms"] - y["p50_ms"] for x, y in zip(o, ob, strict=False)])
            row["added_p99_ms"] = med([x["p99_ms"] - y["p99_ms"] for x, y in zip(o, ob, strict=False)])

    targets_met: dict[str, dict[str, bool]] = {}
    if "strict" in targets:
        st = summary["strict"]
        targets_met = {
            "strict_throughput_ge_85pct": {pl: st[pl]["ratio"] >= 0.85 for pl in payloads},
        }
    for t in targets:
        if t in ("bare", "nginx"):   # the targets are meterproxy's; nginx is a reference
            continue
        targets_met[f"{t}_added_p50_le_0.5ms"] = {pl: summary[t][pl]["added_p50_ms"] <= 0.5
                                                  for pl in payloads}
        targets_met[f"{t}_added_p99_le_2ms"] = {pl: summary[t][pl]["added_p99_ms"] <= 2.0
                                                for pl in payloads}
    machine = {"nproc": NCPU, "python": platform.python_version(),
               "platform": platform.platform(), "cpu": _cpu_model(),
               "wrk": _version(["wrk", "-v"]), "pinning": "load generators + origin on CPU 0, "
               "proxy under test on CPU 1"}
    command = ".venv/bin/python bench/run.py" + (" --quick" if a.quick else "")
    params = {k: v for k, v in vars(a).items() if k not in ("out", "keep", "meterproxy")}
    result = {"machine": machine, "command": command, "params": params,
              "elapsed_s": round(elapsed, 1), "open_loop_rates": rates, "summary": summary,
              "targets_met": targets_met, "ledger_failures": failures,
              "runs": {"closed": closed, "open": opened}}
    out = Path(a.out)
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    md = render_md(result, targets, payloads)
    (out / "RESULTS.md").write_text(md)
    print(md)
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        log(f"work dir kept: {work}")
    return 1 if failures else 0


def _version(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
        return (r.stdout + r.stderr).splitlines()[0]
    except Exception:
        return "?"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def render_md(r: dict[str, object], targets: list[str], payloads: list[str]) -> str:
    s = r["summary"]
    m = r["machine"]
    L = ["# meterproxy benchmark results", "",
         f"Machine: {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}, {m['wrk']}; "
         f"{m['pinning']}.",
         f"Reproduce: `{r['command']}` (took {r['elapsed_s']} s; params: "
         f"{json.dumps(r['params'])}).",
         "Medians over interleaved repetitions. Closed loop: wrk -t1 "
         f"-c{r['params']['connections']}. Open loop: bench/openloop.py at half the bare "
         "proxy's max rate; added latency = median over reps of (target - bare) in the same rep.",
         "", "## Max throughput (closed loop) and CPU per request", "",
         "util = CPU seconds per second of the proxy process; below ~0.9 the proxy was not "
         "the bottleneck (CPU 0, shared by wrk and the Python origin, was), so its rps "
         "understates that target's max.", "",
         "| target | " + " | ".join(f"{pl} rps | {pl} vs bare | {pl} CPU µs/req (util)"
                                  for pl in payloads) + " |",
         "| --- |" + " --- | --- | --- |" * len(payloads)]
    for t in targets:
        L.append(f"| {t} | " + " | ".join(
            f"{s[t][pl]['rps']:.0f} | {s[t][pl]['ratio']:.2f}x | "
            f"{s[t][pl]['cpu_us_per_req']:.0f}" + (f" ({s[t][pl]['added_cpu_us']:+.0f})"
                                                  if t != "bare" else "")
            + f" ({s[t][pl]['cpu_util']:.2f})"
            for pl in payloads) + " |")
    if "nginx" in targets:
        L += ["", "## Against nginx proxy_pass (same run)", "",
              "| target | " + " | ".join(f"{pl} rps vs nginx" for pl in payloads) + " |",
              "| --- |" + " --- |" * len(payloads)]
        for t in targets:
            L.append(f"| {t} | " + " | ".join(f"{s[t][pl]['ratio_to_nginx']:.2f}x"
                                             for pl in payloads) + " |")
    rates = r["open_loop_rates"]
    L += ["", "## Latency at a fixed rate (open loop, half the bare max)", "",
          "| target | " + " | ".join(f"{pl} @{rates[pl]:.0f}/s p50 / p99 ms (added)"
                                   for pl in payloads) + " |",
          "| --- |" + " --- |" * len(payloads)]
    for t in targets:
        cells = []
        for pl in payloads:
            x = s[t][pl]
            cell = f"{x['p50_ms']:.3f} / {x['p99_ms']:.3f}"
            if t != "bare":
                cell += f" ({x['added_p50_ms']:+.3f} / {x['added_p99_ms']:+.3f})"
            cells.append(cell)
        L.append(f"| {t} | " + " | ".join(cells) + " |")
    L += ["", "## Targets", "", "| target | " + " | ".join(payloads) + " |",
          "| --- |" + " --- |" * len(payloads)]
    for name, per in r["targets_met"].items():
        L.append(f"| {name} | " + " | ".join("met" if per[pl] else "**NOT met**"
                                            for pl in payloads) + " |")
    L += ["", "## Ledger", ""]
    fails = r["ledger_failures"]
    L.append("Every meterproxy run's ledger (usage_minute api_calls after SIGTERM) matched the "
             "2xx responses its clients received." if not fails else
             "**LEDGER FAILURES:**\n" + "\n".join(f"- {f}" for f in fails))
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
