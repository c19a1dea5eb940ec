"""Step 5, settlement: a finished request's measurement -> quantities (pure), credits
settled against its hold, and one usage row handed to the Store (one transaction with the
credit debits). In strict durability the caller gets the commit to wait for before the last
bytes of the response go out (``proxy.request.stream``).

A status the rule does not count (``count_when``) is not billable: the hold is released and
nothing is recorded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from proxy import metrics
from proxy.credits.book import CreditBook
from proxy.credits.ledger import Entry, covered_quantity
from proxy.credits.reserve import Reservations
from proxy.credits.thresholds import ThresholdWatch
from proxy.request.context import RequestContext
from proxy.rules import Measurement, Quantity, Rule, compute, constant_quantities
from proxy.runtime import Runtime
from proxy.store.db import UsageItem, UsageRow
from proxy.units import cost_micro


class Settlement:
    def __init__(self, rt: Runtime, book: CreditBook | None, watch: ThresholdWatch | None,
                 reservations: Reservations, default_estimate: int) -> None:
        self.rt = rt
        self.book = book
        self.watch = watch
        self.reservations = reservations
        self.default_estimate = default_estimate
        self.strict = rt.cfg.storage.durability == "strict"
        self._unit_counters: dict[str, Any] = {}
        # rule -> {meter: credits_per_unit}, computed once per rule object (reloads add more)
        self._rates: dict[int, tuple[Rule, dict[str, Decimal | None]]] = {}

    def rates(self, rule: Rule) -> dict[str, Decimal | None]:
        hit = self._rates.get(id(rule))
        if hit is not None and hit[0] is rule:
            return hit[1]
        if len(self._rates) >= 1024:
            self._rates.clear()                   # old rule sets (reloads)
        rates = {u.meter: u.credits_per_unit for u in rule.usage}
        self._rates[id(rule)] = (rule, rates)
        return rates

    def record(self, ctx: RequestContext, rule: Rule, m: Measurement | None, status: int,
               flags: str, withhold: bool = False) -> asyncio.Future[None] | None:
        """Turn a measurement into a usage row (pure quantities), settle its credits, and hand
        both to the Store (one transaction). Not billable: the hold is released.
        ``m`` may be None only for a rule whose quantities are all constants.
        ``withhold``: a failed commit answers 503 instead of the response, so the row is
        dropped then (never billed; see Store invariant 8)."""
        book = self.book
        hold = ctx.hold
        if not rule.count_when.matches(status):
            if hold is not None and book is not None:
                book.release(hold)
            return None
        quantities: Sequence[Quantity] | None = constant_quantities(rule)
        if quantities is None:
            assert m is not None
            quantities = compute(rule, m, self.default_estimate)
        if not quantities:
            return None
        rates = self.rates(rule)
        costs = [cost_micro(q.micro, r) if (r := rates.get(q.meter)) is not None else 0
                 for q in quantities]
        settled = book.settle(hold, costs, time.time()) \
            if hold is not None and book is not None else None
        if book is not None:
            ests = self.reservations.for_rule(rule).estimators
            for q in quantities:
                if not q.unreadable and (est := ests.get(q.meter)) is not None:
                    est.observe(q.micro)
        items = []
        debits: list[tuple[str, Entry]] = []
        for i, q in enumerate(quantities):
            f = flags
            if q.unreadable:
                metrics.unreadable_quantities_total.labels(rule.name).inc()
                metrics.quantity_fallback_total.labels(rule.name, q.meter, q.reason).inc()
                f = f"{f},unreadable,fallback_{q.reason}" if f \
                    else f"unreadable,fallback_{q.reason}"
            credits = covered = 0
            if settled is not None:
                entries, uncovered = settled[i]
                credits = costs[i] - uncovered
                covered = covered_quantity(q.micro, costs[i], credits)
                debits.extend((q.meter, e) for e in entries)
            items.append(UsageItem(q.meter, q.micro, credits, q.micro - covered, f))
            if q.micro:
                self._units_counter(q.meter).inc(q.micro / 1_000_000)
        customer_id = ctx.customer_id
        if debits and self.watch is not None:
            cust = self.rt.keys.customers.get(customer_id)
            self.watch.check(customer_id, anchor=cust.billing_anchor if cust else None)
        row = UsageRow(ctx.rid, time.time(), customer_id, ctx.key_id, rule.name, ctx.version,
                       status, items, debits=debits, method=ctx.request.method,
                       path=ctx.path[:2048], withhold=withhold)
        return self.rt.store.record(row, wait=self.strict and not flags)

    def _units_counter(self, meter: str) -> Any:
        c = self._unit_counters.get(meter)
        if c is None:
            c = self._unit_counters[meter] = metrics.metered_units_total.labels(meter)
        return c
