"""Suspension lifted by the payment that cures it, subscription end with paid packs left
(issue 12, finding 7), and claw-backs (finding 6): signed events through the real webhook
endpoint of a real proxy."""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest

from proxy.webhooks import PATH, _parse_reason, _reason
from tests.conftest import ProxyFactory
from tests.helpers import wait_until
from tests.test_webhooks import (
    CREDITS,
    RULES,
    SECRET,
    Hooks,
    HooksFactory,
    event,
    grants,
    invoice,
    new_line,
    old_line,
)


@pytest.fixture
def hooks(make_proxy: ProxyFactory) -> HooksFactory:
    """A proxy with webhooks enabled (as tests/test_webhooks.py's fixture)."""
    async def factory(**overrides: Any) -> Hooks:
        overrides.setdefault("stripe", {"webhook_secret": SECRET})
        overrides.setdefault("credits", CREDITS)
        p = await make_proxy(rules_text=RULES, **overrides)
        return Hooks(p, p.url + PATH, p.admin_url)

    return factory

Q = 1_000_000


async def _status(h: Hooks, key: str) -> int:
    async with h.p.session.get(h.p.url + "/v1/items",
                               headers={"Authorization": f"Bearer {key}"}) as r:
        await r.read()
        return r.status


async def test_invoice_paid_after_payment_failed_reactivates(hooks: HooksFactory) -> None:
    h = await hooks(credits={**CREDITS, "on_payment_failed": "suspend"})
    key = await h.p.customer_with_key("acme", stripe_customer_id="cus_acme")
    await h.deliver(event("evt_f1", "invoice.payment_failed", invoice("in_1", "cus_acme", [])))
    await h.deliver(event("evt_f2", "invoice.payment_failed", invoice("in_2", "cus_acme", [])))
    assert await _status(h, key) == 403
    # paying one of two failed invoices is not enough
    done = await h.deliver(event("evt_p1", "invoice.paid", invoice("in_1", "cus_acme", [])),
                           "ignored")
    assert "reactivated" not in done["result"]
    assert await _status(h, key) == 403
    done = await h.deliver(event("evt_p2", "invoice.paid", invoice("in_2", "cus_acme", [])))
    assert done["result"]["reactivated"] is True
    assert await _status(h, key) == 200


async def test_operator_suspension_is_not_lifted_by_a_payment(hooks: HooksFactory) -> None:
    h = await hooks(credits={**CREDITS, "on_payment_failed": "suspend"})
    key = await h.p.customer_with_key("acme", stripe_customer_id="cus_acme")
    await h.deliver(event("evt_f1", "invoice.payment_failed", invoice("in_1", "cus_acme", [])))
    await h.p.admin("POST", "/admin/customers", {"id": "acme", "status": "suspended"})
    await h.deliver(event("evt_p1", "invoice.paid", invoice("in_1", "cus_acme", [])), "ignored")
    assert await _status(h, key) == 403
    other = await h.p.customer_with_key("beta", stripe_customer_id="cus_beta", status="suspended")
    await h.deliver(event("evt_p2", "invoice.paid", invoice("in_9", "cus_beta", [])), "ignored")
    assert await _status(h, other) == 403


async def test_subscription_deleted_keeps_a_customer_with_paid_pack_credits(
        hooks: HooksFactory) -> None:
    h = await hooks()
    key = await h.p.customer_with_key("acme", stripe_customer_id="cus_acme")
    await h.deliver(event("evt_buy", "invoice.paid",
                          invoice("in_buy", "cus_acme", [old_line("price_small")])))
    done = await h.deliver(event("evt_sd", "customer.subscription.deleted",
                                 {"id": "sub_1", "object": "subscription",
                                  "customer": "cus_acme"}))
    assert done["result"] == {"customer": "acme", "suspended": False, "subscription": "sub_1",
                              "kept_active": "holds 2.5 paid pack credits"}
    assert await _status(h, key) == 200
    assert await _status(h, key) == 200          # 2.5 -> 0.5 left: still a paid pack credit
    assert await _status(h, key) == 200          # now 0 left (0.5 covered, 0.5 overage)
    done = await h.deliver(event("evt_sd2", "customer.subscription.deleted",
                                 {"id": "sub_1", "object": "subscription",
                                  "customer": "cus_acme"}))
    assert done["result"]["suspended"] is True
    assert await _status(h, key) == 403


async def _settled(h: Hooks, ev: dict[str, Any]) -> dict[str, Any]:
    """Send ``ev`` and wait until it is processed or ignored (which one depends on order)."""
    code, body = await h.send(ev)
    assert code == 200 and body["received"] is True, (code, body)
    done = await wait_until(lambda: h.admin("GET", f"/admin/webhooks/{ev['id']}"),
                            ok=lambda e: e.get("status") in ("processed", "ignored"),
                            what=f"event {ev['id']} to be handled")
    return dict(done)


def _suspended_for(h: Hooks, cid: str) -> tuple[str, str | None]:
    with h.p.db() as c:
        row = c.execute("SELECT status, suspended_for FROM customers WHERE id=?",
                        (cid,)).fetchone()
    return row[0], row[1]


async def test_failed_deleted_paid_end_the_same_in_every_arrival_order(
        hooks: HooksFactory) -> None:
    """invoice.payment_failed(in_A), customer.subscription.deleted and invoice.paid(in_A) in
    all six orders: the deletion is never lost behind the failed payment, so every order ends
    suspended for the deletion alone, and the next request is refused."""
    h = await hooks(credits={**CREDITS, "on_payment_failed": "suspend"})
    finals: dict[tuple[str, ...], tuple[str, str | None, int]] = {}
    for n, order in enumerate(itertools.permutations(("failed", "deleted", "paid"))):
        cid, cus, inv = f"c{n}", f"cus_{n}", f"in_A{n}"
        key = await h.p.customer_with_key(cid, stripe_customer_id=cus)
        events = {
            "failed": event(f"evt_f{n}", "invoice.payment_failed", invoice(inv, cus, [])),
            "deleted": event(f"evt_d{n}", "customer.subscription.deleted",
                             {"id": f"sub_{n}", "object": "subscription", "customer": cus}),
            "paid": event(f"evt_p{n}", "invoice.paid", invoice(inv, cus, [])),
        }
        for what in order:
            await _settled(h, events[what])
        finals[order] = (*_suspended_for(h, cid), await _status(h, key))
    assert set(finals.values()) == {("suspended", "subscription_deleted", 403)}, finals


async def test_deletion_and_unpaid_invoices_are_kept_together(hooks: HooksFactory) -> None:
    """Both reasons are kept in ``suspended_for`` (the deletion first); paying the invoices
    leaves the deletion; only an operator's status lifts it."""
    h = await hooks(credits={**CREDITS, "on_payment_failed": "suspend"})
    key = await h.p.customer_with_key("acme", stripe_customer_id="cus_acme")
    await h.deliver(event("evt_f1", "invoice.payment_failed", invoice("in_1", "cus_acme", [])))
    await h.deliver(event("evt_sd", "customer.subscription.deleted",
                          {"id": "sub_1", "object": "subscription", "customer": "cus_acme"}))
    await h.deliver(event("evt_f2", "invoice.payment_failed", invoice("in_2", "cus_acme", [])))
    assert _suspended_for(h, "acme") == ("suspended",
                                         "subscription_deleted;payment_failed:in_1,in_2")
    done = await h.deliver(event("evt_p1", "invoice.paid", invoice("in_1", "cus_acme", [])),
                           "ignored")
    assert "reactivated" not in done["result"]
    await h.deliver(event("evt_p2", "invoice.paid", invoice("in_2", "cus_acme", [])), "ignored")
    assert _suspended_for(h, "acme") == ("suspended", "subscription_deleted")
    assert await _status(h, key) == 403
    # a new subscription does not lift it (as before); the operator does
    await h.deliver(event("evt_sc", "customer.subscription.created",
                          {"id": "sub_2", "object": "subscription", "customer": "cus_acme",
                           "status": "active"}))
    assert _suspended_for(h, "acme") == ("suspended", "subscription_deleted")
    await h.p.admin("POST", "/admin/customers", {"id": "acme", "status": "active"}, expect=200)
    assert _suspended_for(h, "acme") == ("active", None)
    assert await _status(h, key) == 200


async def test_reasons_written_by_the_previous_version_are_read(hooks: HooksFactory) -> None:
    """Rows written before the combined reason existed: ``payment_failed:<ids>`` is cured by
    its payments, ``subscription_deleted`` keeps a later failed invoice and outlives its
    payment."""
    h = await hooks(credits={**CREDITS, "on_payment_failed": "suspend"})
    a = await h.p.customer_with_key("old_a", stripe_customer_id="cus_a")
    b = await h.p.customer_with_key("old_b", stripe_customer_id="cus_b")
    with h.p.db() as c:
        c.execute("UPDATE customers SET status='suspended', suspended_for='payment_failed:in_x,in_y'"
                  " WHERE id='old_a'")
        c.execute("UPDATE customers SET status='suspended', suspended_for='subscription_deleted'"
                  " WHERE id='old_b'")
    await h.deliver(event("evt_px", "invoice.paid", invoice("in_x", "cus_a", [])), "ignored")
    assert _suspended_for(h, "old_a") == ("suspended", "payment_failed:in_y")
    done = await h.deliver(event("evt_py", "invoice.paid", invoice("in_y", "cus_a", [])))
    assert done["result"]["reactivated"] is True
    assert await _status(h, a) == 200
    await h.deliver(event("evt_fz", "invoice.payment_failed", invoice("in_z", "cus_b", [])))
    assert _suspended_for(h, "old_b") == ("suspended", "subscription_deleted;payment_failed:in_z")
    await h.deliver(event("evt_pz", "invoice.paid", invoice("in_z", "cus_b", [])), "ignored")
    assert _suspended_for(h, "old_b") == ("suspended", "subscription_deleted")
    assert await _status(h, b) == 403


def test_suspension_reasons_round_trip_and_foreign_ones_are_left_alone() -> None:
    for deleted, unpaid in [(True, frozenset()), (False, frozenset({"in_1", "in_2"})),
                            (True, frozenset({"in_1"}))]:
        assert _parse_reason(_reason(deleted, unpaid)) == (deleted, unpaid)
    assert _reason(False, frozenset()) is None
    # an operator's suspension (no reason) and reasons no webhook writes are not ours
    for foreign in (None, "", "dispute", "payment_failed:", "payment_failed:in_1;subscription_deleted",
                    "subscription_deleted;subscription_deleted"):
        assert _parse_reason(foreign) is None, foreign


def _charge(cus: str, inv: str, amount: int, refunded: int) -> dict[str, Any]:
    return {"id": "ch_1", "object": "charge", "customer": cus, "invoice": inv,
            "payment_intent": "pi_1", "amount": amount, "amount_refunded": refunded}


def _paid(inv: str, amount: int) -> dict[str, Any]:
    obj = invoice(inv, "cus_acme", [old_line("price_pack")])
    obj.update(charge="ch_1", payment_intent="pi_1", amount_paid=amount)
    return obj


async def test_refund_claws_back_unused_credit_idempotently(hooks: HooksFactory) -> None:
    h = await hooks()
    key = await h.p.customer_with_key("acme", stripe_customer_id="cus_acme")
    await h.deliver(event("evt_buy", "invoice.paid", _paid("in_1", 1000)))
    for _ in range(30):
        assert await _status(h, key) == 200      # 30 of 100 credits spent
    # half refunded: 50 credits clawed back, all of it from the 70 unused
    await h.deliver(event("evt_r1", "charge.refunded", _charge("cus_acme", "in_1", 1000, 500)))
    again = await h.deliver(event("evt_r1b", "charge.refunded",
                                  _charge("cus_acme", "in_1", 1000, 500)), "ignored")
    assert "already taken" in again["result"]["reason"]
    g = await grants(h.p, "acme")
    assert (g["balance"], g["debt"]) == ("20", "0")
    # then fully refunded (cumulative 1000): 20 unused clawed, the 30 spent become debt
    await h.deliver(event("evt_r2", "charge.refunded", _charge("cus_acme", "in_1", 1000, 1000)))
    g = await grants(h.p, "acme")
    assert (g["balance"], g["debt"]) == ("-30", "30")
    with h.p.db() as c:
        kinds = dict(c.execute("SELECT kind, SUM(amount) FROM credit_entries"
                               " WHERE customer_id='acme' GROUP BY kind").fetchall())
    assert kinds == {"debit": 30 * Q, "refund": 70 * Q, "debt": 30 * Q}


async def test_dispute_and_credit_note_claw_back(hooks: HooksFactory) -> None:
    h = await hooks()
    await h.p.customer_with_key("acme", stripe_customer_id="cus_acme")
    await h.deliver(event("evt_buy", "invoice.paid", _paid("in_1", 1000)))
    # a credit note for a tenth of the invoice
    cn = {"id": "cn_1", "object": "credit_note", "customer": "cus_acme", "invoice": "in_1",
          "amount": 100}
    await h.deliver(event("evt_cn", "credit_note.created", cn))
    await h.deliver(event("evt_cn_again", "credit_note.created", cn), "ignored")  # once
    assert (await grants(h.p, "acme"))["balance"] == "90"
    # a dispute names the charge, not the customer
    dp = {"id": "dp_1", "object": "dispute", "charge": "ch_1", "payment_intent": "pi_1",
          "amount": 1000}
    done = await h.deliver(event("evt_dp", "charge.dispute.created", dp))
    assert done["result"]["customer"] == "acme"
    g = await grants(h.p, "acme")
    assert (g["balance"], g["debt"]) == ("0", "0")


async def test_refund_on_current_api_found_through_invoice_payment(hooks: HooksFactory) -> None:
    """From API 2025-03-31 on, neither the Invoice nor the Charge names the other: the link
    comes from ``invoice_payment.paid`` (here before the invoice's own event) or from
    ``invoice.payments`` when the payload includes it."""
    h = await hooks()
    key = await h.p.customer_with_key("acme", stripe_customer_id="cus_acme")
    ip = {"id": "inpay_1", "object": "invoice_payment", "invoice": "in_new", "amount_paid": 1000,
          "payment": {"type": "payment_intent", "payment_intent": "pi_new"}}
    done = await h.deliver(event("evt_ip", "invoice_payment.paid", ip))
    assert done["result"] == {"invoice": "in_new", "payments": ["pi_new"]}
    inv = invoice("in_new", "cus_acme", [old_line("price_pack")])
    inv["amount_paid"] = 1000
    await h.deliver(event("evt_buy", "invoice.paid", inv))
    assert await _status(h, key) == 200          # 1 credit spent, from the only pack
    inv2 = invoice("in_new2", "cus_acme", [old_line("price_pack")])
    inv2.update(amount_paid=2000, payments={"object": "list", "data": [
        {"object": "invoice_payment", "payment": {"type": "payment_intent",
                                                  "payment_intent": "pi_new2"}}]})
    await h.deliver(event("evt_buy2", "invoice.paid", inv2))
    refund = {"id": "ch_new", "object": "charge", "customer": "cus_acme",
              "payment_intent": "pi_new", "amount": 1000, "amount_refunded": 1000}
    done = await h.deliver(event("evt_rf", "charge.refunded", refund))
    assert [c["credits"] for c in done["result"]["clawed_back"]] == ["100"]
    refund2 = {"id": "ch_new2", "object": "charge", "customer": "cus_acme",
               "payment_intent": "pi_new2", "amount": 2000, "amount_refunded": 200}
    done = await h.deliver(event("evt_rf2", "charge.refunded", refund2))
    assert [c["credits"] for c in done["result"]["clawed_back"]] == ["10"]
    g = await grants(h.p, "acme")
    # 200 granted, 1 spent from the first pack; its full refund takes the 99 unused and
    # makes the spent 1 debt; 10 of the second pack's 100 go back
    assert (g["balance"], g["debt"]) == ("89", "1")


async def test_renewal_invoice_created_admits_requests_before_payment(
        hooks: HooksFactory) -> None:
    """Finding 1 through the real endpoint: after the period rolls over and before the
    renewal is paid, a block customer is served from the new allowance (402 without it)."""
    h = await hooks()
    key = await h.p.customer_with_key("acme", stripe_customer_id="cus_acme", overage="block")
    t = int(time.time())
    old, new = (t - 3000, t - 10), (t - 10, t + 3000)

    def renewal(inv: str, period: tuple[int, int], reason: str) -> dict[str, Any]:
        return invoice(inv, "cus_acme", [new_line("price_reset", "sub_1", period)], reason,
                       "sub_1")

    await h.deliver(event("evt_1", "invoice.paid", renewal("in_1", old, "subscription_create")))
    assert await _status(h, key) == 402              # the paid period is over
    created = await h.deliver(event("evt_c", "invoice.created",
                                    renewal("in_2", new, "subscription_cycle")))
    assert created["result"]["pending_payment"] == "in_2"
    assert await _status(h, key) == 200
    paid = await h.deliver(event("evt_p", "invoice.paid",
                                 renewal("in_2", new, "subscription_cycle")))
    assert [g["created"] for g in paid["result"]["grants"]] == [False]
    summary = await grants(h.p, "acme")
    assert summary["balance"] == "49"
