"""Prepaid credits through the real proxy: admission, reserve/settle, overage, expiry,
X-Credits-Remaining, threshold alerts."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from proxy.units import fmt_micro
from tests.conftest import Proxy, ProxyFactory
from tests.helpers import wait_until
from tests.servers import serve

Q = 1_000_000

CREDIT_RULES = """\
version: 1
meters:
  api_calls: {stripe_event_name: api_calls}
  llm_tokens: {stripe_event_name: llm_tokens, covered_event_name: llm_tokens_prepaid}
rules:
  - name: fixed
    match: {path: /v1/items}
    usage:
      - {meter: api_calls, quantity: 1, credits: 1}
  - name: chat
    match: {methods: [POST], path: /v1/chat/completions}
    usage:
      - {meter: llm_tokens, preset: openai_chat, credits: 0.01, estimate: 100}
  - name: free-calls
    match: {path: "/**"}
    usage:
      - {meter: api_calls, quantity: 1}
"""


async def _setup(p: Proxy, cid: str, credits: str | None, overage: str = "block") -> str:
    key = await p.customer_with_key(cid, stripe_customer_id=f"cus_{cid}", overage=overage)
    if credits is not None:
        await p.admin("POST", f"/admin/customers/{cid}/grants",
                      {"credits": credits, "idempotency_key": f"{cid}-1"}, expect=201)
    return key


async def test_grant_is_idempotent_and_listed(make_proxy: ProxyFactory) -> None:
    p = await make_proxy(rules_text=CREDIT_RULES)
    await _setup(p, "g", "10")
    again = await p.admin("POST", "/admin/customers/g/grants",
                          {"credits": "10", "idempotency_key": "g-1"}, expect=200)
    summary = await p.admin("GET", "/admin/customers/g/grants", expect=200)
    assert summary["balance"] == "10" and len(summary["grants"]) == 1
    assert summary["grants"][0]["grant_id"] == again["grant_id"]
    bad = await p.admin("POST", "/admin/customers/g/grants", {"credits": "-1"}, expect=400)
    assert bad["error"]["type"] == "invalid_request"
    await p.admin("POST", "/admin/customers/nobody/grants", {"credits": "1"}, expect=404)


async def test_200_concurrent_fixed_cost_requests_exactly_50_succeed(
        make_proxy: ProxyFactory) -> None:
    p = await make_proxy(rules_text=CREDIT_RULES)
    key = await _setup(p, "conc", "50")
    h = {"Authorization": f"Bearer {key}"}
    statuses: list[int] = []

    async def one(s: aiohttp.ClientSession) -> None:
        async with s.get(p.url + "/v1/items?delay_ms=20", headers=h) as r:
            await r.read()
            statuses.append(r.status)

    conn = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=conn) as s:
        await asyncio.gather(*(one(s) for _ in range(200)))
    assert statuses.count(200) == 50 and statuses.count(402) == 150
    detail = await p.admin("GET", "/admin/customers/conc", expect=200)
    assert detail["credits"]["balance"] == "0"
    with p.db() as c:
        (debited,) = c.execute("SELECT SUM(amount) FROM credit_entries WHERE kind='debit' AND"
                               " customer_id='conc'").fetchone()
        (audited,) = c.execute("SELECT SUM(credits) FROM audit WHERE customer_id='conc'").fetchone()
        (n,) = c.execute("SELECT COUNT(DISTINCT request_id) FROM credit_entries").fetchone()
    assert debited == audited == 50 * Q and n == 50      # nothing double-debited


async def test_token_rule_overspend_within_stated_bound(make_proxy: ProxyFactory) -> None:
    p = await make_proxy(rules_text=CREDIT_RULES)
    key = await _setup(p, "tok", "30")     # 30 credits = 3000 tokens at 0.01
    h = {"Authorization": f"Bearer {key}"}
    ok: list[int] = []
    # each request reserves 100 tokens (1 credit) but uses 250 (2.5 credits)
    body = {"prompt_tokens": 50, "completion_tokens": 200}

    async def one(s: aiohttp.ClientSession) -> None:
        async with s.post(p.url + "/v1/chat/completions?delay_ms=30", json=body, headers=h) as r:
            await r.read()
            if r.status == 200:
                ok.append(1)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as s:
        await asyncio.gather(*(one(s) for _ in range(200)))
    used_credits = len(ok) * 250 // 100 * Q + (len(ok) * 250 % 100) * Q // 100
    # bound (README): overspend <= sum over admitted in-flight requests of (actual - estimate)
    overspend = used_credits - 30 * Q
    assert len(ok) <= 30                      # each needed 1 credit reserved to be admitted
    assert 0 <= overspend <= len(ok) * (250 - 100) * Q // 100
    with p.db() as c:
        (debited,) = c.execute("SELECT COALESCE(SUM(amount), 0) FROM credit_entries"
                               " WHERE customer_id='tok' AND kind='debit'").fetchone()
        (debt,) = c.execute("SELECT COALESCE(SUM(amount), 0) FROM credit_entries"
                            " WHERE customer_id='tok' AND kind='debt'").fetchone()
        billable, covered = c.execute("SELECT SUM(billable), SUM(covered) FROM usage_minute"
                                      " WHERE customer_id='tok'").fetchone()
    assert debited == 30 * Q                  # grants never below zero
    # a block customer is never invoiced: the overspend is debt, not billable overage
    assert debt == overspend
    assert billable == 0
    assert covered == len(ok) * 250 * Q
    summary = await p.admin("GET", "/admin/customers/tok/grants", expect=200)
    assert summary["debt"] == fmt_micro(overspend)
    assert summary["balance"] == fmt_micro(-overspend)


async def test_block_402_body_and_bill_reports_only_uncovered(make_proxy: ProxyFactory) -> None:
    p = await make_proxy(rules_text=CREDIT_RULES, credits={"top_up_url": "https://x.test/buy"})
    kb = await _setup(p, "blk", "1")
    async with p.session.get(p.url + "/v1/items", headers={"Authorization": f"Bearer {kb}"}) as r:
        assert r.status == 200 and r.headers["X-Credits-Remaining"] == "0"
    async with p.session.get(p.url + "/v1/items", headers={"Authorization": f"Bearer {kb}"}) as r:
        assert r.status == 402
        body = await r.json()
        assert body == {"error": {
            "type": "insufficient_credits",
            "message": "This request needs 1 credits and 0 are available. Buy more credits "
                       "to continue: https://x.test/buy.",
            "balance": "0", "required": "1", "top_up_url": "https://x.test/buy"}}
        assert r.headers["X-Credits-Remaining"] == "0"
    # bill: 2.5 credits of grant; a 400-token request costs 4 -> 250 tokens covered, 150 billed
    kbill = await _setup(p, "bil", "2.5", overage="bill")
    hb = {"Authorization": f"Bearer {kbill}"}
    async with p.session.post(p.url + "/v1/chat/completions", headers=hb,
                              json={"prompt_tokens": 100, "completion_tokens": 300}) as r:
        assert r.status == 200 and r.headers["X-Credits-Remaining"] == "0"
    async with p.session.post(p.url + "/v1/chat/completions", headers=hb,
                              json={"prompt_tokens": 10, "completion_tokens": 20}) as r:
        assert r.status == 200                                     # bill never blocks
    # pay-as-you-go: no credits at all, everything billed, no credits header
    kp = await _setup(p, "payg", None, overage="bill")
    async with p.session.post(p.url + "/v1/chat/completions",
                              headers={"Authorization": f"Bearer {kp}"},
                              json={"prompt_tokens": 5, "completion_tokens": 5}) as r:
        assert r.status == 200 and "X-Credits-Remaining" not in r.headers
    await p.admin("POST", "/admin/flush", expect=200)
    with p.db() as c:
        sent = {(cust, ev): v for cust, ev, v in c.execute(
            "SELECT customer_id, event_name, SUM(value) FROM outbox GROUP BY 1, 2")}
    assert sent[("bil", "llm_tokens")] == 150 + 30
    assert sent[("bil", "llm_tokens_prepaid")] == 250
    assert sent[("payg", "llm_tokens")] == 10
    assert ("payg", "llm_tokens_prepaid") not in sent
    # the blocked customer's one call was fully covered by its credit and api_calls has no
    # covered_event_name: nothing is reported for it (a 0-value event is never staged)
    assert sent == {("bil", "llm_tokens"): 180, ("bil", "llm_tokens_prepaid"): 250,
                    ("payg", "llm_tokens"): 10}


async def test_x_credits_remaining_exact_in_sequence(make_proxy: ProxyFactory) -> None:
    p = await make_proxy(rules_text=CREDIT_RULES)
    key = await _setup(p, "seq", "20")
    h = {"Authorization": f"Bearer {key}"}
    expected = 20 * Q
    for i in range(12):
        if i % 2:
            async with p.session.get(p.url + "/v1/items", headers=h) as r:
                expected -= Q
                got = r.headers["X-Credits-Remaining"]
        else:
            tokens = 10 + 7 * i
            async with p.session.post(p.url + "/v1/chat/completions", headers=h,
                                      json={"prompt_tokens": tokens, "completion_tokens": 3}) as r:
                expected -= (tokens + 3) * Q // 100
                got = r.headers["X-Credits-Remaining"]
        assert r.status == 200
        assert got == _fmt(expected), (i, got, expected)
    summary = await p.admin("GET", "/admin/customers/seq/grants", expect=200)
    assert summary["balance"] == _fmt(expected) and summary["reserved"] == "0"


def _fmt(micro: int) -> str:
    from proxy.units import fmt_micro
    return fmt_micro(micro)


async def test_grant_expires_while_idle(make_proxy: ProxyFactory) -> None:
    p = await make_proxy(rules_text=CREDIT_RULES)
    await p.customer_with_key("exp", overage="block")
    expires = int(time.time()) + 2
    await p.admin("POST", "/admin/customers/exp/grants",
                  {"credits": "5", "expires_at": expires}, expect=201)
    await p.admin("POST", "/admin/customers/exp/grants", {"credits": "1"}, expect=201)
    summary = await p.admin("GET", "/admin/customers/exp/grants", expect=200)
    assert summary["balance"] == "6"
    await asyncio.sleep(max(0.0, expires - time.time()) + 0.01)
    # no request has arrived: the balance drops at expires_at, and the ledger says why
    summary = await p.admin("GET", "/admin/customers/exp/grants", expect=200)
    assert summary["balance"] == "1"
    async def ledger() -> list[dict[str, Any]]:
        return list((await p.admin("GET", "/admin/customers/exp/credits/ledger"))["entries"])
    entries = await wait_until(ledger, what="the expiry's ledger entry")
    assert [(e["kind"], e["credits"]) for e in entries] == [("expire", "5")]


async def test_void_and_shadow_enforcement(make_proxy: ProxyFactory) -> None:
    p = await make_proxy(rules_text=CREDIT_RULES, credits={"enforcement": "shadow"})
    key = await _setup(p, "sh", "1")
    h = {"Authorization": f"Bearer {key}"}
    g = (await p.admin("GET", "/admin/customers/sh/grants"))["grants"][0]
    await p.admin("POST", f"/admin/grants/{g['grant_id']}/void", expect=200)
    async with p.session.get(p.url + "/v1/items", headers=h) as r:
        assert r.status == 200          # shadow: would have been 402, let through
    metrics = await p.admin("GET", "/metrics")
    assert "meterproxy_credit_shadow_rejections_total 1.0" in metrics
    with p.db() as c:
        assert c.execute("SELECT SUM(billable) FROM usage_minute WHERE customer_id='sh'"
                         ).fetchone()[0] == Q


async def test_burst_crossing_three_thresholds_fires_three_alerts(make_proxy: ProxyFactory) -> None:
    p = await make_proxy(rules_text=CREDIT_RULES)
    key = await _setup(p, "al", "10", overage="bill")
    h = {"Authorization": f"Bearer {key}"}
    async with p.session.post(p.url + "/v1/chat/completions", headers=h,
                              json={"prompt_tokens": 400, "completion_tokens": 550}) as r:
        assert r.status == 200      # 9.5 credits in one request: 50%, 75%, 90% at once
    for _ in range(3):
        async with p.session.get(p.url + "/v1/items?status=500", headers=h) as r:
            assert r.status == 500  # not billed: the hold is released, no new alert
    with p.db() as c:
        rows = sorted(t for (t,) in c.execute("SELECT threshold FROM alerts WHERE customer_id='al'"))
    assert rows == ["0.5", "0.75", "0.9"]
    async with p.session.post(p.url + "/v1/chat/completions", headers=h,
                              json={"prompt_tokens": 10, "completion_tokens": 40}) as r:
        assert r.status == 200
    with p.db() as c:
        rows = sorted(t for (t,) in c.execute("SELECT threshold FROM alerts WHERE customer_id='al'"))
    assert rows == ["0.5", "0.75", "0.9", "depleted"]


async def test_alerts_reach_the_operator_webhook_signed(make_proxy: ProxyFactory) -> None:
    from aiohttp import web

    from proxy.alerts import verify

    got: list[dict[str, object]] = []
    secret = "alert-secret-0123456789"

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        assert verify(secret, request.headers["Meterproxy-Signature"], body)
        import orjson
        got.append(orjson.loads(body))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", receive)
    async with serve(app) as hook_url:
        p = await make_proxy(rules_text=CREDIT_RULES,
                             alerts={"webhook_url": f"{hook_url}/hook", "secret": secret})
        key = await _setup(p, "hook", "10", overage="bill")
        async with p.session.post(p.url + "/v1/chat/completions",
                                  headers={"Authorization": f"Bearer {key}"},
                                  json={"prompt_tokens": 400, "completion_tokens": 550}) as r:
            assert r.status == 200
        await wait_until(lambda: len(got), ok=lambda n: n >= 3, what="three alerts")
        assert sorted(str(a["threshold"]) for a in got) == ["0.5", "0.75", "0.9"]
        assert {a["customer_id"] for a in got} == {"hook"}
