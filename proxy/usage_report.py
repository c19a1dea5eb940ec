"""One customer's billing picture for the current period: usage, cost so far, projection,
credits, daily history and the prices in effect. The consumer usage API, the usage page and
the admin customer detail all read this one function, so they can never disagree.

Money is integer minor units of the price currency, shown as exact decimal strings.
Costs price the *billable* units (what credits did not cover: what Stripe will invoice), as
whole units, per meter, rounded once per line (``proxy.pricing``). The projection is linear
on the trailing 7 days (``proxy.periods``); a customer's minimum commitment is the floor of
the projected total.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import aiosqlite

from proxy.credits.service import CreditService
from proxy.periods import TRAILING, day_starts, period_bounds, project
from proxy.pricing import Price, fmt_minor, line_amount, period_charges
from proxy.rules import RuleSet
from proxy.store.keys import Customer
from proxy.timeutil import rfc3339
from proxy.units import fmt_micro

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


async def _sums(db: aiosqlite.Connection, sql: str, args: tuple[Any, ...]) -> list[Any]:
    async with db.execute(sql, args) as cur:
        return list(await cur.fetchall())


async def customer_report(db: aiosqlite.Connection, rules: RuleSet, prices: Mapping[str, Price],
                          customer: Customer, credits: CreditService | None,
                          now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    start, end = period_bounds(customer.billing_anchor, now)
    cid = customer.id
    period = {m: (q, b, c, n) for m, q, b, c, n in await _sums(
        db, "SELECT meter, SUM(quantity), SUM(billable), SUM(covered), SUM(requests)"
            " FROM usage_minute WHERE customer_id=? AND minute>=? AND minute<? GROUP BY meter",
        (cid, start, end))}
    trailing = dict(await _sums(
        db, "SELECT meter, SUM(billable) FROM usage_minute WHERE customer_id=? AND minute>?"
            " GROUP BY meter", (cid, int(now - TRAILING))))
    days = day_starts(now, HISTORY_DAYS)
    hist: dict[int, dict[str, str]] = {d: {} for d in days}
    for meter, day, q in await _sums(
            db, "SELECT meter, minute / 86400 * 86400 AS day, SUM(quantity) FROM usage_minute"
                " WHERE customer_id=? AND minute>=? GROUP BY meter, day", (cid, days[0])):
        if day in hist:
            hist[day][meter] = fmt_micro(q)

    names = sorted(set(rules.meters) | set(period))
    billable = {m: period.get(m, (0, 0, 0, 0))[1] for m in names}
    projected_q = {m: project(billable[m], trailing.get(m, 0), now, end) for m in names}
    so_far = period_charges(prices, billable)
    projected = period_charges(prices, projected_q)
    currencies = sorted({p.currency for p in prices.values()})
    currency = currencies[0] if len(currencies) == 1 else None
    meters: dict[str, Any] = {}
    for m in names:
        q, b, c, n = period.get(m, (0, 0, 0, 0))
        price = prices.get(m)
        entry: dict[str, Any] = {"quantity": fmt_micro(q), "billable": fmt_micro(b),
                                 "covered_by_credits": fmt_micro(c), "requests": n,
                                 "projected_quantity": fmt_micro(projected_q[m])}
        if price is not None:
            entry.update(currency=price.currency,
                         cost_so_far=fmt_minor(so_far.get(m, line_amount(price, b)),
                                               price.currency),
                         projected_cost=fmt_minor(projected.get(m, 0), price.currency))
        meters[m] = entry
    total_so_far = sum(so_far.values())
    total_projected = max(sum(projected.values()), customer.minimum_commitment)
    out: dict[str, Any] = {
        "customer": cid,
        "period": {"start": rfc3339(start), "end": rfc3339(end)},
        "currency": currency,
        "meters": meters,
        "total": {
            "cost_so_far": fmt_minor(total_so_far, currency) if currency else None,
            "projected": fmt_minor(total_projected, currency) if currency else None,
            "minimum_commitment": fmt_minor(customer.minimum_commitment, currency)
            if currency else None,
            "projection": "linear on the trailing 7 days; the minimum commitment is the floor",
        },
        "history": [{"day": rfc3339(d)[:10], "meters": hist[d]} for d in days],
        "prices": {m: price_json(p) for m, p in sorted(prices.items())},
    }
    if credits is not None and credits.book.has_credits(cid):
        out["credits"] = credits.summary(cid, now)
    return out
