"""Exact unit arithmetic: the one place Decimals become integers.

Quantities and credits are integers in micro-units (1 unit = 1,000,000 micro).
No float ever enters billing math: decimals are parsed with ``Decimal`` at the
edge, quantized to 6 places (ROUND_HALF_EVEN) and then carried as ``int``.
"""

from __future__ import annotations

import math
import re
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

from proxy.errors import MeterproxyError

QSCALE = 1_000_000
_Q = Decimal(1).scaleb(-6)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": Decimal("0.001"), "s": Decimal(1), "m": Decimal(60),
                   "h": Decimal(3600), "d": Decimal(86400), None: Decimal(1)}


class UnitError(MeterproxyError, ValueError):
    """A value that is not an exact, finite number of the expected kind."""


def to_decimal(value: object) -> Decimal:
    """Parse an int, Decimal or numeric string exactly. Floats are refused unless they
    came from a JSON/YAML number (then their shortest repr is used, never binary noise)."""
    if isinstance(value, bool):
        raise UnitError(f"expected a number, got {value!r}")
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, Decimal):
        d = value
    elif isinstance(value, float):
        d = Decimal(repr(value))
    elif isinstance(value, str):
        try:
            d = Decimal(value.strip())
        except InvalidOperation as exc:
            raise UnitError(f"not a number: {value!r}") from exc
    else:
        raise UnitError(f"expected a number, got {type(value).__name__}")
    if not d.is_finite():
        raise UnitError(f"not a finite number: {value!r}")
    return d


def to_micro(value: object) -> int:
    """Exact decimal -> integer micro-units (6 decimal places, half-even)."""
    d = to_decimal(value)
    return int((d * QSCALE).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def fmt_micro(micro: int) -> str:
    """Integer micro-units -> exact decimal string without trailing zeros ("950.5", "3")."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), QSCALE)
    if frac == 0:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:06d}".rstrip("0")


def cost_micro(quantity_micro: int, per_unit: Decimal) -> int:
    """Credits (micro) for a quantity (micro) at ``per_unit`` credits per unit, rounded up:
    a request is never under-charged by rounding. Exact: integer ceil of a Decimal."""
    exact = Decimal(quantity_micro) * per_unit
    return math.ceil(exact)


def parse_duration(value: object) -> float:
    """"10ms" / "5s" / "2m" / "1h" / "1d" / bare number of seconds -> seconds (float: timing only)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise UnitError(f"negative duration: {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise UnitError(f"expected a duration like '10ms' or '5s', got {value!r}")
    m = _DURATION.match(value)
    if not m:
        raise UnitError(f"expected a duration like '10ms' or '5s', got {value!r}")
    return float(Decimal(m.group(1)) * _DURATION_UNITS[m.group(2)])
