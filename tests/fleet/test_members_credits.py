"""Acceptance (issue 11, #2) on real processes: credit leases across three members on one
PostgreSQL database.

- 100 credits, fixed cost 1, 300 concurrent requests spread over three members: exactly 100
  answered 200 fleet-wide, the other 200 answered 402, the balance exactly 0 afterwards;
- the same with a member SIGKILLed while it holds a lease: its unspent credit comes back
  after the lease's expiry (``lease_ttl + reaper_grace``) and is spent by the others;
- post-response quantities (held at an estimate, settled at the actual): the overspend is at
  most the sum over requests in flight of (actual - hold), and it is paid back as debt
  before the member admits that customer again (docs/fleet.md, Bounds).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import aiohttp
import asyncpg

from tests.fleet.members import AH, FleetOfMembers, RunningMember, admin_call, fleet_of
from tests.fleet.members import CREDIT_RULES as RULES
from tests.helpers import wait_until

C = 1_000_000
TIMEOUT = aiohttp.ClientTimeout(total=30)     # a stuck request fails the test, not the suite


async def _customer(s: aiohttp.ClientSession, m: RunningMember, credits: str) -> str:
    await admin_call(s, m, "POST", "/admin/customers", {"id": "cust", "overage": "block"})
    await admin_call(s, m, "POST", "/admin/customers/cust/grants",
                     {"credits": credits, "idempotency_key": "g1"})
    key: str = (await admin_call(s, m, "POST", "/admin/customers/cust/keys"))["key"]
    await asyncio.sleep(1.0)               # the key reaches every member (the stated bound)
    return key


async def _burst(s: aiohttp.ClientSession, members: list[RunningMember], key: str, n: int,
                 path: str = "/v1/items") -> Counter[int]:
    async def one(i: int) -> int:
        async with s.get(members[i % len(members)].url + path,
                         headers={"Authorization": f"Bearer {key}"}) as r:
            await r.read()
            return r.status
    return Counter(await asyncio.gather(*(one(i) for i in range(n))))


async def _account(fleet: FleetOfMembers) -> tuple[int, int, int]:
    conn = await asyncpg.connect(fleet.dsn)
    try:
        row = await conn.fetchrow("SELECT balance, settled, escrowed FROM credit_accounts "
                                  "WHERE customer_id = 'cust'")
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2])
    finally:
        await conn.close()


async def _settled(fleet: FleetOfMembers, spent: int) -> tuple[int, int, int]:
    """The account once every admitted request shipped and every lease settled."""
    return await wait_until(lambda: _account(fleet), ok=lambda a: a[1] == spent and a[2] == 0,
                            timeout=15, what=f"{spent} micro-credits settled, none escrowed")


async def test_three_members_admit_exactly_the_balance(tmp_path: Path, upstream: str) -> None:
    async with fleet_of(tmp_path, upstream, rules_text=RULES) as fleet:
        members = await fleet.start(["a", "b", "c"])
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=TIMEOUT) as s:
            key = await _customer(s, members[0], "100")
            got = await _burst(s, members, key, 300)
            assert got == {200: 100, 402: 200}, got
            balance, settled, escrowed = await _settled(fleet, 100 * C)
            assert (balance, settled, escrowed) == (100 * C, 100 * C, 0)
            assert await _burst(s, members, key, 3) == {402: 3}


async def test_a_killed_members_lease_returns_and_is_spent_by_the_others(
        tmp_path: Path, upstream: str) -> None:
    # a lease of at least 30 credits: a still holds some after its 10 requests
    async with fleet_of(tmp_path, upstream, rules_text=RULES,
                        fleet={"lease_floor": "30"}) as fleet:
        a, b, c = await fleet.start(["a", "b", "c"])
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=TIMEOUT) as s:
            key = await _customer(s, a, "100")
            first = await _burst(s, [a], key, 10)
            assert first == {200: 10}
            # a holds a lease with credit left, and what it spent is shipped: kill it
            view = await wait_until(lambda: admin_call(s, a, "GET", "/admin/fleet"),
                                    ok=lambda v: v["this_member"]["journal_pending_rows"] == 0
                                    and v["this_member"]["leases_held"] == 1, timeout=10,
                                    what="a's usage shipped, its lease held")
            held = view["this_member"]["lease_credits_left"]
            assert float(held) > 0, view
            a.proc.kill()
            got = await _burst(s, [b, c], key, 300)
            assert got[200] <= 90 and got[200] + got[402] == 300, got
            # after a's lease expires and is reaped, b and c spend the rest: exactly 100
            total = 10 + got[200]

            async def more() -> int:
                nonlocal total
                total += (await _burst(s, [b, c], key, 20))[200]
                return total
            await wait_until(more, ok=lambda t: t >= 100, timeout=20, interval=0.5,
                             what="a's returned credit spent by b and c")
            assert total == 100
            balance, settled, escrowed = await _settled(fleet, 100 * C)
            assert balance - settled - escrowed == 0


async def test_post_response_overspend_is_bounded_and_paid_back(
        tmp_path: Path, upstream: str) -> None:
    """Each request holds 1 credit (the estimate) and costs 3 (``units`` from the response):
    with 30 in flight at once on three members, the fleet overspends at most 30 x (3 - 1),
    and every member refuses the customer afterwards until the debt is covered. A member
    whose last grant (a refill ahead) outlived the burst returns it once idle (lease_idle
    1 s): before idle returns that credit stayed escrowed for as long as the member ran."""
    async with fleet_of(tmp_path, upstream, rules_text=RULES,
                        fleet={"lease_idle": "1s"}) as fleet:
        members = await fleet.start(["a", "b", "c"])
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=TIMEOUT) as s:
            key = await _customer(s, members[0], "20")
            admitted = 0
            for _ in range(3):                       # bursts of 30 in flight
                admitted += (await _burst(s, members, key, 30, "/v1/stream?chunks=3"))[200]
            assert admitted >= 1
            balance, settled, _ = await _settled(fleet, admitted * 3 * C)
            overspend = settled - balance
            # the first burst holds 1 credit a request (a fresh estimator): it overspends
            assert 0 < overspend <= 30 * 2 * C, (admitted, overspend)
            # the debt is paid before anything more is admitted, on every member
            assert await _burst(s, members, key, 6, "/v1/stream?chunks=3") == {402: 6}


async def test_an_idle_members_lease_returns_and_the_others_spend_it(
        tmp_path: Path, upstream: str) -> None:
    """docs/fleet.md, Return: a lease of 30 credits on member a, which then gets no more
    requests, is back in the balance within lease_idle + lease_ttl / 3 (1 s + 1 s here), and
    member b spends every credit left: before idle returns b was refused while a sat on 29."""
    async with fleet_of(tmp_path, upstream, rules_text=RULES,
                        fleet={"lease_floor": "30", "lease_idle": "1s", "k": 1}) as fleet:
        a, b = await fleet.start(["a", "b"])
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=TIMEOUT) as s:
            key = await _customer(s, a, "40")
            assert await _burst(s, [a], key, 1) == {200: 1}
            assert (await _account(fleet))[2] >= 29 * C     # a's lease (k 1: up to 39 held)
            await wait_until(lambda: _account(fleet), ok=lambda acc: acc == (40 * C, C, 0),
                             timeout=6, what="a's idle lease back in the balance")
            # the gauges are refreshed every leader_ttl / 3 (1 s)
            await wait_until(lambda: _metric(s, a, "meterproxy_fleet_lease_idle_returns"),
                             ok=lambda n: n >= 1, timeout=3, what="the idle return counted")
            got = Counter[int]()
            for _ in range(42):                  # one at a time: b alone spends the rest
                got += await _burst(s, [b], key, 1)
            assert got == {200: 39, 402: 3}, got
            assert await _settled(fleet, 40 * C) == (40 * C, 40 * C, 0)


async def _metric(s: aiohttp.ClientSession, m: RunningMember, name: str) -> float:
    async with s.get(m.admin + "/metrics", headers=AH) as r:
        text = await r.text()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


async def test_shadow_enforcement_admits_everything_and_counts_the_refusals(
        tmp_path: Path, upstream: str) -> None:
    """``credits.enforcement: shadow`` in fleet mode: 10 credits, 30 requests over two members:
    all 30 answered, 10 charged to the credits (grant debits), the 20 enforcement would have
    refused counted in meterproxy_credit_shadow_rejections_total and billed, no debt."""
    async with fleet_of(tmp_path, upstream, rules_text=RULES,
                        extra={"credits": {"enforcement": "shadow"}}) as fleet:
        a, b = await fleet.start(["a", "b"])
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=TIMEOUT) as s:
            key = await _customer(s, a, "10")
            got = Counter[int]()
            for i in range(30):        # one at a time, alternating members
                got += await _burst(s, [(a, b)[i % 2]], key, 1)
            assert got == {200: 30}, got
            balance, settled, escrowed = await _settled(fleet, 10 * C)
            assert (balance, settled, escrowed) == (10 * C, 10 * C, 0)
            refused = await _metric(s, a, "meterproxy_credit_shadow_rejections_total") \
                + await _metric(s, b, "meterproxy_credit_shadow_rejections_total")
            assert refused == 20
            conn = await asyncpg.connect(fleet.dsn)
            try:
                rows = await wait_until(lambda: conn.fetchrow(
                    "SELECT count(*), sum(credits), sum(billable) FROM usage_ledger"),
                    ok=lambda r: r[0] == 30, timeout=10, what="30 rows shipped")
                assert (rows[1], rows[2]) == (10 * C, 20 * C)
                kinds = await conn.fetch("SELECT kind, sum(amount) FROM credit_entries"
                                         " GROUP BY kind ORDER BY kind")
                assert [tuple(k) for k in kinds] == [("debit", 10 * C)]
            finally:
                await conn.close()


async def test_a_bill_customers_credits_cover_its_usage_first(tmp_path: Path,
                                                              upstream: str) -> None:
    """``overage: bill`` with 10 credits, 30 requests over two members: never refused; 10 are
    covered by the credits (debited from the grant, not billed), 20 are billed; no debt and
    no shadow count (enforcement is not what let them through)."""
    async with fleet_of(tmp_path, upstream, rules_text=RULES) as fleet:
        a, b = await fleet.start(["a", "b"])
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=TIMEOUT) as s:
            await admin_call(s, a, "POST", "/admin/customers", {"id": "cust", "overage": "bill"})
            await admin_call(s, b, "POST", "/admin/customers/cust/grants",
                             {"credits": "10", "idempotency_key": "g1"})
            key: str = (await admin_call(s, a, "POST", "/admin/customers/cust/keys"))["key"]
            await asyncio.sleep(1.0)     # the key and the grant reach every member
            got = Counter[int]()
            for i in range(30):
                got += await _burst(s, [(a, b)[i % 2]], key, 1)
            assert got == {200: 30}, got
            assert await _settled(fleet, 10 * C) == (10 * C, 10 * C, 0)
            for m in (a, b):
                assert await _metric(s, m, "meterproxy_credit_shadow_rejections_total") == 0
            conn = await asyncpg.connect(fleet.dsn)
            try:
                rows = await wait_until(lambda: conn.fetchrow(
                    "SELECT count(*), sum(credits), sum(billable) FROM usage_ledger"),
                    ok=lambda r: r[0] == 30, timeout=10, what="30 rows shipped")
                assert (rows[1], rows[2]) == (10 * C, 20 * C)
                kinds = await conn.fetch("SELECT kind, sum(amount) FROM credit_entries"
                                         " GROUP BY kind ORDER BY kind")
                assert [tuple(k) for k in kinds] == [("debit", 10 * C)]
            finally:
                await conn.close()


async def test_a_killed_member_restarted_under_its_id_spends_its_earlier_lease(
        tmp_path: Path, upstream: str) -> None:
    """A member SIGKILLed while holding a lease with credit left, restarted under the same
    ``member_id`` on its journal (a supervised worker comes back within a second). Its
    earlier process's unspent credit must return within ``lease_ttl + reaper_grace`` (docs/
    fleet.md, Bounds): the restarted member ships that process's journal, so it knows what
    was spent; it must not keep the rest escrowed, counted as spent, for as long as it
    renews the lease (the customer answered 402 with credit left)."""
    async with fleet_of(tmp_path, upstream, rules_text=RULES,
                        fleet={"lease_floor": "30"}) as fleet:
        (a,) = await fleet.start(["a"])
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=TIMEOUT) as s:
            key = await _customer(s, a, "100")
            assert await _burst(s, [a], key, 10) == {200: 10}
            await wait_until(lambda: admin_call(s, a, "GET", "/admin/fleet"),
                             ok=lambda v: v["this_member"]["journal_pending_rows"] == 0
                             and v["this_member"]["leases_held"] == 1, timeout=10,
                             what="a's usage shipped, its lease held")
            a.proc.kill()
            a.proc.spawn()                       # the same config: id, journal, ports
            await a.proc.wait_ready(60)
            total = 10

            async def more() -> int:
                nonlocal total
                total += (await _burst(s, [a], key, 20))[200]
                return total
            await wait_until(more, ok=lambda t: t >= 100, timeout=15, interval=0.5,
                             what="all 100 credits spent (lease_ttl 3 s + reaper_grace 1 s)")
            assert total == 100
            balance, settled, escrowed = await _settled(fleet, 100 * C)
            assert balance - settled - escrowed == 0
