"""Operator notices (issue 12): spike alerts, the pre-renewal notice with the projected
charge, daily / weekly digests; each once, delivered as signed webhooks by the alert sender.

Usage is put in ``usage_minute`` (the table the notices read) on a real SQLite store; the
check is given the time, so a day or a period end is where the test says it is."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.alerts import SIGNATURE_HEADER, verify
from proxy.metrics import REGISTRY
from proxy.notices import (
    DAY,
    NoticeSettings,
    NoticeWatch,
    digest_window,
    is_spike,
    notice_settings,
    pre_renewal_due,
)
from proxy.pricing import Price
from proxy.store.db import Store
from proxy.store.keys import KeyCache, set_billing, upsert_customer
from proxy.store.sqlite import SqliteStorage
from tests.conftest import ProxyFactory
from tests.helpers import wait_until as until
from tests.test_alerts_sender import SECRET, fast, receiver, running, status_of

U = 1_000_000
T0 = 1_767_225_600          # 2026-01-01T00:00:00Z, a Thursday


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store.open(tmp_path / "n.db")
    s.execute_write(lambda c: upsert_customer(c, "acme", "cus_1", "bill", "active"))
    s.execute_write(lambda c: upsert_customer(c, "beta", "cus_2", "bill", "active"))
    yield s
    s.close()


def _use(store: Store, cid: str, at: int, units: int, meter: str = "api_calls") -> None:
    def tx(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO usage_minute(customer_id, key_id, meter, minute, rules_version,"
                  " quantity, requests, billable) VALUES (?,?,?,?,?,?,?,?)"
                  " ON CONFLICT(customer_id, key_id, meter, minute, rules_version) DO UPDATE"
                  " SET quantity = quantity + excluded.quantity",
                  (cid, "k", meter, at // 60 * 60, "v1", units * U, 1, units * U))
    store.execute_write(tx)


async def _watch(store: Store, **settings: object) -> NoticeWatch:
    owners = SqliteStorage.on(store)
    snap = await owners.customers.snapshot()
    keys = KeyCache()
    keys.replace(snap.keys, snap.customers)
    price = Price("usd", unit_amount_decimal=Decimal(2))      # 2 cents a call
    return NoticeWatch(owners.usage, owners.alerts, keys,
                       NoticeSettings(**settings),  # type: ignore[arg-type]
                       prices=lambda: {"api_calls": price})


def _count(kind: str) -> float:
    return REGISTRY.get_sample_value("meterproxy_notices_total", {"kind": kind}) or 0.0


# ---- pure --------------------------------------------------------------------------------

@given(st.integers(0, 10**9), st.integers(0, 10**9), st.integers(1, 30),
       st.sampled_from([1.5, 2.0, 3.0, 10.0]), st.integers(0, 10**6))
def test_spike_is_above_the_factor_times_the_average(today: int, trailing: int, days: int,
                                                     factor: float, minimum: int) -> None:
    spike = is_spike(today, trailing, days, factor, minimum)
    if trailing == 0 or today < minimum:
        assert not spike
    else:
        assert spike == (today * days > Decimal(str(factor)) * trailing)


def test_digest_windows_and_the_pre_renewal_window() -> None:
    assert digest_window("daily", T0 + 5) == (T0 - DAY, T0)
    # 2026-01-01 is a Thursday: the last complete week is Mon 2025-12-22 .. Mon 2025-12-29
    assert digest_window("weekly", T0 + 5) == (T0 - 10 * DAY, T0 - 3 * DAY)
    assert digest_window("off", T0) is None
    assert pre_renewal_due(T0, T0 - 3 * DAY, 3 * DAY)
    assert not pre_renewal_due(T0, T0 - 3 * DAY - 1, 3 * DAY)
    assert not pre_renewal_due(T0, T0, 3 * DAY)


# ---- the watch ------------------------------------------------------------------------------

async def test_spike_fires_once_per_day_and_meter(store: Store) -> None:
    for d in range(1, 8):
        _use(store, "acme", T0 - d * DAY + 3600, 100)        # 100 a day for a week
        _use(store, "beta", T0 - d * DAY + 3600, 100)
    _use(store, "acme", T0 + 3600, 250)
    _use(store, "beta", T0 + 3600, 350)
    w = await _watch(store, spike_factor=3.0, spike_min=10 * U)
    before = _count("usage.spike")
    new = await w.check(T0 + 2 * 3600)
    assert [(n["customer_id"], n["today"], n["daily_average"]) for n in new] == \
        [("beta", "350", "100")]                               # 250 is not 3 x 100
    _use(store, "beta", T0 + 3 * 3600, 500)
    assert await w.check(T0 + 4 * 3600) == []                        # once that day
    _use(store, "beta", T0 + DAY + 3600, 1000)
    assert [n["day"] for n in await w.check(T0 + DAY + 7200)] == ["2026-01-02T00:00:00Z"]
    assert _count("usage.spike") - before == 2


async def test_no_history_is_no_spike(store: Store) -> None:
    _use(store, "acme", T0 + 60, 10_000)
    assert await (await _watch(store, spike_factor=2.0)).check(T0 + 120) == []


async def test_pre_renewal_notice_projects_the_charge_once_per_period(store: Store) -> None:
    store.execute_write(lambda c: set_billing(c, "acme", T0 - 10 * DAY, 0))  # anchor: the 22nd
    end = T0 + 21 * DAY                                            # 2026-01-22
    for d in range(7):                                             # 700 a day: 4,900 a week
        _use(store, "acme", end - 3 * DAY - d * DAY - 3600, 700)
    w = await _watch(store, pre_renewal=3 * DAY)
    assert [n["customer_id"] for n in await w.check(end - 3 * DAY - 1)] == []
    [n] = await w.check(end - 3 * DAY + 60)
    assert n["type"] == "billing.pre_renewal" and n["customer_id"] == "acme"
    assert (n["period_start"], n["period_end"]) == ("2025-12-22T00:00:00Z",
                                                    "2026-01-22T00:00:00Z")
    assert n["usage"] == {"api_calls": "4900"}
    # 4,900 so far + 700 a day for the 3 days left (less the minute already gone)
    projected = Decimal(n["projected"]["api_calls"])
    assert Decimal("6999") < projected <= Decimal("7000")
    assert n["projected_charges"]["api_calls"]["currency"] == "usd"
    assert Decimal(n["projected_charges"]["api_calls"]["amount"]) == \
        (int(projected) * 2 / Decimal(100)).quantize(Decimal("0.01"))
    # beta (calendar month) is not in its window yet; acme is told once
    assert await w.check(end - DAY) == []


async def test_digests_are_delivered_signed_once(store: Store) -> None:
    _use(store, "acme", T0 - DAY + 60, 5)
    _use(store, "acme", T0 - DAY + 120, 7, meter="tokens")
    _use(store, "beta", T0 + 60, 9)                        # today: not in the digest yet
    w = await _watch(store, digest="daily")
    async with receiver(lambda _id, _n: "ok") as rec, running(fast(store, rec.url)) as sender:
        w.on_new = sender.wake
        [n] = await w.check(T0 + 600)
        assert n == {"type": "usage.digest", "customer_id": "acme", "digest": "daily",
                     "from": "2025-12-31T00:00:00Z", "to": "2026-01-01T00:00:00Z",
                     "usage": {"api_calls": "5", "tokens": "7"}}
        assert await w.check(T0 + 1200) == []
        await until(lambda: set(status_of(store).values()) == {"sent"}, what="sent")
    [(_, body, headers)] = rec.delivered
    assert json.loads(body) == n
    assert verify(SECRET, headers[SIGNATURE_HEADER], body)


async def test_the_proxy_runs_the_notices_from_its_config(make_proxy: ProxyFactory) -> None:
    """Wiring: ``alerts.pre_renewal`` longer than any month is always due, so a customer is
    told once, through the alert sender (logged here: no webhook URL)."""
    p = await make_proxy(alerts={"pre_renewal": "40d", "notice_interval": "50ms"})
    await p.admin("POST", "/admin/customers", {"id": "acme"})
    snap = await p.server.rt.owners().customers.snapshot()
    p.server.rt.keys.replace(snap.keys, snap.customers)

    def told() -> list[tuple[str, str]]:
        with p.db() as c:
            return [(t, s) for t, s in c.execute(
                "SELECT threshold, status FROM alerts WHERE customer_id='acme'")]

    await until(lambda: told() == [("pre_renewal", "logged")], what="the notice")
    assert notice_settings(p.server.rt.cfg.alerts) == NoticeSettings(pre_renewal=40 * DAY)
