"""Plan allowances over a subscription's life (issue 12): renewals effective from the period
start whenever they are paid (finding 1), plan changes prorated (finding 8), the billing
anchor taken from the subscription (finding 9).

The webhook processor runs on a real SQLite file with the real credit service; its clock is
the only thing a test sets, so a renewal paid three hours late is three hours late."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import Config, CreditPlan
from proxy.credits.ledger import carry
from proxy.credits.plans import monthly_anchor, prorate_allowance, subscription_items
from proxy.credits.service import CreditService, load_book
from proxy.store.db import Store
from proxy.store.keys import KeyCache, upsert_customer
from proxy.store.sqlite import SqliteStorage
from proxy.timeutil import rfc3339
from proxy.webhooks import WebhookReceiver
from tests.test_webhooks import event, invoice, new_line

Q = 1_000_000
H = 3600
DAY = 86400

CFG = Config.model_validate({
    "upstream": {"url": "http://127.0.0.1:1"}, "rules": "rules.yaml",
    "admin": {"token": "t" * 24}, "stripe": {"sink": "dry_run", "webhook_secret": "whsec_x"},
    "credits": {"plans": {"price_basic": {"allowance": "50", "mode": "reset"},
                          "price_pro": {"allowance": "150", "mode": "reset"},
                          "price_roll": {"allowance": "50", "mode": "rollover", "cap": "80"}}}})


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Env:
    def __init__(self, store: Store, keys: KeyCache, credits: CreditService, clock: Clock,
                 hooks: WebhookReceiver) -> None:
        self.store, self.keys, self.credits, self.clock, self.hooks = \
            store, keys, credits, clock, hooks

    @classmethod
    async def open(cls, tmp: Path, clock: Clock, cfg: Config = CFG) -> Env:
        store = Store.open(tmp / "m.db")
        store.execute_write(lambda c: upsert_customer(c, "acme", "cus_acme", "block", "active"))
        owners = SqliteStorage.on(store)
        keys = KeyCache()
        credits = CreditService(store, load_book(await owners.ledger.load()), owners.ledger)
        hooks = WebhookReceiver(store, keys, credits, cfg, clock=clock,
                                events=owners.webhooks, customers=owners.customers)
        env = cls(store, keys, credits, clock, hooks)
        await env.reload_keys()
        return env

    async def reload_keys(self) -> None:
        snap = await self.hooks.customers.snapshot()
        self.keys.replace(snap.keys, snap.customers)

    async def deliver(self, ev: dict[str, Any], status: str = "processed") -> dict[str, Any]:
        """Store the event as the endpoint does (verified elsewhere) and process it."""
        assert await self.hooks.events.record(ev["id"], ev["type"], ev["created"],
                                              orjson.dumps(ev).decode(), int(self.clock()))
        out = await self.hooks.process(ev["id"])
        assert out.status == status, out
        return out.result

    def balance(self, at: float) -> int:
        return self.credits.book.balance("acme", at)

    def spend(self, credits: int, at: float) -> bool:
        """One block-customer request of ``credits`` micro-credits admitted and settled."""
        hold = self.credits.book.try_hold("acme", credits, at, block=True, debt_ok=True)
        if hold is None:
            return False
        self.credits.book.settle(hold, [credits], at)
        return True


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = await Env.open(tmp_path, Clock(0))
    yield e
    e.store.close()


def _inv(inv: str, price: str, period: tuple[int, int], reason: str,
         **extra: Any) -> dict[str, Any]:
    return {**invoice(inv, "cus_acme", [new_line(price, "sub_1", period)], reason, "sub_1"),
            **extra}


async def _at(env: Env, t: float, eid: str, etype: str, obj: dict[str, Any],
        status: str = "processed") -> dict[str, Any]:
    env.clock.t = t
    return await env.deliver(event(eid, etype, obj, created=int(t)), status)


# A month that started 10 days ago (real time: the credit service stamps grants with it)
S0 = int(time.time()) - 40 * DAY
S1 = S0 + 30 * DAY          # the renewal: 10 days ago
S2 = S1 + 30 * DAY


async def _first_period(env: Env) -> None:
    await _at(env, S0 + 5, "evt_1", "invoice.paid",
        _inv("in_1", "price_basic", (S0, S1), "subscription_create", amount_paid=2000))


# ---- finding 1: allowances from period start ----------------------------------------------

async def test_renewal_granted_at_invoice_creation_covers_the_hours_before_payment(env: Env) -> None:
    await _first_period(env)
    renewal = _inv("in_2", "price_basic", (S1, S2), "subscription_cycle", amount_due=2000)
    # the renewal invoice is created at the period start; payment comes 3 hours later
    out = await _at(env, S1 + 30, "evt_c", "invoice.created", renewal)
    assert out["pending_payment"] == "in_2" and out["grants"][0]["created"] is True
    assert env.balance(S1 + H) == 50 * Q            # the old grant has expired; the new one
    assert env.spend(20 * Q, S1 + H)                # covers usage before the payment
    paid = await _at(env, S1 + 3 * H, "evt_p", "invoice.paid", renewal)
    assert [g["created"] for g in paid["grants"]] == [False]     # the same grant, now paid
    assert env.balance(S1 + 3 * H) == 30 * Q
    with env.store.conn as c:
        assert c.execute("SELECT state FROM plan_invoices WHERE invoice_id='in_2'").fetchone() \
            == ("paid",)


async def test_renewal_paid_late_without_invoice_created_repays_the_gap(env: Env) -> None:
    """No invoice.created subscribed: a block customer's usage in the gap is debt, and the
    late grant, effective from the period start, pays it back first."""
    await _first_period(env)
    hold = env.credits.book.try_hold("acme", 0, S1 + H, block=False, debt_ok=True)
    assert hold is not None
    env.credits.book.settle(hold, [5 * Q], S1 + H)
    assert env.credits.book.debt("acme") == 5 * Q
    out = await _at(env, S1 + 3 * H, "evt_p", "invoice.paid",
              _inv("in_2", "price_basic", (S1, S2), "subscription_cycle"))
    g = env.credits.book.grant(out["grants"][0]["grant_id"])
    assert g is not None and g.effective_at == S1 and g.live(S1)
    assert env.credits.book.debt("acme") == 0 and env.balance(S1 + 3 * H) == 45 * Q


async def test_renewal_paid_before_its_period_is_not_spendable_before_it(env: Env) -> None:
    await _first_period(env)
    await _at(env, S1 - 600, "evt_p", "invoice.paid",
        _inv("in_2", "price_basic", (S1, S2), "subscription_cycle"))
    assert env.balance(S1 - 300) == 50 * Q          # this period's allowance only
    assert env.balance(S1) == 50 * Q                # the next one's, from its start
    assert env.spend(50 * Q, S1 - 300) and not env.spend(1, S1 - 200)


async def test_repayment_waits_until_an_early_grant_becomes_effective(tmp_path: Path) -> None:
    now = int(time.time())
    env = await Env.open(tmp_path, Clock(now))
    try:
        hold = env.credits.book.try_hold("acme", 0, now, block=False, debt_ok=True)
        assert hold is not None
        env.credits.book.settle(hold, [5 * Q], now)
        start = now + 1000
        await _at(env, now, "evt_p", "invoice.paid",
            _inv("in_2", "price_basic", (start, start + 30 * DAY), "subscription_cycle"))
        assert env.credits.book.debt("acme") == 5 * Q          # not effective: repays nothing
        assert env.credits.book.next_effective(now) == start
        assert await env.credits.repay_due(start - 1) == 0
        assert await env.credits.repay_due(start) == 1
        assert env.credits.book.debt("acme") == 0 and env.balance(start) == 45 * Q
        (repaid,) = env.store.conn.execute("SELECT SUM(amount) FROM credit_entries"
                                           " WHERE kind='repay'").fetchone()
        assert repaid == 5 * Q
    finally:
        env.store.close()


@pytest.mark.parametrize("etype", ["invoice.voided", "invoice.marked_uncollectible"])
async def test_renewal_never_paid_is_clawed_back(env: Env, etype: str) -> None:
    await _first_period(env)
    renewal = _inv("in_2", "price_basic", (S1, S2), "subscription_cycle", amount_due=2000)
    await _at(env, S1 + 30, "evt_c", "invoice.created", renewal)
    assert env.spend(20 * Q, S1 + H)
    out = await _at(env, S1 + 5 * DAY, "evt_u", etype, renewal)
    [back] = out["clawed_back"]
    assert (back["unused_taken"], back["debt"]) == ("30", "20")     # spent: debt
    assert env.balance(S1 + 5 * DAY) == -20 * Q
    assert not env.spend(1, S1 + 5 * DAY)
    # once written off, the same event again takes nothing
    again = await env.hooks.process("evt_u")
    assert again.status == "ignored"
    if etype == "invoice.marked_uncollectible":
        # an uncollectible invoice can still be paid: the allowance is granted anew
        paid = await _at(env, S1 + 6 * DAY, "evt_late", "invoice.paid", renewal)
        assert paid["grants"][0]["created"] is True
        assert env.balance(S1 + 6 * DAY) == 30 * Q           # 50, after repaying the 20


async def test_subscription_deleted_claws_back_an_unpaid_renewal(env: Env) -> None:
    await _first_period(env)
    renewal = _inv("in_2", "price_basic", (S1, S2), "subscription_cycle")
    await _at(env, S1 + 30, "evt_c", "invoice.created", renewal)
    await _at(env, S1 + 20 * DAY, "evt_d", "customer.subscription.deleted",
        {"id": "sub_1", "object": "subscription", "customer": "cus_acme"})
    assert env.balance(S1 + 20 * DAY) == 0


async def test_only_renewals_are_granted_before_payment(env: Env) -> None:
    first = _inv("in_1", "price_basic", (S0, S1), "subscription_create")
    out = await _at(env, S0 + 5, "evt_c", "invoice.created", first, "ignored")
    assert out["reason"] == "not a renewal invoice"
    assert env.balance(S0 + 10) == 0


async def test_rollover_paid_early_waits_for_its_period_and_carries_what_is_left(env: Env) -> None:
    await _at(env, S0 + 5, "evt_1", "invoice.paid",
        _inv("in_1", "price_roll", (S0, S1), "subscription_create"))
    early = _inv("in_2", "price_roll", (S1, S2), "subscription_cycle")
    out = await _at(env, S1 - 600, "evt_2", "invoice.paid", early, "waiting_period")
    assert out["grants"] == []
    assert env.spend(35 * Q, S1 - 300)              # spent after the early payment
    env.clock.t = S1 + 1
    done = await env.hooks.process("evt_2")
    assert done.status == "processed"
    [g] = done.result["grants"]
    assert (g["carried"], g["credits"]) == ("15", "65")   # 50 + the 15 left at the boundary
    assert env.balance(S1 + 1) == 65 * Q


# ---- finding 8: plan changes -------------------------------------------------------------

@given(st.integers(0, 10**12), st.integers(0, 10**12), st.integers(0, 10**9),
       st.integers(1, 10**8), st.integers(-10**8, 2 * 10**8))
def test_prorated_allowance_is_bounded_and_monotone(old: int, new: int, start: int, length: int,
                                                     offset: int) -> None:
    end, at = start + length, start + offset
    extra = prorate_allowance(old, new, start, end, at)
    assert 0 <= extra <= max(new - old, 0)
    assert prorate_allowance(old, new, start, end, at + 1) <= extra     # later earns less
    if new > old:
        assert prorate_allowance(old, new, start, end, start) == new - old
    assert prorate_allowance(old, new, start, end, end) == 0
    assert prorate_allowance(new, old, start, end, at) == 0 or new < old   # downgrades: 0


@given(st.integers(0, 10**9), st.integers(0, 10**9), st.integers(0, 10**9),
       st.integers(1, 10**7), st.integers(0, 10**7))
def test_two_upgrades_never_earn_more_than_one(a: int, b: int, c: int, length: int,
                                               offset: int) -> None:
    a, b, c = sorted((a, b, c))
    at = offset % (length + 1)
    two = prorate_allowance(a, b, 0, length, at) + prorate_allowance(b, c, 0, length, at)
    one = prorate_allowance(a, c, 0, length, at)
    assert one - 1 <= two <= one                     # each floors once


def _sub(price: str, qty: int = 1, **extra: Any) -> dict[str, Any]:
    return {"id": "sub_1", "object": "subscription", "customer": "cus_acme", "status": "active",
            "billing_cycle_anchor": S0,
            "items": {"object": "list", "data": [
                {"id": "si_1", "quantity": qty, "current_period_start": S1,
                 "current_period_end": S2,
                 "price": {"id": price, "recurring": {"interval": "month",
                                                      "interval_count": 1}}}]},
            **extra}


def _updated(eid: str, t: int, sub: dict[str, Any], old_price: str) -> dict[str, Any]:
    ev = event(eid, "customer.subscription.updated", sub, created=t)
    ev["data"]["previous_attributes"] = {"items": {"object": "list", "data": [
        {"id": "si_1", "quantity": 1, "price": {"id": old_price}}]}}
    return ev


async def test_mid_cycle_upgrade_grants_the_prorated_difference(env: Env) -> None:
    await _at(env, S1 + 5, "evt_1", "invoice.paid",
        _inv("in_2", "price_basic", (S1, S2), "subscription_cycle"))
    t = S1 + 10 * DAY                                  # a third of the period has gone
    env.clock.t = t
    out = await env.deliver(_updated("evt_up", t, _sub("price_pro"), "price_basic"))
    change = out["plan_change"]
    assert (change["old_allowance"], change["new_allowance"]) == ("50", "150")
    assert change["credits"] == "66.666666"            # 100 x 20/30, floored to a micro-credit
    assert env.balance(t) == 50 * Q + 66_666_666
    g = env.credits.book.grant(change["grant_id"])
    assert g is not None and (g.effective_at, g.expires_at) == (t, S2)
    # redelivered: once
    assert (await env.hooks.process("evt_up")).result["plan_change"]["created"] is False
    # the downgrade back keeps what this period has
    back = await env.deliver(_updated("evt_down", t + DAY, _sub("price_basic"), "price_pro"))
    assert "downgrade" in back["plan_change"]["note"]
    assert env.balance(t + DAY) == 50 * Q + 66_666_666


async def test_proration_invoice_of_an_upgrade_grants_nothing_more(env: Env) -> None:
    line = new_line("price_pro", "sub_1", (S1 + 10 * DAY, S2))
    line["parent"]["subscription_item_details"]["proration"] = True
    out = await _at(env, S1 + 10 * DAY, "evt_inv", "invoice.paid",
              invoice("in_up", "cus_acme", [line], "subscription_update", "sub_1"), "ignored")
    assert "customer.subscription.updated" in out["notes"][0]
    assert env.balance(S1 + 10 * DAY) == 0


# ---- finding 9: the anchor from the subscription ----------------------------------------

async def test_billing_anchor_follows_the_subscription(env: Env) -> None:
    t = S1 + DAY
    env.clock.t = t
    out = await env.deliver(event("evt_s1", "customer.subscription.created", _sub("price_basic"),
                            created=t))
    assert out["billing_anchor"] is not None
    assert env.keys.customers["acme"].billing_anchor == S0
    # a newer event moves it; an older one that arrives late does not move it back
    await env.deliver(event("evt_s2", "customer.subscription.updated",
                      _sub("price_basic", billing_cycle_anchor=S1 + 5), created=t + 10))
    late = await env.deliver(event("evt_s0", "customer.subscription.updated",
                             _sub("price_basic", billing_cycle_anchor=S0 + 7), created=t - 10))
    assert late["anchor_note"] == "a newer subscription event set the anchor"
    assert env.keys.customers["acme"].billing_anchor == S1 + 5


def test_a_yearly_subscription_does_not_set_a_monthly_anchor() -> None:
    sub = _sub("price_basic")
    sub["items"]["data"][0]["price"]["recurring"]["interval"] = "year"
    anchor, why = monthly_anchor(sub)
    assert anchor is None and why is not None and "year" in why
    assert monthly_anchor(_sub("price_basic")) == (S0, None)
    assert [i.price for i in subscription_items(sub["items"])] == ["price_basic"]


# ---- finding 11: two local customers on one Stripe customer ------------------------------

async def test_two_local_customers_on_one_stripe_customer(env: Env) -> None:
    env.store.execute_write(lambda c: upsert_customer(c, "acme-eu", "cus_acme", "block",
                                                      "active"))
    await env.reload_keys()
    first = _inv("in_1", "price_basic", (S0, S1), "subscription_create")
    # naming none of them: refused with the fix in the reason
    out = await _at(env, S0 + 5, "evt_x", "invoice.paid", first, "failed")
    assert "metadata.meterproxy_customer" in out["reason"]
    # the subscription's metadata (copied onto its invoices) names the customer
    first["parent"]["subscription_details"]["metadata"] = {"meterproxy_customer": "acme-eu"}
    await _at(env, S0 + 6, "evt_1", "invoice.paid", first)
    assert env.credits.book.balance("acme-eu", S0 + 10) == 50 * Q
    assert env.balance(S0 + 10) == 0
    # later events of that subscription find it without metadata
    renewal = _inv("in_2", "price_basic", (S1, S2), "subscription_cycle")
    await _at(env, S1 + 30, "evt_c", "invoice.created", renewal)
    assert env.credits.book.balance("acme-eu", S1 + 60) == 50 * Q
    # a refund finds the customer whose grant the payment bought
    back = await _at(env, S1 + DAY, "evt_r", "charge.refunded",
               {"id": "ch_1", "object": "charge", "customer": "cus_acme", "invoice": "in_2",
                "amount": 2000, "amount_refunded": 1000})
    assert back["customer"] == "acme-eu"
    assert env.credits.book.balance("acme-eu", S1 + DAY) == 25 * Q


# ---- finding 11: rollover credits expire ------------------------------------------------

@given(st.integers(-10, 10**9), st.integers(1, 10**9), st.integers(0, 10**9), st.booleans())
def test_carry_never_exceeds_what_was_left_nor_once_the_own_allowance(
        left: int, amount: int, carried: int, once: bool) -> None:
    carried = min(carried, amount)
    out = carry(left, amount, carried, once)
    assert 0 <= out <= max(left, 0)
    if once:
        assert out <= amount - carried
        assert out == min(max(left, 0), amount - carried)   # the carried part went first
    else:
        assert out == max(left, 0)


ROLL_CFG = {"allowance": "50", "mode": "rollover"}


@pytest.mark.parametrize(("expiry", "third"), [("next_period", "100"), ("never", "150")])
async def test_carried_credits_expire_after_one_period(tmp_path: Path, expiry: str,
                                                       third: str) -> None:
    cfg = CFG.model_copy(deep=True)
    cfg.credits.plans["price_roll"] = CreditPlan.model_validate(
        {**ROLL_CFG, "rollover_expiry": expiry})
    env = await Env.open(tmp_path, Clock(0), cfg)
    try:
        s3 = S2 + 30 * DAY          # three periods ending in the future
        periods = [(S0 - 30 * DAY, S0), (S0, S1), (s3 - 60 * DAY, s3)]
        got = []
        for n, (a, b) in enumerate(periods):
            out = await _at(env, a + 5, f"evt_{n}", "invoice.paid",
                      _inv(f"in_{n}", "price_roll", (a, b),
                           "subscription_create" if n == 0 else "subscription_cycle"))
            got.append(out["grants"][0]["credits"])
        # nothing was spent: 50; 50 + 50; then 50 + only the second period's own 50 (its
        # carried 50 expire with it) unless rollover_expiry is never
        assert got == ["50", "100", third]
    finally:
        env.store.close()


async def test_an_upgrade_that_resets_the_cycle_is_granted_by_its_invoice_only(
        env: Env) -> None:
    """billing_cycle_anchor=now: the update starts a new period, whose invoice (billing
    reason subscription_update, a whole-period line) grants the new allowance; the update
    itself grants nothing more."""
    await _at(env, S1 + 5, "evt_1", "invoice.paid",
        _inv("in_2", "price_basic", (S1, S2), "subscription_cycle"))
    t = S1 + 10 * DAY
    sub = _sub("price_pro", billing_cycle_anchor=t)
    sub["items"]["data"][0].update(current_period_start=t, current_period_end=t + 31 * DAY)
    env.clock.t = t + 2
    ev = _updated("evt_up", t + 2, sub, "price_basic")
    ev["data"]["previous_attributes"]["billing_cycle_anchor"] = S0
    out = await env.deliver(ev)
    assert out["plan_change"]["note"].startswith("the change started a new period")
    paid = await _at(env, t + 3, "evt_inv", "invoice.paid",
               _inv("in_up", "price_pro", (t, t + 31 * DAY), "subscription_update"))
    assert [g["credits"] for g in paid["grants"]] == ["150"]
    assert env.balance(t + 4) == 200 * Q          # this period's 50 and the new period's 150


async def test_the_subscription_s_currency_becomes_the_customer_s(env: Env) -> None:
    """``currency_options``: the customer is charged in its subscription's currency."""
    t = S1 + DAY
    env.clock.t = t
    out = await env.deliver(event("evt_c1", "customer.subscription.created",
                                  _sub("price_basic", currency="eur"), created=t))
    assert out["currency"] == "eur"
    assert env.keys.customers["acme"].currency == "eur"
    again = await env.deliver(event("evt_c2", "customer.subscription.updated",
                                    _sub("price_basic", currency="eur"), created=t + 1))
    assert "currency" not in again                    # unchanged


async def test_invoice_finalized_tells_the_monetary_mirror_its_usage_period_end(
        env: Env) -> None:
    """``invoice.finalized`` (any billing reason) passes the customer and the invoice's
    ``period_end`` to ``on_finalized`` (``MonetaryService.finalized``: Stripe grants kept
    live past their local expiry for that invoice can go)."""
    await _first_period(env)
    seen: list[tuple[str, int]] = []

    async def finalized(cid: str, end: int) -> None:
        seen.append((cid, end))

    env.hooks.on_finalized = finalized
    await _at(env, S1 + 3600, "evt_f", "invoice.finalized",
              _inv("in_2", "price_basic", (S1, S2), "subscription_cycle", period_end=S1))
    await _at(env, S1 + 3700, "evt_g", "invoice.finalized",
              _inv("in_3", "price_basic", (S0, S1), "subscription_create", period_end=S1),
              "ignored")
    await _at(env, S1 + 3800, "evt_h", "invoice.created",
              _inv("in_4", "price_basic", (S1, S2), "subscription_update", period_end=S1),
              "ignored")
    assert seen == [("acme", S1), ("acme", S1)]


# ---- the invoice.paid result and its payment references ---------------------------------

async def test_rollover_paid_early_is_processed_again_when_its_period_starts(env: Env) -> None:
    """The waiting outcome names the period start, and the background drain re-processes the
    event then (not before, not only at the period's end)."""
    await _at(env, S0 + 5, "evt_1", "invoice.paid",
        _inv("in_1", "price_roll", (S0, S1), "subscription_create"))
    early = _inv("in_2", "price_roll", (S1, S2), "subscription_cycle")
    out = await _at(env, S1 - 600, "evt_2", "invoice.paid", early, "waiting_period")
    assert out == {"customer": "acme", "grants": [], "notes": [],
                   "reason": f"a rollover period starting {rfc3339(S1)}: what the previous"
                             " period leaves is known then; processed again at that time"}
    env.clock.t = S1 - 300
    assert await env.hooks.drain() == 1             # looked at once more: still waiting
    env.clock.t = S1 - 100
    assert await env.hooks.drain() == 0             # not due before the period starts
    assert env.balance(S1 + 1) == 0
    env.clock.t = S1 + 1
    assert await env.hooks.drain() == 1
    assert env.balance(S1 + 1) == 80 * Q            # 50 + 50 carried, capped at 80


async def test_plan_grant_found_by_the_invoice_charge_and_payment_intent(env: Env) -> None:
    """A refund or dispute may name only the charge or only the payment intent: the plan
    grant's payment references come from the paid invoice's ``charge`` and
    ``payment_intent``."""
    await _at(env, S0 + 5, "evt_1", "invoice.paid",
        _inv("in_1", "price_basic", (S0, S1), "subscription_create", amount_paid=2000,
             charge="ch_9", payment_intent="pi_9"))
    back = await _at(env, S0 + DAY, "evt_r", "charge.refunded",
               {"id": "ch_9", "object": "charge", "customer": "cus_acme",
                "amount": 2000, "amount_refunded": 1000})
    assert back["customer"] == "acme"
    assert env.balance(S0 + DAY) == 25 * Q
    await _at(env, S0 + 2 * DAY, "evt_r2", "charge.refunded",
        {"id": "ch_other", "object": "charge", "customer": "cus_acme",
         "payment_intent": "pi_9", "amount": 2000, "amount_refunded": 1000})
    assert env.balance(S0 + 2 * DAY) == 0


async def test_plan_paid_after_write_off_is_granted_under_the_period_key(env: Env) -> None:
    """Paid after it was written off, the allowance is granted anew under a key that still
    starts with the subscription period's prefix (the rollover carry finds the previous
    period's grant by that prefix)."""
    await _first_period(env)
    renewal = _inv("in_2", "price_basic", (S1, S2), "subscription_cycle", amount_due=2000)
    await _at(env, S1 + 30, "evt_c", "invoice.created", renewal)
    await _at(env, S1 + 5 * DAY, "evt_u", "invoice.marked_uncollectible", renewal)
    paid = await _at(env, S1 + 6 * DAY, "evt_late", "invoice.paid", renewal)
    [g] = paid["grants"]
    (key,) = env.store.conn.execute("SELECT idempotency_key FROM grants WHERE id=?",
                                    (g["grant_id"],)).fetchone()
    assert key == f"stripe:plan:sub_1:{S1}:paid:in_2"
