"""One customer's billing picture for the current period: usage, cost so far, projection,
credits, daily cost and history, the upcoming invoice and the prices in effect. The consumer
usage API, the usage page and the admin customer detail all read this one function, so they
can never disagree. The field-by-field shape is documented in docs/usage-page.md.

Money is integer minor units of the price currency, shown as exact decimal strings.
Costs price the *billable* units (what credits did not cover: what Stripe will invoice), as
whole units, per meter, rounded once per line (``proxy.pricing``); the words (price text,
invoice sub-lines, notes) come from ``proxy.usage_view``, built on the same line math.
The projection is linear on the trailing 7 days (``proxy.periods``), of use (in whole units,
never below what is used) and of billable units (priced); a customer's minimum commitment
is the floor of the projected total.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from proxy.credits.money import Account
from proxy.credits.service import CreditService
from proxy.periods import TRAILING, day_starts, period_bounds, project
from proxy.pricing import (
    Price,
    TransformQuantity,
    fmt_minor,
    line_amount,
    period_charges,
    prices_in,
    whole_units,
)
from proxy.reports.invoice_check import compare
from proxy.rules import RuleSet
from proxy.store.keys import Customer
from proxy.store.protocols import UsageLedger
from proxy.stripe.client import InvoicePreview
from proxy.timeutil import rfc3339
from proxy.transform import transformed_delta, transformed_units
from proxy.units import QSCALE, fmt_micro, to_micro
from proxy.usage_view import (
    currency_affixes,
    daily_costs,
    fixed_fee,
    grant_name,
    invoice_lines,
    major,
    meter_notes,
    money,
    price_lines,
)

HISTORY_DAYS = 90


def _dec(d: Decimal) -> str:
    s = format(d.normalize(), "f")
    return s


def price_json(p: Price) -> dict[str, Any]:
    """The Price in Stripe's own field names."""
    out: dict[str, Any] = {"id": p.id, "currency": p.currency, "billing_scheme": p.billing_scheme}
    if p.unit_amount_decimal is not None:
        out["unit_amount_decimal"] = _dec(p.unit_amount_decimal)
    if p.tiers_mode is not None:
        out["tiers_mode"] = p.tiers_mode
        out["tiers"] = [{"up_to": "inf" if t.up_to is None else t.up_to,
                         "unit_amount_decimal": _dec(t.unit_amount_decimal),
                         "flat_amount_decimal": _dec(t.flat_amount_decimal)} for t in p.tiers]
    if p.transform_quantity is not None:
        out["transform_quantity"] = {"divide_by": p.transform_quantity.divide_by,
                                     "round": p.transform_quantity.round}
    return out


def _days_between(start: int, now: float, end: int) -> list[int]:
    """UTC midnights of the days from the period's start to today (within the period)."""
    first = start // 86400 * 86400
    last = int(min(now, end - 1)) // 86400 * 86400
    return list(range(first, last + 1, 86400))


def _whole_projection(used: int, projected: int) -> int:
    """A projected quantity in whole units (half up), never below what is already used."""
    return max(used, (projected + QSCALE // 2) // QSCALE * QSCALE)


def _daily_billed(raw: list[int], t: TransformQuantity | None) -> list[int]:
    """Per-day billable micro-units; with a transform, each day is what it adds to the
    transformed period total (so the days sum to the period's billed units)."""
    if t is None:
        return raw
    out, total = [], 0
    for r in raw:
        out.append(transformed_delta(total, total + r, t) * QSCALE)
        total += r
    return out


def _money_credits(account: Account, balance: int, available: int, reserved: int,
                   covered: int) -> dict[str, Any]:
    """A monetary customer's credits in its currency (micro-credits -> minor units, rounded
    down): each figure exact (``fmt_minor``) and as the customer reads it (``*_text``)."""
    cur = account.currency
    out: dict[str, Any] = {"currency": cur}
    for name, micro in (("balance", balance), ("available", available),
                        ("reserved", reserved)):
        minor = micro // account.per_minor
        out[name] = fmt_minor(minor, cur)
        out[f"{name}_text"] = money(minor, cur)
    out["period_covered_by_credits"] = fmt_minor(covered, cur)
    return out


def _grant(g: Mapping[str, Any]) -> dict[str, Any]:
    """A credit grant as the customer sees it: a name, never an internal id."""
    status = "voided" if g["voided"] else "expired" if g["expired"] else \
        "pending" if g.get("pending") else "used_up" if g["remaining"] == "0" else "active"
    return {"name": grant_name(g["source"]), "credits": g["credits"],
            "remaining": g["remaining"], "granted_at": g["created_at"],
            "expires_at": g["expires_at"], "status": status}


async def customer_report(usage: UsageLedger, rules: RuleSet, prices: Mapping[str, Price],
                          customer: Customer, credits: CreditService | None,
                          now: float | None = None,
                          preview: InvoicePreview | str | None = None,
                          account: Account | None = None) -> dict[str, Any]:
    """The usage report; ``preview``: Stripe's invoice preview (or why there is none), shown
    beside the local view with the difference explained (``invoice_check.compare``).
    ``account``: the customer's monetary credits account (``proxy.credits.money``): its
    credits are money, shown in its currency, and the upcoming invoice shows what they
    cover (Stripe applies the mirrored credit grants when it finalizes the invoice)."""
    now = time.time() if now is None else now
    prices = prices_in(prices, customer.currency)     # currency_options in its currency
    start, end = period_bounds(customer.billing_anchor, now)
    cid = customer.id
    days = day_starts(now, HISTORY_DAYS)
    period_days = _days_between(start, now, end)
    trailing_from = int(now - TRAILING)
    # one scan of the customer's recent minutes, split by day and by the two windows
    # (this period, the trailing 7 days); everything below is sums of these groups
    period: dict[str, tuple[int, int, int, int]] = {}
    trailing: dict[str, tuple[int, int]] = {}
    hist: dict[int, dict[str, str]] = {d: {} for d in days}
    hist_q: dict[tuple[int, str], int] = {}
    by_day: dict[int, dict[str, tuple[int, int]]] = {d: {} for d in period_days}
    groups: list[Any] = [
        (u.meter, u.day, u.in_period, u.in_trailing, u.quantity, u.billable, u.covered, u.requests)
        for u in await usage.usage_days(cid, min(days[0], start, trailing_from), (start, end),
                                        trailing_from)]
    for meter, day, in_period, in_trailing, q, b, c, n in groups:
        if in_period:
            pq, pb, pc, pn = period.get(meter, (0, 0, 0, 0))
            period[meter] = (pq + q, pb + b, pc + c, pn + n)
            if day in by_day:
                dq, db_ = by_day[day].get(meter, (0, 0))
                by_day[day][meter] = (dq + q, db_ + b)
        if in_trailing:
            tq, tb = trailing.get(meter, (0, 0))
            trailing[meter] = (tq + q, tb + b)
        if day in hist:
            hist_q[day, meter] = hist_q.get((day, meter), 0) + q
    for (day, meter), q in hist_q.items():
        hist[day][meter] = fmt_micro(q)

    names = sorted(set(rules.meters) | set(period))
    zero = (0, 0, 0, 0)
    tf = {m: mt.transform for m, mt in rules.meters.items() if mt.transform is not None}

    def billed(m: str, micro: int) -> int:
        """A period total as billed: a meter's transform rounds the total once."""
        t = tf.get(m)
        return micro if t is None else transformed_units(micro, t) * QSCALE

    billable = {m: billed(m, period.get(m, zero)[1]) for m in names}
    projected_q = {m: _whole_projection(period.get(m, zero)[0],
                                        project(period.get(m, zero)[0],
                                                trailing.get(m, (0, 0))[0], now, end))
                   for m in names}
    projected_b = {m: billed(m, project(period.get(m, zero)[1], trailing.get(m, (0, 0))[1],
                                       now, end)) for m in names}
    so_far = period_charges(prices, billable)
    projected = period_charges(prices, projected_b)
    currencies = sorted({p.currency for p in prices.values()})
    currency = currencies[0] if len(currencies) == 1 else None
    meters: dict[str, Any] = {}
    lines: list[dict[str, Any]] = []
    daily_cost: dict[str, list[int]] = {}
    for m in names:
        q, _raw_b, c, n = period.get(m, zero)
        b = billable[m]
        price = prices.get(m)
        meter = rules.meters.get(m)
        label = meter.label if meter is not None else m
        unit = meter.units if meter is not None else "units"
        entry: dict[str, Any] = {
            "display_name": label, "unit_label": unit,
            "description": meter.description if meter is not None else None,
            "quantity": fmt_micro(q), "billable": fmt_micro(b), "billable_units": whole_units(b),
            "covered_by_credits": fmt_micro(c), "requests": n,
            "projected_quantity": fmt_micro(projected_q[m]),
            "projected_billable_units": whole_units(projected_b[m]),
            "active": bool(n or q or c),
            "notes": meter_notes(price, q, b, c, unit)}
        if price is not None:
            cur = price.currency
            line = invoice_lines(price, b, unit)
            daily_cost[m] = daily_costs(price, _daily_billed(
                [by_day[d].get(m, (0, 0))[1] for d in period_days], tf.get(m)))
            entry.update(currency=cur,
                         cost_so_far=fmt_minor(so_far.get(m, line_amount(price, b)), cur),
                         projected_cost=fmt_minor(projected.get(m, 0), cur),
                         fixed_fee=fmt_minor(fixed_fee(price), cur),
                         price_text=price_lines(price, unit))
            lines.append({
                "meter": m, "description": label, "unit_label": unit,
                "quantity": line.quantity, "amount": fmt_minor(line.amount, cur),
                "unit_amount": None if line.unit_amount is None
                else major(line.unit_amount, cur),
                "per": line.per,
                "sub_lines": [{"description": s.description, "quantity": s.quantity,
                               "unit_amount": None if s.unit_amount is None
                               else major(s.unit_amount, cur),
                               "amount": major(s.amount, cur)} for s in line.sub_lines]})
        meters[m] = entry
    total_so_far = sum(so_far.values())
    total_projected = max(sum(projected.values()), customer.minimum_commitment)
    last_day = rfc3339(end - 1)[:10]
    out: dict[str, Any] = {
        "customer": cid,
        "period": {"start": rfc3339(start), "end": rfc3339(end)},
        "currency": currency,
        "currency_format": dict(zip(("prefix", "suffix"), currency_affixes(currency),
                                    strict=True)) if currency else None,
        "meters": meters,
        "total": {
            "cost_so_far": fmt_minor(total_so_far, currency) if currency else None,
            "projected": fmt_minor(total_projected, currency) if currency else None,
            "minimum_commitment": fmt_minor(customer.minimum_commitment, currency)
            if currency else None,
            "fixed_fees": fmt_minor(sum(fixed_fee(p) for p in prices.values()), currency)
            if currency else None,
            "projection": f"At the average daily rate of the last 7 days, until the period "
                          f"ends on {last_day} (UTC)"
                          + (f"; at least the minimum commitment of "
                             f"{money(customer.minimum_commitment, currency)}"
                             if currency and customer.minimum_commitment else "") + ".",
        },
        "daily": [{"day": rfc3339(d)[:10],
                   "cost": fmt_minor(sum(v[i] for v in daily_cost.values()), currency)
                   if currency else None,
                   "meters": {m: {"quantity": fmt_micro(qb[0]), "billable": fmt_micro(qb[1]),
                                  **({"cost": fmt_minor(daily_cost[m][i], prices[m].currency)}
                                     if m in daily_cost else {})}
                              for m, qb in sorted(by_day[d].items())}}
                  for i, d in enumerate(period_days)],
        "upcoming_invoice": {
            "currency": currency,
            "lines": lines,
            "total": fmt_minor(total_so_far, currency) if currency else None,
            "note": "Usage so far this period, as Stripe will itemise it; each line is "
                    "rounded once, to the cent.",
        },
        "history": [{"day": rfc3339(d)[:10], "meters": hist[d]} for d in days],
        "prices": {m: price_json(p) for m, p in sorted(prices.items())},
    }
    covered = account.covered(now) // account.per_minor if account is not None else None
    if account is not None and covered is not None:
        cur = account.currency
        out["upcoming_invoice"].update(
            credits_applied=fmt_minor(covered, cur),
            amount_due=fmt_minor(total_so_far - covered, cur),
            note="Usage so far this period, as Stripe will itemise it; each line is rounded "
                 "once, to the cent. Your credits are applied to these lines when the "
                 "invoice is finalized.")
    if isinstance(preview, str):
        out["invoice_preview"] = {"error": preview}
    elif preview is not None:
        out["invoice_preview"] = compare(
            {m: (whole_units(billable[m]), so_far.get(m, 0)) for m in prices},
            {m: p.id for m, p in prices.items() if p.id}, preview, local_credits=covered)
    if credits is not None and (credits.book.has_credits(cid) or account is not None):
        summary = credits.summary(cid, now)
        summary["grants"] = [_grant(g) for g in summary["grants"]]
        if account is not None:
            summary["money"] = _money_credits(account, credits.book.balance(cid, now),
                                              credits.book.available(cid, now),
                                              credits.book.held(cid), covered or 0)
            for g in summary["grants"]:     # each amount also as money, formatted
                for field in ("credits", "remaining"):
                    g[f"{field}_text"] = money(to_micro(g[field]) // account.per_minor,
                                               account.currency)
        out["credits"] = summary
    return out
