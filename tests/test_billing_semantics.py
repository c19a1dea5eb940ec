"""Billing semantics (docs/billing-semantics.md): a rule's transform rounds the period total
once, hourly windows never cross a billing-period boundary, audit retention outlives a
dispute."""

from __future__ import annotations

import csv
import io
import math
import sqlite3
import time
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import StorageConfig
from proxy.periods import period_bounds
from proxy.pricing import TransformQuantity
from proxy.rules import RulesError, load_rules
from proxy.rules.quantity import Measurement, compute
from proxy.store.db import UsageItem, UsageRow, connect
from proxy.store.outbox import stage
from proxy.timeutil import rfc3339
from proxy.tools.simulate import AuditRow, rerate
from proxy.transform import transformed_delta, transformed_units
from proxy.units import QSCALE
from tests.conftest import TEST_RULES, ProxyFactory

GB_UP = TransformQuantity(1_000_000_000, "up")
GB_DOWN = TransformQuantity(1_000_000_000, "down")
GB = 1_000_000_000 * QSCALE          # one GB of bytes, in micro-units

GB_RULES = TEST_RULES.replace(
    "  units: {stripe_event_name: units}\n",
    "  units: {stripe_event_name: units}\n"
    "  gb: {stripe_event_name: gb_uploaded}\n").replace(
    "  - name: upload\n",
    "  - name: upload-gb\n"
    "    match: {methods: [POST], path: /v1/upload, query: {gb: \"*\"}}\n"
    "    usage:\n"
    "      - {meter: gb, quantity: request.bytes, transform: {divide_by: 1000000000, round: up}}\n"
    "  - name: upload\n")


# ---- the pure functions ---------------------------------------------------------------------

def test_transformed_units_at_the_boundaries() -> None:
    assert transformed_units(0, GB_UP) == 0
    assert transformed_units(-5, GB_UP) == 0
    assert transformed_units(1, GB_UP) == 1              # one micro-byte rounds up to 1 GB
    assert transformed_units(1, GB_DOWN) == 0
    assert transformed_units(GB, GB_UP) == 1
    assert transformed_units(GB, GB_DOWN) == 1
    assert transformed_units(GB + 1, GB_UP) == 2
    assert transformed_units(GB + 1, GB_DOWN) == 1
    assert transformed_units(2 * GB - 1, GB_DOWN) == 1
    assert transformed_delta(GB - QSCALE, GB, GB_UP) == 0       # the last byte of the 1st GB
    assert transformed_delta(GB, GB + QSCALE, GB_UP) == 1       # the 1st byte of the 2nd GB


@given(st.integers(0, 10**15), st.integers(1, 10**10), st.sampled_from(["up", "down"]))
def test_transformed_units_is_exact_ceil_or_floor(total: int, div: int, rnd: str) -> None:
    t = TransformQuantity(div, "up" if rnd == "up" else "down")
    exact = Fraction(total, QSCALE) / div
    assert transformed_units(total, t) == (math.ceil(exact) if rnd == "up" else math.floor(exact))


@given(st.lists(st.integers(0, 5 * 10**9 * QSCALE), max_size=60), st.integers(1, 10**10),
       st.sampled_from(["up", "down"]))
def test_deltas_sum_to_the_transformed_period_total(increments: list[int], div: int,
                                                    rnd: str) -> None:
    t = TransformQuantity(div, "up" if rnd == "up" else "down")
    total, sent = 0, 0
    for inc in increments:
        d = transformed_delta(total, total + inc, t)
        assert d >= 0
        sent += d
        total += inc
    assert sent == transformed_units(total, t)


# ---- finding 3: 1,000 one-byte uploads on a per-GB round-up bill 1 GB --------------------------

def _db(tmp: Path) -> sqlite3.Connection:
    conn = connect(tmp / "b.db")
    conn.execute("INSERT INTO customers(id, stripe_customer_id, created_at, updated_at)"
                 " VALUES ('c', 'cus', 0, 0)")
    return conn


def _record(conn: sqlite3.Connection, meter: str, minute: int, micro: int) -> None:
    conn.execute(
        "INSERT INTO usage_minute(customer_id, key_id, meter, minute, rules_version,"
        " quantity, requests, billable) VALUES ('c','k',?,?,'v',?,1,?)"
        " ON CONFLICT DO UPDATE SET quantity=quantity+excluded.quantity,"
        " billable=billable+excluded.billable, requests=requests+1", (meter, minute, micro, micro))


def _stage(conn: sqlite3.Connection, now: float, **transforms: TransformQuantity
           ) -> list[tuple[int, int, int]]:
    conn.execute("BEGIN")
    out = stage(conn, {"gb": ("gb", None)}, now=now, transforms=transforms)
    conn.execute("COMMIT")
    return [(e.value, e.window_start, e.timestamp) for e in out]


def test_thousand_one_byte_uploads_bill_one_gb(tmp_path: Path) -> None:
    rules = load_rules([_write(tmp_path, GB_RULES)])
    rule = next(r for r in rules.rules if r.name == "upload-gb")
    assert rules.meters["gb"].transform == GB_UP
    conn = _db(tmp_path)
    base = 1_800_000_000 - 1_800_000_000 % 86400     # a midnight, far from any period edge
    sent = 0
    for i in range(1000):
        m = Measurement(status=200, request_headers={}, response_headers={}, query={},
                        path_params={}, request_json=None, response_body=None,
                        request_bytes=1, response_bytes=0, duration_ms=Decimal(1))
        (q,) = compute(rule, m)
        assert q.micro == QSCALE                      # one raw byte, not one rounded GB
        _record(conn, "gb", base + 60 * (i // 10), q.micro)
        if i % 97 == 0:
            sent += sum(v for v, _, _ in _stage(conn, base + 86399, gb=GB_UP))
    sent += sum(v for v, _, _ in _stage(conn, base + 86399, gb=GB_UP))
    assert sent == 1
    conn.close()


def _write(tmp: Path, text: str) -> Path:
    p = tmp / "rules.yaml"
    p.write_text(text)
    return p


def test_one_meter_cannot_have_two_transforms(tmp_path: Path) -> None:
    text = GB_RULES.replace(
        "  - name: upload\n",
        "  - name: upload-gb-down\n"
        "    match: {methods: [PUT], path: /v1/upload}\n"
        "    usage:\n"
        "      - {meter: gb, quantity: request.bytes,"
        " transform: {divide_by: 1000000000, round: down}}\n"
        "  - name: upload\n")
    with pytest.raises(RulesError) as err:
        load_rules([_write(tmp_path, text)])
    (problem,) = err.value.problems
    assert "meter 'gb' has a different transform here than at" in problem.message
    assert "every usage of one meter must use the same one" in problem.message


async def test_proxy_reports_and_shows_the_rounded_period_total(
        make_proxy: ProxyFactory) -> None:
    p = await make_proxy(rules_text=GB_RULES)
    key = await p.customer_with_key("up", stripe_customer_id="cus_up")
    h = {"Authorization": f"Bearer {key}"}
    for batch in (7, 13):
        for _ in range(batch):
            async with p.session.post(p.url + "/v1/upload?gb=1", data=b"x", headers=h) as r:
                assert r.status == 200
        rep = await p.admin("POST", "/admin/flush", expect=200)
        assert rep["dead"] == 0 and rep["retrying"] == 0
    with p.db() as c:
        rows = c.execute("SELECT value, event_name FROM outbox WHERE customer_id='up'"
                         " AND meter='gb'").fetchall()
        (raw,) = c.execute("SELECT SUM(quantity) FROM usage_minute WHERE customer_id='up'"
                           " AND meter='gb'").fetchone()
    assert rows == [(1, "gb_uploaded")]               # 20 bytes on a per-GB round-up: 1 GB
    assert raw == 20 * QSCALE
    async with p.session.get(p.url + "/_meter/usage", headers=h) as r:
        assert r.status == 200
        usage = await r.json()
    gb = usage["meters"]["gb"]
    assert (gb["quantity"], gb["billable"], gb["billable_units"]) == ("20", "1", 1)


# ---- finding 9 (part): an hour cut at a mid-hour anchor -----------------------------------------

def _ts(*a: int) -> int:
    return int(datetime(*a, tzinfo=UTC).timestamp())


def test_hour_is_cut_at_a_half_past_anchor(tmp_path: Path) -> None:
    conn = _db(tmp_path)
    anchor = _ts(2026, 1, 15, 12, 30)
    conn.execute("UPDATE customers SET billing_anchor=? WHERE id='c'", (anchor,))
    boundary = _ts(2026, 3, 15, 12, 30)           # the March period starts here
    _record(conn, "gb", _ts(2026, 3, 15, 12, 10), 3 * QSCALE)
    _record(conn, "gb", _ts(2026, 3, 15, 12, 29), 2 * QSCALE)
    _record(conn, "gb", _ts(2026, 3, 15, 12, 30), 4 * QSCALE)
    _record(conn, "gb", _ts(2026, 3, 15, 12, 50), QSCALE)
    events = _stage(conn, boundary + 3600)
    hour = _ts(2026, 3, 15, 12)
    assert events == [(5, hour, boundary - 1),              # February's invoice
                      (5, boundary, _ts(2026, 3, 15, 12, 50, 59))]    # March's
    conn.close()


def test_transformed_total_restarts_with_the_period(tmp_path: Path) -> None:
    conn = _db(tmp_path)
    conn.execute("UPDATE customers SET billing_anchor=? WHERE id='c'",
                 (_ts(2026, 1, 15, 12, 30),))
    boundary = _ts(2026, 3, 15, 12, 30)
    _record(conn, "gb", _ts(2026, 3, 15, 12, 20), QSCALE)        # 1 byte in February
    assert [v for v, _, _ in _stage(conn, boundary - 60, gb=GB_UP)] == [1]
    _record(conn, "gb", _ts(2026, 3, 15, 12, 25), QSCALE)        # same period: no new GB
    _record(conn, "gb", _ts(2026, 3, 15, 12, 40), QSCALE)        # 1 byte in March: 1 GB
    assert [(v, w) for v, w, _ in _stage(conn, boundary + 3600, gb=GB_UP)] == [(1, boundary)]
    conn.close()


async def test_an_anchor_with_seconds_every_view_of_the_period_agrees(
        make_proxy: ProxyFactory) -> None:
    """README "Disputes": per meter, an export's ``billable`` sums to the period's invoice
    line. With a Stripe anchor at hh:mm:15 the minute hh:mm:00 is the old period's (staging
    bills it there), so the admin usage, the consumer report, the staged outbox and the
    exports (admin and consumer, default range or the exact period start) all leave it out."""
    p = await make_proxy()
    now = time.time()
    anchor = int(now - 7200) // 60 * 60 + 15          # two hours ago, hh:mm:15
    key = await p.customer_with_key("sec", stripe_customer_id="cus_sec",
                                    billing_anchor=rfc3339(anchor))
    start, end = period_bounds(anchor, now)
    assert start == anchor
    minute = anchor - 15                               # the boundary minute, hh:mm:00
    store = p.server.rt.store
    for rid, at, units in (("before", minute + 5, 3), ("same-minute", minute + 40, 2),
                           ("later", anchor + 600, 1)):
        fut = store.record(UsageRow(rid, at, "sec", "k", "everything-else", "v", 200,
                                    [UsageItem("api_calls", units * QSCALE, 0, units * QSCALE)],
                                    method="GET", path="/v1/x"), wait=True)
        assert fut is not None
        await fut
    await store.catch_up()

    usage = await p.admin("GET", "/admin/customers/sec/usage", expect=200)
    assert usage["meters"] == {"api_calls": "1"}
    prev = await p.admin("GET", f"/admin/customers/sec/usage?from={rfc3339(start - 86400 * 27)}"
                         f"&to={rfc3339(start)}", expect=200)
    assert prev["meters"] == {"api_calls": "5"}
    h = {"Authorization": f"Bearer {key}"}
    async with p.session.get(p.url + "/_meter/usage", headers=h) as r:
        assert r.status == 200
        report = await r.json()
    assert report["meters"]["api_calls"]["billable"] == "1"

    def billable(rows: list[dict[str, str]]) -> Decimal:
        return sum((Decimal(r["billable"]) for r in rows), Decimal(0))

    exports = {
        "admin": await p.admin("GET", "/admin/customers/sec/events?format=json", expect=200),
        "admin exact": await p.admin(
            "GET", f"/admin/customers/sec/events?format=json&from={rfc3339(start)}", expect=200)}
    for name, body in exports.items():
        assert [r["request_id"] for r in body["requests"]] == ["later"], name
        assert billable(body["requests"]) == 1, name
    for q in ("", f"?from={rfc3339(start)}&to={rfc3339(end)}"):
        async with p.session.get(p.url + "/_meter/events.csv" + q, headers=h) as r:
            assert r.status == 200
            rows = list(csv.DictReader(io.StringIO(await r.text())))
        assert [r["request_id"] for r in rows] == ["later"] and billable(rows) == 1, q

    rep = await p.admin("POST", "/admin/flush", expect=200)
    assert rep["dead"] == 0
    with p.db() as c:
        staged = c.execute("SELECT timestamp, value FROM outbox WHERE customer_id='sec'"
                           " AND covered=0").fetchall()
    in_period = sum(v for ts, v in staged if start <= ts < end)
    assert in_period == 1 and sum(v for _, v in staged) == 6


# ---- finding 11 (part): audit retention covers a dispute ----------------------------------------

def test_audit_retention_default_covers_the_dispute_window() -> None:
    # 120 days to dispute + one period to the charge + 21 to respond + 75 for the decision
    assert StorageConfig().audit_retention == 400 * 86400
    assert StorageConfig().audit_retention >= (120 + 31 + 21 + 75) * 86400


def test_rerate_prices_the_transformed_period_total(tmp_path: Path) -> None:
    text = GB_RULES.replace(
        "  gb: {stripe_event_name: gb_uploaded}\n",
        "  gb:\n    stripe_event_name: gb_uploaded\n"
        "    price: {currency: usd, unit_amount: 25}\n")
    rules = load_rules([_write(tmp_path, text)])
    rows = [AuditRow(f"r{i}", 1000 + i, "c1", "upload-gb", rules.version, 200, "gb", QSCALE,
                     QSCALE, "POST", "/v1/upload") for i in range(1000)]
    c = rerate(rows, rules, rules).customers["c1"]
    assert c.old_billable == c.new_billable == {"gb": 1000 * QSCALE}     # 1,000 raw bytes
    assert c.old_charges == c.new_charges == {"gb": 25}                 # 1 GB at 25 cents
