"""Step 2, admission (proxy.request.admission), through the real proxy: the 429 and 402
refusals in full, and that a refused or failed request gives back its in-flight slot and
its credit hold."""

from __future__ import annotations

import asyncio

from proxy.request.admission import Admission
from tests.conftest import ProxyFactory
from tests.helpers import wait_until
from tests.ports import held_port

Q = 1_000_000

RULES = """\
version: 1
meters:
  api_calls: {stripe_event_name: api_calls}
rules:
  - name: fixed
    match: {path: "/**"}
    usage:
      - {meter: api_calls, quantity: 1, credits: 2}
"""


async def test_concurrency_refusal_is_a_429_with_retry_after(make_proxy: ProxyFactory) -> None:
    p = await make_proxy(limits={"per_customer_concurrency": 1})
    key = await p.customer_with_key("one")
    h = {"Authorization": f"Bearer {key}", "X-Request-Id": "adm-1"}
    admission = p.server.pipeline.admission
    assert isinstance(admission, Admission)

    async def slow_get() -> int:
        async with p.session.get(p.url + "/v1/items?delay_ms=1000", headers=h) as r:
            return r.status

    slow = asyncio.ensure_future(slow_get())
    await wait_until(lambda: admission.in_flight.get("one") == 1,
                     what="the slow request to be in flight")
    async with p.session.get(p.url + "/v1/items", headers=h) as r:
        assert r.status == 429
        assert r.headers["Retry-After"] == "1" and r.headers["X-Request-Id"] == "adm-1"
        assert await r.json() == {"error": {
            "type": "concurrency_limit_exceeded",
            "message": "This account already has 1 requests in flight, the most allowed at "
                       "once. Retry when one of them has finished."}}
    assert await slow == 200
    assert admission.in_flight == {}
    assert p.ledger_totals() == {("one", "api_calls"): Q}


async def test_credit_refusal_and_released_holds(make_proxy: ProxyFactory) -> None:
    p = await make_proxy(rules_text=RULES)
    key = await p.customer_with_key("blk", stripe_customer_id="cus_blk", overage="block")
    await p.admin("POST", "/admin/customers/blk/grants",
                  {"credits": "3", "idempotency_key": "blk-1"}, expect=201)
    h = {"Authorization": f"Bearer {key}"}
    book = p.server.pipeline.admission.book
    # a 404 from the upstream is not counted: the hold is released, nothing is spent
    async with p.session.get(p.url + "/v1/items?status=404", headers=h) as r:
        assert r.status == 404
    async with p.session.get(p.url + "/v1/items", headers=h) as r:
        assert r.status == 200 and r.headers["X-Credits-Remaining"] == "1"
    async with p.session.get(p.url + "/v1/items", headers=h) as r:
        assert r.status == 402 and r.headers["X-Credits-Remaining"] == "1"
        assert await r.json() == {"error": {
            "type": "insufficient_credits",
            "message": "This request needs 2 credits and 1 are available. Buy more credits "
                       "to continue.",
            "balance": "1", "required": "2", "top_up_url": None}}
    assert p.server.pipeline.in_flight == {}
    assert book is not None and book.available("blk", 0) == 1 * Q
    assert p.ledger_totals() == {("blk", "api_calls"): Q}


async def test_an_unreachable_upstream_releases_the_hold(make_proxy: ProxyFactory) -> None:
    with held_port() as refused:               # bound, never listening: refused
        p = await make_proxy(rules_text=RULES, upstream_url=f"http://127.0.0.1:{refused}")
        key = await p.customer_with_key("u", stripe_customer_id="cus_u", overage="block")
        await p.admin("POST", "/admin/customers/u/grants",
                      {"credits": "2", "idempotency_key": "u-1"}, expect=201)
        for _ in range(3):     # each would need the whole balance if a hold leaked
            async with p.session.get(p.url + "/v1/items",
                                     headers={"Authorization": f"Bearer {key}"}) as r:
                assert r.status == 502
                assert (await r.json())["error"]["type"] == "upstream_unavailable"
        book = p.server.pipeline.admission.book
        assert book.available("u", 0) == 2 * Q
        assert p.server.pipeline.in_flight == {}



async def test_the_store_commits_at_once_only_while_one_request_is_in_flight(
        make_proxy: ProxyFactory) -> None:
    """``Store.alone`` is the admission's count of requests in flight: true for a lone
    request (its strict row is committed inside ``record``), false while another one could
    add a row to the group commit; the store is told each quiet moment (the last request
    in flight has left); every request is billed either way."""
    p = await make_proxy()
    key = await p.customer_with_key("one")
    other = await p.customer_with_key("two")
    admission = p.server.pipeline.admission
    assert p.server.rt.store.alone == admission.alone
    assert admission.on_quiet == p.server.rt.store.quiet
    assert admission.admitted == 0 and admission.alone()

    async def get(k: str, delay: int) -> int:
        async with p.session.get(p.url + f"/v1/items?delay_ms={delay}",
                                 headers={"Authorization": f"Bearer {k}"}) as r:
            return r.status

    store = p.server.rt.store
    quiet_moments = 0

    def quiet() -> None:                  # counts the calls, then the store's own
        nonlocal quiet_moments
        quiet_moments += 1
        store.quiet()

    admission.on_quiet = quiet
    assert await get(key, 0) == 200
    await wait_until(lambda: quiet_moments == 1, what="a quiet moment after a lone request")
    slow = [asyncio.ensure_future(get(other, 500)) for _ in range(2)]
    await wait_until(lambda: admission.admitted == 2, what="both slow requests in flight")
    assert admission.admitted == 2 and not admission.alone()
    assert await get(key, 0) == 200       # recorded while the slow ones are in flight
    assert quiet_moments == 1             # none while the slow ones are in flight
    assert await asyncio.gather(*slow) == [200, 200]
    assert admission.admitted == 0 and admission.in_flight == {}
    await wait_until(lambda: quiet_moments == 2, what="one when the last of them left")
    assert await get(key, 0) == 200
    await wait_until(lambda: quiet_moments == 3, what="a quiet moment after a lone request")
    assert p.ledger_totals() == {("one", "api_calls"): 3 * Q, ("two", "api_calls"): 2 * Q}
