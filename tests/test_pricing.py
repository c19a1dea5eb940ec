"""Pricing engine: every worked example of docs/stripe-notes.md "Prices" to the cent,
hypothesis properties against a unit-by-unit brute-force oracle, the rules file's
``price:`` section with exact FILE:LINE:COL problems, and the Prices API fetch + cache."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Mapping, Sequence
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import example, given
from hypothesis import strategies as st

from proxy.pricing import (
    Price,
    PriceError,
    Tier,
    TransformQuantity,
    billed_quantity,
    exact_amount,
    fmt_minor,
    line_amount,
    meter_prices,
    minor_exponent,
    period_charges,
    price_from_stripe,
    prices_in,
    round_line,
    units_amount,
    whole_units,
)
from proxy.rules import Meter, check_rules, load_rules
from proxy.stripe.client import StripeClient
from proxy.stripe.prices import FetchFailed, PriceCache, fetch_prices
from proxy.units import QSCALE
from tests.servers import serve

U = QSCALE  # one whole unit in micro-units


Row = tuple[int | str, object, object]


def tiered(mode: str, rows: Sequence[Row], **extra: object) -> Price:
    """A tiered Price from (up_to, unit_amount_decimal, flat_amount_decimal) rows."""
    obj: dict[str, object] = {
        "currency": "usd", "billing_scheme": "tiered", "tiers_mode": mode,
        "tiers": [{"up_to": u, "unit_amount_decimal": str(a), "flat_amount_decimal": str(f)}
                  for u, a, f in rows]}
    obj.update(extra)
    return price_from_stripe(obj, strict=True)


# --------------------------------------------------------------- contract worked examples

# tiers 1-5 at 7, 6-10 at 6.5, 11+ at 6 (minor units)
SEVEN: list[Row] = [(5, 7, 0), (10, "6.5", 0), ("inf", 6, 0)]
# (up_to, unit, flat) = (5, 5, 10), (10, 4, 20), (15, 3, 30), (20, 2, 40), (inf, 1, 50)
FIVE: list[Row] = [(5, 5, 10), (10, 4, 20), (15, 3, 30), (20, 2, 40), ("inf", 1, 50)]

EXAMPLES: list[tuple[str, list[Row], str, int, Fraction]] = [
    ("7/6.5/6 volume 6", SEVEN, "volume", 6, Fraction(39)),
    ("7/6.5/6 volume 20", SEVEN, "volume", 20, Fraction(120)),
    ("7/6.5/6 volume 25", SEVEN, "volume", 25, Fraction(150)),
    ("7/6.5/6 graduated 6", SEVEN, "graduated", 6, Fraction("41.5")),
    ("7/6.5/6 graduated 20", SEVEN, "graduated", 20, Fraction("127.5")),
    ("7/6.5/6 graduated 25", SEVEN, "graduated", 25, Fraction("157.5")),
    ("5-tier volume 12", FIVE, "volume", 12, Fraction(66)),
    ("5-tier graduated 12", FIVE, "graduated", 12, Fraction(111)),
    ("5-tier volume 0", FIVE, "volume", 0, Fraction(10)),
    ("5-tier graduated 0", FIVE, "graduated", 0, Fraction(10)),
]


@pytest.mark.parametrize(("name", "rows", "mode", "qty", "exact"), EXAMPLES,
                         ids=[e[0] for e in EXAMPLES])
def test_contract_tier_examples(name: str, rows: list[Row],
                                mode: str, qty: int, exact: Fraction) -> None:
    price = tiered(mode, rows)
    assert exact_amount(price, qty) == exact
    # one rounding per line, half up: 41.5 -> 42, 127.5 -> 128, 157.5 -> 158
    assert line_amount(price, qty * U) == math.floor(exact + Fraction(1, 2))
    assert isinstance(line_amount(price, qty * U), int)


@pytest.mark.parametrize(("qty", "volume", "graduated"),
                         [(6, 3900, 4150), (20, 12000, 12750), (25, 15000, 15750)])
def test_contract_examples_read_as_dollars_are_exact_cents(qty: int, volume: int,
                                                            graduated: int) -> None:
    """Stripe's docs state the same table in dollars ($7, $6.50, $6): to the cent."""
    cents: list[Row] = [(5, 700, 0), (10, 650, 0), ("inf", 600, 0)]
    assert line_amount(tiered("volume", cents), qty * U) == volume
    assert line_amount(tiered("graduated", cents), qty * U) == graduated


def test_contract_transform_quantity_150_minutes_at_10_per_hour() -> None:
    price = price_from_stripe({"currency": "usd", "unit_amount": 10,
                               "transform_quantity": {"divide_by": 60, "round": "up"}},
                              strict=True)
    assert billed_quantity(price, 150) == 3
    assert line_amount(price, 150 * U) == 30
    down = Price("usd", unit_amount_decimal=Decimal(10),
                 transform_quantity=TransformQuantity(60, "down"))
    assert line_amount(down, 150 * U) == 20


def test_contract_decimal_amount_rounded_once_per_line() -> None:
    price = price_from_stripe({"currency": "usd", "unit_amount_decimal": "0.05"}, strict=True)
    assert exact_amount(price, 30) == Fraction(3, 2)
    assert line_amount(price, 30 * U) == 2          # 1.5 cents billed as 2, once per line
    assert line_amount(price, 29 * U) == 1          # 1.45 -> 1
    assert sum(line_amount(price, U) for _ in range(30)) == 0  # why never per unit


def test_contract_negative_total_bills_as_zero() -> None:
    per_unit = price_from_stripe({"currency": "usd", "unit_amount": 25}, strict=True)
    assert line_amount(per_unit, -5 * U) == 0
    assert line_amount(per_unit, -1) == 0
    # a negative total is zero usage: a tiered price still bills its first tier's flat fee
    assert line_amount(tiered("graduated", FIVE), -7 * U) == 10
    assert line_amount(tiered("volume", FIVE), -7 * U) == 10


def test_whole_units_only_are_priced() -> None:
    """Stripe gets whole units (floor; the rest is carried), so fractions are not billed."""
    price = price_from_stripe({"currency": "usd", "unit_amount": 100})
    assert whole_units(2 * U + U - 1) == 2
    assert line_amount(price, 2 * U + 999_999) == 200
    assert line_amount(price, 999_999) == 0


def test_round_line_half_up_and_never_negative() -> None:
    assert round_line(Fraction(1, 2)) == 1
    assert round_line(Fraction(3, 2)) == 2
    assert round_line(Fraction(5, 2)) == 3     # half up, not banker's rounding
    assert round_line(Fraction(249, 100)) == 2
    assert round_line(Fraction(-3)) == 0


def test_twelve_decimal_places_stay_exact() -> None:
    price = price_from_stripe({"currency": "usd", "unit_amount_decimal": "0.000000000001"})
    assert exact_amount(price, 10**15) == 1000
    assert units_amount(price, 10**15 - 1) == 1000  # 999.999999999999 -> 1000
    big = price_from_stripe({"currency": "usd", "unit_amount_decimal": "123456789.123456789012"})
    assert exact_amount(big, 10**18) == Fraction(Decimal("123456789.123456789012")) * 10**18


# --------------------------------------------------------------- simulate helpers


def test_period_charges_bills_every_priced_meter() -> None:
    prices = {"calls": price_from_stripe({"currency": "usd", "unit_amount_decimal": "0.05"}),
              "tokens": tiered("graduated", FIVE)}
    got = period_charges(prices, {"calls": 30 * U, "unpriced": 99 * U})
    assert got == {"calls": 2, "tokens": 10}   # no token usage: the first tier's flat fee


@pytest.mark.parametrize(("amount", "currency", "text"), [
    (1234, "usd", "12.34"), (5, "usd", "0.05"), (0, "eur", "0.00"), (-1234, "usd", "-12.34"),
    (500, "jpy", "500"), (500, "JPY", "500"), (12345, "kwd", "12.345"), (100, "isk", "1.00"),
])
def test_fmt_minor(amount: int, currency: str, text: str) -> None:
    assert fmt_minor(amount, currency) == text


def test_minor_exponent() -> None:
    assert (minor_exponent("usd"), minor_exponent("krw"), minor_exponent("bhd")) == (2, 0, 3)


def test_meter_prices_prefers_stripe_then_rules() -> None:
    rules_price = price_from_stripe({"currency": "usd", "unit_amount": 1})
    meters = {"a": Meter("a", "a", price=rules_price, price_id="price_a"),
              "b": Meter("b", "b", price_id="price_b"),
              "c": Meter("c", "c")}
    assert meter_prices(meters) == {"a": rules_price}


# --------------------------------------------------------------- properties and oracle

_up_tos = st.lists(st.integers(1, 3000), min_size=0, max_size=5, unique=True).map(sorted)
_amount = st.one_of(
    st.integers(0, 5000).map(Decimal),
    st.decimals(min_value=0, max_value=100, places=12, allow_nan=False, allow_infinity=False))


@st.composite
def tier_tables(draw: st.DrawFn) -> tuple[Tier, ...]:
    bounds: list[int | None] = [*draw(_up_tos), None]
    return tuple(Tier(b, draw(_amount), draw(st.one_of(st.just(Decimal(0)), _amount)))
                 for b in bounds)


def _tier_of_unit(tiers: Sequence[Tier], k: int) -> int:
    """Brute force: the tier whose range [previous up_to + 1, up_to] holds unit k."""
    low = 1
    for i, t in enumerate(tiers):
        if t.up_to is None or low <= k <= t.up_to:
            return i
        low = t.up_to + 1
    raise AssertionError("no tier")


def oracle(tiers: Sequence[Tier], mode: str, q: int) -> Fraction:
    """Independent reference: graduated unit by unit, volume by the tier of the total."""
    if mode == "volume":
        t = tiers[0] if q == 0 else tiers[_tier_of_unit(tiers, q)]
        return q * Fraction(t.unit_amount_decimal) + Fraction(t.flat_amount_decimal)
    total = Fraction(0)
    reached = {0}                       # the first tier's flat fee is always billed
    for k in range(1, q + 1):
        i = _tier_of_unit(tiers, k)
        reached.add(i)
        total += Fraction(tiers[i].unit_amount_decimal)
    return total + sum((Fraction(tiers[i].flat_amount_decimal) for i in reached), Fraction(0))


FLAT = (Tier(5, Decimal(5), Decimal(10)), Tier(10, Decimal(4), Decimal(20)), Tier(None, Decimal(3), Decimal(30)))


# every known boundary: quantity exactly at an up_to (and one past it), zero, with flat fees
@given(tier_tables(), st.sampled_from(["graduated", "volume"]), st.integers(0, 10_000))
@example(FLAT, "graduated", 5)
@example(FLAT, "graduated", 6)
@example(FLAT, "graduated", 10)
@example(FLAT, "graduated", 11)
@example(FLAT, "graduated", 0)
@example(FLAT, "volume", 5)
@example(FLAT, "volume", 6)
@example(FLAT, "volume", 10)
@example(FLAT, "volume", 0)
def test_engine_agrees_with_brute_force_oracle(tiers: tuple[Tier, ...], mode: str,
                                               q: int) -> None:
    price = Price("usd", "tiered", tiers_mode=mode, tiers=tiers)  # type: ignore[arg-type]
    assert exact_amount(price, q) == oracle(tiers, mode, q)
    got = line_amount(price, q * U)
    assert got >= 0
    assert got == math.floor(oracle(tiers, mode, q) + Fraction(1, 2))


@given(tier_tables(), st.integers(0, 10_000), st.integers(0, 10_000))
@example(FLAT, 5, 6)
@example(FLAT, 10, 11)
def test_graduated_cost_is_monotone(tiers: tuple[Tier, ...], a: int, b: int) -> None:
    price = Price("usd", "tiered", tiers_mode="graduated", tiers=tiers)
    lo, hi = sorted((a, b))
    assert exact_amount(price, lo) <= exact_amount(price, hi)
    assert line_amount(price, lo * U) <= line_amount(price, hi * U)


@given(tier_tables(), st.integers(0, 10_000))
@example(FLAT, 5)
@example(FLAT, 10)
def test_volume_cost_is_quantity_times_its_tier_rate_plus_flat(tiers: tuple[Tier, ...],
                                                              q: int) -> None:
    price = Price("usd", "tiered", tiers_mode="volume", tiers=tiers)
    tier = next(t for t in tiers if t.up_to is None or q <= t.up_to)
    expected = q * Fraction(tier.unit_amount_decimal) + Fraction(tier.flat_amount_decimal)
    assert exact_amount(price, q) == expected
    assert line_amount(price, q * U) == round_line(expected)


@given(st.integers(0, 10**9), st.integers(1, 10**6), st.sampled_from(["up", "down"]),
       _amount)
def test_transform_quantity_rounding_is_ceil_or_floor(units: int, divide_by: int,
                                                      rnd: str, rate: Decimal) -> None:
    price = Price("usd", unit_amount_decimal=rate,
                  transform_quantity=TransformQuantity(divide_by, rnd))  # type: ignore[arg-type]
    exact = Fraction(units, divide_by)
    billed = billed_quantity(price, units)
    assert billed == (math.ceil(exact) if rnd == "up" else math.floor(exact))
    assert exact_amount(price, units) == billed * Fraction(rate)


@given(st.integers(-10**12, 10**15), _amount)
@example(30 * U, Decimal("0.05"))          # 1.5 -> 2 (half up)
@example(29 * U, Decimal("0.05"))          # 1.45 -> 1
@example(10 * U, Decimal("0.05"))          # 0.5 -> 1
@example(9 * U, Decimal("0.05"))           # 0.45 -> 0
@example(U - 1, Decimal(5000))             # 0.999999 units: 0 whole units, 0
@example(-U, Decimal(7))                   # negative total: 0
def test_totals_are_whole_minor_units_rounded_half_up(quantity_micro: int,
                                                      rate: Decimal) -> None:
    """One rounding per line, half up: got - 1/2 <= exact < got + 1/2, exactly."""
    price = Price("usd", unit_amount_decimal=rate)
    got = line_amount(price, quantity_micro)
    exact = max(quantity_micro, 0) // U * Fraction(rate)
    assert type(got) is int and got >= 0
    assert Fraction(got) - Fraction(1, 2) <= exact < Fraction(got) + Fraction(1, 2)


# --------------------------------------------------------------- price_from_stripe


def test_price_from_stripe_reads_the_api_object() -> None:
    """A Price object as GET /v1/prices/{id}?expand[]=tiers returns it: both amount forms,
    nulls, last up_to null, and many fields we ignore."""
    obj: dict[str, Any] = {
        "id": "price_1", "object": "price", "active": True, "currency": "usd",
        "billing_scheme": "tiered", "tiers_mode": "graduated", "type": "recurring",
        "recurring": {"interval": "month", "usage_type": "metered", "meter": "mtr_1"},
        "unit_amount": None, "unit_amount_decimal": None, "transform_quantity": None,
        "tiers": [
            {"up_to": 5, "unit_amount": 5, "unit_amount_decimal": "5",
             "flat_amount": 10, "flat_amount_decimal": "10"},
            {"up_to": None, "unit_amount": None, "unit_amount_decimal": "0.5",
             "flat_amount": None, "flat_amount_decimal": None},
        ],
    }
    price = price_from_stripe(obj)
    assert price.id == "price_1"
    assert price.tiers == (Tier(5, Decimal(5), Decimal(10)), Tier(None, Decimal("0.5")))
    assert line_amount(price, 7 * U) == 5 * 5 + 10 + 1


def test_price_from_stripe_accepts_sdk_decimals() -> None:
    price = price_from_stripe({"currency": "USD", "billing_scheme": "per_unit",
                               "unit_amount": None, "unit_amount_decimal": Decimal("0.25"),
                               "tiers_mode": None})
    assert (price.currency, price.unit_amount_decimal) == ("usd", Decimal("0.25"))


@pytest.mark.parametrize(("obj", "message"), [
    ({"unit_amount": 5}, "price needs currency (a three-letter ISO code like usd)"),
    ({"currency": "usd"},
     "price needs unit_amount_decimal or unit_amount (billing_scheme per_unit)"),
    ({"currency": "usd", "unit_amount_decimal": "0.0000000000001"},
     "price unit_amount_decimal has more than 12 decimal places: 0.0000000000001"),
    ({"currency": "usd", "unit_amount": -1},
     "price unit_amount must be a non-negative integer, got number -1"),
    ({"currency": "usd", "unit_amount": "5"},
     "price unit_amount must be a non-negative integer, got string '5'"),
    ({"currency": "usd", "unit_amount_decimal": "abc"},
     "price unit_amount_decimal must be a decimal string like \"0.25\" (minor units), "
     "got string 'abc'"),
    ({"currency": "usd", "billing_scheme": "flat", "unit_amount": 1},
     "price billing_scheme must be per_unit or tiered, got 'flat'"),
    ({"currency": "usd", "unit_amount": 1, "transform_quantity": {"divide_by": 0, "round": "up"}},
     "price transform_quantity.divide_by must be a positive integer, got number 0"),
    ({"currency": "usd", "billing_scheme": "tiered", "tiers_mode": "volume",
      "tiers": [{"up_to": 10, "unit_amount": 1}]},
     "price tiers[0].up_to must be inf: the last tier has no upper bound"),
])
def test_price_from_stripe_errors_name_the_field(obj: Mapping[str, object], message: str) -> None:
    with pytest.raises(ValueError) as err:
        price_from_stripe(obj)
    assert isinstance(err.value, PriceError)
    assert str(err.value) == message


def test_hand_built_price_is_checked() -> None:
    with pytest.raises(ValueError):
        Price("usd", "tiered", tiers_mode="volume", tiers=(Tier(5), Tier(3), Tier(None)))
    with pytest.raises(ValueError):
        Price("usd", "tiered", tiers_mode="volume", tiers=(Tier(5),))
    with pytest.raises(ValueError):
        Price("usd")


# --------------------------------------------------------------- rules file prices:

METER_HEAD = "version: 1\nmeters:\n  llm_tokens:\n    stripe_event_name: llm_tokens\n"


def _rules(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "prices.yaml"
    p.write_text(METER_HEAD + body)
    return p


def test_rules_price_graduated_and_price_id(tmp_path: Path) -> None:
    p = _rules(tmp_path, (
        "    price_id: price_123\n"
        "    price: {currency: usd, billing_scheme: tiered, tiers_mode: graduated, tiers: [\n"
        "      {up_to: 1000000, unit_amount_decimal: \"0.002\"},\n"
        "      {up_to: inf, unit_amount_decimal: 0.001}]}\n"
        "  api_calls: {stripe_event_name: api_calls, price_id: price_456}\n"))
    rs = load_rules([p])
    m = rs.meters["llm_tokens"]
    assert m.price_id == "price_123"
    assert m.price == Price("usd", "tiered", tiers_mode="graduated", tiers=(
        Tier(1_000_000, Decimal("0.002")), Tier(None, Decimal("0.001"))), id="price_123")
    assert line_amount(m.price, 1_500_000 * U) == 2000 + 500
    assert rs.meters["api_calls"].price is None
    assert rs.meters["api_calls"].price_id == "price_456"


def test_rules_price_per_unit_with_transform(tmp_path: Path) -> None:
    p = _rules(tmp_path, "    price:\n      currency: usd\n      unit_amount: 10\n"
                         "      transform_quantity: {divide_by: 60, round: up}\n")
    m = load_rules([p]).meters["llm_tokens"]
    assert m.price is not None and m.price_id is None
    assert line_amount(m.price, 150 * U) == 30


# (price block appended under the meter, ["LINE:COL: message", ...]): the block starts on
# line 5; a missing field points at the mapping that should hold it
PRICE_ERRORS: list[tuple[str, str, list[str]]] = [
    ("tiers out of order",
     "    price:\n"
     "      currency: usd\n"
     "      billing_scheme: tiered\n"
     "      tiers_mode: volume\n"
     "      tiers:\n"
     "        - {up_to: 100, unit_amount: 5}\n"
     "        - {up_to: 50, unit_amount: 4}\n"
     "        - {up_to: inf, unit_amount: 3}\n",
     ["11:19: price tiers[1].up_to must be greater than the previous tier's up_to (100): "
      "tiers go in increasing order"]),
    ("missing last inf tier",
     "    price:\n"
     "      currency: usd\n"
     "      billing_scheme: tiered\n"
     "      tiers_mode: graduated\n"
     "      tiers:\n"
     "        - {up_to: 100, unit_amount: 5}\n"
     "        - {up_to: 200, unit_amount: 4}\n",
     ["11:19: price tiers[1].up_to must be inf: the last tier has no upper bound"]),
    ("inf before the last tier",
     "    price:\n"
     "      currency: usd\n"
     "      billing_scheme: tiered\n"
     "      tiers_mode: graduated\n"
     "      tiers:\n"
     "        - {up_to: inf, unit_amount: 5}\n"
     "        - {up_to: inf, unit_amount: 4}\n",
     ["10:19: price tiers[0].up_to is inf but only the last tier may be unbounded"]),
    ("unknown field",
     "    price:\n"
     "      currency: usd\n"
     "      unit_amout: 5\n",
     ["6:7: price needs unit_amount_decimal or unit_amount (billing_scheme per_unit)",
      "7:7: unknown key 'unit_amout' in price; did you mean 'unit_amount'?"]),
    ("both unit_amount and unit_amount_decimal",
     "    price: {currency: usd, unit_amount: 5, unit_amount_decimal: \"5.5\"}\n",
     ["5:44: price has both unit_amount and unit_amount_decimal; use one"]),
    ("transform with tiers",
     "    price:\n"
     "      currency: usd\n"
     "      billing_scheme: tiered\n"
     "      tiers_mode: volume\n"
     "      transform_quantity: {divide_by: 60, round: up}\n"
     "      tiers: [{up_to: inf, unit_amount: 1}]\n",
     ["9:7: price transform_quantity cannot be used with tiers"]),
    ("bad tier fields",
     "    price:\n"
     "      currency: usd\n"
     "      billing_scheme: tiered\n"
     "      tiers_mode: stacked\n"
     "      tiers:\n"
     "        - {up_to: 0, flat_amount: 1.5}\n"
     "        - {up_to: inf, unit_amount: 1, unit_amount_decimal: \"1\", flat: 2}\n",
     ["8:19: price tiers_mode must be graduated or volume, got 'stacked'",
      "10:19: price tiers[0].up_to must be a positive integer or inf, got number 0",
      "10:35: price tiers[0].flat_amount must be a non-negative integer, got number 1.5",
      "11:40: price tiers[1] has both unit_amount and unit_amount_decimal; use one",
      "11:66: unknown key 'flat' in price tiers[1] (expected: up_to, unit_amount, "
      "unit_amount_decimal, flat_amount, flat_amount_decimal)"]),
    ("tiers without billing_scheme, bad currency, bad price_id",
     "    price_id: \"\"\n"
     "    price:\n"
     "      currency: dollars\n"
     "      unit_amount_decimal: \"0.1\"\n"
     "      tiers: [{up_to: inf, unit_amount: 1}]\n",
     ["5:15: price_id must be a non-empty string, got an empty string",
      "7:17: price currency must be a three-letter ISO code like usd, got string 'dollars'",
      "9:7: price tiers needs billing_scheme: tiered (this price is per_unit)"]),
    ("tiered without tiers, price not a mapping elsewhere",
     "    price: {currency: usd, billing_scheme: tiered, unit_amount: 3}\n"
     "  api_calls: {stripe_event_name: api_calls, price: 5}\n",
     ["5:12: price needs tiers_mode (graduated or volume) with billing_scheme: tiered",
      "5:12: price needs tiers with billing_scheme: tiered",
      "5:52: price unit_amount is for per_unit prices; a tiered price sets amounts in its "
      "tiers",
      "6:52: price must be a mapping, got number"]),
]


@pytest.mark.parametrize(("name", "body", "expected"), PRICE_ERRORS,
                         ids=[c[0] for c in PRICE_ERRORS])
def test_rules_price_problems_have_positions(tmp_path: Path, name: str, body: str,
                                             expected: list[str]) -> None:
    p = _rules(tmp_path, body)
    got = [str(problem) for problem in check_rules([p])]
    assert got == [f"{p}:{e}" for e in expected]


def test_example_rules_file_prices() -> None:
    rs = load_rules([Path(__file__).parent.parent / "rules" / "example.yaml"])
    prices = meter_prices(rs.meters)
    assert set(prices) == {"api_calls", "llm_tokens", "gb_processed"}
    got = period_charges(prices, {"api_calls": 30_000 * U, "llm_tokens": 1_500_000 * U,
                                  "gb_processed": 120 * U})
    # $15.00 of calls; $5 + $2 + $0.50 of tokens; 120 GB all at $0.20
    assert {m: fmt_minor(a, "usd") for m, a in got.items()} == {
        "api_calls": "15.00", "llm_tokens": "7.50", "gb_processed": "24.00"}


# --------------------------------------------------------------- fetch + cache
# The Stripe test double (tests/stripe_double) has no /v1/prices route, so these tests run
# a tiny aiohttp stub on loopback that answers GET /v1/prices/{id} with Price object JSON
# (as Stripe does, with expand[]=tiers) and the real SDK talks to it.

STUB_PRICES: dict[str, dict[str, Any]] = {
    "price_tiered": {
        "id": "price_tiered", "object": "price", "currency": "usd", "active": True,
        "billing_scheme": "tiered", "tiers_mode": "volume", "unit_amount": None,
        "unit_amount_decimal": None, "transform_quantity": None, "type": "recurring",
        "tiers": [{"up_to": 10, "unit_amount": 5, "unit_amount_decimal": "5",
                   "flat_amount": None, "flat_amount_decimal": None},
                  {"up_to": None, "unit_amount": None, "unit_amount_decimal": "2.5",
                   "flat_amount": 100, "flat_amount_decimal": "100"}]},
    "price_unit": {
        "id": "price_unit", "object": "price", "currency": "eur", "active": True,
        "billing_scheme": "per_unit", "tiers_mode": None, "unit_amount": None,
        "unit_amount_decimal": "0.05", "type": "recurring",
        "transform_quantity": {"divide_by": 1000, "round": "up"}},
    "price_custom": {
        "id": "price_custom", "object": "price", "currency": "usd", "active": True,
        "billing_scheme": "per_unit", "tiers_mode": None, "unit_amount": None,
        "unit_amount_decimal": None, "custom_unit_amount": {"preset": 500}},
}


class StubStripe:
    def __init__(self) -> None:
        self.prices = {k: dict(v) for k, v in STUB_PRICES.items()}
        self.fail = False
        self.seen: list[tuple[str, str]] = []

    async def price(self, request: web.Request) -> web.Response:
        pid = request.match_info["id"]
        # the SDK sends expand=["tiers"] as expand[0]=tiers
        expand = [v for k, v in request.query.items() if k.startswith("expand")]
        self.seen.append((pid, ",".join(expand)))
        if self.fail:
            return web.json_response({"error": {"type": "api_error", "message": "boom"}},
                                     status=500)
        if pid not in self.prices:
            return web.json_response(
                {"error": {"type": "invalid_request_error", "code": "resource_missing",
                           "message": f"No such price: '{pid}'", "param": "price"}},
                status=404)
        return web.json_response(self.prices[pid])


@pytest.fixture
async def stub() -> AsyncIterator[tuple[StubStripe, StripeClient]]:
    s = StubStripe()
    app = web.Application()
    app.router.add_get("/v1/prices/{id}", s.price)
    async with serve(app) as url:
        conn = StripeClient("sk_test_pricing", api_base=url, timeout=5)
        yield s, conn
        await conn.close()


async def test_fetch_prices_through_the_sdk(stub: tuple[StubStripe, StripeClient]) -> None:
    s, conn = stub
    got = await fetch_prices(conn, ["price_tiered", "price_unit", "price_custom", "price_nope",
                                    "price_unit"])
    assert set(got) == {"price_tiered", "price_unit", "price_custom", "price_nope"}
    tiered_p, unit_p = got["price_tiered"], got["price_unit"]
    assert isinstance(tiered_p, Price) and isinstance(unit_p, Price)
    assert tiered_p.id == "price_tiered"
    assert line_amount(tiered_p, 10 * U) == 50
    assert line_amount(tiered_p, 11 * U) == 128            # 11 x 2.5 + 100 = 127.5 -> 128
    assert unit_p.currency == "eur" and line_amount(unit_p, 1001 * U) == 0  # 2 x 0.05 = 0.1
    custom, nope = got["price_custom"], got["price_nope"]
    assert isinstance(custom, FetchFailed) and custom.permanent
    assert "unit_amount" in custom.reason
    assert isinstance(nope, FetchFailed) and nope.permanent and "No such price" in nope.reason
    assert ("price_tiered", "tiers,currency_options") in s.seen


async def test_price_cache_refreshes_and_keeps_last_good(
        stub: tuple[StubStripe, StripeClient]) -> None:
    s, conn = stub
    now = [1000.0]
    cache = PriceCache(lambda ids: fetch_prices(conn, ids), ["price_unit", "price_tiered"],
                       ttl=60, retry=5, clock=lambda: now[0])
    assert cache.stale() and cache.get("price_unit") is None
    first = await cache.get_fresh("price_unit")
    assert first is not None and first.unit_amount_decimal == Decimal("0.05")
    assert not cache.stale() and cache.errors == {}

    s.prices["price_unit"]["unit_amount_decimal"] = "0.07"
    now[0] += 30
    assert (await cache.get_fresh("price_unit")) == first      # within ttl: no fetch
    now[0] += 31
    fresh = await cache.get_fresh("price_unit")
    assert fresh is not None and fresh.unit_amount_decimal == Decimal("0.07")

    s.fail = True
    now[0] += 61
    await cache.refresh()
    assert cache.get("price_unit") == fresh                    # last good price kept
    assert set(cache.errors) == {"price_unit", "price_tiered"}
    assert not cache.errors["price_unit"].permanent
    now[0] += 4
    assert not cache.stale()
    now[0] += 1
    assert cache.stale()                                       # retried sooner than ttl

    s.fail = False
    await cache.refresh()
    assert cache.errors == {} and set(cache.prices) == {"price_unit", "price_tiered"}
    meters = {"tokens": Meter("tokens", "tokens", price_id="price_tiered"),
              "calls": Meter("calls", "calls", price=Price("usd", unit_amount_decimal=Decimal(1)),
                             price_id="price_unit")}
    chosen = meter_prices(meters, cache)
    assert chosen["tokens"] == cache.get("price_tiered")
    assert chosen["calls"] == cache.get("price_unit")          # Stripe's price wins


async def test_price_cache_survives_a_broken_fetcher() -> None:
    async def broken(ids: Sequence[str]) -> Mapping[str, Price | FetchFailed]:
        raise RuntimeError("bug")

    cache = PriceCache(broken, ["price_x"], ttl=60)
    await cache.refresh()
    assert cache.get("price_x") is None and "RuntimeError" in cache.errors["price_x"].reason


# ---- currency_options: a price in the customer's currency -------------------------------

MULTI = {"id": "price_m", "currency": "usd", "unit_amount_decimal": "0.5",
         "transform_quantity": {"divide_by": 10, "round": "up"},
         "currency_options": {"eur": {"unit_amount_decimal": "0.45", "tax_behavior": "exclusive"},
                              "JPY": {"unit_amount": 1}}}
MULTI_TIERED = {"currency": "usd", "billing_scheme": "tiered", "tiers_mode": "graduated",
                "tiers": [{"up_to": 100, "unit_amount_decimal": "2", "flat_amount": 100},
                          {"up_to": "inf", "unit_amount_decimal": "0.5"}],
                "currency_options": {"eur": {"tiers": [
                    {"up_to": 100, "unit_amount_decimal": "1.8", "flat_amount": 90},
                    {"up_to": "inf", "unit_amount_decimal": "0.45"}]}}}


def test_currency_options_price_the_customer_s_currency() -> None:
    p = price_from_stripe(MULTI)
    eur = p.in_currency("EUR")
    assert (eur.currency, eur.unit_amount_decimal, eur.transform_quantity, eur.id) == \
        ("eur", Decimal("0.45"), p.transform_quantity, "price_m")
    assert p.in_currency("jpy").unit_amount_decimal == Decimal(1)
    assert p.in_currency(None) is p and p.in_currency("usd") is p
    assert p.in_currency("gbp") is p                 # no option: the price's own currency
    assert line_amount(eur, 95 * QSCALE) == 5        # 10 tens at 0.45, rounded once
    assert p.with_id("price_x").in_currency("eur").id == "price_x"
    t = price_from_stripe(MULTI_TIERED, strict=True)
    te = t.in_currency("eur")
    assert (te.billing_scheme, te.tiers_mode) == ("tiered", "graduated")
    assert line_amount(te, 150 * QSCALE) == 90 + 180 + 23     # 22.5 rounds half up
    assert line_amount(t, 150 * QSCALE) == 100 + 200 + 25
    assert period_charges(prices_in({"a": t, "b": p}, "eur"), {"a": 150 * QSCALE}) == \
        {"a": 293, "b": 0}


@pytest.mark.parametrize(("options", "message"), [
    ({"usd": {"unit_amount": 1}}, "is the price's own currency"),
    ({"euro": {"unit_amount": 1}}, "three-letter ISO codes"),
    ({"eur": {}}, "needs unit_amount_decimal or unit_amount"),
    ({"eur": {"unit_amount_decimal": "-1"}}, "must not be negative"),
    ({"eur": {"tiers": [{"up_to": "inf", "unit_amount": 1}]}}, "sets tiers but the price is per_unit"),
    ({"eur": {"unit_amount": 1, "tax_behavior": "exclusive"}}, "unknown key 'tax_behavior'"),
    ({"eur": 3}, "must be a mapping"),
    ({"eur": {"unit_amount": 1}, "EUR": {"unit_amount": 2}}, "has eur twice"),
    ([1], "must be a mapping of currency"),
])
def test_currency_options_are_validated_like_the_price(options: object, message: str) -> None:
    with pytest.raises(PriceError, match=message):
        price_from_stripe({"currency": "usd", "unit_amount": 2, "currency_options": options},
                          strict=True)


def test_a_tiered_price_s_options_need_tiers() -> None:
    bad = {**MULTI_TIERED, "currency_options": {"eur": {"unit_amount": 1}}}
    with pytest.raises(PriceError, match="sets unit_amount but the price is tiered") as e:
        price_from_stripe(bad)
    assert any("needs tiers" in i.message for i in e.value.issues)
    worse = {**MULTI_TIERED, "currency_options": {"eur": {"tiers": [{"up_to": 5}]}}}
    with pytest.raises(PriceError, match=r"currency_options\.eur\.tiers\[0\]"):
        price_from_stripe(worse)


@given(st.decimals(min_value=0, max_value=1000, places=3),
       st.decimals(min_value=0, max_value=1000, places=3),
       st.sampled_from(["eur", "gbp", None]), st.integers(0, 10**6))
def test_a_customer_pays_its_currency_s_amounts(usd: Decimal, eur: Decimal, cur: str | None,
                                                units: int) -> None:
    p = price_from_stripe({"currency": "usd", "unit_amount_decimal": str(usd),
                           "currency_options": {"eur": {"unit_amount_decimal": str(eur)}}})
    got = p.in_currency(cur)
    want = eur if cur == "eur" else usd
    assert got.currency == ("eur" if cur == "eur" else "usd")
    assert line_amount(got, units * QSCALE) == \
        line_amount(Price(got.currency, "per_unit", want), units * QSCALE)
