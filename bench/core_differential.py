"""Report (not a test): the differential corpus of tests/test_differential.py through the bare
aiohttp proxy (bench/bare_proxy.py) and the "core" proxy (bench/core_proxy.py: web.Server +
proxy.upstream), on the unmetered route. Prints, per case that differs, what differs: the
requests the upstream received (compared without framing headers, like the suite) or the
responses the client received (without Date/Server). Documented bare-proxy behaviour is not
filtered out: this lists every difference for whoever integrates the core.

usage: .venv/bin/python bench/core_differential.py [--deep]   (~1 minute)
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.differential import RecordingUpstream, exchange, parse_stream  # noqa: E402
from tests.test_differential import (  # noqa: E402
    CASES,
    REQ_IGNORE,
    RESP_IGNORE,
    RESPONSES,
    cl,
    request_views,
    views,
)


def _port(proc: subprocess.Popen[bytes], name: str) -> int:
    """The port a proxy started on port 0 bound: it prints ``listening on 127.0.0.1:<port>``
    once it listens (no pick-then-bind race: the port is never free between the two)."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    found = re.match(rb"listening on 127\.0\.0\.1:(\d+)", line)
    if found is None:
        raise SystemExit(f"{name} proxy did not start (exit code {proc.poll()}): {line!r}")
    return int(found.group(1))


def _drop_accept(view: object) -> object:
    assert isinstance(view, tuple)
    start, headers, *rest = view
    return (start, tuple(h for h in headers if h != (b"Accept", b"*/*")), *rest)


def _first_diff(bare: list[object], core: list[object]) -> str:
    """The first differing field of the first differing request, short."""
    for b, c in zip(bare, core, strict=True):
        if b == c:
            continue
        assert isinstance(b, tuple) and isinstance(c, tuple)
        for name, x, y in zip(("start", "headers", "body", "trailers", "complete"), b, c,
                              strict=True):
            if x != y:
                if name == "headers":
                    xs, ys = list(x), list(y)
                    return (f"headers: bare only {[h for h in xs if h not in ys]}, core only "
                            f"{[h for h in ys if h not in xs]}"
                            + ("" if sorted(xs) != sorted(ys) else ", order: bare "
                               f"{[h[0] for h in xs]} core {[h[0] for h in ys]}"))[:400]
                return f"{name}: bare {x!r:.150} core {y!r:.150}"
    return "?"


def main() -> None:
    up = RecordingUpstream().start()
    up.scripts.update(RESPONSES)
    up.scripts["ready"] = cl(b"ok")
    started = {name: subprocess.Popen([sys.executable, str(ROOT / "bench" / f"{name}_proxy.py"),
                                       "0", f"http://127.0.0.1:{up.port}"],
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
               for name in ("bare", "core")}
    procs = list(started.values())
    try:
        ports = {name: _port(p, name) for name, p in started.items()}
        diffs: dict[str, str] = {}
        kinds: Counter[str] = Counter()
        accept_added = 0
        for case in CASES:
            seen = {}
            for name, port in ports.items():
                tag = f"{name}-f"
                raw = exchange(port, case.payload(b"/f", tag, None),
                               gap=0.05 if case.split else 0.0, half_close=case.half_close)
                got = up.received.pop(f"{case.name}~{tag}", [])
                seen[name] = (parse_stream(raw, False, case.methods),
                              [parse_stream(r, True)[0] for r in got])
            b_req, c_req = request_views(seen["bare"][1], seen["core"][1], REQ_IGNORE)
            # aiohttp's client adds `Accept: */*` when the client sent no Accept; the pool
            # invents no header: counted, then compared without it
            stripped: list[object] = [_drop_accept(v) for v in b_req]
            if stripped != b_req:
                accept_added += 1
            b_req = stripped
            b_resp = views(seen["bare"][0], RESP_IGNORE)
            c_resp = views(seen["core"][0], RESP_IGNORE)
            what = []
            if len(b_req) != len(c_req):
                what.append(f"upstream saw {len(b_req)} (bare) vs {len(c_req)} (core) requests")
            elif b_req != c_req:
                what.append("upstream requests differ: " + _first_diff(b_req, c_req))
            if b_resp != c_resp:
                what.append("client responses differ: bare "
                            + repr([(m.status, m.framing, len(m.body), m.complete)
                                    for m in seen["bare"][0]])
                            + " core " + repr([(m.status, m.framing, len(m.body), m.complete)
                                               for m in seen["core"][0]]))
            if what:
                diffs[case.name] = "; ".join(what)
                kinds[case.response] += 1
        print(f"{len(CASES)} cases (unmetered route), {len(CASES) - len(diffs)} identical, "
              f"{len(diffs)} differ")
        for name, said in diffs.items():
            print(f"- {name}: {said}")
        print("by response shape:", dict(kinds))
        print(f"(and in {accept_added} cases the bare proxy's upstream got an `Accept: */*` "
              "that aiohttp's client added; not counted above)")
    finally:
        for p in procs:
            p.terminate()
            p.wait(30)
        up.stop()


if __name__ == "__main__":
    main()
