"""Stripe Price math: what a period's usage costs, in integer minor units, to the cent.

Owns: the :class:`Price` value (built from Stripe's own Price object field names by
:func:`price_from_stripe`, for both the rules file's ``price:`` blocks and prices fetched
from Stripe), the amount of one invoice line (:func:`line_amount`), the simulate helpers
(:func:`period_charges`, :func:`fmt_minor`) and the choice between a fetched price and
the rules file's (:func:`meter_prices`).

Invariants (docs/stripe-notes.md, "Prices"):
- No floats. Rates are exact ``Decimal`` (unit_amount_decimal: up to 12 decimal places,
  in minor units); line math is exact (``Fraction``); results are ``int`` minor units.
- Stripe receives whole units (meter events take integers: we report the floor and carry
  the fractional rest), so a line prices the WHOLE units of a quantity given in
  micro-units: ``floor(quantity_micro / QSCALE)``.
- A negative period total is billed as zero usage (Stripe bills negative totals as 0).
  On a per-unit price that is 0; on a tiered price it is the first tier's flat fee,
  exactly as a zero total (the contract: zero usage bills the first tier's flat fee).
- ``transform_quantity`` (per-unit prices only) divides the whole units, rounding up
  (ceil) or down (floor), before the rate applies.
- Volume: every unit at the rate of the tier containing the total, plus that tier's flat
  fee. Graduated: each tier's units at that tier's rate, plus the flat fee of every tier
  reached (the first tier is always reached, so zero usage bills its flat fee).
- The exact amount is rounded ONCE per line, to whole minor units, half up (Stripe:
  0.05 cents x 30 = 1.5 cents, billed as 2). Never per unit, never per tier.
- Pure: no I/O, no clock, imports neither stripe nor aiohttp (the rules package builds
  :class:`Price` values at load). Fetching prices from Stripe and caching them is
  :mod:`proxy.stripe.prices`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Literal, Protocol

from proxy.errors import MeterproxyError
from proxy.units import QSCALE
from proxy.yamlpos import type_name

__all__ = [
    "Price",
    "PriceError",
    "PriceIssue",
    "PriceLookup",
    "Tier",
    "TransformQuantity",
    "billed_quantity",
    "exact_amount",
    "fmt_minor",
    "line_amount",
    "meter_prices",
    "minor_exponent",
    "period_charges",
    "price_from_stripe",
    "round_line",
    "units_amount",
    "whole_units",
]

BillingScheme = Literal["per_unit", "tiered"]
TiersMode = Literal["graduated", "volume"]
Path = tuple[str | int, ...]

PRICE_FIELDS = ("currency", "billing_scheme", "unit_amount", "unit_amount_decimal",
                "tiers_mode", "tiers", "transform_quantity")
TIER_FIELDS = ("up_to", "unit_amount", "unit_amount_decimal", "flat_amount",
               "flat_amount_decimal")
TRANSFORM_FIELDS = ("divide_by", "round")
MAX_DECIMALS = 12

# Stripe's currency exponents: zero-decimal and three-decimal currencies; all others
# (including ISK, HUF, TWD, which Stripe represents with two decimals) use two.
_ZERO_DECIMAL = frozenset({"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg",
                           "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf"})
_THREE_DECIMAL = frozenset({"bhd", "jod", "kwd", "omr", "tnd"})


# ------------------------------------------------------------------ the Price value


@dataclass(frozen=True, slots=True)
class Tier:
    """One tier: units after the previous ``up_to`` up to ``up_to`` (None = inf)."""

    up_to: int | None
    unit_amount_decimal: Decimal = Decimal(0)
    flat_amount_decimal: Decimal = Decimal(0)


@dataclass(frozen=True, slots=True)
class TransformQuantity:
    """Stripe ``transform_quantity``: bill ``ceil``/``floor`` of units / divide_by."""

    divide_by: int
    round: Literal["up", "down"]


@dataclass(frozen=True, slots=True)
class Price:
    """A Stripe Price, reduced to what decides the amount. Amounts in minor units."""

    currency: str
    billing_scheme: BillingScheme = "per_unit"
    unit_amount_decimal: Decimal | None = None
    tiers_mode: TiersMode | None = None
    tiers: tuple[Tier, ...] = ()
    transform_quantity: TransformQuantity | None = None
    id: str | None = None

    def __post_init__(self) -> None:
        # the structural invariants line math relies on (price_from_stripe reports the
        # same conditions field by field; this guards hand-built values)
        if self.billing_scheme == "per_unit":
            if self.unit_amount_decimal is None or self.tiers or self.tiers_mode is not None:
                raise ValueError("a per_unit price needs unit_amount_decimal and no tiers")
            return
        if self.tiers_mode is None or not self.tiers or self.transform_quantity is not None:
            raise ValueError("a tiered price needs tiers_mode and tiers, and no transform")
        bounds = [t.up_to for t in self.tiers]
        if bounds[-1] is not None or None in bounds[:-1]:
            raise ValueError("only the last tier has up_to inf, and it must")
        finite = [b for b in bounds if b is not None]
        if any(b <= a for a, b in zip([0, *finite], finite, strict=False)):
            raise ValueError("tier up_to values must be positive and increasing")

    def with_id(self, price_id: str | None) -> Price:
        return Price(self.currency, self.billing_scheme, self.unit_amount_decimal,
                     self.tiers_mode, self.tiers, self.transform_quantity, price_id)


# ------------------------------------------------------------------ line math


def whole_units(quantity_micro: int) -> int:
    """The whole units Stripe is told about (floor), a negative total as 0."""
    return max(0, quantity_micro) // QSCALE


def billed_quantity(price: Price, units: int) -> int:
    """Whole units after ``transform_quantity`` (ceil for up, floor for down)."""
    units = max(0, units)
    tq = price.transform_quantity
    if tq is None:
        return units
    if tq.round == "up":
        return -(-units // tq.divide_by)
    return units // tq.divide_by


def _tier_index(tiers: Sequence[Tier], units: int) -> int:
    """The tier containing ``units`` (0 units is in the first tier)."""
    for i, t in enumerate(tiers):
        if t.up_to is None or units <= t.up_to:
            return i
    return len(tiers) - 1  # unreachable for a valid price: the last tier is inf


def exact_amount(price: Price, units: int) -> Fraction:
    """The exact, unrounded amount (minor units) for ``units`` whole units (before
    ``transform_quantity``; negative = 0)."""
    q = billed_quantity(price, units)
    if price.billing_scheme == "per_unit":
        assert price.unit_amount_decimal is not None
        return q * Fraction(price.unit_amount_decimal)
    if price.tiers_mode == "volume":
        tier = price.tiers[_tier_index(price.tiers, q)]
        return q * Fraction(tier.unit_amount_decimal) + Fraction(tier.flat_amount_decimal)
    total = Fraction(0)
    start = 0  # units billed by earlier tiers
    for i, t in enumerate(price.tiers):
        if i > 0 and q <= start:
            break  # tier i starts at unit start + 1: not reached
        end = q if t.up_to is None else min(q, t.up_to)
        total += (end - start) * Fraction(t.unit_amount_decimal)
        total += Fraction(t.flat_amount_decimal)
        if t.up_to is None:
            break
        start = t.up_to
    return total


def round_line(amount: Fraction) -> int:
    """Exact amount -> whole minor units, half up (Stripe, once per line); never < 0."""
    return max(0, math.floor(amount + Fraction(1, 2)))


def units_amount(price: Price, units: int) -> int:
    """Minor units billed for ``units`` whole units on one invoice line."""
    return round_line(exact_amount(price, units))


def line_amount(price: Price, quantity_micro: int) -> int:
    """Minor units billed for a period total given in micro-units (whole units priced)."""
    return units_amount(price, whole_units(quantity_micro))


def period_charges(prices: Mapping[str, Price],
                   quantities: Mapping[str, int]) -> dict[str, int]:
    """Minor units per priced meter for one period: ``quantities`` are micro-units per meter.

    Every priced meter gets a line, even without usage (a tiered price bills its first
    tier's flat fee on zero usage); quantities of meters without a price are ignored."""
    return {meter: line_amount(price, quantities.get(meter, 0))
            for meter, price in prices.items()}


def minor_exponent(currency: str) -> int:
    """Decimal places of ``currency``'s minor unit as Stripe counts them."""
    c = currency.lower()
    return 0 if c in _ZERO_DECIMAL else 3 if c in _THREE_DECIMAL else 2


def fmt_minor(amount: int, currency: str) -> str:
    """Integer minor units -> major-unit decimal string: 1234 usd -> "12.34", 500 jpy -> "500"."""
    exp = minor_exponent(currency)
    sign = "-" if amount < 0 else ""
    if exp == 0:
        return f"{sign}{abs(amount)}"
    whole, frac = divmod(abs(amount), 10 ** exp)
    return f"{sign}{whole}.{frac:0{exp}d}"


# ------------------------------------------------------------------ building a Price


@dataclass(frozen=True, slots=True)
class PriceIssue:
    """One problem in a Price object; ``path`` is inside it, e.g. ``("tiers", 1, "up_to")``.

    ``at_key``: the problem is the key itself (unknown or conflicting), not its value."""

    path: Path
    message: str
    at_key: bool = False


class PriceError(MeterproxyError, ValueError):
    """A Price object that cannot be priced; ``issues`` lists every problem."""

    def __init__(self, issues: Sequence[PriceIssue]) -> None:
        self.issues = tuple(issues)
        super().__init__("; ".join(i.message for i in self.issues))


def _label(path: Path) -> str:
    out = "price"
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else f" {p}" if out == "price" else f".{p}"
    return out


def _show(v: object) -> str:
    return str(v) if isinstance(v, Decimal) else repr(v)


@dataclass(slots=True)
class _Check:
    """Collects issues; ``strict`` is the rules file (unknown fields and both forms of an
    amount are errors), otherwise a Price object from the API (extra fields ignored,
    ``null`` means absent, the decimal form wins when both are sent)."""

    strict: bool
    issues: list[PriceIssue] = field(default_factory=list)

    def bad(self, path: Path, message: str, at_key: bool = False) -> None:
        self.issues.append(PriceIssue(path, message, at_key))

    def fields(self, m: Mapping[str, object], path: Path,
               allowed: Sequence[str]) -> dict[str, object]:
        """The present fields (``null`` = absent unless strict); unknown keys reported."""
        out: dict[str, object] = {}
        for k, v in m.items():
            key = str(k)
            if key in allowed:
                if v is not None or self.strict:
                    out[key] = v
            elif self.strict:
                close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
                hint = f"; did you mean '{close[0]}'?" if close else \
                    f" (expected: {', '.join(allowed)})"
                what = _label(path) if path else "price"
                self.bad((*path, key), f"unknown key '{key}' in {what}{hint}", at_key=True)
        return out

    def decimal(self, path: Path, v: object) -> Decimal | None:
        """An amount in minor units: >= 0, finite, at most 12 decimal places."""
        d: Decimal | None = None
        if isinstance(v, Decimal) or (isinstance(v, int) and not isinstance(v, bool)):
            d = Decimal(v)
        elif isinstance(v, str):
            try:
                d = Decimal(v.strip())
            except InvalidOperation:
                d = None
        if d is None or not d.is_finite():
            self.bad(path, f"{_label(path)} must be a decimal string like \"0.25\" "
                           f"(minor units), got {type_name(v)} {_show(v)}")
            return None
        if d < 0:
            self.bad(path, f"{_label(path)} must not be negative, got {v}")
            return None
        if (Fraction(d) * 10 ** MAX_DECIMALS).denominator != 1:
            self.bad(path, f"{_label(path)} has more than {MAX_DECIMALS} decimal places: {v}")
            return None
        return d

    def integer(self, path: Path, v: object, *, positive: bool = False) -> int | None:
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if positive else 0):
            kind = "a positive integer" if positive else "a non-negative integer"
            self.bad(path, f"{_label(path)} must be {kind}, got {type_name(v)} {_show(v)}")
            return None
        return v

    def amount(self, m: Mapping[str, object], path: Path, name: str) -> tuple[bool, Decimal | None]:
        """``name`` (integer) or ``name_decimal`` (decimal string): (present, value)."""
        dec = f"{name}_decimal"
        if name in m and dec in m:
            if self.strict:
                self.bad((*path, dec), f"{_label(path)} has both {name} and {dec}; use one",
                         at_key=True)
                return True, None
            return True, self.decimal((*path, dec), m[dec])
        if dec in m:
            return True, self.decimal((*path, dec), m[dec])
        if name in m:
            i = self.integer((*path, name), m[name])
            return True, None if i is None else Decimal(i)
        return False, None


def _currency(c: _Check, m: Mapping[str, object]) -> str | None:
    if "currency" not in m:
        c.bad((), "price needs currency (a three-letter ISO code like usd)")
        return None
    v = m["currency"]
    if not isinstance(v, str) or len(v.strip()) != 3 or not v.strip().isalpha():
        c.bad(("currency",), f"price currency must be a three-letter ISO code like usd, "
                             f"got {type_name(v)} {v!r}")
        return None
    return v.strip().lower()


def _transform(c: _Check, v: object) -> TransformQuantity | None:
    path: Path = ("transform_quantity",)
    if not isinstance(v, Mapping):
        c.bad(path, f"price transform_quantity must be a mapping {{divide_by, round}}, "
                    f"got {type_name(v)}")
        return None
    m = c.fields(v, path, TRANSFORM_FIELDS)
    before = len(c.issues)
    div = c.integer((*path, "divide_by"), m["divide_by"], positive=True) \
        if "divide_by" in m else None
    if "divide_by" not in m:
        c.bad(path, "price transform_quantity needs divide_by (a positive integer)")
    rnd = m.get("round")
    if "round" not in m:
        c.bad(path, "price transform_quantity needs round (up or down)")
    elif rnd not in ("up", "down"):
        c.bad((*path, "round"), f"price transform_quantity.round must be up or down, "
                                f"got {rnd!r}")
    if len(c.issues) != before or div is None:
        return None
    return TransformQuantity(div, "up" if rnd == "up" else "down")


def _up_to(c: _Check, path: Path, v: object, last: bool) -> int | Literal["bad"] | None:
    if v == "inf" or (v is None and not c.strict):
        if not last:
            c.bad(path, f"{_label(path)} is inf but only the last tier may be unbounded")
            return "bad"
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        c.bad(path, f"{_label(path)} must be a positive integer or inf, got {type_name(v)} "
                    f"{_show(v)}")
        return "bad"
    if last:
        c.bad(path, f"{_label(path)} must be inf: the last tier has no upper bound")
        return "bad"
    return v


def _tiers(c: _Check, v: object) -> tuple[Tier, ...] | None:
    path: Path = ("tiers",)
    if not isinstance(v, list) or not v:
        c.bad(path, f"price tiers must be a non-empty list of {{up_to, unit_amount_decimal, "
                    f"flat_amount_decimal}}, got {type_name(v)}")
        return None
    before = len(c.issues)
    out: list[Tier] = []
    prev = 0
    for i, item in enumerate(v):
        tpath: Path = (*path, i)
        last = i == len(v) - 1
        if not isinstance(item, Mapping):
            c.bad(tpath, f"{_label(tpath)} must be a mapping, got {type_name(item)}")
            continue
        m = c.fields(item, tpath, TIER_FIELDS)
        up_to: int | Literal["bad"] | None = "bad"
        if "up_to" not in m and not (last and not c.strict):
            c.bad(tpath, f"{_label(tpath)} needs up_to (a number of units, or inf on the "
                         f"last tier)")
        else:
            up_to = _up_to(c, (*tpath, "up_to"), m.get("up_to"), last)
        if isinstance(up_to, int):
            if up_to <= prev:
                c.bad((*tpath, "up_to"), f"{_label((*tpath, 'up_to'))} must be greater than "
                                         f"the previous tier's up_to ({prev}): tiers go in "
                                         f"increasing order")
            prev = max(prev, up_to)
        has_unit, unit = c.amount(m, tpath, "unit_amount")
        has_flat, flat = c.amount(m, tpath, "flat_amount")
        if not (has_unit or has_flat):
            c.bad(tpath, f"{_label(tpath)} needs unit_amount_decimal or flat_amount_decimal "
                         f"(or unit_amount / flat_amount)")
        if up_to != "bad":
            out.append(Tier(up_to, unit or Decimal(0), flat or Decimal(0)))
    return tuple(out) if len(c.issues) == before else None


def _per_unit(c: _Check, m: Mapping[str, object]) -> Decimal | None:
    for k in ("tiers", "tiers_mode"):
        if k in m and (c.strict or m[k]):  # an API object may send tiers: [] when expanded
            c.bad((k,), f"price {k} needs billing_scheme: tiered (this price is per_unit)",
                  at_key=True)
    present, unit = c.amount(m, (), "unit_amount")
    if not present:
        c.bad((), "price needs unit_amount_decimal or unit_amount (billing_scheme per_unit)")
    return unit


def _tiered(c: _Check, m: Mapping[str, object]) -> tuple[TiersMode | None, tuple[Tier, ...] | None]:
    for k in ("unit_amount", "unit_amount_decimal"):
        if k in m and c.strict:
            c.bad((k,), f"price {k} is for per_unit prices; a tiered price sets amounts "
                        f"in its tiers", at_key=True)
    if "transform_quantity" in m:
        c.bad(("transform_quantity",), "price transform_quantity cannot be used with tiers",
              at_key=True)
    mode: TiersMode | None = None
    v = m.get("tiers_mode")
    if "tiers_mode" not in m:
        c.bad((), "price needs tiers_mode (graduated or volume) with billing_scheme: tiered")
    elif v == "graduated" or v == "volume":
        mode = v
    else:
        c.bad(("tiers_mode",), f"price tiers_mode must be graduated or volume, got {v!r}")
    if "tiers" not in m:
        c.bad((), "price needs tiers with billing_scheme: tiered")
        return mode, None
    return mode, _tiers(c, m["tiers"])


def price_issues(obj: object, *, strict: bool = False) -> tuple[Price | None, list[PriceIssue]]:
    """Validate a Price object (Stripe's field names); every issue, never only the first."""
    c = _Check(strict)
    if not isinstance(obj, Mapping):
        c.bad((), f"price must be a mapping, got {type_name(obj)}")
        return None, c.issues
    m = c.fields(obj, (), PRICE_FIELDS)
    currency = _currency(c, m)
    scheme = m.get("billing_scheme", "per_unit")
    if scheme not in ("per_unit", "tiered"):
        c.bad(("billing_scheme",), f"price billing_scheme must be per_unit or tiered, "
                                   f"got {scheme!r}")
        return None, c.issues
    pid = obj.get("id")
    price_id = pid if isinstance(pid, str) and not strict else None
    if scheme == "per_unit":
        unit = _per_unit(c, m)
        transform = _transform(c, m["transform_quantity"]) \
            if "transform_quantity" in m else None
        if c.issues or currency is None or unit is None:
            return None, c.issues
        return Price(currency, "per_unit", unit, transform_quantity=transform,
                     id=price_id), c.issues
    mode, tiers = _tiered(c, m)
    if c.issues or currency is None or mode is None or tiers is None:
        return None, c.issues
    return Price(currency, "tiered", tiers_mode=mode, tiers=tiers, id=price_id), c.issues


def price_from_stripe(obj: Mapping[str, object], *, strict: bool = False) -> Price:
    """A :class:`Price` from a Stripe Price object (its own field names); raises
    :class:`PriceError` (a ValueError naming each field) listing every problem.

    ``strict`` (the rules file): unknown fields and both ``x`` and ``x_decimal`` are
    errors, ``up_to`` of the last tier must be ``inf``. Otherwise (an API object) extra
    fields are ignored, ``null`` is absent and ``up_to: null`` is inf."""
    price, issues = price_issues(obj, strict=strict)
    if price is None:
        raise PriceError(issues or [PriceIssue((), "price is invalid")])
    return price


class PriceLookup(Protocol):
    """Where fetched prices are found (:class:`proxy.stripe.prices.PriceCache`)."""

    def get(self, price_id: str) -> Price | None: ...


class _PricedMeter(Protocol):
    @property
    def price(self) -> Price | None: ...
    @property
    def price_id(self) -> str | None: ...


def meter_prices(meters: Mapping[str, _PricedMeter],
                 cache: PriceLookup | None = None) -> dict[str, Price]:
    """The price of each priced meter: Stripe's (fetched for ``price_id``) when the cache
    has it, since Stripe is the billing truth, else the rules file's ``price``."""
    out: dict[str, Price] = {}
    for name, m in meters.items():
        fetched = cache.get(m.price_id) if cache is not None and m.price_id else None
        chosen = fetched or m.price
        if chosen is not None:
            out[name] = chosen
    return out
