"""PostgreSQL unreachable (the connection cut by a relay): a member keeps admitting from the
lease it holds, then fail_mode decides; when the database returns, leases refill and the
journal ships with exact totals."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal

import pytest

from proxy.fleet.book import Decision
from proxy.fleet.sizing import LeasePolicy
from proxy.store.postgres import leases
from tests.fleet.conftest import PG_BASE, PoolFactory, add_customer
from tests.fleet.member import Member
from tests.fleet.tcp_cut import CuttableRelay

C = 1_000_000


@pytest.fixture
async def relay() -> AsyncIterator[CuttableRelay]:
    r = CuttableRelay()
    await r.start()
    yield r
    await r.stop()


def _via(relay: CuttableRelay, pg_dsn: str) -> str:
    return pg_dsn.replace(PG_BASE, f"postgresql://postgres@127.0.0.1:{relay.port}")


@pytest.mark.parametrize("fail_mode", ["closed", "open"])
async def test_lease_serves_through_an_outage_then_fail_mode_applies(
        open_pool: PoolFactory, pg_dsn: str, relay: CuttableRelay,
        fail_mode: Literal["closed", "open"]) -> None:
    direct = await open_pool()
    await add_customer(direct, "acme", 100 * C)
    pool = await open_pool(dsn=_via(relay, pg_dsn), connect_timeout=1.0, command_timeout=1.0, size=2)
    m = Member(pool, "m1", LeasePolicy(floor=10 * C, cover_ms=1000), fail_mode=fail_mode,
               offline_allowance=2 * C)
    assert await m.request("acme", C) is Decision.ADMIT       # takes a 10-credit lease
    relay.cut()
    for _ in range(9):                                        # the rest of the lease, no database
        assert await m.request("acme", C) is Decision.ADMIT
    if fail_mode == "closed":
        assert await m.request("acme", C) is Decision.UNAVAILABLE
    else:
        assert [await m.request("acme", C) for _ in range(3)] == [
            Decision.ADMIT_OWED, Decision.ADMIT_OWED, Decision.UNAVAILABLE]
    assert await m.shipper.ship_pending(m.journal) == 0      # shipping waits for the database
    relay.restore()
    assert await m.request("acme", C) is Decision.ADMIT       # refilled
    served = len(m.journal.rows)
    assert served == (11 if fail_mode == "closed" else 13)
    assert await m.shipper.ship_pending(m.journal) == served
    await m.book.release_all()
    async with direct.acquire() as conn:
        acct = await leases.account(conn, "acme")
        shipped = await conn.fetchval("SELECT sum(credits) FROM usage_ledger")
    assert shipped == served * C
    assert (acct.settled, acct.escrowed, acct.available) == (served * C, 0, 100 * C - served * C)
