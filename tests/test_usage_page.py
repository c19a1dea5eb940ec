"""The consumer usage page (GET /_meter/) and its API (GET /_meter/usage, /_meter/events.csv).

The browser test drives Debian's headless Chromium over the DevTools Protocol
(``tests/browser.py``) against a real proxy and a real example upstream: the page loads with
the consumer's own key, the daily charts render one bar per day with the API's values, every
number on the page is the API's exact string, and the CSV download works. A screenshot is
saved as ``test-artifacts/usage-page.png``.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.timeutil import parse_time
from tests.browser import Browser, Page, find_chromium
from tests.conftest import ROOT, Proxy, ProxyFactory

Q = 1_000_000
ARTIFACTS = ROOT / "test-artifacts"

PRICED_RULES = """\
version: 1
meters:
  api_calls:
    stripe_event_name: api_calls
    description: One API request.
    display_name: API calls
    unit_label: calls
    price: {currency: usd, unit_amount_decimal: "2.5"}
  llm_tokens:
    stripe_event_name: llm_tokens
    description: Language-model tokens.
    display_name: Model tokens
    unit_label: tokens
    price:
      currency: usd
      billing_scheme: tiered
      tiers_mode: graduated
      tiers:
        - {up_to: 1000, unit_amount_decimal: "0.1", flat_amount: 100}
        - {up_to: inf, unit_amount_decimal: "0.05"}
  images: {stripe_event_name: images, display_name: Images, unit_label: images}
rules:
  - name: chat
    match: {methods: [POST], path: /v1/chat/completions}
    usage:
      - {meter: llm_tokens, preset: openai_chat, credits: 0.001, estimate: 1000}
      - {meter: api_calls, quantity: 1, credits: 0.25}
  - name: everything-else
    match: {path: "/**"}
    usage:
      - {meter: api_calls, quantity: 1, credits: 0.25}
"""


def micro(s: str) -> int:
    return int(Decimal(s) * Q)


def today_midnight() -> datetime:
    return datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


async def traffic(p: Proxy, key: str) -> None:
    """Mixed JSON and SSE: chat completions (plain and streamed) and plain JSON calls."""
    h = {"Authorization": f"Bearer {key}"}
    for i in range(4):
        for stream in (False, True):
            body = {"model": "m", "stream": stream, "prompt_tokens": 300 + 10 * i,
                    "completion_tokens": 500}
            async with p.session.post(p.url + "/v1/chat/completions", json=body,
                                      headers=h) as r:
                assert r.status == 200, await r.text()
                if stream:
                    assert r.content_type == "text/event-stream"
                await r.read()
    for _ in range(6):
        async with p.session.get(p.url + "/v1/items", headers=h) as r:
            assert r.status == 200
            await r.read()


def seed_history(p: Proxy, cid: str, before: int) -> None:
    """Earlier days' usage, straight into the ledger (what past traffic would have left),
    all before the current period so this period's totals stay this test's real traffic."""
    with p.db() as c:
        (key_id,) = c.execute("SELECT key_id FROM api_keys WHERE customer_id=?",
                              (cid,)).fetchone()
        rows = []
        day = before - 86400
        for i in range(89):
            weekend = datetime.fromtimestamp(day, UTC).weekday() >= 5
            calls = (30 + (i * 37) % 45) // (3 if weekend else 1)
            tokens = (18_000 + (i * 7919) % 26_000) // (4 if weekend else 1)
            for meter, q in (("api_calls", calls), ("llm_tokens", tokens)):
                if i % 23 == 5:
                    continue            # a quiet day now and then
                rows.append((cid, key_id, meter, day + 13 * 3600, "seed", q * Q, calls,
                             q * Q, 0, q * Q))
            day -= 86400
        c.executemany("INSERT INTO usage_minute (customer_id, key_id, meter, minute,"
                      " rules_version, quantity, requests, billable, covered, reported)"
                      " VALUES (?,?,?,?,?,?,?,?,?,?)", rows)


def ledger_period(p: Proxy, cid: str, start: float, end: float) -> dict[str, int]:
    with p.db() as c:
        return dict(c.execute(
            "SELECT meter, SUM(quantity) FROM usage_minute WHERE customer_id=? AND minute>=?"
            " AND minute<? GROUP BY meter", (cid, int(start), int(end))).fetchall())


def csv_totals(text: str) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for row in csv.DictReader(io.StringIO(text)):
        out[row["meter"]] += micro(row["quantity"])
    return dict(out)


async def get_usage(p: Proxy, key: str) -> dict[str, Any]:
    async with p.session.get(p.url + "/_meter/usage",
                             headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200, await r.text()
        return dict(await r.json())


async def get_csv(p: Proxy, key: str, query: str = "") -> str:
    async with p.session.get(p.url + "/_meter/events.csv" + query,
                             headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200, await r.text()
        assert r.content_type == "text/csv"
        return await r.text()


# ------------------------------------------------------------------ API (no browser)

async def test_usage_api_requires_the_consumers_own_key(make_proxy: ProxyFactory) -> None:
    p = await make_proxy(rules_text=PRICED_RULES)
    key = await p.customer_with_key("acme", stripe_customer_id="cus_acme")
    for path in ("/_meter/usage", "/_meter/events.csv"):
        async with p.session.get(p.url + path) as r:
            assert r.status == 401 and r.content_type == "application/json"
            assert (await r.json())["error"]["type"] == "missing_api_key"
        async with p.session.get(p.url + path, headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401
            assert (await r.json())["error"]["type"] == "invalid_api_key"
    assert (await get_usage(p, key))["customer"] == "acme"
    (k,) = await p.admin("GET", "/admin/customers/acme/keys", expect=200)
    await p.admin("DELETE", f"/admin/keys/{k['key_id']}", expect=200)
    for path in ("/_meter/usage", "/_meter/events.csv"):
        async with p.session.get(p.url + path, headers={"Authorization": f"Bearer {key}"}) as r:
            assert r.status == 403
            assert (await r.json())["error"]["type"] == "key_revoked"


async def test_page_is_served_self_contained(make_proxy: ProxyFactory) -> None:
    p = await make_proxy(rules_text=PRICED_RULES)
    for path in ("/_meter/", "/_meter"):
        async with p.session.get(p.url + path) as r:      # no key needed for the page itself
            assert r.status == 200 and r.content_type == "text/html"
            csp = r.headers["Content-Security-Policy"]
            html = await r.text()
    assert "default-src 'self'" in csp
    lowered = html.lower()
    # nothing fetched from elsewhere at runtime: no CDN script, stylesheet, font or image
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", lowered)
    assert not re.search(r"""url\(\s*["']?(https?:)?//|@import|<link\b|<script\s+src""", lowered)
    assert "sessionStorage" in html and "localStorage" not in html


async def test_events_csv_totals_equal_the_ledger(make_proxy: ProxyFactory) -> None:
    p = await make_proxy(rules_text=PRICED_RULES)
    key = await p.customer_with_key("acme", stripe_customer_id="cus_acme", overage="bill")
    other = await p.customer_with_key("other", stripe_customer_id="cus_other")
    await p.admin("POST", "/admin/customers/acme/grants", {"credits": "5"}, expect=201)
    await traffic(p, key)
    await traffic(p, other)
    report = await get_usage(p, key)
    start, end = (parse_time(report["period"][k]) for k in ("start", "end"))
    ledger = ledger_period(p, "acme", start, end)
    assert set(ledger) == {"api_calls", "llm_tokens"}
    # default period, and the same period asked for explicitly
    for query in ("", f"?from={report['period']['start']}&to={report['period']['end']}"):
        text = await get_csv(p, key, query)
        rows = list(csv.DictReader(io.StringIO(text)))
        assert {r["customer_id"] for r in rows} == {"acme"}      # only their own requests
        assert csv_totals(text) == ledger
        for m, v in report["meters"].items():
            assert micro(v["quantity"]) == ledger[m]
    async with p.session.get(p.url + "/_meter/events.csv?from=yesterday",
                             headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 400


async def test_usage_api_speaks_to_the_customer(make_proxy: ProxyFactory) -> None:
    """Display names, whole units, a projection never below use, the invoice preview and the
    daily costs all add up to the same cents; grants carry names, not internal ids."""
    p = await make_proxy(rules_text=PRICED_RULES)
    key = await p.customer_with_key("acme", stripe_customer_id="cus_acme", overage="bill",
                                    billing_anchor=today_midnight().isoformat()
                                    .replace("+00:00", "Z"), minimum_commitment=5000)
    await p.admin("POST", "/admin/customers/acme/grants",
                  {"credits": "1.5", "source": "welcome bonus"}, expect=201)
    await traffic(p, key)
    r = await get_usage(p, key)
    api, tok, img = (r["meters"][m] for m in ("api_calls", "llm_tokens", "images"))
    assert (api["display_name"], api["unit_label"]) == ("API calls", "calls")
    assert (tok["display_name"], tok["unit_label"]) == ("Model tokens", "tokens")
    assert (api["active"], tok["active"], img["active"]) == (True, True, False)
    assert img["quantity"] == "0" and "cost_so_far" not in img      # unpriced, unused
    # 8 chats x (300..330 prompt + 500 completion) tokens; 14 calls; credits cover the first
    assert tok["quantity"] == str(2 * sum(800 + 10 * i for i in range(4)))
    assert api["quantity"] == "14"
    for m in (api, tok):
        assert m["billable_units"] == int(Decimal(m["billable"]))      # whole units
        assert Decimal(m["projected_quantity"]) >= Decimal(m["quantity"])
        assert m["projected_billable_units"] >= m["billable_units"]
    assert Decimal(tok["covered_by_credits"]) > 0
    assert tok["price_text"] == ["First 1,000 tokens: $1.00 per 1,000 tokens + $1.00 flat fee",
                                 "Over 1,000 tokens: $0.50 per 1,000 tokens"]
    assert api["price_text"] == ["$0.025 each"]
    assert tok["fixed_fee"] == "1.00" and api["fixed_fee"] == "0.00"
    assert tok["notes"][-1] == "Includes the $1.00 flat fee of the first tier."
    assert r["currency_format"] == {"prefix": "$", "suffix": ""}
    assert r["total"]["fixed_fees"] == "1.00"
    assert r["total"]["projection"].startswith("At the average daily rate of the last 7 days")
    assert r["total"]["projection"].endswith("at least the minimum commitment of $50.00.")
    assert r["total"]["projected"] == "50.00"
    # the invoice preview: one line per priced meter, each equal to its cost so far
    inv = r["upcoming_invoice"]
    assert [ln["meter"] for ln in inv["lines"]] == ["api_calls", "llm_tokens"]
    cents = 0
    for ln in inv["lines"]:
        m = r["meters"][ln["meter"]]
        assert ln["description"] == m["display_name"]
        assert ln["quantity"] == m["billable_units"]
        assert ln["amount"] == m["cost_so_far"]
        exact = sum(Decimal(s["amount"]) for s in ln["sub_lines"])
        assert exact.quantize(Decimal("0.01"), ROUND_HALF_UP) == Decimal(ln["amount"])
        cents += micro(ln["amount"])
    assert inv["total"] == r["total"]["cost_so_far"] and micro(inv["total"]) == cents
    # daily cost: today is the whole period so far; with the flat fee it is the cost so far
    (today,) = r["daily"]
    assert today["day"] == datetime.now(UTC).date().isoformat()
    assert Decimal(today["cost"]) + Decimal(r["total"]["fixed_fees"]) \
        == Decimal(r["total"]["cost_so_far"])
    assert {m: v["quantity"] for m, v in today["meters"].items()} \
        == {"api_calls": "14", "llm_tokens": tok["quantity"]}
    # credits: a name, never an internal id
    (g,) = r["credits"]["grants"]
    assert g == {"name": "Welcome bonus", "credits": "1.5", "remaining": "0",
                 "granted_at": g["granted_at"], "expires_at": None, "status": "used_up"}
    assert "grnt" not in orjson.dumps(r["credits"]).decode()

