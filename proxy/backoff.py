"""The one retry-delay formula (a leaf: no project imports).

``backoff(attempt, first=, cap=, jitter=)`` is tenacity's ``wait_exponential_jitter`` math:
``first * 2**(attempt - 1) + uniform(0, jitter)``, capped at ``cap``. ``jitter=None`` draws
the jitter as wide as the exponential step itself, so the delay lies in
``[step, 2 * step)`` before the cap. Used by the flusher (cross-cycle retries of a pending
meter event) and the alert sender (retries of a threshold webhook).
"""

from __future__ import annotations

import random

_RNG = random.Random()


def backoff(attempt: int, *, first: float, cap: float, jitter: float | None = None,
            rng: random.Random | None = None, spread_at_cap: bool = False) -> float:
    """Seconds to wait after the ``attempt``-th failure (1-based; below 1 counts as 1).

    Never negative and never above ``cap``; grows by doubling from ``first``; the draw comes
    from ``rng`` (a seeded one makes it repeatable). ``spread_at_cap``: once the step reaches
    the cap, the delay is drawn from ``[cap / 2, cap)`` instead of sitting at ``cap``, so many
    retries that reached the cap together do not fire together."""
    n = max(1, attempt)
    try:
        step = first * 2.0 ** (n - 1)
    except OverflowError:
        step = cap
    r = rng or _RNG
    if spread_at_cap and step >= cap > 0:
        return r.uniform(cap / 2, cap)
    width = step if jitter is None else jitter
    draw = r.uniform(0.0, width) if width > 0 else 0.0
    return max(0.0, min(cap, step + draw))
