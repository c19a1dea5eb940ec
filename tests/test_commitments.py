"""Minimum commitment true-up (issue 12): the shortfall of an ended period below the
customer's commitment becomes one Stripe invoice item (real SDK, the Stripe double), decided
once per period, retried with the same idempotency key after a failure."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy import metrics
from proxy.commitments import TRUEUP_SETTLE, TrueUpTask, shortfall
from proxy.errors import StripeRejected
from proxy.pricing import Price, Tier
from proxy.rules import load_rules
from proxy.store.db import Store, UsageItem, UsageRow
from proxy.store.keys import set_billing, upsert_customer
from proxy.store.sqlite import SqliteStorage
from proxy.stripe.client import StripeClient
from tests.stripe_double.fixture import TEST_API_KEY, RunningDouble

U = 1_000_000
DAY = 86400
T0 = 1_767_225_600          # 2026-01-01T00:00:00Z
DEC = T0 - 31 * DAY         # the customers are created on 2025-12-01: November is not theirs
RULES = """\
version: 1
meters:
  api_calls: {stripe_event_name: api_calls}
  storage: {stripe_event_name: storage_gb}
rules:
  - name: up
    match: {path: /upload}
    usage:
      - {meter: storage, quantity: request.bytes, transform: {divide_by: 1000, round: up}}
  - name: all
    match: {path: "/**"}
    usage:
      - {meter: api_calls, quantity: 1}
"""
# graduated: the first 100 calls at 2 cents plus a 100-cent flat fee, then 1 cent
PRICES = {"api_calls": Price("usd", "tiered", tiers_mode="graduated", tiers=(
    Tier(100, Decimal(2), Decimal(100)), Tier(None, Decimal(1)))),
    "storage": Price("usd", unit_amount_decimal=Decimal(50))}


@given(st.integers(0, 10**9), st.lists(st.integers(0, 10**8), max_size=5))
def test_shortfall_tops_the_charges_up_to_the_commitment(commitment: int,
                                                         charges: list[int]) -> None:
    owed = shortfall(commitment, charges)
    assert owed >= 0 and sum(charges) + owed >= commitment
    assert owed == 0 or sum(charges) + owed == commitment


@pytest.fixture
async def env(tmp_path: Path, stripe_double: RunningDouble
              ) -> AsyncIterator[tuple[Store, TrueUpTask, StripeClient]]:
    (tmp_path / "rules.yaml").write_text(RULES)
    rules = load_rules([tmp_path / "rules.yaml"])
    store = Store.open(tmp_path / "c.db")
    for cid, commitment in (("acme", 1000), ("beta", 200), ("free", 0)):
        store.execute_write(lambda c, cid=cid, m=commitment: (
            upsert_customer(c, cid, f"cus_{cid}", "bill", "active"),
            set_billing(c, cid, None, m),
            c.execute("UPDATE customers SET created_at=? WHERE id=?", (DEC, cid))))
    conn = StripeClient(TEST_API_KEY, api_base=stripe_double.url, timeout=5)
    owners = SqliteStorage.on(store)
    yield store, TrueUpTask(owners.customers, owners.usage, owners.trueups, conn,
                            lambda: rules, lambda: PRICES), conn
    await conn.close()
    store.close()


def _use(store: Store, cid: str, at: int, meter: str, billable: int) -> None:
    def tx(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO usage_minute(customer_id, key_id, meter, minute, rules_version,"
                  " quantity, requests, billable) VALUES (?,?,?,?,?,?,?,?)",
                  (cid, "k", meter, at // 60 * 60, "v1", billable, 1, billable))
    store.execute_write(tx)


async def test_period_end_invoices_the_shortfall_once(
        env: tuple[Store, TrueUpTask, StripeClient], stripe_double: RunningDouble) -> None:
    store, task, _ = env
    dec = T0 - 31 * DAY                                   # December (calendar months)
    _use(store, "acme", dec + DAY, "api_calls", 150 * U)  # 100 + 100 x 2 + 50 x 1 = 350
    _use(store, "acme", dec + 2 * DAY, "storage", 1001 * U)  # 1,001 bytes per 1,000 up: 2 x 50
    _use(store, "beta", dec + DAY, "api_calls", 150 * U)  # 350 > its 200: nothing owed
    _use(store, "acme", T0 + 60, "api_calls", 500 * U)    # January: not this period
    assert await task.check(T0 - 60) == []   # December has not ended; November is before them
    done = await task.check(T0 + 3600)
    assert sorted((d["customer_id"], d["amount"]) for d in done) == [("acme", 550), ("beta", 0)]
    [item] = stripe_double.state.invoice_items.items.values()
    assert (item["customer"], item["amount"], item["currency"]) == ("cus_acme", 550, "usd")
    assert item["period"] == {"start": dec, "end": T0}
    assert item["metadata"]["meterproxy_charged"] == "450"
    assert await task.check(T0 + 7200) == []              # decided once
    rows = await task.trueups.recent()
    assert sorted((t.customer_id, t.status, t.amount) for t in rows) == [
        ("acme", "sent", 550), ("beta", "none", 0)]


async def test_a_failed_call_is_retried_with_the_same_key(
        env: tuple[Store, TrueUpTask, StripeClient], stripe_double: RunningDouble) -> None:
    _, task, _ = env
    stripe_double.state.faults.script("invoice_items", ["commit_then_drop"])
    # no usage: each owes its commitment less the 100-cent flat fee; acme's answer is lost
    first = await task.check(T0 + 3600)
    assert [(d["customer_id"], d["amount"]) for d in first] == [("beta", 100)]
    # the answer was lost: not confirmed, the parameters frozen
    assert [t.status for t in await task.trueups.recent("acme")] == ["sending"]
    [done] = await task.check(T0 + 3700)
    assert done["customer_id"] == "acme" and done["amount"] == 900    # 1000 - the flat fee
    # Stripe made it once: the retry replayed the first call's result
    items = {i["customer"]: i["id"] for i in stripe_double.state.invoice_items.items.values()}
    assert items == {"cus_acme": done["invoice_item"], "cus_beta": first[0]["invoice_item"]}



async def test_an_unsent_true_up_is_counted_until_stripe_has_it(
        env: tuple[Store, TrueUpTask, StripeClient], stripe_double: RunningDouble) -> None:
    """A true-up Stripe did not create shows in ``meterproxy_trueups_unsent`` (alerted on
    after an hour: deploy/prometheus/alerts.yaml) and its failed attempt in
    ``meterproxy_trueup_failures_total``, until a later check sends it."""
    _, task, _ = env
    failed = metrics.trueup_failures_total.labels("unavailable")
    before = failed._value.get()
    stripe_double.state.faults.script("invoice_items", ["429_no_retry"])
    first = await task.check(T0 + 3600)
    assert [d["customer_id"] for d in first] == ["beta"]     # acme's call failed
    assert metrics.trueups_unsent._value.get() == 1
    assert failed._value.get() == before + 1
    [done] = await task.check(T0 + 3700)
    assert done["customer_id"] == "acme"
    assert metrics.trueups_unsent._value.get() == 0
    assert failed._value.get() == before + 1


async def test_a_retry_sends_the_first_attempt_s_parameters(
        env: tuple[Store, TrueUpTask, StripeClient], stripe_double: RunningDouble) -> None:
    """The shortfall is frozen on the first attempt: usage that arrives for the period after
    a call whose answer was lost does not change what the retry sends (the same key with
    other parameters would be refused by Stripe, 400 idempotency_error, at every retry)."""
    store, task, _ = env
    stripe_double.state.faults.script("invoice_items", ["commit_then_drop"])
    first = await task.check(T0 + 3600)
    assert [d["customer_id"] for d in first] == ["beta"]
    [sending] = await task.trueups.recent("acme")
    assert (sending.status, sending.amount, sending.invoice_item) == ("sending", 900, None)
    _use(store, "acme", T0 - DAY, "api_calls", 10 * U)   # late December usage: 880 now
    [done] = await task.check(T0 + 3700)
    assert (done["customer_id"], done["amount"]) == ("acme", 900)
    acme = [i for i in stripe_double.state.invoice_items.items.values()
            if i["customer"] == "cus_acme"]
    assert [(i["id"], i["amount"]) for i in acme] == [(done["invoice_item"], 900)]
    [sent] = await task.trueups.recent("acme")
    assert (sent.status, sent.amount, sent.invoice_item) == ("sent", 900, done["invoice_item"])
    assert await task.check(T0 + 3800) == []


async def test_an_item_created_before_its_key_expired_is_found_not_made_again(
        env: tuple[Store, TrueUpTask, StripeClient], stripe_double: RunningDouble) -> None:
    """Stripe forgets an idempotency key after 24 hours: a retry after that finds the item
    the lost call created (by its metadata and period) instead of creating a second one."""
    _, task, _ = env
    stripe_double.state.faults.script("invoice_items", ["commit_then_drop"])
    assert [d["customer_id"] for d in await task.check(T0 + 3600)] == ["beta"]
    stripe_double.state.advance(DAY + 60)
    [done] = await task.check(T0 + DAY + 3600)
    acme = [i["id"] for i in stripe_double.state.invoice_items.items.values()
            if i["customer"] == "cus_acme"]
    assert acme == [done["invoice_item"]]


async def test_usage_still_in_the_journal_counts(
        env: tuple[Store, TrueUpTask, StripeClient], stripe_double: RunningDouble) -> None:
    """The period's usage is materialized before the shortfall is computed, and a period
    is decided only ``TRUEUP_SETTLE`` after its end (requests in flight at the end)."""
    _, task, _ = env
    row = UsageRow("r1", T0 - DAY, "acme", "k", "all", "v1", 200,
                   [UsageItem("api_calls", 150 * U, 0, 150 * U)])
    fut = task.usage.record(row, wait=True)
    assert fut is not None
    await fut
    assert await task.check(T0 + TRUEUP_SETTLE - 1) == []
    done = await task.check(T0 + TRUEUP_SETTLE)
    assert sorted((d["customer_id"], d["amount"]) for d in done) == [("acme", 650), ("beta", 100)]


async def test_two_checks_at_once_send_one_item(
        env: tuple[Store, TrueUpTask, StripeClient], stripe_double: RunningDouble) -> None:
    """Every fleet member runs the true-ups: two checks racing freeze one set of parameters
    and create one item (the same key, the same parameters)."""
    _, task, _ = env
    other = TrueUpTask(task.customers, task.usage, task.trueups, task.stripe, task.rules,
                       task.prices)
    got = await asyncio.gather(task.check(T0 + 3600), other.check(T0 + 3600))
    assert sorted(d["customer_id"] for d in got[0] + got[1]) == ["acme", "beta"]
    assert sorted(i["customer"] for i in stripe_double.state.invoice_items.items.values()) == [
        "cus_acme", "cus_beta"]



def test_migration_14_keeps_true_ups_and_lets_one_be_sending(tmp_path: Path) -> None:
    from proxy.store.db import _statements, connect
    from proxy.store.schema import MIGRATIONS
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db, isolation_level=None)
    for i, script in enumerate(MIGRATIONS[:13], start=1):
        for stmt in _statements(script):
            conn.execute(stmt)
        conn.execute(f"PRAGMA user_version={i}")
    conn.execute("INSERT INTO trueups VALUES ('c', 100, 200, 1000, 400, 600, 'usd', 'sent',"
                 " 'ii_1', 7)")
    conn.close()
    conn = connect(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
        assert conn.execute("SELECT customer_id, status, invoice_item, stripe_customer_id"
                            " FROM trueups").fetchall() == [("c", "sent", "ii_1", None)]
        conn.execute("INSERT INTO trueups VALUES ('c', 200, 300, 1000, 400, 600, 'usd',"
                     " 'sending', NULL, 8, 'cus_c')")
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("INSERT INTO trueups VALUES ('c', 300, 400, 1000, 400, 600, 'usd',"
                         " 'pending', NULL, 9, 'cus_c')")
    finally:
        conn.close()

async def test_the_double_validates_invoice_items(
        env: tuple[Store, TrueUpTask, StripeClient]) -> None:
    _, _, conn = env
    for params, param in (({"amount": 5, "currency": "usd"}, "customer"),
                          ({"customer": "cus_1", "currency": "usd"}, "amount"),
                          ({"customer": "cus_1", "amount": 5}, "currency"),
                          ({"customer": "cus_1", "amount": 5, "currency": "usd",
                            "period": {"start": 10, "end": 5}}, "period[end]")):
        with pytest.raises(StripeRejected) as err:
            await conn.create_invoice_item(params, idempotency_key=f"k-{param}")
        assert param in err.value.reason
