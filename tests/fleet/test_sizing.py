"""The pure lease arithmetic (proxy.fleet.sizing): properties and boundaries."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from proxy.fleet import sizing

micro = st.integers(min_value=0, max_value=10**15)


@given(wanted=micro, floor=micro, available=micro, k=st.integers(1, 8),
       holders=st.integers(1, 200), quantum=st.integers(1, 10**9))
@example(wanted=0, floor=0, available=0, k=2, holders=3, quantum=1)
@example(wanted=10**9, floor=10**6, available=3 * 10**6, k=2, holders=3, quantum=10**6)
@example(wanted=0, floor=10**6, available=10**6 - 1, k=1, holders=1, quantum=10**6)
def test_lease_size_properties(wanted: int, floor: int, available: int, k: int, holders: int,
                               quantum: int) -> None:
    size = sizing.lease_size(wanted, floor, available, k, holders, quantum)
    cap = available // (k * holders)
    assert 0 <= size <= available
    assert size % quantum == 0
    if available == 0 or available < quantum:
        assert size == 0
    if cap >= quantum:
        assert size <= cap                       # never more than A/(kH)
    if available >= quantum:
        assert size >= quantum                   # a small balance stays spendable by every holder
    if quantum <= max(wanted, floor) <= cap:
        assert size >= max(wanted, floor) - quantum + 1   # the asked size, to the quantum


def test_lease_size_boundaries() -> None:
    # 100 credits, nobody else holding, k=2: at most half
    assert sizing.lease_size(10**9, 0, 100 * 10**6, 2, 1, 1) == 50 * 10**6
    # small balance, 3 holders: the cap (1/6 credit) is below one request: one request's worth
    assert sizing.lease_size(0, 10**6, 10**6, 2, 3, 10**6) == 10**6
    # the floor applies when the rate is 0
    assert sizing.lease_size(0, 5 * 10**6, 100 * 10**6, 2, 1, 10**6) == 5 * 10**6
    # rounded down to the quantum
    assert sizing.lease_size(7, 0, 100, 1, 1, 3) == 6


@given(rate=st.integers(0, 10**12), cover=st.integers(1, 10**6))
def test_want_is_rate_times_cover(rate: int, cover: int) -> None:
    assert sizing.want(rate, cover) == rate * cover // 1000


def test_holder_deadline_precedes_the_database_expiry() -> None:
    assert sizing.usable_until_ms(1000, 30_000, 50_000) == 1000 + 28_500
    assert sizing.usable_until_ms(0, 30_000, 0) == 30_000


@pytest.mark.parametrize(("remaining", "rate", "left", "expected"), [
    (10**6, 10**6, 30_000, True),       # 1 credit left at 1 credit/s, 1.05 s needed
    (2 * 10**6, 10**6, 30_000, False),  # 2 s of cover
    (10**9, 0, 30_000, False),
    (10**9, 0, 10_000, True),           # a third of the ttl left: renew
])
def test_should_refill(remaining: int, rate: int, left: int, expected: bool) -> None:
    assert sizing.should_refill(remaining, rate, 50, 1000, left, 30_000) is expected


@given(prev=st.integers(0, 10**12), spent=st.integers(0, 10**12), elapsed=st.integers(1, 10**6))
def test_ewma_rate_lies_between_old_rate_and_sample(prev: int, spent: int, elapsed: int) -> None:
    sample = spent * 1000 // elapsed
    r = sizing.ewma_rate(prev, spent, elapsed)
    assert min(prev, sample) <= r <= max(prev, sample)


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        sizing.LeasePolicy(k=0)
    with pytest.raises(ValueError):
        sizing.LeasePolicy(drift_margin_ppm=1_000_000)
