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
- Once a period has ended and settled (``TRUEUP_SETTLE``, 2 minutes, after its end; checked
  every ``TRUEUP_INTERVAL``, 5 minutes, when a Stripe key and a sink other than ``dry_run``
  are configured), its true-up is decided once from the usage materialized then (the
  journal is materialized, in a fleet this member's journal shipped, first): a row in
  ``trueups`` (schema migrations 8 and 14, the ``TrueUps`` owner) records ``none`` (no
  shortfall) or, before any call to Stripe, ``sending`` with the exact parameters of the
  invoice item (amount, charge, commitment, currency, Stripe customer). Every attempt sends
  those frozen parameters, never a recomputed shortfall (late usage, new prices or an edited
  commitment change nothing once frozen), under the same idempotency key
  (``meterproxy-trueup-<customer>-<period start>``): Stripe refuses a key reused with other
  parameters (400 ``idempotency_error``). Each attempt first looks for the item
  (``StripeClient.find_invoice_item``: ``metadata.meterproxy_customer`` and the period's
  start), so a call whose answer was lost and is retried after Stripe forgot the key (24
  hours) does not create a second item. Once created or found the row is ``sent`` with the
  item id; a failed attempt leaves it ``sending`` and is retried at the next check.
- Every fleet member runs the check: the first ``sending`` row for a period is the one every
  member sends (the others' inserts are ignored), under the one key, so concurrent members
  create one item (Stripe answers the second call with the first's result, or 409 while the
  first runs: retried), and ``sent`` is recorded once.
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

from proxy import metrics
from proxy.errors import StorageError, StripeCallError, StripeRejected
from proxy.periods import period_bounds
from proxy.pricing import Price, period_charges, prices_in
from proxy.rules.model import RuleSet
from proxy.store.protocols import Customers, TrueUpRecord, TrueUps, UsageLedger
from proxy.stripe.client import StripeClient
from proxy.transform import transformed_units
from proxy.units import QSCALE

log = logging.getLogger("meterproxy.commitments")

TRUEUP_INTERVAL = 300.0     # seconds between checks (a true-up is due once a period ends)
# seconds after a period's end before its true-up is decided (and frozen): a request in
# flight at the end is recorded by then, and in a fleet every member's journal shipped
# (each ships every ``fleet.ship_interval``, 1 s by default)
TRUEUP_SETTLE = 120


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

    def record(self, status: str, item: str | None, at: int) -> TrueUpRecord:
        return TrueUpRecord(self.customer_id, self.period[0], self.period[1], self.commitment,
                            self.charged, self.amount, self.currency, status, item, at,
                            self.stripe_customer_id)

    @classmethod
    def frozen(cls, r: TrueUpRecord) -> TrueUp | None:
        """The true-up a ``sending`` row froze: what every attempt sends (None without its
        Stripe customer, which the ``TrueUps`` owners refuse to write)."""
        if not r.stripe_customer_id:
            return None
        return cls(r.customer_id, r.stripe_customer_id, (r.period_start, r.period_end),
                   r.commitment, r.charged, r.amount, r.currency)


async def due(customers: Customers, usage: UsageLedger, trueups: TrueUps, rules: RuleSet,
              prices: Mapping[str, Price], now: float) -> list[TrueUp]:
    """True-ups of periods that have ended (``TRUEUP_SETTLE`` ago) and were not decided yet
    (the last ended period of each customer with a commitment and a Stripe customer), from
    the usage materialized now."""
    tf = {m: mt.transform for m, mt in rules.meters.items() if mt.transform is not None}
    billable: dict[tuple[int, int], dict[tuple[str, str], int]] = {}
    out = []
    materialized = False
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
        if now < end + TRUEUP_SETTLE or start < cust.created_at \
                or await trueups.decided(cust.id, start):
            continue
        if not materialized:        # usage still in the journal (a fleet: not shipped yet)
            await usage.materialize()
            materialized = True
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
        """Decide every due true-up (freezing what a shortfall sends), then send every frozen
        one not confirmed yet; returns what this call recorded (failures are retried later)."""
        now = time.time() if now is None else now
        done = []
        for t in await due(self.customers, self.usage, self.trueups, self.rules(),
                           self.prices(), now):
            at = int(time.time())
            if t.amount <= 0:
                if await self.trueups.record(t.record("none", None, at)):
                    done.append(_report(t, None))
                continue
            if self.stripe is None:
                log.warning("true-up of %s for %s not sent: no Stripe key (dry run)",
                            t.amount, t.customer_id)
                continue
            # frozen before the first call; another member's row, if first, is the one sent
            await self.trueups.record(t.record("sending", None, at))
        if self.stripe is None:
            return done
        unsent = 0
        for r in await self.trueups.sending():
            unsent += 1
            frozen = TrueUp.frozen(r)
            if frozen is None:
                metrics.trueup_failures_total.labels("invalid").inc()
                log.error("true-up of %s (period %s) names no Stripe customer: not sent",
                          r.customer_id, r.period_start)
                continue
            try:
                item = await self._send(self.stripe, frozen)
            except StripeRejected as exc:
                metrics.trueup_failures_total.labels("rejected").inc()
                log.error("true-up of %s for %s (period %s) rejected by Stripe, sent again at "
                          "the next check until the cause is fixed: %s", frozen.amount,
                          r.customer_id, r.period_start, exc.reason)
                continue
            except StripeCallError as exc:
                metrics.trueup_failures_total.labels("unavailable").inc()
                log.warning("true-up for %s (period %s) failed, retried later: %s",
                            r.customer_id, r.period_start, exc.reason)
                continue
            if await self.trueups.mark_sent(r.customer_id, r.period_start, item):
                done.append(_report(frozen, item))
            unsent -= 1
        metrics.trueups_unsent.set(unsent)
        return done

    @staticmethod
    async def _send(stripe: StripeClient, t: TrueUp) -> str:
        """The frozen true-up's invoice item: found (an earlier attempt made it: its answer
        lost, its key possibly forgotten by Stripe since) or created."""
        found = await stripe.find_invoice_item(
            t.stripe_customer_id, {"meterproxy_customer": t.customer_id}, t.period[0])
        if found is not None:
            return found
        return await stripe.create_invoice_item(t.params(), idempotency_key=t.idempotency_key)

    async def run(self, interval: float) -> None:
        while True:
            try:
                await self.check()
            except (sqlite3.Error, StorageError):
                # PostgreSQL's outcome unknown included: a true-up is decided once
                # (``trueups.record``), and its frozen item looked up before it is created
                log.exception("true-ups paused: storage error")
            await asyncio.sleep(interval)


def _report(t: TrueUp, item: str | None) -> dict[str, Any]:
    return {"customer_id": t.customer_id, "period_start": t.period[0], "amount": t.amount,
            "invoice_item": item}
