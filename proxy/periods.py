"""Billing periods and projections: pure date arithmetic, no I/O.

A customer's period is monthly, anchored like Stripe's billing cycle anchor: it starts on the
anchor's day of the month at the anchor's time of day (UTC); in a month too short for that
day it starts on the month's last day. No anchor means the first of the month, 00:00 UTC.

Which minute belongs to which period (THE rule, docs/billing-semantics.md "Period
boundaries"): usage is kept per minute (``usage_minute.minute``, the request's time floored
to the minute), and a minute belongs to the period containing the minute's start. An anchor
keeps its seconds (Stripe's, e.g. 12:30:15), so the minute 12:30:00 is the OLD period's last
(12:30:00 < 12:30:15) and the new period's usage starts with the minute 12:31:00. Staging
(``proxy.store.outbox.stage``), the usage report (``usage_days``), the usage queries
(``UsageLedger.usage``), the request reads (``audit_stream``: exports, the credit mirror) and
the monetary accounts all apply it: ``minute_bounds`` turns any ``[start, end)`` into the
instants whose minute is in it, ``usage_period`` is the period a request at ``t`` is billed in.

Projection (README "Prices, billing periods and what consumers see"): linear on the trailing 7 days:
    rate      = usage in (now - 7 d, now] / 7 d
    projected = usage so far this period + rate x (period end - now)
"""

from __future__ import annotations

import calendar
import math
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


def minute_bound(t: float) -> int:
    """The first minute start at or after ``t`` (unix seconds): the minutes in ``[start, end)``
    are exactly those in ``[minute_bound(start), minute_bound(end))``."""
    return -(-math.ceil(t) // 60) * 60


def minute_bounds(start: float, end: float) -> tuple[int, int]:
    """``[start, end)`` as the instants whose minute (the time floored to the minute, as
    ``usage_minute`` keeps it) is in it: a request at ``t`` counts in ``[start, end)`` iff
    ``lo <= t < hi``. THE rule of every usage and request read (module docstring)."""
    return minute_bound(start), minute_bound(end)


def usage_period(anchor: int | None, t: float) -> tuple[int, int]:
    """The period a request at ``t`` is billed in (the one its minute's start is in), as
    ``minute_bounds``: ``[lo, hi)`` with ``lo <= t < hi``."""
    minute = math.floor(t) // 60 * 60
    return minute_bounds(*period_bounds(anchor, minute))


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
