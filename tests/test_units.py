"""proxy.units.parse_duration: the one duration grammar (config values, the admin API's
reconcile ``grace`` through ``proxy.admin.input.duration``, the CLI's ``--grace``)."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from proxy.units import DURATION_PATTERN, MAX_GRACE, UnitError, parse_duration

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
