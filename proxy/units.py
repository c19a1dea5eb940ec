"""Exact unit arithmetic: the one place Decimals become integers.

Quantities and credits are integers in micro-units (1 unit = 1,000,000 micro).
No float ever enters billing math: decimals are parsed with ``Decimal`` at the
edge, quantized to 6 places (ROUND_HALF_EVEN) and then carried as ``int``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from fractions import Fraction

from proxy.errors import MeterproxyError

QSCALE = 1_000_000
_Q = Decimal(1).scaleb(-6)

# The one duration grammar (config values, the admin API's reconcile ``grace``, the CLI's
# ``--grace``): up to 9 integer digits and 6 decimals, so untrusted text stays small.
DURATION_PATTERN = r"^\s*[0-9]{1,9}(\.[0-9]{1,6})?\s*(ms|s|m|h|d)?\s*$"
_DURATION = re.compile(r"\s*([0-9]{1,9}(?:\.[0-9]{1,6})?)\s*(ms|s|m|h|d)?\s*")
_DURATION_UNITS = {"ms": Decimal("0.001"), "s": Decimal(1), "m": Decimal(60),
                   "h": Decimal(3600), "d": Decimal(86400), None: Decimal(1)}
MAX_GRACE = 30 * 86400        # seconds: the longest reconcile grace the API and CLI accept


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


@dataclass(frozen=True, slots=True)
class CreditRate:
    """An exact credit rate: ``num / den`` credits per unit, in lowest terms (``den > 0``).

    Built once when the rules load (:meth:`of`): a rate like 1 credit per 3,600 units is not
    representable as a finite decimal, and a 28-digit Decimal rounded up would make an exact
    cost one micro-credit dearer (27 units -> 7,501 instead of 7,500)."""

    num: int
    den: int

    @classmethod
    def of(cls, credits: Decimal | int, divide_by: int = 1) -> CreditRate:
        """``credits`` per ``divide_by`` units, exactly (a Decimal is converted exactly)."""
        exact = Fraction(credits) / divide_by
        return cls(exact.numerator, exact.denominator)

    def exact(self) -> Fraction:
        return Fraction(self.num, self.den)

    def __str__(self) -> str:
        """A decimal ("0.001", "2") when the rate has one, else the fraction ("1/3600")."""
        den, twos, fives = self.den, 0, 0
        while den % 2 == 0:
            den, twos = den // 2, twos + 1
        while den % 5 == 0:
            den, fives = den // 5, fives + 1
        if den != 1:
            return f"{self.num}/{self.den}"
        places = max(twos, fives)
        return format(Decimal(self.num * 10**places // self.den).scaleb(-places), "f")


def cost_micro(quantity_micro: int, rate: CreditRate) -> int:
    """Credits (micro) for a quantity (micro) at ``rate`` credits per unit, rounded up:
    a request is never under-charged by rounding, and an exact cost is never rounded up.
    Integer ceil of ``quantity * num / den``: one multiplication and one floor division."""
    return -(-quantity_micro * rate.num // rate.den)


def parse_duration(value: object, *, maximum: int | None = None) -> float:
    """"10ms" / "5s" / "2m" / "1h" / "1d" / bare number of seconds -> seconds (float: timing
    only). Negative, non-finite or (with ``maximum``) longer durations are a UnitError; the
    bound is checked on the exact decimal value."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise UnitError(f"expected a finite duration, got {value!r}")
        if value < 0:
            raise UnitError(f"negative duration: {value!r}")
        seconds = Decimal(value)
    elif isinstance(value, str) and (m := _DURATION.fullmatch(value)):
        seconds = Decimal(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise UnitError(f"expected a duration like '10ms' or '5s', got {value!r}")
    if maximum is not None and seconds > maximum:
        raise UnitError(f"duration above {maximum} seconds: {value!r}")
    return float(value) if isinstance(value, (int, float)) else float(seconds)
