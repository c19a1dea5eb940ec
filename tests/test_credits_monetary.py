"""Monetary credits (issue 12, finding 2): usage burns credits at its marginal price, so the
period's burns equal the Stripe invoice line the tiers make of the period total; a local
grant mirrored as a Stripe credit grant (the Stripe double validates them as Stripe does)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest
import stripe
from hypothesis import given
from hypothesis import strategies as st

from proxy.credits.ledger import GrantState
from proxy.credits.monetary import (
    FINALIZATION_GRACE,
    balance_check,
    burn,
    credit_grant_params,
    give_back,
    micro_per_minor,
    replay,
    stripe_available,
    summary_available,
    to_minor,
    true_up,
)
from proxy.errors import StripeRejected
from proxy.pricing import Price, Tier, line_amount
from proxy.stripe.client import StripeClient
from tests.stripe_double.fixture import TEST_API_KEY, RunningDouble

U = 1_000_000          # micro-units per unit

# the issue's examples: graduated 1M at 0.0002 cents + a 500-cent flat fee, then 0.0001
GRADUATED = Price("usd", "tiered", tiers_mode="graduated", tiers=(
    Tier(1_000_000, Decimal("0.0002"), Decimal(500)), Tier(None, Decimal("0.0001"))))
# volume: up to 100 units at 25 cents, beyond at 20
VOLUME = Price("usd", "tiered", tiers_mode="volume", tiers=(
    Tier(100, Decimal(25)), Tier(None, Decimal(20))))


def _burns(price: Price, steps: list[int]) -> tuple[list[int], int]:
    burned, total, out = 0, 0, []
    for q in steps:
        total += q
        b = burn(price, burned, total)
        burned += b
        out.append(b)
    return out, total


def test_graduated_burns_sum_to_the_invoice_line() -> None:
    burns, total = _burns(GRADUATED, [1_000_000 * U] * 3)
    assert burns == [700, 100, 100]                  # the flat fee once, each tier's own rate
    assert sum(burns) == line_amount(GRADUATED, total) == 900
    # unit credits covering the first 2M would leave 1M priced from tier 1: 700, not 100


def test_volume_burns_the_tier_of_the_period_total() -> None:
    burns, total = _burns(VOLUME, [100 * U, 50 * U])
    assert burns == [2500, 500] and sum(burns) == line_amount(VOLUME, total) == 3000
    # crossing into the cheaper tier lowers the line: nothing burned, the excess given back
    burns, total = _burns(VOLUME, [100 * U, 1 * U])
    assert burns == [2500, 0]
    assert true_up(VOLUME, 2500, total) == 2500 - 2020


_tiers = st.lists(st.tuples(st.integers(1, 50), st.integers(0, 500), st.integers(0, 1000)),
                  min_size=1, max_size=4)


def _price(mode: str, spec: list[tuple[int, int, int]]) -> Price:
    bounds, tiers, up = [], [], 0
    for width, _, _ in spec:
        up += width
        bounds.append(up)
    for i, (_, unit, flat) in enumerate(spec):
        last = i == len(spec) - 1
        tiers.append(Tier(None if last else bounds[i], Decimal(unit) / 100, Decimal(flat)))
    return Price("usd", "tiered", tiers_mode=mode, tiers=tuple(tiers))  # type: ignore[arg-type]


@given(_tiers, st.sampled_from(["graduated", "volume"]),
       st.lists(st.integers(0, 40 * U), max_size=12))
def test_burns_minus_true_up_equal_the_line_whatever_the_requests(
        spec: list[tuple[int, int, int]], mode: str, steps: list[int]) -> None:
    price = _price(mode, spec)
    burns, total = _burns(price, steps)
    assert all(b >= 0 for b in burns)
    burned = sum(burns)
    assert burned - true_up(price, burned, total) == line_amount(price, total) or not steps
    if mode == "graduated":
        assert true_up(price, burned, total) == 0


@given(_tiers, st.sampled_from(["graduated", "volume"]),
       st.lists(st.integers(0, 40 * U), max_size=12), st.integers(0, 100))
def test_a_replay_resumes_exactly_and_the_give_back_is_what_credits_covered_beyond_the_line(
        spec: list[tuple[int, int, int]], mode: str, steps: list[int], pct: int) -> None:
    """A restart resumes from ``replay`` of the period's requests: the same burns as if it
    had never stopped (a volume price's highest line, not the line of its total), and what
    is given back at the period end is the covered part of the excess, never more."""
    price = _price(mode, spec)
    burns, total = _burns(price, steps)
    assert replay(price, steps) == (total, sum(burns))
    burned = sum(burns)
    covered = burned * pct // 100 * 10_000                  # credits covered pct% of it
    back = give_back(price, covered, total, 10_000)
    assert 0 <= back <= true_up(price, burned, total) * 10_000
    assert covered - back <= line_amount(price, total) * 10_000 or not steps


def test_the_issue_s_volume_example_replays_and_gives_back() -> None:
    # 90 units at 25 cents (2250), then 20 more: the line of 110 is 2200, nothing burned
    assert replay(VOLUME, [90 * U, 20 * U]) == (110 * U, 2250)
    assert line_amount(VOLUME, 110 * U) == 2200            # the line of the total alone
    assert give_back(VOLUME, 2250 * 10_000, 110 * U, 10_000) == 50 * 10_000
    assert give_back(VOLUME, 2210 * 10_000, 110 * U, 10_000) == 10 * 10_000
    assert give_back(VOLUME, 2000 * 10_000, 110 * U, 10_000) == 0     # the rest invoiced


@given(st.integers(1, 10**6), st.lists(st.integers(0, 10**4 * U), max_size=12))
def test_per_unit_burns_sum_exactly(unit_cents: int, steps: list[int]) -> None:
    price = Price("usd", unit_amount_decimal=Decimal(unit_cents) / 1000)
    burns, total = _burns(price, steps)
    assert sum(burns) == (line_amount(price, total) if steps else 0)


def test_credit_units_per_currency() -> None:
    assert micro_per_minor("usd") == 10_000          # 1 credit = 1 USD = 100 cents
    assert micro_per_minor("jpy") == 1_000_000       # zero-decimal
    assert micro_per_minor("kwd") == 1_000           # three-decimal
    assert to_minor(12_340_000, "usd") == 1234
    with pytest.raises(ValueError, match="whole number of usd minor units"):
        to_minor(12_345, "usd")


def test_a_grant_mirrors_as_a_stripe_credit_grant() -> None:
    g = GrantState("grt_1", "acme", 25 * U, 10, 2_000_000_000, 0, "stripe:in_1",
                   effective_at=1_900_000_000)
    assert credit_grant_params(g, "cus_1", "usd", "paid") == {
        "customer": "cus_1",
        "amount": {"type": "monetary", "monetary": {"value": 2500, "currency": "usd"}},
        "applicability_config": {"scope": {"price_type": "metered"}},
        "category": "paid", "priority": 10, "name": "meterproxy stripe:in_1",
        "metadata": {"meterproxy_grant": "grt_1"},
        "effective_at": 1_900_000_000, "expires_at": 2_000_000_000 + FINALIZATION_GRACE}


def test_stripe_balance_expected_from_the_local_one() -> None:
    summary = {"balances": [{"available_balance": {"type": "monetary",
                                                   "monetary": {"currency": "usd",
                                                                "value": 2500}}}]}
    assert summary_available(summary, "usd") == 2500
    assert summary_available(summary, "eur") is None
    # 15 USD left locally, 10 USD burned in the open period: Stripe has applied nothing yet
    assert stripe_available(15 * U, 1000, "usd") == 2500


# ---- the Stripe double's Billing Credits, through the real stripe SDK ----------------------

SUMMARY_FILTER = {"type": "applicability_scope", "applicability_scope": {"price_type": "metered"}}


async def _available(client: StripeClient, customer: str) -> int | None:
    return summary_available(await client.credit_balance_summary(customer), "usd")


@pytest.fixture
async def client(stripe_double: RunningDouble) -> AsyncIterator[StripeClient]:
    c = StripeClient(TEST_API_KEY, api_base=stripe_double.url, timeout=2.0)
    yield c
    await c.close()


async def test_double_mirrors_a_grant_and_its_balance(client: StripeClient,
                                                      stripe_double: RunningDouble) -> None:
    """Mirroring through StripeClient (the real SDK) against the double's Billing Credits."""
    now = int(stripe_double.state.now())
    g = GrantState("grt_1", "acme", 25 * U, 10, now + 3600, now, "admin")
    later = GrantState("grt_2", "acme", 5 * U, 0, now + 7200, now, "admin",
                       effective_at=now + 600)
    made = [await client.create_credit_grant(credit_grant_params(x, "cus_1", "usd", "paid"),
                                             idempotency_key=f"meterproxy-grant-{x.id}")
            for x in (g, later)]
    again = await client.create_credit_grant(credit_grant_params(g, "cus_1", "usd", "paid"),
                                             idempotency_key="meterproxy-grant-grt_1")
    assert again == made[0]                                       # a retry creates one
    first = stripe_double.state.credit_grants.grants[made[0]]
    assert (first.value, first.currency, first.priority, first.category, first.metadata) == \
        (2500, "usd", 10, "paid", {"meterproxy_grant": "grt_1"})
    assert await _available(client, "cus_1") == 2500              # grt_2 not effective yet
    # an invoice finalized with 10 USD of metered lines takes it from the grants
    stripe_double.state.credit_grants.apply_to_invoice("cus_1", "usd", 1000)
    assert await _available(client, "cus_1") == 1500
    assert stripe_available(15 * U - 10 * U, 1000, "usd") == 1500   # 5 left, 10 open-burned
    stripe_double.state.advance(601)
    assert await _available(client, "cus_1") == 2000
    await client.void_credit_grant(made[1])
    assert await _available(client, "cus_1") == 1500
    with pytest.raises(StripeRejected, match="already voided"):
        await client.void_credit_grant(made[1])
    await client.expire_credit_grant(made[0])
    assert await _available(client, "cus_1") == 0


async def test_a_period_allowance_still_comes_off_the_invoice_finalized_after_its_end(
        client: StripeClient, stripe_double: RunningDouble) -> None:
    """A plan allowance expires locally at the period end; Stripe finalizes that period's
    invoice about an hour later (up to 72 h) and applies only grants unexpired then. The
    mirrored grant is still applied to it; a Stripe grant that expired at the period end
    (what the mirror sent before) is not, as Stripe documents."""
    now = int(stripe_double.state.now())
    end = now + 60                              # the period (and the local grant) ends
    allowance = GrantState("grt_plan", "acme", 25 * U, 0, end, now, "stripe:in_1")
    await client.create_credit_grant(credit_grant_params(allowance, "cus_1", "usd", "paid"),
                                     idempotency_key="k-plan")
    raw = {**credit_grant_params(allowance, "cus_2", "usd", "paid"), "expires_at": end}
    await client.create_credit_grant(raw, idempotency_key="k-raw")
    stripe_double.state.advance(60 + 3600)      # the invoice is finalized 1 h after the end
    grants = stripe_double.state.credit_grants
    assert grants.apply_to_invoice("cus_1", "usd", 900) == 900
    assert grants.apply_to_invoice("cus_2", "usd", 900) == 0    # expired before finalization
    stripe_double.state.advance(72 * 3600)      # past the longest draft period: gone
    assert await _available(client, "cus_1") == 0


async def test_balance_check_explains_a_difference(client: StripeClient,
                                                   stripe_double: RunningDouble) -> None:
    now = int(stripe_double.state.now())
    g = GrantState("grt_1", "acme", 25 * U, 10, now + 3600, now, "admin")
    assert balance_check(25 * U, 0, await client.credit_balance_summary("cus_1"), "usd") == {
        "currency": "usd", "expected": 2500, "stripe": 0, "difference": -2500,
        "explanation": "Stripe holds no credit balance in this currency: the grants were not"
                       " mirrored"}
    await client.create_credit_grant(credit_grant_params(g, "cus_1", "usd", "paid"),
                                     idempotency_key="k1")
    summary = await client.credit_balance_summary("cus_1")
    assert balance_check(25 * U, 0, summary, "usd")["explanation"] == "matches"
    # 5 USD burned in the open period: locally 20 left, Stripe has applied nothing yet
    assert balance_check(20 * U, 500, summary, "usd")["difference"] == 0
    voided_here = balance_check(15 * U, 0, summary, "usd")
    assert voided_here["difference"] == 1000 and "Stripe holds more" in \
        voided_here["explanation"]
    assert "Stripe holds less" in balance_check(30 * U, 0, summary, "usd")["explanation"]


@given(st.integers(0, 10**12), st.integers(0, 10**7), st.integers(0, 10**9))
def test_balance_check_difference_is_stripe_minus_expected(local: int, burned: int,
                                                           stripe: int) -> None:
    local -= local % 10_000                    # whole cents
    summary = {"balances": [{"available_balance": {
        "type": "monetary", "monetary": {"currency": "usd", "value": stripe}}}]}
    out = balance_check(local, burned, summary, "usd")
    assert out["expected"] == local // 10_000 + burned
    assert out["difference"] == stripe - out["expected"]
    assert (out["explanation"] == "matches") == (out["difference"] == 0)


@pytest.mark.parametrize(("change", "param"), [
    ({"amount": {"type": "custom_pricing_unit"}}, "amount[type]"),
    ({"amount": {"type": "monetary", "monetary": {"value": 0, "currency": "usd"}}},
     "amount[monetary][value]"),
    ({"amount": {"type": "monetary", "monetary": {"value": 5, "currency": "USD"}}},
     "amount[monetary][currency]"),
    ({"applicability_config": {"scope": {"price_type": "licensed"}}},
     "applicability_config[scope][price_type]"),
    ({"applicability_config": None}, "applicability_config[scope]"),
    ({"category": "gift"}, "category"),
    ({"priority": 101}, "priority"),
    ({"effective_at": 2_000_000_000, "expires_at": 2_000_000_000}, "expires_at"),
    ({"customer": None}, "customer"),
])
async def test_double_validates_credit_grants_as_stripe_does(
        stripe_client: stripe.StripeClient, change: dict[str, object], param: str) -> None:
    base = {"customer": "cus_1",
            "amount": {"type": "monetary", "monetary": {"value": 100, "currency": "usd"}},
            "applicability_config": {"scope": {"price_type": "metered"}}}
    params = {k: v for k, v in {**base, **change}.items() if v is not None}
    with pytest.raises(stripe.InvalidRequestError) as err:
        await stripe_client.v1.billing.credit_grants.create_async(params)  # type: ignore[arg-type]
    assert err.value.param == param
    with pytest.raises(stripe.InvalidRequestError) as err:
        await stripe_client.v1.billing.credit_balance_summary.retrieve_async(
            {"customer": "cus_1"})  # type: ignore[typeddict-item]
    assert err.value.param == "filter[type]"


async def test_the_double_s_preview_applies_grants_to_metered_lines_in_stripe_s_order(
        client: StripeClient, stripe_double: RunningDouble) -> None:
    """Credits apply to metered price lines only (never to invoice items), from live
    grants, by priority, then the earliest expiry, then promotional before paid; the total
    is net of them, the lines are not; nothing is consumed by a preview."""
    import time as _time

    from proxy.periods import period_bounds
    d = stripe_double.state
    d.add_meter("api_calls", id="mtr_calls")
    d.add_price({"id": "price_calls", "currency": "usd", "billing_scheme": "per_unit",
                 "unit_amount_decimal": "10", "recurring": {"meter": "mtr_calls"}})
    d.add_subscription("cus_1", ["price_calls"], period_bounds(None, _time.time()))
    now = int(_time.time())
    await client.send_meter_event(event_name="api_calls", stripe_customer_id="cus_1",
                                  value=50, identifier="e1", timestamp=now - 60,
                                  idempotency_key="e1")
    d.invoice_items.create({"customer": "cus_1", "amount": 700, "currency": "usd"})

    def grant(cents: int, category: str = "paid", **kw: Any) -> None:
        g = GrantState(f"g{cents}", "c", cents * 10_000, **kw)
        d.credit_grants.create(credit_grant_params(g, "cus_1", "usd", category))  # type: ignore[arg-type]

    grant(300, priority=50)                                    # no expiry: last
    grant(150, priority=50, expires_at=now + 3600)
    grant(200, "promotional", priority=50, expires_at=now + 3600)
    grant(100, priority=10)                                    # highest priority: first
    grant(999, effective_at=now + 3600)                        # not effective yet
    preview = await client.preview_invoice("cus_1")
    [metered] = [ln for ln in preview.lines if ln.price == "price_calls"]
    assert metered.amount == 500 and preview.credits == 500          # capped at the line
    assert preview.total == 500 + 700 - 500                          # the item is not covered
    again = await client.preview_invoice("cus_1")
    assert again.credits == 500                                      # nothing consumed
    raw = d.credit_grants
    [applied] = raw.preview_credits("cus_1", "usd", [500])
    value = {g.id: g.value for g in raw.grants.values()}
    # priority, then the earliest expiry, then promotional before paid
    assert [(value[g], a) for g, a in applied] == [(100, 100), (200, 200), (150, 150),
                                                   (300, 50)]
