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
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from proxy.timeutil import parse_time
from tests.browser import Browser, Page
from tests.ci_guard import require_tool
from tests.conftest import ROOT, Proxy, ProxyFactory

Q = 1_000_000
ARTIFACTS = ROOT / "test-artifacts"

PRICED_RULES = """\
version: 1
meters:
  api_calls:
    stripe_event_name: api_calls
    description: One API request.
    price: {currency: usd, unit_amount_decimal: "2.5"}
  llm_tokens:
    stripe_event_name: llm_tokens
    description: Language-model tokens.
    price:
      currency: usd
      billing_scheme: tiered
      tiers_mode: graduated
      tiers:
        - {up_to: 1000, unit_amount_decimal: "0.1", flat_amount: 100}
        - {up_to: inf, unit_amount_decimal: "0.05"}
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


# ------------------------------------------------------------------ the page in Chromium

DOM_NUMBERS = """(() => {
  const out = {};
  document.querySelectorAll('[data-testid]').forEach(e => { out[e.dataset.testid] = e.textContent; });
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


async def captured_usage_body(page: Page, responses: list[dict[str, Any]]) -> dict[str, Any]:
    """The exact /_meter/usage response the page itself received."""
    hits = [r for r in responses if r["response"]["url"].endswith("/_meter/usage")]
    assert hits, [r["response"]["url"] for r in responses]
    body = await page.send("Network.getResponseBody", {"requestId": hits[-1]["requestId"]})
    return dict(orjson.loads(body["body"]))


def check_numbers(dom: dict[str, str], api: dict[str, Any]) -> None:
    """Every number the page shows is the API's string, verbatim."""
    assert dom["customer"] == api["customer"]
    for m, v in api["meters"].items():
        for field in ("quantity", "billable", "covered_by_credits", "projected_quantity",
                      "cost_so_far", "projected_cost", "requests"):
            assert dom[f"meter-{m}-{field}"] == str(v[field]), (m, field)
    for field in ("cost_so_far", "projected", "minimum_commitment"):
        assert dom[f"total-{field}"] == api["total"][field], field
    credits = api["credits"]
    for field in ("balance", "available", "reserved", "requests_in_flight"):
        assert dom[f"credits-{field}"] == str(credits[field]), field
    assert dom["credits-balance-kpi"] == credits["balance"]
    for g in credits["grants"]:
        assert dom[f"grant-{g['grant_id']}-credits"] == g["credits"]
        assert dom[f"grant-{g['grant_id']}-remaining"] == g["remaining"]


def between(value: str, *bounds: str) -> bool:
    return min(map(Decimal, bounds)) <= Decimal(value) <= max(map(Decimal, bounds))


async def test_usage_page_in_headless_chromium(make_proxy: ProxyFactory, tmp_path: Path) -> None:
    require_tool("chromium", "install Debian's 'chromium' package, or set CHROMIUM=")
    p = await make_proxy(rules_text=PRICED_RULES)
    anchor = today_midnight()
    key = await p.customer_with_key("acme", stripe_customer_id="cus_acme", overage="bill",
                                    billing_anchor=anchor.isoformat().replace("+00:00", "Z"),
                                    minimum_commitment=1500)
    grant = await p.admin("POST", "/admin/customers/acme/grants", {"credits": "5"}, expect=201)
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

    t0 = time.monotonic()
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
            for field in ("quantity", "billable", "covered_by_credits", "requests",
                          "cost_so_far"):
                assert dom[f"meter-{m}-{field}"] == str(v[field]) == str(before["meters"][m][field])
            # the projection moves with the clock: the page's lies between the calls around it
            assert between(dom[f"meter-{m}-projected_quantity"],
                           before["meters"][m]["projected_quantity"], v["projected_quantity"])
            assert admin["usage"][m] == dom[f"meter-{m}-quantity"]
        assert dom["total-cost_so_far"] == after["total"]["cost_so_far"] \
            == admin["billing"]["total"]["cost_so_far"]
        assert dom["total-minimum_commitment"] == "15.00" \
            == admin["billing"]["total"]["minimum_commitment"]
        assert between(dom["total-projected"], before["total"]["projected"],
                       admin["billing"]["total"]["projected"])
        assert dom[f"grant-{grant['grant_id']}-remaining"] == "0"
        assert await page.evaluate(
            f"document.querySelector('[data-testid=\"grant-{grant['grant_id']}-expires_at\"]')"
            ".textContent") == "Never"

        # the chart: 90 bars per meter carrying the API's history, drawn to scale
        charts = await page.evaluate(DOM_CHARTS)
        assert set(charts) == set(seen["meters"])
        for m, bars in charts.items():
            assert len(bars) == 90 == len(seen["history"])
            assert [b_["day"] for b_ in bars] == [h["day"] for h in seen["history"]]
            assert [b_["value"] for b_ in bars] == [h["meters"].get(m, "0")
                                                   for h in seen["history"]]
            assert all(b_["title"] and b_["value"] in b_["title"] for b_ in bars)
            assert all((b_["height"] > 0) == (Decimal(b_["value"]) > 0) for b_ in bars)
            tallest = max(bars, key=lambda x: Decimal(x["value"]))
            assert tallest["height"] == max(b_["height"] for b_ in bars)
            assert sum(1 for b_ in bars if b_["height"] > 0) >= 60       # seeded history shows
            assert bars[-1]["value"] == seen["meters"][m]["quantity"]     # today = this period

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
        deadline = time.monotonic() + 10
        while not (saved.exists() and saved.stat().st_size > 0):
            assert time.monotonic() < deadline, list(downloads.iterdir())
            await asyncio.sleep(0.05)
        text = saved.read_bytes().decode()
        end = (anchor + timedelta(days=1)).date().isoformat()
        assert text == await get_csv(p, key, f"?from={anchor.date().isoformat()}&to={end}")
        start_s = parse_time(seen["period"]["start"])
        ledger = ledger_period(p, "acme", start_s, parse_time(seen["period"]["end"]))
        assert csv_totals(text) == ledger
        dom = await page.evaluate(DOM_NUMBERS)
        for m, q in ledger.items():
            assert micro(dom[f"csv-{m}-quantity"]) == q

        ARTIFACTS.mkdir(exist_ok=True)
        await page.evaluate("document.getElementById('csv-result').hidden = false")
        (ARTIFACTS / "usage-page.png").write_bytes(await page.screenshot(width=1280))
        assert not page.exceptions, page.exceptions

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
    assert time.monotonic() - t0 < 20


async def test_usage_page_under_a_configured_prefix_with_the_key_form(
        make_proxy: ProxyFactory, tmp_path: Path) -> None:
    require_tool("chromium", "install Debian's 'chromium' package, or set CHROMIUM=")
    p = await make_proxy(rules_text=PRICED_RULES, reserved_prefix="/_billing")
    key = await p.customer_with_key("acme", stripe_customer_id="cus_acme")
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
        for m, v in api["meters"].items():
            assert dom[f"meter-{m}-quantity"] == v["quantity"]
        assert await page.evaluate("document.getElementById('credits').hidden")  # no grants
        charts = await page.evaluate(DOM_CHARTS)
        assert {m: len(bars) for m, bars in charts.items()} == {m: 90 for m in api["meters"]}
        assert await page.evaluate("sessionStorage.getItem('meterproxy.api_key')") == key
        assert key not in await page.evaluate("location.href")
        # "Forget key" drops it
        await page.evaluate("document.getElementById('signout').click()")
        await page.wait_for("document.body.dataset.state === 'login'")
        assert await page.evaluate("sessionStorage.getItem('meterproxy.api_key')") is None
        assert not page.exceptions, page.exceptions
