"""Pure lease arithmetic: how big a credit lease is, and when to refill it.

Everything is integer micro-credits (1 credit = 1,000,000) and integer milliseconds.

Notation (docs/fleet.md): A = the customer's available balance (balance - settled -
escrowed), H = members holding a lease for the customer *including the asker*, r = the
asker's smoothed spend rate, T = the cover period, q = the quantum (the cost of the request
waiting for the lease, or the smallest cost seen; leases are whole multiples of it so no
holder strands a fragment it cannot spend).

    L = clamp(r*T, L_min, A/(k*H)), rounded down to a multiple of q,
        raised to one quantum when that is still available, never above A.

Guarantees (tests/fleet/test_sizing.py, hypothesis):
- ``0 <= L <= A``; ``L == 0`` when ``A == 0`` or ``A < q``;
- ``L % q == 0``;
- ``L <= A // (k*H)`` whenever that cap is at least one quantum: each grant takes at most
  1/(kH) of what is left, so with H holders the escrow stays below A/k;
- ``L >= q`` whenever ``A >= q``: a small balance stays spendable by every holder, one
  request's worth at a time (the one exception to the cap above).

``proxy/store/postgres`` evaluates the same expression inside the escrow statement, against
the locked row (proxy.store.postgres.leases.GRANT_SQL); this module is its specification.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LeasePolicy:
    """The ``fleet`` config section's lease knobs, in integer units."""

    cover_ms: int = 20_000          # T: a lease should last this long at the current rate
    floor: int = 1_000_000          # L_min: micro-credits
    k: int = 2                      # total escrow stays below A/k
    ttl_ms: int = 30_000            # lease lifetime in the database
    drift_margin_ppm: int = 50_000  # holder stops spending at send + ttl*(1 - margin)
    lead_ms: int = 1_000            # refill when less than r*(rtt + lead) is left
    empty_backoff_ms: int = 1_000   # after a grant found nothing: answer 402 locally this long
    idle_ms: int = 10_000           # a lease with no admission this long is returned

    def __post_init__(self) -> None:
        if self.cover_ms <= 0 or self.floor < 0 or self.k < 1 or self.ttl_ms <= 0:
            raise ValueError("cover_ms, ttl_ms > 0; floor >= 0; k >= 1")
        if self.empty_backoff_ms < 0 or self.idle_ms <= 0:
            raise ValueError("empty_backoff_ms >= 0; idle_ms > 0")
        if not 0 <= self.drift_margin_ppm < 1_000_000:
            raise ValueError("drift_margin_ppm in [0, 1e6)")


def want(rate_per_s: int, cover_ms: int) -> int:
    """r*T in micro-credits: what the asker expects to spend in one cover period."""
    return max(0, rate_per_s) * cover_ms // 1000


def lease_size(wanted: int, floor: int, available: int, k: int, holders: int, quantum: int) -> int:
    """L, as documented in the module docstring. ``holders`` counts the asker."""
    if available <= 0:
        return 0
    q = max(1, quantum)
    if available < q:
        return 0
    cap = available // (k * max(1, holders))
    size = min(max(wanted, floor), cap)
    size = max(size, q)              # one request's worth, even above the cap
    size = min(size, available)
    return size - size % q


def usable_until_ms(sent_at_ms: int, ttl_ms: int, drift_margin_ppm: int) -> int:
    """The holder's own deadline for a lease granted by a request sent at ``sent_at_ms``
    (its monotonic clock): the database's ``expires_at`` is at least ``sent + ttl`` by the
    database's clock, so stopping at ``ttl*(1 - margin)`` tolerates that much drift."""
    return sent_at_ms + ttl_ms * (1_000_000 - drift_margin_ppm) // 1_000_000


def should_refill(remaining: int, rate_per_s: int, rtt_ms: int, lead_ms: int,
                  left_ms: int, ttl_ms: int) -> bool:
    """Refill ahead of need: when what is left would not last the round trip plus the lead
    at the current rate, or when a third of the lease's lifetime is left (renewal)."""
    if left_ms <= ttl_ms // 3:
        return True
    return remaining * 1000 < max(0, rate_per_s) * (rtt_ms + lead_ms)


def ewma_rate(previous: int, spent: int, elapsed_ms: int, half_life_ms: int = 5_000) -> int:
    """Smoothed spend rate (micro-credits per second) after ``spent`` over ``elapsed_ms``.
    Integer exponential smoothing; weight of the new sample elapsed/(elapsed + half_life)."""
    if elapsed_ms <= 0:
        return previous
    sample = spent * 1000 // elapsed_ms
    return (previous * half_life_ms + sample * elapsed_ms) // (half_life_ms + elapsed_ms)
