"""Minimum commitment true-up (issue 12): at the end of a customer's billing period, the
shortfall below its ``minimum_commitment`` becomes a Stripe invoice item.

- The commitment is ``customers.minimum_commitment`` (minor units, set through
  ``POST /admin/customers``), in the currency of the meters' prices (all priced meters must
  share one currency; otherwise the period is skipped and logged).
- The period's charge is what Stripe invoices for the usage meterproxy reported: the billable
  (not credit-covered) period total of each priced meter, after the meter's ``transform`` on
  the total, priced by the pricing engine (``period_charges``: tiers, flat fees, rounding once
  per line). ``shortfall = max(0, commitment - charge)``.
- Only whole periods count: a period that started before the customer was created (its
  first, partial period) has no true-up.
- Once a period has ended (checked every ``TRUEUP_INTERVAL``, 5 minutes, when a Stripe key
  and a sink other than ``dry_run`` are configured), its true-up is decided once: a row in
  ``trueups`` (schema migration 8, the ``TrueUps`` owner) records ``none`` (no shortfall) or
  ``sent`` with the invoice item id. A failed call leaves no row and is retried at the next check with the
  same idempotency key (``meterproxy-trueup-<customer>-<period start>``), so Stripe creates
  one item whatever the retries.
- ``POST /v1/invoiceitems``: ``customer``, ``amount`` (minor units), ``currency``,
  ``description``, ``period[start|end]``, ``metadata``. The item is pending: Stripe puts it
  on the next invoice created for the customer (for a subscription, usually the following
  renewal; it is not attached to the renewal draft that already exists).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.errors import StorageError, StripeCallError
from proxy.periods import period_bounds
from proxy.pricing import Price, period_charges, prices_in
from proxy.rules.model import RuleSet
from proxy.store.protocols import Customers, TrueUpRecord, TrueUps, UsageLedger
from proxy.stripe.client import StripeClient
from proxy.transform import transformed_units
from proxy.units import QSCALE

log = logging.getLogger("meterproxy.commitments")

TRUEUP_INTERVAL = 300.0     # seconds between checks (a true-up is due once a period ends)


def shortfall(commitment_minor: int, charges_minor: Iterable[int]) -> int:
    """What the customer owes on top of its charges to reach its commitment (never < 0)."""
    return max(0, commitment_minor - sum(charges_minor))


@dataclass(frozen=True, slots=True)
class TrueUp:
    customer_id: str
    stripe_customer_id: str
    period: tuple[int, int]
    commitment: int
    charged: int
    amount: int
    currency: str

    @property
    def idempotency_key(self) -> str:
        return f"meterproxy-trueup-{self.customer_id}-{self.period[0]}"

    def params(self) -> dict[str, Any]:
        return {"customer": self.stripe_customer_id, "amount": self.amount,
                "currency": self.currency,
                "description": "Minimum commitment true-up",
                "period": {"start": self.period[0], "end": self.period[1]},
                "metadata": {"meterproxy_customer": self.customer_id,
                             "meterproxy_commitment": str(self.commitment),
                             "meterproxy_charged": str(self.charged)}}

    def record(self, item: str | None, at: int) -> TrueUpRecord:
        return TrueUpRecord(self.customer_id, self.period[0], self.period[1], self.commitment,
                            self.charged, self.amount, self.currency,
                            "sent" if item else "none", item, at)


async def due(customers: Customers, usage: UsageLedger, trueups: TrueUps, rules: RuleSet,
              prices: Mapping[str, Price], now: float) -> list[TrueUp]:
    """True-ups of periods that have ended and were not decided yet (the last ended period
    of each customer with a commitment and a Stripe customer)."""
    tf = {m: mt.transform for m, mt in rules.meters.items() if mt.transform is not None}
    billable: dict[tuple[int, int], dict[tuple[str, str], int]] = {}
    out = []
    for cust in await customers.all():
        if cust.minimum_commitment <= 0 or not cust.stripe_customer_id:
            continue
        # the customer's prices: in its currency (currency_options) when it has one
        mine = prices_in(prices, cust.currency)
        currencies = {p.currency for p in mine.values()}
        if len(currencies) != 1:
            if currencies:
                log.warning("true-up of %s skipped: its priced meters use several"
                            " currencies %s", cust.id, sorted(currencies))
            continue
        (currency,) = currencies
        current = period_bounds(cust.billing_anchor, now)[0]
        start, end = period_bounds(cust.billing_anchor, current - 1)
        if start < cust.created_at or await trueups.decided(cust.id, start):
            continue
        if (start, end) not in billable:     # one grouped read per distinct period
            billable[(start, end)] = await usage.billable(start, end)
        totals = {m: q for (c, m), q in billable[(start, end)].items() if c == cust.id}
        billed = {m: q if (t := tf.get(m)) is None else transformed_units(q, t) * QSCALE
                  for m, q in totals.items()}
        charged = sum(period_charges(mine, billed).values())
        commitment = cust.minimum_commitment
        out.append(TrueUp(cust.id, cust.stripe_customer_id, (start, end), commitment, charged,
                          shortfall(commitment, [charged]), currency))
    return out


class TrueUpTask:
    def __init__(self, customers: Customers, usage: UsageLedger, trueups: TrueUps,
                 stripe: StripeClient | None, rules: Callable[[], RuleSet],
                 prices: Callable[[], Mapping[str, Price]]) -> None:
        self.customers = customers
        self.usage = usage
        self.trueups = trueups
        self.stripe = stripe
        self.rules = rules
        self.prices = prices

    async def check(self, now: float | None = None) -> list[dict[str, Any]]:
        """Decide every due true-up; returns what was done (failures are retried later)."""
        now = time.time() if now is None else now
        done = []
        for t in await due(self.customers, self.usage, self.trueups, self.rules(),
                           self.prices(), now):
            item: str | None = None
            if t.amount > 0:
                if self.stripe is None:
                    log.warning("true-up of %s for %s not sent: no Stripe key (dry run)",
                                t.amount, t.customer_id)
                    continue
                try:
                    item = await self.stripe.create_invoice_item(
                        t.params(), idempotency_key=t.idempotency_key)
                except StripeCallError as exc:
                    log.warning("true-up for %s (period %s) failed, retried later: %s",
                                t.customer_id, t.period[0], exc.reason)
                    continue
            await self.trueups.record(t.record(item, int(time.time())))
            done.append({"customer_id": t.customer_id, "period_start": t.period[0],
                         "amount": t.amount, "invoice_item": item})
        return done

    async def run(self, interval: float) -> None:
        while True:
            try:
                await self.check()
            except (sqlite3.Error, StorageError):
                # PostgreSQL's outcome unknown included: a true-up is decided once
                # (``trueups.decided``) and its invoice item sent under its idempotency key
                log.exception("true-ups paused: storage error")
            await asyncio.sleep(interval)
