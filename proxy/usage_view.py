"""What a paying customer reads: prices, invoice lines, daily costs and notes in words.

Pure functions over :mod:`proxy.pricing` (no I/O, no floats). Everything here is built from
the same exact-integer line math the rest of meterproxy bills with, so the words can never
disagree with the numbers:

- :func:`money` / :func:`major` -- minor units (``int`` or an exact ``Fraction``) as the
  customer reads them: ``$1,234.50``; an exact sub-cent amount keeps its digits (``$0.015``).
- :func:`price_lines` -- a Price in words: ``$0.50 per 1,000 calls``,
  ``First 1,000,000 tokens: $2.00 per 1 million tokens + $5.00 flat fee``.
- :func:`invoice_lines` -- one meter's upcoming invoice line as Stripe shows it: the billed
  quantity, the rounded amount, and one sub-line per tier reached and per flat fee, each
  exact (the line is rounded once, like Stripe does).
- :func:`daily_costs` -- what each day added to a meter's line: the difference of the line
  amount before and after the day's billable units (exact integers; their sum plus the fee a
  zero total already bills is the line amount).
- :func:`meter_notes` -- flat fees, whole units and credits explained in a sentence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

from proxy.pricing import (
    Price,
    Tier,
    billed_quantity,
    exact_amount,
    line_amount,
    minor_exponent,
    round_line,
    whole_units,
)
from proxy.units import QSCALE

__all__ = [
    "InvoiceLine",
    "SubLine",
    "currency_affixes",
    "daily_costs",
    "fixed_fee",
    "grant_name",
    "invoice_lines",
    "major",
    "meter_notes",
    "money",
    "price_lines",
    "quantity_text",
]

_PREFIX = {"usd": "$", "eur": "€", "gbp": "£", "jpy": "¥", "inr": "₹", "cad": "CA$",
           "aud": "A$", "nzd": "NZ$", "hkd": "HK$", "sgd": "S$", "mxn": "MX$", "brl": "R$",
           "krw": "₩", "cny": "CN¥"}
# a per-unit rate is quoted per the smallest of these that makes it at least one minor unit
_SCALES = ((1, ""), (1_000, "1,000"), (1_000_000, "1 million"), (1_000_000_000, "1 billion"))
_ORDINAL = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth",
            "ninth", "tenth")
DASH, TIMES = "\u2013", "\u00d7"   # en dash for ranges, multiplication sign
_MAX_DIGITS = 40   # exact rates have at most 12 decimals; this only bounds the loop


def currency_affixes(currency: str) -> tuple[str, str]:
    """(prefix, suffix) around an amount: ("$", "") for usd, ("", " CHF") for chf."""
    c = currency.lower()
    return (_PREFIX[c], "") if c in _PREFIX else ("", f" {c.upper()}")


def _grouped(whole: int) -> str:
    return f"{whole:,}"


def major(amount: int | Fraction | Decimal, currency: str, *, grouped: bool = False) -> str:
    """Minor units -> the major-unit decimal string, exact: at least the currency's decimals,
    more only when the amount has them (sub-cent rates): 1234 usd -> "12.34",
    Fraction(3, 2) usd -> "0.015". ``grouped`` adds thousands separators."""
    exp = minor_exponent(currency)
    f = Fraction(amount) / 10 ** exp
    sign = "-" if f < 0 else ""
    f = abs(f)
    places = exp
    while (f * 10 ** places).denominator != 1 and places < _MAX_DIGITS:
        places += 1
    scaled = round(f * 10 ** places)      # exact unless the amount is not a finite decimal
    whole, frac = divmod(scaled, 10 ** places)
    head = _grouped(whole) if grouped else str(whole)
    return f"{sign}{head}.{frac:0{places}d}" if places else f"{sign}{head}"


def money(amount: int | Fraction | Decimal, currency: str) -> str:
    """Minor units as a customer reads them: "$1,234.50", "0.015 CHF", "¥500"."""
    pre, suf = currency_affixes(currency)
    text = major(amount, currency, grouped=True)
    if text.startswith("-"):
        return f"-{pre}{text[1:]}{suf}"
    return f"{pre}{text}{suf}"


def quantity_text(micro: int) -> str:
    """Micro-units -> "1,234.5" (exact, grouped, no trailing zeros)."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), QSCALE)
    tail = f".{frac:06d}".rstrip("0") if frac else ""
    return f"{sign}{whole:,}{tail}"


# ------------------------------------------------------------------ prices in words


def _rate(rate: Decimal, currency: str, unit: str, per: int = 1) -> str:
    """A per-unit rate (minor units per ``per`` units) in words."""
    if rate == 0:
        return "free"
    r = Fraction(rate)
    if per != 1:
        return f"{money(r, currency)} per {per:,} {unit}"
    for scale, words in _SCALES:
        if r * scale >= 1 or scale == _SCALES[-1][0]:
            if scale == 1:
                return f"{money(r, currency)} each"
            return f"{money(r * scale, currency)} per {words} {unit}"
    raise AssertionError("unreachable")


def _flat(t: Tier, currency: str) -> str:
    return f" + {money(Fraction(t.flat_amount_decimal), currency)} flat fee" \
        if t.flat_amount_decimal else ""


def price_lines(price: Price, unit: str) -> list[str]:
    """The price in words, one line per tier (``unit`` is the plural unit label)."""
    c = price.currency
    if price.billing_scheme == "per_unit":
        assert price.unit_amount_decimal is not None
        tq = price.transform_quantity
        if tq is None:
            return [_rate(price.unit_amount_decimal, c, unit)]
        how = "any started" if tq.round == "up" else "only complete"
        return [f"{_rate(price.unit_amount_decimal, c, unit, tq.divide_by)} "
                f"({how} {tq.divide_by:,} {unit} count)"]
    out: list[str] = []
    prev = 0
    volume = price.tiers_mode == "volume"
    for t in price.tiers:
        if volume:
            band = (f"Up to {t.up_to:,} {unit} in total" if t.up_to is not None
                    else f"More than {prev:,} {unit} in total")
            rate = _rate(t.unit_amount_decimal, c, unit)
            text = f"{band}: {rate}, on all {unit}" if rate != "free" else f"{band}: free"
        else:
            if t.up_to is None:
                band = f"All {unit}" if prev == 0 else f"Over {prev:,} {unit}"
            elif prev == 0:
                band = f"First {t.up_to:,} {unit}"
            else:
                band = f"Next {t.up_to - prev:,} {unit} ({prev + 1:,}{DASH}{t.up_to:,})"
            text = f"{band}: {_rate(t.unit_amount_decimal, c, unit)}"
        out.append(text + _flat(t, c))
        prev = t.up_to or prev
    return out


# ------------------------------------------------------------------ the invoice line


@dataclass(frozen=True, slots=True)
class SubLine:
    """One tier (or flat fee) of an invoice line: exact, not rounded."""

    description: str
    quantity: int | None          # None for a flat fee
    unit_amount: Fraction | None  # minor units per unit
    amount: Fraction              # minor units, exact


@dataclass(frozen=True, slots=True)
class InvoiceLine:
    """One meter's line on the upcoming invoice. A per-unit price is one row (``unit_amount``
    per ``per`` units); a tiered price is itemised in ``sub_lines``."""

    quantity: int                 # whole units billed (after transform_quantity)
    amount: int                   # minor units, rounded once (== pricing.line_amount)
    exact: Fraction               # before rounding
    unit_amount: Fraction | None  # per-unit prices: minor units per ``per`` units
    per: int
    sub_lines: tuple[SubLine, ...]


def _tier_word(i: int) -> str:
    return _ORDINAL[i] if i < len(_ORDINAL) else f"#{i + 1}"


def _band(start: int, up_to: int | None, unit: str) -> str:
    if up_to is None:
        return f"Over {start:,} {unit}" if start else f"All {unit}"
    if start == 0:
        return f"First {up_to:,} {unit}"
    return f"From {start + 1:,} to {up_to:,} {unit}"


def invoice_lines(price: Price, billable_micro: int, unit: str) -> InvoiceLine:
    """The invoice line for a period's billable micro-units, tiers itemised.

    Invariant (tested): ``quantity x unit_amount`` (per-unit) or the sub-lines (tiered) sum
    to :func:`pricing.exact_amount` exactly; the amount is :func:`pricing.line_amount`."""
    units = whole_units(billable_micro)
    q = billed_quantity(price, units)
    exact = exact_amount(price, units)
    if price.billing_scheme == "per_unit":
        assert price.unit_amount_decimal is not None
        r = Fraction(price.unit_amount_decimal)
        tq = price.transform_quantity
        assert q * r == exact
        return InvoiceLine(q, round_line(exact), exact, r, 1 if tq is None else tq.divide_by,
                           ())
    subs: list[SubLine] = []
    if price.tiers_mode == "volume":
        i = next(i for i, t in enumerate(price.tiers) if t.up_to is None or q <= t.up_to)
        t = price.tiers[i]
        r = Fraction(t.unit_amount_decimal)
        subs.append(SubLine(f"All {unit} at the {_tier_word(i)} tier's rate", q, r, q * r))
        if t.flat_amount_decimal:
            subs.append(SubLine(f"Flat fee of the {_tier_word(i)} tier", None, None,
                                Fraction(t.flat_amount_decimal)))
    else:
        start = 0
        for i, t in enumerate(price.tiers):
            if i > 0 and q <= start:
                break
            end = q if t.up_to is None else min(q, t.up_to)
            r = Fraction(t.unit_amount_decimal)
            subs.append(SubLine(_band(start, t.up_to, unit), end - start, r, (end - start) * r))
            if t.flat_amount_decimal:
                subs.append(SubLine(f"Flat fee of the {_tier_word(i)} tier", None, None,
                                    Fraction(t.flat_amount_decimal)))
            if t.up_to is None:
                break
            start = t.up_to
    assert sum((s.amount for s in subs), Fraction(0)) == exact
    return InvoiceLine(q, round_line(exact), exact, None, 1, tuple(subs))


def fixed_fee(price: Price) -> int:
    """What the line bills with no usage at all (a first tier's flat fee), minor units."""
    return line_amount(price, 0)


def daily_costs(price: Price, billable_by_day: Sequence[int]) -> list[int]:
    """What each day added to the line (minor units), from the period's daily billable
    micro-units in order: line(total through the day) - line(total before it). The first
    day starts from the zero-usage amount (:func:`fixed_fee`), so
    ``fixed_fee + sum(daily_costs) == line_amount(price, sum(billable_by_day))``."""
    out: list[int] = []
    running = 0
    before = line_amount(price, 0)
    for b in billable_by_day:
        running += b
        after = line_amount(price, running)
        out.append(after - before)
        before = after
    return out


def meter_notes(price: Price | None, quantity_micro: int, billable_micro: int,
                covered_micro: int, unit: str) -> list[str]:
    """Sentences that explain a meter's line: credits, whole units, flat fees."""
    notes: list[str] = []
    units = whole_units(billable_micro)
    if covered_micro > 0 and billable_micro <= 0:
        notes.append(f"Your credits covered all {quantity_text(quantity_micro)} {unit} "
                     f"used this period.")
    elif covered_micro > 0:
        notes.append(f"Your credits covered {quantity_text(covered_micro)} of the "
                     f"{quantity_text(quantity_micro)} {unit} used this period.")
    rest = max(0, billable_micro) - units * QSCALE
    if rest:
        notes.append(f"Billed in whole {unit}: {quantity_text(units * QSCALE)} now; the "
                     f"remaining {quantity_text(rest)} is added to later usage.")
    if price is None:
        return notes
    line = invoice_lines(price, billable_micro, unit)
    fees = [s for s in line.sub_lines if s.quantity is None]
    if fees:
        c = price.currency
        total = sum((s.amount for s in fees), Fraction(0))
        which = " and ".join(s.description.removeprefix("Flat fee of ").lower()
                             for s in fees)
        noun = "flat fee" if len(fees) == 1 else "flat fees"
        text = f"Includes the {money(total, c)} {noun} of {which}"
        if line.quantity == 0 and fixed_fee(price):
            text += ", charged even when nothing is used"
        notes.append(text + ".")
    return notes


def grant_name(source: str | None) -> str:
    """A customer-facing name for a credit grant's ``source`` (never an internal id):
    ``stripe:in_...`` (a subscription invoice) is the plan's allowance, any other
    ``stripe:...`` a purchase; an operator's own source text is shown as written."""
    s = (source or "").strip()
    if s.startswith("stripe:"):
        return "Plan allowance" if s.startswith("stripe:in_") else "Credit purchase"
    if s in ("", "admin"):
        return "Credit grant"
    if s == "demo":
        return "Demo credits"
    return s[:1].upper() + s[1:]
