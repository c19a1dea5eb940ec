"""Acceptance (issue 11, #4) on real processes: the flusher's leader is SIGKILLed; another
member takes the duty within the stated bound (``leader_ttl x 4/3`` after the last
renewal, docs/fleet.md) and every metered request reaches the Stripe double exactly once:
no identifier accepted twice, none lost, no overlapping calls for one customer and meter."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import jsonschema
from ruamel.yaml import YAML

from tests.fleet.members import AH, RunningMember, admin_call, fleet_of
from tests.helpers import wait_until

METERS = ("api_calls", "llm_tokens", "bytes_in", "units")
CUSTOMERS = ("c0", "c1", "c2")
LEADER_TTL = 3.0
FLEET_SCHEMA = YAML(typ="safe").load(
    (Path(__file__).resolve().parents[2] / "proxy/static/openapi.yaml").read_text()
)["paths"]["/admin/fleet"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]


async def _load(s: aiohttp.ClientSession, members: list[RunningMember], keys: dict[str, str],
                n: int, sent: Counter[str]) -> None:
    async def one(i: int) -> None:
        cid = CUSTOMERS[i % len(CUSTOMERS)]
        m = members[i % len(members)]
        async with s.get(m.url + "/v1/items",
                         headers={"Authorization": f"Bearer {keys[cid]}"}) as r:
            await r.read()
            assert r.status == 200, (m.name, r.status)
            sent[cid] += 1
    for start in range(0, n, 30):
        await asyncio.gather(*(one(i) for i in range(start, min(n, start + 30))))


async def _holder(dsn: str) -> tuple[str, int] | None:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow("SELECT holder, fence FROM leader_leases WHERE duty = "
                                  "'flusher' AND expires_at > now()")
    finally:
        await conn.close()
    return None if row is None else (str(row[0]), int(row[1]))


async def test_flusher_leader_killed_another_takes_over_nothing_twice_or_lost(
        tmp_path: Path, upstream: str, stripe_double_factory: Callable[..., Any]) -> None:
    double = await stripe_double_factory(processing_delay=0.002)
    st = double.state
    for name in METERS:
        st.add_meter(name)
    stripe = {"api_key": "sk_test_fleet", "sink": "meter_events", "api_base": double.url,
              "meter_events_base": double.url, "flush_interval": "300ms", "timeout": "1s",
              "max_rate": 2000}
    async with fleet_of(tmp_path, upstream, stripe=stripe,
                        fleet={"leader_ttl": f"{LEADER_TTL}s"}) as fleet:
        members = await fleet.start(["a", "b", "c"])
        sent: Counter[str] = Counter()
        async with aiohttp.ClientSession() as s:
            keys = {}
            for i, cid in enumerate(CUSTOMERS):
                await admin_call(s, members[0], "POST", "/admin/customers",
                                 {"id": cid, "stripe_customer_id": f"cus_{i}"})
                keys[cid] = (await admin_call(s, members[0], "POST",
                                              f"/admin/customers/{cid}/keys"))["key"]
            await wait_until(lambda: _holder(fleet.dsn), ok=lambda h: h is not None,
                             timeout=10, what="a flusher leader")
            await asyncio.sleep(1.0)      # the keys reach every member (the stated bound)
            await _load(s, members, keys, 150, sent)

            def delivered() -> dict[str, int]:
                return {cid: st.totals(f"cus_{i}", "api_calls")
                        for i, cid in enumerate(CUSTOMERS)}
            await wait_until(delivered, ok=lambda d: d == dict(sent), timeout=20,
                             what="the first load at the double")
            before = await _holder(fleet.dsn)
            assert before is not None
            leader = next(m for m in members if m.name == before[0])
            leader.proc.kill()
            killed_at = time.monotonic()
            rest = [m for m in members if m is not leader]
            await _load(s, rest, keys, 150, sent)
            after = await wait_until(lambda: _holder(fleet.dsn),
                                     ok=lambda h: h is not None and h[0] != before[0],
                                     timeout=LEADER_TTL * 4 / 3 + 5, interval=0.05,
                                     what="a new flusher leader")
            took = time.monotonic() - killed_at
            assert after[1] > before[1]          # a new fence
            assert took <= LEADER_TTL * 4 / 3 + 1.0, took   # + one statement and polling
            await wait_until(delivered, ok=lambda d: d == dict(sent), timeout=30,
                             what="everything at the double after the failover")
            # GET /admin/fleet and the metrics on any survivor name the new leader
            new_leader = next(m for m in members if m.name == after[0])
            for m in rest:
                view = await admin_call(s, m, "GET", "/admin/fleet")
                jsonschema.validate(view, FLEET_SCHEMA)     # as proxy/static/openapi.yaml says
                assert view["flusher"] == {"leader": after[0], "fence": after[1]}, view
                assert {x["id"] for x in view["members"]} == {"a", "b", "c"}
                assert view["this_member"]["leads_flusher"] == (m is new_leader)
                async with s.get(m.admin + "/metrics", headers=AH) as r:
                    text = await r.text()
                assert f"meterproxy_fleet_leader {1.0 if m is new_leader else 0.0}" in text
    assert sum(sent.values()) == 300
    accepted = Counter(e.identifier for e in st.accepted_events())
    assert max(accepted.values()) == 1
    assert st.concurrency_violations == []
    assert st.errors == []


async def test_every_member_answers_readyz_whoever_leads_the_flusher(
        tmp_path: Path, upstream: str) -> None:
    """``/readyz`` reads the flush lag from the fleet's outbox; a member that does not lead
    the flusher answers it too (200 ready), instead of failing on its fenced outbox."""
    async with fleet_of(tmp_path, upstream, fleet={"leader_ttl": f"{LEADER_TTL}s"}) as fleet:
        members = await fleet.start(["a", "b"])
        await wait_until(lambda: _holder(fleet.dsn), ok=lambda h: h is not None,
                         timeout=10, what="a flusher leader")
        async with aiohttp.ClientSession() as s:
            for m in members:
                async with s.get(m.admin + "/readyz") as r:
                    body = await r.text()
                    assert r.status == 200, (m.name, r.status, body)


async def test_a_dead_letter_is_replayed_from_any_member(tmp_path: Path, upstream: str) -> None:
    """``POST /admin/dead-letters/{id}/replay`` on a member that does not lead the flusher
    makes the row pending again (a conditional update any member may make; the leader sends
    it), instead of failing on the flusher's fenced outbox."""
    async with fleet_of(tmp_path, upstream, fleet={"leader_ttl": f"{LEADER_TTL}s"}) as fleet:
        members = await fleet.start(["a", "b"])
        leader = await wait_until(lambda: _holder(fleet.dsn), ok=lambda h: h is not None,
                                  timeout=10, what="a flusher leader")
        other = next(m for m in members if m.name != leader[0])
        conn = await asyncpg.connect(fleet.dsn)
        try:
            oid = await conn.fetchval(
                "INSERT INTO outbox(identifier, customer_id, meter, event_name, value,"
                " window_start, timestamp, created_at, status, dead_at, last_error)"
                " VALUES ('mp_x_1', 'c0', 'api_calls', 'api_calls', 1, 0, 0, 0, 'dead', 1,"
                " 'no stripe customer') RETURNING id")
            await conn.execute("INSERT INTO dead_letters(outbox_id, reason, dead_at)"
                               " VALUES ($1, 'no stripe customer', 1)", oid)
            async with aiohttp.ClientSession() as s, s.post(
                    other.admin + f"/admin/dead-letters/{oid}/replay?restamp=1",
                    headers=AH) as r:
                body = await r.text()
                assert r.status == 200, (r.status, body)
            assert await conn.fetchval("SELECT replayed_at FROM dead_letters"
                                       " WHERE outbox_id = $1", oid) is not None
        finally:
            await conn.close()
