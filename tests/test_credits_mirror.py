"""The monetary credits mode end to end (issue 12, finding 2): the real proxy, its store and
flusher, the real ``stripe`` SDK and the Stripe double.

Finding 2: with unit credits a graduated price (1M units at 0.0002 cents plus a $5.00 flat
fee, then 0.0001 cents) bills 3M units 900 cents, but once 2M are covered by credits the
1M uncovered units are priced from tier 1 again: 700 cents. In the monetary mode every unit
is reported, Stripe prices the whole period (900 cents), the local burns sum to exactly
that line, and the credits (mirrored as a Stripe credit grant) come off the invoice: the
customer pays 900 cents minus its credits. A volume price (150 units at 20 cents, the tier
of the total) likewise burns 3000 cents, never 25 cents a unit for the last 50.

Also here: the mirror's crash and retry cases (Stripe faults before and after it stores a
grant, a process that stops between the local grant and its mirror), and the balance check.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy import metrics
from proxy.config import CreditsConfig
from proxy.credits.mirror import MonetaryService
from proxy.credits.monetary import FINALIZATION_GRACE, replay
from proxy.credits.money import MoneyBook
from proxy.credits.service import CreditService, load_book
from proxy.periods import period_bounds
from proxy.pricing import line_amount, price_from_stripe
from proxy.store.db import Store
from proxy.store.keys import KeyCache
from proxy.store.protocols import LedgerEntry
from proxy.store.sqlite import SqliteStorage
from proxy.stripe.client import InvoicePreview, StripeClient
from proxy.units import QSCALE
from tests.conftest import Proxy, ProxyFactory
from tests.helpers import wait_until
from tests.stripe_double.fixture import TEST_API_KEY, RunningDouble

CUS = "cus_acme"
GRADUATED = {"id": "price_calls", "currency": "usd", "billing_scheme": "tiered",
             "tiers_mode": "graduated", "recurring": {"meter": "mtr_calls"},
             "tiers": [{"up_to": 1_000_000, "unit_amount_decimal": "0.0002",
                        "flat_amount_decimal": "500"},
                       {"up_to": None, "unit_amount_decimal": "0.0001"}]}
VOLUME = {"id": "price_calls", "currency": "usd", "billing_scheme": "tiered",
          "tiers_mode": "volume", "recurring": {"meter": "mtr_calls"},
          "tiers": [{"up_to": 100, "unit_amount_decimal": "25"},
                    {"up_to": None, "unit_amount_decimal": "20"}]}
RULES = """\
version: 1
meters:
  api_calls: {stripe_event_name: api_calls, price_id: price_calls}
rules:
  - name: calls
    match: {path: "/**"}
    usage:
      - {meter: api_calls, quantity: request.header.x-units}
"""


def _stripe(double: RunningDouble, flush: str = "1h") -> dict[str, Any]:
    return {"api_key": TEST_API_KEY, "sink": "meter_events", "api_base": double.url,
            "meter_events_base": double.url, "flush_interval": flush, "timeout": "5s"}


def _seed(double: RunningDouble, price: dict[str, Any]) -> None:
    double.state.add_meter("api_calls", id="mtr_calls")
    double.state.add_price(price)
    double.state.add_subscription(CUS, ["price_calls"], period_bounds(None, time.time()))


async def _monetary_proxy(make_proxy: ProxyFactory, double: RunningDouble,
                          price: dict[str, Any], **credits: Any) -> tuple[Proxy, str]:
    _seed(double, price)
    p = await make_proxy(rules_text=RULES, stripe=_stripe(double),
                         credits={"mode": "monetary", **credits})
    key = await p.customer_with_key("acme", stripe_customer_id=CUS)
    return p, key


async def _units_customer(make_proxy: ProxyFactory, double: RunningDouble,
                          **overrides: Any) -> tuple[Proxy, str, MoneyBook]:
    """A proxy in the default (units) credits mode with customer acme on the volume price,
    its price fetched: the customer the monetary-switch tests switch."""
    _seed(double, VOLUME)
    p = await make_proxy(rules_text=RULES, stripe=_stripe(double), **overrides)
    key = await p.customer_with_key("acme", stripe_customer_id=CUS)
    money = p.server.monetary.money                              # type: ignore[union-attr]
    await wait_until(lambda: "api_calls" in p.server.rt.prices(), what="the price fetched")
    return p, key, money


@contextlib.asynccontextmanager
async def _socket_open(p: Proxy, key: str, units: int) -> AsyncIterator[None]:
    """A WebSocket of the customer's, open (its units settled when it closes): a request
    in flight for as long as the block runs."""
    async with p.session.ws_connect(p.url + "/ws", headers={
            "Authorization": f"Bearer {key}", "X-Units": str(units)}) as ws:
        await ws.send_str("hi")
        assert (await ws.receive()).data == "echo:hi"
        yield


async def _switch_under_way(p: Proxy, money: MoneyBook) -> asyncio.Future[Any]:
    """Switch acme to the monetary mode through the admin API and return once its account's
    opening is under way (waiting for its rows in a batched group commit): the admin call,
    still running."""
    switch = asyncio.ensure_future(p.admin(
        "POST", "/admin/customers", {"id": "acme", "credit_mode": "monetary"}, expect=200))
    await wait_until(lambda: "acme" in money.opening, what="the opening under way")
    return switch


async def _call(p: Proxy, key: str, units: int) -> int:
    async with p.session.get(p.url + "/v1/items", headers={
            "Authorization": f"Bearer {key}", "X-Units": str(units)}) as r:
        await r.read()
        return r.status


def _burned(p: Proxy) -> int:
    """Minor units the period's usage burned, covered or not, from the money book."""
    acct = p.server.monetary.money.account("acme")      # type: ignore[union-attr]
    assert acct is not None
    return acct.burned(time.time())


async def _preview(double: RunningDouble) -> InvoicePreview:
    client = StripeClient(TEST_API_KEY, api_base=double.url)
    try:
        return await client.preview_invoice(CUS)
    finally:
        await client.close()


async def _usage_page(p: Proxy, key: str) -> dict[str, Any]:
    async with p.session.get(p.url + "/_meter/usage",
                             headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200
        body: dict[str, Any] = await r.json()
        return body


async def _mirrored(p: Proxy, n: int) -> list[dict[str, Any]]:
    async def done() -> list[dict[str, Any]] | None:
        rows: list[dict[str, Any]] = (await p.admin(
            "GET", "/admin/credits/mirrors?customer_id=acme", expect=200))["mirrors"]
        return rows if len(rows) == n and all(r["status"] == "mirrored" for r in rows) \
            else None
    got = await wait_until(done, what=f"{n} grant(s) mirrored to Stripe")
    assert got is not None
    return got


async def test_finding_2_graduated_credits_come_off_stripe_s_price_of_the_whole_period(
        make_proxy: ProxyFactory, stripe_double: RunningDouble) -> None:
    p, key = await _monetary_proxy(make_proxy, stripe_double, GRADUATED)
    grant = await p.admin("POST", "/admin/customers/acme/grants", {"credits": "4"}, expect=201)
    [mirror] = await _mirrored(p, 1)
    [sg] = stripe_double.state.credit_grants.grants.values()
    assert (sg.value, sg.currency, sg.category, sg.priority, sg.scope) == (
        400, "usd", "promotional", 50, {"price_type": "metered"})
    assert sg.metadata == {"meterproxy_grant": grant["grant_id"]} and \
        mirror["stripe_grant_id"] == sg.id

    # 1M first (the flat fee and tier 1: 700 cents, 400 of it covered), then 2M more at
    # once, concurrently: together they burn exactly what tier 2 adds (200 cents)
    assert await _call(p, key, 1_000_000) == 200
    assert _burned(p) == 700
    assert await asyncio.gather(_call(p, key, 1_000_000), _call(p, key, 1_000_000)) == [200, 200]
    assert _burned(p) == 900 == line_amount(price_from_stripe(GRADUATED), 3_000_000 * QSCALE)

    # every unit is reported: Stripe's meter sums 3M, not the 1M the credits left over
    await p.admin("POST", "/admin/flush", expect=200)
    assert stripe_double.state.totals(CUS, "api_calls") == 3_000_000
    preview = await _preview(stripe_double)
    [line] = preview.lines
    assert (line.quantity, line.amount, preview.credits, preview.total) == (
        3_000_000, 900, 400, 500)                   # pays 900 cents minus its 4.00 credits

    detail = await p.admin("GET", "/admin/customers/acme", expect=200)
    assert detail["credit_mode"] is None            # the configured default: monetary
    assert detail["credits"]["money"] == {
        "mode": "monetary", "currency": "usd", "balance": "0.00", "period_burned": "9.00",
        "period_covered_by_credits": "4.00"}
    page = await _usage_page(p, key)
    assert page["upcoming_invoice"]["total"] == "9.00"
    assert (page["upcoming_invoice"]["credits_applied"],
            page["upcoming_invoice"]["amount_due"]) == ("4.00", "5.00")
    assert page["credits"]["money"]["balance_text"] == "$0.00"
    inv = page["invoice_preview"]
    assert (inv["local_total"], inv["stripe_total"], inv["difference"]) == ("9.00", "9.00",
                                                                           "0.00")
    assert inv["credits"] == {"local": "4.00", "stripe": "4.00", "difference": "0.00",
                              "difference_minor": 0, "local_amount_due": "5.00",
                              "stripe_amount_due": "5.00", "explanation": "matches"}

    [check] = (await p.admin("POST", "/admin/credits/balance-check",
                             {"customer_id": "acme"}, expect=200))["checks"]
    assert (check["expected"], check["stripe"], check["difference"]) == (400, 400, 0)
    assert (check["local_balance"], check["period_covered"], check["period_burned"]) == (
        0, 400, 900)
    await p.admin("POST", "/admin/credits/balance-check", {}, expect=200)
    assert metrics.credit_balance_mismatch._value.get() == 0


async def test_a_volume_price_burns_the_tier_of_the_total(
        make_proxy: ProxyFactory, stripe_double: RunningDouble) -> None:
    """150 units on a volume price are 20 cents each: the last 50 burn 500 cents (3000 -
    2500), where unit credits would bill them 25 cents each at Stripe."""
    p, key = await _monetary_proxy(make_proxy, stripe_double, VOLUME)
    await p.customer_with_key("bob")                        # monetary too (the default)
    err = await p.admin("POST", "/admin/customers/bob/grants", {"credits": "0.001"},
                        expect=400)                         # money: whole cents only
    assert "minor unit" in err["error"]["message"]
    got = await p.admin("POST", "/admin/customers/bob/grants", {"credits": "1.005"},
                        expect=201)
    assert got["credits"] == "1"                            # rounded down to the cent
    await p.admin("POST", "/admin/customers/acme/grants", {"credits": "100"}, expect=201)
    assert await _call(p, key, 100) == 200
    before = (await p.admin("GET", "/admin/customers/acme/grants", expect=200))["balance"]
    assert before == "75"                                   # 100 x 25 cents
    assert await _call(p, key, 50) == 200
    after = (await p.admin("GET", "/admin/customers/acme/grants", expect=200))["balance"]
    assert after == "70" and _burned(p) == 3000             # 150 x 20 cents in all
    await _mirrored(p, 1)
    await p.admin("POST", "/admin/flush", expect=200)
    preview = await _preview(stripe_double)
    assert (preview.lines[0].amount, preview.credits, preview.total) == (3000, 3000, 0)


async def test_a_block_customer_is_refused_the_money_its_reservation_would_burn(
        make_proxy: ProxyFactory, stripe_double: RunningDouble) -> None:
    """``overage: block``: admission holds the marginal price of the reservation (the
    rules' estimate when the quantity is only known later); 402 when it does not fit."""
    _seed(stripe_double, VOLUME)
    rules = RULES.replace("quantity: request.header.x-units}", "quantity: 10}")
    p = await make_proxy(rules_text=rules, stripe=_stripe(stripe_double),
                         credits={"mode": "monetary"})
    key = await p.customer_with_key("acme", stripe_customer_id=CUS, overage="block")
    assert await _call(p, key, 0) == 402                    # no credits at all
    await p.admin("POST", "/admin/customers/acme/grants", {"credits": "5"}, expect=201)
    assert await _call(p, key, 0) == 200                    # 10 x 25 cents = 2.50
    assert await _call(p, key, 0) == 200                    # 2.50 more: 0 left
    async with p.session.get(p.url + "/v1/items", headers={"Authorization": f"Bearer {key}"}
                             ) as r:
        body = await r.json()
        assert r.status == 402 and body["error"]["required"] == "2.5"


async def test_a_block_customer_s_hint_is_held_in_money(
        make_proxy: ProxyFactory, stripe_double: RunningDouble) -> None:
    """A ``reserve_from`` hint raises the hold to the money its quantity would burn (the
    usage's ``credits:`` rate only enables the hint and the learning: its value is not
    used in the monetary mode)."""
    _seed(stripe_double, VOLUME)
    rules = RULES.replace("quantity: request.header.x-units}",
                          "quantity: request.header.x-units, credits: 1, estimate: 1,"
                          " reserve_from: request.header.x-max}")
    p = await make_proxy(rules_text=rules, stripe=_stripe(stripe_double),
                         credits={"mode": "monetary"})
    key = await p.customer_with_key("acme", stripe_customer_id=CUS, overage="block")
    await p.admin("POST", "/admin/customers/acme/grants", {"credits": "5"}, expect=201)

    async def call(units: int, most: int) -> tuple[int, dict[str, Any]]:
        async with p.session.get(p.url + "/v1/items", headers={
                "Authorization": f"Bearer {key}", "X-Units": str(units),
                "X-Max": str(most)}) as r:
            return r.status, await r.json(content_type=None)

    status, body = await call(2, 30)                   # 30 x 25 cents = 7.50 > 5.00
    assert status == 402 and body["error"]["required"] == "7.5"
    assert (await call(2, 20))[0] == 200                # 20 x 25 cents = 5.00 fits
    assert _burned(p) == 50                             # the 2 units measured


async def test_credit_mode_per_customer_overrides_the_default(
        make_proxy: ProxyFactory, stripe_double: RunningDouble) -> None:
    _seed(stripe_double, GRADUATED)
    p = await make_proxy(rules_text=RULES, stripe=_stripe(stripe_double))   # default: units
    key = await p.customer_with_key("acme", stripe_customer_id=CUS)
    money = p.server.monetary.money                              # type: ignore[union-attr]
    assert money.account("acme") is None and not money.active
    await wait_until(lambda: "api_calls" in p.server.rt.prices(), what="the price fetched")
    cust = await p.admin("POST", "/admin/customers", {"id": "acme", "credit_mode": "monetary"},
                         expect=200)
    assert cust["credit_mode"] == "monetary" and money.account("acme") is not None
    # a currency the price has no option for: refused before anything is written
    err = await p.admin("POST", "/admin/customers",
                        {"id": "euro", "currency": "eur", "credit_mode": "monetary"}, expect=409)
    assert "eur" in err["error"]["message"].lower()
    assert "euro" not in {c["id"] for c in await p.admin("GET", "/admin/customers")}
    assert await _call(p, key, 1_000_000) == 200
    assert _burned(p) == 700
    # while a customer is monetary, rules that leave a meter unpriced are refused on reload
    from proxy.app import reload_rules
    (p.tmp / "rules.yaml").write_text(RULES.replace(", price_id: price_calls", ""))
    assert await reload_rules(p.server.rt) is False
    assert "has no Stripe price" in (p.server.rt.rules_error or "")
    err = await p.admin("POST", "/admin/customers", {"id": "acme", "credit_mode": "cash"},
                        expect=400)
    assert "credit_mode" in err["error"]["message"]
    await p.admin("POST", "/admin/customers", {"id": "acme", "credit_mode": None}, expect=200)
    assert money.account("acme") is None
    assert await reload_rules(p.server.rt) is True      # no monetary customer left
    err = await p.admin("POST", "/admin/customers", {"id": "acme", "credit_mode": "monetary"},
                        expect=409)
    assert "has no Stripe price" in err["error"]["message"]


@pytest.mark.parametrize("storage", [{"durability": "strict"},
                                     {"durability": "batched", "commit_interval": "300ms"}])
async def test_an_account_opened_while_the_customer_sends_requests_counts_every_unit(
        make_proxy: ProxyFactory, stripe_double: RunningDouble,
        storage: dict[str, str]) -> None:
    """A customer switched to the monetary mode while its requests flow: the account opens
    from the ledger, and a request settled while the opening read it (in the unit mode, no
    account yet) was in neither the reads nor the account, which then stayed short of it for
    the rest of the period: a volume price burned at the wrong tier (2.50 instead of 6.00 in
    a review's reproduction). The customer's settlements now wait for the opening and are
    made in the monetary mode after it: every request is served (no refusal), and the
    account holds every unit the customer was served, before and after the switch
    (``batched``: those still waiting in the group commit, uncommitted, too)."""
    p, key, money = await _units_customer(make_proxy, stripe_double, storage=storage)
    served = 0
    switched_at: int | None = None
    stop = asyncio.Event()

    async def client() -> None:
        nonlocal served
        while not stop.is_set():
            async with p.session.get(p.url + "/v1/items", headers={
                    "Authorization": f"Bearer {key}", "X-Units": "1"}) as r:
                body = await r.read()
                assert r.status == 200, body
                served += 1

    async def switch() -> None:
        nonlocal switched_at
        await wait_until(lambda: served >= 60, what="traffic before the switch")
        await p.admin("POST", "/admin/customers", {"id": "acme", "credit_mode": "monetary"},
                      expect=200)
        switched_at = served
        await wait_until(lambda: served >= switched_at + 40, what="traffic after the switch")
        stop.set()

    await asyncio.gather(switch(), *(client() for _ in range(4)))
    acct = money.account("acme")
    assert acct is not None and switched_at is not None
    mp = acct.meters["api_calls"]
    assert mp.total == served * QSCALE, (mp.total // QSCALE, served)
    price = p.server.rt.prices()["api_calls"]
    assert mp.charged == replay(price, [QSCALE] * served)[1]


async def test_an_account_opens_while_a_request_of_the_customer_is_in_flight(
        make_proxy: ProxyFactory, stripe_double: RunningDouble) -> None:
    """A request of the customer in flight when its account opens (a WebSocket here: settled
    when it closes) does not hold the opening back: the account opens at once, the customer
    is served meanwhile, and the session's units, settled after the opening, are in the
    account (the opening used to wait for it, then defer the switch and refuse the customer
    for two seconds every 30 for as long as the socket stayed open)."""
    p, key, money = await _units_customer(make_proxy, stripe_double)
    async with _socket_open(p, key, 3):
        await p.admin("POST", "/admin/customers", {"id": "acme", "credit_mode": "monetary"},
                      expect=200)
        acct = money.account("acme")
        assert acct is not None                         # opened with the socket open
        assert await _call(p, key, 1) == 200
        assert acct.meters["api_calls"].total == 1 * QSCALE
    await wait_until(lambda: acct.meters["api_calls"].total == 4 * QSCALE,
                     what="the socket's units settled in the account")
    assert money.account("acme") is acct and not money.opening


async def test_settlements_during_the_opening_wait_for_it_and_land_in_the_account(
        make_proxy: ProxyFactory, stripe_double: RunningDouble) -> None:
    """The opening reads the ledger once the customer's rows settled before it are committed
    (a ``batched`` group commit holds them up to ``commit_interval``). A request settled
    meanwhile is served at once; its settlement waits for the opening (queued, in order)
    and is made in the monetary mode after it: the account holds both requests' units, and
    the volume price burned the tier of their total."""
    p, key, money = await _units_customer(
        make_proxy, stripe_double, storage={"durability": "batched", "commit_interval": "2s"})
    store = p.server.rt.store
    assert await _call(p, key, 2) == 200
    assert store.pending_for("acme")                    # waiting in the group commit
    switch = await _switch_under_way(p, money)
    assert await _call(p, key, 3) == 200                # served during the opening
    assert len(money.opening["acme"].waiting) == 1 and money.account("acme") is None
    await switch
    acct = money.account("acme")
    assert acct is not None and not money.opening
    mp = acct.meters["api_calls"]
    assert mp.total == 5 * QSCALE
    assert mp.charged == replay(p.server.rt.prices()["api_calls"], [2 * QSCALE, 3 * QSCALE])[1]


async def test_a_settlement_waiting_for_the_opening_keeps_its_credit_hold(
        make_proxy: ProxyFactory, stripe_double: RunningDouble) -> None:
    """A request whose settlement waits for the opening has ended (its response sent), but
    its credit hold must stay held until the settlement is made: released at the request's
    end, a block customer's next request was admitted against credits already spent (both
    then settled, the second as debt), and a grant could expire under it."""
    _seed(stripe_double, VOLUME)
    p = await make_proxy(rules_text=RULES.replace("quantity: request.header.x-units}",
                                                  "quantity: 1, credits: 1}"),
                         stripe=_stripe(stripe_double),
                         storage={"durability": "batched", "commit_interval": "2s"})
    key = await p.customer_with_key("acme", stripe_customer_id=CUS, overage="block")
    await p.admin("POST", "/admin/customers/acme/grants",
                  {"credits": "2", "idempotency_key": "g-1"}, expect=201)
    money = p.server.monetary.money                              # type: ignore[union-attr]
    await wait_until(lambda: "api_calls" in p.server.rt.prices(), what="the price fetched")
    assert await _call(p, key, 1) == 200                # 1 credit spent; its row waits
    switch = await _switch_under_way(p, money)
    assert await _call(p, key, 1) == 200                # holds the last credit, settles later
    assert len(money.opening["acme"].waiting) == 1
    assert await _call(p, key, 1) == 402                # that credit is still held
    await switch
    acct = money.account("acme")
    assert acct is not None and acct.meters["api_calls"].total == 2 * QSCALE
    book = p.server.pipeline.admission.book
    assert book is not None and book.debt("acme") == 0 and book.held("acme") == 0


async def test_an_opening_with_too_many_settlements_waiting_is_deferred_then_opens(
        make_proxy: ProxyFactory, stripe_double: RunningDouble,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Past ``max_waiting`` (the store's ``max_pending_rows``) settlements a further one is
    made at once, in the unit mode, while the opening still reads: the opening does not
    open from reads that may miss it; it is deferred (the waiting ones made in the unit
    mode) and tried again, and the account then holds every unit."""
    from proxy.credits import mirror as mirror_mod
    monkeypatch.setattr(mirror_mod, "OPEN_RETRY", 1.0)
    p, key, money = await _units_customer(
        make_proxy, stripe_double, storage={"durability": "batched", "commit_interval": "2s"})
    p.server.monetary.max_waiting = 1                            # type: ignore[union-attr]
    assert await _call(p, key, 1) == 200
    switch = await _switch_under_way(p, money)
    assert await _call(p, key, 2) == 200                # waits
    assert await _call(p, key, 3) == 200                # one too many: made at once
    assert money.opening["acme"].spoiled
    await switch
    assert money.account("acme") is None and not money.opening      # deferred
    await wait_until(lambda: money.account("acme") is not None, timeout=15,
                     what="the account opened on the retry")
    acct = money.account("acme")
    assert acct is not None and acct.meters["api_calls"].total == 6 * QSCALE


async def test_a_customer_switched_back_while_its_account_waits_to_open_ends_without_one(
        make_proxy: ProxyFactory, stripe_double: RunningDouble) -> None:
    """The opening waits for the customer's rows in the group commit; a second switch (back
    to units) meanwhile runs its sync after that one (one at a time): it closes the account
    the first opened. Concurrently, the second found no account to close and the first then
    opened one that stayed open, for a customer in the unit mode."""
    p, key, money = await _units_customer(
        make_proxy, stripe_double, storage={"durability": "batched", "commit_interval": "1s"})
    assert await _call(p, key, 1) == 200
    first = await _switch_under_way(p, money)
    second = asyncio.ensure_future(p.admin(
        "POST", "/admin/customers", {"id": "acme", "credit_mode": None}, expect=200))
    await asyncio.gather(first, second)
    assert money.account("acme") is None and not money.opening
    assert await _call(p, key, 1) == 200


@contextlib.asynccontextmanager
async def _monetary_run(cfg: Path, session: aiohttp.ClientSession
                        ) -> AsyncIterator[tuple[Any, Proxy]]:
    """One run of a monetary proxy on ``cfg`` (``_monetary_config``), shut down at the
    end: the restart tests start it twice on the same files."""
    from proxy import config as config_mod
    from proxy.app import start

    server = await start(config_mod.load(cfg))
    try:
        yield server, Proxy(server, session, cfg.parent)
    finally:
        await server.shutdown()


def _monetary_config(tmp_path: Path, upstream: str, double: RunningDouble,
                     price: dict[str, Any]) -> Path:
    from tests.conftest import write_config

    _seed(double, price)
    return write_config(tmp_path, upstream, RULES, stripe=_stripe(double),
                        credits={"mode": "monetary"})


async def test_a_restart_goes_on_from_the_period_so_far(
        tmp_path: Path, upstream: str, stripe_double: RunningDouble) -> None:
    """The account reopens with the period's total and what credits covered: the next 1M
    units burn tier 2's 100 cents, not the flat fee again."""
    cfg = _monetary_config(tmp_path, upstream, stripe_double, GRADUATED)
    async with aiohttp.ClientSession() as session:
        async with _monetary_run(cfg, session) as (_, p):
            key = await p.customer_with_key("acme", stripe_customer_id=CUS)
            await p.admin("POST", "/admin/customers/acme/grants", {"credits": "4"}, expect=201)
            assert await _call(p, key, 1_000_000) == 200
        async with _monetary_run(cfg, session) as (server, p):
            acct = server.monetary.money.account("acme")
            assert acct is not None
            assert (acct.burned(time.time()), acct.covered(time.time())) == (700, 400 * 10_000)
            assert await _call(p, key, 1_000_000) == 200
            assert _burned(p) == 800


async def test_a_restart_resumes_a_volume_price_from_what_was_burned(
        tmp_path: Path, upstream: str, stripe_double: RunningDouble) -> None:
    """Volume: 90 units burn 2250 cents, 20 more burn nothing (the line of 110 is 2200).
    After a restart the account resumes from the 2250 burned, not the 2200 line of its
    total, so 5 more units (line 2300) burn 50 cents, not 100."""
    cfg = _monetary_config(tmp_path, upstream, stripe_double, VOLUME)
    async with aiohttp.ClientSession() as session:
        async with _monetary_run(cfg, session) as (_, p):
            key = await p.customer_with_key("acme", stripe_customer_id=CUS)
            await p.admin("POST", "/admin/customers/acme/grants", {"credits": "100"},
                          expect=201)
            assert [await _call(p, key, 90), await _call(p, key, 20)] == [200, 200]
            assert _burned(p) == 2250
        async with _monetary_run(cfg, session) as (_, p):
            assert _burned(p) == 2250
            assert await _call(p, key, 5) == 200
            assert _burned(p) == 2300
            got = (await p.admin("GET", "/admin/customers/acme/grants", expect=200))
            assert got["balance"] == "77"


async def test_a_volume_excess_covered_by_credits_is_given_back_once_at_period_end(
        make_proxy: ProxyFactory, stripe_double: RunningDouble) -> None:
    """90 then 20 units at the volume price burn 2250 cents from a 100.00 grant; Stripe
    bills the line of 110 units, 2200, and applies 22.00 of the mirrored grant. Once the
    period has closed the 0.50 covered beyond the line comes back as a local grant (made
    once: again, or after a restart, nothing more), with no second Stripe grant: the local
    balance then equals Stripe's after its invoice is finalized."""
    p, key = await _monetary_proxy(make_proxy, stripe_double, VOLUME)
    await p.admin("POST", "/admin/customers/acme/grants", {"credits": "100"}, expect=201)
    assert [await _call(p, key, 90), await _call(p, key, 20)] == [200, 200]
    await _mirrored(p, 1)
    svc = p.server.monetary
    assert svc is not None
    end = period_bounds(None, time.time())[1]
    svc.clock = lambda: end + 61.0              # the period closed a minute ago
    await svc.true_ups()
    await svc.true_ups()
    svc._trued.clear()                          # what a restart forgets
    await svc.true_ups()
    grants = (await p.admin("GET", "/admin/customers/acme/grants", expect=200))["grants"]
    back = [g for g in grants if g["source"].startswith("trueup:")]
    assert [(g["credits"], g["source"]) for g in back] == \
        [("0.5", f"trueup:api_calls:{period_bounds(None, time.time())[0]}")]
    await _mirrored(p, 2)
    live = [g for g in stripe_double.state.credit_grants.grants.values() if g.voided_at is None]
    assert [g.value for g in live] == [10_000]              # no second Stripe grant
    # Stripe finalizes the invoice: the 2200-cent line takes 2200 from the grant
    assert stripe_double.state.credit_grants.apply_to_invoice(CUS, "usd", 2200) == 2200
    assert live[0].available(stripe_double.state.now()) == 7800
    book = p.server.credits.book                # type: ignore[union-attr]
    assert book.balance("acme", time.time()) == 78 * 1_000_000


TOKENS_PRICE = {"id": "price_tokens", "currency": "usd", "unit_amount": 1,
                "recurring": {"meter": "mtr_tokens"}}
TOKEN_RULES = """\
version: 1
meters:
  llm_tokens: {stripe_event_name: llm_tokens, price_id: price_tokens}
rules:
  - name: chat
    match: {methods: [POST], path: /v1/chat/completions}
    usage:
      - {meter: llm_tokens, quantity: response.json.usage.total_tokens, credits: 0.01}
"""


async def test_a_monetary_block_customer_s_overspend_is_debt_covered_at_stripe_never_invoiced(
        make_proxy: ProxyFactory, stripe_double: RunningDouble) -> None:
    """Issue 12's burst in money: 2.00 of credits, `overage: block`, 1 cent a token, nothing
    learned and no hint (each request holds the 1-token floor, 1 cent), and an upstream that
    answers 40 tokens only once all 50 requests have arrived (all in flight at once, no
    timing). All 50 are admitted; 200 cents are covered and 1,800 become debt, within the
    stated bound (the sum of actual burn minus held: 50 x 39 cents). Every token is reported,
    and the debt is covered at Stripe by a promotional credit grant, so Stripe's invoice
    applies 20.00 of credits to the 20.00 line and the customer owes nothing. The next
    grant (20.00) repays the debt; its Stripe grant holds the 2.00 left, and the local
    balance then equals Stripe's."""
    from tests.servers import serve
    from tests.test_credits_debt import _gated_upstream

    stripe_double.state.add_meter("llm_tokens", id="mtr_tokens")
    stripe_double.state.add_price(TOKENS_PRICE)
    stripe_double.state.add_subscription(CUS, ["price_tokens"],
                                         period_bounds(None, time.time()))
    async with serve(_gated_upstream(50)) as up:
        p = await make_proxy(upstream_url=up, rules_text=TOKEN_RULES,
                             stripe=_stripe(stripe_double), credits={"mode": "monetary"})
        key = await p.customer_with_key("acme", stripe_customer_id=CUS, overage="block")
        await p.admin("POST", "/admin/customers/acme/grants", {"credits": "2"}, expect=201)
        h = {"Authorization": f"Bearer {key}"}

        async def one(s: aiohttp.ClientSession) -> int:
            async with s.post(p.url + "/v1/chat/completions", json={}, headers=h) as r:
                await r.read()
                return r.status

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=50)) as s:
            statuses = await asyncio.gather(*(one(s) for _ in range(50)))
        assert statuses.count(200) == 50
        with p.db() as c:
            ledger = dict(c.execute("SELECT kind, SUM(amount) FROM credit_entries"
                                    " WHERE customer_id='acme' GROUP BY 1").fetchall())
        assert ledger == {"debit": 2 * 1_000_000, "debt": 18 * 1_000_000}
        assert ledger["debt"] <= 50 * (40 - 1) * 10_000         # the bound: 19.50
        rows = await _mirrored(p, 2)
        assert sorted(r["grant_id"] for r in rows)[0] == \
            f"debt:acme:0-{18 * 1_000_000}"
        cover = [g for g in stripe_double.state.credit_grants.grants.values()
                 if g.metadata["meterproxy_grant"].startswith("debt:")]
        assert [(g.value, g.category, g.priority) for g in cover] == [(1800, "promotional", 0)]
        await p.admin("POST", "/admin/flush", expect=200)
        assert stripe_double.state.totals(CUS, "llm_tokens") == 2000     # all reported
        preview = await _preview(stripe_double)
        assert (preview.lines[0].amount, preview.credits, preview.total) == (2000, 2000, 0)
        [check] = (await p.admin("POST", "/admin/credits/balance-check",
                                 {"customer_id": "acme"}, expect=200))["checks"]
        assert check["difference"] == 0
        async with p.session.post(p.url + "/v1/chat/completions", json={}, headers=h) as r:
            assert r.status == 402                              # in debt
        await p.admin("POST", "/admin/customers/acme/grants", {"credits": "20"}, expect=201)
        got = await p.admin("GET", "/admin/customers/acme/grants", expect=200)
        assert (got["balance"], got["debt"]) == ("2", "0")
        await _mirrored(p, 3)
        grants = stripe_double.state.credit_grants
        assert sorted(g.value for g in grants.grants.values()) == [200, 200, 1800]
        assert grants.apply_to_invoice(CUS, "usd", 2000) == 2000    # the invoice: 0 due
        assert summary_left(grants, stripe_double) == 200           # = the local 2.00


def summary_left(grants: Any, double: RunningDouble) -> int:
    now = double.state.now()
    return sum(g.available(now) for g in grants.grants.values() if g.customer == CUS)


async def test_start_refuses_monetary_rules_without_a_stripe_price(
        tmp_path: Path, upstream: str) -> None:
    from proxy import config as config_mod
    from proxy.app import start
    from proxy.errors import ConfigError
    from tests.conftest import write_config

    cfg = write_config(tmp_path, upstream, RULES.replace(", price_id: price_calls", ""),
                       credits={"mode": "monetary"})
    with pytest.raises(ConfigError, match="has no Stripe price"):
        await start(config_mod.load(cfg))


# ---- the mirror: faults, crashes, retries ---------------------------------------------------

class Rig:
    """A MonetaryService on a real SQLite file and the Stripe double (no proxy)."""

    def __init__(self, tmp: Path, double: RunningDouble) -> None:
        self.tmp, self.double = tmp, double
        self.clock = time.time()

    async def open(self) -> None:
        self.store = Store.open(self.tmp / "m.db")
        self.owners = SqliteStorage.on(self.store)
        await self.owners.customers.upsert("acme", CUS, None, None)
        await self.owners.customers.set_credit_mode("acme", "monetary")
        self.keys = KeyCache()
        snap = await self.owners.customers.snapshot()
        self.keys.replace(snap.keys, snap.customers)
        self.credits = CreditService(self.store, load_book(await self.owners.ledger.load()),
                                     self.owners.ledger)
        self.client = StripeClient(TEST_API_KEY, api_base=self.double.url, timeout=2.0)
        prices = {"api_calls": price_from_stripe(GRADUATED).with_id("price_calls")}
        self.svc = MonetaryService(CreditsConfig(mode="units", mirror_max_attempts=3),
                                   self.keys, self.owners.usage, self.owners.ledger,
                                   self.owners.mirrors, self.credits.book, MoneyBook(),
                                   lambda: prices, self.client, clock=lambda: self.clock)
        await self.svc.sync()
        self.credits.on_taken = self.svc.taken

    async def spend(self, cents: int) -> None:
        """A request's burn of ``cents``, as settlement books it (a ``bill`` customer)."""
        acct = self.svc.money.account("acme")
        assert acct is not None
        cost, now = cents * 10_000, self.clock
        book = self.credits.book
        hold = book.try_hold("acme", cost, now, block=False)
        assert hold is not None
        [(entries, uncovered)] = book.settle(hold, [cost], now)
        await self.owners.ledger.append([LedgerEntry("acme", e, meter="api_calls", at=now)
                                         for e in entries])
        acct.cover("api_calls", cost - uncovered, now)

    async def close(self) -> None:
        await self.client.close()
        self.store.close()

    async def restart(self) -> None:
        await self.close()
        await self.open()

    async def pass_(self) -> int:
        await self.svc.discover()
        return await self.svc.mirror_due()

    def stripe_grants(self) -> list[Any]:
        return list(self.double.state.credit_grants.grants.values())


@pytest.fixture
async def rig(tmp_path: Path, stripe_double: RunningDouble) -> Any:
    r = Rig(tmp_path, stripe_double)
    await r.open()
    yield r
    await r.close()


async def test_an_answer_lost_after_stripe_stored_the_grant_creates_one_grant(rig: Rig) -> None:
    g, _ = await rig.credits.grant("acme", "10", source="stripe:in_1")
    rig.double.state.faults.script("credit_grants", ["commit_then_drop"])
    assert await rig.pass_() == 0                          # stored at Stripe, answer lost
    [row] = await rig.owners.mirrors.rows()
    assert (row.status, row.attempts, row.done) == ("pending", 1, "none")
    rig.clock += 10                                        # past the backoff
    assert await rig.pass_() == 1
    [sg] = rig.stripe_grants()                             # found, not created again
    assert (sg.value, sg.category, sg.metadata["meterproxy_grant"]) == (1000, "paid", g.id)
    [row] = await rig.owners.mirrors.rows()
    assert (row.status, row.stripe_grant_id) == ("mirrored", sg.id)


async def test_stripe_down_then_a_restart_mirrors_once(rig: Rig) -> None:
    """Two faults, one on each call of an attempt (the look-up, then the create), with a
    restart between them: the pending row survives and the grant is created once."""
    await rig.credits.grant("acme", "10")
    rig.double.state.faults.script("credit_grants_list", ["500"])
    rig.double.state.faults.script("credit_grants", ["reset_before"])
    assert await rig.pass_() == 0                          # the look-up fails
    await rig.restart()
    [row] = await rig.owners.mirrors.rows()
    assert (row.status, row.attempts) == ("pending", 1)
    rig.clock += 10
    assert await rig.pass_() == 0                          # the create's connection drops
    rig.clock += 10
    assert await rig.pass_() == 1
    assert len(rig.stripe_grants()) == 1
    assert len(rig.double.state.calls("credit_grants")) == 2


async def test_a_crash_between_the_grant_and_its_mirror_row_is_repaired(rig: Rig) -> None:
    """The grant's ledger transaction is the only write before the crash: the next process
    finds the grant without a mirror row and mirrors it once."""
    await rig.credits.grant("acme", "3")
    await rig.restart()                                    # no discover() ran before
    assert await rig.owners.mirrors.rows() == []
    assert await rig.pass_() == 1
    assert await rig.pass_() == 0
    assert [g.value for g in rig.stripe_grants()] == [300]


async def test_refusals_and_too_many_failures_dead_letter_then_requeue(rig: Rig) -> None:
    await rig.credits.grant("acme", "0.001")               # not a whole cent: Stripe refuses
    await rig.credits.grant("acme", "2")
    rig.double.state.faults.script("credit_grants", ["500"] * 3)
    before = metrics.credit_grant_mirrors_total.labels("dead")._value.get()
    for _ in range(3):
        await rig.pass_()
        rig.clock += 3600
    dead = await rig.owners.mirrors.rows(status="dead")
    assert len(dead) == 2 and all(r.last_error for r in dead)
    assert metrics.credit_grant_mirrors_total.labels("dead")._value.get() == before + 2
    assert metrics.credit_grant_mirrors.labels("dead")._value.get() == 2
    assert await rig.owners.mirrors.requeue(None, int(rig.clock)) == 2
    await rig.pass_()
    assert [g.value for g in rig.stripe_grants()] == [200]     # the refusal is dead again
    [still] = await rig.owners.mirrors.rows(status="dead")
    assert "whole number" in (still.last_error or "")


async def test_a_void_here_voids_the_stripe_grant_and_a_never_created_one_is_not_made(
        rig: Rig) -> None:
    g1, _ = await rig.credits.grant("acme", "5")
    await rig.pass_()
    g2, _ = await rig.credits.grant("acme", "6")
    await rig.credits.void(g2.id)                           # voided before any mirror
    await rig.credits.void(g1.id)
    await rig.pass_()
    [sg] = rig.stripe_grants()
    assert sg.metadata["meterproxy_grant"] == g1.id and sg.voided_at is not None
    [row] = await rig.owners.mirrors.rows()
    assert (row.grant_id, row.want, row.done, row.status) == (g1.id, "void", "void",
                                                              "mirrored")


async def test_the_balance_check_explains_a_grant_voided_only_at_stripe(rig: Rig) -> None:
    await rig.credits.grant("acme", "10")
    await rig.pass_()
    check = await rig.svc.balance_check("acme")
    assert (check["expected"], check["stripe"], check["difference"]) == (1000, 1000, 0)
    [sg] = rig.stripe_grants()
    rig.double.state.credit_grants.void(sg.id)              # out of band
    [check] = await rig.svc.check_all()
    assert (check["stripe"], check["difference"]) == (0, -1000)
    assert "Stripe holds less" in check["explanation"]
    assert metrics.credit_balance_mismatch._value.get() == 1


async def test_a_claw_back_replaces_the_stripe_grant_with_what_is_left(rig: Rig) -> None:
    """Credits taken from a mirrored grant without a request spending them (a refund's
    claw-back, a repayment of debt): a Stripe grant cannot shrink, so it is voided and a
    replacement holds the rest; what the open period spent from it stays in it (Stripe
    applies that when it finalizes the invoice). The balance check agrees at every step."""
    g, _ = await rig.credits.grant("acme", "10", source="stripe:in_1",
                                   payment=(("in_1", "ch_1"), 1000))
    await rig.pass_()
    await rig.spend(300)                                   # 3.00 spent this period

    def live() -> list[tuple[str, int]]:
        return sorted((x.metadata["meterproxy_grant"], x.value)
                      for x in rig.stripe_grants() if x.voided_at is None)

    [out] = await rig.credits.claw_back("acme", ["ch_1"], 500, "refund:ch_1", "evt_1")
    assert out["unused_taken"] == "5"                      # half the pack refunded
    await rig.pass_()
    assert live() == [(f"{g.id}#t5000000", 500)]           # 10 - 5 taken (3 spent stays)
    check = await rig.svc.balance_check("acme")
    assert (check["local_balance"], check["expected"], check["stripe"]) == (200, 500, 500)

    # more of it refunded: 2.00 unused taken, 1.00 of the spent part becomes debt
    [out] = await rig.credits.claw_back("acme", ["ch_1"], 800, "refund:ch_1", "evt_2")
    assert (out["unused_taken"], out["debt"]) == ("2", "1")
    await rig.pass_()
    assert live() == [(f"{g.id}#t7000000", 300)]
    check = await rig.svc.balance_check("acme")
    assert (check["expected"], check["stripe"], check["difference"]) == (300, 300, 0)

    # the next grant repays the debt first: its Stripe grant holds what is left of it
    await rig.credits.grant("acme", "5")
    await rig.pass_()
    await rig.pass_()
    assert sum(v for _k, v in live()) == 300 + 400
    check = await rig.svc.balance_check("acme")
    assert (check["local_balance"], check["expected"], check["stripe"]) == (400, 700, 700)
    rows = await rig.owners.mirrors.rows()
    assert {r.status for r in rows} == {"mirrored"}


async def test_after_a_restart_every_mirrored_grant_is_checked_for_credits_taken(
        rig: Rig) -> None:
    """A claw-back whose wake-up was lost with the process is found by the first pass of
    the next one."""
    g, _ = await rig.credits.grant("acme", "10", source="stripe:in_1",
                                   payment=(("in_1",), 1000))
    await rig.pass_()
    rig.credits.on_taken = None                            # the signal is lost
    await rig.credits.claw_back("acme", ["in_1"], 1000, "refund:in_1", "evt_1")
    await rig.restart()
    await rig.pass_()
    assert [x.value for x in rig.stripe_grants() if x.voided_at is None] == []
    [row] = [r for r in await rig.owners.mirrors.rows() if r.grant_id == g.id]
    assert (row.want, row.done) == ("void", "void")


async def test_an_expired_allowance_stays_at_stripe_until_its_invoice_is_finalized(
        rig: Rig) -> None:
    """A grant expiring at the period end is live at Stripe for FINALIZATION_GRACE more, so
    the period's invoice (finalized about an hour later) still applies it; once Stripe says
    that invoice is finalized (``invoice.finalized`` for usage up to the period end) its
    Stripe grant is voided, and an invoice for an earlier period voids nothing."""
    end = int(rig.clock) + 60
    g, _ = await rig.credits.grant("acme", "10", expires_at=end, source="stripe:in_1")
    assert await rig.pass_() == 1
    [sg] = rig.stripe_grants()
    assert sg.expires_at == end + FINALIZATION_GRACE
    rig.clock = end + 3600.0                                # an hour after the period end
    assert await rig.pass_() == 0 and sg.voided_at is None  # not finalized yet: kept
    await rig.svc.finalized("acme", end - 86_400)           # an earlier period's invoice
    assert await rig.pass_() == 0 and sg.voided_at is None
    await rig.svc.finalized("acme", end)                    # this period's invoice
    assert await rig.pass_() == 1 and sg.voided_at is not None
    [row] = await rig.owners.mirrors.rows()
    assert (row.grant_id, row.want, row.done) == (g.id, "void", "void")


async def test_a_finalized_invoice_still_voids_the_kept_grant_after_a_restart(
        rig: Rig) -> None:
    """``invoice.finalized`` is stored before it is acted on: a restart between the webhook
    and the pass that voids (or one before the local grant's expiry) still voids the Stripe
    grant kept live for that invoice, with no second webhook; an earlier period's end stored
    later never lowers it."""
    end = int(rig.clock) + 60
    await rig.credits.grant("acme", "10", expires_at=end, source="stripe:in_1")
    assert await rig.pass_() == 1
    [sg] = rig.stripe_grants()
    await rig.svc.finalized("acme", end)        # Stripe finalized the period's invoice...
    await rig.svc.finalized("acme", end - 86_400)
    await rig.restart()                         # ...and the process restarted before the
    rig.clock = end + 3600.0                    # local grant expired
    assert await rig.pass_() == 1 and sg.voided_at is not None
    assert await rig.owners.mirrors.finalized() == {"acme": end}


async def test_a_debt_cover_survives_a_restart_once(rig: Rig) -> None:
    """Settlement debt committed before a crash, its cover not yet mirrored: the restarted
    service reads the debt from the ledger and covers it at Stripe once; a further debt is
    covered by a second grant for the increase only."""
    from proxy.credits.ledger import Entry

    await rig.owners.ledger.append([LedgerEntry("acme", Entry("", "debt", 300 * 10_000),
                                                meter="api_calls", at=rig.clock)])
    await rig.restart()
    assert await rig.pass_() == 1
    await rig.restart()
    assert await rig.pass_() == 0                           # covered already: nothing new
    acct = rig.svc.money.account("acme")
    assert acct is not None
    acct.cover("api_calls", 50 * 10_000, rig.clock, [Entry("", "debt", 50 * 10_000)])
    assert await rig.pass_() == 1
    assert sorted((g.value, g.metadata["meterproxy_grant"]) for g in rig.stripe_grants()) == [
        (50, "debt:acme:3000000-3500000"), (300, "debt:acme:0-3000000")]


async def test_usage_before_any_credit_moves_the_monetary_period_total(
        make_proxy: ProxyFactory, stripe_double: RunningDouble) -> None:
    """A monetary customer with nothing to hold (no credits yet, `overage: bill`) on a rule
    of constant quantities still moves its period total: 200 units at the volume price are
    4000 cents, so after a 100.00 grant the next 100 units burn 6000 - 4000 = 2000 cents
    (the tier of the total, 300 units), not 2500 as if the period had started empty."""
    _seed(stripe_double, VOLUME)
    rules = RULES.replace("  - name: calls\n", """\
  - name: hundred
    match: {methods: [POST], path: /v1/items}
    usage:
      - {meter: api_calls, quantity: 100}
  - name: calls
""")
    p = await make_proxy(rules_text=rules, stripe=_stripe(stripe_double),
                         credits={"mode": "monetary"})
    key = await p.customer_with_key("acme", stripe_customer_id=CUS)

    async def hundred() -> int:
        async with p.session.post(p.url + "/v1/items",
                                 headers={"Authorization": f"Bearer {key}"}) as r:
            await r.read()
            return r.status

    assert [await hundred(), await hundred()] == [200, 200]
    assert _burned(p) == 4000                   # 200 units x 20 cents, nothing covered
    await p.admin("POST", "/admin/customers/acme/grants", {"credits": "100"}, expect=201)
    assert await hundred() == 200
    assert _burned(p) == 6000
    got = (await p.admin("GET", "/admin/customers/acme/grants", expect=200))["balance"]
    assert got == "80"


async def test_a_replacement_waits_until_the_grant_it_replaces_is_void_at_stripe(
        rig: Rig) -> None:
    """The void of the old Stripe grant fails (a 500): the replacement is not created
    beside it (Stripe would hold both, 10.00 + 5.00 against a local 5.00); once the void
    goes through on its retry, the replacement follows."""
    g, _ = await rig.credits.grant("acme", "10", source="stripe:in_1",
                                   payment=(("in_1", "ch_1"), 1000))
    await rig.pass_()
    [out] = await rig.credits.claw_back("acme", ["ch_1"], 500, "refund:ch_1", "evt_1")
    assert out["unused_taken"] == "5"
    rig.double.state.faults.script("credit_grant_void", ["500"])

    def live() -> list[tuple[str, int]]:
        return sorted((x.metadata["meterproxy_grant"], x.value)
                      for x in rig.stripe_grants() if x.voided_at is None)

    await rig.pass_()
    assert live() == [(g.id, 1000)]                 # the old one only, not both
    rows = {r.grant_id: r for r in await rig.owners.mirrors.rows()}
    assert "to be voided" in (rows[f"{g.id}#t5000000"].last_error or "")
    rig.clock += 3600                               # past both rows' retry time
    await rig.pass_()
    await rig.pass_()
    assert live() == [(f"{g.id}#t5000000", 500)]
    check = await rig.svc.balance_check("acme")
    assert (check["local_balance"], check["stripe"]) == (500, 500)


async def test_a_grant_first_mirrored_after_its_period_ended_holds_what_stripe_never_applied(
        rig: Rig) -> None:
    """Stripe is down when the grant is made; 3.00 of it is spent locally, the period ends,
    and Stripe finalizes that invoice without any credit grant (the usage charged in full).
    The late mirror holds the whole 10.00, not 7.00 (which would charge the 3.00 twice: in
    money on the invoice and in credits); the balance check shows the 3.00."""
    await rig.credits.grant("acme", "10", source="stripe:in_1")
    rig.double.state.faults.script("credit_grants", ["500"])
    await rig.pass_()
    assert rig.stripe_grants() == []
    await rig.spend(300)
    rig.clock += 40 * 86400                         # past the period's end
    await rig.svc.sync()
    await rig.pass_()
    assert [g.value for g in rig.stripe_grants()] == [1000]
    check = await rig.svc.balance_check("acme")
    assert (check["local_balance"], check["stripe"], check["difference"]) == (700, 1000, 300)
