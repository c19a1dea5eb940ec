"""The consumer usage page (GET /_meter/) and its API (GET /_meter/usage, /_meter/events.csv).

The browser test drives Debian's headless Chromium over the DevTools Protocol
(``tests/browser.py``) against a real proxy and a real example upstream: the page loads with
the consumer's own key, the daily charts render one bar per day with the API's values, every
number on the page is the API's exact string, and the CSV download works. A screenshot is
saved as ``test-artifacts/usage-page.png``.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import hashlib
import io
import os
import re
import subprocess
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.store.db import UsageItem, UsageRow
from proxy.timeutil import parse_time, rfc3339
from tests.browser import Browser, Page, find_chromium
from tests.ci_guard import require_tool
from tests.conftest import ROOT, Proxy, ProxyFactory
from tests.helpers import wait_until

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
    assert not re.search(r"""url\(\s*["']?(https?:)?//|@import|<script\s+src""", lowered)
    # the one <link> is the inline favicon (else the browser asks the API for /favicon.ico)
    assert re.findall(r"<link\b[^>]*>", lowered) == ['<link rel="icon" href="data:,">']
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
        assert {m: micro(v["quantity"]) for m, v in report["meters"].items()} \
            == {**ledger, "images": 0}
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
    last = (datetime.fromisoformat(r["period"]["end"]) - timedelta(seconds=1)).date()
    assert r["total"]["projection"] == (
        f"At the average daily rate of the last 7 days, until the period ends on {last} (UTC);"
        " at least the minimum commitment of $50.00.")
    assert r["total"]["projected"] == "50.00"
    # the invoice preview: one line per priced meter, each equal to its cost so far
    inv = r["upcoming_invoice"]
    assert [ln["meter"] for ln in inv["lines"]] == ["api_calls", "llm_tokens"]
    assert [(ln["unit_amount"], ln["per"], len(ln["sub_lines"])) for ln in inv["lines"]] \
        == [("0.025", 1, 0), (None, 1, 3)]
    cents = 0
    for ln in inv["lines"]:
        m = r["meters"][ln["meter"]]
        assert ln["description"] == m["display_name"]
        assert ln["quantity"] == m["billable_units"]
        assert ln["amount"] == m["cost_so_far"]
        exact = ln["quantity"] * Decimal(ln["unit_amount"]) if ln["unit_amount"] \
            else sum(Decimal(s["amount"]) for s in ln["sub_lines"])
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


# ------------------------------------------------------------------ the page in Chromium

AXE = ROOT / "tests" / "vendor" / "axe-core" / "axe.min.js"
AXE_SHA256 = "29348999450cdf2849a8e70b7912fc2da85a849da39c0d0d5394f51d4a9ed95c"


def require_chromium() -> None:
    """Skip on a developer machine without chromium; under CI=true, fail: the browser
    tests must run there."""
    if find_chromium() is not None:
        return
    msg = ("no chromium binary (install Debian's 'chromium' package, or set CHROMIUM=) -- "
           "the usage-page browser tests cannot run")
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(msg + " (CI=true: a missing browser is a failure)")
    pytest.skip(msg)


# every element with a data-testid: its exact API value (data-value) and what is shown
DOM_NUMBERS = """(() => {
  const out = {};
  document.querySelectorAll('[data-testid]').forEach(e => {
    out[e.dataset.testid] = e.hasAttribute('data-value') ? e.dataset.value : e.textContent;
    out[e.dataset.testid + ':text'] = e.textContent;
  });
  return out;
})()"""

DOM_CHARTS = """(() => {
  const out = {};
  document.querySelectorAll('svg[data-meter]').forEach(svg => {
    out[svg.dataset.meter] = [...svg.querySelectorAll('rect.bar')].map(r => ({
      day: r.dataset.day, value: r.dataset.value, height: +r.getAttribute('height'),
      title: r.querySelector('title') ? r.querySelector('title').textContent : null}));
  });
  return out;
})()"""

DOM_DAILY = """[...document.querySelectorAll('#daily-svg g.day')].map(g => ({
  day: g.dataset.day, value: g.dataset.value,
  bars: Object.fromEntries([...g.querySelectorAll('rect')].map(r => [r.dataset.meter, r.dataset.value]))
}))"""

AXE_RUN = """axe.run(document, {resultTypes: ['violations']}).then(r => r.violations.map(v => ({
  id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.map(n => n.target.join(' '))})))"""


def test_missing_chromium_fails_under_ci(monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    monkeypatch.setenv("CHROMIUM", str(tmp_path / "no-such-browser"))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true: a missing browser is a failure"):
        require_chromium()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="no chromium binary"):
        require_chromium()


def grouped(value: str, prefix: str = "") -> str:
    """What the page shows for the API's exact string: thousands separators only."""
    neg = value.startswith("-")
    whole, _, frac = value.lstrip("-").partition(".")
    return ("-" if neg else "") + prefix + f"{int(whole):,}" + (f".{frac}" if frac else "")


async def captured_usage_body(page: Page, responses: list[dict[str, Any]]) -> dict[str, Any]:
    """The exact /_meter/usage response the page itself received."""
    hits = [r for r in responses if r["response"]["url"].endswith("/_meter/usage")]
    assert hits, [r["response"]["url"] for r in responses]
    body = await page.send("Network.getResponseBody", {"requestId": hits[-1]["requestId"]})
    return dict(orjson.loads(body["body"]))


def check_numbers(dom: dict[str, str], api: dict[str, Any]) -> None:
    """Every number the page shows is the API's string, verbatim (grouped for display)."""
    assert dom["customer"] == api["customer"]
    for m, v in api["meters"].items():
        if not v["active"]:
            assert f"meter-{m}-quantity" not in dom, m            # collapsed
            continue
        for field in ("quantity", "covered_by_credits", "billable_units", "projected_quantity"):
            assert dom[f"meter-{m}-{field}"] == str(v[field]), (m, field)
            assert dom[f"meter-{m}-{field}:text"] == grouped(str(v[field])), (m, field)
        for field in ("cost_so_far", "projected_cost"):
            assert dom[f"meter-{m}-{field}"] == v[field], (m, field)
            assert dom[f"meter-{m}-{field}:text"] == grouped(v[field], "$"), (m, field)
        assert dom[f"meter-{m}-notes:text"] == "".join(v["notes"])
        assert dom[f"price-{m}:text"] == "".join(v["price_text"])
    for field in ("cost_so_far", "projected", "minimum_commitment"):
        assert dom[f"total-{field}"] == api["total"][field], field
        assert dom[f"total-{field}:text"] == grouped(api["total"][field], "$"), field
    assert dom["projection-note:text"] == api["total"]["projection"]
    inv = api["upcoming_invoice"]
    assert dom["invoice-total"] == inv["total"]
    for ln in inv["lines"]:
        assert dom[f"invoice-{ln['meter']}-quantity"] == str(ln["quantity"])
        assert dom[f"invoice-{ln['meter']}-amount"] == ln["amount"]
        assert dom.get(f"invoice-{ln['meter']}-unit_amount") == ln["unit_amount"]
        for i, sub in enumerate(ln["sub_lines"]):
            assert dom[f"invoice-{ln['meter']}-sub-{i}"] == sub["amount"]
    credits = api["credits"]
    for field in ("balance", "available", "reserved", "requests_in_flight"):
        assert dom[f"credits-{field}"] == str(credits[field]), field
    assert dom["credits-balance-kpi"] == credits["balance"]
    for i, g in enumerate(credits["grants"]):
        assert dom[f"grant-{i}-name"] == g["name"]
        assert dom[f"grant-{i}-credits"] == g["credits"]
        assert dom[f"grant-{i}-remaining"] == g["remaining"]
        assert dom[f"grant-{i}-expires_at"] == (g["expires_at"] or "")


def between(value: str, *bounds: str) -> bool:
    return min(map(Decimal, bounds)) <= Decimal(value) <= max(map(Decimal, bounds))


async def run_axe(page: Page) -> list[dict[str, Any]]:
    """axe-core in the page: the violations that are serious or critical."""
    source = await asyncio.to_thread(AXE.read_bytes)
    assert hashlib.sha256(source).hexdigest() == AXE_SHA256       # the vendored file, unmodified
    await page.evaluate(source.decode())
    violations = await page.evaluate(AXE_RUN)
    assert isinstance(violations, list)
    return [v for v in violations if v["impact"] in ("serious", "critical")]


async def test_usage_page_in_headless_chromium(make_proxy: ProxyFactory, tmp_path: Path) -> None:
    require_chromium()
    p = await make_proxy(rules_text=PRICED_RULES)
    anchor = today_midnight()
    key = await p.customer_with_key("acme", stripe_customer_id="cus_acme", overage="bill",
                                    billing_anchor=anchor.isoformat().replace("+00:00", "Z"),
                                    minimum_commitment=1500)
    await p.admin("POST", "/admin/customers/acme/grants", {"credits": "5"}, expect=201)
    expiring = (anchor + timedelta(days=20)).isoformat().replace("+00:00", "Z")
    await p.admin("POST", "/admin/customers/acme/grants",
                  {"credits": "2", "expires_at": expiring, "priority": 10}, expect=201)
    await traffic(p, key)
    allowance = (anchor + timedelta(days=45)).isoformat().replace("+00:00", "Z")
    await p.admin("POST", "/admin/customers/acme/grants",
                  {"credits": "100", "expires_at": allowance, "source": "monthly allowance"},
                  expect=201)
    seed_history(p, "acme", int(anchor.timestamp()))

    before = await get_usage(p, key)
    assert Decimal(before["meters"]["llm_tokens"]["billable"]) > 0            # overage billed
    assert Decimal(before["meters"]["llm_tokens"]["covered_by_credits"]) > 0
    assert before["credits"]["balance"] == "100"
    assert [(g["name"], g["credits"]) for g in before["credits"]["grants"]] \
        == [("Credit grant", "2"), ("Monthly allowance", "100"), ("Credit grant", "5")]

    ARTIFACTS.mkdir(exist_ok=True)
    async with Browser.launch(tmp_path) as b:
        page = await b.new_page(width=1280, height=900)
        responses: list[dict[str, Any]] = []
        await page.send("Network.enable")
        b.on_event("Network.responseReceived", responses.append)
        await page.goto(f"{p.url}/_meter/#key={key}")
        await page.wait_for("document.body.dataset.state === 'ready'")
        after = await get_usage(p, key)
        admin = await p.admin("GET", "/admin/customers/acme", expect=200)

        # the key left the address bar and lives in this tab only
        assert await page.evaluate("location.href") == f"{p.url}/_meter/"
        assert await page.evaluate("sessionStorage.getItem('meterproxy.api_key')") == key
        assert await page.evaluate("localStorage.length") == 0

        # the numbers equal the API's: exactly the response the page got, and a fresh call
        dom = await page.evaluate(DOM_NUMBERS)
        seen = await captured_usage_body(page, responses)
        check_numbers(dom, seen)
        for m, v in after["meters"].items():
            if not v["active"]:
                continue
            for field in ("quantity", "billable_units", "covered_by_credits", "cost_so_far"):
                assert dom[f"meter-{m}-{field}"] == str(v[field]) \
                    == str(before["meters"][m][field])
            # the projection moves with the clock: the page's lies between the calls around it
            assert between(dom[f"meter-{m}-projected_quantity"],
                           before["meters"][m]["projected_quantity"], v["projected_quantity"])
            assert Decimal(dom[f"meter-{m}-projected_quantity"]) >= Decimal(v["quantity"])
            assert admin["usage"][m] == dom[f"meter-{m}-quantity"]
        assert dom["total-cost_so_far"] == after["total"]["cost_so_far"] \
            == admin["billing"]["total"]["cost_so_far"]
        assert dom["total-minimum_commitment"] == "15.00" \
            == admin["billing"]["total"]["minimum_commitment"]
        assert between(dom["total-projected"], before["total"]["projected"],
                       admin["billing"]["total"]["projected"])
        # display names, not meter ids; the unused meter collapsed into one line
        assert await page.evaluate(
            "[...document.querySelectorAll('#meters tbody .meter-name')].map(e => e.textContent)"
        ) == ["API calls", "Model tokens"]
        assert dom["no-usage:text"] == "No usage yet this period: Images."
        assert dom["grant-2-remaining"] == "0"
        assert await page.evaluate(
            "document.querySelector('[data-testid=\"grant-2-expires_at\"]').textContent") \
            == "Never"
        page_text = await page.evaluate("document.body.innerText")
        assert "grnt" not in page_text and "llm_tokens" not in page_text

        # daily cost this period: one stacked bar per day, the API's amounts
        daily = await page.evaluate(DOM_DAILY)
        assert daily == [{"day": d["day"], "value": d["cost"],
                          "bars": {m: v["cost"] for m, v in d["meters"].items()
                                   if Decimal(v["cost"]) != 0}} for d in seen["daily"]]
        assert len(daily) == 1 and Decimal(daily[0]["value"]) > 0

        # the 90-day chart: 90 bars per meter used in that time, drawn to scale
        charts = await page.evaluate(DOM_CHARTS)
        assert set(charts) == {"api_calls", "llm_tokens"}                  # none for Images
        for m, bars in charts.items():
            assert len(bars) == 90 == len(seen["history"])
            assert [b_["day"] for b_ in bars] == [h["day"] for h in seen["history"]]
            assert [b_["value"] for b_ in bars] == [h["meters"].get(m, "0")
                                                   for h in seen["history"]]
            assert all(b_["title"] and grouped(b_["value"]) in b_["title"] for b_ in bars)
            assert all((b_["height"] > 0) == (Decimal(b_["value"]) > 0) for b_ in bars)
            tallest = max(bars, key=lambda x: Decimal(x["value"]))
            assert tallest["height"] == max(b_["height"] for b_ in bars)
            assert sum(1 for b_ in bars if b_["height"] > 0) >= 60       # seeded history shows
            assert bars[-1]["value"] == seen["meters"][m]["quantity"]     # today = this period

        # accessibility: axe-core in the page, no serious or critical violation
        assert await run_axe(page) == []

        # the CSV download: fetch + Blob + <a download>, saved by the browser
        downloads = tmp_path / "downloads"
        await b.allow_downloads(downloads)
        today = datetime.now(UTC).date().isoformat()
        assert await page.evaluate("document.getElementById('csv-from').value") \
            == anchor.date().isoformat()
        assert await page.evaluate("document.getElementById('csv-to').value") == today
        await page.evaluate("document.getElementById('csv-button').click()")
        await page.wait_for("document.getElementById('csv-result').dataset.state === 'ready'")
        name = await page.evaluate("document.getElementById('csv-link').download")
        saved = downloads / name
        await wait_until(lambda: saved.exists() and saved.stat().st_size > 0, interval=0.05,
                         what=f"the download {name}")
        text = saved.read_bytes().decode()
        end = (anchor + timedelta(days=1)).date().isoformat()
        assert text == await get_csv(p, key, f"?from={anchor.date().isoformat()}&to={end}")
        start_s = parse_time(seen["period"]["start"])
        ledger = ledger_period(p, "acme", start_s, parse_time(seen["period"]["end"]))
        assert csv_totals(text) == ledger
        dom = await page.evaluate(DOM_NUMBERS)
        for m, q in ledger.items():
            assert micro(dom[f"csv-{m}-quantity"]) == q

        (ARTIFACTS / "usage-page-desktop.png").write_bytes(await page.screenshot(width=1280))
        assert page.exceptions == [] and page.console == []

        # a phone: the same page in 390 CSS pixels, nothing wider than the screen
        phone = await b.new_page(width=390, height=844)
        responses.clear()                                  # the desktop tab is idle now
        await phone.send("Network.enable")
        await phone.send("Emulation.setDeviceMetricsOverride",
                         {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
        await phone.goto(f"{p.url}/_meter/")        # a new tab: sessionStorage is empty
        await phone.wait_for("document.body.dataset.state === 'login'")
        await phone.evaluate(
            f"document.getElementById('key-input').value = {orjson.dumps(key).decode()};"
            " document.querySelector('#key-form button').click()")
        await phone.wait_for("document.body.dataset.state === 'ready'")
        assert await phone.evaluate("document.documentElement.scrollWidth") == 390
        check_numbers(await phone.evaluate(DOM_NUMBERS),
                      await captured_usage_body(phone, responses))
        assert await run_axe(phone) == []
        height = int(await phone.evaluate("document.documentElement.scrollHeight"))
        await phone.send("Emulation.setDeviceMetricsOverride",
                         {"width": 390, "height": height, "deviceScaleFactor": 2,
                          "mobile": True})
        shot = await phone.send("Page.captureScreenshot", {"format": "png",
                                                           "captureBeyondViewport": True})
        (ARTIFACTS / "usage-page-phone.png").write_bytes(base64.b64decode(shot["data"]))
        assert phone.exceptions == [] and phone.console == []
        await b.send("Target.closeTarget", {"targetId": phone.target_id})
        await b.send("Target.activateTarget", {"targetId": page.target_id})

        # a bad key: a clear error, the key form again, nothing kept
        await page.send("Emulation.setDeviceMetricsOverride",
                        {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False})
        await page.goto(f"{p.url}/_meter/#key=mp_wrong")
        await page.wait_for("document.body.dataset.state === 'error'")
        assert await page.evaluate("document.getElementById('error').dataset.errorType") \
            == "invalid_api_key"
        assert await page.evaluate("!document.getElementById('login').hidden")
        assert await page.evaluate("sessionStorage.getItem('meterproxy.api_key')") is None
        (ARTIFACTS / "usage-page-bad-key.png").write_bytes(await page.screenshot(width=1280))
        assert page.exceptions == []


async def test_usage_page_under_a_configured_prefix_with_the_key_form(
        make_proxy: ProxyFactory, tmp_path: Path) -> None:
    require_chromium()
    p = await make_proxy(rules_text=PRICED_RULES, reserved_prefix="/_billing")
    key = await p.customer_with_key("acme", stripe_customer_id="cus_acme")
    idle = await p.customer_with_key("idle", stripe_customer_id="cus_idle")
    await traffic(p, key)
    async with p.session.get(p.url + "/_billing/usage",
                             headers={"Authorization": f"Bearer {key}"}) as r:
        api = await r.json()
    async with Browser.launch(tmp_path) as b:
        page = await b.new_page()
        await page.goto(f"{p.url}/_billing/")
        await page.wait_for("document.body.dataset.state === 'login'")
        await page.evaluate(f"document.getElementById('key-input').value = {orjson.dumps(key).decode()};"
                            " document.querySelector('#key-form button').click()")
        await page.wait_for("document.body.dataset.state === 'ready'")
        dom = await page.evaluate(DOM_NUMBERS)
        assert {m: dom.get(f"meter-{m}-quantity") for m in api["meters"]} \
            == {"api_calls": "14", "llm_tokens": api["meters"]["llm_tokens"]["quantity"],
                "images": None}                                    # unused: collapsed
        assert await page.evaluate("document.getElementById('credits').hidden")  # no grants
        charts = await page.evaluate(DOM_CHARTS)
        assert {m: len(bars) for m, bars in charts.items()} \
            == {"api_calls": 90, "llm_tokens": 90}
        assert await page.evaluate("sessionStorage.getItem('meterproxy.api_key')") == key
        assert key not in await page.evaluate("location.href")
        assert await page.evaluate("document.getElementById('kpi-minimum').hidden")
        # "Forget key" drops it
        await page.evaluate("document.getElementById('signout').click()")
        await page.wait_for("document.body.dataset.state === 'login'")
        assert await page.evaluate("sessionStorage.getItem('meterproxy.api_key')") is None
        # a customer with no usage yet: empty cards collapse, the flat fee is explained
        await page.evaluate(f"document.getElementById('key-input').value = "
                            f"{orjson.dumps(idle).decode()};"
                            " document.querySelector('#key-form button').click()")
        await page.wait_for("document.body.dataset.state === 'ready'"
                            " && document.getElementById('who').textContent === 'idle'")
        hidden = await page.evaluate(
            "Object.fromEntries(['meters-wrap', 'history-card', 'daily-card', 'kpi-minimum',"
            " 'credits', 'invoice-card', 'prices-card'].map(id => [id,"
            " document.getElementById(id).hidden]))")
        assert hidden == {"meters-wrap": True, "history-card": True, "daily-card": True,
                          "kpi-minimum": True, "credits": True, "invoice-card": False,
                          "prices-card": False}
        dom = await page.evaluate(DOM_NUMBERS)
        assert dom["no-usage:text"] == "No usage yet this period."
        assert (dom["total-cost_so_far:text"], dom["invoice-total:text"]) == ("$1.00", "$1.00")
        assert dom["invoice-llm_tokens-amount"] == "1.00"
        assert dom["invoice-api_calls-amount"] == "0.00"
        assert await page.evaluate("document.getElementById('period-note').textContent"
                                   ".endsWith('; includes $1.00 in flat fees')")
        assert not page.exceptions, page.exceptions


def insert_minutes(p: Proxy, cid: str, rows: list[tuple[str, int, int, int]]) -> None:
    """(meter, minute, quantity micro, billable micro) straight into the ledger."""
    with p.db() as c:
        (key_id,) = c.execute("SELECT key_id FROM api_keys WHERE customer_id=?",
                              (cid,)).fetchone()
        c.executemany("INSERT INTO usage_minute (customer_id, key_id, meter, minute,"
                      " rules_version, quantity, requests, billable, covered, reported)"
                      " VALUES (?,?,?,?,'seed',?,1,?,?,0)",
                      [(cid, key_id, m, t, q, b, q - b) for m, t, q, b in rows])


async def test_period_starting_mid_day_splits_days_and_windows(
        make_proxy: ProxyFactory) -> None:
    """A period that starts at 10:00: the minute before belongs to the last period (in the
    90-day history, not in this period's daily cost); the projection counts the trailing
    7 days, in whole units, and is never below what is used."""
    p = await make_proxy(rules_text=PRICED_RULES)
    now = int(time.time())
    start = now - 3 * 86400 - (now % 86400) + 10 * 3600 if now % 86400 >= 10 * 3600 \
        else now - 4 * 86400 - (now % 86400) + 10 * 3600
    anchor = datetime.fromtimestamp(start, UTC).isoformat().replace("+00:00", "Z")
    key = await p.customer_with_key("acme", stripe_customer_id="cus_acme",
                                    billing_anchor=anchor)
    day0 = start // 86400 * 86400
    insert_minutes(p, "acme", [
        ("api_calls", start - 60, 7 * Q, 7 * Q),           # last period, same UTC day
        ("api_calls", start, 3 * Q, 3 * Q),                # first minute of this period
        ("api_calls", start + 86400, 2_500_000, 1_500_000),
        ("llm_tokens", now - 60, 1000 * Q, 1000 * Q),
    ])
    t0 = time.time()
    r = await get_usage(p, key)
    t1 = time.time()
    assert r["period"]["start"] == anchor
    api, tok = r["meters"]["api_calls"], r["meters"]["llm_tokens"]
    assert (api["quantity"], api["billable"], api["billable_units"]) == ("5.5", "4.5", 4)
    assert api["covered_by_credits"] == "1"
    daily = {d["day"]: d for d in r["daily"]}
    first = datetime.fromtimestamp(day0, UTC).date().isoformat()
    second = datetime.fromtimestamp(day0 + 86400, UTC).date().isoformat()
    assert next(iter(daily)) == first and len(daily) == (now // 86400 - day0 // 86400) + 1
    assert daily[first]["meters"]["api_calls"] == {"quantity": "3", "billable": "3",
                                                   "cost": "0.08"}     # 7.5 cents, half up
    assert daily[second]["meters"]["api_calls"] == {"quantity": "2.5", "billable": "1.5",
                                                    "cost": "0.02"}    # line 4 -> 10 cents
    hist = {h["day"]: h["meters"] for h in r["history"]}
    assert hist[first]["api_calls"] == "10"                            # both periods' minutes
    # the trailing 7 days hold everything: 5.5 calls + 7 of the last period; the report's
    # clock is between t0 and t1, and the projection is monotone in it
    end = int(parse_time(r["period"]["end"]))

    def projected(so_far: int, t: float) -> tuple[int, int]:
        rest = int((so_far + 7 * Q) * max(0.0, end - t) // (7 * 86400))
        return (so_far + rest + Q // 2) // Q, (so_far + rest) // Q      # rounded, floored

    assert int(api["projected_quantity"]) in {projected(5_500_000, t)[0] for t in (t0, t1)}
    assert api["projected_billable_units"] in {projected(4_500_000, t)[1] for t in (t0, t1)}
    assert Decimal(tok["projected_quantity"]) >= Decimal(tok["quantity"]) == 1000


async def test_default_csv_download_is_exactly_the_period_in_headless_chromium(
        make_proxy: ProxyFactory, tmp_path: Path) -> None:
    """The default "From" is the period's first day; the download then starts at the
    period's start (a Stripe anchor, with seconds), not that day's midnight, and by the
    minute rule (docs/billing-semantics.md "Period boundaries"): the requests of that day
    before it and of its boundary minute are the last period's. The CSV's totals are the
    period's on the same page."""
    require_chromium()
    p = await make_proxy(rules_text=PRICED_RULES)
    now = time.time()
    start = int(now - 7200) // 60 * 60 + 15                     # two hours ago, hh:mm:15
    key = await p.customer_with_key("acme", stripe_customer_id="cus_acme",
                                    billing_anchor=rfc3339(start))
    minute, day0 = start - 15, start // 86400 * 86400
    store = p.server.rt.store
    for rid, at, calls in (("same-day", max(day0, minute - 3600), 4),
                           ("boundary-minute", minute + 5, 3), ("after-start", minute + 40, 2),
                           ("in-period", start + 600, 1)):
        fut = store.record(UsageRow(rid, at, "acme", "k", "everything-else", "v", 200,
                                    [UsageItem("api_calls", calls * Q, 0, calls * Q)],
                                    method="GET", path="/v1/x"), wait=True)
        assert fut is not None
        await fut
    await store.catch_up()
    usage = await get_usage(p, key)
    assert usage["period"]["start"] == rfc3339(start)
    assert usage["meters"]["api_calls"]["billable"] == "1"

    async with Browser.launch(tmp_path) as b:
        page = await b.new_page(width=1280, height=900)
        await page.goto(f"{p.url}/_meter/#key={key}")
        await page.wait_for("document.body.dataset.state === 'ready'")
        today = datetime.now(UTC).date().isoformat()
        first_day = datetime.fromtimestamp(start, UTC).date().isoformat()
        assert await page.evaluate("document.getElementById('csv-from').value") == first_day
        assert await page.evaluate("document.getElementById('csv-to').value") == today
        downloads = tmp_path / "downloads"
        await b.allow_downloads(downloads)
        await page.evaluate("document.getElementById('csv-button').click()")
        await page.wait_for("document.getElementById('csv-result').dataset.state === 'ready'")
        name = await page.evaluate("document.getElementById('csv-link').download")
        saved = downloads / name
        await wait_until(lambda: saved.exists() and saved.stat().st_size > 0, interval=0.05,
                         what=f"the download {name}")
        text = saved.read_bytes().decode()
        assert [r["request_id"] for r in csv.DictReader(io.StringIO(text))] == ["in-period"]
        dom = await page.evaluate(DOM_NUMBERS)
        assert Decimal(dom["csv-api_calls-billable"]) \
            == Decimal(usage["meters"]["api_calls"]["billable"]) == 1
        assert csv_totals(text) == {"api_calls": Q}
        assert page.exceptions == [] and page.console == []


# ------------------------------------------------------------------ monetary credits as money

def require_node() -> str:
    """The browser-free rendering test runs the page's own script in Node.js."""
    return require_tool("node", "apt-get install nodejs (Debian's package)")


def page_functions(html: str, *names: str) -> str:
    """The source of top-level functions of the page's script (two-space indented)."""
    out = []
    for name in names:
        start = html.index(f"\n  function {name}(") + 1
        out.append(html[start:html.index("\n  }\n", start) + 4])
    return "\n".join(out)


def credits_view(node: str, html: str, credits: dict[str, Any]) -> dict[str, Any]:
    """What the page's ``creditsView`` makes of the API's ``credits`` object."""
    script = (page_functions(html, "group", "creditsView")
              + "\nconst c = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
              + "\nprocess.stdout.write(JSON.stringify(creditsView(c)));")
    done = subprocess.run([node, "-e", script], input=orjson.dumps(credits),
                          capture_output=True, check=True, timeout=30)
    return dict(orjson.loads(done.stdout))


async def _monetary_page_proxy(make_proxy: ProxyFactory, double: Any) -> tuple[Proxy, str]:
    """A monetary customer (graduated price, issue 12's example) with 10.00 of credits and
    1M units burned (700 cents: the 5.00 flat fee and tier 1): 3.00 left."""
    from tests.test_credits_mirror import GRADUATED, _call, _monetary_proxy

    p, key = await _monetary_proxy(make_proxy, double, GRADUATED)
    await p.admin("POST", "/admin/customers/acme/grants", {"credits": "10"}, expect=201)
    assert await _call(p, key, 1_000_000) == 200
    return p, key


async def test_usage_page_renders_a_monetary_balance_as_money(
        make_proxy: ProxyFactory, stripe_double: Any) -> None:
    """Browser-free: the page's own ``creditsView`` (run in Node.js on the API's answer)
    shows a monetary customer's balance, availability and grants in its currency,
    formatted ("$3.00", no "credits" unit); a units customer's stay credit numbers."""
    node = require_node()
    p, key = await _monetary_page_proxy(make_proxy, stripe_double)
    html = (ROOT / "proxy" / "static" / "usage.html").read_text()
    api = await get_usage(p, key)
    assert api["credits"]["money"]["balance_text"] == "$3.00"
    view = credits_view(node, html, api["credits"])
    assert view["unit"] == ""
    assert (view["balance"], view["available"], view["reserved"]) == (
        {"value": "3.00", "text": "$3.00"}, {"value": "3.00", "text": "$3.00"},
        {"value": "0.00", "text": "$0.00"})
    assert view["grants"] == [{"credits": {"value": "10", "text": "$10.00"},
                               "remaining": {"value": "3", "text": "$3.00"}}]
    units = credits_view(node, html, {"balance": "1234.5", "available": "1000",
                                      "reserved": "0", "grants": [
                                          {"credits": "2000", "remaining": "1234.5"}]})
    assert (units["unit"], units["balance"]["text"], units["grants"][0]["credits"]["text"]) \
        == ("credits", "1,234.5", "2,000")


async def test_usage_page_shows_monetary_credits_as_money_in_headless_chromium(
        make_proxy: ProxyFactory, stripe_double: Any, tmp_path: Path) -> None:
    require_chromium()
    p, key = await _monetary_page_proxy(make_proxy, stripe_double)
    async with Browser.launch(tmp_path) as b:
        page = await b.new_page(width=1280, height=900)
        await page.goto(f"{p.url}/_meter/#key={key}")
        await page.wait_for("document.body.dataset.state === 'ready'")
        dom = await page.evaluate(DOM_NUMBERS)
        assert (dom["credits-balance-kpi:text"], dom["credits-balance:text"],
                dom["credits-available:text"]) == ("$3.00", "$3.00", "$3.00")
        assert (dom["grant-0-credits:text"], dom["grant-0-remaining:text"]) == ("$10.00",
                                                                                "$3.00")
        assert await page.evaluate("document.getElementById('credits-unit').hidden") is True
        assert await page.evaluate(
            "document.getElementById('credits-expiry-note').textContent") == \
            "$3.00 available now"
        assert page.exceptions == [] and page.console == []
