"""Differential suite (issue 13 groundwork): every request/response shape of the corpus goes
through the bare aiohttp proxy (bench/bare_proxy.py) and through meterproxy (a real process,
real SQLite, strict durability) against one recording upstream on raw sockets, from raw
socket clients. What the upstream received and what the client received must be the same
bytes except the header names in REQ_IGNORE / RESP_IGNORE and the differences listed in
docs/differential.md, each asserted exactly here.

Every case runs twice: under ``/f`` (an unmetered ``auth: none`` rule) and under ``/m`` (a
metered rule, API key, strict durability). ``DIFF_DEEP=1`` runs the full cross product.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from tests.differential import Message, RecordingUpstream, Script, exchange, parse_stream
from tests.ports import PortInUse, in_use, with_free_ports

ROOT = Path(__file__).resolve().parent.parent
DEEP = os.environ.get("DIFF_DEEP") == "1"

# header names (lower-case) whose values legitimately differ; see docs/differential.md
RESP_IGNORE = frozenset((b"date", b"server", b"x-request-id", b"x-credits-remaining"))
REQ_IGNORE = frozenset((b"x-case", b"x-forwarded-for", b"x-forwarded-proto",
                        b"x-forwarded-host", b"x-request-id"))

RULES = """\
version: 1
meters: {api_calls: {stripe_event_name: api_calls}}
rules:
  - {name: metered, match: {path: "/m/**"}, usage: [{meter: api_calls, quantity: 1}]}
  - {name: free, match: {path: "/**"}, auth: none}
"""

SMALL = b'{"hello":"world","n":[1,2,3]}'
K64 = bytes(range(256)) * 256
M1 = bytes(range(256)) * 4096

# ---------------------------------------------------------------- upstream responses


def _resp(status: bytes, headers: Sequence[tuple[bytes, bytes]], body: bytes = b"",
          version: bytes = b"HTTP/1.1") -> bytes:
    return version + b" " + status + b"\r\n" + b"".join(
        k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n" + body


def _chunked(pieces: Sequence[bytes], trailers: bytes = b"") -> list[bytes]:
    return [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces] + [b"0\r\n" + trailers + b"\r\n"]


def cl(body: bytes, extra: Sequence[tuple[bytes, bytes]] = (),
       status: bytes = b"200 OK") -> Script:
    head = [(b"Content-Type", b"application/json"), *extra,
            (b"Content-Length", str(len(body)).encode())]
    return Script(lambda m: [_resp(status, head, b"" if m == "HEAD" else body)])


def chunked(pieces: Sequence[bytes], trailers: bytes = b"", delay: float = 0.0) -> Script:
    head = _resp(b"200 OK", [(b"Content-Type", b"text/plain"),
                             (b"Transfer-Encoding", b"chunked")])
    return Script(lambda m: [head] if m == "HEAD" else [head, *_chunked(pieces, trailers)],
                  delay=delay)


RESPONSES: dict[str, Script] = {
    "cl-small": cl(SMALL),
    "cl-empty": cl(b""),
    "cl-64k": cl(K64, [(b"Content-Type", b"application/octet-stream")]),
    "cl-1m": cl(M1),
    "cl-404": cl(b'{"error":"nope"}', status=b"404 Not Found"),
    "cl-500": cl(b"boom", status=b"500 Internal Server Error"),
    "cl-201-location": cl(SMALL, [(b"Location", b"/v1/items/7")], status=b"201 Created"),
    "redirect-302": cl(b"", [(b"Location", b"http://elsewhere.example/x")], status=b"302 Found"),
    "chunked-3": chunked([b"alpha-", b"beta-", b"gamma"]),
    "chunked-trailers": chunked([b"with", b"trailers"], trailers=b"X-Checksum: abc\r\n"),
    "chunked-1byte": chunked([b"x"] * 40),
    "chunked-ext": Script(lambda m: [_resp(b"200 OK", [(b"Transfer-Encoding", b"chunked")])]
                          + ([] if m == "HEAD" else [b"5;name=val\r\nhello\r\n0\r\n\r\n"])),
    "close-delimited-11": Script(lambda m: [_resp(b"200 OK", [(b"Connection", b"close")],
                                                  b"" if m == "HEAD" else b"until-close")],
                                 close=True),
    "close-delimited-10": Script(lambda m: [_resp(b"200 OK", [(b"Content-Type", b"text/plain")],
                                                  b"" if m == "HEAD" else b"http/1.0 body",
                                                  version=b"HTTP/1.0")], close=True),
    "204": Script(lambda m: [_resp(b"204 No Content", [(b"X-Thing", b"1")])]),
    "304": Script(lambda m: [_resp(b"304 Not Modified", [(b"ETag", b'"v1"')])]),
    "103-early-hints": Script(lambda m: [
        _resp(b"103 Early Hints", [(b"Link", b"</style.css>; rel=preload")]),
        _resp(b"200 OK", [(b"Content-Length", b"2")], b"" if m == "HEAD" else b"ok")]),
    "many-headers": cl(b"many", [(b"X-H-%d" % i, b"v%d" % i) for i in range(90)]),
    "duplicate-headers": cl(b"dup", [(b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"),
                                     (b"X-Dup", b"one"), (b"X-Dup", b"two"),
                                     (b"Cache-Control", b"no-cache"),
                                     (b"Cache-Control", b"no-store")]),
    "huge-header": cl(b"big", [(b"X-Big", b"h" * 8000)]),
    "header-case": cl(b"case", [(b"x-lower", b"1"), (b"X-UPPER", b"2"), (b"X-MiXeD", b"3")]),
    "hop-by-hop": cl(b"hop", [(b"Connection", b"X-Secret, keep-alive"), (b"X-Secret", b"s"),
                              (b"Keep-Alive", b"timeout=5"), (b"Proxy-Authenticate", b"Basic"),
                              (b"Upgrade", b"h2c")]),
    "dribbled-cl": Script(lambda m: [_resp(b"200 OK", [(b"Content-Length", b"12")])]
                          + ([] if m == "HEAD" else [b"drib", b"bled", b"body"]), delay=0.03),
    "dribbled-chunked": chunked([b"slow-", b"chunked-", b"body"], delay=0.03),
    "aborted-cl": Script(lambda m: [_resp(b"200 OK", [(b"Content-Length", b"1000")]),
                                    b"" if m == "HEAD" else b"only-part-of-it"], close=True),
    "aborted-chunked": Script(lambda m: [_resp(b"200 OK", [(b"Transfer-Encoding", b"chunked")]),
                                         b"" if m == "HEAD" else b"5\r\nhello\r\n8\r\nhal"],
                              close=True),
    "aborted-cl-large": Script(lambda m: [_resp(b"200 OK", [(b"Content-Length", b"1048576")]),
                                          b"" if m == "HEAD" else K64], close=True),
    "aborted-head": Script(lambda m: [b"HTTP/1.1 200 OK\r\nContent-Le"], close=True),
    "over-limit-header": cl(b"big", [(b"X-Big", b"h" * 9000)]),
}
# the upstream's head never arrived whole (or is over aiohttp's 8190-byte field limit)
UNPARSEABLE_HEAD = frozenset(("aborted-head", "over-limit-header"))
# cases neither proxy forwards (aiohttp's router answers 404 to the asterisk-form target;
# an unknown expectation is answered 417 before any handler)
NOT_FORWARDED = frozenset(("p-asterisk-OPTIONS", "x-expect-unknown"))
# headers named by a Connection header (hop-by-hop by RFC 9110 7.6.1) in the corpus
CONNECTION_NAMED = frozenset((b"x-secret", b"x-private"))

# ---------------------------------------------------------------- client requests

BODIES: dict[str, tuple[bytes | None, bool]] = {   # name -> (body, chunked)
    "none": (None, False),
    "empty-cl": (b"", False),
    "small-cl": (SMALL, False),
    "small-chunked": (SMALL, True),
    "64k-cl": (K64, False),
    "64k-chunked": (K64, True),
    "1m-cl": (M1, False),
    "1m-chunked": (M1, True),
}
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

# request targets (after the /f or /m prefix); every path shape of the hardening issue
PATHS: dict[str, bytes] = {
    "plain": b"/v1/items",
    "query": b"/v1/items?a=1&b=two&a=3",
    "query-encoded": b"/v1/items?q=%20space%2Bplus&empty=&flag",
    "dot-dot": b"/docs/../v1/chat/completions",
    "dot-dot-encoded": b"/docs/%2e%2e/v1/chat/completions",
    "dot-dot-upper": b"/docs/%2E%2E/v1/chat/completions",
    "dot": b"/v1/./items",
    "double-slash": b"//v1/items",
    "inner-double-slash": b"/v1//items",
    "encoded-slash": b"/v1/chat%2Fcompletions",
    "encoded-chars": b"/v1/caf%C3%A9/%7Euser",
    "semicolon": b"/v1/items;jsessionid=1",
    "trailing-slash": b"/v1/items/",
    "long-path": b"/v1/" + b"a" * 3000,
    "percent-invalid": b"/v1/%zz",
    "backslash": b"/v1\\items",
    "fragment-like": b"/v1/items%23frag",
}
# shapes meterproxy canonicalizes or refuses (issue 9 item 1, pathcanon): documented
NONCANONICAL = frozenset(("dot-dot", "dot-dot-encoded", "dot-dot-upper", "dot",
                          "double-slash", "inner-double-slash", "encoded-slash",
                          "percent-invalid", "backslash"))


@dataclass(frozen=True)
class Case:
    name: str
    response: str
    requests: tuple[tuple[str, bytes, str, tuple[tuple[bytes, bytes], ...]], ...]
    # each request: (method, path, body kind, extra headers)
    version: bytes = b"HTTP/1.1"
    split: bool = False      # send the head and the body as separate pieces, 50 ms apart
    half_close: bool = False  # shut down the client's sending side after the last byte

    def payload(self, prefix: bytes, tag: str, auth: bytes | None) -> list[bytes]:
        pieces: list[bytes] = []
        for i, (method, path, body_kind, extra) in enumerate(self.requests):
            last = i == len(self.requests) - 1
            body, is_chunked = BODIES[body_kind]
            h = [(b"Host", b"api.example"), (b"User-Agent", b"difftest/1"),
                 (b"X-Case", f"{self.response}|{self.name}~{tag}".encode()), *extra]
            if auth is not None:
                h.append((b"Authorization", b"Bearer " + auth))
            if last and self.version == b"HTTP/1.1":
                h.append((b"Connection", b"close"))
            if body is not None:
                h.append((b"Transfer-Encoding", b"chunked") if is_chunked
                         else (b"Content-Length", str(len(body)).encode()))
            target = path if path == b"*" else prefix + path
            head = method.encode() + b" " + target + b" " + self.version + b"\r\n" \
                + b"".join(k + b": " + v + b"\r\n" for k, v in h) + b"\r\n"
            wire = b"" if body is None else b"".join(_chunked([body[j:j + 16384] for j in
                                                               range(0, len(body), 16384)]
                                                              if body else [])) \
                if is_chunked else body
            if self.split and wire:
                pieces += [head, wire]
            else:
                pieces.append(head + wire)
        if len(self.requests) > 1 and not self.split:
            return [b"".join(pieces)]        # pipelined: one write
        return pieces

    @property
    def methods(self) -> list[str]:
        return [r[0] for r in self.requests]


def corpus() -> Iterator[Case]:
    body_kinds = list(BODIES) if DEEP else [b for b in BODIES if not b.startswith("1m")]
    for method in METHODS:
        for body in body_kinds:
            yield Case(f"m-{method}-{body}", "cl-small", ((method, b"/v1/items", body, ()),))
    resp_methods = METHODS if DEEP else ("GET", "HEAD", "POST")
    for resp in RESPONSES:
        for method in resp_methods:
            body = "small-cl" if method in ("POST", "PUT", "PATCH") else "none"
            yield Case(f"r-{resp}-{method}", resp, ((method, b"/v1/items", body, ()),))
    for name, path in PATHS.items():
        for method in (("GET", "POST", "OPTIONS") if DEEP else ("GET",)):
            yield Case(f"p-{name}-{method}", "cl-small", ((method, path, "none", ()),))
    yield Case("p-asterisk-OPTIONS", "cl-small", (("OPTIONS", b"*", "none", ()),))
    # 100-continue: the client waits for 100 (or not), the upstream answers 100 first
    for body in ("small-cl", "64k-cl", "small-chunked"):
        yield Case(f"x-expect-{body}", "cl-small",
                   (("POST", b"/v1/upload", body, ((b"Expect", b"100-continue"),)),), split=True)
    # other expectations: 417 from both (aiohttp's Application answered it; meterproxy's
    # web.Server does the same before its pipeline); HTTP/1.0 ignores Expect
    yield Case("x-expect-unknown", "cl-small",
               (("POST", b"/v1/upload", "small-cl", ((b"Expect", b"teapot"),)),))
    yield Case("x-expect-http10", "cl-small",
               (("POST", b"/v1/upload", "small-cl", ((b"Expect", b"100-continue"),)),),
               version=b"HTTP/1.0")
    # slow request bodies (head first, body 50 ms later)
    for body in ("small-cl", "64k-chunked"):
        yield Case(f"x-slow-request-{body}", "chunked-3", (("PUT", b"/v1/items", body, ()),),
                   split=True)
    # HTTP/1.0 clients
    for resp in ("cl-small", "chunked-3", "close-delimited-10", "204"):
        yield Case(f"x-http10-{resp}", resp, (("GET", b"/v1/items", "none", ()),),
                   version=b"HTTP/1.0")
    # pipelining and keep-alive reuse on one client connection
    for resp in ("cl-small", "chunked-3", "204", "dribbled-cl"):
        for n in (2, 5):
            reqs = tuple(("GET" if i % 2 == 0 else "POST", b"/v1/items/%d" % i,
                          "none" if i % 2 == 0 else "small-cl", ()) for i in range(n))
            yield Case(f"x-pipeline{n}-{resp}", resp, reqs)
            yield Case(f"x-keepalive{n}-{resp}", resp, reqs, split=True)
    # half-close (the client shuts down its sending side after the request) is not in the
    # corpus: today both proxies race the client's EOF (docs/differential.md, "Half-close")
    yield Case("x-pipeline-head-get", "cl-small", (("HEAD", b"/a", "none", ()),
                                                   ("GET", b"/b", "none", ())))
    # request headers: many, duplicate, large, odd
    many = tuple((b"X-Req-%d" % i, b"v%d" % i) for i in range(80))
    dup = ((b"Accept", b"text/html"), (b"Accept", b"application/json"),
           (b"X-Dup", b"1"), (b"X-Dup", b"2"), (b"Cookie", b"a=1"), (b"Cookie", b"b=2"))
    for name, extra in (("many", many), ("dup", dup),
                        ("large", ((b"X-Large", b"q" * 7000),)),
                        ("near-limit", ((b"X-Large", b"q" * 8100),)),
                        ("hop", ((b"Connection", b"X-Private"), (b"X-Private", b"p"),
                                 (b"TE", b"trailers"), (b"Proxy-Authorization", b"Basic x"),
                                 (b"Keep-Alive", b"timeout=1"))),
                        ("encodings", ((b"Accept-Encoding", b"gzip, br"),
                                       (b"Content-Type", b"application/json"))),
                        ("xff", ((b"X-Forwarded-For", b"203.0.113.9"),)),
                        ("casing", ((b"x-lower", b"a"), (b"X-UPPER", b"B"))),
                        ("override-same", ((b"X-HTTP-Method-Override", b"POST"),
                                           (b"X-HTTP-Method", b"post")))):
        yield Case(f"h-{name}", "cl-small", (("POST", b"/v1/items", "small-cl", extra),))
    # a method override naming another method: the bare proxy forwards it, meterproxy
    # refuses it (documented: "Method overrides")
    for name, path, extra in (
            ("header", b"/v1/items", ((b"X-HTTP-Method-Override", b"DELETE"),)),
            ("repeated", b"/v1/items", ((b"X-Method-Override", b"POST"),
                                        (b"X-Method-Override", b"PUT"))),
            ("query", b"/v1/items?a=1&_method=DELETE", ())):
        yield Case(f"o-{name}", "cl-small", (("POST", path, "small-cl", extra),))


CASES = list(corpus())


# ---------------------------------------------------------------- processes


@dataclass
class Env:
    upstream: RecordingUpstream
    bare: int
    meter: int
    key: bytes
    procs: list[subprocess.Popen[bytes]]
    admin: int = 0


def _wait_port(port: int, proc: subprocess.Popen[bytes], path: str = "/") -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"process exited with {proc.returncode}"
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2).read()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"port {port} not ready")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("diff")
    up = RecordingUpstream().start()
    up.scripts.update(RESPONSES)
    up.scripts["ready"] = cl(b"ok")
    procs: list[subprocess.Popen[bytes]] = []
    logs = [(tmp / "bare.log").open("wb"), (tmp / "meter.log").open("wb")]

    def serving(cmd: list[str], log: int, ports: list[int], paths: list[str]) -> None:
        """Start ``cmd`` (its ports given in advance) and wait until it answers on them."""
        logs[log].flush()
        start = logs[log].tell()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=logs[log], stderr=subprocess.STDOUT)
        try:
            for port, path in zip(ports, paths, strict=True):
                _wait_port(port, proc, path)
        except AssertionError:
            proc.kill()
            proc.wait()
            if in_use((tmp / ("bare.log", "meter.log")[log]).read_bytes()[start:]):
                raise PortInUse from None
            raise
        procs.append(proc)

    try:
        bare = with_free_ports(1, lambda p: serving(
            [sys.executable, str(ROOT / "bench" / "bare_proxy.py"), str(p[0]),
             f"http://127.0.0.1:{up.port}"], 0, p, ["/"]) or p[0])
        db = tmp / "m.db"
        mp = [sys.executable, "-m", "proxy"]
        subprocess.run([*mp, "customers", "create", "diff", "--db", str(db)], check=True,
                       cwd=ROOT, capture_output=True)
        key = json.loads(subprocess.run([*mp, "keys", "create", "--customer", "diff", "--db",
                                         str(db)], check=True, cwd=ROOT,
                                        capture_output=True).stdout)["key"]
        (tmp / "rules.yaml").write_text(RULES)

        def meterproxy(ports: list[int]) -> tuple[int, int]:
            meter, admin = ports
            cfg = {"listen": f"127.0.0.1:{meter}", "admin_listen": f"127.0.0.1:{admin}",
                   "upstream": {"url": f"http://127.0.0.1:{up.port}", "read_timeout": "5s"},
                   "rules": str(tmp / "rules.yaml"),
                   "storage": {"path": str(db), "durability": "strict",
                               "commit_interval": "5ms"},
                   "admin": {"token": "diff-admin-token"},
                   "stripe": {"sink": "dry_run", "flush_interval": "1h"}, "log_level": "error"}
            (tmp / "c.yaml").write_text(json.dumps(cfg))
            # the admin listener, then the public one too
            serving([*mp, "serve", "--config", str(tmp / "c.yaml")], 1, [admin, meter],
                    ["/healthz", "/f/ready"])
            return meter, admin

        meter, admin = with_free_ports(2, meterproxy)
        yield Env(up, bare, meter, key.encode(), procs, admin)
    finally:
        for p in procs:
            p.terminate()
            p.wait(30)
        for fh in logs:
            fh.close()
        up.stop()


@dataclass
class Seen:
    client: list[Message]
    upstream: list[Message]
    raw: bytes


def observe(env: Env, port: int, case: Case, route: str, tag: str) -> Seen:
    auth = env.key if route == "m" else None
    raw = exchange(port, case.payload(b"/" + route.encode(), tag, auth),
                   gap=0.05 if case.split else 0.0, half_close=case.half_close)
    got = env.upstream.received.pop(f"{case.name}~{tag}", [])
    return Seen(parse_stream(raw, False, case.methods),
                [parse_stream(r, True)[0] for r in got], raw)


def views(msgs: list[Message], ignore: frozenset[bytes]) -> list[tuple[object, ...]]:
    return [m.view(ignore) for m in msgs]


_FRAMING = frozenset((b"content-length", b"transfer-encoding"))
_OCTET = (b"Content-Type", b"application/octet-stream")


_ACCEPT_ANY = (b"Accept", b"*/*")


def request_views(bare: list[Message], meter: list[Message],
                  ignore: frozenset[bytes]) -> tuple[list[object], list[object]]:
    """Documented ("Request body framing"): the bare proxy drops the client's Content-Length
    and re-frames every body as chunked, adding Content-Type: application/octet-stream when
    the client sent none; meterproxy keeps the client's framing. Compared here without the
    framing headers and that added Content-Type; each side's framing is asserted apart."""
    def one(m: Message, drop_octet: bool, drop_accept: bool = False) -> object:
        start, headers, _framing, body, trailers, complete = m.view(ignore | _FRAMING
                                                                    | CONNECTION_NAMED)
        hs = tuple(h for h in headers  # type: ignore[attr-defined]
                   if not (drop_octet and h == _OCTET) and not (drop_accept and h == _ACCEPT_ANY))
        return (start, hs, body, trailers, complete)
    octet = [not any(h == _OCTET for h in m.headers) for m in meter]
    # documented ("Accept"): aiohttp's client adds `Accept: */*` to a request without Accept;
    # meterproxy's core sends only the client's headers
    no_accept = [not any(h[0].lower() == b"accept" for h in m.headers) for m in meter]
    return ([one(m, o, a) for m, o, a in zip(bare, octet + [True] * len(bare),
                                             no_accept + [False] * len(bare), strict=False)],
            [one(m, False) for m in meter])




def _error_shape(seen: Seen) -> tuple[int, bytes]:
    final = [m for m in seen.client if m.complete]
    return (final[-1].status, final[-1].header(b"content-type")) if final else (0, b"")


@pytest.mark.parametrize("route", ["f", "m"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_differential(env: Env, case: Case, route: str) -> None:
    bare = observe(env, env.bare, case, route, f"bare-{route}")
    meter = observe(env, env.meter, case, route, f"meter-{route}")
    req_ignore = REQ_IGNORE | {b"authorization"} if route == "m" else REQ_IGNORE
    path_kind = case.name[2:].rsplit("-", 1)[0] if case.name.startswith("p-") else ""

    if case.name.startswith("o-"):
        # documented (docs/differential.md, "Method overrides"): the bare proxy forwards a
        # request whose override names another method; meterproxy answers 400
        # method_override_refused before any rule runs and forwards nothing
        _, path, _, extra = case.requests[0]
        assert [(m.start.split(b" ")[:2], [h for h in m.headers if h in extra])
                for m in bare.upstream] == [([b"POST", b"/" + route.encode() + path], list(extra))]
        assert meter.upstream == []
        assert [(m.status, m.header(b"content-type"), b'"method_override_refused"' in m.body)
                for m in meter.client] == [(400, b"application/json", True)]
        assert len(meter.client[0].header(b"x-request-id")) == 32
        return
    if path_kind in NONCANONICAL:
        # documented (docs/differential.md, "Paths"): meterproxy forwards what the bare proxy
        # forwards, or a canonical target, or refuses with 400; never anything else
        b_req, m_req = request_views(bare.upstream, meter.upstream, req_ignore)
        if m_req == b_req and views(meter.client, RESP_IGNORE) == views(bare.client, RESP_IGNORE):
            return
        if meter.upstream:
            target = meter.upstream[0].start.split(b" ")[1]
            assert b"/../" not in target and b"/./" not in target and b"//" not in target, target
            assert views(meter.client, RESP_IGNORE) == views(bare.client, RESP_IGNORE)
        else:
            assert _error_shape(meter) == (400, b"application/json")
        return

    # documented ("Retries"): aiohttp's client sends a bodiless idempotent request once
    # more when the upstream closed a *fresh* connection before a whole response head (a
    # streamed request body cannot be replayed: not retried); meterproxy's core retries only
    # on a reused (possibly stale) connection, so it sends every request once here
    sends = 2 if case.response == "aborted-head" and case.methods[0] in _IDEMPOTENT \
        and BODIES[case.requests[0][2]][0] is None else 1
    # the upstream received the same requests
    b_req, m_req = request_views(bare.upstream[::sends], meter.upstream, req_ignore)
    assert m_req == b_req
    not_forwarded = len(case.requests) if case.name in NOT_FORWARDED else 0
    assert len(bare.upstream) == sends * len(case.requests) - not_forwarded
    assert len(meter.upstream) == len(case.requests) - not_forwarded

    assert [m.framing for m in meter.upstream] == meter_framing(case)[:len(meter.upstream)]
    assert [m.framing for m in bare.upstream] == \
        [f for f in bare_framing(case) for _ in range(sends)][:len(bare.upstream)]
    if route == "m":
        assert [m.header(b"authorization") for m in bare.upstream] == \
            [b"Bearer " + env.key] * len(bare.upstream)
        assert [m.header(b"authorization") for m in meter.upstream] == [b""] * len(meter.upstream)
    # documented ("Connection-named headers"): the bare proxy forwards headers named by a
    # Connection header, meterproxy drops them (RFC 9110 7.6.1), both ways
    sent_named = [sorted(k.lower() for k, _ in extra if k.lower() in CONNECTION_NAMED)
                  for _, _, _, extra in case.requests]
    assert [_named(m) for m in bare.upstream] == \
        [n for n in sent_named for _ in range(sends)][:len(bare.upstream)]
    assert [_named(m) for m in meter.upstream] == [[]] * len(meter.upstream)
    finals_b = [m for m in bare.client if m.status >= 200]
    assert [_named(m) for m in finals_b] == \
        [[b"x-secret"] if case.response == "hop-by-hop" else []] * len(finals_b)
    assert [_named(m) for m in meter.client] == [[]] * len(meter.client)

    b_resp = views(bare.client, RESP_IGNORE | CONNECTION_NAMED)
    m_resp = views(meter.client, RESP_IGNORE)
    if case.response in UNPARSEABLE_HEAD:
        # documented ("Upstream failures"): the bare proxy has no error handling (aiohttp's
        # own 500 page); meterproxy answers 502 upstream_unavailable in JSON
        assert [(m.status, m.header(b"content-type")) for m in bare.client] == \
            [(500, b"text/plain; charset=utf-8")]
        assert [(m.status, m.header(b"content-type"), m.body[:len(_UNAVAILABLE)])
                for m in meter.client] == \
            [(502, b"application/json", b"" if case.methods == ["HEAD"] else _UNAVAILABLE)]
        return
    if case.response == "aborted-cl" and case.methods != ["HEAD"]:
        # documented: a small Content-Length body is read whole before meterproxy answers,
        # so a body cut short becomes a clean 502; the bare proxy has sent 200 and the
        # partial body already and closes mid-body
        assert [(m.status, m.framing, m.body, m.complete) for m in bare.client] == \
            [(200, "cl", b"only-part-of-it", False)]
        assert [(m.status, m.header(b"content-type"), b"upstream_unavailable" in m.body)
                for m in meter.client] == [(502, b"application/json", True)]
        return
    if case.response == "304":
        # documented ("Response header name case"): the bare proxy's 304 answer spells the
        # upstream's ETag as `Etag`; meterproxy forwards the name as the upstream sent it
        b304 = [_etags(m) for m in bare.client if m.status == 304]
        m304 = [_etags(m) for m in meter.client if m.status == 304]
        assert b304 == [[b"Etag"]] * len(b304) and m304 == [[b"ETag"]] * len(b304)
        b_resp = views([_etag_case(m) for m in bare.client], RESP_IGNORE | CONNECTION_NAMED)
    # the client received the same responses
    assert m_resp == b_resp
    assert len(meter.client) >= 1
    finals = [m for m in meter.client if m.status >= 200]
    # aiohttp's router answers the asterisk form (and 417) itself: no X-Request-Id
    # (documented)
    assert [len(m.header(b"x-request-id")) for m in finals] == \
        [0 if case.name in NOT_FORWARDED else 32] * len(finals)


def _etags(m: Message) -> list[bytes]:
    return [k for k, _ in m.headers if k.lower() == b"etag"]


def _etag_case(m: Message) -> Message:
    return replace(m, headers=[(b"ETag" if k == b"Etag" else k, v) for k, v in m.headers])


def _named(m: Message) -> list[bytes]:
    return sorted(k.lower() for k, _ in m.headers if k.lower() in CONNECTION_NAMED)


def meter_framing(case: Case) -> list[str]:
    """meterproxy keeps the client's framing (an empty Content-Length body included);
    aiohttp's client adds Content-Length: 0 to a bodiless POST/PUT/PATCH/DELETE."""
    out = []
    for method, _, body_kind, _ in case.requests:
        body, is_chunked = BODIES[body_kind]
        out.append("chunked" if is_chunked else "cl" if body is not None
                   or method in _CL0 else "none")
    return out


def bare_framing(case: Case) -> list[str]:
    """The bare proxy re-frames every non-empty body as chunked."""
    out = []
    for method, _, body_kind, _ in case.requests:
        body, _ = BODIES[body_kind]
        out.append("chunked" if body else "cl" if method in _CL0 else "none")
    return out


_UNAVAILABLE = b'{"error":{"type":"upstream_unavailable"'
_CL0 = frozenset(("POST", "PUT", "PATCH", "DELETE"))
_IDEMPOTENT = frozenset(("GET", "HEAD", "PUT", "DELETE", "OPTIONS"))


def _billed_calls(env: Env) -> str:
    req = urllib.request.Request(f"http://127.0.0.1:{env.admin}/admin/customers/diff/usage",
                                 headers={"Authorization": "Bearer diff-admin-token"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return str(json.load(r)["meters"].get("api_calls", "0"))


def test_metered_rule_bills_each_request_and_free_rule_none(env: Env) -> None:
    """The metered half of the corpus really is metered: three 200s on /m bill exactly three
    api_calls (strict: in the ledger before the response ends), three on /f bill none."""
    case = Case("bill-check", "cl-small", (("GET", b"/v1/items", "none", ()),))
    before = int(_billed_calls(env))
    for i in range(3):
        got = observe(env, env.meter, case, "f", f"free{i}")
        assert [m.status for m in got.client] == [200]
    assert int(_billed_calls(env)) == before
    for i in range(3):
        got = observe(env, env.meter, case, "m", f"metered{i}")
        assert [m.status for m in got.client] == [200]
    assert int(_billed_calls(env)) == before + 3
