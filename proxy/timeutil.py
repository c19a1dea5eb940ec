"""Time parsing and formatting at the API edge: RFC 3339 UTC in JSON, unix seconds inside."""

from __future__ import annotations

from datetime import UTC, datetime


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str) -> float:
    """RFC 3339 (``2026-11-01T00:00:00Z``), a date (``2026-11-01``) or unix seconds."""
    v = value.strip()
    try:
        return float(int(v))
    except ValueError:
        pass
    if len(v) == 10:
        v += "T00:00:00Z"
    dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def month_start(ts: float) -> float:
    d = datetime.fromtimestamp(ts, UTC)
    return datetime(d.year, d.month, 1, tzinfo=UTC).timestamp()
