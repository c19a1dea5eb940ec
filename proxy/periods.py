"""Billing periods and projections: pure date arithmetic, no I/O.

A customer's period is monthly, anchored like Stripe's billing cycle anchor: it starts on the
anchor's day of the month at the anchor's time of day (UTC); in a month too short for that
day it starts on the month's last day. No anchor means the first of the month, 00:00 UTC.

Projection (documented in the README): linear on the trailing 7 days:
    rate      = usage in (now - 7 d, now] / 7 d
    projected = usage so far this period + rate x (period end - now)
"""

from __future__ import annotations

import calendar
from datetime import UTC, datetime, timedelta

TRAILING = 7 * 86400


def _at(year: int, month: int, anchor: datetime) -> datetime:
    day = min(anchor.day, calendar.monthrange(year, month)[1])
    return datetime(year, month, day, anchor.hour, anchor.minute, anchor.second, tzinfo=UTC)


def _shift(year: int, month: int, by: int) -> tuple[int, int]:
    m = year * 12 + (month - 1) + by
    return m // 12, m % 12 + 1


def period_bounds(anchor: int | None, now: float) -> tuple[int, int]:
    """[start, end) of the period containing ``now`` (unix seconds)."""
    a = datetime.fromtimestamp(anchor if anchor is not None else 0, UTC)
    if anchor is None:
        a = datetime(1970, 1, 1, tzinfo=UTC)
    t = datetime.fromtimestamp(now, UTC)
    y, m = t.year, t.month
    start = _at(y, m, a)
    if start > t:
        y, m = _shift(y, m, -1)
        start = _at(y, m, a)
    ny, nm = _shift(y, m, 1)
    return int(start.timestamp()), int(_at(ny, nm, a).timestamp())


def project(so_far: int, trailing: int, now: float, period_end: int,
            window: int = TRAILING) -> int:
    """Projected quantity (micro-units) at period end, linear on the trailing window."""
    remaining = max(0.0, period_end - now)
    return so_far + int(trailing * remaining // window)


def day_starts(now: float, days: int) -> list[int]:
    """UTC midnights of the last ``days`` days, oldest first, ending with today."""
    today = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return [int((today - timedelta(days=i)).timestamp()) for i in range(days - 1, -1, -1)]


def default_usage_range(anchor: int | None, now: float) -> tuple[float, float]:
    """THE default range of a usage query (admin API, CLI, ``UsageLedger.usage``): from the
    start of the customer's current billing period (the calendar month, UTC, without an
    anchor) to one minute past ``now`` (so the current minute is included)."""
    return float(period_bounds(anchor, now)[0]), now + 60
