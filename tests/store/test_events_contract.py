"""Contracts of the ``WebhookEvents``, ``AlertsFired``, ``RulesHistory`` and ``Maintenance``
owners."""

from __future__ import annotations

import asyncio

import orjson

from proxy.store.protocols import NewAlert
from tests.store.conftest import Backend


def _event(eid: str, etype: str = "invoice.paid", obj_id: str = "in_1") -> str:
    return orjson.dumps({"id": eid, "type": etype, "data": {"object": {"id": obj_id}}}).decode()


# ---- webhook events ----------------------------------------------------------------------------

async def test_record_is_the_dedupe_across_members(backend: Backend) -> None:
    ev = backend.storage.webhooks
    assert await ev.record("evt_1", "invoice.paid", 100, _event("evt_1"), 1000) is True
    assert await ev.record("evt_1", "invoice.paid", 100, "{}", 2000) is False
    assert await backend.peer().webhooks.record("evt_1", "x", None, "{}", 3000) is False
    got = await ev.get("evt_1")
    assert got is not None
    assert (got.type, got.created, got.status, got.received_at, got.payload) == (
        "invoice.paid", 100, "pending", 1000, _event("evt_1"))      # the first copy is kept
    assert await ev.get("evt_nope") is None


async def test_concurrent_receipt_stores_one(backend: Backend) -> None:
    peer = backend.peer()
    got = await asyncio.gather(*(s.webhooks.record("evt_1", "t", None, "{}", 1)
                                 for s in [backend.storage, peer] * 4))
    assert sum(got) == 1


async def test_waiting_in_arrival_order_with_a_cursor(backend: Backend) -> None:
    ev = backend.storage.webhooks
    for i in (3, 1, 2):
        await ev.record(f"evt_{i}", "t", None, _event(f"evt_{i}"), i)
    first = await ev.waiting(["pending"], 0, limit=2)
    assert [e for _, e in first] == ["evt_3", "evt_1"]
    rest = await ev.waiting(["pending"], first[-1][0], limit=2)
    assert [e for _, e in rest] == ["evt_2"]
    await ev.set_outcome("evt_1", "waiting_customer", '{"r": 1}', 50)
    assert [e for _, e in await ev.waiting(["pending"], 0)] == ["evt_3", "evt_2"]
    assert [e for _, e in await ev.waiting(["pending", "waiting_customer"], 0)] == [
        "evt_3", "evt_1", "evt_2"]
    assert await ev.payload("evt_2") == _event("evt_2")
    assert await ev.payload("evt_9") is None


async def test_outcomes_listing_and_paid_invoices(backend: Backend) -> None:
    ev = backend.storage.webhooks
    await ev.record("evt_1", "invoice.paid", None, _event("evt_1", obj_id="in_7"), 1)
    await ev.record("evt_2", "invoice.payment_failed", None,
                    _event("evt_2", "invoice.payment_failed", "in_8"), 2)
    await ev.set_outcome("evt_1", "failed", '{"a": 1}', 10)
    await ev.set_outcome("evt_1", "processed", '{"b": 2}', 11)         # re-processing overwrites
    got = await ev.get("evt_1")
    assert got is not None and (got.status, got.result, got.processed_at) == (
        "processed", '{"b": 2}', 11)
    assert [e.id for e in await ev.recent()] == ["evt_2", "evt_1"]    # newest first
    assert [e.id for e in await ev.recent("processed")] == ["evt_1"]
    assert [e.id for e in await ev.recent(limit=1)] == ["evt_2"]
    assert all(e.payload is None for e in await ev.recent())
    assert await ev.invoice_paid_seen("in_7") is True
    assert await ev.invoice_paid_seen("in_8") is False                 # not an invoice.paid
    assert await ev.invoice_paid_seen(None) is False


# ---- alerts ------------------------------------------------------------------------------------

def _alert(cid: str = "c1", period: str = "0", threshold: str = "0.5") -> NewAlert:
    return NewAlert(cid, period, threshold, orjson.dumps({"t": threshold}).decode(), 100)


async def _due_one(backend: Backend) -> int:
    backend.storage.alerts.fire([_alert()])
    (a,) = await backend.storage.alerts.due(1000)
    return a.id


async def test_fire_once_per_customer_period_threshold(backend: Backend) -> None:
    al = backend.storage.alerts
    al.fire([_alert(), _alert(threshold="0.9")])
    al.fire([_alert(), _alert(period="1")])
    backend.peer().alerts.fire([_alert()])
    assert await al.fired() == {("c1", "0", "0.5"), ("c1", "0", "0.9"), ("c1", "1", "0.5")}
    due = await al.due(1000)
    assert [(a.threshold, a.period_key, a.attempts) for a in due] == [
        ("0.5", "0", 0), ("0.9", "0", 0), ("0.5", "1", 0)]                  # by id
    assert due[0].payload == '{"t":"0.5"}'
    assert len(await al.due(1000, limit=2)) == 2
    assert await al.next_due() == 0.0


async def test_claim_is_exclusive_and_leases(backend: Backend) -> None:
    al = backend.storage.alerts
    aid = await _due_one(backend)
    peer = backend.peer()
    got = await asyncio.gather(al.claim(aid, 1000, 1010), peer.alerts.claim(aid, 1000, 1010),
                               al.claim(aid, 1000, 1010))
    assert sorted(got, key=lambda x: x or 0) == [None, None, 1]
    assert await al.due(1005) == []                       # hidden while the lease runs
    assert await al.next_due() == 1010.0
    assert await al.claim(aid, 1010, 1020) == 2           # the lease expired: attempt 2


async def test_finish_retry_dead_and_requeue(backend: Backend) -> None:
    al = backend.storage.alerts
    aid = await _due_one(backend)
    await al.claim(aid, 1000, 1010)
    await al.retry_at(aid, 2000, "HTTP 500")
    assert await al.due(1999) == [] and len(await al.due(2000)) == 1
    assert await al.finish(aid, "dead", "HTTP 500", None) is True
    assert await al.finish(aid, "sent", None, 5) is False  # only a pending alert finishes
    (d,) = await al.list_dead()
    assert (d.id, d.attempts, d.last_error, d.created_at) == (aid, 1, "HTTP 500", 100)
    await al.retry_at(aid, 0, "ignored")                   # not pending: unchanged
    assert (await al.list_dead())[0].last_error == "HTTP 500"
    assert await al.requeue([aid, 999]) == 1
    assert await al.requeue([aid]) == 0
    (a,) = await al.due(0)
    assert (a.id, a.attempts) == (aid, 0)
    assert await al.list_dead() == []
    assert await al.finish(aid, "sent", None, 7) is True
    assert await al.due(10**10) == [] and await al.next_due() is None


# ---- rules history, maintenance ------------------------------------------------------------------

async def test_rules_history_keeps_the_first_text(backend: Backend) -> None:
    rh = backend.storage.rules
    assert await rh.newest() is None and await rh.get("v1") is None
    assert await rh.remember("v1", '[{"file": "a", "text": "x"}]', 100) is True
    assert await rh.remember("v1", "[]", 200) is False
    assert await rh.remember("v2", "[]", 150) is True
    got = await rh.get("v1")
    assert got is not None and (got.files, got.first_loaded_at) == (
        '[{"file": "a", "text": "x"}]', 100)
    assert await rh.newest() == "v2"


async def test_maintenance_reports_a_sound_store(backend: Backend) -> None:
    m = backend.storage.maintenance
    assert m.check_file() is None
    await m.checkpoint_once()
    assert await m.integrity_check() is None


async def test_fire_new_returns_only_the_alerts_it_inserted(backend: Backend) -> None:
    al = backend.storage.alerts
    al.fire([_alert()])
    got = await al.fire_new([_alert(), _alert(threshold="spike:m"), _alert(period="1")])
    assert [(a.threshold, a.period_key) for a in got] == [("spike:m", "0"), ("0.5", "1")]
    assert await backend.peer().alerts.fire_new([_alert(threshold="spike:m")]) == []
    assert await al.fire_new([]) == []
    assert len(await al.due(1000)) == 3            # durable, delivered like any alert
