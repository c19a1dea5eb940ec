"""The customer's words for the billing numbers (proxy.usage_view): exact strings, and
properties tying every itemised or daily amount back to proxy.pricing's line math."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

from hypothesis import given
from hypothesis import strategies as st

from proxy.pricing import Price, Tier, exact_amount, line_amount, price_from_stripe, whole_units
from proxy.usage_view import (
    daily_costs,
    fixed_fee,
    grant_name,
    invoice_lines,
    major,
    meter_notes,
    money,
    price_lines,
    quantity_text,
)

Q = 1_000_000
CALLS = price_from_stripe({"currency": "usd", "unit_amount_decimal": "0.05"})
CENTS = price_from_stripe({"currency": "usd", "unit_amount_decimal": "2.5"})
TOKENS = price_from_stripe({
    "currency": "usd", "billing_scheme": "tiered", "tiers_mode": "graduated",
    "tiers": [{"up_to": 1_000_000, "unit_amount_decimal": "0.0002", "flat_amount": 500},
              {"up_to": None, "unit_amount_decimal": "0.0001"}]})
GB = price_from_stripe({
    "currency": "usd", "billing_scheme": "tiered", "tiers_mode": "volume",
    "tiers": [{"up_to": 100, "unit_amount": 25, "flat_amount": 100},
              {"up_to": None, "unit_amount": 20}]})
BYTES = price_from_stripe({"currency": "eur", "unit_amount": 25,
                           "transform_quantity": {"divide_by": 1000, "round": "up"}})
THREE = price_from_stripe({
    "currency": "usd", "billing_scheme": "tiered", "tiers_mode": "graduated",
    "tiers": [{"up_to": 10, "unit_amount": 0}, {"up_to": 100, "unit_amount": 3},
              {"up_to": None, "unit_amount": 1, "flat_amount": 700}]})


def test_money_and_major_are_exact_and_grouped() -> None:
    assert money(123456, "usd") == "$1,234.56"
    assert money(Fraction(3, 2), "usd") == "$0.015"          # half a cent x 3: kept exact
    assert money(500, "jpy") == "¥500"
    assert money(1234, "chf") == "12.34 CHF"
    assert money(1234, "kwd") == "1.234 KWD"                 # three-decimal currency
    assert money(-250, "eur") == "-€2.50"
    assert major(Fraction(1, 20), "usd") == "0.0005"
    assert major(123456789, "usd") == "1234567.89"
    assert major(123456789, "usd", grouped=True) == "1,234,567.89"
    assert quantity_text(3_612_600) == "3.6126"
    assert quantity_text(1_234_500_000_000) == "1,234,500"


def test_prices_in_words() -> None:
    assert price_lines(CALLS, "calls") == ["$0.50 per 1,000 calls"]
    assert price_lines(CENTS, "calls") == ["$0.025 each"]
    assert price_lines(TOKENS, "tokens") == [
        "First 1,000,000 tokens: $2.00 per 1 million tokens + $5.00 flat fee",
        "Over 1,000,000 tokens: $1.00 per 1 million tokens"]
    assert price_lines(GB, "GB") == [
        "Up to 100 GB in total: $0.25 each, on all GB + $1.00 flat fee",
        "More than 100 GB in total: $0.20 each, on all GB"]
    assert price_lines(BYTES, "bytes") == [
        "€0.25 per 1,000 bytes (any started 1,000 bytes count)"]
    assert price_lines(THREE, "calls") == [
        "First 10 calls: free", "Next 90 calls (11\u2013100): $0.03 each",
        "Over 100 calls: $0.01 each + $7.00 flat fee"]
    tiny = Price("usd", unit_amount_decimal=Decimal("0.000000000001"))
    assert price_lines(tiny, "bytes") == ["$0.00001 per 1 billion bytes"]


def test_graduated_invoice_line_itemises_tiers_and_flat_fees() -> None:
    line = invoice_lines(TOKENS, 1_500_300 * Q + 612_600, "tokens")
    assert line.quantity == 1_500_300
    assert line.amount == 750 == line_amount(TOKENS, 1_500_300 * Q)
    assert [(s.description, s.quantity, s.unit_amount, s.amount) for s in line.sub_lines] == [
        ("First 1,000,000 tokens", 1_000_000, Fraction(1, 5000), Fraction(200)),
        ("Flat fee of the first tier", None, None, Fraction(500)),
        ("Over 1,000,000 tokens", 500_300, Fraction(1, 10000), Fraction(5003, 100))]
    assert line.exact == Fraction(75003, 100)                 # $7.5003 -> $7.50 once


def test_zero_usage_line_is_the_flat_fee_explained() -> None:
    line = invoice_lines(TOKENS, 0, "tokens")
    assert (line.quantity, line.amount) == (0, 500)
    assert fixed_fee(TOKENS) == 500 and fixed_fee(CALLS) == 0
    assert meter_notes(TOKENS, 5 * Q, 0, 5 * Q, "tokens") == [
        "Your credits covered all 5 tokens used this period.",
        "Includes the $5.00 flat fee of the first tier, charged even when nothing is used."]


def test_volume_and_transform_lines() -> None:
    gb = invoice_lines(GB, 101 * Q, "GB")
    assert [(s.description, s.amount) for s in gb.sub_lines] == [
        ("All GB at the second tier's rate", Fraction(2020))]
    assert gb.amount == 2020
    small = invoice_lines(GB, 3 * Q, "GB")
    assert [(s.description, s.amount) for s in small.sub_lines] == [
        ("All GB at the first tier's rate", Fraction(75)),
        ("Flat fee of the first tier", Fraction(100))]
    by = invoice_lines(BYTES, 1_001 * Q, "bytes")
    assert (by.quantity, by.amount, by.unit_amount, by.per, by.sub_lines) \
        == (2, 50, Fraction(25), 1000, ())
    calls = invoice_lines(CALLS, 30 * Q, "calls")
    assert (calls.quantity, calls.amount, calls.exact, calls.unit_amount, calls.per) \
        == (30, 2, Fraction(3, 2), Fraction(1, 20), 1)
    three = invoice_lines(THREE, 150 * Q, "calls")
    assert [(s.description, s.quantity) for s in three.sub_lines] == [
        ("First 10 calls", 10), ("From 11 to 100 calls", 90), ("Over 100 calls", 50),
        ("Flat fee of the third tier", None)]


def test_notes_for_fractions_and_partial_cover() -> None:
    assert meter_notes(CALLS, 9 * Q, 3_612_600, 5_387_400, "calls") == [
        "Your credits covered 5.3874 of the 9 calls used this period.",
        "Billed in whole calls: 3 now; the remaining 0.6126 is added to later usage."]
    assert meter_notes(None, 2 * Q, 2 * Q, 0, "units") == []
    assert meter_notes(THREE, 200 * Q, 200 * Q, 0, "calls") == [
        "Includes the $7.00 flat fee of the third tier."]


def test_daily_costs_add_up_to_the_line() -> None:
    assert daily_costs(TOKENS, [500_000 * Q, 600_000 * Q, 0]) == [100, 110, 0]
    assert daily_costs(CALLS, [Q // 2, Q // 2, Q]) == [0, 0, 0]       # 0.05 cents x 2
    assert daily_costs(CALLS, [30 * Q, 30 * Q]) == [2, 1]             # 1.5 -> 2, 3 -> 3


def test_grant_names_hide_internal_ids() -> None:
    assert grant_name("stripe:in_123") == "Plan allowance"
    assert grant_name("stripe:cs_123") == "Credit purchase"
    assert grant_name("admin") == "Credit grant"
    assert grant_name(None) == "Credit grant"
    assert grant_name("monthly allowance") == "Monthly allowance"


@st.composite
def prices(draw: st.DrawFn) -> Price:
    rate = st.decimals(min_value=0, max_value=50, places=4)
    if draw(st.booleans()):
        tq = draw(st.none() | st.tuples(st.integers(1, 1000), st.sampled_from(["up", "down"])))
        p = {"currency": "usd", "unit_amount_decimal": str(draw(rate))}
        if tq is not None:
            p["transform_quantity"] = {"divide_by": tq[0], "round": tq[1]}
        return price_from_stripe(p)
    bounds = sorted(set(draw(st.lists(st.integers(1, 5000), min_size=0, max_size=4))))
    tiers = [Tier(b, draw(rate), draw(rate)) for b in bounds] + [Tier(None, draw(rate),
                                                                       draw(rate))]
    return Price("usd", "tiered", tiers_mode=draw(st.sampled_from(["graduated", "volume"])),
                 tiers=tuple(tiers))


@given(prices(), st.integers(-5 * Q, 20_000 * Q))
def test_sub_lines_sum_to_the_exact_line(price: Price, micro: int) -> None:
    line = invoice_lines(price, micro, "units")
    itemised = sum((s.amount for s in line.sub_lines), Fraction(0)) \
        if line.unit_amount is None else line.quantity * line.unit_amount
    assert itemised == line.exact == exact_amount(price, whole_units(micro))
    assert (line.unit_amount is None) == (price.billing_scheme == "tiered")
    assert line.amount == line_amount(price, micro)


@given(prices(), st.lists(st.integers(0, 3000 * Q), max_size=31))
def test_daily_costs_sum_to_the_period_line(price: Price, days: list[int]) -> None:
    assert fixed_fee(price) + sum(daily_costs(price, days)) == line_amount(price, sum(days))
