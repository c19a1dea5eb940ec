"""Reconciliation against the invoice (issue 12): Stripe's invoice preview (the double's
``POST /v1/invoices/create_preview`` through the real SDK) beside meterproxy's view of the
period, every difference explained; the preview cache that bounds what consumers can ask."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import stripe
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import StripeRejected
from proxy.periods import period_bounds
from proxy.pricing import price_from_stripe, units_amount
from proxy.reports.invoice_check import PreviewCache, compare, explain
from proxy.reports.usage_report import customer_report
from proxy.rules import load_rules
from proxy.store.db import Store, UsageItem, UsageRow
from proxy.store.sqlite import SqliteStorage
from proxy.stripe.client import InvoicePreview, PreviewLine, StripeClient
from tests.conftest import ROOT, ProxyFactory
from tests.helpers import wait_until
from tests.stripe_double.fixture import TEST_API_KEY, RunningDouble
from tests.stripe_double.invoices import preview as double_preview
from tests.test_openapi import validate_response

U = 1_000_000
CUS = "cus_acme"
GRADUATED = {"id": "price_calls", "currency": "usd", "billing_scheme": "tiered",
             "tiers_mode": "graduated", "recurring": {"meter": "mtr_calls"},
             "tiers": [{"up_to": 100, "unit_amount_decimal": "2", "flat_amount_decimal": "100"},
                       {"up_to": None, "unit_amount_decimal": "0.5"}]}
RULES = """\
version: 1
meters:
  api_calls: {stripe_event_name: api_calls}
rules:
  - name: all
    match: {path: "/**"}
    usage:
      - {meter: api_calls, quantity: 1}
"""


# ---- pure: the comparison ------------------------------------------------------------------

@st.composite
def _cases(draw: Any) -> tuple[dict[str, tuple[int, int]], dict[str, str], InvoicePreview]:
    meters = draw(st.lists(st.sampled_from(["a", "b", "c"]), unique=True, max_size=3))
    local = {m: (draw(st.integers(0, 10**6)), draw(st.integers(0, 10**8))) for m in meters}
    prices = {m: f"price_{m}" for m in meters if draw(st.booleans())}
    lines = [PreviewLine(draw(st.integers(0, 10**8)), draw(st.integers(0, 10**6)), p, None, p)
             for p in prices.values() if draw(st.booleans())]
    lines += [PreviewLine(draw(st.integers(-10**6, 10**6)), 1, None, f"ii_{i}", "item")
              for i in range(draw(st.integers(0, 2)))]
    return local, prices, InvoicePreview("usd", sum(ln.amount for ln in lines), (0, 1), lines,
                                         False)


@given(_cases())
def test_differences_add_up_and_are_explained(
        case: tuple[dict[str, tuple[int, int]], dict[str, str], InvoicePreview]) -> None:
    local, prices, preview = case
    out = compare(local, prices, preview)
    assert out["difference_minor"] == preview.total - sum(a for _, a in local.values())
    assert sum(ln["difference_minor"] for ln in out["lines"]) \
        + sum(o["amount_minor"] for o in out["other_lines"]) == out["difference_minor"]
    by_price = {ln.price: ln for ln in preview.lines if ln.price}
    for ln in out["lines"]:
        units, amount = local[ln["meter"]]
        stripe = by_price.get(ln["price"])
        if stripe is None:
            assert ln["explanation"].startswith("not on Stripe's invoice")
            continue
        assert ln["difference_minor"] == stripe.amount - amount
        matches = stripe.quantity == units and stripe.amount == amount
        assert (ln["explanation"] == "matches") == matches
        if (stripe.quantity or 0) < units:
            assert "fewer units" in ln["explanation"]


def test_explanations_name_the_cause() -> None:
    assert explain(10, 10, 500, 500) == "matches"
    assert "3 fewer units" in explain(10, 7, 500, 350, undelivered=3)
    assert "3 units still wait in meterproxy's outbox" in explain(10, 7, 500, 350, 3)
    assert "2 more units" in explain(10, 12, 500, 600)
    assert "priced differently" in explain(10, 10, 500, 700)


# ---- the double and the client ------------------------------------------------------------

@pytest.fixture
async def client(stripe_double: RunningDouble) -> AsyncIterator[StripeClient]:
    c = StripeClient(TEST_API_KEY, api_base=stripe_double.url,
                     meter_events_base=stripe_double.url, timeout=2.0)
    yield c
    await c.close()


def _period() -> tuple[int, int]:
    return period_bounds(None, time.time())


async def _send(client: StripeClient, n: int, value: int, ts: int) -> None:
    await client.send_meter_event(event_name="api_calls", stripe_customer_id=CUS, value=value,
                                  identifier=f"ev-{n}", timestamp=ts,
                                  idempotency_key=f"ev-{n}-1")


async def _seed(double: RunningDouble) -> tuple[int, int]:
    double.state.add_meter("api_calls", id="mtr_calls")
    double.state.add_price(GRADUATED)
    start, end = _period()
    double.state.add_subscription(CUS, ["price_calls"], (start, end))
    return start, end


async def test_preview_prices_the_period_like_the_pricing_engine(
        stripe_double: RunningDouble, client: StripeClient) -> None:
    start, end = await _seed(stripe_double)
    now = int(time.time())
    await _send(client, 1, 120, now - 60)
    await _send(client, 2, 31, max(start, now - 120))
    item = stripe_double.state.invoice_items.create(
        {"customer": CUS, "amount": 250, "currency": "usd", "description": "true-up"})
    got = await client.preview_invoice(CUS)
    assert got.currency == "usd" and got.period == (start, end) and not got.has_more
    [calls, extra] = got.lines
    assert (calls.price, calls.quantity, calls.invoice_item) == ("price_calls", 151, None)
    # the double prices independently; meterproxy's engine agrees: 100 + 100x2 + 51x0.5
    assert calls.amount == units_amount(price_from_stripe(GRADUATED), 151) == 326
    assert (extra.invoice_item, extra.amount, extra.price) == (item["id"], 250, None)
    assert got.total == 576


async def test_no_upcoming_invoice_is_a_rejection(stripe_double: RunningDouble,
                                                  client: StripeClient) -> None:
    with pytest.raises(StripeRejected):
        await client.preview_invoice("cus_without_subscription")


# ---- the cache: what consumers can make the proxy ask Stripe -----------------------------

class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


async def test_one_preview_per_customer_per_ttl_and_failures_remembered(
        stripe_double: RunningDouble, client: StripeClient) -> None:
    await _seed(stripe_double)
    clock = _Clock()
    cache = PreviewCache(client, ttl=60, max_entries=2, clock=clock)
    got = await asyncio.gather(*(cache.get(CUS) for _ in range(5)))
    assert cache.calls == 1 and all(g is got[0] for g in got)       # one call in flight
    clock.t = 59
    await cache.get(CUS)
    assert cache.calls == 1
    clock.t = 61
    await cache.get(CUS)
    assert cache.calls == 2
    why = await cache.get("cus_none")
    assert isinstance(why, str) and why.startswith("Stripe's invoice preview is unavailable")
    await cache.get("cus_none")
    assert cache.calls == 3                                        # the failure is remembered
    await cache.get("cus_other")                                   # evicts the oldest (CUS)
    assert len(stripe_double.state.calls("invoice_preview")) == 4
    await cache.get(CUS)
    assert cache.calls == 5


# ---- beside the local view (the usage report) --------------------------------------------

async def test_usage_report_shows_the_preview_and_explains_the_difference(
        tmp_path: Path, stripe_double: RunningDouble, client: StripeClient) -> None:
    await _seed(stripe_double)
    (tmp_path / "rules.yaml").write_text(RULES)
    rules = load_rules([tmp_path / "rules.yaml"])
    store = Store.open(tmp_path / "r.db")
    try:
        owners = SqliteStorage.on(store)
        cust, _ = await owners.customers.upsert("acme", CUS, None, None)
        now = time.time()
        for i in range(3):                            # 150 calls metered here ...
            fut = owners.usage.record(UsageRow(f"r{i}", now - 60, "acme", "k", "all", "v1",
                                               200, [UsageItem("api_calls", 50 * U, 0, 50 * U)]),
                                      wait=True)
            assert fut is not None
            await fut
        await owners.usage.materialize()
        await _send(client, 1, 120, int(now) - 60)    # ... 120 of them at Stripe so far
        prices = {"api_calls": price_from_stripe(GRADUATED)}
        report = await customer_report(owners.usage, rules, prices, cust, None, now,
                                       preview=await client.preview_invoice(CUS))
        inv = report["invoice_preview"]
        [line] = inv["lines"]
        assert (line["local_units"], line["stripe_units"]) == (150, 120)
        assert (line["local_amount"], line["stripe_amount"]) == ("3.25", "3.10")
        assert line["difference"] == "-0.15"
        assert "30 fewer units" in line["explanation"]
        assert inv["local_total"] == report["upcoming_invoice"]["total"] == "3.25"
        failed = await customer_report(owners.usage, rules, prices, cust, None, now,
                                       preview="Stripe's invoice preview is unavailable: x")
        assert failed["invoice_preview"] == {
            "error": "Stripe's invoice preview is unavailable: x"}
    finally:
        store.close()


# ---- through a running proxy: the usage page's JSON ----------------------------------------

E2E_RULES = """\
version: 1
meters:
  api_calls: {stripe_event_name: api_calls, price_id: price_calls}
rules:
  - name: all
    match: {path: "/**"}
    usage:
      - {meter: api_calls, quantity: 1}
"""


async def test_the_usage_page_shows_stripe_s_preview_beside_the_local_view(
        make_proxy: ProxyFactory, stripe_double: RunningDouble) -> None:
    await _seed(stripe_double)
    p = await make_proxy(rules_text=E2E_RULES, stripe={
        "api_key": TEST_API_KEY, "sink": "meter_events", "api_base": stripe_double.url,
        "meter_events_base": stripe_double.url, "flush_interval": "50ms", "timeout": "5s"})
    key = await p.customer_with_key("acme", stripe_customer_id=CUS)
    auth = {"Authorization": f"Bearer {key}"}
    for _ in range(3):
        async with p.session.get(p.url + "/v1/items", headers=auth) as r:
            assert r.status == 200
    await wait_until(lambda: stripe_double.state.totals(CUS, "api_calls") == 3,
                     what="the usage delivered to Stripe")
    stripe_double.state.invoice_items.create(
        {"customer": CUS, "amount": 700, "currency": "usd", "description": "true-up"})

    async def usage() -> dict[str, Any]:
        async with p.session.get(p.url + "/_meter/usage", headers=auth) as r:
            assert r.status == 200
            body: dict[str, Any] = await r.json()
            return body

    report = await usage()
    inv = report["invoice_preview"]
    [line] = inv["lines"]
    assert (line["meter"], line["price"], line["local_units"], line["stripe_units"]) == (
        "api_calls", "price_calls", 3, 3)
    assert line["explanation"] == "matches" and line["difference"] == "0.00"
    [other] = inv["other_lines"]
    assert other["amount"] == "7.00" and "invoice item" in other["explanation"]
    assert (inv["local_total"], inv["stripe_total"], inv["difference"]) == (
        "1.06", "8.06", "7.00")                       # 100 + 3 x 2 cents; the item is extra
    validate_response("GET", "/_meter/usage", 200, "application/json", orjson.dumps(report))
    await usage()
    assert len(stripe_double.state.calls("invoice_preview")) == 1      # once a minute at most


async def test_a_customer_in_another_currency_sees_its_currency_option(
        tmp_path: Path, stripe_double: RunningDouble, client: StripeClient) -> None:
    """``currency_options``: a customer charged in EUR (its subscription's currency) sees the
    price's EUR amounts, and the local view agrees with Stripe's EUR preview to the cent."""
    eur_tiers = [{"up_to": 100, "unit_amount_decimal": "1.8", "flat_amount_decimal": "90"},
                 {"up_to": None, "unit_amount_decimal": "0.45"}]
    stripe_double.state.add_meter("api_calls", id="mtr_calls")
    stripe_double.state.add_price({**GRADUATED,
                                   "currency_options": {"eur": {"tiers": eur_tiers}}})
    start, end = _period()
    stripe_double.state.add_subscription(CUS, ["price_calls"], (start, end), currency="eur")
    # the price as the proxy fetches it (tiers and currency_options expanded)
    price = price_from_stripe(await client.retrieve_price("price_calls"))
    assert price.in_currency("eur").tiers[0].flat_amount_decimal == Decimal(90)
    (tmp_path / "rules.yaml").write_text(RULES)
    rules = load_rules([tmp_path / "rules.yaml"])
    store = Store.open(tmp_path / "r.db")
    try:
        owners = SqliteStorage.on(store)
        await owners.customers.upsert("acme", CUS, None, None)
        assert await owners.customers.set_currency("acme", "eur")
        cust = await owners.customers.get("acme")
        assert cust is not None
        now = time.time()
        fut = owners.usage.record(UsageRow("r1", now - 60, "acme", "k", "all", "v1", 200,
                                           [UsageItem("api_calls", 150 * U, 0, 150 * U)]),
                                  wait=True)
        assert fut is not None
        await fut
        await owners.usage.materialize()
        await _send(client, 1, 150, int(now) - 60)
        preview = await client.preview_invoice(CUS)
        assert (preview.currency, preview.total) == ("eur", 90 + 180 + 23)
        report = await customer_report(owners.usage, rules, {"api_calls": price}, cust, None,
                                       now, preview=preview)
        assert report["currency"] == "eur"
        assert report["upcoming_invoice"]["total"] == "2.93"
        [line] = report["invoice_preview"]["lines"]
        assert (line["local_amount"], line["stripe_amount"], line["difference"]) == \
            ("2.93", "2.93", "0.00")
        shown = report["prices"]["api_calls"]              # the price as the page shows it
        assert (shown["currency"], shown["tiers"][0]["flat_amount_decimal"]) == ("eur", "90")
    finally:
        store.close()


# ---- a preview of more than one page of lines ----------------------------------------------

OTHER = 10          # prices on the subscription before price_calls: its line is the 11th


async def _seed_long(double: RunningDouble, items: int = 0) -> tuple[int, int]:
    """A subscription of ``OTHER`` flat per-unit prices (meters nobody reports to) and then
    price_calls, plus ``items`` pending invoice items: price_calls' line is on page 2."""
    start, end = _period()
    double.state.add_meter("api_calls", id="mtr_calls")
    double.state.add_price(GRADUATED)
    for i in range(OTHER):
        double.state.add_meter(f"other_{i}", id=f"mtr_other_{i}")
        double.state.add_price({"id": f"price_other_{i}", "currency": "usd",
                                "unit_amount_decimal": "1", "recurring": {"meter": f"mtr_other_{i}"}})
    double.state.add_subscription(CUS, [f"price_other_{i}" for i in range(OTHER)] + ["price_calls"],
                                  (start, end))
    for i in range(items):
        double.state.invoice_items.create(
            {"customer": CUS, "amount": 100 + i, "currency": "usd", "description": f"item {i}"})
    return start, end


async def test_the_double_embeds_ten_lines_and_pages_the_rest_like_stripe(
        stripe_double: RunningDouble) -> None:
    """``create_preview`` embeds the first 10 lines (``lines.has_more``, ``lines.url`` the
    preview's ``/v1/invoices/upcoming_in_.../lines``); that endpoint pages the rest."""
    await _seed_long(stripe_double, items=4)
    inv = double_preview(stripe_double.state, {"customer": CUS})
    assert inv["id"].startswith("upcoming_in_")
    assert len(inv["lines"]["data"]) == 10 and inv["lines"]["has_more"] is True
    assert inv["lines"]["url"] == f"/v1/invoices/{inv['id']}/lines"
    auth = {"Authorization": f"Bearer {TEST_API_KEY}", "Stripe-Version": stripe.api_version}
    async with aiohttp.ClientSession() as s:
        after = inv["lines"]["data"][-1]["id"]
        async with s.get(f"{stripe_double.url}{inv['lines']['url']}",
                         params={"limit": "3", "starting_after": after}, headers=auth) as r:
            page = await r.json()
        assert r.status == 200 and page["object"] == "list" and page["has_more"] is True
        assert [ln["pricing"]["price_details"]["price"] for ln in page["data"][:1]] == ["price_calls"]
        async with s.get(f"{stripe_double.url}/v1/invoices/upcoming_in_nope/lines",
                         headers=auth) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "resource_missing"


async def test_preview_reads_every_page_of_lines(stripe_double: RunningDouble,
                                                 client: StripeClient) -> None:
    await _seed_long(stripe_double, items=4)
    await _send(client, 1, 7, int(time.time()) - 60)
    got = await client.preview_invoice(CUS)
    assert not got.has_more and len(got.lines) == OTHER + 1 + 4
    [calls] = [ln for ln in got.lines if ln.price == "price_calls"]
    assert (calls.quantity, calls.amount) == (7, 100 + 7 * 2)
    assert sorted(ln.amount for ln in got.lines if ln.invoice_item) == [100, 101, 102, 103]
    assert len(stripe_double.state.calls("invoice_lines")) == 1        # 100 lines a page
    assert sum(ln.amount for ln in got.lines) == got.total


async def test_a_preview_longer_than_the_page_bound_is_said_to_be_incomplete(
        stripe_double: RunningDouble, client: StripeClient) -> None:
    """Past ``max_pages`` further pages the preview is incomplete, and a meter whose line was
    not read is not said to be missing from Stripe's invoice."""
    await _seed_long(stripe_double, items=4)
    got = await client.preview_invoice(CUS, page_size=2, max_pages=2)    # 10 + 2 + 2 read
    assert got.has_more and len(got.lines) == 14
    assert len(stripe_double.state.calls("invoice_lines")) == 2
    out = compare({"a": (3, 300)}, {"a": "price_not_read"}, got)
    [line] = out["lines"]
    assert out["complete"] is False and "more lines than the 14 read" in out["note"]
    assert not line["explanation"].startswith("not on Stripe's invoice")
    assert "first 14 lines" in line["explanation"]


async def test_the_usage_page_finds_a_meter_on_the_second_page_of_lines(
        make_proxy: ProxyFactory, stripe_double: RunningDouble) -> None:
    await _seed_long(stripe_double, items=2)
    p = await make_proxy(rules_text=E2E_RULES, stripe={
        "api_key": TEST_API_KEY, "sink": "meter_events", "api_base": stripe_double.url,
        "meter_events_base": stripe_double.url, "flush_interval": "50ms", "timeout": "5s"})
    key = await p.customer_with_key("acme", stripe_customer_id=CUS)
    auth = {"Authorization": f"Bearer {key}"}
    for _ in range(3):
        async with p.session.get(p.url + "/v1/items", headers=auth) as r:
            assert r.status == 200
    await wait_until(lambda: stripe_double.state.totals(CUS, "api_calls") == 3,
                     what="the usage delivered to Stripe")
    async with p.session.get(p.url + "/_meter/usage", headers=auth) as r:
        assert r.status == 200
        report = await r.json()
    inv = report["invoice_preview"]
    [line] = inv["lines"]
    assert (line["price"], line["local_units"], line["stripe_units"]) == ("price_calls", 3, 3)
    assert line["explanation"] == "matches"
    assert inv["complete"] is True and "note" not in inv and len(inv["other_lines"]) == OTHER + 2
    validate_response("GET", "/_meter/usage", 200, "application/json", orjson.dumps(report))


# ---- several local customers on one Stripe customer ----------------------------------------

async def test_a_shared_stripe_customer_s_preview_shows_no_other_customer_s_numbers(
        make_proxy: ProxyFactory, stripe_double: RunningDouble) -> None:
    """team-a and team-b are billed to one Stripe customer: Stripe's preview is of their
    combined invoice, so team-a's page shows none of it (no combined units or amounts, no
    team-b true-up, no false "more units at Stripe"), says why, and Stripe is not asked."""
    await _seed(stripe_double)
    p = await make_proxy(rules_text=E2E_RULES, stripe={
        "api_key": TEST_API_KEY, "sink": "meter_events", "api_base": stripe_double.url,
        "meter_events_base": stripe_double.url, "flush_interval": "50ms", "timeout": "5s"})
    key_a = await p.customer_with_key("team-a", stripe_customer_id=CUS)
    key_b = await p.customer_with_key("team-b", stripe_customer_id=CUS)
    for key, n in ((key_a, 3), (key_b, 5)):
        for _ in range(n):
            async with p.session.get(p.url + "/v1/items",
                                     headers={"Authorization": f"Bearer {key}"}) as r:
                assert r.status == 200
    await wait_until(lambda: stripe_double.state.totals(CUS, "api_calls") == 8,
                     what="both teams' usage delivered to Stripe")
    stripe_double.state.invoice_items.create(
        {"customer": CUS, "amount": 4321, "currency": "usd",
         "description": "team-b minimum commitment true-up"})

    async def usage(key: str) -> dict[str, Any]:
        async with p.session.get(p.url + "/_meter/usage",
                                 headers={"Authorization": f"Bearer {key}"}) as r:
            assert r.status == 200
            body: dict[str, Any] = await r.json()
            return body

    report = await usage(key_a)
    inv = report["invoice_preview"]
    assert inv["billed_together"] is True
    assert "billed together with other accounts" in inv["note"]
    assert set(inv) == {"billed_together", "note"}
    raw = orjson.dumps(report).decode()
    for leak in ("team-b", "true-up", "43.21", "4321", "more units"):
        assert leak not in raw, leak
    [line] = report["upcoming_invoice"]["lines"]                       # team-a's own: 3 calls
    assert report["meters"]["api_calls"]["billable"] == "3"
    assert line["amount"] == "1.06"
    assert (await usage(key_b))["invoice_preview"]["billed_together"] is True
    assert stripe_double.state.calls("invoice_preview") == []
    validate_response("GET", "/_meter/usage", 200, "application/json", orjson.dumps(report))
    # the page's own script: the note in place of the table
    shown = stripe_preview_note(inv)
    assert shown == {"table": False, "text": inv["note"]}


def stripe_preview_note(pv: dict[str, Any]) -> dict[str, Any]:
    """What the usage page's ``stripePreviewNote`` (run in Node.js) makes of
    ``invoice_preview``."""
    from tests.test_usage_page import page_functions, require_node
    node = require_node()
    html = (ROOT / "proxy" / "static" / "usage.html").read_text()
    script = (page_functions(html, "stripePreviewNote")
              + "\nconst pv = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
              + "\nprocess.stdout.write(JSON.stringify(stripePreviewNote(pv)));")
    done = subprocess.run([node, "-e", script], input=orjson.dumps(pv), capture_output=True,
                          check=True, timeout=30)
    return dict(orjson.loads(done.stdout))


def test_the_page_says_when_stripe_s_preview_was_not_read_to_the_end() -> None:
    complete = stripe_preview_note({"complete": True, "lines": []})
    assert complete["table"] is True and "more lines" not in complete["text"]
    cut = stripe_preview_note({"complete": False, "lines": [],
                               "note": "Stripe's preview has more lines than the 1010 read;"
                                       " Stripe's total and the differences cover only those."})
    assert cut["table"] is True and cut["text"].endswith("cover only those.")
    assert stripe_preview_note({"error": "unavailable: x"}) == {"table": False,
                                                                "text": "unavailable: x"}
