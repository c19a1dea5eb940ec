"""Rules meters checked against Stripe's Billing Meters at start and on reload (finding 4),
with the real stripe SDK against the Stripe double."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from proxy import config as config_mod
from proxy import metrics
from proxy.app import Server, reload_rules_checked, start
from proxy.cli import main as cli_main
from proxy.errors import ConfigError
from proxy.meter_check import StripeMeterInfo, meter_problems
from tests.conftest import ADMIN_TOKEN, write_config
from tests.helpers import wait_until
from tests.stripe_double.fixture import TEST_API_KEY, RunningDouble

RULES = """\
version: 1
meters:
  api_calls: {stripe_event_name: api_calls}
rules:
  - name: all
    match: {path: "/**"}
    usage: [{meter: api_calls, quantity: 1}]
"""
TOKENS = RULES.replace("meters:\n", "meters:\n  tokens: {stripe_event_name: llm_tokens}\n")


def _meter(event: str = "ev", **kw: str | None) -> StripeMeterInfo:
    f: dict[str, str | None] = {"id": "mtr_1", "status": "active", "formula": "sum",
                                "customer_key": "stripe_customer_id", "value_key": "value",
                                "event_time_window": None, **kw}
    return StripeMeterInfo(str(f["id"]), event, str(f["status"]), str(f["formula"]),
                           str(f["customer_key"]), str(f["value_key"]), f["event_time_window"])


def test_each_problem_names_meter_event_and_why() -> None:
    names = {"m": ("ev", None)}
    assert meter_problems(names, [_meter()]) == []
    assert meter_problems(names, []) == [
        "meter 'm' (event name 'ev'): no Stripe meter has this event name"]
    assert meter_problems(names, [_meter(status="inactive")]) == [
        "meter 'm' (event name 'ev'): Stripe meter mtr_1 is inactive, not active"]
    assert meter_problems(names, [_meter(formula="last")]) == [
        "meter 'm' (event name 'ev'): Stripe meter mtr_1 aggregates with 'last'; meterproxy "
        "sends delta events, which only a 'sum' meter totals correctly"]
    assert meter_problems(names, [_meter(value_key="tokens")]) == [
        "meter 'm' (event name 'ev'): Stripe meter mtr_1 reads payload keys "
        "'stripe_customer_id'/'tokens'; meterproxy sends 'stripe_customer_id'/'value'"]
    assert meter_problems(names, [_meter(event_time_window="hour")]) == [
        "meter 'm' (event name 'ev'): Stripe meter mtr_1 is pre-aggregated (event_time_window "
        "'hour'): it keeps only the newest event per hour, but meterproxy sends several delta "
        "events per window; use a meter without event_time_window"]
    # the covered event name is checked too; an inactive twin does not hide an active meter
    assert meter_problems({"m": ("ev", "cov")}, [_meter(id="mtr_0", status="inactive"),
                                                 _meter()]) == [
        "meter 'm' (event name 'cov'): no Stripe meter has this event name"]


def _config(tmp: Path, upstream: str, double_url: str, rules: str = RULES,
            **stripe: object) -> Path:
    return write_config(tmp, upstream, rules_text=rules, stripe={
        "sink": "meter_events", "api_key": TEST_API_KEY, "api_base": double_url,
        "meter_events_base": double_url, "flush_interval": "1h", "timeout": "2s", **stripe})


async def test_pre_aggregated_meter_refuses_start(tmp_path: Path, upstream: str,
                                                  stripe_double: RunningDouble) -> None:
    stripe_double.state.add_meter("api_calls", id="mtr_hourly", event_time_window="hour")
    cfg = config_mod.load(_config(tmp_path, upstream, stripe_double.url))
    with pytest.raises(ConfigError) as err:
        await start(cfg)
    assert err.value.problems == [
        "stripe: meter 'api_calls' (event name 'api_calls'): Stripe meter mtr_hourly is "
        "pre-aggregated (event_time_window 'hour'): it keeps only the newest event per hour, "
        "but meterproxy sends several delta events per window; use a meter without "
        "event_time_window"]


async def test_serve_exits_2_naming_the_meter(tmp_path: Path, upstream: str,
                                              stripe_double: RunningDouble,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    stripe_double.state.add_meter("api_calls", "count", id="mtr_count")
    path = _config(tmp_path, upstream, stripe_double.url)
    rc = await asyncio.to_thread(cli_main, ["serve", "--config", str(path)])
    assert rc == 2
    assert capsys.readouterr().err == (
        "stripe: meter 'api_calls' (event name 'api_calls'): Stripe meter mtr_count aggregates "
        "with 'count'; meterproxy sends delta events, which only a 'sum' meter totals "
        "correctly\n")


def _checks(outcome: str) -> float:
    """meterproxy_stripe_meter_checks_total{outcome} (process-wide: compare deltas)."""
    v = metrics.REGISTRY.get_sample_value("meterproxy_stripe_meter_checks_total",
                                          {"outcome": outcome})
    return v or 0.0


async def _get(s: aiohttp.ClientSession, server: Server, path: str) -> tuple[int, str]:
    async with s.get(f"http://127.0.0.1:{server.admin_port}{path}",
                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
        return r.status, await r.text()


async def test_unreachable_stripe_starts_degraded_then_verifies(
        tmp_path: Path, upstream: str, stripe_double: RunningDouble) -> None:
    stripe_double.state.add_meter("api_calls")
    stripe_double.state.faults.script("meters_list", ["500"] * 10_000)   # down until cleared
    cfg = config_mod.load(_config(tmp_path, upstream, stripe_double.url,
                                  meter_check_retry="0.3s"))
    before = {o: _checks(o) for o in ("ok", "unreachable", "mismatch")}
    server = await start(cfg)
    try:
        async with aiohttp.ClientSession() as s:
            status, body = await _get(s, server, "/readyz")
            assert status == 503
            assert "stripe meters not verified yet (Stripe unreachable:" in body
            _, text = await _get(s, server, "/metrics")
            assert "\nmeterproxy_stripe_meters_verified 0.0\n" in text
            assert _checks("unreachable") - before["unreachable"] >= 1
            assert _checks("ok") - before["ok"] == 0
            stripe_double.state.faults.clear("meters_list")       # Stripe is back
            await wait_until(lambda: _get(s, server, "/readyz"), ok=lambda r: r[0] == 200,
                             timeout=20, interval=0.05, what="the meter check to pass")
            _, text = await _get(s, server, "/metrics")
            assert "\nmeterproxy_stripe_meters_verified 1.0\n" in text
            calls = len(stripe_double.state.calls("meters_list"))    # one per check
            assert {o: _checks(o) - n for o, n in before.items()} == \
                {"ok": 1, "unreachable": calls - 1, "mismatch": 0}
    finally:
        await server.shutdown()


async def test_reload_with_a_wrong_meter_is_refused(tmp_path: Path, upstream: str,
                                                    stripe_double: RunningDouble) -> None:
    stripe_double.state.add_meter("api_calls")
    server = await start(config_mod.load(_config(tmp_path, upstream, stripe_double.url)))
    try:
        old = server.rt.rules.version
        (tmp_path / "rules.yaml").write_text(TOKENS)
        assert await reload_rules_checked(server.rt, server.meter_check) is False
        assert server.rt.rules.version == old
        assert server.rt.rules_error == ("stripe: meter 'tokens' (event name 'llm_tokens'): "
                                         "no Stripe meter has this event name")
        stripe_double.state.add_meter("llm_tokens")
        assert await reload_rules_checked(server.rt, server.meter_check) is True
        assert sorted(server.rt.rules.meters) == ["api_calls", "tokens"]
        assert server.rt.rules_error is None
    finally:
        await server.shutdown()


async def test_double_keeps_the_newest_event_per_window_of_a_pre_aggregated_meter(
        stripe_double: RunningDouble) -> None:
    meter = stripe_double.state.add_meter("pre", id="mtr_pre", event_time_window="hour")
    client = stripe_double.client()
    hour = int(time.time()) // 3600 * 3600 - 3 * 3600
    for value, ts in (("5", hour + 10), ("7", hour + 3000), ("2", hour + 20),
                      ("4", hour + 3600)):
        await client.v1.billing.meter_events.create_async(params={
            "event_name": "pre", "timestamp": ts,
            "payload": {"stripe_customer_id": "cus_1", "value": value}})
    listed = await client.v1.billing.meters.list_async()
    assert [m.event_time_window for m in listed.data] == ["hour"]
    summaries = await client.v1.billing.meters.event_summaries.list_async(meter.id, params={
        "customer": "cus_1", "start_time": hour, "end_time": hour + 7200,
        "value_grouping_window": "hour"})
    # the last received event of the first hour (2) overwrote 5 and 7
    assert [s.aggregated_value for s in summaries.data] == [2.0, 4.0]
