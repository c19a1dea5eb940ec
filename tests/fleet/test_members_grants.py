"""Acceptance on real processes: the grant-level credit state fleet-wide.

Two members spend one customer's two grants. Shipping debits the grants in burn order
(priority first), each request once; a threshold alert crossed by traffic on both members
fires once for the fleet, and so does ``depleted``; every member's admin API then shows the
same per-grant remainders and the same fleet account with each member's lease
(``fleet_credits``, ``GET /admin/fleet``).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from tests.fleet.members import FleetOfMembers, RunningMember, admin_call, fleet_of
from tests.helpers import wait_until

C = 1_000_000
TIMEOUT = aiohttp.ClientTimeout(total=30)
RULES = """\
version: 1
meters:
  api_calls: {stripe_event_name: api_calls}
rules:
  - name: items
    match: {path: "/**"}
    usage:
      - {meter: api_calls, quantity: 1, credits: 1}
"""


async def _burst(s: aiohttp.ClientSession, members: list[RunningMember], key: str,
                 n: int) -> Counter[int]:
    async def one(i: int) -> int:
        async with s.get(members[i % len(members)].url + "/v1/items",
                         headers={"Authorization": f"Bearer {key}"}) as r:
            await r.read()
            return r.status
    return Counter(await asyncio.gather(*(one(i) for i in range(n))))


async def _fetch(fleet: FleetOfMembers, sql: str) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(fleet.dsn)
    try:
        return [tuple(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()


async def _debits(fleet: FleetOfMembers) -> dict[str, int]:
    rows = await _fetch(fleet, "SELECT COALESCE(grant_id, '(debt)'), SUM(amount) FROM"
                               " credit_entries WHERE customer_id = 'cust' AND kind IN"
                               " ('debit', 'debt') GROUP BY 1")
    return {str(r[0]): int(r[1]) for r in rows}


async def _alerts(fleet: FleetOfMembers) -> list[tuple[Any, ...]]:
    return await _fetch(fleet, "SELECT threshold, period_key FROM alerts WHERE"
                               " customer_id = 'cust' ORDER BY threshold")


def _grants(view: dict[str, Any]) -> dict[str, str]:
    return {g["grant_id"]: g["remaining"] for g in view["grants"]}


async def test_grants_alerts_and_views_are_one_for_the_fleet(tmp_path: Path,
                                                             upstream: str) -> None:
    async with fleet_of(tmp_path, upstream, rules_text=RULES,
                        fleet={"lease_floor": "4"},
                        extra={"alerts": {"thresholds": [0.5]}}) as fleet:
        a, b = await fleet.start(["a", "b"])
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=TIMEOUT) as s:
            await admin_call(s, a, "POST", "/admin/customers", {"id": "cust", "overage": "block"})
            pack = await admin_call(s, a, "POST", "/admin/customers/cust/grants",
                                    {"credits": "30", "idempotency_key": "pack"})
            promo = await admin_call(s, b, "POST", "/admin/customers/cust/grants",
                                     {"credits": "10", "priority": 10, "idempotency_key": "promo"})
            key: str = (await admin_call(s, a, "POST", "/admin/customers/cust/keys"))["key"]
            await asyncio.sleep(1.0)           # the key reaches every member (the stated bound)

            # 24 of 40 credits on both members: the promo (priority 10) burns first
            assert await _burst(s, [a], key, 12) == {200: 12}
            assert await _burst(s, [b], key, 12) == {200: 12}
            spent = await wait_until(lambda: _debits(fleet), ok=lambda d: sum(d.values()) == 24 * C,
                                     timeout=15, what="24 requests' grant debits shipped")
            assert spent == {promo["grant_id"]: 10 * C, pack["grant_id"]: 14 * C}, spent
            # each journal row's entries exactly once
            dup = await _fetch(fleet, "SELECT member_id, member_seq, member_item, count(*) FROM"
                                      " credit_entries WHERE member_id IS NOT NULL"
                                      " GROUP BY 1, 2, 3 HAVING count(*) > 1")
            assert dup == []

            # 0.5 crossed with traffic on both members: one alert for the fleet
            fired = await wait_until(lambda: _alerts(fleet), ok=lambda r: len(r) >= 1,
                                     timeout=10, what="the 0.5 threshold alert")
            assert [r[0] for r in fired] == ["0.5"], fired

            # both members show the same per-grant state (each reloads what the other spent)
            want = {promo["grant_id"]: "0", pack["grant_id"]: "16"}
            for m in (a, b):
                await wait_until(lambda m=m: admin_call(s, m, "GET", "/admin/customers/cust/grants"),
                                 ok=lambda v: _grants(v) == want, timeout=10,
                                 what=f"{m.name}'s grant view")

            # the fleet's account and each member's lease: the same answer on both members
            views = [await admin_call(s, m, "GET", "/admin/customers/cust") for m in (a, b)]
            fc = [v["fleet_credits"] for v in views]
            for f in fc:
                for lease in f["leases"]:
                    del lease["expires_in_seconds"]
            assert fc[0] == fc[1], fc
            assert {x["member_id"] for x in fc[0]["leases"]} == {"a", "b"}
            assert fc[0]["balance"] == "40" and fc[0]["settled"] == "24"
            escrow = sum(float(x["granted"]) - float(x["reported"]) for x in fc[0]["leases"])
            assert float(fc[0]["escrowed"]) == escrow
            assert float(fc[0]["available"]) == 16 - escrow
            status = await admin_call(s, b, "GET", "/admin/fleet")
            mine = [c for c in status["customers"] if c["customer_id"] == "cust"]
            assert len(mine) == 1 and set(mine[0]["leases"]) == {"a", "b"}, status
            assert mine[0]["available"] == fc[0]["available"]

            # run it dry on both members: depleted fires once, 0.5 never again
            rest = await _burst(s, [a, b], key, 30)
            assert rest[200] == 16 and rest[402] == 14, rest
            await wait_until(lambda: _debits(fleet), ok=lambda d: sum(d.values()) == 40 * C,
                             timeout=15, what="all 40 credits debited")
            assert (await _debits(fleet)).get("(debt)") is None
            fired = await wait_until(lambda: _alerts(fleet), ok=lambda r: len(r) >= 2,
                                     timeout=10, what="the depleted alert")
            assert sorted(r[0] for r in fired) == ["0.5", "depleted"], fired
            await asyncio.sleep(1.0)           # five more reload passes on each member
            assert len(await _alerts(fleet)) == 2
