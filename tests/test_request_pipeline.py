"""The pipeline's own routes (proxy.request.pipeline): the consumer API and the Stripe webhook
are routed by an aiohttp router on the canonical path, so no spelling of a reserved path
reaches the upstream, and every error carries the request id."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.request.pipeline import method_override
from proxy.webhooks import PATH as WEBHOOK_PATH
from tests.conftest import Proxy, ProxyFactory
from tests.pathcanon_kit import raw_request
from tests.servers import serve


async def _get(p: Proxy, target: str, method: str = "GET", **kw: Any) -> tuple[int, Any, Any]:
    """``target`` is sent as written (no client-side normalization)."""
    async with p.session.request(method, URL(p.url + target, encoded=True), **kw) as r:
        body = await r.json(content_type=None) if r.content_type == "application/json" else {}
        return r.status, body, r.headers


async def test_reserved_paths_route_on_the_canonical_path(proxy: Proxy) -> None:
    key = await proxy.customer_with_key("c")
    h = {"Authorization": f"Bearer {key}"}
    for spelling in ["/_meter/usage", "/_meter//usage", "/_meter/./usage", "/_meter/%75sage",
                     "/v1/../_meter/usage"]:
        status, body, _ = await _get(proxy, spelling, headers=h)
        assert status == 200 and body["customer"] == "c", spelling
    for page in ["/_meter", "/_meter/"]:
        async with proxy.session.get(proxy.url + page, headers=h) as r:
            assert r.status == 200 and r.content_type == "text/html"
    # anything else under the prefix is ours too: 404, never forwarded, never counted
    for other in ["/_meter/nope", "/_meterx", "/_meter/usage/x"]:
        status, body, headers = await _get(proxy, other, headers={**h, "X-Request-Id": "own-1"})
        assert status == 404 and body == {"error": {"type": "not_found",
                                                   "message": "No such endpoint."}}
        assert headers["X-Request-Id"] == "own-1"
    assert proxy.ledger_totals() == {}


async def test_consumer_routes_answer_get_only_and_documented_params(proxy: Proxy) -> None:
    key = await proxy.customer_with_key("m")
    h = {"Authorization": f"Bearer {key}"}
    status, body, headers = await _get(proxy, "/_meter/usage", "POST", headers=h)
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    assert body == {"error": {"type": "method_not_allowed",
                              "message": "Only GET is answered here."}}
    status, body, _ = await _get(proxy, "/_meter/events.json?from=x", headers=h)
    assert status == 400 and body["error"]["type"] == "invalid_request"
    assert body["error"]["param"] == "from"
    status, body, _ = await _get(proxy, "/_meter/usage?bogus=1", headers=h)
    assert status == 400 and body == {"error": {
        "type": "invalid_request", "message": "unknown query parameter(s): 'bogus'"}}


async def test_webhook_path_in_any_spelling_reaches_the_receiver(proxy: Proxy) -> None:
    for spelling in [WEBHOOK_PATH, WEBHOOK_PATH.replace("/", "//"), "/x/.." + WEBHOOK_PATH]:
        status, body, _ = await _get(proxy, spelling)
        assert status == 405, spelling
        assert body == {"error": {"type": "method_not_allowed",
                                  "message": f"Only POST is accepted on {WEBHOOK_PATH}."}}
    # no webhook secret in the test config: the receiver refuses, the upstream never sees it
    status, body, _ = await _get(proxy, WEBHOOK_PATH, "POST", data=b"{}")
    assert status == 503 and body["error"]["type"] == "webhooks_disabled"
    assert proxy.ledger_totals() == {}


async def test_invalid_target_is_answered_by_the_one_error_builder(proxy: Proxy) -> None:
    status, body, headers = await _get(proxy, "/v1/%2Fitems", headers={"X-Request-Id": "bad-1"})
    assert status == 400 and body["error"]["type"] == "invalid_path"
    assert headers["X-Request-Id"] == "bad-1"


# ---- method overrides (docs/paths.md, "Method overrides") ------------------------------

OVERRIDE_RULES = """\
version: 1
meters:
  api_calls: {stripe_event_name: api_calls}
rules:
  - name: search
    match: {methods: [POST], path: /v1/files/search}
    usage:
      - {meter: api_calls, quantity: 1}
  - name: files
    match: {path: "/v1/files/**"}
    usage:
      - {meter: api_calls, quantity: 10}
"""
_NAMES = ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override")


def test_method_override_names_every_spelling_of_another_method() -> None:
    def why(method: str, pairs: list[tuple[str, str]], target: str = "/v1/x") -> str | None:
        return method_override(method, CIMultiDictProxy(CIMultiDict(pairs)), target)

    for name in _NAMES:
        for value in ("PUT", "delete", " GET ", "", "POST, PUT", "POST,", "POSTX"):
            got = why("POST", [(name.lower(), value)])
            assert got is not None and name in got and "(POST)" in got, (name, value)
        for value in ("POST", "post", " Post ", "POST, post"):
            assert why("POST", [(name, value)]) is None, (name, value)
    assert why("POST", [("X-HTTP-Method", "POST"), ("X-HTTP-Method", "PUT")]) is not None
    assert why("POST", [("X-HTTP-Method", "POST"), ("X-Method-Override", "post")]) is None
    assert why("GET", [("X-Other", "PUT")], "/v1/x?a=1&method=PUT&b=_method") is None
    for query in ("_method=DELETE", "a=1&_method=put", "%5Fmethod=PUT", "_m%65thod=PUT",
                  ".method=PUT", "+_method=PUT", "%20.method=PUT", "_method%5B%5D=PUT",
                  "_method[x]=PUT", "a=1;_method=PUT", "_method", "_method=",
                  "_method=POST&_method=PUT", "_method=%50UT"):
        got = why("POST", [], "/v1/x?" + query)
        assert got is not None and "_method" in got, query
    for query in ("_method=POST", "_method=post", "_method=%50OST", "_METHOD=PUT",
                  "x_method=PUT", "_methods=PUT", "a=_method", "method=PUT"):
        assert why("POST", [], "/v1/x?" + query) is None, query


@pytest.fixture
async def recording() -> AsyncIterator[tuple[str, list[Any]]]:
    """An upstream recording (method, target, X-Request-Id, override headers) per request."""
    seen: list[Any] = []

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        seen.append((request.method, request.raw_path, request.headers.get("X-Request-Id"),
                     [(k, v) for k, v in request.headers.items() if k.lower() in _LOWER]))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    async with serve(app) as url:
        yield url, seen


_LOWER = frozenset(n.lower() for n in _NAMES)
Q = 1_000_000       # micro-units per unit in the ledger


async def _override_rig(make_proxy: ProxyFactory, recording: tuple[str, list[Any]],
                        **cfg: Any) -> tuple[Proxy, list[Any], str]:
    url, seen = recording
    p = await make_proxy(url, rules_text=OVERRIDE_RULES, **cfg)
    return p, seen, await p.customer_with_key("acme")


async def _count(p: Proxy, rule: str) -> float:
    text = await p.admin("GET", "/metrics", expect=200)
    prefix = f'meterproxy_requests_total{{code_class="4xx",rule="{rule}"}} '
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(lines[0][len(prefix):]) if lines else 0.0


async def test_a_method_override_is_refused_before_any_rule_and_never_forwarded(
        make_proxy: ProxyFactory, recording: tuple[str, list[Any]]) -> None:
    """The review's trick: ``POST /v1/files/search`` (1 call) with ``X-HTTP-Method-Override:
    DELETE`` would be billed as the POST and run as a DELETE upstream. Refused 400 in the
    documented error format, not forwarded, not billed, not even authenticated (no key
    sent for some of them: the refusal comes before the rules)."""
    p, seen, key = await _override_rig(make_proxy, recording)
    auth = {"Authorization": f"Bearer {key}"}
    tries: list[tuple[str, CIMultiDict[str]]] = []
    for name in _NAMES:
        for value in ("DELETE", "get", "", "POST, PUT"):
            tries.append(("/v1/files/search", CIMultiDict({**auth, name: value})))
    tries.append(("/v1/files/search", CIMultiDict([*auth.items(), ("X-HTTP-Method", "POST"),
                                                   ("X-HTTP-Method", "PUT")])))
    tries.append(("/v1/files/search", CIMultiDict({"X-HTTP-Method-Override": "PUT"})))  # no key
    for query in ("_method=DELETE", "%5Fmethod=PUT", "a=1;_method=PUT", "_method%5B%5D=PUT"):
        tries.append((f"/v1/files/search?{query}", CIMultiDict(auth)))
    for i, (target, headers) in enumerate(tries):
        headers["X-Request-Id"] = f"ovr-{i}"
        status, body, got = await _get(p, target, "POST", headers=headers, data=b"{}")
        assert status == 400, (target, headers, status, body)
        assert body["error"]["type"] == "method_override_refused"
        assert "(POST)" in body["error"]["message"]
        assert got["X-Request-Id"] == f"ovr-{i}"
    assert seen == []
    assert p.ledger_totals() == {}
    with p.db() as db:
        assert db.execute("SELECT COUNT(*) FROM audit").fetchone() == (0,)
    assert await _count(p, "(method_override)") == len(tries)


async def test_an_override_equal_to_the_method_is_forwarded_and_billed_as_that_method(
        make_proxy: ProxyFactory, recording: tuple[str, list[Any]]) -> None:
    p, seen, key = await _override_rig(make_proxy, recording)
    auth = {"Authorization": f"Bearer {key}"}
    sent = [("X-HTTP-Method-Override", "post"), ("X-HTTP-Method", "POST, post"),
            ("X-Method-Override", " POST ")]
    for name, value in sent:
        status, _, _ = await _get(p, "/v1/files/search", "POST",
                                  headers={**auth, name: value}, data=b"{}")
        assert status == 200
    status, _, _ = await _get(p, "/v1/files/search?_method=post", "POST", headers=auth,
                              data=b"{}")
    assert status == 200
    assert [s[3] for s in seen] == [[(n, v.strip())] for n, v in sent] + [[]]
    assert [s[:2] for s in seen] == [("POST", "/v1/files/search")] * 3 + \
        [("POST", "/v1/files/search?_method=post")]
    assert p.ledger_totals() == {("acme", "api_calls"): 4 * Q}


async def test_method_override_forward_passes_overrides_through_unchanged(
        make_proxy: ProxyFactory, recording: tuple[str, list[Any]]) -> None:
    """``method_override: forward`` (an upstream that ignores them): forwarded as sent, the
    request matched and billed by its own method as before."""
    p, seen, key = await _override_rig(make_proxy, recording, method_override="forward")
    auth = {"Authorization": f"Bearer {key}"}
    status, _, _ = await _get(p, "/v1/files/search", "POST",
                              headers={**auth, "X-HTTP-Method-Override": "DELETE"}, data=b"{}")
    assert status == 200
    status, _, _ = await _get(p, "/v1/files/search?_method=PUT", "POST", headers=auth,
                              data=b"{}")
    assert status == 200
    assert [(s[0], s[1], s[3]) for s in seen] == [
        ("POST", "/v1/files/search", [("X-HTTP-Method-Override", "DELETE")]),
        ("POST", "/v1/files/search?_method=PUT", [])]
    assert p.ledger_totals() == {("acme", "api_calls"): 2 * Q}


REPEAT_RULES = """\
version: 1
meters:
  api_calls: {stripe_event_name: api_calls}
  units: {stripe_event_name: units}
rules:
  - name: premium
    match: {path: /v1/render, headers: {X-Tier: premium}}
    usage:
      - {meter: api_calls, quantity: 100}
  - name: sized
    match: {path: /v1/batch}
    usage:
      - {meter: units, quantity: request.header.X-Units}
  - name: paged
    match: {path: /v1/list}
    usage:
      - {meter: units, quantity: request.query.pages}
  - name: fast
    match: {path: "/v1/**", query: {mode: fast}}
    usage:
      - {meter: api_calls, quantity: 10}
  - name: rest
    match: {path: "/**"}
    usage:
      - {meter: api_calls, quantity: 1}
"""


async def test_a_header_or_parameter_the_rules_read_sent_twice_is_refused(
        make_proxy: ProxyFactory, recording: tuple[str, list[Any]]) -> None:
    """The rules read the first value of a header or query parameter; an upstream may read
    the last (``X-Tier: basic`` then ``X-Tier: premium``: metered as the 1-call rule, served
    as premium; ``X-Units: 1`` then ``X-Units: 1000``; ``?pages=1&pages=500``). Such a request
    is refused 400 ambiguous_request before any rule runs: never forwarded, never billed.
    Headers and parameters no rule reads may repeat (forwarded as sent), and each of the
    read ones sent once is metered as usual. (Sent on raw sockets: aiohttp's client folds
    repeated headers into one.)"""
    url, seen = recording
    p = await make_proxy(url, rules_text=REPEAT_RULES)
    port = URL(p.url).port
    assert port is not None
    key = await p.customer_with_key("acme")
    auth = [(b"Authorization", f"Bearer {key}".encode())]
    refused: list[tuple[bytes, list[tuple[bytes, bytes]]]] = [
        (b"/v1/render", [(b"X-Tier", b"basic"), (b"x-tier", b"premium")]),
        (b"/v1/batch", [(b"X-Units", b"1"), (b"X-Units", b"1000")]),
        (b"/v1/list?pages=1&pages=500", []),
        (b"/v1/list?mode=slow&x=1&mode=fast", []),
        (b"/v1/other?mode=fast&mode=fast", []),          # equal values too: one meaning each
        # another spelling an upstream reads as the same name (the review's bypasses): CGI,
        # WSGI and FastCGI read X_Tier as X-Tier; Rack splits on ';'; PHP reads +pages,
        # pages[] and p.ages-style names; ASP.NET reads names without case
        (b"/v1/render", [(b"X-Tier", b"basic"), (b"X_Tier", b"premium")]),
        (b"/v1/render", [(b"X_Tier", b"premium")]),
        (b"/v1/list?pages=1;pages=500", []),
        (b"/v1/list?pages=1&+pages=500", []),
        (b"/v1/list?pages=1&pages[]=500", []),
        (b"/v1/list?Pages=500", []),
        (b"/v1/other?mode=slow;mode=fast", []),
        (b"/v1/list?p%61ges=1&pages=2", []),
    ]
    for i, (target, extra) in enumerate(refused):
        got = await raw_request(port, b"GET", target,
                                [*auth, *extra, (b"X-Request-Id", f"rep-{i}".encode())])
        body = got.json()
        assert got.status == 400, (target, extra, got.status, body)
        assert isinstance(body, dict) and body["error"]["type"] == "ambiguous_request", body
        assert got.headers["x-request-id"] == f"rep-{i}"
    got = await raw_request(port, b"GET", b"/v1/batch",       # refused before the key is read
                            [(b"X-Units", b"1"), (b"X-Units", b"2")])
    assert got.status == 400 and b"ambiguous_request" in got.body
    assert seen == []
    assert p.ledger_totals() == {}
    assert await _count(p, "(ambiguous_request)") == len(refused) + 1
    # sent once each, and other headers and parameters repeated: metered, forwarded as sent
    ok: list[tuple[bytes, list[tuple[bytes, bytes]]]] = [
        (b"/v1/render", [(b"X-Tier", b"premium"), (b"X-Other", b"a"), (b"X_Other", b"b")]),
        (b"/v1/batch", [(b"X-Units", b"7")]),
        (b"/v1/list?pages=3&tag=a&tag=b;tag=c&Tag=d", []),
        (b"/v1/other?mode=fast", [])]
    for target, extra in ok:
        got = await raw_request(port, b"GET", target, [*auth, *extra])
        assert got.status == 200, (target, got.status, got.body)
    assert [s[1] for s in seen] == [t.decode() for t, _ in ok]
    assert p.ledger_totals() == {("acme", "api_calls"): 110 * Q, ("acme", "units"): 10 * Q}


async def test_underscore_spellings_of_guarded_headers_never_reach_the_upstream(
        make_proxy: ProxyFactory) -> None:
    """CGI, WSGI and FastCGI upstreams read ``X_Forwarded_For`` and ``X_HTTP_Method_Override``
    as the real headers (both become HTTP_X_FORWARDED_FOR ...): sent by a consumer they would
    spoof the address the proxy sets, or run another method than the one metered past the
    override check. Those spellings are dropped on the way up; other underscore headers pass."""
    got: list[list[tuple[str, str]]] = []

    async def handle(request: web.Request) -> web.Response:
        got.append(list(request.headers.items()))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    async with serve(app) as url:
        p = await make_proxy(url, rules_text=OVERRIDE_RULES)
        key = await p.customer_with_key("acme")
        port = URL(p.url).port
        assert port is not None
        resp = await raw_request(port, b"POST", b"/v1/files/search", [
            (b"Authorization", f"Bearer {key}".encode()),
            (b"X_HTTP_Method_Override", b"DELETE"), (b"x_http_method", b"DELETE"),
            (b"X-Method_Override", b"DELETE"), (b"X_Forwarded_For", b"6.6.6.6"),
            (b"X_Forwarded-Host", b"evil.example"), (b"X_Request_Id", b"forged"),
            (b"X_Custom", b"kept")], b"{}")
        assert resp.status == 200, resp.body
        [headers] = got
        names = [k.lower() for k, _ in headers]
        assert not any(n.replace("_", "-") in (
            "x-http-method-override", "x-http-method", "x-method-override", "x-forwarded-for",
            "x-forwarded-host", "x-request-id") and "_" in n for n in names), names
        assert ("X_Custom", "kept") in headers
        assert dict((k.lower(), v) for k, v in headers)["x-forwarded-for"] == "127.0.0.1"
        assert p.ledger_totals() == {("acme", "api_calls"): 1 * Q}     # metered as the POST


ROUTING_RULES = """\
version: 1
routing: {case: insensitive, trailing_slash: ignore}
meters:
  api_calls: {stripe_event_name: api_calls}
rules:
  - name: search
    match: {methods: [POST], path: /v1/files/search}
    usage:
      - {meter: api_calls, quantity: 100}
  - name: rest
    match: {path: "/**"}
    usage:
      - {meter: api_calls, quantity: 1}
"""


async def test_routing_insensitive_bills_every_spelling_the_upstream_routes_alike(
        make_proxy: ProxyFactory, recording: tuple[str, list[Any]]) -> None:
    """An Express upstream (case-insensitive, trailing slash ignored by default) runs its
    /v1/files/search handler for /V1/Files/Search/: with ``routing`` saying so, each spelling
    is billed as the search (100), not as the 1-call catch-all, and forwarded as sent."""
    url, seen = recording
    p = await make_proxy(url, rules_text=ROUTING_RULES)
    key = await p.customer_with_key("acme")
    auth = {"Authorization": f"Bearer {key}"}
    spellings = ["/v1/files/search", "/V1/FILES/SEARCH", "/v1/Files/Search/"]
    for target in spellings:
        status, _, _ = await _get(p, target, "POST", headers=auth, data=b"{}")
        assert status == 200, target
    assert [s[1] for s in seen] == spellings
    assert p.ledger_totals() == {("acme", "api_calls"): 300 * Q}
