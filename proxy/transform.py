"""A meter's ``transform`` on the period total, as Stripe's ``transform_quantity`` does.

Owns: :func:`transformed_units` and :func:`transformed_delta`, pure integer functions.

Invariants:
- Requests record raw units (micro-units, never rounded per request). The transform divides
  the *period total* exactly and rounds it once: ``ceil`` (``up``) or ``floor`` (``down``) of
  total / divide_by, the way Stripe's Price ``transform_quantity`` bills a period's usage.
- What the outbox sends for a transformed meter is a delta of transformed totals,
  ``T(total_after) - T(total_before)``, so the events of one period sum to exactly
  ``T(period total)`` whatever the flush pattern (telescoping sum), and each is >= 0 because
  ``T`` is non-decreasing.
"""

from __future__ import annotations

from proxy.pricing import TransformQuantity
from proxy.units import QSCALE

__all__ = ["transformed_delta", "transformed_units"]


def transformed_units(total_micro: int, t: TransformQuantity) -> int:
    """Whole billed units for a period total of ``total_micro`` raw micro-units: exact
    integer ceil / floor of total / (divide_by x QSCALE). A negative total bills 0."""
    if total_micro <= 0:
        return 0
    q, r = divmod(total_micro, t.divide_by * QSCALE)
    return q + 1 if (r and t.round == "up") else q


def transformed_delta(before_micro: int, after_micro: int, t: TransformQuantity) -> int:
    """Units to report when a period's raw total moves from ``before`` to ``after``."""
    return transformed_units(after_micro, t) - transformed_units(before_micro, t)
