"""Inbound Stripe webhooks through a real proxy: signatures (valid, tampered, wrong secret,
stale, missing), dedupe on event id, one grant per purchase whichever way it arrives, any
arrival order, suspension seen by the next proxied request, payment_failed policy, plan
allowances (reset, rollover with a cap), and the admin list / replay routes.

The events go to ``POST /webhooks/stripe`` on the proxy's public port; the admin routes are
on its admin port.
"""

from __future__ import annotations

import io
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
import stripe

from proxy.timeutil import rfc3339
from proxy.webhooks import PATH
from tests.conftest import ADMIN_TOKEN, Proxy, ProxyFactory
from tests.helpers import wait_until

SECRET = "whsec_test"
Q = 1_000_000

RULES = """\
version: 1
meters:
  api_calls: {stripe_event_name: api_calls}
rules:
  - name: fixed
    match: {path: /v1/items}
    usage:
      - {meter: api_calls, quantity: 1, credits: 1}
  - name: other
    match: {path: "/**"}
    usage:
      - {meter: api_calls, quantity: 1}
"""

CREDITS: dict[str, Any] = {
    "packs": {"price_pack": {"credits": "100", "expires_in": "30d", "priority": 40},
              "price_small": {"credits": "2.5"}},
    "plans": {"price_reset": {"allowance": "50", "mode": "reset"},
              "price_roll": {"allowance": "50", "mode": "rollover", "cap": "80"},
              "price_roll_all": {"allowance": "50", "mode": "rollover", "priority": 10}},
}


class Hooks:
    """Where to send webhooks and how to ask the admin API about them."""

    def __init__(self, p: Proxy, url: str, admin_url: str) -> None:
        self.p = p
        self.url = url
        self.admin_url = admin_url
        self.n = 0

    async def send(self, event: dict[str, Any], *, secret: str = SECRET, ts: int | None = None,
                   body: bytes | None = None, header: str | None = None) -> tuple[int, Any]:
        raw = orjson.dumps(event)
        sig = header if header is not None else \
            stripe.WebhookSignature.generate_signature_header(raw.decode(), secret, timestamp=ts)
        # a file-like body: aiohttp warns (ResourceWarning) on raw bytes over 1 MiB
        async with self.p.session.post(self.url, data=io.BytesIO(body if body is not None else raw),
                                       headers={"Stripe-Signature": sig,
                                                "Content-Type": "application/json"}) as r:
            return r.status, await r.json(content_type=None)

    async def admin(self, method: str, path: str, expect: int | None = None) -> Any:
        async with self.p.session.request(method, self.admin_url + path,
                                          headers=self.p.admin_headers) as r:
            body = await r.json(content_type=None)
            if expect is not None:
                assert r.status == expect, (r.status, body)
            return body

    async def wait(self, event_id: str, status: str, timeout: float = 10.0) -> dict[str, Any]:
        ev = await wait_until(lambda: self.admin("GET", f"/admin/webhooks/{event_id}"),
                              ok=lambda ev: ev.get("status") == status, timeout=timeout,
                              what=f"event {event_id} to be {status}")
        return dict(ev)

    async def deliver(self, event: dict[str, Any], status: str = "processed") -> dict[str, Any]:
        code, body = await self.send(event)
        assert code == 200 and body["received"] is True, (code, body)
        return await self.wait(event["id"], status)


HooksFactory = Callable[..., Awaitable[Hooks]]


@pytest.fixture
async def hooks(make_proxy: ProxyFactory) -> AsyncIterator[HooksFactory]:
    cleanup: list[Callable[[], Awaitable[None]]] = []

    async def factory(**overrides: Any) -> Hooks:
        overrides.setdefault("stripe", {"webhook_secret": SECRET})
        overrides.setdefault("credits", CREDITS)
        p = await make_proxy(rules_text=RULES, **overrides)
        # wired by the composition root: the public route is this receiver's
        assert PATH in p.server.pipeline.own_paths
        return Hooks(p, p.url + PATH, p.admin_url)

    yield factory
    for fn in reversed(cleanup):
        await fn()


# ---- event builders ---------------------------------------------------------------------------

def event(eid: str, etype: str, obj: dict[str, Any], created: int | None = None) -> dict[str, Any]:
    return {"id": eid, "object": "event", "type": etype, "api_version": "2026-10-28.endive",
            "created": created or int(time.time()), "data": {"object": obj}}


def old_line(price: str, qty: int = 1) -> dict[str, Any]:
    """Line item shape before API 2025-03-31 (``price`` object)."""
    return {"object": "line_item", "price": {"id": price}, "quantity": qty, "proration": False}


def new_line(price: str, sub: str, period: tuple[int, int], qty: int = 1) -> dict[str, Any]:
    """Line item shape from API 2025-03-31 on (``pricing`` and ``parent``)."""
    return {"object": "line_item", "quantity": qty,
            "period": {"start": period[0], "end": period[1]},
            "pricing": {"type": "price_details", "price_details": {"price": price}},
            "parent": {"type": "subscription_item_details",
                       "subscription_item_details": {"subscription": sub, "proration": False}}}


def invoice(inv: str, cus: str, lines: list[dict[str, Any]], reason: str = "manual",
            sub: str | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {"id": inv, "object": "invoice", "customer": cus, "billing_reason": reason,
                           "lines": {"object": "list", "data": lines, "has_more": False}}
    if sub:
        obj["parent"] = {"type": "subscription_details",
                         "subscription_details": {"subscription": sub}}
    return obj


def session(sid: str, cus: str, price: str, qty: int = 1, inv: str | None = None) -> dict[str, Any]:
    return {"id": sid, "object": "checkout.session", "customer": cus, "mode": "payment",
            "payment_status": "paid", "invoice": inv,
            "line_items": {"object": "list", "data": [old_line(price, qty)]}}


async def grants(p: Proxy, cid: str) -> dict[str, Any]:
    return dict(await p.admin("GET", f"/admin/customers/{cid}/grants", expect=200))


def ledger_sums(p: Proxy, cid: str) -> None:
    """Every grant's amount minus its entries equals what the book says is left."""
    svc = p.server.credits
    with p.db() as c:
        for gid, amount in c.execute("SELECT id, amount FROM grants WHERE customer_id=?", (cid,)):
            (taken,) = c.execute("SELECT COALESCE(SUM(amount), 0) FROM credit_entries"
                                 " WHERE grant_id=?", (gid,)).fetchone()
            assert amount - taken == svc.book.grant(gid).remaining, gid


async def spend(p: Proxy, key: str, n: int) -> None:
    for _ in range(n):
        async with p.session.get(p.url + "/v1/items",
                                 headers={"Authorization": f"Bearer {key}"}) as r:
            assert r.status == 200, await r.text()


# ---- signatures -------------------------------------------------------------------------------

async def test_signature_valid_tampered_wrong_secret_stale_missing(hooks: HooksFactory) -> None:
    h = await hooks()
    await h.p.customer_with_key("acme", stripe_customer_id="cus_acme")
    ev = event("evt_sig", "invoice.paid", invoice("in_sig", "cus_acme", [old_line("price_pack")]))
    raw = orjson.dumps(ev)

    tampered = raw.replace(b"price_pack", b"price_pac2")
    code, body = await h.send(ev, body=tampered)
    assert code == 400 and body["error"]["type"] == "invalid_signature"
    code, body = await h.send(ev, secret="whsec_other")
    assert code == 400 and body["error"]["type"] == "invalid_signature"
    code, body = await h.send(ev, ts=int(time.time()) - 301)
    assert code == 400 and "tolerance" in body["error"]["message"]
    code, body = await h.send(ev, header="")
    assert code == 400 and body["error"]["type"] == "invalid_signature"
    code, body = await h.send(ev, header="garbage")
    assert code == 400
    assert (await h.admin("GET", "/admin/webhooks", expect=200))["events"] == []  # nothing kept

    code, body = await h.send(ev, ts=int(time.time()) - 200)          # inside the tolerance
    assert code == 200 and body == {"received": True}
    done = await h.wait("evt_sig", "processed")
    assert done["result"]["grants"][0]["credits"] == "100"
    assert (await grants(h.p, "acme"))["balance"] == "100"


async def test_replayed_delivery_is_stored_and_granted_once(hooks: HooksFactory) -> None:
    h = await hooks()
    await h.p.customer_with_key("acme", stripe_customer_id="cus_acme")
    ev = event("evt_dup", "invoice.paid",
               invoice("in_dup", "cus_acme", [old_line("price_pack", 2), old_line("price_small")]))
    assert await h.send(ev) == (200, {"received": True})
    await h.wait("evt_dup", "processed")
    code, body = await h.send(ev)                                    # Stripe retries
    assert code == 200 and body == {"received": True, "duplicate": True}
    # the same invoice as a different event id (e.g. resent by hand) grants nothing more
    await h.deliver(event("evt_dup2", "invoice.paid", ev["data"]["object"]))
    g = await grants(h.p, "acme")
    assert g["balance"] == "202.5" and len(g["grants"]) == 2
    pack = next(x for x in g["grants"] if x["credits"] == "200")
    assert pack["priority"] == 40 and pack["expires_at"] is not None
    assert pack["source"] == "stripe:in_dup"


async def test_body_limit_and_disabled_without_secret(hooks: HooksFactory) -> None:
    h = await hooks(stripe={"webhook_secret": ""})
    code, body = await h.send(event("evt_x", "invoice.paid", {}))
    assert code == 503 and body["error"]["type"] == "webhooks_disabled"
    async with h.p.session.get(h.url) as r:
        assert r.status == 405 and (await r.json())["error"]["type"] == "method_not_allowed"


async def test_oversized_body_is_refused(hooks: HooksFactory) -> None:
    h = await hooks()
    big = event("evt_big", "invoice.paid", {"pad": "x" * (1024 * 1024)})
    code, body = await h.send(big)
    assert code == 413 and body["error"]["type"] == "payload_too_large"


# ---- one purchase, many deliveries, any order ---------------------------------------------------

async def test_checkout_and_invoice_for_one_purchase_grant_once(hooks: HooksFactory) -> None:
    h = await hooks()
    await h.p.customer_with_key("acme", stripe_customer_id="cus_acme")
    # the session (keyed by its invoice) arrives first, then that invoice
    await h.deliver(event("evt_cs", "checkout.session.completed",
                          session("cs_1", "cus_acme", "price_pack", inv="in_cs")))
    inv = await h.deliver(event("evt_in", "invoice.paid",
                                invoice("in_cs", "cus_acme", [old_line("price_pack")])))
    assert inv["result"]["grants"][0]["created"] is False
    # a session without an invoice is keyed on the session id
    await h.deliver(event("evt_cs2", "checkout.session.completed",
                          session("cs_2", "cus_acme", "price_small", qty=4)))
    await h.deliver(event("evt_cs2b", "checkout.session.completed",
                          session("cs_2", "cus_acme", "price_small", qty=4)))
    g = await grants(h.p, "acme")
    assert g["balance"] == "110" and len(g["grants"]) == 2
    # an unpaid (async) session grants nothing until it succeeds
    unpaid = session("cs_3", "cus_acme", "price_small") | {"payment_status": "unpaid"}
    await h.deliver(event("evt_cs3", "checkout.session.completed", unpaid), "ignored")
    await h.deliver(event("evt_cs3b", "checkout.session.async_payment_succeeded", unpaid))
    assert (await grants(h.p, "acme"))["balance"] == "112.5"


async def test_out_of_order_and_customer_created_later(hooks: HooksFactory) -> None:
    h = await hooks()
    now = int(time.time())
    # Stripe's events for a customer we do not know yet: kept, then processed once it exists
    deleted = event("evt_del", "customer.subscription.deleted",
                    {"id": "sub_1", "object": "subscription", "customer": "cus_late",
                     "status": "canceled"}, created=now)
    paid = event("evt_old_paid", "invoice.paid",
                 invoice("in_old", "cus_late", [old_line("price_pack")]), created=now - 3600)
    await h.deliver(deleted, "waiting_customer")
    await h.deliver(paid, "waiting_customer")
    listed = await h.admin("GET", "/admin/webhooks?status=waiting_customer", expect=200)
    assert {e["id"] for e in listed["events"]} == {"evt_del", "evt_old_paid"}

    await h.p.customer_with_key("late", stripe_customer_id="cus_late")
    await h.wait("evt_del", "processed")
    await h.wait("evt_old_paid", "processed")
    # the deletion (newer) was processed before the older invoice, which still granted once
    g = await grants(h.p, "late")
    assert g["balance"] == "100" and len(g["grants"]) == 1
    await h.deliver(paid | {"id": "evt_old_paid_again"})
    assert len((await grants(h.p, "late"))["grants"]) == 1
    cust = await h.p.admin("GET", "/admin/customers/late", expect=200)
    assert cust["status"] == "suspended"


# ---- suspension -----------------------------------------------------------------------------

async def test_subscription_deleted_suspends_on_the_next_request(hooks: HooksFactory) -> None:
    h = await hooks()
    key = await h.p.customer_with_key("acme", stripe_customer_id="cus_acme")
    other = await h.p.customer_with_key("beta", stripe_customer_id="cus_beta")
    await spend(h.p, key, 1)
    await h.deliver(event("evt_sd", "customer.subscription.deleted",
                          {"id": "sub_9", "object": "subscription", "customer": "cus_acme"}))
    async with h.p.session.get(h.p.url + "/v1/items",
                               headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 403
        assert (await r.json())["error"]["type"] == "customer_suspended"
    await spend(h.p, other, 1)                                     # nobody else is affected


async def test_an_event_replayed_while_the_database_is_locked_stays_as_it_was(
        hooks: HooksFactory) -> None:
    """Processing that cannot write (another process holds the database past
    storage.lock_wait) is the store's failure, not the event's: the replay answers 503
    storage_unavailable and the event keeps its status (never marked failed); once the lock
    is gone the same replay applies it."""
    import sqlite3

    h = await hooks(storage={"lock_wait": "100ms"})
    await h.p.customer_with_key("acme", stripe_customer_id="cus_acme")
    await h.deliver(event("evt_sd", "customer.subscription.deleted",
                          {"id": "sub_9", "object": "subscription", "customer": "cus_acme"}))
    await h.p.admin("POST", "/admin/customers", {"id": "acme", "status": "active"},
                    expect=200)
    blocker = sqlite3.connect(str(h.p.tmp / "meter.db"), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        async with h.p.session.post(h.admin_url + "/admin/webhooks/evt_sd/replay",
                                    headers=h.p.admin_headers) as r:
            body = await r.json()
            assert (r.status, body["error"]["type"]) == (503, "storage_unavailable"), body
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert (await h.admin("GET", "/admin/webhooks/evt_sd", expect=200))["status"] == "processed"
    assert (await h.p.admin("GET", "/admin/customers/acme", expect=200))["status"] == "active"
    await h.admin("POST", "/admin/webhooks/evt_sd/replay", expect=200)
    assert (await h.p.admin("GET", "/admin/customers/acme", expect=200))["status"] == \
        "suspended"


async def test_payment_failed_none_changes_nothing(hooks: HooksFactory) -> None:
    h = await hooks()
    key = await h.p.customer_with_key("acme", stripe_customer_id="cus_acme")
    done = await h.deliver(event("evt_pf", "invoice.payment_failed",
                                 invoice("in_pf", "cus_acme", [])), "ignored")
    assert "none" in done["result"]["reason"]
    await spend(h.p, key, 1)


async def test_payment_failed_suspend(hooks: HooksFactory) -> None:
    h = await hooks(credits={**CREDITS, "on_payment_failed": "suspend"})
    key = await h.p.customer_with_key("acme", stripe_customer_id="cus_acme")
    # a failure for an invoice already paid (late, out of order) is stale: ignored
    await h.deliver(event("evt_ok", "invoice.paid", invoice("in_ok", "cus_acme", [])), "ignored")
    await h.deliver(event("evt_pf_stale", "invoice.payment_failed",
                          invoice("in_ok", "cus_acme", [])), "ignored")
    await spend(h.p, key, 1)
    await h.deliver(event("evt_pf", "invoice.payment_failed", invoice("in_pf", "cus_acme", [])))
    async with h.p.session.get(h.p.url + "/v1/items",
                               headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 403 and (await r.json())["error"]["type"] == "customer_suspended"


# ---- plan allowances --------------------------------------------------------------------------

def plan_paid(eid: str, inv: str, price: str, period: tuple[int, int],
              reason: str = "subscription_cycle") -> dict[str, Any]:
    return event(eid, "invoice.paid",
                 invoice(inv, "cus_acme", [new_line(price, "sub_1", period)], reason, "sub_1"))


async def test_plan_reset_grants_each_period_once(hooks: HooksFactory) -> None:
    h = await hooks()
    key = await h.p.customer_with_key("acme", stripe_customer_id="cus_acme")
    t = int(time.time())
    p1, p2 = (t - 10, t + 1000), (t + 1000, t + 2000)
    first = await h.deliver(plan_paid("evt_p1", "in_p1", "price_reset", p1, "subscription_create"))
    assert first["result"]["grants"][0]["credits"] == "50"
    await spend(h.p, key, 20)
    await h.deliver(plan_paid("evt_p2", "in_p2", "price_reset", p2))
    await h.deliver(plan_paid("evt_p2b", "in_p2", "price_reset", p2))      # same period again
    g = await grants(h.p, "acme")
    amounts = sorted((x["credits"], x["remaining"]) for x in g["grants"])
    assert amounts == [("50", "30"), ("50", "50")]                          # nothing carried
    # the next period's allowance, paid ahead, is spendable from its start only (finding 1)
    assert g["balance"] == "30"
    assert sorted((x["effective_at"], x["pending"]) for x in g["grants"]) == \
        [(rfc3339(p1[0]), False), (rfc3339(p2[0]), True)]
    assert sorted(x["expires_at"] for x in g["grants"]) == [rfc3339(p1[1]), rfc3339(p2[1])]
    ledger_sums(h.p, "acme")
    # a plan-change invoice for a period already granted grants nothing more
    upd = await h.deliver(plan_paid("evt_upd", "in_upd", "price_reset", p2,
                                    "subscription_update"))
    assert [x["created"] for x in upd["result"]["grants"]] == [False]
    assert len((await grants(h.p, "acme"))["grants"]) == 2


async def test_plan_allowance_is_per_unit_of_the_line_quantity(hooks: HooksFactory) -> None:
    h = await hooks()
    await h.p.customer_with_key("acme", stripe_customer_id="cus_acme")
    t = int(time.time())
    seats = new_line("price_reset", "sub_1", (t - 10, t + 1000), qty=3)
    ev = await h.deliver(event("evt_seats", "invoice.paid",
                               invoice("in_seats", "cus_acme", [seats], "subscription_create",
                                       "sub_1")))
    [g] = ev["result"]["grants"]
    assert g == {"price": "price_reset", "period_start": rfc3339(t - 10),
                 "period_end": rfc3339(t + 1000), "grant_id": g["grant_id"],
                 "credits": "150", "created": True}                       # 3 x 50
    listed = await grants(h.p, "acme")
    assert listed["balance"] == "150"
    assert [x["grant_id"] for x in listed["grants"]] == [g["grant_id"]]


async def test_plan_rollover_cap_scales_with_the_quantity(hooks: HooksFactory) -> None:
    h = await hooks()
    await h.p.customer_with_key("acme", stripe_customer_id="cus_acme")
    t = int(time.time())
    p1, p2 = (t - 100, t - 10), (t - 10, t + 1000)     # a rollover period grants once begun
    for eid, period, reason in (("evt_c1", p1, "subscription_create"),
                                ("evt_c2", p2, "subscription_cycle")):
        line = new_line("price_roll", "sub_1", period, qty=2)
        out = await h.deliver(event(eid, "invoice.paid", invoice(
            "in_" + eid, "cus_acme", [line], reason, "sub_1")))
    # 2 x 50 carried onto 2 x 50, capped at 2 x 80
    [g] = out["result"]["grants"]
    assert (g["credits"], g["carried"]) == ("160", "100")


async def test_plan_rollover_without_cap_carries_everything(hooks: HooksFactory) -> None:
    h = await hooks()
    await h.p.customer_with_key("acme", stripe_customer_id="cus_acme")
    t = int(time.time())
    p1, p2 = (t - 100, t - 10), (t - 10, t + 1000)
    await h.deliver(plan_paid("evt_r1", "in_r1", "price_roll_all", p1, "subscription_create"))
    second = await h.deliver(plan_paid("evt_r2", "in_r2", "price_roll_all", p2))
    [g] = second["result"]["grants"]
    assert (g["credits"], g["carried"], g["created"]) == ("100", "50", True)
    listed = {x["grant_id"]: x for x in (await grants(h.p, "acme"))["grants"]}
    assert listed[g["grant_id"]]["priority"] == 10                   # the plan's priority


async def test_invoice_outcomes_and_notes_are_exact(hooks: HooksFactory) -> None:
    h = await hooks()
    await h.p.customer_with_key("acme", stripe_customer_id="cus_acme")
    t = int(time.time())
    period = {"start": t - 10, "end": t + 1000}
    bare = {"price": {"id": "price_reset"}, "quantity": 1, "period": period}   # no subscription
    manual = await h.deliver(event("evt_m", "invoice.paid", invoice(
        "in_m", "cus_acme", [bare], "manual", "sub_1")), "ignored")
    assert manual["result"] == {"customer": "acme", "reason": "no configured price",
                                "notes": ["plan line not granted: billing_reason 'manual'"]}
    nosub = await h.deliver(event("evt_n", "invoice.paid", invoice(
        "in_n", "cus_acme", [bare], "subscription_cycle")), "ignored")
    assert nosub["result"]["notes"] == ["plan line not granted: no subscription or period"]
    # the subscription comes from the invoice when the line does not name it
    inv = invoice("in_s", "cus_acme", [bare, dict(bare)], "subscription_cycle", "sub_9")
    inv["lines"]["has_more"] = True
    ok = await h.deliver(event("evt_s", "invoice.paid", inv))
    [g] = ok["result"]["grants"]
    assert ok["result"] == {"customer": "acme", "grants": [g], "notes": [
        "only the first plan line of an invoice grants",
        "invoice lines truncated (has_more): only the included lines were mapped"]}
    assert g["credits"] == "50" and g["created"] is True
    [listed] = (await grants(h.p, "acme"))["grants"]
    assert (listed["grant_id"], listed["source"]) == (g["grant_id"], "stripe:in_s")


PRORATION_NOTE = ("proration lines grant nothing here: a plan change's allowance is granted at"
                  " customer.subscription.updated")


async def test_proration_plan_line_grants_no_allowance(hooks: HooksFactory) -> None:
    """A plan line marked as a proration never grants the allowance, even on an invoice
    whose billing_reason would grant (only whole-period plan lines do)."""
    h = await hooks()
    await h.p.customer_with_key("acme", stripe_customer_id="cus_acme")
    t = int(time.time())
    prorated = new_line("price_reset", "sub_1", (t - 10, t + 1000))
    prorated["parent"]["subscription_item_details"]["proration"] = True
    ev = await h.deliver(event("evt_pr", "invoice.paid",
                               invoice("in_pr", "cus_acme", [prorated], "subscription_cycle",
                                       "sub_1")), "ignored")
    assert ev["result"] == {"customer": "acme", "reason": "no configured price",
                            "notes": [PRORATION_NOTE]}
    assert (await grants(h.p, "acme"))["grants"] == []
    # the same line without the proration flag grants the 50-credit allowance
    whole = new_line("price_reset", "sub_1", (t - 10, t + 1000))
    ok = await h.deliver(event("evt_whole", "invoice.paid",
                               invoice("in_whole", "cus_acme", [prorated, whole],
                                       "subscription_cycle", "sub_1")))
    assert [g["credits"] for g in ok["result"]["grants"]] == ["50"]
    assert ok["result"]["notes"] == [PRORATION_NOTE]
    assert (await grants(h.p, "acme"))["balance"] == "50"


async def test_plan_rollover_carries_the_remainder_up_to_the_cap(hooks: HooksFactory) -> None:
    h = await hooks()
    key = await h.p.customer_with_key("acme", stripe_customer_id="cus_acme")
    t = int(time.time())
    p1, p2, p3 = (t - 100, t - 50), (t - 50, t + 1000), (t + 1000, t + 2000)
    await h.deliver(plan_paid("evt_r1", "in_r1", "price_roll", p1, "subscription_create"))
    # period 2 is paid after period 1 ended: its 50 carry, 50 + 50 capped at 80
    r2 = (await h.deliver(plan_paid("evt_r2", "in_r2", "price_roll", p2)))["result"]["grants"][0]
    assert (r2["carried"], r2["credits"], r2["created"]) == ("50", "80", True)
    assert r2["period_start"] == rfc3339(p2[0]) and r2["period_end"] == rfc3339(p2[1])
    await spend(h.p, key, 60)
    # period 3's invoice arrives before period 2 ends: what period 2 leaves is not known yet,
    # so nothing moves and nothing is granted until period 3 starts (finding 1; the carry at
    # the start is tested in tests/test_plan_lifecycle.py)
    r3 = await h.deliver(plan_paid("evt_r3", "in_r3", "price_roll", p3), "waiting_period")
    assert r3["result"]["grants"] == []
    g = await grants(h.p, "acme")
    assert g["balance"] == "20" and len(g["grants"]) == 2
    ledger_sums(h.p, "acme")
    # replaying in any order changes nothing
    for eid in ("evt_r1", "evt_r2"):
        again = await h.admin("POST", f"/admin/webhooks/{eid}/replay", expect=200)
        assert again["status"] == "processed"
        assert again["result"]["grants"][0]["created"] is False
    assert (await grants(h.p, "acme"))["balance"] == "20"
    ledger_sums(h.p, "acme")
    with h.p.db() as c:
        expired = dict(c.execute("SELECT g.period_start, SUM(e.amount) FROM credit_entries e JOIN"
                                 " grants g ON g.id = e.grant_id WHERE e.kind='expire'"
                                 " GROUP BY g.id").fetchall())
    assert expired == {p1[0]: 50 * Q}


async def test_late_period_after_a_later_one_carries_nothing(hooks: HooksFactory) -> None:
    h = await hooks()
    await h.p.customer_with_key("acme", stripe_customer_id="cus_acme")
    t = int(time.time())
    p1, p2 = (t - 100, t - 50), (t - 50, t + 1000)
    await h.deliver(plan_paid("evt_l2", "in_l2", "price_roll", p2))
    late = (await h.deliver(plan_paid("evt_l1", "in_l1", "price_roll", p1)))["result"]
    assert (late["grants"][0]["carried"], late["grants"][0]["credits"]) == ("0", "50")
    assert (await grants(h.p, "acme"))["balance"] == "50"       # period 1 has ended
    ledger_sums(h.p, "acme")


# ---- admin ---------------------------------------------------------------------------------------

async def test_admin_list_filter_and_replay(hooks: HooksFactory) -> None:
    h = await hooks()
    await h.p.customer_with_key("acme", stripe_customer_id="cus_acme")
    await h.deliver(event("evt_a", "invoice.paid", invoice("in_a", "cus_acme", [old_line("price_pack")])))
    await h.deliver(event("evt_b", "customer.created", {"id": "cus_new"}), "ignored")
    await h.deliver(event("evt_c", "invoice.paid", {"customer": "cus_acme"}), "failed")

    allev = (await h.admin("GET", "/admin/webhooks", expect=200))["events"]
    assert [e["id"] for e in allev] == ["evt_c", "evt_b", "evt_a"]
    assert set(allev[0]) >= {"id", "type", "status", "result", "received_at"}
    failed = (await h.admin("GET", "/admin/webhooks?status=failed", expect=200))["events"]
    assert [e["id"] for e in failed] == ["evt_c"]
    assert failed[0]["result"] == {"reason": "ValueError: the invoice has no id"}
    bad = await h.admin("GET", "/admin/webhooks?status=nope", expect=400)
    assert bad["error"]["type"] == "invalid_request"
    await h.admin("POST", "/admin/webhooks/evt_zzz/replay", expect=404)

    again = await h.admin("POST", "/admin/webhooks/evt_a/replay", expect=200)
    assert again["status"] == "processed" and again["result"]["grants"][0]["created"] is False
    assert (await grants(h.p, "acme"))["balance"] == "100"
    assert (await h.admin("POST", "/admin/webhooks/evt_c/replay", expect=200))["status"] == "failed"
    shown = await h.admin("GET", "/admin/webhooks/evt_a", expect=200)
    assert shown["payload"]["id"] == "evt_a"
    async with h.p.session.get(h.admin_url + "/admin/webhooks") as r:
        assert r.status == 401                                         # admin token required
    async with h.p.session.get(h.admin_url + "/admin/webhooks",
                               headers={"Authorization": f"Bearer {ADMIN_TOKEN}x"}) as r:
        assert r.status == 401                                         # and the right one
    async with h.p.session.post(h.admin_url + "/admin/webhooks/evt_a/replay") as r:
        assert r.status == 401
    assert (await grants(h.p, "acme"))["balance"] == "100"            # replays granted nothing
