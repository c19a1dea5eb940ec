"""proxy.backoff: the one retry-delay formula (flusher and alert sender)."""

from __future__ import annotations

import random

from hypothesis import example, given
from hypothesis import strategies as st

from proxy.backoff import backoff

attempts = st.integers(-5, 100_000)
firsts = st.floats(0.0, 100.0, allow_nan=False)
caps = st.floats(0.0, 10_000.0, allow_nan=False)
jitters = st.one_of(st.none(), st.floats(0.0, 100.0, allow_nan=False))


@given(attempts, firsts, caps, jitters, st.integers(0, 2**32))
@example(10_000, 1.0, 300.0, 1.0, 0)       # 2**9999 overflows a float: the cap, not an error
@example(0, 1.0, 300.0, None, 0)           # attempts below 1 count as the first
def test_within_the_step_its_jitter_and_the_cap(attempt: int, first: float, cap: float,
                                                jitter: float | None, seed: int) -> None:
    d = backoff(attempt, first=first, cap=cap, jitter=jitter, rng=random.Random(seed))
    assert 0.0 <= d <= cap
    n = max(1, attempt)
    if n < 900:                       # below float overflow: the exact window
        step = first * 2.0 ** (n - 1)
        width = step if jitter is None else jitter
        assert min(cap, step) <= d <= min(cap, step + width)


@given(st.integers(1, 60), st.integers(0, 2**32))
def test_never_shrinks_from_one_attempt_to_the_next_without_jitter(n: int, seed: int) -> None:
    a = backoff(n, first=0.5, cap=300.0, jitter=0.0, rng=random.Random(seed))
    b = backoff(n + 1, first=0.5, cap=300.0, jitter=0.0, rng=random.Random(seed))
    assert a <= b and (b == 300.0 or b == 2 * a)


def test_the_alert_senders_schedule_is_exponential_capped_and_jittered() -> None:
    """AlertSender: first = jitter = base_delay (1 s), cap = max_delay (300 s)."""
    for n in range(1, 40):
        d = backoff(n, first=1.0, cap=300.0, jitter=1.0)
        assert min(300.0, 2.0 ** (n - 1)) <= d <= min(300.0, 2.0 ** (n - 1) + 1.0)
    assert backoff(10_000, first=1.0, cap=300.0, jitter=1.0) == 300.0
    assert len({backoff(3, first=1.0, cap=300.0, jitter=1.0) for _ in range(20)}) > 1


def test_the_flushers_schedule_doubles_from_one_second_and_is_repeatable_when_seeded() -> None:
    """Flusher: a pending event's n-th failure waits [2**(n-1), 2**n) s, at most 300 s; the
    flusher's seeded rng gives the same delays every time."""
    for n in range(1, 9):
        d = backoff(n, first=1.0, cap=300.0, rng=random.Random(7))
        assert 2.0 ** (n - 1) <= d < 2.0 ** n
    assert backoff(9, first=1.0, cap=300.0) >= 256.0
    assert backoff(12, first=1.0, cap=300.0) == 300.0
    seq = [backoff(n, first=1.0, cap=300.0, rng=random.Random(3)) for n in range(1, 9)]
    assert seq == [backoff(n, first=1.0, cap=300.0, rng=random.Random(3)) for n in range(1, 9)]


@given(st.integers(min_value=1, max_value=2000), st.integers(min_value=0, max_value=2**32))
def test_spread_at_cap_never_sits_at_the_cap(attempt: int, seed: int) -> None:
    """At the cap the delay is drawn from [cap/2, cap), so retries that reached it together do
    not fire together; below the cap the formula is unchanged."""
    import random as _random
    plain = backoff(attempt, first=0.5, cap=300.0, rng=_random.Random(seed))
    spread = backoff(attempt, first=0.5, cap=300.0, rng=_random.Random(seed), spread_at_cap=True)
    step = 0.5 * 2.0 ** (attempt - 1) if attempt < 1000 else float("inf")
    if step >= 300.0:
        assert 150.0 <= spread <= 300.0
    else:
        assert spread == plain
