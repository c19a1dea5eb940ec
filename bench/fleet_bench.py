#!/usr/bin/env python3
"""Fleet mode on this machine: throughput of ``workers: 2`` vs ``workers: 1`` (and the SQLite
single process), and PostgreSQL statements per 1,000 metered requests.

  .venv/bin/python bench/fleet_bench.py [--duration 10] [--connections 32] [--reps 2]

Every target: one meterproxy sidecar (metered rule on ``/**``, strict durability, dry-run
sink) in front of bench/origin.py, driven by ``wrk -t1 -c C -d D`` on GET /small with one
customer's key (pay-as-you-go, and a second run with ``overage: block`` and a large credit
grant, so every request is admitted against a credit lease). Fleet targets get a fresh
PostgreSQL database (``--dsn``, default the local server) dropped at the end. Targets
alternate, ``--reps`` times; medians reported. Statements: ``pg_statements`` of the single
member (``GET /admin/fleet``, counted by its pool) before and after the measured run, per
1,000 requests answered 2xx. Nothing is pinned: wrk, the origin, PostgreSQL and the
workers share the 2 cores, as they would on a 2-core pod with its database elsewhere only
less so; read the ratios, not the absolute rates. Needs wrk (apt-get install -y wrk).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def admin(url: str, method: str, path: str, body: Any = None) -> Any:
    req = urllib.request.Request(url + path, method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {TOKEN}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def wait_up(url: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def wrk(url: str, key: str, conns: int, duration: int) -> tuple[float, int]:
    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "-H",
                          f"Authorization: Bearer {key}", url],
                         capture_output=True, text=True, timeout=duration + 60).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if rps is None or total is None:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    return float(rps.group(1)), int(total.group(1)) - (int(bad.group(1)) if bad else 0)


async def _db(base: str, name: str, create: bool) -> None:
    conn = await asyncpg.connect(f"{base}/postgres")
    try:
        await conn.execute(f'CREATE DATABASE "{name}"' if create
                           else f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def run_target(kind: str, workers: int, block: bool, a: argparse.Namespace,
               work: Path, origin: str) -> dict[str, float]:
    pp, ap = port(), port()
    d = Path(tempfile.mkdtemp(dir=work))
    (d / "rules.yaml").write_text(RULES)
    cfg: dict[str, Any] = {
        "listen": f"127.0.0.1:{pp}", "admin_listen": f"127.0.0.1:{ap}",
        "upstream": {"url": origin}, "rules": str(d / "rules.yaml"),
        "storage": {"path": str(d / "m.db"), "durability": "strict"},
        "admin": {"token": TOKEN}, "stripe": {"sink": "dry_run", "flush_interval": "1s"},
        "log_level": "warning", "workers": workers}
    db = None
    if kind == "fleet":
        db = f"mp_bench_{uuid.uuid4().hex[:10]}"
        asyncio.run(_db(a.dsn, db, True))
        cfg["storage"].update({"backend": "postgres", "dsn": f"{a.dsn}/{db}"})
        cfg["fleet"] = {"member_id": "bench"}
    (d / "c.yaml").write_text(json.dumps(cfg))
    log = (d / "proxy.log").open("wb")
    proc = subprocess.Popen([PY, "-m", "proxy", "serve", "--config", str(d / "c.yaml")],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        aurl = f"http://127.0.0.1:{ap}"
        wait_up(aurl)
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
        wrk(url, key, a.connections, 3)                # warm-up
        before = admin(aurl, "GET", "/admin/fleet")["this_member"]["pg_statements"] \
            if kind == "fleet" and workers == 1 else 0
        t0 = time.monotonic()
        rps, ok = wrk(url, key, a.connections, a.duration)
        took = time.monotonic() - t0
        out = {"rps": rps, "ok": ok}
        if kind == "fleet" and workers == 1:
            after = admin(aurl, "GET", "/admin/fleet")["this_member"]["pg_statements"]
            out["pg_statements_per_1000"] = (after - before) * 1000 / max(ok, 1)
            out["pg_statements_per_second"] = (after - before) / took
        return out
    finally:
        proc.terminate()
        proc.wait(120)
        log.close()
        if db is not None:
            asyncio.run(_db(a.dsn, db, False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432")
    ap.add_argument("--no-credits", action="store_true",
                    help="skip the targets whose customer spends credit leases")
    a = ap.parse_args()
    targets = [("sqlite", 1, False), ("fleet", 1, False), ("fleet", 2, False)]
    if not a.no_credits:
        targets += [("fleet", 1, True), ("fleet", 2, True)]
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        op = port()
        origin = subprocess.Popen([PY, str(BENCH / "origin.py"), str(op)], cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1)
            for _ in range(a.reps):
                for kind, workers, block in targets:
                    name = f"{kind} workers={workers}" + (" credits(block)" if block else "")
                    results.setdefault(name, []).append(
                        run_target(kind, workers, block, a, work, f"http://127.0.0.1:{op}"))
                    print(name, results[name][-1], file=sys.stderr, flush=True)
        finally:
            origin.terminate()
            origin.wait()
    print("| target | requests/s (median) | vs the same at workers=1 | PG statements / 1,000 req | PG statements / s |")
    print("| --- | --- | --- | --- | --- |")
    med = {n: statistics.median(r["rps"] for r in rs) for n, rs in results.items()}
    for n, rs in results.items():
        one = med.get(n.replace("workers=2", "workers=1"), med[n])
        st = [r["pg_statements_per_1000"] for r in rs if "pg_statements_per_1000" in r]
        sps = [r["pg_statements_per_second"] for r in rs if "pg_statements_per_second" in r]
        print(f"| {n} | {med[n]:.0f} | {med[n] / one:.2f}x | "
              f"{statistics.median(st):.1f} |" if st else f"| {n} | {med[n]:.0f} | "
              f"{med[n] / one:.2f}x | |", end="")
        print(f" {statistics.median(sps):.1f} |" if sps else " |")


if __name__ == "__main__":
    main()
