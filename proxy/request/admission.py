"""Step 2, admission: may this authenticated request be forwarded now?

In order, each refusal raised as an ``HttpError`` (``proxy.http_errors`` answers it):

    per-customer concurrency (limits.per_customer_concurrency)    429 concurrency_limit_exceeded
    metering available (a metered request needs the Store)         503 metering_unavailable
    credits (proxy.credits): hold the admission cost               402 insufficient_credits

``admit`` is one synchronous critical section (no await between the checks and taking the
in-flight slot and the hold), so concurrent requests cannot spend the same credit or slot.
``leave`` gives both back. ``admit_hint`` grows a hold once the request body is read (rules
with ``reserve_from`` hints only).

Fleet mode (``lease_admit`` set, ``proxy.fleet.credits``): ``admit_leased`` first debits a
block customer's admission cost from the member's credit lease (the one await: a refill
when the lease cannot cover it), then runs the same synchronous checks with that hold; the
lease answering "insufficient" is the 402, "unavailable" (the shared database unreachable
and the lease spent, ``fail_mode: closed``) a 503. Other customers are not gated there.
Under ``credits.enforcement: shadow`` neither refusal is made: an "insufficient" is counted
in ``meterproxy_credit_shadow_rejections_total`` and the request goes through uncharged (its
usage is billed as uncovered), as a single process's shadow mode does. A customer without
``overage: block`` that holds credits is charged through the lease the same way, never
refused (what the lease does not cover is billed).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from multidict import istr

from proxy import metrics
from proxy.credits.book import CreditBook, Hold
from proxy.credits.money import MoneyBook
from proxy.credits.reserve import Reservations
from proxy.errors import HttpError
from proxy.request.forward import matched_headers
from proxy.rules import Rule
from proxy.runtime import Runtime
from proxy.units import fmt_micro, to_micro

XCR = istr("X-Credits-Remaining")
_RETRY_1 = {"Retry-After": "1"}
# limits.per_customer_concurrency 0 (unlimited): above any count of requests in flight
UNLIMITED = 1 << 60

LeaseAdmit = Callable[[str, int, float], Awaitable["Hold | str"]]
"""(customer, cost, now) -> the hold debited from the member's lease, or why not
("insufficient", "unavailable"): ``proxy.fleet.credits.FleetCredits.lease_admit``."""


class Admission:
    def __init__(self, rt: Runtime, book: CreditBook | None,
                 lease_admit: LeaseAdmit | None = None) -> None:
        self.rt = rt
        self.book = book
        self.lease_admit = lease_admit
        cfg = rt.cfg
        self.shadow = cfg.credits.enforcement == "shadow"
        self.default_estimate = to_micro(cfg.credits.default_estimate)
        self.top_up = cfg.credits.top_up_url
        self.reservations = Reservations(self.default_estimate)
        # requests in flight per customer (limits.per_customer_concurrency; 0 = unlimited)
        self.max_per_customer = cfg.limits.per_customer_concurrency or UNLIMITED
        self.in_flight: dict[str, int] = {}
        self.admitted = 0       # their sum: requests in flight that may record usage
        # called when the last of them has finished (``Store.quiet``; composition root)
        self.on_quiet: Callable[[], None] | None = None
        # the monetary credits mode (proxy.credits.money): set by the composition root
        self.money: MoneyBook | None = None

    def admit(self, rule: Rule | None, customer_id: str, metered: bool,
              held: Hold | None = None, gate: bool = True) -> Hold | None:
        """Take the customer's in-flight slot and the credit hold (None: nothing held), or
        raise. The caller calls ``leave`` once the request is done. ``held``: the hold
        ``admit_leased`` took; ``gate`` False: no credit decision here (fleet mode)."""
        in_flight = self.in_flight
        if customer_id and (n := in_flight.get(customer_id, 0)) >= self.max_per_customer:
            metrics.concurrency_rejections_total.inc()
            raise HttpError(f"This account already has {n} requests in flight, the most "
                            "allowed at once. Retry when one of them has finished.",
                            status=429, type_="concurrency_limit_exceeded", headers=_RETRY_1)
        hold: Hold | None = None
        if metered:
            store = self.rt.store
            if not (store.healthy or store.accepting):     # (healthy: accepting, no call)
                metrics.metering_unavailable_total.inc()
                raise HttpError("Usage cannot be recorded right now; the request was not "
                                "forwarded. Retry shortly.", status=503,
                                type_="metering_unavailable")
            book = self.book
            if book is not None and gate:
                assert rule is not None
                if held is not None:
                    hold = held
                elif book.has_credits(customer_id) or (
                        (cust := self.rt.keys.customers.get(customer_id)) is not None
                        and cust.overage == "block"):
                    hold = self._hold(rule, customer_id)
                # (else pay-as-you-go without credits: nothing to hold)
        if customer_id:     # no await since the checks above: one critical section
            in_flight[customer_id] = in_flight.get(customer_id, 0) + 1
            self.admitted += 1
        return hold

    async def admit_leased(self, rule: Rule | None, customer_id: str,
                           metered: bool) -> Hold | None:
        """Fleet mode's ``admit``: a block customer's admission cost comes out of the
        member's credit lease first (see the module doc)."""
        lease = self.lease_admit
        assert lease is not None
        cust = self.rt.keys.customers.get(customer_id) if metered else None
        book = self.book
        assert book is not None
        block = cust is not None and cust.overage == "block"
        store = self.rt.store
        if rule is None or cust is None or not (block or book.has_credits(customer_id)) \
                or not store.accepting or store.broken is not None:
            return self.admit(rule, customer_id, metered, gate=False)
        cost = self.admission_cost(rule)
        now = time.time()
        got = await lease(customer_id, cost, now)
        if isinstance(got, str) and (self.shadow or not block):   # let through uncharged
            if got == "insufficient" and block:
                metrics.credit_shadow_rejections_total.inc()
            return self.admit(rule, customer_id, metered, gate=False)
        if not isinstance(got, str):
            got.debt_ok = block and not self.shadow    # otherwise the uncovered is billed
        if got == "insufficient":
            raise self.refusal(customer_id, cost, now)
        if isinstance(got, str):
            metrics.metering_unavailable_total.inc()
            raise HttpError("Credits cannot be checked right now (the shared database is "
                            "unreachable); the request was not forwarded. Retry shortly.",
                            status=503, type_="metering_unavailable", headers=_RETRY_1)
        try:
            return self.admit(rule, customer_id, metered, held=got)
        except BaseException:
            self.book.release(got)  # type: ignore[union-attr]
            raise

    def leave(self, customer_id: str, hold: Hold | None) -> None:
        if hold is not None and not hold.released and not hold.settle_later:
            self.book.release(hold)  # type: ignore[union-attr]
        if customer_id:
            self.admitted -= 1
            if not self.admitted and (quiet := self.on_quiet) is not None:
                quiet()
            in_flight = self.in_flight
            if (left := in_flight[customer_id] - 1):
                in_flight[customer_id] = left
            else:
                del in_flight[customer_id]

    def alone(self) -> bool:
        """At most one request that may record usage is in flight (the caller's): no other
        row can join its group commit (``Store.alone``)."""
        return self.admitted <= 1

    # ---- credits -----------------------------------------------------------------------

    def admission_cost(self, rule: Rule) -> int:
        """Micro-credits held at admission: constant quantities' cost plus the adaptive
        reservation of every quantity only known later (proxy.credits.reserve)."""
        return self.reservations.for_rule(rule).cost()

    def _hold(self, rule: Rule, customer_id: str) -> Hold:
        """The credit decision for a customer with credits or with overage ``block`` (the
        caller leaves out pay-as-you-go customers without credits: nothing to hold)."""
        book = self.book
        assert book is not None
        cust = self.rt.keys.customers.get(customer_id)
        block = cust is not None and cust.overage == "block"
        now = time.time()
        enforce = block and not self.shadow
        money = self.money
        if money is not None and money.active \
                and (acct := money.account(customer_id)) is not None:
            # monetary: hold the money the reservation would burn; for an enforced block
            # customer what credits do not cover becomes debt, which the mirror covers at
            # Stripe with a promotional credit grant (never invoiced)
            cost = money.quote(acct, self.reservations.quantities(rule), now)
        else:
            cost = self.admission_cost(rule)
        hold = book.try_hold(customer_id, cost, now, block=enforce, debt_ok=enforce)
        if hold is not None:
            if block and self.shadow and cost > book.available(customer_id, now) + hold.amount:
                metrics.credit_shadow_rejections_total.inc()
            return hold
        raise self.refusal(customer_id, cost, now)

    def admit_hint(self, rule: Rule, hold: Hold, request: web.BaseRequest,
                   request_json: object) -> None:
        """Once a request body is read: hold the extra its ``reserve_from`` hints ask for
        (block customers: 402 when it does not fit). Only rules that name a hint get here."""
        book = self.book
        assert book is not None
        now = time.time()
        money = self.money
        if money is not None and money.active \
                and (acct := money.account(hold.customer_id)) is not None:
            res = self.reservations
            required = money.quote(acct, res.quantities(rule, request_json, matched_headers(request.headers),
                                                        request.query), now)
            extra = required - money.quote(acct, res.quantities(rule), now)
            cust = self.rt.keys.customers.get(hold.customer_id)
            block = cust is not None and cust.overage == "block" and not self.shadow
        else:
            extra = self.reservations.for_rule(rule).hint_extra(request_json, matched_headers(request.headers),
                                                                request.query)
            required = self.admission_cost(rule) + extra
            block = hold.debt_ok
        if book.grow(hold, extra, now, block=block):
            return
        book.release(hold)
        raise self.refusal(hold.customer_id, required, now)

    def refusal(self, customer_id: str, cost: int, now: float) -> HttpError:
        book = self.book
        assert book is not None
        metrics.credit_rejections_total.inc()
        balance = fmt_micro(max(book.available(customer_id, now), 0))
        msg = (f"This request needs {fmt_micro(cost)} credits and {balance} "
               "are available. Buy more credits to continue"
               + (f": {self.top_up}" if self.top_up else "") + ".")
        return HttpError(msg, status=402, type_="insufficient_credits",
                         extra={"balance": balance, "required": fmt_micro(cost),
                                "top_up_url": self.top_up or None},
                         headers={XCR: balance})

    def credits_header(self, customer_id: str) -> str | None:
        book = self.book
        if book is None or not book.has_credits(customer_id):
            return None
        return fmt_micro(max(book.available(customer_id, time.time()), 0))
