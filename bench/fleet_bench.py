#!/usr/bin/env python3
"""Fleet mode on this machine: throughput of ``workers: 2`` vs ``workers: 1`` (and the SQLite
single process), CPU seconds per process, and PostgreSQL statements per 1,000 requests.

  .venv/bin/python bench/fleet_bench.py [--reps 5] [--duration 8] [--connections 64]
                                        [--no-credits] [--python-origin]
                                        [--proxy-cpus 0,1] [--load-cpus 2]
                                        [--cores-per-worker 0.55]

What runs where (by default nothing is pinned: the proxy's workers may use both cores, and
so may the rest, which is exactly what a 2-core machine running its own load generator
costs; on a machine with more cores, ``--proxy-cpus 0,1 --load-cpus 2`` gives the proxy two
cores of its own and wrk and the origin a third):

- the origin: nginx (one process, ``master_process off``) answering GET /small with a fixed
  216-byte JSON body from memory (``return 200``), so the origin costs ~12 us of CPU per
  request instead of the ~100 us of an aiohttp origin (``--python-origin``: bench/origin.py);
- the load: ``wrk -t1 -c C -d D`` (one thread) with one customer's key;
- the proxy: ``meterproxy serve`` (metered rule on ``/**``, strict durability, dry-run sink),
  the SQLite single process, or a fleet member on a fresh PostgreSQL database (``--dsn``,
  dropped at the end) with ``workers: 1`` or ``workers: 2`` (a supervisor and its workers);
- PostgreSQL: the local server, shared with whatever else runs on the machine.

Targets alternate (sqlite, fleet w1, fleet w2, [credits w1, credits w2]) ``--reps`` times;
medians are reported, with the ratio of each ``workers=2`` median to its ``workers=1``
median. For every run, the CPU seconds used during the measured ``wrk`` run by: the proxy
(the supervisor and its workers, from /proc), wrk (its rusage), nginx (from /proc) and the
PostgreSQL backends connected to the run's database (from /proc, via pg_stat_activity);
and ``proxy CPU us/req`` = proxy CPU / requests answered 2xx. For ``workers: 2`` the share
of requests each worker served (its rows in the shared usage ledger). Statements:
``pg_statements`` of the single member (``GET /admin/fleet``) before and after the run, per
1,000 requests answered 2xx. Needs wrk and nginx (apt-get install -y wrk nginx-light).

Other processes on the machine take CPU from whichever target runs: read the ratios of one
run, and the proxy's CPU per request, rather than absolute rates.

``--cores-per-worker X`` (root, a cgroup ``cpu`` controller: v1's ``cfs_quota_us`` or v2's
``cpu.max``): every proxy target runs in its own cgroup capped at X cores per worker (X for
the SQLite process and ``workers: 1``, 2X for ``workers: 2``), so the two runs get the CPU a
machine with a core per worker would give them, and wrk, the origin and PostgreSQL keep the
rest. On two cores, without it, two workers get what the rest leaves them (about 1.3 cores)
and the ratio measures the machine; with it, it measures whether the proxy scales with the
CPU it is given. The ratio is only meaningful while the rest of the machine keeps up: the
report's ``proxy CPU s`` per measured second must be close to the cap (``budget used``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import asyncpg

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PY = sys.executable
TOKEN = "bench-admin-token"
RULES = """version: 1
meters: {api_calls: {stripe_event_name: api_calls}}
rules:
  - {name: all, match: {path: "/**"}, usage: [{meter: api_calls, quantity: 1, credits: 0.001}]}
"""


def port() -> int:
    """A port that was free a moment ago: only for a server that cannot listen on port 0 and
    say which port it got (meterproxy at log level warning, nginx); its start is retried on
    new ports when it failed because the port was taken meanwhile (``PORT_TRIES``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PORT_TRIES = 5


def in_use(log: Path) -> bool:
    text = log.read_bytes().decode(errors="replace").lower()
    return "address already in use" in text or "errno 98" in text


def admin(url: str, method: str, path: str, body: Any = None) -> Any:
    req = urllib.request.Request(url + path, method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {TOKEN}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def wait_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: exited with {proc.returncode} before it was up")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2):
                if proc.poll() is None:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


SMALL = (b'{"id":"bench-small","object":"item","items":[{"id":1,"name":"widget"},'
         b'{"id":2,"name":"gadget"}],"pad":"')
SMALL = SMALL + b"x" * (216 - len(SMALL) - 2) + b'"}'
NGINX_ORIGIN = """daemon off;
master_process off;
worker_processes 1;
pid {work}/nginx.pid;
error_log stderr error;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {work}/client_body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        keepalive_requests 1000000;
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""


def pinned(cpus: str | None) -> list[str]:
    """The ``taskset`` prefix that runs a command on ``cpus`` (none: not pinned)."""
    return [] if cpus is None else ["taskset", "-c", cpus]


class CpuCap:
    """A cgroup capping the processes placed in it (and their children) at ``cores`` CPUs:
    cgroup v1's ``cpu`` controller (``cpu.cfs_quota_us`` over a 100 ms period) or cgroup v2's
    ``cpu.max`` (the controller enabled for children of the root). ``close`` removes it once
    its processes are gone, and only warns when it cannot."""

    V1 = Path("/sys/fs/cgroup/cpu")
    V2 = Path("/sys/fs/cgroup")
    PERIOD_US = 100_000

    @classmethod
    def check(cls) -> None:
        """Fails before any run when no cpu controller can cap a child cgroup."""
        if (cls.V1 / "cpu.cfs_quota_us").exists():
            return
        sub = cls.V2 / "cgroup.subtree_control"
        if sub.exists() and "cpu" in sub.read_text().split():
            return
        raise SystemExit("--cores-per-worker needs a cgroup cpu controller: cgroup v1's at "
                         f"{cls.V1}, or v2's enabled in {sub} (echo +cpu > {sub}); and root")

    def __init__(self, cores: float) -> None:
        self.check()
        name = f"meterproxy-bench-{uuid.uuid4().hex[:8]}"
        quota = round(cores * self.PERIOD_US)
        v1 = (self.V1 / "cpu.cfs_quota_us").exists()
        self.path = (self.V1 if v1 else self.V2) / name
        self.path.mkdir()
        try:
            if v1:
                (self.path / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
                (self.path / "cpu.cfs_quota_us").write_text(str(quota))
            else:
                (self.path / "cpu.max").write_text(f"{quota} {self.PERIOD_US}")
        except OSError:
            self.path.rmdir()
            raise
        self.cores = cores

    def enter(self) -> None:
        """Moves the calling process into the cgroup (a ``preexec_fn``: the child, before its
        exec, so nothing it starts runs outside the cap)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def close(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:                            # its last process is still exiting
                time.sleep(0.1)
        print(f"warning: could not remove the cgroup {self.path}", file=sys.stderr)


def start_origin(work: Path, python_origin: bool,
                 cpus: str | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """nginx answering with SMALL (or bench/origin.py, on port 0: it prints the port it
    bound); (process, base URL). nginx needs its port in its config: a start that failed
    because the port was taken meanwhile is retried on a new one."""
    if python_origin:
        proc = subprocess.Popen([*pinned(cpus), PY, str(BENCH / "origin.py"), "0"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        found = re.match(rb"listening on 127\.0\.0\.1:(\d+)", line)
        if found is None:
            raise RuntimeError(f"bench/origin.py did not start: {line!r}")
        return _origin_up(proc, f"http://127.0.0.1:{int(found.group(1))}")
    d = work / "nginx"
    d.mkdir()
    conf = d / "nginx.conf"
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    for i in range(PORT_TRIES):
        op = port()
        conf.write_text(NGINX_ORIGIN.format(work=d, port=op, body=SMALL.decode()))
        err = d / f"nginx{i}.log"
        with err.open("wb") as fh:
            proc = subprocess.Popen([*pinned(cpus), nginx, "-e", "stderr", "-p", str(d), "-c",
                                     str(conf)], stdout=subprocess.DEVNULL, stderr=fh)
        try:
            return _origin_up(proc, f"http://127.0.0.1:{op}")
        except OSError:
            if i == PORT_TRIES - 1 or proc.poll() is None or not in_use(err):
                raise
    raise AssertionError("unreachable")


def _origin_up(proc: subprocess.Popen[bytes], url: str) -> tuple[subprocess.Popen[bytes], str]:
    end = time.monotonic() + 20
    while True:
        try:
            if proc.poll() is not None:
                raise OSError(f"{url}: the origin exited with {proc.returncode}")
            with urllib.request.urlopen(url + "/small", timeout=2) as r:
                assert r.read() == SMALL
                return proc, url
        except OSError:
            if time.monotonic() > end or proc.poll() is not None:
                raise
            time.sleep(0.1)


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of live processes (0 for a pid that is gone)."""
    total = 0
    for pid in pids:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(f[11]) + int(f[12])
    return total / TICK


def children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if int(Path(f"/proc/{d}/stat").read_text().rpartition(")")[2].split()[1]) == pid:
                    out.append(int(d))
            except OSError:
                continue
    return out


def wrk(url: str, key: str, conns: int, duration: int,
        cpus: str | None = None) -> tuple[float, int, float]:
    """(requests/s, requests answered 2xx, wrk's own CPU seconds)."""
    proc = subprocess.Popen([*pinned(cpus), "wrk", "-t1", f"-c{conns}", f"-d{duration}s", "-H",
                             f"Authorization: Bearer {key}", url],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _pid, _status, ru = os.wait4(proc.pid, 0)
    proc.returncode = 0
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if rps is None or total is None:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    return (float(rps.group(1)), int(total.group(1)) - (int(bad.group(1)) if bad else 0),
            ru.ru_utime + ru.ru_stime)


async def _pg_facts(base: str, name: str) -> tuple[list[int], dict[str, int]]:
    """The PIDs of the backends connected to database ``name``, and its usage ledger's rows
    per member."""
    conn = await asyncpg.connect(f"{base}/{name}")
    try:
        pids = [r[0] for r in await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            name)]
        rows = {r[0]: r[1] for r in await conn.fetch(
            "SELECT member_id, count(*) FROM usage_ledger GROUP BY 1")}
    finally:
        await conn.close()
    return pids, rows


async def _db(base: str, name: str, create: bool) -> None:
    conn = await asyncpg.connect(f"{base}/postgres")
    try:
        await conn.execute(f'CREATE DATABASE "{name}"' if create
                           else f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def run_target(kind: str, workers: int, block: bool, a: argparse.Namespace,
               work: Path, origin: str, origin_pid: int) -> dict[str, float]:
    d = Path(tempfile.mkdtemp(dir=work))
    (d / "rules.yaml").write_text(RULES)
    cfg: dict[str, Any] = {
        "upstream": {"url": origin}, "rules": str(d / "rules.yaml"),
        "storage": {"path": str(d / "m.db"), "durability": "strict"},
        "admin": {"token": TOKEN}, "stripe": {"sink": "dry_run", "flush_interval": "1s"},
        "log_level": "warning", "workers": workers}
    cap = CpuCap(a.cores_per_worker * workers) if a.cores_per_worker else None
    try:
        return _run_capped(kind, workers, block, a, d, cfg, cap, origin_pid)
    finally:
        if cap is not None:
            cap.close()


def _run_capped(kind: str, workers: int, block: bool, a: argparse.Namespace, d: Path,
                cfg: dict[str, Any], cap: CpuCap | None, origin_pid: int) -> dict[str, float]:
    db = None
    if kind == "fleet":
        db = f"mp_bench_{uuid.uuid4().hex[:10]}"
        asyncio.run(_db(a.dsn, db, True))
        cfg["storage"].update({"backend": "postgres", "dsn": f"{a.dsn}/{db}"})
        cfg["fleet"] = {"member_id": "bench"}
    # the ports go in the config (workers share the public one): a start that failed
    # because one was taken meanwhile is retried on new ones
    for i in range(PORT_TRIES):
        pp, ap = port(), port()
        cfg.update({"listen": f"127.0.0.1:{pp}", "admin_listen": f"127.0.0.1:{ap}"})
        (d / "c.yaml").write_text(json.dumps(cfg))
        log = (d / "proxy.log").open("wb")
        try:
            proc = subprocess.Popen([*pinned(a.proxy_cpus), PY, "-m", "proxy", "serve",
                                     "--config", str(d / "c.yaml")],
                                    cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=None if cap is None else cap.enter)
        except BaseException:
            log.close()
            if db is not None:
                asyncio.run(_db(a.dsn, db, False))
            raise
        aurl = f"http://127.0.0.1:{ap}"
        try:
            wait_up(aurl, proc)
            break
        except RuntimeError:
            proc.terminate()
            proc.wait(120)
            log.close()
            if i == PORT_TRIES - 1 or not in_use(d / "proxy.log"):
                if db is not None:
                    asyncio.run(_db(a.dsn, db, False))
                raise
    try:
        body: dict[str, Any] = {"id": "bench"}
        if block:
            body["overage"] = "block"
        admin(aurl, "POST", "/admin/customers", body)
        if block:
            admin(aurl, "POST", "/admin/customers/bench/grants",
                  {"credits": "1000000000", "idempotency_key": "bench"})
        key = admin(aurl, "POST", "/admin/customers/bench/keys", {"name": "b"})["key"]
        time.sleep(1.5 if workers > 1 else 0.2)       # the key reaches every worker
        url = f"http://127.0.0.1:{pp}/small"
        wrk(url, key, a.connections, 3, a.load_cpus)   # warm-up
        before = admin(aurl, "GET", "/admin/fleet")["this_member"]["pg_statements"] \
            if kind == "fleet" and workers == 1 else 0
        mine = [proc.pid, *children(proc.pid)]
        pg_pids, shipped0 = asyncio.run(_pg_facts(a.dsn, db)) if db else ([], {})
        cpu0 = [cpu_seconds(mine), cpu_seconds([origin_pid]), cpu_seconds(pg_pids)]
        t0 = time.monotonic()
        rps, ok, wrk_cpu = wrk(url, key, a.connections, a.duration, a.load_cpus)
        took = time.monotonic() - t0
        cpu1 = [cpu_seconds(mine), cpu_seconds([origin_pid]), cpu_seconds(pg_pids)]
        out = {"rps": rps, "ok": ok, "cpu_proxy": cpu1[0] - cpu0[0], "cpu_wrk": wrk_cpu,
               "cpu_origin": cpu1[1] - cpu0[1], "cpu_pg": cpu1[2] - cpu0[2],
               "seconds": took}
        out["proxy_us_per_req"] = out["cpu_proxy"] * 1e6 / max(ok, 1)
        if cap is not None:
            out["budget_used"] = out["cpu_proxy"] / took / cap.cores
        if kind == "fleet" and workers == 1:
            after = admin(aurl, "GET", "/admin/fleet")["this_member"]["pg_statements"]
            out["pg_statements_per_1000"] = (after - before) * 1000 / max(ok, 1)
            out["pg_statements_per_second"] = (after - before) / took
        if db and workers > 1:
            time.sleep(2.5)                            # every worker ships (ship_interval 1 s)
            _p, shipped = asyncio.run(_pg_facts(a.dsn, db))
            served = sorted(shipped.get(m, 0) - shipped0.get(m, 0) for m in shipped)
            out["worker_share_min"] = served[0] / max(1, sum(served))
        return out
    finally:
        proc.terminate()
        proc.wait(120)
        log.close()
        if db is not None:
            asyncio.run(_db(a.dsn, db, False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432")
    ap.add_argument("--no-credits", action="store_true",
                    help="skip the targets whose customer spends credit leases")
    ap.add_argument("--python-origin", action="store_true",
                    help="bench/origin.py (aiohttp) as the origin instead of nginx")
    ap.add_argument("--load-cpus", help="taskset CPU list for wrk and the origin (e.g. 2)")
    ap.add_argument("--proxy-cpus",
                    help="taskset CPU list for the proxy and its workers (e.g. 0,1)")
    ap.add_argument("--cores-per-worker", type=float,
                    help="cap each proxy target at this many CPUs per worker (a cgroup; root)")
    a = ap.parse_args()
    if a.cores_per_worker:
        CpuCap.check()
    targets = [("sqlite", 1, False), ("fleet", 1, False), ("fleet", 2, False)]
    if not a.no_credits:
        targets += [("fleet", 1, True), ("fleet", 2, True)]
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        origin, origin_url = start_origin(work, a.python_origin, a.load_cpus)
        try:
            for _ in range(a.reps):
                for kind, workers, block in targets:
                    name = f"{kind} workers={workers}" + (" credits(block)" if block else "")
                    results.setdefault(name, []).append(
                        run_target(kind, workers, block, a, work, origin_url, origin.pid))
                    print(name, {k: round(v, 3) for k, v in results[name][-1].items()},
                          file=sys.stderr, flush=True)
        finally:
            origin.terminate()
            origin.wait()
    print(report(results))


def report(results: dict[str, list[dict[str, float]]]) -> str:
    def med(rs: list[dict[str, float]], k: str) -> float | None:
        v = [r[k] for r in rs if k in r]
        return statistics.median(v) if v else None

    def f(v: float | None, fmt: str) -> str:
        return "" if v is None else format(v, fmt)

    lines = ["| target | requests/s (median) | vs workers=1 | runs (requests/s) | proxy CPU s "
             "| proxy CPU us/req | wrk CPU s | origin CPU s | PG backends CPU s "
             "| least-loaded worker's share | PG statements / 1,000 req | PG statements / s "
             "| budget used |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n, rs in results.items():
        rps = med(rs, "rps")
        assert rps is not None
        one = med(results.get(n.replace("workers=2", "workers=1"), rs), "rps") or rps
        lines.append(
            f"| {n} | {rps:.0f} | {rps / one:.2f}x | "
            f"{', '.join(format(r['rps'], '.0f') for r in rs)} | "
            f"{f(med(rs, 'cpu_proxy'), '.2f')} | {f(med(rs, 'proxy_us_per_req'), '.0f')} | "
            f"{f(med(rs, 'cpu_wrk'), '.2f')} | {f(med(rs, 'cpu_origin'), '.2f')} | "
            f"{f(med(rs, 'cpu_pg'), '.2f')} | {f(med(rs, 'worker_share_min'), '.2f')} | "
            f"{f(med(rs, 'pg_statements_per_1000'), '.1f')} | "
            f"{f(med(rs, 'pg_statements_per_second'), '.1f')} | "
            f"{f(med(rs, 'budget_used'), '.2f')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
