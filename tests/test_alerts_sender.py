"""Credit-alert delivery (proxy.alerts) against a real aiohttp receiver on loopback.

Rows are inserted the way the detector does (INSERT OR IGNORE into ``alerts``); the sender
runs as a real background task on a real SQLite store. No fixed sleeps: tests wait on
conditions with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import sqlite3
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from proxy.alerts import (
    ALERT_ID_HEADER,
    SIGNATURE_HEADER,
    AlertSender,
    list_dead,
    requeue,
    sign,
    signature_header,
    verify,
)
from proxy.metrics import REGISTRY
from proxy.store.alerts import SqliteAlerts
from proxy.store.db import Store
from proxy.tasks import cancel_and_wait, spawn
from tests.helpers import wait_until
from tests.servers import serve

SECRET = "whsec_test_secret"


def fast(store: Store, url: str, max_attempts: int = 8, timeout: float = 2.0) -> AlertSender:
    """A sender with tiny backoff delays."""
    return AlertSender(store, url, SECRET, max_attempts=max_attempts, timeout=timeout,
                       base_delay=0.01, max_delay=0.05)


# ---- helpers ---------------------------------------------------------------------------------

def delivered_at_least(rec: Receiver, n: int) -> bool:
    return len(rec.delivered) >= n


def counter(outcome: str) -> float:
    return REGISTRY.get_sample_value("meterproxy_alerts_total", {"outcome": outcome}) or 0.0


def insert_alert(store: Store, customer: str, threshold: str, payload: str,
                 period: str = "2025-01") -> int:
    def tx(conn: sqlite3.Connection) -> int:
        conn.execute("INSERT OR IGNORE INTO alerts(customer_id, period_key, threshold, payload,"
                     " created_at) VALUES (?,?,?,?,?)",
                     (customer, period, threshold, payload, int(time.time())))
        (i,) = conn.execute("SELECT id FROM alerts WHERE customer_id=? AND period_key=? AND"
                            " threshold=?", (customer, period, threshold)).fetchone()
        return int(i)
    return int(store.execute_write(tx))


def rows(store: Store) -> dict[int, tuple[str, int, str | None, int | None]]:
    return {i: (s, a, e, t) for i, s, a, e, t in store.conn.execute(
        "SELECT id, status, attempts, last_error, sent_at FROM alerts")}


def status_of(store: Store) -> dict[int, str]:
    return {i: r[0] for i, r in rows(store).items()}


# deliberately odd formatting and non-ASCII: the bytes on the wire must be the stored bytes
PAYLOADS = [
    '{"type":"credits.threshold","customer":"c1","threshold":"50%",  "note":"caf\u00e9"}',
    '{"type": "credits.threshold", "customer": "c1", "threshold": "75%"}',
    '{"type":"credits.depleted","customer":"c2","threshold":"depleted"}',
]


@dataclass
class Receiver:
    """A webhook endpoint. ``script(alert_id, call_no)`` -> "ok" | "500" | "drop" |
    "hang" (answer ok once released) | "stall" (wait for release, then never count)."""

    script: Callable[[int, int], str]
    url: str = ""
    calls: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    delivered: list[tuple[int, bytes, dict[str, str]]] = field(default_factory=list)
    order: list[int] = field(default_factory=list)
    in_flight: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    max_in_flight: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        alert_id = int(request.headers[ALERT_ID_HEADER])
        body = await request.read()
        self.calls[alert_id] += 1
        self.order.append(alert_id)
        self.in_flight[alert_id] += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight[alert_id])
        try:
            action = self.script(alert_id, self.calls[alert_id])
            if action in ("hang", "stall"):
                await self.release.wait()
                if action == "stall":  # the client gave up long ago: not a delivery
                    return web.Response(status=504)
                action = "ok"
            if action == "500":
                return web.Response(status=500, text="receiver broke")
            if action == "drop":
                assert request.transport is not None
                request.transport.abort()      # the client sees the connection drop
                return web.Response(status=200)  # never reaches the wire
            self.delivered.append((alert_id, body, dict(request.headers)))
            return web.json_response({"ok": True})
        finally:
            self.in_flight[alert_id] -= 1


@contextlib.asynccontextmanager
async def receiver(script: Callable[[int, int], str]) -> AsyncIterator[Receiver]:
    rec = Receiver(script)
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    async with serve(app, shutdown_timeout=0.5) as url:
        rec.url = f"{url}/hook"
        try:
            yield rec
        finally:
            rec.release.set()


@contextlib.asynccontextmanager
async def running(sender: AlertSender) -> AsyncIterator[AlertSender]:
    await sender.start()
    task = spawn("alert-sender-test", sender.run())
    try:
        yield sender
    finally:
        await cancel_and_wait(task)
        await sender.close()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store.open(tmp_path / "a.db")
    yield s
    s.close()


# ---- signature scheme -------------------------------------------------------------------------

def test_signature_is_the_documented_scheme() -> None:
    body = b'{"a":1}'
    expected = hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign(SECRET, 1700000000, body) == expected
    assert signature_header(SECRET, 1700000000, body) == f"t=1700000000,v1={expected}"


def test_verify_accepts_good_and_rejects_bad() -> None:
    body = b'{"customer":"c1","threshold":"90%"}'
    t = 1_700_000_000
    header = signature_header(SECRET, t, body)
    assert verify(SECRET, header, body, now=t)
    assert verify(SECRET, header, body, now=t + 299)
    assert verify(SECRET, header, body, tolerance=None, now=t + 10**6)
    assert verify(SECRET, header.replace(",", ", "), body, now=t)          # spaces tolerated
    assert not verify(SECRET, header, body + b" ", now=t)                 # tampered body
    assert not verify(SECRET, header, body.replace(b"90", b"50"), now=t)
    assert not verify("whsec_other", header, body, now=t)                 # wrong secret
    assert not verify(SECRET, header, body, now=t + 301)                  # stale
    assert not verify(SECRET, header, body, now=t - 301)                  # from the future
    forged_t = header.replace(f"t={t}", f"t={t + 5}")                     # timestamp is signed
    assert not verify(SECRET, forged_t, body, now=t)
    for bad in ("", "garbage", f"t={t}", "v1=" + sign(SECRET, t, body), f"t=abc,v1={'0' * 64}",
                f"t={t},v0={sign(SECRET, t, body)}"):
        assert not verify(SECRET, bad, body, now=t), bad
    # several v1 values (secret rotation): any one matching is enough
    rotated = f"t={t},v1={sign('old', t, body)},v1={sign(SECRET, t, body)}"
    assert verify(SECRET, rotated, body, now=t)
    assert verify("old", rotated, body, now=t)
    assert not verify("neither", rotated, body, now=t)


# ---- delivery -----------------------------------------------------------------------------------

async def test_flaky_receiver_gets_each_alert_exactly_once(store: Store) -> None:
    """Acceptance: a receiver that fails twice (500, then a dropped connection) then
    succeeds gets each alert exactly once, and the signature verifies."""
    script = {1: "500", 2: "drop"}
    sent0, retry0 = counter("sent"), counter("retry")
    ids = [insert_alert(store, f"c{i}", f"t{i}", p) for i, p in enumerate(PAYLOADS)]
    async with receiver(lambda _id, n: script.get(n, "ok")) as rec, \
            running(fast(store, rec.url, max_attempts=5)) as sender:
        sender.wake()
        await wait_until(lambda: set(status_of(store).values()) == {"sent"}, what="all sent")
    assert sorted(a for a, _, _ in rec.delivered) == ids          # once each
    assert dict(rec.calls) == {i: 3 for i in ids}
    assert rec.order[:3] == ids                                    # first round in id order
    assert rec.max_in_flight == 1
    for (alert_id, body, headers), payload in zip(sorted(rec.delivered), PAYLOADS, strict=True):
        assert body == payload.encode("utf-8")                     # byte for byte
        assert json.loads(body)
        assert verify(SECRET, headers[SIGNATURE_HEADER], body)
        assert not verify("wrong", headers[SIGNATURE_HEADER], body)
        assert headers["Content-Type"] == "application/json"
        assert headers["User-Agent"] == "meterproxy"
        assert headers[ALERT_ID_HEADER] == str(alert_id)
    for status, attempts, err, sent_at in rows(store).values():
        assert (status, attempts) == ("sent", 3) and sent_at is not None
        assert err is not None and "Disconnected" in err          # the 2nd failure was a drop
    assert counter("sent") - sent0 == 3
    assert counter("retry") - retry0 == 6


async def test_always_failing_receiver_dead_letters_then_requeue(store: Store) -> None:
    healthy = False
    dead0 = counter("dead")
    alert_id = insert_alert(store, "c1", "90%", PAYLOADS[0])
    async with receiver(lambda _id, _n: "ok" if healthy else "500") as rec, \
            running(fast(store, rec.url, max_attempts=3)) as sender:
        sender.wake()
        await wait_until(lambda: status_of(store)[alert_id] == "dead", what="dead letter")
        _status, attempts, err, sent_at = rows(store)[alert_id]
        assert attempts == 3 and sent_at is None
        assert err is not None and "HTTP 500" in err and "receiver broke" in err
        assert rec.calls[alert_id] == 3 and not rec.delivered
        assert counter("dead") - dead0 == 1
        assert [d["id"] for d in await list_dead(SqliteAlerts(store))] == [alert_id]
        # no further calls once dead, even when woken
        sender.wake()
        await sender.deliver_due()
        assert rec.calls[alert_id] == 3
        # the admin replays it after the receiver is fixed
        healthy = True
        assert await requeue(SqliteAlerts(store), [alert_id]) == 1
        sender.wake()
        await wait_until(lambda: status_of(store)[alert_id] == "sent", what="replayed")
    assert len(rec.delivered) == 1 and await list_dead(SqliteAlerts(store)) == []


async def test_connection_refused_and_timeout_are_retried(store: Store) -> None:
    a = insert_alert(store, "c1", "50%", PAYLOADS[0])
    # nothing listens on this port (bind, then close)
    async with receiver(lambda _id, _n: "ok") as rec:
        dead_url = rec.url
    async with running(fast(store, dead_url, max_attempts=2)) as sender:
        sender.wake()
        await wait_until(lambda: status_of(store)[a] == "dead", what="dead (refused)")
    assert "Connect" in (rows(store)[a][2] or "")
    b = insert_alert(store, "c2", "50%", PAYLOADS[1])
    async with receiver(lambda _id, n: "stall" if n == 1 else "ok") as rec, \
            running(fast(store, rec.url, max_attempts=3, timeout=0.2)) as sender:
        sender.wake()
        await wait_until(lambda: status_of(store)[b] == "sent", what="sent after timeout")
        assert rows(store)[b][1] == 2
        assert "timeout" in (rows(store)[b][2] or "")              # last_error kept
    assert [x for x, _, _ in rec.delivered] == [b]


async def test_empty_url_logs_and_marks_logged(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    logged0 = counter("logged")
    ids = [insert_alert(store, "c1", t, p) for t, p in zip(("50%", "75%"), PAYLOADS, strict=False)]
    caplog.set_level(logging.INFO, logger="meterproxy.alerts")
    async with running(fast(store, "")) as sender:
        assert sender._session is None
        sender.wake()
        await wait_until(lambda: set(status_of(store).values()) == {"logged"}, what="logged")
    assert counter("logged") - logged0 == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for i, p in zip(ids, PAYLOADS, strict=False):
        assert any(f"alert {i} " in m and p in m for m in warnings)
    assert all(r[1] == 0 for r in rows(store).values())               # never retried


async def test_no_alert_is_sent_twice_at_once(store: Store) -> None:
    """Two senders on one database (e.g. two workers) plus overlapping cycles: each alert
    is claimed by exactly one call."""
    ids = [insert_alert(store, f"c{i}", "50%", p) for i, p in enumerate(PAYLOADS)]
    async with receiver(lambda _id, _n: "hang") as rec:
        s1 = fast(store, rec.url)
        s2 = fast(store, rec.url)
        async with running(s1), running(s2):
            s1.wake()
            s2.wake()
            extra = spawn("overlap", s1.deliver_due())
            await wait_until(lambda: sum(rec.calls.values()) >= 1, what="first call")
            rec.release.set()
            await wait_until(lambda: set(status_of(store).values()) == {"sent"}, what="all sent")
            await extra
    assert dict(rec.calls) == {i: 1 for i in ids}
    assert rec.max_in_flight == 1


async def test_detector_wake_delivers_new_rows_promptly(store: Store) -> None:
    async with receiver(lambda _id, _n: "ok") as rec, \
            running(fast(store, rec.url)) as sender:
        for i, p in enumerate(PAYLOADS):
            insert_alert(store, "c1", f"t{i}", p)
            # a duplicate crossing is ignored by the UNIQUE constraint: still one row
            insert_alert(store, "c1", f"t{i}", p)
            sender.wake()
            await wait_until(functools.partial(delivered_at_least, rec, i + 1), timeout=5.0,
                             what="delivery")
    assert [b for _, b, _ in rec.delivered] == [p.encode() for p in PAYLOADS]
