"""Reconciliation against the Stripe double with the real SDK, the real flusher and sink,
and a real Store on a tmp file. The pure hour comparison has property tests."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge

from proxy.admin.reconcile import RECONCILE_GRACE, RECONCILER, parse_grace, reconcile_routes
from proxy.flusher import Flusher
from proxy.reconcile import (
    HOUR,
    InvalidRange,
    ReconcileMetrics,
    Reconciler,
    ReconcileRefused,
    align_down,
    compare,
    discrepancy_rate,
)
from proxy.store.db import Store
from proxy.store.sqlite import SqliteStorage
from proxy.stripe.client import StripeClient
from proxy.stripe.meter_events import MeterEventsSink
from tests.stripe_double.fixture import TEST_API_KEY, RunningDouble

GRACE = 3600.0


@dataclass
class Env:
    double: RunningDouble
    store: Store
    flusher: Flusher
    rec: Reconciler
    names: dict[str, tuple[str, str | None]]
    conns: list[StripeClient]

    @property
    def now(self) -> float:
        return self.double.state.now()

    def customer(self, cid: str, stripe_id: str | None) -> None:
        self.store.execute_write(lambda c: c.execute(
            "INSERT INTO customers(id, stripe_customer_id, created_at, updated_at)"
            " VALUES (?,?,0,0)", (cid, stripe_id)))

    def row(self, cid: str, event: str, value: int, ts: int, status: str = "pending",
            next_attempt_at: float = 0.0, sent_at: int | None = None) -> str:
        def tx(c: Any) -> str:
            (n,) = c.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM outbox").fetchone()
            ident = f"mp_test_{n}"
            c.execute("INSERT INTO outbox(id, identifier, customer_id, meter, event_name, value,"
                      " window_start, timestamp, created_at, status, next_attempt_at, sent_at)"
                      " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                      (n, ident, cid, event, event, value, align_down(ts), ts, ts, status,
                       next_attempt_at, sent_at if sent_at is not None
                       else int(time.time()) if status == "sent" else None))
            return ident
        out: str = self.store.execute_write(tx)
        return out

    def status(self, ident: str) -> tuple[str, float]:
        s, due = self.store.conn.execute(
            "SELECT status, next_attempt_at FROM outbox WHERE identifier=?", (ident,)).fetchone()
        return str(s), float(due)

    async def reconcile(self, hours_back: int = 6, grace: float = GRACE, **kw: Any) -> Any:
        now = self.now
        return await self.rec.run(align_down(now) - hours_back * HOUR, now, grace, now, **kw)

    async def send_direct(self, customer: str, event: str, value: int, ts: int) -> None:
        client = self.double.client()
        await client.v1.billing.meter_events.create_async(params={
            "event_name": event, "identifier": f"foreign_{ts}_{value}",
            "payload": {"stripe_customer_id": customer, "value": str(value)}, "timestamp": ts})


MakeEnv = Callable[..., Awaitable[Env]]


@pytest.fixture
async def make_env(tmp_path: Path, stripe_double_factory: Callable[..., Awaitable[RunningDouble]]
                   ) -> AsyncIterator[MakeEnv]:
    made: list[Env] = []

    async def factory(names: dict[str, tuple[str, str | None]] | None = None,
                      meters: tuple[str, ...] = ("api_calls",), threshold: float = 0.01,
                      metrics: ReconcileMetrics | None = None, **double_kw: Any) -> Env:
        double = await stripe_double_factory(**double_kw)
        for m in meters:
            double.state.add_meter(m)
        store = Store.open(tmp_path / f"m{len(made)}.db")
        names = names if names is not None else {"api_calls": ("api_calls", None)}
        sink_conn = StripeClient(TEST_API_KEY, api_base=double.url,
                                     meter_events_base=double.url)
        rec_conn = StripeClient(TEST_API_KEY, api_base=double.url,
                                    meter_events_base=double.url)
        flusher = Flusher(store, MeterEventsSink(sink_conn), lambda: names, rate=0, seed=1)
        owners = SqliteStorage.on(store)
        rec = Reconciler(owners.outbox, owners.customers, rec_conn, lambda: names,
                         threshold=threshold, metrics=metrics)
        env = Env(double, store, flusher, rec, names, [sink_conn, rec_conn])
        made.append(env)
        return env

    yield factory
    for env in made:
        for c in env.conns:
            await c.close()
        env.store.close()


def hour_ago(n: int, minute: int = 10) -> int:
    return align_down(time.time()) - n * HOUR + minute * 60


# ---- against the double -------------------------------------------------------------------

async def test_all_match(make_env: MakeEnv) -> None:
    env = await make_env()
    env.customer("acme", "cus_acme")
    env.customer("beta", "cus_beta")
    for n, v in ((3, 5), (3, 2), (4, 7), (5, 1)):
        env.row("acme", "api_calls", v, hour_ago(n, minute=n * 3 + v))
    env.row("beta", "api_calls", 11, hour_ago(4))
    rep = await env.flusher.flush(force=True)
    assert rep.delivered == 5
    env.double.state.advance(GRACE + 1)           # past the grace period after delivery
    report = await env.reconcile()
    assert report.counts == {"match": 4, "shortfall": 0, "excess": 0, "pending": 0}
    assert report.discrepancy_rate == 0 and not report.alert
    data = report.to_json()
    acme = data["customers"]["acme"]["events"]["api_calls"]
    assert acme["totals"] == {"ledger": 15, "stripe": 15, "difference": 0}
    assert {h["status"] for h in acme["hours"]} == {"match"}
    assert data["meters"]["api_calls"].startswith("mtr_")
    assert "(no discrepancies)" in report.to_table()
    assert report.resent == [] and report.operator == []


async def test_shortfall_with_pending_row_is_resent_with_its_identifier(make_env: MakeEnv) -> None:
    env = await make_env()
    env.customer("acme", "cus_acme")
    env.row("acme", "api_calls", 4, hour_ago(3))
    await env.flusher.flush(force=True)
    # delivered late: still pending with a backoff far in the future (e.g. after 5xx)
    late = env.row("acme", "api_calls", 6, hour_ago(4), next_attempt_at=time.time() + 10**6)
    env.double.state.advance(GRACE + 1)
    report = await env.reconcile()
    assert report.counts["shortfall"] == 1 and report.counts["match"] == 1
    assert report.resent == [late]
    line = next(h for h in report.to_json()["customers"]["acme"]["events"]["api_calls"]["hours"]
                if h["status"] == "shortfall")
    assert line["action"] == "resend" and line["ledger"] == 6 and line["stripe"] == 0
    assert line["undelivered"] == 6 and line["identifiers"] == [late]
    assert env.status(late) == ("pending", 0.0)   # due now; the flusher owns the send
    assert env.double.state.event(late) is None
    rep = await env.flusher.flush()                # not forced: it is due
    assert rep.delivered == 1
    event = env.double.state.event(late)
    assert event is not None and event.identifier == late and event.value == 6
    env.double.state.advance(GRACE + 1)
    again = await env.reconcile()
    assert again.counts == {"match": 2, "shortfall": 0, "excess": 0, "pending": 0}


async def test_dry_run_reports_but_marks_nothing(make_env: MakeEnv) -> None:
    env = await make_env()
    env.customer("acme", "cus_acme")
    late = env.row("acme", "api_calls", 6, hour_ago(4), next_attempt_at=time.time() + 10**6)
    report = await env.reconcile(dry_run=True)
    assert report.resent == [late] and report.dry_run
    assert env.status(late)[1] > time.time()


async def test_row_marked_sent_but_missing_in_stripe_is_reported_not_resent(
        make_env: MakeEnv) -> None:
    env = await make_env()
    env.customer("acme", "cus_acme")
    ghost = env.row("acme", "api_calls", 9, hour_ago(3), status="sent")
    env.double.state.advance(GRACE + 1)
    calls_before = len(env.double.state.calls("meter_events"))
    report = await env.reconcile()
    assert report.counts["shortfall"] == 1
    assert report.resent == [] and report.dead_letters == []
    assert len(report.operator) == 1
    issue = report.operator[0]
    assert issue["customer"] == "acme" and issue["difference"] == -9
    assert issue["identifiers"] == [ghost] and "missing in Stripe" in issue["reason"]
    await env.flusher.flush(force=True)
    assert len(env.double.state.calls("meter_events")) == calls_before   # never re-minted
    assert env.status(ghost)[0] == "sent"
    assert "operator" in report.to_table()


async def test_dead_letter_shortfall_is_reported_for_replay(make_env: MakeEnv) -> None:
    env = await make_env()
    env.customer("acme", "cus_acme")
    dead = env.row("acme", "api_calls", 2, hour_ago(3), status="dead")
    env.double.state.advance(GRACE + 1)
    report = await env.reconcile()
    assert report.dead_letters == [dead] and report.resent == [] and report.operator == []
    assert env.status(dead)[0] == "dead"


async def test_excess_is_reported(make_env: MakeEnv) -> None:
    env = await make_env()
    env.customer("acme", "cus_acme")
    env.row("acme", "api_calls", 3, hour_ago(3))
    await env.flusher.flush(force=True)
    await env.send_direct("cus_acme", "api_calls", 5, hour_ago(3, minute=40))
    await env.send_direct("cus_acme", "api_calls", 1, hour_ago(5))   # an hour we have nothing
    env.double.state.advance(GRACE + 1)
    report = await env.reconcile()
    assert report.counts == {"match": 0, "shortfall": 0, "excess": 2, "pending": 0}
    diffs = sorted(i["difference"] for i in report.operator)
    assert diffs == [1, 5] and all(i["reason"].startswith("excess") for i in report.operator)
    assert report.resent == []
    assert report.discrepancy_rate == 1.0 and report.alert
    table = report.to_table()
    assert "excess" in table and "ALERT" in table


async def test_recent_hours_are_pending_not_judged(make_env: MakeEnv) -> None:
    env = await make_env()
    env.customer("acme", "cus_acme")
    recent = env.row("acme", "api_calls", 4, hour_ago(1), next_attempt_at=time.time() + 10**6)
    env.row("acme", "api_calls", 3, hour_ago(4))
    await env.flusher.flush(force=True)             # sends the older row only
    env.double.state.advance(60)
    report = await env.reconcile(grace=2 * HOUR)
    # hour -1 ends within the grace period; hour -4 was delivered a minute ago: both wait
    assert report.counts == {"match": 0, "shortfall": 0, "excess": 0, "pending": 2}
    assert report.resent == [] and env.status(recent)[1] > time.time()
    assert report.discrepancy_rate == 0.0


async def test_summary_lag_is_covered_by_the_grace_period(make_env: MakeEnv) -> None:
    env = await make_env(summary_lag=600)
    env.customer("acme", "cus_acme")
    env.row("acme", "api_calls", 8, hour_ago(3))
    await env.flusher.flush(force=True)
    # without a grace period the lag looks like a shortfall (dry run: nothing is touched)
    eager = await env.reconcile(grace=0, dry_run=True)
    assert eager.counts["shortfall"] == 1
    # with one longer than the lag, a just-delivered hour waits ...
    patient = await env.reconcile(grace=900)
    assert patient.counts == {"match": 0, "shortfall": 0, "excess": 0, "pending": 1}
    # ... and matches once the double has processed it
    env.double.state.advance(901)
    later = await env.reconcile(grace=900)
    assert later.counts == {"match": 1, "shortfall": 0, "excess": 0, "pending": 0}


async def test_unknown_inactive_or_wrong_meters_refuse_to_start(make_env: MakeEnv) -> None:
    names: dict[str, tuple[str, str | None]] = {
        "api_calls": ("api_calls", None), "tokens": ("tokens", "tokens_covered")}
    env = await make_env(names=names, meters=("api_calls",))
    env.customer("acme", "cus_acme")
    with pytest.raises(ReconcileRefused) as err:
        await env.reconcile()
    assert err.value.missing == ["tokens", "tokens_covered"]
    assert "no Stripe meter" in str(err.value)
    assert env.double.state.calls("event_summaries") == []          # nothing partial
    env.double.state.add_meter("tokens")
    env.double.state.add_meter("tokens_covered", status="inactive")
    with pytest.raises(ReconcileRefused) as err:
        await env.reconcile()
    assert err.value.missing == ["tokens_covered"] and "inactive" in str(err.value)
    env.double.state.add_meter("tokens_covered", formula="count")
    with pytest.raises(ReconcileRefused, match="'count'"):
        await env.reconcile()
    for m in list(env.double.state.meters.values()):
        if m.event_name == "tokens_covered":
            m.status = "inactive"
    env.double.state.add_meter("tokens_covered", id="mtr_daily", event_time_window="day")
    with pytest.raises(ReconcileRefused) as err:
        await env.reconcile()
    assert err.value.missing == ["tokens_covered"]
    assert str(err.value).endswith(
        "event name 'tokens_covered': Stripe meter mtr_daily is pre-aggregated"
        " (event_time_window 'day'): it keeps only the newest event per day, but meterproxy"
        " sends several delta events per window; use a meter without event_time_window")


async def test_pagination_over_more_than_100_hours_and_100_meters(make_env: MakeEnv) -> None:
    env = await make_env(meters=())
    for i in range(105):
        env.double.state.add_meter(f"filler_{i}")
    env.double.state.add_meter("api_calls")          # on the second page of meters
    env.customer("acme", "cus_acme")
    env.row("acme", "api_calls", 2, hour_ago(125))
    env.row("acme", "api_calls", 3, hour_ago(2))
    await env.flusher.flush(force=True)
    env.double.state.advance(GRACE + 1)
    report = await env.reconcile(hours_back=130)
    assert report.counts == {"match": 2, "shortfall": 0, "excess": 0, "pending": 0}
    assert len(env.double.state.calls("meters_list")) == 2
    pages = env.double.state.calls("event_summaries")
    assert len(pages) == 2 and pages[1].params.get("starting_after")
    assert {p.params["value_grouping_window"] for p in pages} == {"hour"}
    starts = {int(p.params["start_time"]) for p in pages}
    assert all(s % HOUR == 0 for s in starts)


async def test_customers_without_stripe_id_and_foreign_event_names(make_env: MakeEnv) -> None:
    env = await make_env()
    env.customer("acme", "cus_acme")
    env.customer("nostripe", None)
    env.row("nostripe", "api_calls", 1, hour_ago(3), status="dead")
    env.row("acme", "old_name", 1, hour_ago(3), status="dead")
    report = await env.reconcile()
    assert report.unmapped == {"nostripe": 1}
    assert report.unknown_event_names == ["old_name"]
    assert [p.customer_id for p in report.pairs] == ["acme"]


async def test_customers_sharing_a_stripe_customer_are_reconciled_together(
        make_env: MakeEnv) -> None:
    """Two local customers billed to one Stripe customer (docs/credits.md): Stripe's
    summaries are the Stripe customer's, so the ledger is summed over both before the
    comparison. Compared one local customer at a time, A's 5 lost units showed as +5
    excess on A and on B, no shortfall, and nothing was resent."""
    env = await make_env()
    env.customer("team_a", "cus_shared")
    env.customer("team_b", "cus_shared")
    env.row("team_a", "api_calls", 5, hour_ago(3))
    env.row("team_b", "api_calls", 10, hour_ago(3, minute=20))
    await env.flusher.flush(force=True)
    lost = env.row("team_a", "api_calls", 5, hour_ago(3, minute=30),
                   next_attempt_at=time.time() + 10**6)
    env.double.state.advance(GRACE + 1)
    report = await env.reconcile()
    assert report.counts == {"match": 0, "shortfall": 1, "excess": 0, "pending": 0}
    assert report.resent == [lost] and report.operator == []
    (pair,) = report.pairs
    assert (pair.stripe_customer_id, pair.customer_ids) == ("cus_shared", ("team_a", "team_b"))
    entry = report.to_json()["customers"]["team_a+team_b"]
    assert entry["customers"] == ["team_a", "team_b"]
    (line,) = entry["events"]["api_calls"]["hours"]
    assert (line["ledger"], line["stripe"], line["undelivered"]) == (20, 15, 5)
    assert line["action"] == "resend"
    # asking for one of them reconciles the whole Stripe customer
    only_a = await env.reconcile(customers=["team_a"], dry_run=True)
    assert [p.customer_ids for p in only_a.pairs] == [("team_a", "team_b")]
    assert only_a.counts["shortfall"] == 1
    assert (await env.flusher.flush()).delivered == 1
    env.double.state.advance(GRACE + 1)
    again = await env.reconcile()
    assert again.counts == {"match": 1, "shortfall": 0, "excess": 0, "pending": 0}


async def test_invalid_range(make_env: MakeEnv) -> None:
    env = await make_env()
    now = env.now
    with pytest.raises(InvalidRange):
        await env.rec.run(align_down(now), now + 10, GRACE, now)


async def test_metrics_and_alert(make_env: MakeEnv) -> None:
    reg = CollectorRegistry()
    m = ReconcileMetrics(
        Gauge("d", "d", ["kind"], registry=reg), Gauge("r", "r", registry=reg),
        Counter("a", "a", registry=reg), Counter("runs", "runs", ["outcome"], registry=reg),
        Gauge("l", "l", registry=reg))
    env = await make_env(metrics=m, threshold=0.4)
    env.customer("acme", "cus_acme")
    env.row("acme", "api_calls", 3, hour_ago(3))
    env.row("acme", "api_calls", 3, hour_ago(4))
    await env.flusher.flush(force=True)
    await env.send_direct("cus_acme", "api_calls", 1, hour_ago(4, minute=50))
    env.double.state.advance(GRACE + 1)
    report = await env.reconcile()
    assert report.discrepancy_rate == 0.5 and report.alert
    assert reg.get_sample_value("d", {"kind": "excess"}) == 1
    assert reg.get_sample_value("d", {"kind": "match"}) == 1
    assert reg.get_sample_value("r") == 0.5
    assert reg.get_sample_value("a_total") == 1
    assert reg.get_sample_value("runs_total", {"outcome": "ok"}) == 1
    env.names["ghost"] = ("ghost", None)
    with pytest.raises(ReconcileRefused):
        await env.reconcile()
    assert reg.get_sample_value("runs_total", {"outcome": "refused"}) == 1


# ---- the admin route --------------------------------------------------------------------

async def test_admin_route(make_env: MakeEnv) -> None:
    env = await make_env()
    env.customer("acme", "cus_acme")
    env.row("acme", "api_calls", 4, hour_ago(3), status="sent", sent_at=hour_ago(3))
    app = web.Application()
    app.add_routes(reconcile_routes())
    app[RECONCILER] = env.rec
    app[RECONCILE_GRACE] = 60.0
    bare = web.Application()
    bare.add_routes(reconcile_routes())
    runners = [web.AppRunner(a) for a in (app, bare)]
    urls = []
    for runner in runners:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        urls.append(f"http://127.0.0.1:{runner.addresses[0][1]}/admin/reconcile")
    start = align_down(time.time()) - 6 * HOUR
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(urls[0], params={"from": str(start), "grace": "1m"}) as r:
                assert r.status == 200
                body = await r.json()
            assert body["counts"]["shortfall"] == 1 and body["grace_seconds"] == 60
            assert body["actions"]["operator"][0]["difference"] == -4
            async with s.post(urls[0], json={"from": start, "format": "table", "all": True}) as r:
                assert r.status == 200 and r.content_type == "text/plain"
                text = await r.text()
            assert "shortfall" in text and "CUSTOMER" in text
            async with s.post(urls[0], params={"grace": "soon"}) as r:
                assert r.status == 400
            async with s.post(urls[0], params={"bogus": "1"}) as r:
                assert r.status == 400
            async with s.post(urls[0], params={"from": str(time.time() + 10)}) as r:
                assert r.status == 400
            env.names["ghost"] = ("ghost", None)
            async with s.post(urls[0]) as r:
                assert r.status == 400
                err = (await r.json())["error"]
            assert err["missing"] == ["ghost"] and "ghost" in err["message"]
            async with s.post(urls[1]) as r:
                assert r.status == 409
    finally:
        for runner in runners:
            await runner.cleanup()


def test_parse_grace() -> None:
    assert parse_grace("90s") == 90 and parse_grace("2h") == 7200 and parse_grace(5) == 5.0
    assert parse_grace("30m") == 1800 and parse_grace("1.5") == 1.5
    for bad in ("-1", "x", "h", True):
        with pytest.raises(ValueError):
            parse_grace(bad)


# ---- the pure comparison ----------------------------------------------------------------

hours_st = st.dictionaries(st.integers(0, 300).map(lambda h: h * HOUR),
                           st.integers(0, 10**6), max_size=40)
stripe_st = st.dictionaries(st.integers(0, 300).map(lambda h: h * HOUR),
                            st.one_of(st.integers(0, 10**6).map(float),
                                      st.floats(0, 10**6, allow_nan=False)), max_size=40)


@given(hours_st, stripe_st, st.integers(0, 320).map(lambda h: h * HOUR + 17),
       st.sets(st.integers(0, 300).map(lambda h: h * HOUR), max_size=10))
def test_compare_properties(ledger: dict[int, int], stripe: dict[int, float],
                            judge_before: int, fresh: set[int]) -> None:
    results = compare(ledger, stripe, judge_before, fresh)
    hours = [r.hour for r in results]
    assert hours == sorted(hours) and len(set(hours)) == len(hours)
    active = {h for h in set(ledger) | set(stripe)
              if ledger.get(h, 0) != 0 or stripe.get(h, 0.0) != 0}
    assert set(hours) == active
    for r in results:
        assert r.ledger == ledger.get(r.hour, 0) and r.stripe == stripe.get(r.hour, 0.0)
        if r.hour + HOUR > judge_before or r.hour in fresh:
            assert r.status == "pending"
        elif r.stripe == r.ledger:
            assert r.status == "match" and r.difference == 0
        else:
            assert r.status == ("shortfall" if r.stripe < r.ledger else "excess")
    # swapping the sides (integers only) swaps shortfall and excess
    ints = {h: float(int(v)) for h, v in stripe.items()}
    back = {h: int(v) for h, v in ints.items()}
    forward = {r.hour: r.status for r in compare(ledger, ints, judge_before, fresh)}
    swapped = {r.hour: r.status for r in compare(back, {h: float(v) for h, v in ledger.items()},
                                                 judge_before, fresh)}
    flip = {"shortfall": "excess", "excess": "shortfall"}
    assert swapped == {h: flip.get(s, s) for h, s in forward.items()}
    counts = {k: sum(1 for r in results if r.status == k)
              for k in ("match", "shortfall", "excess", "pending")}
    rate = discrepancy_rate(counts)
    judged = counts["match"] + counts["shortfall"] + counts["excess"]
    assert 0.0 <= rate <= 1.0
    assert rate == (0.0 if judged == 0 else (counts["shortfall"] + counts["excess"]) / judged)


@given(hours_st)
def test_compare_ledger_against_itself_matches(ledger: dict[int, int]) -> None:
    results = compare(ledger, {h: float(v) for h, v in ledger.items()}, 10**9)
    assert all(r.status == "match" for r in results)


def test_compare_float_values_exactly() -> None:
    r = compare({0: 3, HOUR: 3}, {0: 3.0, HOUR: 2.5}, 10 * HOUR)
    assert [x.status for x in r] == ["match", "shortfall"]
    assert r[1].difference == -0.5
