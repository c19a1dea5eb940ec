"""Acceptance on real member processes: a member's journal reaches the shared ledger exactly
once, whatever its durability, whatever member id the process runs under later, and never
from two live processes under one member id (docs/fleet.md, "The journal and its member
id")."""

from __future__ import annotations

import asyncio
import sqlite3
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


async def _by_member(dsn: str) -> dict[str, tuple[int, int]]:
    """member id -> (usage_ledger rows, distinct request ids)."""
    conn = await asyncpg.connect(dsn)
    try:
        return {r[0]: (int(r[1]), int(r[2])) for r in await conn.fetch(
            "SELECT member_id, count(*), count(DISTINCT request_id) FROM usage_ledger"
            " GROUP BY member_id")}
    finally:
        await conn.close()


async def test_a_journal_reused_under_a_new_member_id_ships_nothing_twice(
        tmp_path: Path, upstream: str) -> None:
    """A container recreated on the same volume with a new hostname (the default member id
    is ``<host>:<port>``): nothing the old id shipped ships again under the new one (the
    pruned journal used to keep its newest row, which the new id shipped a second time)."""
    async with fleet_of(tmp_path, upstream) as fleet:
        (a,) = await fleet.start(["a"])
        async with aiohttp.ClientSession() as s:
            await admin_call(s, a, "POST", "/admin/customers", {"id": "cust"})
            key = (await admin_call(s, a, "POST", "/admin/customers/cust/keys"))["key"]
            await _requests(s, a, key, 4)
            await fleet.stop_all()                   # drains: all 4 shipped as "a"
            b = fleet.add("b", journal_of="a")       # the same volume, a new member id
            await b.proc.wait_ready(60)
            await _requests(s, b, key, 2)
            await fleet.stop_all()
        assert await _by_member(fleet.dsn) == {"a": (4, 4), "b": (2, 2)}


async def test_unshipped_rows_ship_under_the_member_id_that_journaled_them(
        tmp_path: Path, upstream: str) -> None:
    """Member "a" killed with rows not shipped; its volume comes back under member id "b",
    which already shipped more rows elsewhere than "a"'s journal holds (a higher watermark):
    "a"'s rows ship under "a" (under "b" they were taken for shipped ones, then pruned)."""
    async with fleet_of(tmp_path, upstream, fleet={"ship_interval": "1h"}) as fleet:
        (b,) = await fleet.start(["b"])
        async with aiohttp.ClientSession() as s:
            await admin_call(s, b, "POST", "/admin/customers", {"id": "cust"})
            key = (await admin_call(s, b, "POST", "/admin/customers/cust/keys"))["key"]
            await _requests(s, b, key, 5)
            await fleet.stop_all()                   # "b" shipped seqs 1..5
            a = fleet.add("a")
            await a.proc.wait_ready(60)
            await _requests(s, a, key, 3)            # seqs 1..3, not shipped (1h)
            a.proc.kill()
            b2 = fleet.add("b2", member_id="b", journal_of="a")
            await b2.proc.wait_ready(60)
            await _requests(s, b2, key, 2)
            await fleet.stop_all()
        assert await _by_member(fleet.dsn) == {"a": (3, 3), "b": (7, 7)}
        assert await _ledger(fleet.dsn) == (10, 10)


async def _refused(m: RunningMember) -> str:
    """The start-up refusal of ``m``: its exit status is 1; returns its log."""
    assert m.proc.proc is not None
    rc = await asyncio.to_thread(m.proc.proc.wait, 60)
    log = m.proc.log.read_text()
    assert rc == 1, log[-2000:]
    return log


async def test_a_second_live_process_under_one_member_id_is_refused_at_start(
        tmp_path: Path, upstream: str) -> None:
    """Two processes under one member id used to number their journals independently, and
    shipping dropped the second one's rows with the same seq (both led the flusher too)."""
    async with fleet_of(tmp_path, upstream) as fleet:
        (a,) = await fleet.start(["a"])
        async with aiohttp.ClientSession() as s:
            await admin_call(s, a, "POST", "/admin/customers", {"id": "cust"})
            key = (await admin_call(s, a, "POST", "/admin/customers/cust/keys"))["key"]
            await _requests(s, a, key, 2)
            log = await _refused(fleet.add("twin", member_id="a"))
            assert "member id a is in use by another running process" in log
            await _requests(s, a, key, 2)            # the first one serves on
            await fleet.stop_all()
        assert await _by_member(fleet.dsn) == {"a": (4, 4)}


async def test_a_copy_of_a_running_members_journal_is_refused_at_start(
        tmp_path: Path, upstream: str) -> None:
    """A cloned volume: its rows are the running member's, numbered under its id; the copy
    may not ship them as its own (nor ship them under an id a live process holds)."""
    async with fleet_of(tmp_path, upstream, fleet={"ship_interval": "1h"}) as fleet:
        (a,) = await fleet.start(["a"])
        async with aiohttp.ClientSession() as s:
            await admin_call(s, a, "POST", "/admin/customers", {"id": "cust"})
            key = (await admin_call(s, a, "POST", "/admin/customers/cust/keys"))["key"]
            await _requests(s, a, key, 3)
            (tmp_path / "clone").mkdir()
            src = sqlite3.connect(tmp_path / "a" / "journal.db")
            dst = sqlite3.connect(tmp_path / "clone" / "journal.db")
            try:
                src.backup(dst)
            finally:
                dst.close()
                src.close()
            log = await _refused(fleet.add("clone", journal_of="clone"))
            assert "the journal" in log and "holds usage member a journaled" in log
            await fleet.stop_all()
        assert await _by_member(fleet.dsn) == {"a": (3, 3)}
