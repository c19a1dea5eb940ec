"""``WebhookReceiver`` on the PostgreSQL owners must not turn a transient database outage
into a permanently ``failed`` event.

``WebhookReceiver.process`` (proxy/webhooks.py) re-raises ``sqlite3.Error`` (the event stays
``pending`` and ``drain`` retries it) and records every other exception as ``failed``. The
PostgreSQL owners raise ``PgUnavailable``, not ``sqlite3.Error``, so a connection cut while
an ``invoice.paid`` is processed marks it ``failed``; ``drain`` only picks up ``pending`` and
``waiting_customer``, so the paid credits are never granted unless an operator replays the
event. Storage-unavailable errors of every backend (``webhooks.STORE_DOWN``) now leave the
event pending, and intake answers 503 for them. (Found by review; failed before the fix.)
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import orjson

from proxy.config import Config
from proxy.credits.service import CreditService, load_book
from proxy.store.db import Store
from proxy.store.keys import KeyCache
from proxy.store.postgres.customers import PostgresCustomers
from proxy.store.postgres.pool import PgPool, PoolSettings
from proxy.store.postgres.storage import PostgresStorage
from proxy.webhooks import WebhookReceiver
from tests.fleet.conftest import via_relay
from tests.fleet.tcp_cut import CuttableRelay


async def test_an_outage_while_processing_leaves_the_event_to_retry(
        pg: PostgresStorage, pg_dsn: str, relay: CuttableRelay, tmp_path: Path) -> None:
    await pg.customers.upsert("acme", "cus_acme", None, None)
    cfg = Config.model_validate({"admin": {"token": "t" * 32},
                                 "stripe": {"webhook_secret": "whsec_review"},
                                 "credits": {"packs": {"price_pack": {"credits": "100"}}}})
    event = {"id": "evt_1", "object": "event", "type": "invoice.paid",
             "created": int(time.time()),
             "data": {"object": {"id": "in_1", "object": "invoice", "customer": "cus_acme",
                                 "amount_paid": 1000,
                                 "lines": {"object": "list", "has_more": False, "data": [
                                     {"object": "line_item", "price": {"id": "price_pack"},
                                      "quantity": 1, "proration": False}]}}}}
    assert await pg.webhooks.record("evt_1", "invoice.paid", event["created"],
                                    orjson.dumps(event).decode(), int(time.time()))
    via = via_relay(relay.port, pg_dsn)
    cut_pool = PgPool(PoolSettings(dsn=via, size=2, connect_timeout=1.0, command_timeout=1.0))
    await cut_pool.open(run_migrations=False)
    store = Store.open(tmp_path / "unused.db")
    try:
        credits = CreditService(store, load_book(await pg.ledger.load()), pg.ledger)
        receiver = WebhookReceiver(store, KeyCache(), credits, cfg, events=pg.webhooks,
                                   customers=PostgresCustomers(cut_pool))
        relay.cut()                  # the customers lookup's connection goes away
        with contextlib.suppress(Exception):     # SQLite's storage errors propagate
            await receiver.drain()
        relay.restore()
        await receiver.drain()       # the database is back: the event is processed now
        stored = await pg.webhooks.get("evt_1")
        assert stored is not None
        assert stored.status == "processed", stored.result
        assert await pg.ledger.has_grant("acme", "stripe:in_1:price_pack")
    finally:
        store.close()
        await cut_pool.close()
