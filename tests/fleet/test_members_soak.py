"""Acceptance (issue 11, #1), the fleet soak: three members on one PostgreSQL, 20,000+
metered requests over 50 customers spread across all three, one member SIGKILLed and
restarted mid-load, PostgreSQL unreachable for 10 s mid-load (every member reaches it
through ``tcp_cut.CuttableRelay``), Stripe faults at 20%. Afterwards, per customer and meter:
client-observed == the shared usage ledger == what the Stripe double counted, each
identifier accepted once, no concurrent calls for one customer and meter.

A profile, not part of the default suite (not even collected without the variable:
``tests/fleet/conftest.py``; about 30 s on two cores):
``METERPROXY_FLEET_SOAK=1 .venv/bin/pytest tests/fleet/test_members_soak.py`` (docs/testing.md).
``METERPROXY_FLEET_SOAK_REQUESTS`` changes the request count (default 20,000).

Client-observed: the requests whose 200 response the client read in full, plus the requests
cut by the SIGKILL that the ledger recorded (strict durability journals a response before
its last bytes leave, so a cut one may be billed); nothing else may be in the ledger.
"""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.fleet.members import RunningMember, admin_call, fleet_of
from tests.fleet.tcp_cut import CuttableRelay
from tests.helpers import wait_until
from tests.stripe_double.faults import FAULT_KINDS

N = int(os.environ.get("METERPROXY_FLEET_SOAK_REQUESTS", "20000"))
CUSTOMERS = [f"c{i:02d}" for i in range(50)]
METERS = ("api_calls", "llm_tokens", "bytes_in", "units")
UNIT = 1_000_000
CONCURRENCY = 32


@pytest.mark.timeout(900)
async def test_fleet_soak_totals_agree_everywhere(
        tmp_path: Path, upstream: str, stripe_double_factory: Callable[..., Any]) -> None:
    double = await stripe_double_factory(seed=11, processing_delay=0.002, hang_seconds=1.5)
    st = double.state
    for name in METERS:
        st.add_meter(name)
    st.faults.set_probabilities("meter_events", {k: 0.20 / len(FAULT_KINDS) for k in FAULT_KINDS})
    relay = CuttableRelay()
    await relay.start()
    stripe = {"api_key": "sk_test_soak", "sink": "meter_events", "api_base": double.url,
              "meter_events_base": double.url, "flush_interval": "500ms", "timeout": "1s",
              "max_rate": 2000}
    try:
        async with fleet_of(tmp_path, upstream, stripe=stripe) as fleet:
            direct = fleet.dsn
            fleet.dsn = direct.replace(":5432/", f":{relay.port}/")   # members go through it
            members = await fleet.start(["a", "b", "c"])
            await _run(fleet_members=members, direct=direct, relay=relay, st=st)
    finally:
        await relay.stop()


async def _run(fleet_members: list[RunningMember], direct: str, relay: CuttableRelay,
               st: Any) -> None:
    a = fleet_members[0]
    live = list(fleet_members)
    keys: dict[str, str] = {}
    async with aiohttp.ClientSession() as s:
        for i, cid in enumerate(CUSTOMERS):
            await admin_call(s, a, "POST", "/admin/customers",
                             {"id": cid, "stripe_customer_id": f"cus_{i}"})
            keys[cid] = (await admin_call(s, a, "POST", f"/admin/customers/{cid}/keys"))["key"]
    await asyncio.sleep(1.0)
    sent: dict[str, tuple[str, str, int]] = {}      # request id -> (customer, meter, units)
    received: set[str] = set()
    cut_by_kill: set[str] = set()
    kills = 0
    done = 0
    events = {N // 4: "kill", N // 2: "restart", 2 * N // 3: "cut"}
    fired: set[str] = set()

    async def client(w: int) -> None:
        nonlocal done
        rng = random.Random(w)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            while done < N:
                cid = rng.choice(CUSTOMERS)
                m = rng.choice(live)
                rid = uuid.uuid4().hex
                n = rng.randint(1, 5)
                path, meter, units = (("/v1/items", "api_calls", 1) if rng.random() < 0.5
                                      else (f"/v1/stream?chunks={n}", "units", n))
                sent[rid] = (cid, meter, units)
                before = kills
                try:
                    async with s.get(m.url + path, headers={
                            "Authorization": f"Bearer {keys[cid]}", "X-Request-Id": rid}) as r:
                        await r.read()
                        if r.status == 200:
                            received.add(rid)
                            done += 1
                except (aiohttp.ClientError, TimeoutError):
                    if kills != before or m not in live:
                        cut_by_kill.add(rid)
                    await asyncio.sleep(0.05)

    async def director() -> None:
        nonlocal kills
        victim = fleet_members[1]
        while done < N:
            await asyncio.sleep(0.05)
            for at, what in events.items():
                if done >= at and what not in fired:
                    fired.add(what)
                    if what == "kill":
                        live.remove(victim)
                        kills += 1
                        victim.proc.kill()
                    elif what == "restart":
                        victim.proc.spawn()
                        await victim.proc.wait_ready(60)
                        live.append(victim)
                    else:
                        relay.cut()
                        await asyncio.sleep(10)
                        relay.restore()

    await asyncio.gather(director(), *(client(w) for w in range(CONCURRENCY)))
    assert fired == {"kill", "restart", "cut"}
    # every member ships everything and the leader delivers everything
    conn = await asyncpg.connect(direct)
    try:
        async def ledger() -> dict[str, tuple[str, str, int]]:
            rows = await conn.fetch("SELECT request_id, customer_id, meter, quantity "
                                    "FROM usage_ledger")
            return {r[0]: (r[1], r[2], int(r[3]) // UNIT) for r in rows}
        got = await wait_until(ledger, ok=lambda led: received <= set(led), timeout=60,
                               interval=0.5, what="every received request in the ledger")
        # (a) client-observed == the shared ledger, request by request
        extra = set(got) - received
        assert extra <= cut_by_kill, sorted(extra - cut_by_kill)[:5]
        for rid, row in got.items():
            assert row == sent[rid], (rid, row, sent[rid])
        per: Counter[tuple[str, str]] = Counter()
        for cid, meter, units in got.values():
            per[(cid, meter)] += units

        async def pending() -> int:
            return int(await conn.fetchval(
                "SELECT count(*) FROM outbox WHERE status = 'pending'") or 0) + int(
                await conn.fetchval("SELECT count(*) FROM usage_minute WHERE billable > "
                                    "reported") or 0)
        await wait_until(pending, ok=lambda n: n == 0, timeout=180, interval=1.0,
                         what="everything staged and delivered")
    finally:
        await conn.close()
    # (b) the Stripe double counted exactly the ledger, per customer and meter
    stripe_per: dict[tuple[str, str], int] = defaultdict(int)
    for i, cid in enumerate(CUSTOMERS):
        for meter in METERS:
            if (t := st.totals(f"cus_{i}", meter)):
                stripe_per[(cid, meter)] = t
    assert dict(stripe_per) == dict(per)
    accepted = Counter(e.identifier for e in st.accepted_events())
    assert max(accepted.values()) == 1
    assert st.concurrency_violations == []
    assert len(received) >= N
