"""Acceptance on real member processes: a member restarted under the same ``member_id``
(docs/configuration.md: "keep it across restarts") on an empty journal, the node's
ephemeral volume gone (docs/fleet.md: what a member loses then is what its journal had not
shipped). Shipping keys the shared ledger by ``(member_id, seq)``: the new journal's rows
must not reuse the seqs the earlier process already shipped, or they are skipped as already
shipped and then pruned."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import asyncpg

from tests.fleet.members import RunningMember, customer_key, fleet_of


async def _requests(s: aiohttp.ClientSession, m: RunningMember, key: str, n: int) -> None:
    for _ in range(n):
        async with s.get(m.url + "/v1/items", headers={"Authorization": f"Bearer {key}"}) as r:
            await r.read()
            assert r.status == 200, r.status


async def _ledger_requests(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(
            "SELECT count(DISTINCT request_id) FROM usage_ledger WHERE member_id = 'a'"))
    finally:
        await conn.close()


async def test_a_member_restarted_on_an_empty_journal_ships_all_its_new_usage(
        tmp_path: Path, upstream: str) -> None:
    async with fleet_of(tmp_path, upstream) as fleet:
        (a,) = await fleet.start(["a"])
        async with aiohttp.ClientSession() as s:
            key = await customer_key(s, a)
            await _requests(s, a, key, 5)
            await fleet.stop_all()                   # drains: all 5 shipped
            assert await _ledger_requests(fleet.dsn) == 5
            # the same member id on a new, empty journal (the old volume is gone)
            again = fleet.add("a-restarted", member_id="a")
            await again.proc.wait_ready(60)
            await _requests(s, again, key, 3)
            await fleet.stop_all()                   # drains: the 3 new ones shipped too
        assert await _ledger_requests(fleet.dsn) == 8
