"""Billing periods (anchored monthly, like Stripe) and the linear projection."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from proxy.periods import (
    day_starts,
    default_usage_range,
    minute_bound,
    minute_bounds,
    period_bounds,
    project,
    usage_period,
)


def ts(*a: int) -> int:
    return int(datetime(*a, tzinfo=UTC).timestamp())


def test_default_is_calendar_month() -> None:
    assert period_bounds(None, ts(2026, 11, 24, 12)) == (ts(2026, 11, 1), ts(2026, 12, 1))
    assert period_bounds(None, ts(2026, 12, 31, 23)) == (ts(2026, 12, 1), ts(2027, 1, 1))


def test_anchor_on_31st_clamps_to_short_months() -> None:
    anchor = ts(2026, 1, 31, 9)
    assert period_bounds(anchor, ts(2026, 2, 10)) == (ts(2026, 1, 31, 9), ts(2026, 2, 28, 9))
    assert period_bounds(anchor, ts(2026, 3, 1)) == (ts(2026, 2, 28, 9), ts(2026, 3, 31, 9))
    assert period_bounds(anchor, ts(2026, 3, 31, 9)) == (ts(2026, 3, 31, 9), ts(2026, 4, 30, 9))


@given(st.integers(0, 2_000_000_000), st.integers(0, 2_000_000_000))
def test_period_contains_now(anchor: int, now: int) -> None:
    start, end = period_bounds(anchor, now)
    assert start <= now < end
    assert 27 * 86400 <= end - start <= 31 * 86400


def test_projection_is_linear_on_trailing_week() -> None:
    # 700 units in the last 7 days = 100/day; 10 days left -> +1000
    assert project(2_000, 700, now=0, period_end=10 * 86400) == 3_000
    assert project(5, 0, now=0, period_end=86400) == 5
    assert project(5, 700, now=100, period_end=50) == 5


def test_day_starts() -> None:
    days = day_starts(ts(2026, 11, 24, 15), 3)
    assert days == [ts(2026, 11, 22), ts(2026, 11, 23), ts(2026, 11, 24)]


@given(st.one_of(st.none(), st.integers(0, 4_000_000_000)), st.integers(0, 4_000_000_000))
def test_default_usage_range_is_the_current_period_to_a_minute_past_now(
        anchor: int | None, now: int) -> None:
    start, end = default_usage_range(anchor, now)
    p_start, p_end = period_bounds(anchor, now)
    assert start == p_start <= now < p_end
    assert end == now + 60
    if anchor is None:
        d = datetime.fromtimestamp(now, UTC)
        assert start == datetime(d.year, d.month, 1, tzinfo=UTC).timestamp()


def test_a_minute_is_in_the_period_its_start_is_in() -> None:
    """The one rule of every usage read (staging's): with an anchor at 12:30:15 the minute
    12:30:00 is the old period's last, the new period's usage starts at 12:31:00."""
    anchor = ts(2026, 1, 15, 12, 30, 15)
    start, end = period_bounds(anchor, ts(2026, 3, 20))
    assert (start, end) == (ts(2026, 3, 15, 12, 30, 15), ts(2026, 4, 15, 12, 30, 15))
    assert minute_bounds(start, end) == (ts(2026, 3, 15, 12, 31), ts(2026, 4, 15, 12, 31))
    assert minute_bound(ts(2026, 3, 15, 12, 30)) == ts(2026, 3, 15, 12, 30)     # aligned stays
    assert minute_bound(ts(2026, 3, 15, 12, 30) + 0.5) == ts(2026, 3, 15, 12, 31)
    assert usage_period(anchor, ts(2026, 3, 15, 12, 30, 40)) == (
        ts(2026, 2, 15, 12, 31), ts(2026, 3, 15, 12, 31))
    assert usage_period(anchor, ts(2026, 3, 15, 12, 31))[0] == ts(2026, 3, 15, 12, 31)


@given(st.integers(0, 4_000_000_000), st.integers(0, 4_000_000_000), st.integers(0, 10**9))
def test_minute_bounds_hold_exactly_the_requests_whose_minute_is_in_range(
        a: int, b: int, t: int) -> None:
    start, end = min(a, b) / 7, max(a, b) / 7
    lo, hi = minute_bounds(start, end)
    assert (lo <= t < hi) == (start <= t // 60 * 60 < end)
