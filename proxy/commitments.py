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
  ``trueups`` (schema migration 8) records ``none`` (no shortfall) or ``sent`` with the
  invoice item id. A failed call leaves no row and is retried at the next check with the
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

from proxy.periods import period_bounds
from proxy.pricing import Price, period_charges
from proxy.rules.model import RuleSet
from proxy.sinks.stripe_client import Failed, StripeConnection, attempt
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


def due(conn: sqlite3.Connection, rules: RuleSet, prices: Mapping[str, Price],
        now: float) -> list[TrueUp]:
    """True-ups of periods that have ended and were not decided yet (the last ended period
    of each customer with a commitment and a Stripe customer)."""
    currencies = {p.currency for p in prices.values()}
    if len(currencies) != 1:
        if currencies:
            log.warning("true-ups skipped: priced meters use several currencies %s",
                        sorted(currencies))
        return []
    (currency,) = currencies
    tf = {m: mt.transform for m, mt in rules.meters.items() if mt.transform is not None}
    out = []
    for cid, scid, anchor, commitment, created in conn.execute(
            "SELECT id, stripe_customer_id, billing_anchor, minimum_commitment, created_at"
            " FROM customers WHERE minimum_commitment > 0 AND stripe_customer_id IS NOT NULL"
            " ORDER BY id"):
        current = period_bounds(anchor, now)[0]
        start, end = period_bounds(anchor, current - 1)
        if start < created or conn.execute("SELECT 1 FROM trueups WHERE customer_id=? AND period_start=?",
                        (cid, start)).fetchone():
            continue
        totals = {m: int(b) for m, b in conn.execute(
            "SELECT meter, SUM(billable) FROM usage_minute WHERE customer_id=? AND minute >= ?"
            " AND minute < ? GROUP BY meter", (cid, start, end))}
        billed = {m: q if (t := tf.get(m)) is None else transformed_units(q, t) * QSCALE
                  for m, q in totals.items()}
        charged = sum(period_charges(prices, billed).values())
        out.append(TrueUp(cid, scid, (start, end), int(commitment), charged,
                          shortfall(int(commitment), [charged]), currency))
    return out


def record(c: sqlite3.Connection, t: TrueUp, status: str, item: str | None) -> None:
    c.execute("INSERT OR IGNORE INTO trueups(customer_id, period_start, period_end, commitment,"
              " charged, amount, currency, status, invoice_item, created_at)"
              " VALUES (?,?,?,?,?,?,?,?,?,?)",
              (t.customer_id, t.period[0], t.period[1], t.commitment, t.charged, t.amount,
               t.currency, status, item, int(time.time())))


class TrueUpTask:
    def __init__(self, write: Callable[[Callable[[sqlite3.Connection], Any]], Any],
                 conn: sqlite3.Connection, stripe: StripeConnection | None,
                 rules: Callable[[], RuleSet], prices: Callable[[], Mapping[str, Price]]) -> None:
        self.write = write
        self.conn = conn
        self.stripe = stripe
        self.rules = rules
        self.prices = prices

    async def check(self, now: float | None = None) -> list[dict[str, Any]]:
        """Decide every due true-up; returns what was done (failures are retried later)."""
        now = time.time() if now is None else now
        done = []
        for t in due(self.conn, self.rules(), self.prices(), now):
            item: str | None = None
            if t.amount > 0:
                if self.stripe is None:
                    log.warning("true-up of %s for %s not sent: no Stripe key (dry run)",
                                t.amount, t.customer_id)
                    continue
                res = await attempt(self.stripe.client.v1.invoice_items.create_async(
                    t.params(),  # type: ignore[arg-type]
                    {"idempotency_key": t.idempotency_key}))
                if isinstance(res, Failed):
                    log.warning("true-up for %s (period %s) failed, retried later: %s",
                                t.customer_id, t.period[0], res.outcome)
                    continue
                item = str(res.id)
            def tx(c: sqlite3.Connection, t: TrueUp = t, item: str | None = item) -> None:
                record(c, t, "sent" if item else "none", item)

            self.write(tx)
            done.append({"customer_id": t.customer_id, "period_start": t.period[0],
                         "amount": t.amount, "invoice_item": item})
        return done

    async def run(self, interval: float) -> None:
        while True:
            try:
                await self.check()
            except sqlite3.Error:
                log.exception("true-ups paused: storage error")
            await asyncio.sleep(interval)
