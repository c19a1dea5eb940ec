"""The one place admin (and consumer) API inputs are parsed: exact ranges, clear 400s.

Every parser takes the raw value as it came from JSON or the query string and either returns
the value the code works with (integers in micro-credits, unix seconds, ...) or raises
``FieldError`` naming the field and the allowed range; the admin middleware turns that into
``400 {"error": {"type": "invalid_request", "message": ..., "param": field}}``. Nothing here
does I/O; everything is pure so it can be tested exhaustively.

Ranges (the OpenAPI document says the same):
- credits: a decimal string (or JSON integer) with at most 6 decimal places,
  from 0.000001 to 10^12 credits; no exponent, sign, underscore or whitespace.
- times: RFC 3339 (``2026-11-01T00:00:00Z``), a date (``2026-11-01``) or integer unix
  seconds, between 1970-01-01T00:00:00Z and 9999-12-31T23:59:59Z.
- durations (reconcile ``grace``): seconds, or a number with ``ms``/``s``/``m``/``h``/``d``
  (``proxy.units.parse_duration``, any case), up to 30 days.
- integer ids, limits, priorities and minor-unit amounts: decimal digits within the range the
  parser names.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal

from proxy.errors import InvalidInput
from proxy.units import MAX_GRACE, QSCALE, UnitError, parse_duration

MAX_CREDITS = 10**12                       # credits per grant (micro: 10^18, below 2^63)
MAX_MINOR_UNITS = 10**12                   # minimum_commitment, minor currency units
MAX_TIME = 253402300799                    # 9999-12-31T23:59:59Z
MAX_INT64 = 2**63 - 1

_DECIMAL = re.compile(r"[0-9]{1,13}(?:\.[0-9]{1,6})?")
_DIGITS = re.compile(r"[0-9]{1,19}")
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})
TIME_RANGE = "1970-01-01T00:00:00Z to 9999-12-31T23:59:59Z"


class FieldError(InvalidInput):
    """A 400 about one input field (``param`` in the error body)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", extra={"param": field})
        self.field = field


def credits_micro(value: object, field: str = "credits") -> int:
    """A positive amount of credits -> micro-credits, exactly."""
    rule = (f"must be a decimal string with at most 6 decimal places, from 0.000001 to"
            f" {MAX_CREDITS} (e.g. \"1000\" or \"0.5\")")
    if isinstance(value, bool):
        raise FieldError(field, rule)
    if isinstance(value, int):
        text = str(value)
    elif isinstance(value, str):
        text = value
    else:
        raise FieldError(field, rule)
    if not _DECIMAL.fullmatch(text):
        raise FieldError(field, rule)
    micro = int(Decimal(text) * QSCALE)
    if not 0 < micro <= MAX_CREDITS * QSCALE:
        raise FieldError(field, rule)
    return micro


def integer(value: object, field: str, lo: int, hi: int, *, strings: bool = True) -> int:
    """A JSON integer (or, with ``strings``, as in a query or path, a string of decimal
    digits) within [lo, hi]."""
    rule = f"must be an integer from {lo} to {hi}"
    if isinstance(value, bool):
        raise FieldError(field, rule)
    if isinstance(value, int):
        n = value
    elif ((isinstance(value, float) and value.is_integer())       # JSON 5.0 is an integer
          or (strings and isinstance(value, str) and _DIGITS.fullmatch(value))):
        n = int(value)
    else:
        raise FieldError(field, rule)
    if not lo <= n <= hi:
        raise FieldError(field, rule)
    return n


def timestamp(value: object, field: str) -> int:
    """RFC 3339, a date or unix seconds -> integer unix seconds within TIME_RANGE."""
    rule = f"must be an RFC 3339 time, a date (YYYY-MM-DD) or unix seconds, from {TIME_RANGE}"
    if isinstance(value, bool):
        raise FieldError(field, rule)
    if isinstance(value, int):
        ts = value
    elif isinstance(value, float) and value.is_integer() and abs(value) <= MAX_TIME:
        ts = int(value)
    elif isinstance(value, str):
        text = value.strip()
        ts = int(text) if _DIGITS.fullmatch(text) else _iso(text, field, rule)
    else:
        raise FieldError(field, rule)
    if not 0 <= ts <= MAX_TIME:
        raise FieldError(field, rule)
    return ts


def _iso(text: str, field: str, rule: str) -> int:
    if len(text) == 10:
        text += "T00:00:00Z"
    if len(text) > 40 or "T" not in text.upper():
        raise FieldError(field, rule)
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        return int(dt.timestamp())
    except (ValueError, OverflowError) as exc:
        raise FieldError(field, rule) from exc


def optional_timestamp(value: object, field: str) -> int | None:
    return None if value is None else timestamp(value, field)


def time_range(raw_from: str | None, raw_to: str | None, default_from: float,
               default_to: float) -> tuple[float, float]:
    """``from``/``to`` query parameters with defaults; ``to`` must not be before ``from``."""
    start = float(timestamp(raw_from, "from")) if raw_from is not None else default_from
    end = float(timestamp(raw_to, "to")) if raw_to is not None else default_to
    if end < start:
        raise FieldError("to", "must not be before 'from'")
    return start, end


def duration(value: object, field: str, hi: int = MAX_GRACE) -> float:
    """Seconds from ``7200``, ``"7200"``, ``"90s"``, ``"30m"``, ``"2h"``, ``"1d"``; 0..hi.
    The grammar is ``proxy.units.parse_duration``'s (any case); a JSON float is refused."""
    rule = (f"must be a duration (seconds, or a number with ms, s, m, h or d) from 0 to {hi}"
            " seconds")
    if isinstance(value, float):
        raise FieldError(field, rule)
    try:
        return parse_duration(value.lower() if isinstance(value, str) else value, maximum=hi)
    except UnitError as exc:
        raise FieldError(field, rule) from exc


def flag(value: object, field: str) -> bool:
    """A boolean: JSON true/false or one of true/false/1/0/yes/no (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE:
        return True
    if isinstance(value, str) and value.lower() in _FALSE:
        return False
    raise FieldError(field, "must be true or false")


def choice(value: object, field: str, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise FieldError(field, f"must be one of {', '.join(allowed)}")
    return value


def text(value: object, field: str, max_len: int) -> str:
    if not isinstance(value, str) or len(value) > max_len:
        raise FieldError(field, f"must be a string of at most {max_len} characters")
    return value
