"""Dry-run is never delivery: events the dry-run sink logged keep the outbox state
``dry_run`` and a real sink started later on the same database delivers each of them once,
with the same identifier. A Stripe sink without credentials refuses to start."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from proxy import config as config_mod
from proxy.app import Server, start
from proxy.config import StripeConfig
from proxy.errors import ConfigError
from proxy.sinks.dry_run import DryRunSink
from proxy.store.db import connect
from proxy.store.schema import MIGRATIONS
from proxy.stripe.factory import build_sink
from tests.conftest import ADMIN_TOKEN, ROOT, write_config
from tests.stripe_double.fixture import TEST_API_KEY, RunningDouble

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def _admin(s: aiohttp.ClientSession, server: Server, method: str, path: str) -> object:
    async with s.request(method, f"http://127.0.0.1:{server.admin_port}{path}",
                         headers=AUTH) as r:
        assert r.status == 200, await r.text()
        return await (r.json() if r.content_type == "application/json" else r.text())


async def _customer_traffic(s: aiohttp.ClientSession, server: Server, n: int) -> None:
    base = f"http://127.0.0.1:{server.admin_port}"
    for cid in ("a", "b"):
        async with s.post(base + "/admin/customers", headers=AUTH,
                          json={"id": cid, "stripe_customer_id": f"cus_{cid}"}) as r:
            assert r.status in (200, 201)
        async with s.post(base + f"/admin/customers/{cid}/keys", headers=AUTH,
                          json={"name": "t"}) as r:
            key = (await r.json())["key"]
        for _ in range(n):
            async with s.get(f"http://127.0.0.1:{server.public_port}/v1/items",
                             headers={"Authorization": f"Bearer {key}"}) as r:
                assert r.status == 200


def _outbox(db: Path) -> list[tuple[str, str, int, str]]:
    with sqlite3.connect(db) as c:
        return list(c.execute("SELECT identifier, status, value, customer_id FROM outbox"
                              " ORDER BY id"))


async def test_dry_run_events_are_delivered_once_when_a_real_sink_starts(
        tmp_path: Path, upstream: str, stripe_double: RunningDouble) -> None:
    for name in ("api_calls", "llm_tokens", "bytes_in", "units"):   # the rules' meters
        stripe_double.state.add_meter(name)
    db = tmp_path / "meter.db"
    async with aiohttp.ClientSession() as s:
        # 1. dry run: events are logged and kept as dry_run, never 'sent'
        server = await start(config_mod.load(write_config(tmp_path, upstream)))
        try:
            await _customer_traffic(s, server, 3)
            report = await _admin(s, server, "POST", "/admin/flush")
            assert report == {"staged": 2, "attempted": 2, "delivered": 0, "duplicates": 0,
                              "retrying": 0, "dead": 0, "dry_run": 2, "requeued_dry_run": 0,
                              "circuit_open": False, "errors": []}
            listed = await _admin(s, server, "GET", "/admin/outbox?status=dry_run")
            assert isinstance(listed, dict)
            assert sorted((e["customer_id"], e["value"], e["status"], e["sent_at"])
                          for e in listed["events"]) == [("a", 3, "dry_run", None),
                                                         ("b", 3, "dry_run", None)]
            metrics = await _admin(s, server, "GET", "/metrics")
            assert "\nmeterproxy_outbox_dry_run 2.0\n" in str(metrics)
            assert "\nmeterproxy_outbox_pending 0.0\n" in str(metrics)
        finally:
            await server.shutdown()
        logged = _outbox(db)
        assert [(st, v) for _, st, v, _ in logged] == [("dry_run", 3), ("dry_run", 3)]
        assert stripe_double.state.accepted_events() == []

        # 2. the same database with the meter events sink: each event delivered once
        cfg = write_config(tmp_path, upstream, stripe={
            "sink": "meter_events", "api_key": TEST_API_KEY, "api_base": stripe_double.url,
            "meter_events_base": stripe_double.url, "flush_interval": "1h"})
        server = await start(config_mod.load(cfg))
        try:
            report = await _admin(s, server, "POST", "/admin/flush")
            assert isinstance(report, dict)
            assert (report["requeued_dry_run"], report["delivered"], report["dry_run"],
                    report["staged"]) == (2, 2, 0, 0)
            again = await _admin(s, server, "POST", "/admin/flush")
            assert isinstance(again, dict)
            assert (again["requeued_dry_run"], again["attempted"]) == (0, 0)
            metrics = await _admin(s, server, "GET", "/metrics")
            assert "\nmeterproxy_outbox_dry_run 0.0\n" in str(metrics)
        finally:
            await server.shutdown()
    delivered = _outbox(db)
    assert [(i, st, v, c) for i, st, v, c in delivered] == \
        [(i, "sent", v, c) for i, _, v, c in logged]          # same identifiers, now sent
    events = stripe_double.state.accepted_events()
    assert sorted((e.identifier, e.customer, e.value) for e in events) == \
        sorted((i, f"cus_{c}", v) for i, _, v, c in logged)
    for ident, *_ in logged:
        assert stripe_double.state.identifier_count(ident) == 1


def test_a_stripe_sink_without_a_key_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        build_sink(StripeConfig(api_key="", sink="meter_events"))
    assert err.value.problems == [
        "stripe.api_key is empty but stripe.sink is meter_events: set stripe.api_key (the"
        " container config reads it from STRIPE_API_KEY), or choose the dry-run sink"
        " explicitly with `stripe.sink: dry_run` (logs meter events, sends nothing; a real"
        " sink configured later sends them)"]
    for sink in ("meter_event_stream", "usage_records"):
        with pytest.raises(ConfigError, match=rf"stripe\.sink is {sink}: set stripe\.api_key"):
            build_sink(StripeConfig(api_key="", sink=sink))   # type: ignore[arg-type]
    assert isinstance(build_sink(StripeConfig(sink="dry_run")), DryRunSink)
    assert isinstance(build_sink(StripeConfig(api_key=TEST_API_KEY, sink="dry_run")), DryRunSink)


def test_container_config_without_a_stripe_key_is_refused_not_dry_run(tmp_path: Path) -> None:
    cfg_file = tmp_path / "meterproxy.yaml"
    cfg_file.write_text((ROOT / "deploy" / "meterproxy.yaml").read_text())
    env = {"METERPROXY_ADMIN_TOKEN": "t" * 16}
    with pytest.raises(ConfigError, match=r"^stripe\.api_key is empty but stripe\.sink is "
                       r"meter_events: set stripe\.api_key \(the container config reads it"
                       r" from STRIPE_API_KEY\)"):
        build_sink(config_mod.load(cfg_file, env=env).stripe)
    explicit = config_mod.load(cfg_file, env={**env, "STRIPE_SINK": "dry_run"})
    assert isinstance(build_sink(explicit.stripe), DryRunSink)


def test_serve_without_stripe_settings_exits_with_the_setting_named(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text("version: 1\nmeters: {}\nrules: []\n")
    cfg = tmp_path / "meterproxy.yaml"
    cfg.write_text("listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nrules: rules.yaml\n"
                   "admin: {token: a-long-admin-token}\n")
    out = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(cfg)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out
    assert out.stderr.strip().splitlines()[-1] == (
        "stripe.api_key is empty but stripe.sink is meter_events (the default): set"
        " stripe.api_key (the container config reads it from STRIPE_API_KEY), or choose the"
        " dry-run sink explicitly with `stripe.sink: dry_run` (logs meter events, sends"
        " nothing; a real sink configured later sends them)")
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "meterproxy.db").exists()      # refused before opening anything


def test_migration_turns_old_dry_run_sends_into_dry_run_rows(tmp_path: Path) -> None:
    """Before the dry_run state, the dry-run sink marked rows 'sent': they were never
    delivered, so the migration gives them the dry_run state (a real sink sends them)."""
    db = tmp_path / "old.db"
    c = sqlite3.connect(db, isolation_level=None)
    for script in MIGRATIONS[:5]:
        c.executescript(script)
    c.execute("PRAGMA user_version=5")
    row = ("INSERT INTO outbox(id, identifier, customer_id, meter, event_name, value,"
           " window_start, timestamp, created_at, status, attempts, sent_at, sink, outcome)"
           " VALUES (?, ?, 'c', 'm', 'm', 1, 0, 0, 0, 'sent', 1, 5, ?, ?)")
    c.execute(row, (1, "mp_x_1", "dry_run", "delivered"))
    c.execute(row, (2, "mp_x_2", "meter_events", "delivered"))
    c.close()
    conn = connect(db)
    try:
        rows = list(conn.execute("SELECT id, status, attempts, sent_at, sink, outcome FROM"
                                 " outbox ORDER BY id"))
        assert rows == [(1, "dry_run", 0, None, "dry_run", "dry_run"),
                        (2, "sent", 1, 5, "meter_events", "delivered")]
        indexes = {r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='index' AND tbl_name='outbox'"
            " AND name NOT LIKE 'sqlite_%'")}
        assert indexes == {"outbox_status", "outbox_customer", "outbox_timestamp"}
    finally:
        conn.close()
