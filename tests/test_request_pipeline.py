"""The pipeline's own routes (proxy.request.pipeline): the consumer API and the Stripe webhook
are routed by an aiohttp router on the canonical path, so no spelling of a reserved path
reaches the upstream, and every error carries the request id."""

from __future__ import annotations

from typing import Any

from yarl import URL

from proxy.webhooks import PATH as WEBHOOK_PATH
from tests.conftest import Proxy


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
