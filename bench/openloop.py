"""A small open-loop HTTP/1.1 load generator: requests are sent on a fixed schedule
(uniform arrivals at --rate) whatever the responses do, over a pool of keep-alive
connections; a new connection is opened when none is idle. Prints one JSON object.

Latency is measured from the moment the request is written to the moment the last
byte of the response is parsed (Content-Length or chunked), with perf_counter.
Usage: python bench/openloop.py --host H --port P --path /small --rate 1000 --duration 5
       [--header 'Authorization: Bearer X'] [--conns 16] [--stalls FILE ...]
       python bench/openloop.py --port P --path /small --sequential --duration 5
       (one connection, one request at a time: latency without any queueing)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time

import stalls  # bench/ is not a package: run as a script or with bench/ on the path
import uvloop


class Conn(asyncio.Protocol):
    def __init__(self, pool: list[Conn], results: list[tuple[float, int, float]],
                 done: asyncio.Event) -> None:
        self.pool, self.results, self.done = pool, results, done
        self.t: asyncio.Transport | None = None
        self.buf = bytearray()
        self.t0 = 0.0
        self.busy = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.busy:
            self.busy = False
            self.results.append((time.perf_counter() - self.t0, 0, self.t0))
            self.done.set()

    def send(self, req: bytes) -> None:
        self.busy = True
        self.buf.clear()
        self.t0 = time.perf_counter()
        assert self.t is not None
        self.t.write(req)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        status = self._complete()
        if status:
            self.results.append((time.perf_counter() - self.t0, status, self.t0))
            self.busy = False
            self.buf.clear()
            self.pool.append(self)
            self.done.set()

    def _complete(self) -> int:
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return 0
        head = bytes(buf[:end]).decode("latin-1").lower()
        status = int(head[9:12])
        body = end + 4
        i = head.find("content-length:")
        if i >= 0:
            n = int(head[i + 15:head.find("\r", i) if head.find("\r", i) > 0 else None])
            return status if len(buf) - body >= n else 0
        if "chunked" in head:
            pos = body
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return 0
                size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
                if size == 0:
                    return status if buf.find(b"\r\n", eol + 2) >= 0 else 0
                pos = eol + 2 + size + 2
                if pos > len(buf):
                    return 0
        return status  # no body


def pct(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    i = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[i]


async def main(a: argparse.Namespace) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    hdrs = "".join(f"{h}\r\n" for h in a.header)
    req = (f"GET {a.path} HTTP/1.1\r\nHost: {a.host}:{a.port}\r\n{hdrs}\r\n").encode()
    pool: list[Conn] = []
    results: list[tuple[float, int, float]] = []
    done = asyncio.Event()
    conns: list[Conn] = []

    async def new_conn() -> Conn:
        _, c = await loop.create_connection(lambda: Conn(pool, results, done), a.host, a.port)
        conns.append(c)
        return c

    if a.sequential:
        return await sequential(a, req, await new_conn(), results, done)
    for _ in range(a.conns):
        pool.append(await new_conn())
    total = int(a.rate * a.duration)
    interval = 1.0 / a.rate
    lags: list[float] = []
    opened = 0
    start = time.perf_counter() + 0.02
    i = 0
    while i < total:
        now = time.perf_counter()
        due = start + i * interval
        if due > now:
            await asyncio.sleep(due - now)
            continue
        while pool and pool[-1].closed:
            pool.pop()
        if pool:
            c = pool.pop()
        else:
            c = await new_conn()
            opened += 1
        lags.append(time.perf_counter() - due)
        c.send(req)
        i += 1
    elapsed = time.perf_counter() - start
    deadline = time.perf_counter() + 10
    while len(results) < total and time.perf_counter() < deadline:
        done.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 1)
    for c in conns:
        if c.t is not None:
            c.t.close()
    lags.sort()
    dump_results(results)
    return {**figures(results, a), "sent": total, "rate_target": a.rate,
            "rate_achieved": total / elapsed if elapsed > 0 else 0,
            "extra_connections": opened, "send_lag_p99_ms": pct(lags, 0.99) * 1e3}


def dump_results(results: list[tuple[float, int, float]]) -> None:
    """With ``OPENLOOP_DUMP=PREFIX``: every request of the run as JSON in
    ``PREFIX.<pid>.<ms>``: (latency s, status, sent at: perf_counter, which is
    CLOCK_MONOTONIC, so comparable with bench/loop_probe.py's records of the proxy)."""
    if prefix := os.environ.get("OPENLOOP_DUMP"):
        with open(f"{prefix}.{os.getpid()}.{int(time.perf_counter() * 1e3)}", "w") as fh:
            json.dump(results, fh)


def figures(results: list[tuple[float, int, float]], a: argparse.Namespace
            ) -> dict[str, object]:
    """Counts and percentiles of the 2xx latencies; with ``a.stalls`` (bench/stalls.py's
    files) also the percentiles without the requests a CPU stall delayed (``calm_*``)."""
    lat = sorted(r[0] for r in results if 200 <= r[1] < 300)
    statuses: dict[str, int] = {}
    for _, st, _t in results:
        statuses[str(st)] = statuses.get(str(st), 0) + 1
    out: dict[str, object] = {
        "completed": len(results), "ok_2xx": len(lat), "statuses": statuses,
        "p50_ms": pct(lat, 0.50) * 1e3, "p90_ms": pct(lat, 0.90) * 1e3,
        "p99_ms": pct(lat, 0.99) * 1e3, "p999_ms": pct(lat, 0.999) * 1e3,
        "max_ms": (lat[-1] * 1e3) if lat else float("nan")}
    paths = getattr(a, "stalls", None)
    if paths:
        time.sleep(0.005)       # the detectors' last lines (they wake every millisecond)
        kept, left_out, stalled = stalls.outside(
            [(t, d) for d, st, t in results if 200 <= st < 300], stalls.read_windows(paths))
        kept.sort()
        out.update({"calm_p50_ms": pct(kept, 0.50) * 1e3, "calm_p99_ms": pct(kept, 0.99) * 1e3,
                    "calm_left_out": left_out, "stalled_ms": stalled})
    return out


async def sequential(a: argparse.Namespace, req: bytes, c: Conn,
                     results: list[tuple[float, int, float]], done: asyncio.Event
                     ) -> dict[str, object]:
    """One connection, one request at a time: the next is sent as soon as the previous
    response has ended, for ``duration`` seconds (latency with no queueing at all)."""
    end = time.perf_counter() + a.duration
    while time.perf_counter() < end and not c.closed:
        done.clear()
        c.send(req)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 10)
        if c.busy:
            break               # no answer within 10 s
    if c.t is not None:
        c.t.close()
    dump_results(results)
    return {**figures(results, a), "sent": len(results), "rate_target": 0.0,
            "rate_achieved": len(results) / a.duration, "extra_connections": 0,
            "send_lag_p99_ms": 0.0}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/small")
    ap.add_argument("--rate", type=float, default=0.0, help="requests per second (open loop)")
    ap.add_argument("--sequential", action="store_true",
                    help="one connection, one request at a time (no --rate)")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--header", action="append", default=[])
    ap.add_argument("--stalls", action="append", default=[],
                    help="bench/stalls.py output files: also report calm_p50/p99_ms")
    args = ap.parse_args()
    if not args.sequential and args.rate <= 0:
        ap.error("--rate is required (or --sequential)")
    out = uvloop.run(main(args))
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
