"""``proxy.credits.money``: the monetary accounts settlement burns against.

The property that matters (issue 12, finding 2): however a period's usage is split into
requests and however concurrent requests interleave their settlements, the burns sum to
exactly the Stripe invoice line of the period total (per-unit and graduated prices), in
integers; the admission quote never changes the account."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.credits.money import (
    MoneyBook,
    account_prices,
    in_use,
    load_charged,
    monetary_problems,
    rules_problems,
)
from proxy.periods import period_bounds
from proxy.pricing import Price, Tier, TransformQuantity, line_amount
from proxy.rules.model import Meter

U = 1_000_000
NOW = 1_767_225_600.0 + 10 * 86400          # 2026-01-11, inside January's period
GRADUATED = Price("usd", "tiered", tiers_mode="graduated", tiers=(
    Tier(1_000_000, Decimal("0.0002"), Decimal(500)), Tier(None, Decimal("0.0001"))))
VOLUME = Price("usd", "tiered", tiers_mode="volume", tiers=(
    Tier(100, Decimal(25)), Tier(None, Decimal(20))))
PER_UNIT = Price("usd", unit_amount_decimal=Decimal("0.0375"))
JPY = Price("jpy", unit_amount_decimal=Decimal("0.5"))
EUR_OPTION = Price("usd", unit_amount_decimal=Decimal(2),
                   currency_options=(("eur", Price("eur", unit_amount_decimal=Decimal("1.8"))),))

prices = st.sampled_from([GRADUATED, PER_UNIT,
                          Price("usd", "tiered", tiers_mode="graduated", tiers=(
                              Tier(5, Decimal("1.5"), Decimal(7)), Tier(20, Decimal("0.25")),
                              Tier(None, Decimal("0.125"), Decimal(3))))])
quantities = st.lists(st.integers(0, 3_000_000 * U), min_size=1, max_size=20)


@given(prices, quantities, st.randoms(use_true_random=False))
def test_burns_sum_to_the_line_of_the_total_in_any_order(price: Price, qs: list[int],
                                                         rnd: object) -> None:
    """Settlements are applied one at a time (the event loop's critical section) in any
    order concurrent requests finish: the sum is the line of the combined total."""
    book = MoneyBook()
    acct = book.open("c", None, "usd", {"m": price}, {}, NOW)
    order = list(qs)
    rnd.shuffle(order)                                          # type: ignore[attr-defined]
    burned = sum(book.costs(acct, [("m", q)], NOW)[0] for q in order)
    assert burned % acct.per_minor == 0
    assert burned // acct.per_minor == line_amount(price, sum(qs)) == acct.burned(NOW)


@given(quantities)
def test_a_volume_price_never_burns_less_than_its_line(qs: list[int]) -> None:
    """A volume total can fall into a cheaper tier: the burns are the highest line reached,
    never below the final line (the excess is the period-end true-up, docs/credits.md)."""
    book = MoneyBook()
    acct = book.open("c", None, "usd", {"m": VOLUME}, {}, NOW)
    burned = sum(book.costs(acct, [("m", q)], NOW)[0] for q in qs) // acct.per_minor
    total, peak = 0, 0
    for q in qs:
        total += q
        peak = max(peak, line_amount(VOLUME, total))
    assert burned == peak >= line_amount(VOLUME, total)


@given(prices, quantities, st.integers(0, 3_000_000 * U))
def test_a_quote_is_the_next_burn_and_changes_nothing(price: Price, qs: list[int],
                                                      extra: int) -> None:
    book = MoneyBook()
    acct = book.open("c", None, "usd", {"m": price}, {}, NOW)
    for q in qs:
        book.costs(acct, [("m", q)], NOW)
    state = (acct.meters["m"].total, acct.meters["m"].charged)
    quoted = book.quote(acct, [("m", extra)], NOW)
    assert (acct.meters["m"].total, acct.meters["m"].charged) == state
    assert quoted == book.costs(acct, [("m", extra)], NOW)[0]


def test_finding_2_in_money_and_a_reopened_account_goes_on_where_it_was() -> None:
    book = MoneyBook()
    acct = book.open("c", None, "usd", {"m": GRADUATED}, {}, NOW)
    assert book.costs(acct, [("m", 1_000_000 * U)], NOW) == [700 * 10_000]
    again = book.open("c", None, "usd", {"m": GRADUATED}, {"m": 1_000_000 * U}, NOW,
                      {"m": 400 * 10_000})
    assert (again.meters["m"].charged, again.covered(NOW)) == (700, 400 * 10_000)
    assert book.costs(again, [("m", 2_000_000 * U)], NOW) == [200 * 10_000]


def test_the_next_period_starts_at_zero_and_the_first_burn_pays_the_flat_fee() -> None:
    book = MoneyBook()
    acct = book.open("c", None, "usd", {"m": GRADUATED}, {"m": 3_000_000 * U}, NOW)
    assert acct.burned(NOW) == 900
    _start, end = period_bounds(None, NOW)
    assert book.costs(acct, [("m", 1 * U)], end + 5) == [500 * 10_000]   # flat fee + 0.0002
    assert acct.burned(end + 5) == 500 and acct.burned(NOW) == 0


def test_an_anchor_with_seconds_keeps_the_boundary_minute_in_the_old_period() -> None:
    """Anchor 12:30:15: staging bills the minute 12:30:00 on the old invoice, so a request at
    12:30:40 is priced on the old period's total; the new one opens at 12:31:00."""
    book = MoneyBook()
    anchor = 1_767_225_600 + 10 * 86400 + 12 * 3600 + 30 * 60 + 15      # 2026-01-11 12:30:15
    acct = book.open("c", anchor, "usd", {"m": GRADUATED}, {"m": 3_000_000 * U}, anchor - 60)
    # 12:30:40: 10,000 units at 0.0001 (the old period's second tier): 1 minor unit
    assert book.costs(acct, [("m", 10_000 * U)], anchor + 25) == [1 * 10_000]
    assert acct.meters["m"].total == 3_010_000 * U
    # 12:31:00: the new period, first tier: 500 flat + 10,000 x 0.0002
    assert book.costs(acct, [("m", 10_000 * U)], anchor + 45) == [502 * 10_000]
    assert (acct.meters["m"].start, acct.meters["m"].total) == (anchor + 45, 10_000 * U)


def test_zero_decimal_currency_and_unpriced_meters() -> None:
    book = MoneyBook()
    acct = book.open("c", None, "jpy", {"m": JPY}, {}, NOW)
    assert acct.per_minor == 1_000_000                      # 1 yen = 1 credit
    assert book.costs(acct, [("m", 3 * U), ("other", 5 * U)], NOW) == [2_000_000, 0]
    assert book.quote(acct, [("other", 5 * U)], NOW) == 0


def test_close_deactivates_the_book() -> None:
    book = MoneyBook()
    assert not book.active
    book.open("a", None, "usd", {}, {}, NOW)
    book.open("b", None, "usd", {}, {}, NOW)
    book.close("a")
    assert book.active and book.account("a") is None
    book.close("b")
    assert not book.active and book.accounts() == []


def test_load_charged() -> None:
    assert load_charged(GRADUATED, 0) == 0 and load_charged(None, 5 * U) == 0
    assert load_charged(GRADUATED, 2_000_000 * U) == 800


def test_account_prices_pick_the_customer_s_currency_option() -> None:
    cur, mine, problems = account_prices({"m": EUR_OPTION}, "EUR")
    assert (cur, mine["m"].currency, problems) == ("eur", "eur", [])
    cur, _mine, problems = account_prices({"m": PER_UNIT}, "eur")
    assert problems == ["meter 'm''s price is in usd and has no currency_options entry for eur"]
    cur, _mine, problems = account_prices({"a": PER_UNIT, "b": JPY}, None)
    assert "several currencies" in problems[0]
    assert account_prices({}, None)[0] == "usd"


def test_monetary_problems_name_each_meter() -> None:
    meters = {"ok": Meter("ok", "ok", price=PER_UNIT),
              "fetched": Meter("fetched", "fetched", price_id="price_1"),
              "none": Meter("none", "none"),
              "t": Meter("t", "t", price=PER_UNIT, transform=TransformQuantity(1000, "up")),
              "yen": Meter("yen", "yen", price=JPY)}
    assert monetary_problems(meters, ["ok", "fetched", "unknown"]) == []
    got = monetary_problems(meters, ["none", "t", "yen", "ok"])
    assert any("'none' has no Stripe price" in p for p in got)
    assert any("'t' has a rules `transform`" in p for p in got)
    assert any("jpy, usd" in p for p in got)


class _R:
    def __init__(self, meters: dict[str, Meter], used: list[str]) -> None:
        self.meters = meters
        self.rules = [type("Rule", (), {"usage": [type("U", (), {"meter": m})() for m in used]})()]


@pytest.mark.parametrize(("backend", "monetary", "problems"), [
    ("sqlite", False, 0), ("sqlite", True, 1), ("postgres", True, 1), ("postgres", False, 0)])
def test_rules_problems_only_while_the_mode_is_in_use(backend: str, monetary: bool,
                                                      problems: int) -> None:
    got = rules_problems(backend, _R({"none": Meter("none", "none")}, ["none"]), monetary)
    assert len(got) == problems
    if backend == "postgres" and monetary:
        assert "sqlite" in got[0]


def test_in_use() -> None:
    class C:
        def __init__(self, m: str | None) -> None:
            self.credit_mode = m
    assert in_use("monetary", [])
    assert not in_use("units", [C(None), C("units")])
    assert in_use("units", [C(None), C("monetary")])
