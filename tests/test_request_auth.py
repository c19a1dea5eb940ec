"""Step 1, authentication (proxy.request.auth), through the real proxy: every refusal's
status, type and request id, the configured key sources, and the consumer API using the
same step directly."""

from __future__ import annotations

import aiohttp

from proxy.request.auth import Authenticator
from tests.conftest import Proxy, ProxyFactory


async def _err(resp: aiohttp.ClientResponse) -> tuple[int, str]:
    body = await resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}
    assert resp.content_type == "application/json" and body["error"]["message"]
    return resp.status, body["error"]["type"]


async def test_missing_unknown_revoked_suspended(proxy: Proxy) -> None:
    async with proxy.session.get(proxy.url + "/v1/items") as r:
        assert await _err(r) == (401, "missing_api_key")
        assert len(r.headers["X-Request-Id"]) == 32           # generated, echoed on errors too
    async with proxy.session.get(proxy.url + "/v1/items",
                                 headers={"Authorization": "Bearer nope",
                                          "X-Request-Id": "mine-1"}) as r:
        assert await _err(r) == (401, "invalid_api_key")
        assert r.headers["X-Request-Id"] == "mine-1"
    key = await proxy.customer_with_key("r")
    keys = await proxy.admin("GET", "/admin/customers/r/keys", expect=200)
    await proxy.admin("DELETE", f"/admin/keys/{keys[0]['key_id']}", expect=200)
    async with proxy.session.get(proxy.url + "/v1/items",
                                 headers={"Authorization": f"Bearer {key}"}) as r:
        assert await _err(r) == (403, "key_revoked")
    key2 = await proxy.customer_with_key("s")
    await proxy.admin("POST", "/admin/customers", {"id": "s", "status": "suspended"}, expect=200)
    async with proxy.session.get(proxy.url + "/v1/items",
                                 headers={"Authorization": f"Bearer {key2}"}) as r:
        assert await _err(r) == (403, "customer_suspended")
    assert proxy.ledger_totals() == {}


async def test_key_sources_in_order_scheme_and_query(make_proxy: ProxyFactory) -> None:
    p = await make_proxy(keys={"sources": [{"header": "Authorization", "scheme": "Bearer"},
                                           {"header": "X-API-Key"}, {"query": "api_key"}]})
    key = await p.customer_with_key("k")
    auth = p.server.pipeline.auth
    assert isinstance(auth, Authenticator) and auth.key_query == ("api_key",)
    ok = [{"Authorization": f"Bearer {key}"}, {"Authorization": f"bearer  {key} "},
          {"X-API-Key": f" {key} "},
          # a header with the wrong scheme is skipped, the next source is used
          {"Authorization": f"Basic {key}", "X-API-Key": key}]
    for h in ok:
        async with p.session.get(p.url + "/v1/items", headers=h) as r:
            assert r.status == 200, h
    async with p.session.get(p.url + "/v1/items", params={"api_key": key}) as r:
        assert r.status == 200
    for h in [{"Authorization": key}, {"Authorization": "Bearer "}, {"X-API-Key": ""}]:
        async with p.session.get(p.url + "/v1/items", headers=h) as r:
            assert await _err(r) == (401, "missing_api_key"), h
    assert p.ledger_totals() == {("k", "api_calls"): 5 * 1_000_000}


async def test_consumer_api_authenticates_with_the_same_step(proxy: Proxy) -> None:
    key = await proxy.customer_with_key("c")
    async with proxy.session.get(proxy.url + "/_meter/usage") as r:
        assert await _err(r) == (401, "missing_api_key")
    async with proxy.session.get(proxy.url + "/_meter/usage",
                                 headers={"Authorization": "Bearer wrong"}) as r:
        assert await _err(r) == (401, "invalid_api_key")
    await proxy.admin("POST", "/admin/customers", {"id": "c", "status": "suspended"}, expect=200)
    async with proxy.session.get(proxy.url + "/_meter/events.json",
                                 headers={"Authorization": f"Bearer {key}"}) as r:
        assert await _err(r) == (403, "customer_suspended")
    await proxy.admin("POST", "/admin/customers", {"id": "c", "status": "active"}, expect=200)
    async with proxy.session.get(proxy.url + "/_meter/usage",
                                 headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200 and (await r.json())["customer"] == "c"


async def test_a_key_in_use_refused_once_revoked_or_its_customer_suspended(proxy: Proxy) -> None:
    """The authenticator remembers the header value of a key it found: a reload of the keys
    (revocation, suspension) must still refuse the very next request with that value."""
    key = await proxy.customer_with_key("u")
    h = {"Authorization": f"Bearer {key}"}
    for _ in range(2):                                  # found, then remembered
        async with proxy.session.get(proxy.url + "/v1/items", headers=h) as r:
            assert r.status == 200
    await proxy.admin("POST", "/admin/customers", {"id": "u", "status": "suspended"},
                      expect=200)
    async with proxy.session.get(proxy.url + "/v1/items", headers=h) as r:
        assert await _err(r) == (403, "customer_suspended")
    await proxy.admin("POST", "/admin/customers", {"id": "u", "status": "active"}, expect=200)
    async with proxy.session.get(proxy.url + "/v1/items", headers=h) as r:
        assert r.status == 200
    keys = await proxy.admin("GET", "/admin/customers/u/keys", expect=200)
    await proxy.admin("DELETE", f"/admin/keys/{keys[0]['key_id']}", expect=200)
    async with proxy.session.get(proxy.url + "/v1/items", headers=h) as r:
        assert await _err(r) == (403, "key_revoked")


async def test_a_first_header_naming_no_key_leaves_the_next_source_to_decide(
        make_proxy: ProxyFactory) -> None:
    """A first key header that yields no key (another scheme) is not remembered as naming the
    key a later source gave: the same value with another later key is that key's request."""
    p = await make_proxy(keys={"sources": [{"header": "Authorization", "scheme": "Bearer"},
                                           {"header": "X-API-Key"}]})
    k1, k2 = await p.customer_with_key("a"), await p.customer_with_key("b")
    for key in (k1, k2, k2):
        async with p.session.get(p.url + "/v1/items",
                                 headers={"Authorization": "Basic x", "X-API-Key": key}) as r:
            assert r.status == 200
    totals = p.ledger_totals()
    assert {c for c, _ in totals} == {"a", "b"}
    assert totals[("a", "api_calls")] * 2 == totals[("b", "api_calls")]


async def test_one_key_spelled_many_ways_is_not_remembered_once_per_spelling(
        proxy: Proxy) -> None:
    """The header memo must not let a customer make the proxy keep what it sends: the key
    padded with spaces ('Bearer<n spaces>key', up to limits.max_header_field = 16 KiB a line)
    names the same key every time, and each spelling kept would grow the memo by its length
    (100,000 of them: ~1.6 GB) while every request is an ordinary billed 200."""
    key = await proxy.customer_with_key("pad")
    auth = proxy.server.pipeline.auth
    for i in range(40):
        h = {"Authorization": "Bearer" + " " * (1 + 300 * i) + key}
        async with proxy.session.get(proxy.url + "/v1/items", headers=h) as r:
            assert r.status == 200
    assert proxy.ledger_totals()[("pad", "api_calls")] == 40 * 1_000_000
    kept = sum(len(v) for v in auth._memo)
    assert kept <= 4 * len("Bearer " + key), kept
    async with proxy.session.get(proxy.url + "/v1/items",
                                 headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200
    assert f"Bearer {key}" in auth._memo                # the plain spelling is remembered
