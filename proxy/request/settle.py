"""Step 5, settlement: a finished request's measurement -> quantities (pure), credits
settled against its hold, and one usage row handed to the Store (one transaction with the
credit debits). In strict durability the caller gets the commit to wait for before the last
bytes of the response go out (``proxy.request.stream``).

A status the rule does not count (``count_when``) is not billable: the hold is released and
nothing is recorded.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proxy import metrics
from proxy.credits.book import CreditBook
from proxy.credits.ledger import Entry, covered_quantity
from proxy.credits.money import MoneyBook
from proxy.credits.reserve import Reservations
from proxy.credits.thresholds import ThresholdWatch
from proxy.request.context import RequestContext
from proxy.rules import (
    Measurement,
    Quantity,
    Rule,
    SourceKind,
    compute,
    constant_quantities,
    reads_body_only,
)
from proxy.store.db import Store, UsageItem, UsageRow
from proxy.store.keys import KeyCache
from proxy.units import CreditRate, cost_micro


@dataclass(frozen=True, slots=True)
class _RuleCosts:
    rule: Rule
    rates: Mapping[str, CreditRate | None]                 # meter -> credits_per_unit
    quantities: tuple[Quantity, ...] | None             # all constant: the quantities
    costs: list[int] | None                             # ... and their credits (read only)
    # all constant and readable: the usage items of a request that holds no credits and
    # has no flags (shared by every such row: a UsageItem is never changed once made),
    # and each quantity's metered_units_total child with the units it adds
    plain: tuple[UsageItem, ...] | None
    # ... the same items' flat form (as ``proxy.store.db.flatten`` writes them; shared too)
    plain_flat: tuple[tuple[str, int, int, int, str], ...]
    # ... and each quantity's metered_units_total child (a LoopCounter's: its ``value`` is
    # added to directly, on the event-loop thread) with the units it adds
    units: tuple[tuple[Any, float], ...]
    # the statuses the rule bills (``CountWhen.matches``: ``count_any`` or one of these)
    count_any: bool
    counted: frozenset[int]
    # some usage reads a response header: only then does a measurement copy them
    response_headers: bool
    # not all constant, and every usage is a constant or reads the response body only: the
    # measurement is the body's view alone (proxy.rules.body_measurement)
    body_only: bool


def _costs(quantities: Sequence[Quantity], rates: Mapping[str, CreditRate | None]) -> list[int]:
    """Each quantity's credit cost in micro-credits (0 for a meter without a rate)."""
    return [cost_micro(q.micro, r) if (r := rates.get(q.meter)) is not None else 0
            for q in quantities]


def _pass_on(fut: asyncio.Future[None], commit: asyncio.Future[None]) -> None:
    """``commit``'s outcome, to ``fut`` (unless the waiter has gone: cancelled)."""
    if fut.done():
        if not commit.cancelled():
            commit.exception()      # (retrieved: the waiter has gone, nothing else reads it)
        return
    if commit.cancelled():
        fut.cancel()
    elif (exc := commit.exception()) is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(None)


def _cancel_with(commit: asyncio.Future[None], fut: asyncio.Future[None]) -> None:
    if fut.cancelled():
        commit.cancel()


class Settlement:
    def __init__(self, store: Store, keys: KeyCache, book: CreditBook | None,
                 watch: ThresholdWatch | None, reservations: Reservations,
                 default_estimate: int, strict: bool) -> None:
        self.store = store
        self.keys = keys
        self.book = book
        self.watch = watch
        self.reservations = reservations
        self.default_estimate = default_estimate
        self.strict = strict                      # storage.durability: strict
        self._unit_counters: dict[str, Any] = {}
        # per rule object (reloads add more): its rates, and for a rule whose quantities are
        # all constants, the quantities and their credit costs (computed once, not per request)
        self._by_rule: dict[int, _RuleCosts] = {}
        # the monetary credits mode (proxy.credits.money): set by the composition root
        self.money: MoneyBook | None = None

    def for_rule(self, rule: Rule) -> _RuleCosts:
        hit = self._by_rule.get(id(rule))
        if hit is not None and hit.rule is rule:
            return hit
        if len(self._by_rule) >= 1024:
            self._by_rule.clear()                 # old rule sets (reloads)
        rates = {u.meter: u.credits_per_unit for u in rule.usage}
        const = constant_quantities(rule)
        plain = None
        plain_flat: tuple[tuple[str, int, int, int, str], ...] = ()
        units: tuple[tuple[Any, float], ...] = ()
        if const is not None and not any(q.unreadable for q in const):
            plain = tuple(UsageItem(q.meter, q.micro, 0, q.micro, "") for q in const)
            plain_flat = tuple((i.meter, i.quantity, i.credits, i.billable, i.flags)
                               for i in plain)
            units = tuple((self._unit_counter(q.meter), q.micro / 1_000_000)
                          for q in const if q.micro)
        cw = rule.count_when
        hit = self._by_rule[id(rule)] = _RuleCosts(
            rule, rates, const, None if const is None else _costs(const, rates), plain,
            plain_flat, units, cw.any, cw.statuses,
            any(u.source.kind is SourceKind.RESPONSE_HEADER for u in rule.usage),
            const is None and reads_body_only(rule))
        return hit

    def _after_opening(self, waiting: list[Callable[[], None]], ctx: RequestContext,
                       rule: Rule, m: Measurement | None, status: int, flags: str,
                       withhold: bool, rc: _RuleCosts) -> asyncio.Future[None] | None:
        """The customer's monetary account is opening (``MoneyBook.opening``): its reads of
        the ledger must see every unit settled before it began and none after, so this
        settlement waits in ``waiting`` and is made once the opening is over, in the mode
        the customer is in then. Its credit hold stays held until then (``settle_later``:
        the request's end does not release it), so what it holds is not admitted twice and
        a grant it holds does not expire under it. The returned future (strict) is the
        commit's: the last bytes of the response wait for both, as for any strict request."""
        fut = asyncio.get_running_loop().create_future() if self.strict and not flags else None
        hold = ctx.hold
        if hold is not None:
            hold.settle_later = True

        def settle() -> None:
            if hold is not None:
                hold.settle_later = False
            try:
                commit = self.record(ctx, rule, m, status, flags, withhold, rc)
            except BaseException as exc:
                if fut is not None and not fut.done():
                    fut.set_exception(exc)
                raise
            finally:
                # (the request has ended: whatever ``record`` did not settle is released
                # here, never left held)
                if hold is not None and not hold.released and self.book is not None:
                    self.book.release(hold)
            if fut is None:
                return
            if commit is None:
                if not fut.done():
                    fut.set_result(None)
            else:       # (a waiter that left cancels the commit's future, as it would)
                commit.add_done_callback(functools.partial(_pass_on, fut))
                fut.add_done_callback(functools.partial(_cancel_with, commit))

        waiting.append(settle)
        return fut

    def _unit_counter(self, meter: str) -> Any:
        if (c := self._unit_counters.get(meter)) is None:
            c = self._unit_counters[meter] = metrics.metered_units_total.labels(meter)
        return c

    def record(self, ctx: RequestContext, rule: Rule, m: Measurement | None, status: int,
               flags: str, withhold: bool = False,
               rc: _RuleCosts | None = None) -> asyncio.Future[None] | None:
        """Turn a measurement into a usage row (pure quantities), settle its credits, and hand
        both to the Store (one transaction). Not billable: the hold is released.
        ``m`` may be None only for a rule whose quantities are all constants.
        ``withhold``: a failed commit answers 503 instead of the response, so the row is
        dropped then (never billed; see Store invariant 8). ``rc``: ``for_rule(rule)``, when
        the caller already has it."""
        book = self.book
        hold = ctx.hold
        if rc is None or rc.rule is not rule:
            rc = self.for_rule(rule)
        if not (rc.count_any or status in rc.counted):
            if hold is not None and book is not None:
                book.release(hold)
            return None
        money = self.money
        if money is not None and money.opening \
                and (opening := money.opening.get(ctx.customer_id)) is not None:
            if len(opening.waiting) < opening.limit:
                return self._after_opening(opening.waiting, ctx, rule, m, status, flags,
                                           withhold, rc)
            opening.spoiled = True      # made now, in the current mode: the opening is deferred
        if hold is None and rc.plain is not None and not flags \
                and (money is None or not money.active
                     or money.account(ctx.customer_id) is None):
            # constant quantities, no credits held, nothing flagged, not a monetary account
            # (whose period total every request moves, held or not): the usual request. Its
            # flat form is made here too (the items' is the rule's, shared).
            if not rc.plain:
                return None
            for c, units in rc.units:
                c.value += units
            at = time.time()
            cid, kid, name, ver = ctx.customer_id, ctx.key_id, rule.name, ctx.version
            method, path = ctx.request.method, ctx.path[:2048]
            flat: tuple[Any, ...] = (ctx.rid, at, cid, kid, name, ver, status, method, path,
                                     rc.plain_flat, [])
            return self.store.record(
                UsageRow(ctx.rid, at, cid, kid, name, ver, status, list(rc.plain), None, [],
                         method, path, withhold, flat),
                self.strict)
        quantities: Sequence[Quantity] | None = rc.quantities
        costs = rc.costs
        if quantities is None or costs is None:
            assert m is not None
            quantities = compute(rule, m, self.default_estimate)
            if not quantities:
                return None
            costs = None            # (made below only if credits are settled)
        elif not quantities:
            return None
        acct = None
        if money is not None and money.active:
            acct = money.account(ctx.customer_id)
            if acct is not None:    # monetary: the marginal price, all units reported
                costs = money.costs(acct, [(q.meter, q.micro) for q in quantities],
                                    time.time())
        settled = None
        if hold is not None and book is not None:
            if costs is None:
                costs = _costs(quantities, rc.rates)
            settled = book.settle(hold, costs, time.time())
        if book is not None and rc.quantities is None:     # (constants are not estimated)
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
                assert costs is not None
                entries, uncovered = settled[i]
                credits = costs[i] - uncovered
                if acct is None:
                    covered = covered_quantity(q.micro, costs[i], credits)
                else:               # monetary: the whole quantity is reported to Stripe
                    acct.cover(q.meter, credits, time.time(), entries)
                debits.extend((q.meter, e) for e in entries)
            items.append(UsageItem(q.meter, q.micro, credits, q.micro - covered, f))
            if q.micro:
                self._unit_counter(q.meter).inc(q.micro / 1_000_000)
        customer_id = ctx.customer_id
        if debits and self.watch is not None:
            cust = self.keys.customers.get(customer_id)
            self.watch.check(customer_id, anchor=cust.billing_anchor if cust else None)
        row = UsageRow(ctx.rid, time.time(), customer_id, ctx.key_id, rule.name, ctx.version,
                       status, items, debits=debits, method=ctx.request.method,
                       path=ctx.path[:2048], withhold=withhold)
        return self.store.record(row, wait=self.strict and not flags)
