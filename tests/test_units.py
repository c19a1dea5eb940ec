"""proxy.units.parse_duration: the one duration grammar (config values, the admin API's
reconcile ``grace`` through ``proxy.admin.input.duration``, the CLI's ``--grace``); and
proxy.units.CreditRate / cost_micro: a credit cost is the exact ceiling."""

from __future__ import annotations

import math
import re
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from proxy.units import DURATION_PATTERN, MAX_GRACE, CreditRate, UnitError, cost_micro, parse_duration

UNITS = {"": Decimal(1), "ms": Decimal("0.001"), "s": Decimal(1), "m": Decimal(60),
         "h": Decimal(3600), "d": Decimal(86400)}


@given(st.integers(0, 10**9 - 1), st.integers(0, 10**6 - 1), st.booleans(),
       st.sampled_from(sorted(UNITS)), st.sampled_from(["", " ", "  "]))
@example(5, 0, False, "ms", "")
@example(999_999_999, 999_999, True, "d", " ")
def test_every_spelling_of_the_grammar_is_its_exact_value(whole: int, frac: int, dotted: bool,
                                                          unit: str, pad: str) -> None:
    number = f"{whole}.{frac:06d}" if dotted else str(whole)
    text = f"{pad}{number}{pad}{unit}{pad}"
    assert re.fullmatch(DURATION_PATTERN, text)           # what the schemas publish
    assert parse_duration(text) == float(Decimal(number) * UNITS[unit])


@given(st.text(max_size=30))
@example("1e3")
@example("inf")
@example("-5s")
@example("1w")
@example("5 minutes")
@example("1234567890")          # 10 integer digits: over the grammar's bound
@example("1.0000001")           # 7 decimals
@example("5S")                  # case-sensitive (the API lower-cases first)
def test_text_outside_the_pattern_is_refused_and_inside_it_is_accepted(text: str) -> None:
    if re.fullmatch(DURATION_PATTERN, text):
        assert parse_duration(text) >= 0
    else:
        with pytest.raises(UnitError):
            parse_duration(text)


@given(st.one_of(st.integers(), st.floats(), st.booleans(), st.none(), st.lists(st.integers())))
@example(float("nan"))
@example(float("inf"))
@example(-1)
@example(True)
def test_numbers_are_seconds_finite_and_not_negative(value: object) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 \
        and value != float("inf")
    if ok:
        assert parse_duration(value) == float(value)  # type: ignore[arg-type]
    else:
        with pytest.raises(UnitError):
            parse_duration(value)


@given(st.integers(0, 2 * MAX_GRACE))
@example(MAX_GRACE)
@example(MAX_GRACE + 1)
def test_the_maximum_is_inclusive_and_exact(seconds: int) -> None:
    for value in (seconds, str(seconds), f"{seconds}s"):
        if seconds <= MAX_GRACE:
            assert parse_duration(value, maximum=MAX_GRACE) == seconds
        else:
            with pytest.raises(UnitError, match="above 2592000 seconds"):
                parse_duration(value, maximum=MAX_GRACE)
    # a hair over the bound is over it: compared on the exact decimal, not a rounded float
    with pytest.raises(UnitError):
        parse_duration(f"{MAX_GRACE}.000001", maximum=MAX_GRACE)
    with pytest.raises(UnitError):
        parse_duration("43200.000001m", maximum=MAX_GRACE)


# credits as the rules file writes them: up to 12 integer digits and 9 decimals
_CREDITS = st.builds(lambda whole, frac, places: Decimal(f"{whole}.{frac:09d}"[:len(str(whole)) + 1 + places]
                                                        if places else str(whole)),
                     st.integers(0, 10**12), st.integers(0, 10**9 - 1), st.integers(0, 9))


@given(_CREDITS, st.integers(1, 10**12), st.integers(0, 10**18))
@example(Decimal(1), 3600, 27 * 1_000_000)             # exactly 7,500: a 28-digit rate gave 7,501
@example(Decimal("0.5"), 3, 3 * 1_000_000)             # exactly 500,000 (was 500,001)
@example(Decimal(2), 1_000_000_000, 1)                 # 2e-15 credits: one micro-credit
@example(Decimal(0), 7, 10**18)
def test_credit_cost_is_the_exact_ceiling(credits: Decimal, divide_by: int, quantity: int) -> None:
    """ceil(quantity x credits / divide_by), whatever the rate's decimal expansion."""
    rate = CreditRate.of(credits, divide_by)
    got = cost_micro(quantity, rate)
    assert type(got) is int
    assert got == math.ceil(Fraction(quantity) * Fraction(credits) / divide_by)
    assert rate.exact() == Fraction(credits) / divide_by


@given(_CREDITS, st.integers(1, 10**6))
@example(Decimal(1), 3600)
@example(Decimal("0.001"), 1)
def test_credit_rate_text_is_exact(credits: Decimal, divide_by: int) -> None:
    """What explain prints: a decimal when the rate has one, else the fraction; either way
    the exact value."""
    rate = CreditRate.of(credits, divide_by)
    text = str(rate)
    if "/" in text:
        num, den = text.split("/")
        assert Fraction(int(num), int(den)) == rate.exact()
    else:
        assert Fraction(Decimal(text)) == rate.exact()
