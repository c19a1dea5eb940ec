"""One canonical request target, end to end: for every path shape, the rule that matched
(audit row), the credits billed, and the exact target the upstream received are asserted
together, through a real proxy and a real recording upstream, over raw sockets (HTTP client
libraries normalize targets before sending them)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from yarl import URL

from tests.conftest import Proxy, ProxyFactory
from tests.helpers import wait_until
from tests.pathcanon_kit import CHAT_TOKENS, RULES, Q, RecordingUpstream, raw_request
from tests.servers import serve

CHAT = CHAT_TOKENS * Q // 1000           # 0.001 credits per token


@dataclass(frozen=True)
class Case:
    method: str
    target: bytes
    key: bool
    status: int
    upstream: str | None            # the raw target the upstream received; None: nothing
    rule: str | None = None         # the audit row's rule; None: no usage row
    credits: int = 0                # micro-credits billed
    path: str | None = None         # the audit row's path (default: upstream's, no query)
    error: str | None = None        # the proxy's JSON error type


def ok(method: str, target: bytes, upstream: str, rule: str, credits: int,
       path: str | None = None) -> Case:
    return Case(method, target, True, 200, upstream, rule, credits, path)


def bad(target: bytes, method: str = "GET") -> Case:
    return Case(method, target, True, 400, None, error="invalid_path")


LONG = "/v1/" + "a" * 8000
DOTTED = "/v1" + "/x/.." * 1500 + "/models"

CASES: list[Case] = [
    # the review's findings
    Case("POST", b"/docs/../v1/chat/completions", False, 401, None, error="missing_api_key"),
    Case("POST", b"/docs/%2e%2e/v1/chat/completions", False, 401, None,
         error="missing_api_key"),
    Case("POST", b"/docs/%2E%2e/v1/chat/completions", False, 401, None,
         error="missing_api_key"),
    ok("POST", b"/docs/%2e%2E/v1/chat/completions", "/v1/chat/completions", "chat", CHAT),
    ok("POST", b"/v1/models/x/../premium-x/infer", "/v1/models/premium-x/infer", "premium",
       10 * Q),
    ok("POST", b"/v1/x/../chat/completions", "/v1/chat/completions", "chat", CHAT),
    ok("POST", b"//v1/chat/completions", "/v1/chat/completions", "chat", CHAT),
    bad(b"/v1/chat%2Fcompletions", "POST"),
    bad(b"/v1/chat%2fcompletions", "POST"),
    # dot segments (RFC 3986 5.2.4), plain and percent-encoded
    ok("GET", b"/v1/./x", "/v1/x", "catch-all", Q),
    ok("GET", b"/v1/x/..", "/v1/", "catch-all", Q),
    ok("GET", b"/v1/x/.", "/v1/x/", "catch-all", Q),
    ok("GET", b"/..", "/", "catch-all", Q),
    ok("GET", b"/../..", "/", "catch-all", Q),
    ok("GET", b"/%2e%2e/", "/", "catch-all", Q),
    ok("GET", b"/%2E%2e", "/", "catch-all", Q),
    ok("GET", b"/v1/.%2e/v2/x", "/v2/x", "catch-all", Q),
    ok("GET", b"/v1/.../x", "/v1/.../x", "catch-all", Q),
    ok("GET", b"/v1/a..b/..c", "/v1/a..b/..c", "catch-all", Q),
    ok("GET", DOTTED.encode(), "/v1/models", "catch-all", Q),
    ok("POST", b"/v1/models/premium-x/infer/..", "/v1/models/premium-x/", "catch-all", Q),
    # repeated slashes merge
    ok("GET", b"/v1//x", "/v1/x", "catch-all", Q),
    ok("GET", b"////", "/", "catch-all", Q),
    ok("GET", b"/v1/x//", "/v1/x/", "catch-all", Q),
    ok("GET", b"/v1//../x", "/x", "catch-all", Q),
    # slashes and backslashes that are not separators: refused
    bad(b"/v1/x%5Cy"),
    bad(b"/v1/x%5cy"),
    bad(b"/v1\\x"),
    bad(b"/docs/..%2Fv1/chat/completions", "POST"),
    # NUL and control characters
    bad(b"/v1/%00"),
    bad(b"/v1/x%1F"),
    bad(b"/v1/x%7f"),
    Case("GET", b"/v1/\x00x", True, 400, None),          # refused by the HTTP parser
    # percent-encoding: invalid refused, unreserved decoded, hex upper-cased
    bad(b"/v1/%zz"),
    bad(b"/v1/x%"),
    bad(b"/v1/x%4"),
    ok("POST", b"/v1/%63hat/completions", "/v1/chat/completions", "chat", CHAT),
    ok("GET", b"/v1/%41%42%7e", "/v1/AB~", "catch-all", Q),
    ok("GET", b"/v1/%25", "/v1/%25", "catch-all", Q, path="/v1/%"),
    ok("GET", b"/v1/%252e%252e/x", "/v1/%252e%252e/x", "catch-all", Q, path="/v1/%2e%2e/x"),
    ok("GET", b"/v1/x%3fy", "/v1/x%3Fy", "catch-all", Q, path="/v1/x?y"),
    ok("GET", b"/v1/a%20b", "/v1/a%20b", "spaced", 4 * Q, path="/v1/a b"),
    # UTF-8: percent-encoded is accepted, raw bytes and invalid / overlong encodings are not
    ok("GET", b"/v1/caf%C3%A9", "/v1/caf%C3%A9", "cafe", 3 * Q, path="/v1/caf\u00e9"),
    ok("GET", b"/v1/caf%c3%a9", "/v1/caf%C3%A9", "cafe", 3 * Q, path="/v1/caf\u00e9"),
    bad(b"/v1/%C0%AE%C0%AE/x"),
    bad(b"/v1/%FF"),
    bad(b"/v1/caf%C3"),
    Case("GET", "/v1/caf\u00e9".encode(), True, 400, None),   # refused by the HTTP parser
    # characters RFC 3986 does not allow raw are percent-encoded
    ok("GET", b"/v1/{x}", "/v1/%7Bx%7D", "catch-all", Q, path="/v1/{x}"),
    ok("GET", b"/v1/x;y", "/v1/x;y", "catch-all", Q),
    ok("GET", b"/V1/X", "/V1/X", "catch-all", Q),
    # the query string is forwarded as sent and takes no part in the path
    ok("GET", b"/v1/x?y=../z", "/v1/x?y=../z", "catch-all", Q, path="/v1/x"),
    ok("GET", b"/v1/./x?a=%2F..%2F&b=%zz", "/v1/x?a=%2F..%2F&b=%zz", "catch-all", Q,
       path="/v1/x"),
    ok("GET", b"/v1/x?", "/v1/x", "catch-all", Q),
    ok("GET", b"/v1/x/", "/v1/x/", "catch-all", Q),
    ok("POST", b"/v1/chat/completions/", "/v1/chat/completions/", "catch-all", Q),
    # fragments, absolute-form and asterisk-form
    bad(b"/v1/x#frag"),
    bad(b"/v1/x?y#frag"),
    ok("POST", b"http://example.test/v1/models/x/../premium-x/infer?q=1",
       "/v1/models/premium-x/infer?q=1", "premium", 10 * Q, path="/v1/models/premium-x/infer"),
    ok("GET", b"http://example.test/?a=1", "/?a=1", "catch-all", Q, path="/"),
    Case("GET", b"http://example.test", True, 404, None),   # no path: aiohttp never routes it
    Case("GET", b"*", True, 400, None),                     # refused by the HTTP parser
    Case("OPTIONS", b"*", True, 404, None),                 # aiohttp's router: never routed
    Case("CONNECT", b"example.test:443", True, 404, None),   # authority-form: never routed
    # very long paths
    ok("GET", LONG.encode(), LONG, "catch-all", Q, path=LONG[:2048]),
    ok("GET", (LONG + "/..?" + "q" * 150).encode(), "/v1/?" + "q" * 150, "catch-all", Q,
       path="/v1/"),
    # auth: none routes and the reserved prefix use the same canonical path
    Case("GET", b"/healthz", False, 200, "/healthz"),
    Case("GET", b"/%2e/healthz", False, 200, "/healthz"),
    Case("GET", b"//healthz/", False, 401, None, error="missing_api_key"),
    Case("GET", b"/healthz/..", False, 401, None, error="missing_api_key"),
    Case("GET", b"/docs/a/../b", False, 200, "/docs/b"),
    Case("GET", b"/docs/..", False, 401, None, error="missing_api_key"),
    ok("GET", b"/_meter/../v1/x", "/v1/x", "catch-all", Q),
    Case("GET", b"/v1/../_meter/usage", True, 200, None),
    Case("GET", b"/_m%65ter//usage", True, 200, None),
    Case("GET", b"/_meter/nothing/../usage", False, 401, None, error="missing_api_key"),
    Case("POST", b"/webhooks//stripe", False, 400, None, error="invalid_signature"),
    Case("POST", b"/x/../webhooks/%73tripe", False, 400, None, error="invalid_signature"),
]


@pytest.fixture
async def rig(make_proxy: ProxyFactory) -> AsyncIterator[tuple[Proxy, RecordingUpstream, str]]:
    rec = RecordingUpstream()
    async with serve(rec.app()) as url:
        p = await make_proxy(url, rules_text=RULES,
                             stripe={"webhook_secret": "whsec_pathcanon_test"})
        key = await p.customer_with_key("acme", stripe_customer_id="cus_acme",
                                        overage="block")
        await p.admin("POST", "/admin/customers/acme/grants",
                      {"credits": "100000", "idempotency_key": "acme-1"}, expect=201)
        yield p, rec, key


def test_the_table_is_big_enough() -> None:
    assert len({(c.method, c.target) for c in CASES}) == len(CASES) >= 40


async def test_every_path_shape(rig: tuple[Proxy, RecordingUpstream, str]) -> None:
    p, rec, key = rig
    port = p.server.public_port
    body = b'{"model": "m", "messages": []}'
    got: list[tuple[int, object]] = []
    want: list[tuple[int, object]] = []
    for i, c in enumerate(CASES):
        rid = f"case-{i}"
        headers = [(b"X-Request-Id", rid.encode()), (b"Content-Type", b"application/json")]
        if c.key:
            headers.append((b"Authorization", b"Bearer " + key.encode()))
        r = await raw_request(port, c.method.encode(), c.target, headers,
                              body if c.method == "POST" else b"")
        error = None
        if r.headers.get("content-type", "").startswith("application/json") and r.status >= 400:
            err = r.json()
            assert isinstance(err, dict)
            error = err["error"]["type"]
        seen = rec.seen.get(rid)
        with p.db() as db:
            rows = db.execute("SELECT rule, path, method, SUM(credits) FROM audit "
                              "WHERE request_id = ? GROUP BY 1, 2, 3", (rid,)).fetchall()
        got.append((i, (r.status, error, seen[1] if seen else None, rows)))
        audit: list[tuple[str, str, str, int]] = []
        if c.rule is not None:
            assert c.upstream is not None
            audit = [(c.rule, c.path or c.upstream.partition("?")[0], c.method, c.credits)]
        want.append((i, (c.status, c.error, c.upstream, audit)))
    bad = [(c.target[:80], g, w) for c, (_, g), (_, w) in zip(CASES, got, want, strict=True)
           if g != w]
    assert bad == []


async def test_the_upstream_routes_what_was_matched(
        rig: tuple[Proxy, RecordingUpstream, str]) -> None:
    """The recording upstream's own decoded path equals the path the rule matched, for
    every forwarded case of the table (so a percent-decoding upstream serves the matched
    resource)."""
    p, rec, key = rig
    port = p.server.public_port
    for i, c in enumerate(CASES):
        if c.rule is None:
            continue
        rid = f"up-{i}"
        await raw_request(port, c.method.encode(), c.target,
                          [(b"X-Request-Id", rid.encode()),
                           (b"Authorization", b"Bearer " + key.encode())])
    await asyncio.sleep(0)
    with p.db() as db:
        matched = dict(db.execute(
            "SELECT request_id, path FROM audit WHERE request_id LIKE 'up-%'").fetchall())
    routed = {rid: v[2][:2048] for rid, v in rec.seen.items() if rid.startswith("up-")}
    assert len(routed) == sum(1 for c in CASES if c.rule is not None)
    assert routed == matched


async def test_invalid_path_is_json_counted_and_not_forwarded(
        rig: tuple[Proxy, RecordingUpstream, str]) -> None:
    p, rec, _key = rig
    before = await _invalid_count(p)
    r = await raw_request(p.server.public_port, b"GET", b"/v1/a%2Fb",
                          [(b"X-Request-Id", b"inv-1")])
    assert r.status == 400
    assert r.headers["x-request-id"] == "inv-1"
    assert r.json() == {"error": {
        "type": "invalid_path",
        "message": "The path contains an encoded slash or backslash (%2F or %5C); send '/' "
                   "or use another character."}}
    assert "inv-1" not in rec.seen
    assert await _invalid_count(p) == before + 1


async def _invalid_count(p: Proxy) -> float:
    text = await p.admin("GET", "/metrics", expect=200)
    prefix = 'meterproxy_requests_total{code_class="4xx",rule="(invalid_path)"} '
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(lines[0][len(prefix):]) if lines else 0.0


async def test_a_non_ascii_key_header_is_an_invalid_key_not_a_500(
        rig: tuple[Proxy, RecordingUpstream, str]) -> None:
    """Found by the fuzzer: header bytes >= 0x80 reached the key hash and raised."""
    p, rec, _key = rig
    for name in (b"X-Api-Key", b"Authorization"):
        value = b"\x80\xff" if name == b"X-Api-Key" else b"Bearer \xc3\xa9"
        r = await raw_request(p.server.public_port, b"GET", b"/v1/x",
                              [(b"X-Request-Id", b"na-" + name), (name, value)])
        assert (r.status, r.json()) == (401, {"error": {
            "type": "invalid_api_key", "message": "The API key is not valid."}})
    assert not any(rid.startswith("na-") for rid in rec.seen)


async def test_an_overlong_path_is_refused_and_not_billed(
        rig: tuple[Proxy, RecordingUpstream, str]) -> None:
    """Over 8,192 characters: refused by aiohttp's parser or by proxy.target.MAX_PATH
    (which one depends on how the request line is split into TCP reads); never forwarded."""
    p, rec, key = rig
    for i, target in enumerate(["/v1/" + "a" * 20_000, "/" + "%41" * 7000]):
        rid = f"long-{i}"
        r = await raw_request(p.server.public_port, b"GET", target.encode(),
                              [(b"X-Request-Id", rid.encode()),
                               (b"Authorization", b"Bearer " + key.encode())])
        assert r.status == 400
        assert rid not in rec.seen
        with p.db() as db:
            assert db.execute("SELECT COUNT(*) FROM audit WHERE request_id = ?",
                              (rid,)).fetchone() == (0,)


async def test_an_upgrade_header_on_a_post_does_not_turn_it_into_a_websocket_get(
        rig: tuple[Proxy, RecordingUpstream, str]) -> None:
    """The rule matched a POST, so the upstream receives a POST: a WebSocket handshake is
    only ever a GET (it used to be sent upstream as a GET handshake)."""
    p, rec, key = rig
    r = await raw_request(p.server.public_port, b"POST", b"/v1/models/premium-x/stream",
                          [(b"X-Request-Id", b"ws-post"),
                           (b"Authorization", b"Bearer " + key.encode()),
                           (b"Upgrade", b"websocket"),
                           (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
                           (b"Sec-WebSocket-Version", b"13")])
    assert r.status == 200
    assert rec.seen["ws-post"][:2] == ("POST", "/v1/models/premium-x/stream")


async def test_a_websocket_is_matched_and_forwarded_on_the_canonical_path(
        rig: tuple[Proxy, RecordingUpstream, str]) -> None:
    p, rec, key = rig
    # encoded=True: the aiohttp client sends the target as written, dot segments included
    url = URL(p.url + "/docs/../v1/models/x/%2E%2e/premium-x/./stream?a=../b", encoded=True)
    async with p.session.ws_connect(url, headers={"Authorization": f"Bearer {key}",
                                                  "X-Request-Id": "ws-1"}) as ws:
        await ws.send_str("hi")
        msg = await ws.receive(timeout=5)
    assert msg.data == "/v1/models/premium-x/stream?a=../b:hi"
    assert rec.seen["ws-1"][1] == "/v1/models/premium-x/stream?a=../b"
    def audit_rows() -> list[tuple[str, str, int, str]]:
        with p.db() as db:
            return db.execute("SELECT rule, path, credits, flags FROM audit "
                              "WHERE request_id = ?", ("ws-1",)).fetchall()
    rows = await wait_until(audit_rows, what="the session's audit row")   # recorded on close
    assert rows == [("catch-all", "/v1/models/premium-x/stream", Q, "websocket")]
