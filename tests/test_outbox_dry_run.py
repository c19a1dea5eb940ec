"""Outbox staging and the flusher with the dry-run sink: whole units out, fractions carried."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from proxy.store.db import connect
from proxy.store.outbox import split_whole, stage
from proxy.units import QSCALE, fmt_micro
from tests.conftest import TEST_RULES, ProxyFactory

FRACTION_RULES = TEST_RULES.replace(
    "  - name: everything-else",
    "  - name: fractional\n"
    "    match: {path: /v1/items, query: {frac: \"*\"}}\n"
    "    usage:\n"
    "      - {meter: units, quantity: 0.4}\n"
    "  - name: everything-else")


async def test_fractions_are_carried_never_rounded_away(make_proxy: ProxyFactory) -> None:
    p = await make_proxy(rules_text=FRACTION_RULES)
    key = await p.customer_with_key("f", stripe_customer_id="cus_f")
    h = {"Authorization": f"Bearer {key}"}
    reported = 0
    total_requests = 0
    for batch in (7, 3, 1, 1, 1, 1, 1, 5):
        for _ in range(batch):
            async with p.session.get(p.url + "/v1/items?frac=1", headers=h) as r:
                assert r.status == 200
        total_requests += batch
        rep = await p.admin("POST", "/admin/flush", expect=200)
        assert rep["dead"] == 0 and rep["retrying"] == 0
        with p.db() as c:
            (reported,) = c.execute("SELECT COALESCE(SUM(value), 0) FROM outbox WHERE"
                                    " customer_id='f' AND status='dry_run'").fetchone()
        # the sum reported after N flushes is floor of the total; the rest is carried
        assert reported == (total_requests * 4) // 10
        detail = await p.admin("GET", "/admin/customers/f", expect=200)
        rem = detail["unreported_remainder"].get("units:units", "0")
        assert rem == fmt_micro(total_requests * 400_000 - reported * QSCALE)
    sink = p.server.flusher.sink
    assert sum(e.value for e in sink.sent) == reported == 8
    assert len({e.identifier for e in sink.sent}) == len(sink.sent)


async def test_customer_without_stripe_id_is_dead_lettered_and_replayable(
        make_proxy: ProxyFactory) -> None:
    p = await make_proxy()
    key = await p.customer_with_key("nostripe")
    async with p.session.get(p.url + "/v1/items", headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200
    rep = await p.admin("POST", "/admin/flush", expect=200)
    assert rep["dead"] == 1
    dead = (await p.admin("GET", "/admin/dead-letters", expect=200))["dead_letters"]
    assert len(dead) == 1 and "stripe_customer_id" in dead[0]["reason"]
    metrics = await p.admin("GET", "/metrics", expect=200)
    assert "meterproxy_dead_letters 1.0" in metrics
    await p.admin("POST", "/admin/customers", {"id": "nostripe", "stripe_customer_id": "cus_9"},
                  expect=200)
    out = await p.admin("POST", f"/admin/dead-letters/{dead[0]['id']}/replay", expect=200)
    assert out["replayed"]["status"] == "dry_run"     # logged by the dry-run sink, not sent
    assert (await p.admin("GET", "/admin/dead-letters", expect=200))["dead_letters"] == []
    await p.admin("POST", "/admin/dead-letters/999/replay", expect=404)


@given(st.lists(st.integers(min_value=0, max_value=5 * QSCALE), min_size=1, max_size=40),
       st.integers(min_value=1, max_value=6))
def test_staging_reports_floor_of_total_in_any_flush_pattern(amounts: list[int],
                                                             every: int) -> None:
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        conn = connect(Path(d) / "o.db")
        conn.execute("INSERT INTO customers(id, stripe_customer_id, created_at, updated_at)"
                     " VALUES ('c', 'cus', 0, 0)")
        names = {"m": ("m", None)}
        sent = 0
        for i, a in enumerate(amounts):
            conn.execute(
                "INSERT INTO usage_minute(customer_id, key_id, meter, minute, rules_version,"
                " quantity, requests, billable) VALUES ('c','k','m',?, 'v', ?, 1, ?)"
                " ON CONFLICT DO UPDATE SET quantity=quantity+excluded.quantity,"
                " billable=billable+excluded.billable", (60 * (i // 3), a, a))
            if i % every == 0:
                conn.execute("BEGIN")
                sent += sum(e.value for e in stage(conn, names))
                conn.execute("COMMIT")
        conn.execute("BEGIN")
        sent += sum(e.value for e in stage(conn, names))
        conn.execute("COMMIT")
        (rem,) = conn.execute("SELECT remainder FROM carry").fetchone() or (0,)
        assert sent == sum(amounts) // QSCALE
        assert sent * QSCALE + rem == sum(amounts)
        ids = [r[0] for r in conn.execute("SELECT identifier FROM outbox")]
        assert len(ids) == len(set(ids))
        conn.close()


def test_split_whole() -> None:
    assert split_whole(2_800_000) == (2, 800_000)
    assert split_whole(0) == (0, 0)
