"""Acceptance on real member processes: a member's journal reaches the shared ledger exactly
once, whatever its durability, whatever member id the process runs under later, and never
from two live processes under one member id (docs/fleet.md, "The journal and its member
id")."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import asyncpg

from tests.fleet.members import RunningMember, admin_call, fleet_of


async def _requests(s: aiohttp.ClientSession, m: RunningMember, key: str, n: int) -> None:
    for _ in range(n):
        async with s.get(m.url + "/v1/items", headers={"Authorization": f"Bearer {key}"}) as r:
            await r.read()
            assert r.status == 200, r.status


async def _ledger(dsn: str) -> tuple[int, int]:
    """(usage_ledger rows, distinct request ids)."""
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow("SELECT count(*), count(DISTINCT request_id) FROM usage_ledger")
        assert row is not None
        return int(row[0]), int(row[1])
    finally:
        await conn.close()


async def test_a_batched_member_ships_its_usage_exactly_once(
        tmp_path: Path, upstream: str) -> None:
    async with fleet_of(tmp_path, upstream,
                        storage={"durability": "batched", "commit_interval": "50ms"}) as fleet:
        (a,) = await fleet.start(["a"])
        async with aiohttp.ClientSession() as s:
            await admin_call(s, a, "POST", "/admin/customers", {"id": "cust"})
            key = (await admin_call(s, a, "POST", "/admin/customers/cust/keys"))["key"]
            await _requests(s, a, key, 7)
            await fleet.stop_all()                   # drains: commits, then ships
        assert await _ledger(fleet.dsn) == (7, 7)
