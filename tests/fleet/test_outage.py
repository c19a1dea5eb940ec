"""PostgreSQL unreachable (the connection cut by a relay): a member keeps admitting from the
lease it holds, then fail_mode decides; when the database returns, leases refill and the
journal ships with exact totals. Background loops pause and go on."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Literal

import pytest

from proxy.commitments import TrueUpTask
from proxy.fleet.book import Decision
from proxy.fleet.sizing import LeasePolicy
from proxy.notices import NoticeSettings, NoticeWatch
from proxy.rules import load_rules
from proxy.store.keys import KeyCache
from proxy.store.postgres import leases
from proxy.store.postgres.pool import PoolSettings
from proxy.store.postgres.storage import PostgresStorage
from tests.conftest import TEST_RULES
from tests.fleet.conftest import PoolFactory, add_customer, via_relay
from tests.fleet.member import Member
from tests.fleet.tcp_cut import CuttableRelay

C = 1_000_000


@pytest.mark.parametrize("fail_mode", ["closed", "open"])
async def test_lease_serves_through_an_outage_then_fail_mode_applies(
        open_pool: PoolFactory, pg_dsn: str, relay: CuttableRelay,
        fail_mode: Literal["closed", "open"]) -> None:
    direct = await open_pool()
    await add_customer(direct, "acme", 100 * C)
    pool = await open_pool(dsn=via_relay(relay.port, pg_dsn), connect_timeout=1.0, command_timeout=1.0, size=2)
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


async def test_background_loops_pause_while_postgresql_is_cut_and_go_on(
        pg_dsn: str, relay: CuttableRelay, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """The notices and the commitment true-ups loops of a member whose PostgreSQL is cut
    (``PgUnavailable``, a ``StorageOutcomeUnknown``): each pass logs and the loop goes on
    (before, the first such error ended the task for the life of the process), and both
    check again once the database is back."""
    direct = await PostgresStorage.open(PoolSettings(dsn=pg_dsn))
    await direct.close()                                      # migrated
    via = await PostgresStorage.open(PoolSettings(
        dsn=via_relay(relay.port, pg_dsn),
        connect_timeout=1.0, command_timeout=1.0, size=2))
    (tmp_path / "rules.yaml").write_text(TEST_RULES)
    rules = load_rules([tmp_path / "rules.yaml"])
    notices = NoticeWatch(via.usage, via.alerts, KeyCache(), NoticeSettings(spike_factor=2.0))
    trueups = TrueUpTask(via.customers, via.usage, via.trueups, None, lambda: rules, dict)
    relay.cut()
    loops = [asyncio.ensure_future(notices.run(0.05)), asyncio.ensure_future(trueups.run(0.05))]
    try:
        await asyncio.sleep(0.5)
        assert [t.done() for t in loops] == [False, False], [t.exception() for t in loops
                                                             if t.done()]
        assert "notices paused" in caplog.text and "true-ups paused" in caplog.text
        relay.restore()
        assert await notices.check() == [] and await trueups.check() == []
        assert [t.done() for t in loops] == [False, False]
    finally:
        for t in loops:
            t.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        await via.close()
