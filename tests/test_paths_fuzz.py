"""Property-based fuzzing of request targets and headers through a running proxy and a
recording upstream (raw sockets: the bytes hypothesis draws are the bytes sent).

Properties, for every request:
- never a 5xx (the upstream always answers 200, so any 5xx is the proxy's own failure);
- nothing is billed that the upstream did not receive;
- what the upstream received is canonical: its own decoded path has no dot segment, no
  empty segment, and the raw target no encoded or raw slash/backslash;
- the audit row's path (the path the rule matched) is the upstream's own decoded path, and
  the audit row's rule is the rule that path matches;
- a request without a valid key reaches the upstream only through an ``auth: none`` rule.

Example counts scale with the hypothesis profile (tests/conftest.py): the default profile
runs 1,000 examples (~10 s), ``HYPOTHESIS_PROFILE=deep`` 20,000 (~4 min idle). Headers that
change the framing or the protocol (Content-Length, Transfer-Encoding, Connection, Upgrade,
Expect) are left out: they are the HTTP parser's and the resource bounds' business.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Proxy, ProxyFactory
from tests.pathcanon_kit import RULES, RecordingUpstream, raw_request
from tests.servers import serve

DEEP = os.environ.get("HYPOTHESIS_PROFILE", "fast") == "deep"
EXAMPLES = 20_000 if DEEP else 1000
pytestmark = pytest.mark.timeout(3600 if DEEP else 300)

WORDS = ["v1", "chat", "completions", "models", "premium-x", "infer", "docs", "healthz",
         "_meter", "usage", "webhooks", "stripe", "caf%C3%A9", "a%20b", "x"]
DOTS = [".", "..", "%2e", "%2E", "%2e%2e", ".%2e", "%2E.", "...", "%252e"]
ESCAPES = ["%2F", "%2f", "%5C", "%5c", "%00", "%0a", "%7F", "%25", "%41", "%c3%a9", "%C3",
           "%C0%AE", "%E0%80%AE", "%FF", "%zz", "%", "%4", "%3F", "%23", "%20", "%7e",
           "%ED%A0%80", "%F4%90%80%80"]
CHARS = ["\\", ";", "{", "}", "@", ":", "~", '"', "|", "^", "`", "[", "]", "<", ">", "!",
         "$", "&", "'", "(", ")", "*", "+", ",", "=", "\x01", "\x7f", "\t", "é", "#", "?"]
PRINTABLE = st.characters(min_codepoint=0x21, max_codepoint=0x7E)

atom = st.one_of(st.sampled_from(WORDS), st.sampled_from(DOTS), st.sampled_from(ESCAPES),
                 st.sampled_from(CHARS), st.text(PRINTABLE, min_size=1, max_size=6))
segment = st.lists(atom, min_size=0, max_size=3).map("".join)
path_st = st.lists(segment, min_size=0, max_size=8).map(lambda s: "/" + "/".join(s))
prefix_st = st.sampled_from(["", "", "", "/", "//", "http://example.test", "/docs/..",
                             "/healthz/..", "/_meter/.."])
query_st = st.one_of(st.none(), st.text(PRINTABLE, max_size=12),
                     st.lists(st.sampled_from(["a=1", "../x", "%2F", "%zz", "#", "?", "="]),
                              max_size=4).map("&".join))
method_st = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
header_name = st.one_of(
    st.sampled_from(["X-Forwarded-For", "X-Forwarded-Host", "Accept-Encoding", "Cookie",
                     "X-Api-Key", "Forwarded", "X-Original-URL", "X-Rewrite-URL",
                     "Content-Type", "Accept", "Stripe-Signature", "TE", "Host",
                     "Authorization", "X-Request-Id", "Content-Encoding", "Range"]),
    st.from_regex(r"\AX-[A-Za-z0-9-]{1,12}\Z"))
header_value = st.binary(max_size=40).map(
    lambda b: bytes(c for c in b if c not in (0x0D, 0x0A, 0x00)))
headers_st = st.lists(st.tuples(header_name, header_value), max_size=5)

AUTH_NONE = {"health", "docs"}


@pytest.fixture
async def rig(make_proxy: ProxyFactory) -> AsyncIterator[tuple[Proxy, RecordingUpstream, str]]:
    rec = RecordingUpstream()
    async with serve(rec.app()) as url:
        p = await make_proxy(url, rules_text=RULES,
                             stripe={"webhook_secret": "whsec_pathcanon_fuzz"})
        key = await p.customer_with_key("fz", stripe_customer_id="cus_fz", overage="block")
        await p.admin("POST", "/admin/customers/fz/grants",
                      {"credits": "1000000000", "idempotency_key": "fz-1"}, expect=201)
        yield p, rec, key


_counter = iter(range(10**9))


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(method=method_st, prefix=prefix_st, path=path_st, query=query_st, headers=headers_st,
       auth=st.sampled_from(["key", "none", "bogus"]))
async def test_fuzzed_targets_match_what_is_forwarded(
        rig: tuple[Proxy, RecordingUpstream, str], method: str, prefix: str, path: str,
        query: str | None, headers: list[tuple[str, bytes]], auth: str) -> None:
    p, rec, key = rig
    rid = f"fz-{next(_counter)}"
    target = (prefix + path + ("?" + query if query is not None else "")).encode()
    hdrs = [(b"X-Request-Id", rid.encode())] + [(n.encode(), v) for n, v in headers]
    if auth != "none":
        hdrs.append((b"Authorization", b"Bearer " + (key if auth == "key" else "nope").encode()))
    body = b'{"model": "m"}' if method in ("POST", "PUT", "PATCH") else b""
    r = await raw_request(p.server.public_port, method.encode(), target, hdrs, body)
    assert r.status < 500, (target, r.status, r.body[:200])

    seen = rec.seen.pop(rid, None)
    with p.db() as db:
        rows = db.execute("SELECT rule, path, method FROM audit WHERE request_id = ?",
                          (rid,)).fetchall()
    if seen is None:
        assert rows == [], (target, rows)       # nothing billed that was not forwarded
        return
    up_method, up_raw, up_path = seen
    assert up_method == method
    up_target_path = up_raw.partition("?")[0]
    assert "//" not in up_path, (target, up_raw)
    assert not any(s in (".", "..") for s in up_path.split("/")), (target, up_raw)
    assert not any(e in up_target_path.upper() for e in ("%2F", "%5C", "\\", "%2E")), \
        (target, up_raw)
    if query:
        assert up_raw.endswith("?" + query), (target, up_raw)
    match = p.server.rt.rules.match(method, up_path, {}, {})
    assert match is not None        # the catch-all
    if rows:
        assert {(rule, path) for rule, path, _ in rows} == {(match.rule.name, up_path[:2048])}, \
            (target, up_raw, rows)
        assert auth == "key"
    else:
        assert match.rule.name in AUTH_NONE, (target, up_raw, match.rule.name)
