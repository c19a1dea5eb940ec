"""Block customers are never invoiced (issue 12, finding 12): adaptive reservations keep a
burst within the balance, what still overruns becomes debt taken from the next grant, and
the outbox never holds a Stripe event for a block customer's credit-priced usage.

Everything is real: the example upstream (40 tokens per answer), the proxy, its SQLite
ledger and outbox."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from proxy.credits.reserve import WINDOW, Estimator, Reservations, high_percentile
from proxy.credits.service import load_book
from proxy.rules import check_rules, load_rules
from proxy.store.ledger import load as ledger_load
from proxy.units import CreditRate
from tests.conftest import Proxy, ProxyFactory
from tests.servers import serve

Q = 1_000_000

RULES = """\
version: 1
meters:
  llm_tokens: {stripe_event_name: llm_tokens}
rules:
  - name: chat
    match: {methods: [POST], path: /v1/chat/completions}
    usage:
      - {meter: llm_tokens, quantity: response.json.usage.total_tokens, credits: 0.01}
"""
HINTED_RULES = """\
version: 1
meters:
  llm_tokens: {stripe_event_name: llm_tokens}
rules:
  - name: hinted
    match: {methods: [POST], path: /v1/chat/completions}
    usage:
      - meter: llm_tokens
        quantity: response.json.usage.total_tokens
        credits: 0.01
        reserve_from: request.json.max_tokens
"""

# 10 prompt + 30 completion = 40 tokens = 0.4 credits at 0.01
FORTY = {"prompt_tokens": 10, "completion_tokens": 30}


async def _customer(p: Proxy, cid: str, credits: str, overage: str = "block") -> dict[str, str]:
    key = await p.customer_with_key(cid, stripe_customer_id=f"cus_{cid}", overage=overage)
    await p.admin("POST", f"/admin/customers/{cid}/grants",
                  {"credits": credits, "idempotency_key": f"{cid}-1"}, expect=201)
    return {"Authorization": f"Bearer {key}"}


async def _burst(p: Proxy, path: str, h: dict[str, str], body: dict[str, Any],
                 n: int = 50) -> list[int]:
    async def one(s: aiohttp.ClientSession) -> int:
        async with s.post(p.url + path + "?delay_ms=50", json=body, headers=h) as r:
            await r.read()
            return r.status

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=n)) as s:
        return list(await asyncio.gather(*(one(s) for _ in range(n))))


async def _outbox(p: Proxy) -> dict[str, int]:
    await p.admin("POST", "/admin/flush", expect=200)
    with p.db() as c:
        return {cust: v for cust, v in c.execute(
            "SELECT customer_id, SUM(value) FROM outbox GROUP BY 1")}


def _ledger(p: Proxy, cid: str) -> dict[str, int]:
    with p.db() as c:
        return {k: a for k, a in c.execute(
            "SELECT kind, SUM(amount) FROM credit_entries WHERE customer_id=? GROUP BY 1",
            (cid,))}


async def test_learned_reservation_admits_five_and_invoices_nothing(
        make_proxy: ProxyFactory) -> None:
    p = await make_proxy(rules_text=RULES)
    # a pay-as-you-go customer teaches the rule what an answer costs (8 samples = learned)
    warm = await _customer(p, "warm", "1000", overage="bill")
    for _ in range(8):
        async with p.session.post(p.url + "/v1/chat/completions", json=FORTY,
                                  headers=warm) as r:
            assert r.status == 200
    h = await _customer(p, "blk", "2")
    statuses = await _burst(p, "/v1/chat/completions", h, FORTY)
    assert statuses.count(200) == 5 and statuses.count(402) == 45
    assert _ledger(p, "blk") == {"debit": 2 * Q}
    outbox = await _outbox(p)
    assert "blk" not in outbox                 # nothing for Stripe: block is prepaid-only
    assert outbox == {}                        # warm's usage was all covered too
    with p.db() as c:
        (billable, covered) = c.execute("SELECT SUM(billable), SUM(covered) FROM usage_minute"
                                        " WHERE customer_id='blk'").fetchone()
    assert (billable, covered) == (0, 200 * Q)


async def test_request_hint_admits_exactly_what_the_balance_covers(
        make_proxy: ProxyFactory) -> None:
    p = await make_proxy(rules_text=HINTED_RULES)
    h = await _customer(p, "blk", "2")
    statuses = await _burst(p, "/v1/chat/completions", h, {**FORTY, "max_tokens": 40})
    assert statuses.count(200) == 5 and statuses.count(402) == 45
    assert _ledger(p, "blk") == {"debit": 2 * Q}
    assert await _outbox(p) == {}


def _gated_upstream(n: int) -> web.Application:
    """An upstream that answers 40 tokens, but only once ``n`` requests are waiting: no
    request can settle before all ``n`` were admitted (deterministic, no timing)."""
    arrived = 0
    gate = asyncio.Event()

    async def chat(request: web.Request) -> web.Response:
        nonlocal arrived
        await request.read()
        arrived += 1
        if arrived == n:
            gate.set()
        await asyncio.wait_for(gate.wait(), 30)
        return web.json_response({"usage": {"prompt_tokens": 10, "completion_tokens": 30,
                                            "total_tokens": 40}})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def test_cold_start_overrun_becomes_debt_bounded_and_repaid_by_next_grant(
        make_proxy: ProxyFactory) -> None:
    """Nothing learned yet and no hint: each request holds the 1-token floor (0.01 credit),
    and all 50 are in flight before any settles, so all are admitted and overrun; the
    overrun is debt, never billed, and exactly the stated bound: the sum over admitted
    requests of (actual cost - held)."""
    async with serve(_gated_upstream(50)) as up:
        p = await make_proxy(upstream_url=up, rules_text=RULES)
        h = await _customer(p, "blk", "2")
        statuses = await _burst(p, "/v1/chat/completions", h, FORTY)
        assert statuses.count(200) == 50       # 50 x 0.01 held fits in 2 credits
        ledger = _ledger(p, "blk")
        bound = 50 * (40 - 1) * Q // 100       # sum of (actual - held) = 19.5 credits
        # covered 2, the other 50 x 0.4 - 2 = 18 is debt, within the bound
        assert ledger == {"debit": 2 * Q, "debt": 18 * Q}
        assert ledger["debt"] <= bound
        assert await _outbox(p) == {}
        summary = await p.admin("GET", "/admin/customers/blk/grants", expect=200)
        assert (summary["balance"], summary["debt"], summary["available"]) == ("-18", "18",
                                                                               "-18")
        with p.db() as c:                      # what a restart rebuilds from the ledger
            book = load_book(ledger_load(c))
        assert (book.debt("blk"), book.balance("blk", time.time())) == (18 * Q, -18 * Q)
        async with p.session.post(p.url + "/v1/chat/completions", json=FORTY,
                                  headers=h) as r:
            assert r.status == 402             # in debt
        await p.admin("POST", "/admin/customers/blk/grants",
                      {"credits": "20", "idempotency_key": "blk-2"}, expect=201)
        summary = await p.admin("GET", "/admin/customers/blk/grants", expect=200)
        assert (summary["balance"], summary["debt"]) == ("2", "0")
        assert _ledger(p, "blk") == {"debit": 2 * Q, "debt": 18 * Q, "repay": 18 * Q}
        async with p.session.post(p.url + "/v1/chat/completions", json=FORTY,
                                  headers=h) as r:
            assert r.status == 200 and r.headers["X-Credits-Remaining"] == "1.6"


def test_reserve_from_is_validated_with_positions(tmp_path: Path) -> None:
    bad = tmp_path / "rules.yaml"
    bad.write_text(
        "version: 1\n"
        "meters:\n"
        "  t: {stripe_event_name: t}\n"
        "rules:\n"
        "  - name: a\n"
        "    match: {path: /a}\n"
        "    usage:\n"
        "      - {meter: t, quantity: response.json.n, credits: 1, reserve_from: response.json.n}\n"
        "  - name: b\n"
        "    match: {path: /b}\n"
        "    usage:\n"
        "      - {meter: t, quantity: 1, credits: 1, reserve_from: request.json.max}\n"
        "  - name: c\n"
        "    match: {path: /c}\n"
        "    usage:\n"
        "      - {meter: t, quantity: response.json.n, reserve_from: 5}\n")
    assert [str(x) for x in check_rules([bad])] == [
        f"{bad}:8:73: reserve_from 'response.json.n' must be read from the request "
        "(request.json.*, request.header.*, request.query.*)",
        f"{bad}:12:45: reserve_from is for quantities known after the response; this "
        "quantity is a constant",
        f"{bad}:16:61: reserve_from must be a request source like request.json.max_tokens",
    ]
    good = tmp_path / "good.yaml"
    good.write_text(HINTED_RULES)
    rules = load_rules([good])
    assert rules.rules[0].request_json is True
    src = rules.rules[0].usage[0].reserve_from
    assert src is not None and src.path == ("max_tokens",)


def test_high_percentile_nearest_rank() -> None:
    assert high_percentile(list(range(1, 101)), 95) == 95
    assert high_percentile([5], 95) == 5
    assert high_percentile([2, 1], 95) == 2
    assert high_percentile([1] * 19 + [100], 95) == 1
    assert high_percentile([1] * 18 + [100, 100], 95) == 100


def test_estimator_floor_until_learned_then_bounded_window() -> None:
    e = Estimator(1 * Q, CreditRate(1, 100))
    for _ in range(7):
        e.observe(40 * Q)
    assert (e.micro, e.cost) == (1 * Q, 10_000)          # 7 samples: still the floor
    e.observe(40 * Q)
    assert (e.micro, e.cost) == (40 * Q, 400_000)        # 8: learned
    for _ in range(WINDOW):
        e.observe(10 * Q)
    assert len(e.samples) == WINDOW and (e.seen, e.micro) == (8 + WINDOW, 10 * Q)
    e.configure(50 * Q, CreditRate(1, 50))                 # a reload raises the floor
    assert (e.micro, e.cost) == (50 * Q, 1_000_000)


def test_reservations_follow_a_reload_and_keep_what_was_learned(tmp_path: Path) -> None:
    def ruleset(credits: str, estimate: str) -> Any:
        f = tmp_path / f"r{credits}{estimate}.yaml"
        f.write_text(RULES.replace("credits: 0.01}", f"credits: {credits}, estimate: {estimate}}}"))
        return load_rules([f]).rules[0]

    res = Reservations(1 * Q)
    old = ruleset("0.01", "5")
    assert res.for_rule(old).cost() == 50_000                 # floor 5 tokens x 0.01
    for _ in range(8):
        res.for_rule(old).estimators["llm_tokens"].observe(40 * Q)
    assert res.for_rule(old).cost() == 400_000                # learned 40
    new = ruleset("0.02", "5")
    assert res.for_rule(new).cost() == 800_000                # same 40, the new rate
    assert res.for_rule(ruleset("0.02", "100")).cost() == 2_000_000   # a higher floor wins
