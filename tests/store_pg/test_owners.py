"""The PostgreSQL owners of customers and keys, the credit ledger, webhook events, alerts,
rules history and maintenance, against their Protocol contracts on a fresh database."""

from __future__ import annotations

import asyncio
import time

import pytest

from proxy.credits.ledger import Entry, GrantState
from proxy.errors import InvalidInput
from proxy.store.keys import hash_key
from proxy.store.postgres.storage import PostgresStorage
from proxy.store.protocols import ClawbackDecision, GrantFacts, LedgerEntry, NewAlert, NewGrant
from tests.store_pg.conftest import MemberFactory


async def _balance(s: PostgresStorage, cid: str) -> int | None:
    async with s.pool.acquire() as c:
        v = await c.fetchval("SELECT balance FROM credit_accounts WHERE customer_id=$1", cid)
    return None if v is None else int(v)


async def test_customers_and_keys(pg: PostgresStorage) -> None:
    cust, created = await pg.customers.upsert("acme", "cus_1", "block", None)
    assert created and (cust.stripe_customer_id, cust.status, cust.overage) == (
        "cus_1", "active", "block")
    cust, created = await pg.customers.upsert("acme", None, None, None,
                                              billing=lambda c: (1_700_000_000, 500))
    assert not created and (cust.stripe_customer_id, cust.overage, cust.billing_anchor,
                            cust.minimum_commitment) == ("cus_1", "block", 1_700_000_000, 500)
    for bad in (("bad id!", None, None, None), ("x", 5, None, None), ("x", None, "maybe", None),
                ("x", None, None, "gone")):
        with pytest.raises(InvalidInput):
            await pg.customers.upsert(*bad)
    assert await pg.customers.get("x") is None
    with pytest.raises(InvalidInput):
        await pg.customers.set_billing("acme", "soon", 0)
    with pytest.raises(InvalidInput):
        await pg.customers.set_billing("acme", None, -1)
    await pg.customers.set_billing("acme", None, 0)
    got = await pg.customers.get("acme")
    assert got is not None and (got.billing_anchor, got.minimum_commitment) == (None, 0)
    await pg.customers.upsert("beta", "cus_1", None, None)
    await pg.customers.upsert("gamma", "", None, None)
    assert [c.id for c in await pg.customers.all()] == ["acme", "beta", "gamma"]
    assert await pg.customers.by_stripe_id("cus_1") == ["acme", "beta"]
    assert await pg.customers.stripe_ids() == {"acme": "cus_1", "beta": "cus_1"}

    # suspension: automatic reason, then an explicit operator status clears it
    assert await pg.customers.change_suspension("acme", lambda s, w: ("suspended", "dispute"))
    assert not await pg.customers.change_suspension("acme", lambda s, w: (s, w))
    assert not await pg.customers.change_suspension("acme", lambda s, w: None)
    async with pg.pool.acquire() as c:
        assert await c.fetchval("SELECT suspended_for FROM customers WHERE id='acme'") == "dispute"
    await pg.customers.upsert("acme", None, None, "active")
    async with pg.pool.acquire() as c:
        assert await c.fetchval("SELECT suspended_for FROM customers WHERE id='acme'") is None
    assert await pg.customers.change_suspension("newco", lambda s, w: ("suspended", "unpaid"))
    newco = await pg.customers.get("newco")
    assert newco is not None and newco.status == "suspended"
    assert not await pg.customers.change_suspension("nobody", lambda s, w: None)
    assert await pg.customers.get("nobody") is None

    k1 = await pg.customers.create_key("acme", "ci")
    k2 = await pg.customers.create_key("beta")
    with pytest.raises(LookupError):
        await pg.customers.create_key("nobody")
    assert k1["key"].startswith("mp_") and k1["customer_id"] == "acme"
    async with pg.pool.acquire() as c:      # the secret is never stored
        assert await c.fetchval("SELECT count(*) FROM api_keys WHERE hash=$1 OR prefix=$1",
                                k1["key"]) == 0
    assert await pg.customers.revoke_key(k1["key_id"]) is True
    assert await pg.customers.revoke_key(k1["key_id"]) is False
    with pytest.raises(LookupError):
        await pg.customers.revoke_key("key_nope")
    listed = await pg.customers.list_keys()
    assert [(k["key_id"], k["name"], k["revoked_at"] is not None) for k in listed] == [
        (k1["key_id"], "ci", True), (k2["key_id"], "", False)]
    assert [k["key_id"] for k in await pg.customers.list_keys("beta")] == [k2["key_id"]]
    snap = await pg.customers.snapshot()
    assert snap.keys[hash_key(k1["key"])].revoked and not snap.keys[hash_key(k2["key"])].revoked
    assert sorted(snap.customers) == ["acme", "beta", "gamma", "newco"]


async def test_data_version_moves_when_another_member_commits(member: MemberFactory) -> None:
    a, b = await member(), await member()
    assert a.customers.data_version() != a.customers.data_version()   # unwatched: always new
    await b.watch()
    before = b.customers.data_version()
    assert b.customers.data_version() == before                        # watched: stable
    await b.rules.remember("v1", "[]", 1)                              # not a key change
    assert b.customers.data_version() == before
    await a.customers.upsert("acme", None, None, None)
    deadline = time.monotonic() + 5
    while b.customers.data_version() == before:
        assert time.monotonic() < deadline, "no notification reached member b"
        await asyncio.sleep(0.01)
    seen = b.customers.data_version()
    key = await a.customers.create_key("acme")
    while b.customers.data_version() == seen:
        assert time.monotonic() < deadline, "no key notification reached member b"
        await asyncio.sleep(0.01)
    snap = await b.customers.snapshot()
    assert hash_key(key["key"]) in snap.keys
    listener = b.listener
    assert listener is not None
    async with a.pool.acquire() as c:       # the listener is cut: every call is new again
        await c.execute("SELECT pg_terminate_backend($1)", listener.get_server_pid())
    while b.customers.watched:
        assert time.monotonic() < deadline + 5, "the lost listener went unnoticed"
        await asyncio.sleep(0.01)
    assert b.customers.data_version() != b.customers.data_version()


async def test_credit_ledger(pg: PostgresStorage) -> None:
    with pytest.raises(LookupError):
        await pg.ledger.create_grant(NewGrant(GrantState("g0", "nobody", 5)))
    await pg.customers.upsert("acme", None, None, None)
    async with pg.pool.acquire() as c:
        await c.execute("INSERT INTO credit_accounts(customer_id) VALUES ('acme')")
    # a repayment is capped by the debt the ledger shows (docs/fleet.md, "Repayments"): 30
    await pg.ledger.append([LedgerEntry("acme", Entry("", "debt", 30), "req-0")])
    g1 = GrantState("g1", "acme", 1000, 10, None, 100, "purchase")
    made, created = await pg.ledger.create_grant(
        NewGrant(g1, "plan:2026-01", (100, 200), ("pi_1", "ch_1"), 1500),
        then=lambda g: [Entry(g.id, "repay", 30)])
    assert created and made == g1
    again, created = await pg.ledger.create_grant(
        NewGrant(GrantState("g1-dup", "acme", 999), "plan:2026-01"))
    assert not created and again.id == "g1" and again.amount == 1000
    await pg.ledger.create_grant(NewGrant(GrantState("g2", "acme", 500, 50, None, 300, "plan"),
                                          "plan:2026-02", (200, 300)))
    assert await _balance(pg, "acme") == 1500
    await pg.ledger.append([LedgerEntry("acme", Entry("g1", "debit", 100), "req-1", "m", 1.0),
                            LedgerEntry("acme", Entry("g2", "expire", 400)),
                            LedgerEntry("acme", Entry("", "debt", 70), "req-2")])
    assert await _balance(pg, "acme") == 1100        # expiring takes credits out
    snap = await pg.ledger.load()
    assert sorted(g.id for g in snap.grants) == ["g1", "g2"]
    assert snap.entries == [Entry("", "debt", 30), Entry("g1", "repay", 30),
                            Entry("g1", "debit", 100), Entry("g2", "expire", 400),
                            Entry("", "debt", 70)]
    assert snap.debts == {"acme": 70}
    recs = await pg.ledger.entries("acme", limit=2)
    assert [(r.grant_id, r.kind, r.amount, r.request_id) for r in recs] == [
        (None, "debt", 70, "req-2"), ("g2", "expire", 400, None)]
    first = (await pg.ledger.entries("acme"))[-2]
    assert first.kind == "repay"
    debit = (await pg.ledger.entries("acme"))[2]
    assert (debit.meter, debit.at_ms) == ("m", 1000)
    assert await pg.ledger.grant_ids("acme", "plan:") == {"g1", "g2"}
    assert await pg.ledger.grant_ids("acme", "plan:", "plan:2026-02") == {"g1"}
    assert await pg.ledger.has_grant("acme", "plan:2026-02")
    assert not await pg.ledger.has_grant("acme", "plan:2026-03")
    assert await pg.ledger.previous_period_grant("acme", "plan:", 300) == "g2"
    assert await pg.ledger.previous_period_grant("acme", "plan:", 150) is None  # g2 is later
    assert await pg.ledger.entry_total("g2", "expire") == 400
    assert await pg.ledger.entry_total("g2", "debit") == 0

    assert await pg.ledger.payment_customer(["ch_1"]) == "acme"
    assert await pg.ledger.payment_customer(["in_9"]) is None
    assert await pg.ledger.link_payment(["pi_7", ""], "pi_1") == 1
    assert await pg.ledger.link_payment(["pi_7"], "pi_1") == 0
    assert await pg.ledger.payment_customer(["pi_7"]) == "acme"      # through the link
    assert await pg.ledger.payment_customer(["", ""]) is None

    facts: list[GrantFacts] = []

    def decide(f: GrantFacts) -> ClawbackDecision | None:
        facts.append(f)
        if f.previous_credits >= 600:
            return None
        return ClawbackDecision(600, [Entry(f.grant_id, "void", 600 - f.previous_credits)])

    out = await pg.ledger.claw_back("acme", ["pi_7"], "refund:re_1", "evt_1", 900, decide)
    assert out == [("g1", 600, [Entry("g1", "void", 600)])]
    assert facts[0].paid_minor == 1500 and facts[0].sums == {"debit": 100, "repay": 30}
    assert await pg.ledger.claw_back("acme", ["pi_7"], "refund:re_1", "evt_1", 900,
                                     decide) == []
    assert facts[1].previous_credits == 600 and facts[1].clawed_total == 600
    assert await _balance(pg, "acme") == 500
    assert await pg.ledger.claw_back("acme", [""], "k", "e", 0, decide) == []


async def test_webhook_events(pg: PostgresStorage) -> None:
    paid = '{"data": {"object": {"id": "in_1"}}}'
    assert await pg.webhooks.record("evt_1", "invoice.paid", 10, paid, 100)
    assert not await pg.webhooks.record("evt_1", "invoice.paid", 10, "{}", 101)
    assert await pg.webhooks.record("evt_2", "charge.refunded", None, "{}", 102)
    assert await pg.webhooks.record("evt_3", "charge.refunded", None, "{}", 103)
    assert await pg.webhooks.payload("evt_1") == paid
    assert await pg.webhooks.payload("evt_9") is None
    waiting = await pg.webhooks.waiting(["pending"], 0)
    assert [i for _c, i in waiting] == ["evt_1", "evt_2", "evt_3"]
    assert [i for _c, i in await pg.webhooks.waiting(["pending"], waiting[0][0], limit=1)] == [
        "evt_2"]
    await pg.webhooks.set_outcome("evt_2", "processed", "ok", 200)
    await pg.webhooks.set_outcome("evt_3", "failed", "boom", 201)
    assert [i for _c, i in await pg.webhooks.waiting(["pending", "failed"], 0)] == [
        "evt_1", "evt_3"]
    assert await pg.webhooks.invoice_paid_seen("in_1")
    assert not await pg.webhooks.invoice_paid_seen("in_2")
    assert not await pg.webhooks.invoice_paid_seen(None)
    assert [e.id for e in await pg.webhooks.recent()] == ["evt_3", "evt_2", "evt_1"]
    (two,) = await pg.webhooks.recent("processed")
    assert (two.id, two.status, two.result, two.processed_at, two.payload) == (
        "evt_2", "processed", "ok", 200, None)
    got = await pg.webhooks.get("evt_1")
    assert got is not None and (got.type, got.created, got.received_at, got.payload) == (
        "invoice.paid", 10, 100, paid)
    assert await pg.webhooks.get("evt_9") is None


async def test_alerts(pg: PostgresStorage) -> None:
    a = NewAlert("acme", "2026-01", "80%", '{"x": 1}', 5)
    pg.alerts.fire([a, NewAlert("acme", "2026-01", "100%", "{}", 6)])
    pg.alerts.fire([a])                          # queued twice: still one alert
    assert await pg.alerts.fired() == {("acme", "2026-01", "80%"), ("acme", "2026-01", "100%")}
    pg.alerts.fire([a])
    assert await pg.alerts.flush() == 0           # already fired: nothing new
    due = await pg.alerts.due(10.0)
    assert [(r.threshold, r.attempts) for r in due] == [("80%", 0), ("100%", 0)]
    first, second = due[0].id, due[1].id
    assert await pg.alerts.next_due() == 0.0
    assert await pg.alerts.claim(first, 10.0, 40.0) == 1
    assert await pg.alerts.claim(first, 10.0, 40.0) is None       # hidden until 40
    assert [r.id for r in await pg.alerts.due(10.0)] == [second]
    assert await pg.alerts.claim(first, 40.0, 70.0) == 2
    assert await pg.alerts.finish(first, "sent", None, 41)
    assert not await pg.alerts.finish(first, "dead", "late", None)
    await pg.alerts.retry_at(second, 99.0, "503")
    assert await pg.alerts.next_due() == 99.0
    assert await pg.alerts.finish(second, "dead", "gave up", None)
    dead = await pg.alerts.list_dead()
    assert [(r.id, r.attempts, r.created_at, r.last_error) for r in dead] == [
        (second, 0, 6, "gave up")]
    assert await pg.alerts.requeue([second, first]) == 1
    assert await pg.alerts.requeue([second]) == 0
    assert [(r.id, r.attempts) for r in await pg.alerts.due(0.0)] == [(second, 0)]


async def test_rules_history_and_maintenance(pg: PostgresStorage) -> None:
    assert await pg.rules.newest() is None
    assert await pg.rules.remember("v1", '[{"file": "a", "text": "x"}]', 100)
    assert not await pg.rules.remember("v1", "other", 300)
    assert await pg.rules.remember("v2", "[]", 100)
    got = await pg.rules.get("v1")
    assert got is not None and (got.files, got.first_loaded_at) == (
        '[{"file": "a", "text": "x"}]', 100)
    assert await pg.rules.get("v9") is None
    assert await pg.rules.newest() == "v2"        # same time: the later one
    assert pg.maintenance.check_file() is None
    await pg.maintenance.checkpoint_once()
    assert await pg.maintenance.integrity_check() is None


async def test_upsert_with_currency_is_one_transaction(pg: PostgresStorage) -> None:
    """A failure setting the currency (a trigger refuses it) leaves no customer behind: the
    create and the currency are one transaction."""
    async with pg.pool.acquire() as c:
        await c.execute("CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS"
                        " $$BEGIN RAISE EXCEPTION 'currency refused'; END$$")
        await c.execute("CREATE TRIGGER refuse_currency BEFORE UPDATE OF currency ON customers"
                        " FOR EACH ROW EXECUTE FUNCTION refuse()")
    with pytest.raises(Exception, match="currency refused"):
        await pg.customers.upsert("half", None, None, None, currency="eur")
    assert await pg.customers.get("half") is None
    async with pg.pool.acquire() as c:
        await c.execute("DROP TRIGGER refuse_currency ON customers")
    cust, created = await pg.customers.upsert("half", None, None, None, currency="eur")
    assert created and cust.currency == "eur"


async def test_a_write_whose_commit_answer_is_lost_is_not_called_unwritten(
        pg: PostgresStorage, pg_dsn: str) -> None:
    """The connection drops after PostgreSQL received the COMMIT but before its answer
    came back (a network cut, a pooler restart): whether the write committed is unknown.
    It must not be reported as ``StorageUnavailable`` ("nothing written, the same request
    is safe to send again": 503 + Retry-After on the admin API), or an operator's retry of
    a grant without an idempotency key grants twice."""
    from urllib.parse import urlsplit

    from proxy.errors import StorageOutcomeUnknown, StorageUnavailable
    from proxy.store.postgres.pool import PoolSettings

    real = urlsplit(pg_dsn)
    armed = False

    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                   other: asyncio.StreamWriter, watch: bool) -> None:
        nonlocal armed
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
                if watch and armed and b"COMMIT" in data:
                    armed = False
                    await asyncio.sleep(0.3)          # the server commits; its answer is lost
                    break
        finally:
            dst.close()
            other.close()

    async def relay(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection(real.hostname, real.port or 5432)
        await asyncio.gather(pump(cr, sw, cw, True), pump(sr, cw, sw, False),
                             return_exceptions=True)

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    via = await PostgresStorage.open(PoolSettings(    # the same database, through the relay
        dsn=pg_dsn.replace(f"{real.hostname}:{real.port}", f"127.0.0.1:{port}"), size=1))
    try:
        await pg.customers.upsert("acme", None, None, None)
        g = GrantState("grt_cut", "acme", 5_000_000, 50, None, int(time.time()), "admin")
        armed = True
        outcome: BaseException | None = None
        try:
            await via.ledger.create_grant(NewGrant(g))
        except Exception as exc:        # what it is, is the question
            outcome = exc
        committed = [x.id for x in (await pg.ledger.load()).grants if x.id == "grt_cut"]
        assert committed == ["grt_cut"]                       # the grant is there ...
        assert outcome is None or not isinstance(outcome, StorageUnavailable), \
            f"reported as not written ({type(outcome).__name__}: {outcome}) after it committed"
        if outcome is not None:                              # ... and said to be unknown
            assert isinstance(outcome, StorageOutcomeUnknown), repr(outcome)
            assert outcome.type == "storage_outcome_unknown"
    finally:
        await via.close()
        server.close()
