"""Chaos acceptance test of the Stripe delivery (meter events sink).

At least 8,000 metered requests (20,000 in the soak profile, ``METERPROXY_SOAK=1``) across
50 customers and 3 meters go through the real proxy
(a subprocess, strict durability) while the Stripe double injects every fault kind on 20% of
meter event calls; the proxy is SIGKILLed mid-run (mid-flush: it flushes every 300 ms and a
flush with hangs lasts seconds) and restarted on the same database. After the final flush,
for every customer and meter:

    client-observed billable units == ledger == what the double counts,

each outbox identifier is accepted by the double exactly once, no two calls for one customer
and meter ever overlapped at the double, and the only dead letters are those of a customer
deliberately left without a ``stripe_customer_id`` (a permanent error). Each SIGKILL is timed
to land while the double is processing a call (stored at Stripe, never marked sent): that
event must come back as an "already exists" duplicate after the restart.

A second test sends SIGTERM while a call is being processed: shutdown must not overlap it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ADMIN_TOKEN, SOAK, write_config
from tests.proxy_process import ProxyProcess
from tests.stripe_double.faults import FAULT_KINDS

ROOT = Path(__file__).resolve().parent.parent
UNIT = 1_000_000                     # micro-units per unit in the ledger

N_REQUESTS = 20_000 if SOAK else 8_000     # fully received metered requests, at least
N_CUSTOMERS = 50
CONCURRENCY = 32
KILL_AT = (N_REQUESTS // 3, 2 * N_REQUESTS // 3)
FAULT_RATE = 0.20
UNMAPPED = "c_unmapped"              # no stripe_customer_id: its events must be dead letters
EVENT_NAMES = {"api_calls": "api_calls", "llm_tokens": "llm_tokens", "units": "units"}

RULES = """\
version: 1
meters:
  api_calls: {stripe_event_name: api_calls}
  llm_tokens: {stripe_event_name: llm_tokens}
  units: {stripe_event_name: units}
rules:
  - name: health
    match: {path: /healthz}
    auth: none
  - name: items
    match: {methods: [GET], path: /v1/items}
    usage:
      - {meter: api_calls, quantity: 1}
  - name: chat
    match: {methods: [POST], path: /v1/chat/completions}
    usage:
      - {meter: llm_tokens, preset: openai_chat}
  - name: stream
    match: {methods: [GET], path: /v1/stream}
    usage:
      - {meter: units, quantity: response.json.units}
"""


def chaos_config(tmp: Path, upstream: str, stripe_url: str, timeout: str) -> Path:
    """A proxy config, flushing every 300 ms to the Stripe double; the process binds free
    ports at its first start and keeps them across restarts (``ProxyProcess``)."""
    cfg = write_config(
        tmp, upstream, rules_text=RULES,
        stripe={"api_key": "sk_test_chaos", "sink": "meter_events",
                "api_base": stripe_url, "meter_events_base": stripe_url,
                "flush_interval": "300ms", "timeout": timeout, "max_rate": 2000})
    return cfg


# ---- what the clients saw -------------------------------------------------------------------

@dataclass
class Sent:
    request_id: str
    customer: str
    meter: str
    units: int                # what this request must bill, computed by the client itself
    outcome: str = ""         # received | conn_error | status_<n>
    kill_during: bool = False  # a SIGKILL happened while the request was in flight


@dataclass
class Load:
    received: int = 0
    kills: int = 0            # SIGKILLs so far (a request compares before/after)
    generation: int = 0       # proxy process generation (new connections after a restart)


def plan_request(rng: random.Random, customer: str) -> tuple[str, str, Any, str, int]:
    """(method, path, json body or None, meter, units) chosen so the client knows the units."""
    kind = rng.randrange(4)
    if kind == 0:
        return "GET", "/v1/items", None, "api_calls", 1
    if kind in (1, 2):
        p, c = rng.randint(1, 60), rng.randint(1, 120)
        body = {"prompt_tokens": p, "completion_tokens": c, "stream": kind == 2}
        path = "/v1/chat/completions" + ("?chunks=2" if kind == 2 else "")
        return "POST", path, body, "llm_tokens", p + c
    n = rng.randint(1, 6)   # SSE; the last event's units == n
    return "GET", f"/v1/stream?chunks={n}", None, "units", n


# ---- the test -------------------------------------------------------------------------------

@pytest.mark.timeout(300)
async def test_chaos_delivery_to_stripe(tmp_path: Path, upstream: str,
                                        stripe_double_factory: Callable[..., Any]) -> None:
    t0 = time.monotonic()
    double = await stripe_double_factory(seed=20240917, processing_delay=0.002,
                                         hang_seconds=1.5)
    st = double.state
    for name in EVENT_NAMES.values():
        st.add_meter(name)
    per_kind = FAULT_RATE / len(FAULT_KINDS)
    st.faults.set_probabilities("meter_events", {k: per_kind for k in FAULT_KINDS})

    cfg = chaos_config(tmp_path, upstream, double.url, timeout="1s")
    ah = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    proxy = ProxyProcess(cfg, tmp_path / "proxy.log")
    proxy.spawn()
    try:
        await proxy.wait_ready()
        keys: dict[str, str] = {}
        customers = [f"c{i:02d}" for i in range(N_CUSTOMERS)]
        async with aiohttp.ClientSession() as s:
            for i, cid in enumerate([*customers, UNMAPPED]):
                body: dict[str, Any] = {"id": cid}
                if cid != UNMAPPED:
                    body["stripe_customer_id"] = f"cus_{i}"
                async with s.post(proxy.admin_url + "/admin/customers", json=body, headers=ah) as r:
                    assert r.status in (200, 201), await r.text()
                async with s.post(proxy.admin_url + f"/admin/customers/{cid}/keys", json={"name": "k"},
                                  headers=ah) as r:
                    assert r.status == 201, await r.text()
                    keys[cid] = (await r.json())["key"]
        stripe_ids = {cid: f"cus_{i}" for i, cid in enumerate(customers)}

        # -- load, with SIGKILLs ------------------------------------------------------------
        load = Load()
        sent: list[Sent] = []
        up = asyncio.Event()
        up.set()
        unexpected: list[str] = []
        milestones = {at: asyncio.Event() for at in KILL_AT}
        timeout = aiohttp.ClientTimeout(total=30)

        async def client(w: int) -> None:
            rng = random.Random(w)
            session: aiohttp.ClientSession | None = None
            gen = -1
            try:
                while load.received < N_REQUESTS:
                    await up.wait()
                    if gen != load.generation:   # never reuse a pooled connection to a dead proxy
                        if session is not None:
                            await session.close()
                        session = aiohttp.ClientSession(timeout=timeout)
                        gen = load.generation
                    assert session is not None
                    # the unmapped customer gets ~2% of the traffic
                    cid = UNMAPPED if rng.random() < 0.02 else rng.choice(customers)
                    method, path, jbody, meter, units = plan_request(rng, cid)
                    req = Sent(str(uuid.uuid4()), cid, meter, units)
                    sent.append(req)
                    kills_before = load.kills
                    headers = {"Authorization": f"Bearer {keys[cid]}",
                               "X-Request-Id": req.request_id}
                    try:
                        async with session.request(method, proxy.url + path, json=jbody,
                                                   headers=headers) as r:
                            await r.read()   # raises if the body is cut short
                            if r.status == 200:
                                assert r.headers.get("X-Request-Id") == req.request_id
                                req.outcome = "received"
                                load.received += 1
                                if load.received in milestones:
                                    milestones[load.received].set()
                            else:
                                req.outcome = f"status_{r.status}"
                                unexpected.append(f"{req.request_id}: {r.status} "
                                                  f"{(await r.text())[:200]}")
                    except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
                        req.outcome = "conn_error"
                        req.kill_during = load.kills != kills_before
                        if not req.kill_during:
                            unexpected.append(f"{req.request_id}: {exc!r} with no kill")
                        # retried with a NEW request id once the proxy is back
            finally:
                if session is not None:
                    await session.close()

        kill_report: list[dict[str, Any]] = []

        killed_mid_call: set[str] = set()

        def in_call() -> set[str]:
            """Identifiers the double is processing right now (stored, not yet answered)."""
            latest: dict[tuple[Any, Any], Any] = {}
            for c in st.call_log[-300:]:
                if c.route == "meter_events":
                    latest[(c.params.get("payload", {}).get("stripe_customer_id"),
                            c.params.get("event_name"))] = c
            return {str(c.params["identifier"]) for key, c in latest.items()
                    if key in st.in_flight and c.status is None and c.fault is None}

        async def killer() -> None:
            for at in KILL_AT:
                await milestones[at].wait()
                # kill mid-flush, in the worst spot: while the double processes a call, so
                # the event is stored at Stripe but the proxy never learns it (send, no mark)
                with contextlib.suppress(TimeoutError):
                    await st.wait_for(lambda: bool(in_call()), within=5)
                caught = in_call()
                up.clear()
                proxy.kill()
                load.kills += 1
                load.generation += 1
                killed_mid_call.update(caught)
                kill_report.append({"at_received": load.received, "mid_call": sorted(caught)})
                proxy.spawn()
                await proxy.wait_ready()
                up.set()

        t_load = time.monotonic()
        killer_task = asyncio.ensure_future(killer())
        await asyncio.gather(*(client(w) for w in range(CONCURRENCY)))
        await killer_task
        load_seconds = time.monotonic() - t_load
        assert not unexpected, unexpected[:10]
        assert load.kills >= 2

        # -- final flush: until nothing is pending (faults keep coming) ----------------------
        t_flush = time.monotonic()
        flushes = 0
        async with aiohttp.ClientSession(timeout=timeout) as s:
            deadline = time.monotonic() + 90
            while True:
                async with s.post(proxy.admin_url + "/admin/flush", headers=ah) as r:
                    assert r.status == 200, await r.text()
                    report = await r.json()
                flushes += 1
                async with s.get(proxy.admin_url + "/admin/outbox?status=pending", headers=ah) as r:
                    assert r.status == 200, await r.text()
                    pending_body = await r.json()
                pending = pending_body["events"]
                if not pending:
                    break
                assert time.monotonic() < deadline, \
                    f"outbox still has {len(pending)} pending events; last flush {report}"
                if report.get("circuit_open"):
                    await asyncio.sleep(0.2)   # the breaker's cool-down is a few seconds
        flush_seconds = time.monotonic() - t_flush
        rc = proxy.terminate()
        assert rc == 0, f"proxy exit code {rc} on SIGTERM; see {proxy.log}"
    finally:
        proxy.ensure_dead()

    # ---- what the ledger says ---------------------------------------------------------------
    db = sqlite3.connect(tmp_path / "meter.db")
    audit = db.execute("SELECT request_id, customer_id, meter, quantity, status, billable"
                       " FROM audit").fetchall()
    by_rid = {s.request_id: s for s in sent}
    audit_rids = Counter(r[0] for r in audit)
    assert max(audit_rids.values()) == 1, "a request was recorded twice"

    received = {s.request_id for s in sent if s.outcome == "received"}
    assert len(received) >= N_REQUESTS
    # (a) every request a client fully received is in the ledger
    missing = received - audit_rids.keys()
    assert not missing, f"{len(missing)} fully received responses are not in the ledger"
    # (b) with strict durability a request may be committed and then killed before its final
    # bytes reached the client: the ledger may hold such requests, but only requests that
    # failed with a connection error because of a SIGKILL, at most one per client per kill
    in_flight_billed = audit_rids.keys() - received
    assert in_flight_billed <= {s.request_id for s in sent
                                if s.outcome == "conn_error" and s.kill_during}
    assert len(in_flight_billed) <= CONCURRENCY * load.kills
    # each audited request billed exactly what its client computed, and only 2xx are billed
    for rid, cust, meter, qty, status, billable in audit:
        req = by_rid[rid]
        assert (cust, meter, qty, billable) == (req.customer, req.meter, req.units * UNIT,
                                               req.units * UNIT), (rid, req)
        assert status == 200
    # client-observed billable units = units of the requests the clients received, plus the
    # units of the requests cut by a SIGKILL that the ledger recorded (see (b))
    client_units: dict[tuple[str, str], int] = defaultdict(int)
    for rid in received | in_flight_billed:
        req = by_rid[rid]
        client_units[(req.customer, req.meter)] += req.units
    # (c) ledger (minute aggregates) == client-observed, per customer and meter
    ledger = {(c, m): q for c, m, q in db.execute(
        "SELECT customer_id, meter, SUM(quantity) FROM usage_minute GROUP BY 1, 2")}
    assert all(q % UNIT == 0 for q in ledger.values())
    assert {k: v // UNIT for k, v in ledger.items()} == dict(client_units)
    assert len({c for c, _ in ledger}) == N_CUSTOMERS + 1
    assert {m for _, m in ledger} == set(EVENT_NAMES)
    # everything was staged; nothing is left pending or carried
    (unstaged,) = db.execute("SELECT COUNT(*) FROM usage_minute WHERE billable > reported"
                             " OR covered > reported_covered").fetchone()
    assert unstaged == 0
    (carried,) = db.execute("SELECT COALESCE(SUM(remainder), 0) FROM carry").fetchone()
    assert carried == 0
    # (e) the outbox has no pending rows
    outbox = db.execute("SELECT identifier, customer_id, event_name, value, status"
                        " FROM outbox").fetchall()
    outcomes = dict(db.execute("SELECT identifier, outcome FROM outbox"))
    assert not [o for o in outbox if o[4] == "pending"]
    # (f) dead letters only for the deliberately unmapped customer, and all of its usage
    dead = [o for o in outbox if o[4] == "dead"]
    assert dead, "the unmapped customer's usage did not become dead letters"
    assert {o[1] for o in dead} == {UNMAPPED}
    assert not [o for o in outbox if o[1] == UNMAPPED and o[4] != "dead"]
    dead_units: dict[str, int] = defaultdict(int)
    for _, _, event_name, value, _ in dead:
        dead_units[event_name] += value
    assert dead_units == {EVENT_NAMES[m]: q // UNIT for (c, m), q in ledger.items()
                          if c == UNMAPPED}
    db.close()

    # ---- what the double counts ---------------------------------------------------------------
    sent_rows = {o[0]: o for o in outbox if o[4] == "sent"}
    accepted = st.accepted_events()
    accepted_ids = Counter(e.identifier for e in accepted)
    # (d) every identifier accepted once; exactly the outbox's sent events, as staged
    assert max(accepted_ids.values()) == 1
    assert set(accepted_ids) == set(sent_rows)
    assert {e.customer for e in accepted} <= set(stripe_ids.values())
    for e in accepted:
        _, cust, event_name, value, _ = sent_rows[e.identifier]
        assert (e.customer, e.event_name, e.value) == (stripe_ids[cust], event_name, value)
    for cust in customers:
        for meter, event_name in EVENT_NAMES.items():
            assert st.totals(stripe_ids[cust], event_name) == ledger.get((cust, meter), 0) \
                // UNIT == client_units.get((cust, meter), 0), (cust, meter)
    # the only 400s were "already exists" answers to resends of accepted identifiers
    for call in st.calls("meter_events"):
        if call.status is not None and 400 <= call.status < 500 and call.status != 429:
            assert call.status == 400 and call.params.get("identifier") in accepted_ids, call
    assert st.errors == []
    # the kills landed mid-call: those events were stored by the double, resent by the
    # restarted proxy under the same identifier, and answered "already exists" (delivered)
    assert killed_mid_call, f"no kill landed while the double was processing a call: " \
                            f"{kill_report}"
    for ident in killed_mid_call:
        assert accepted_ids[ident] == 1 and st.identifier_count(ident) >= 2, ident
        assert outcomes[ident] == "duplicate", (ident, outcomes[ident])
    # (g) calls for one customer and meter never overlapped
    assert st.concurrency_violations == []

    injected = Counter(f for route, f in st.faults.injected if route == "meter_events")
    assert set(injected) == set(FAULT_KINDS), injected
    duplicates = sum(n - 1 for n in st.identifier_seen.values() if n > 1)
    calls = len(st.calls("meter_events"))
    total = time.monotonic() - t0
    print(f"\nchaos: {len(sent)} requests sent, {len(received)} received, "
          f"{len(in_flight_billed)} billed but cut by a kill, kills={load.kills} "
          f"{kill_report}, starts={proxy.starts}\n"
          f"  load {load_seconds:.1f}s, final flush {flush_seconds:.1f}s ({flushes} flushes),"
          f" total {total:.1f}s\n"
          f"  meter_events calls={calls}, faults={dict(injected)} "
          f"({sum(injected.values()) / calls:.1%}), accepted={len(accepted)}, "
          f"duplicates seen by the double={duplicates}, dead letters={len(dead)}")
    assert total < 180, f"chaos test took {total:.0f}s (budget: 3 minutes)"


@pytest.mark.timeout(60)
async def test_sigterm_mid_call_never_overlaps_calls_for_one_customer_and_meter(
        tmp_path: Path, upstream: str, stripe_double_factory: Callable[..., Any]) -> None:
    """SIGTERM while a meter event call is being processed (2 s, under the 5 s timeout): the
    shutdown's final flush must not send a second call for that customer and meter before
    the first one has ended (Stripe: one concurrent call per customer and meter)."""
    double = await stripe_double_factory(processing_delay=2.0)
    st = double.state
    for name in ("api_calls", "llm_tokens", "bytes_in", "units"):   # the rules' meters
        st.add_meter(name)
    cfg = chaos_config(tmp_path, upstream, double.url, timeout="5s")
    ah = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    proxy = ProxyProcess(cfg, tmp_path / "proxy.log")
    proxy.spawn()
    try:
        await proxy.wait_ready()
        async with aiohttp.ClientSession() as s:
            async with s.post(proxy.admin_url + "/admin/customers", headers=ah,
                              json={"id": "c0", "stripe_customer_id": "cus_0"}) as r:
                assert r.status in (200, 201)
            async with s.post(proxy.admin_url + "/admin/customers/c0/keys", json={"name": "k"},
                              headers=ah) as r:
                key = (await r.json())["key"]
            for _ in range(3):
                async with s.get(f"{proxy.url}/v1/items",
                                 headers={"Authorization": f"Bearer {key}"}) as r:
                    await r.read()
                    assert r.status == 200
        await st.wait_for(lambda: bool(st.in_flight), within=10)
        rc = await asyncio.to_thread(proxy.terminate)
        assert rc == 0
    finally:
        proxy.ensure_dead()
    await st.wait_for(lambda: not st.in_flight, within=5)
    assert st.totals("cus_0", "api_calls") == 3
    assert st.concurrency_violations == []
