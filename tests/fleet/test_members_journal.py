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
import pytest

from tests.fleet.members import CREDIT_RULES, FleetOfMembers, RunningMember, admin_call, customer_key, fleet_of
from tests.helpers import wait_until


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
            key = await customer_key(s, a)
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
            key = await customer_key(s, a)
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
            key = await customer_key(s, b)
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
            key = await customer_key(s, a)
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
            key = await customer_key(s, a)
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


def _journal_row(path: Path, seq: int) -> str | None:
    conn = sqlite3.connect(path)
    try:
        row = conn.execute("SELECT row FROM journal WHERE seq = ?", (seq,)).fetchone()
        return None if row is None else str(row[0])
    finally:
        conn.close()


async def _journal_of_the_old_version(fleet: FleetOfMembers, s: aiohttp.ClientSession) -> str:
    """Member "x"'s volume as the version before SQLite migration 16 left it: no member id
    recorded, seq 2 shipped by "x" and kept (its prune kept the newest row), seqs 3..5
    journaled after it and not shipped (killed). Every row is a real process's; only the
    kept row and the missing owner are put back by hand. Returns the API key."""
    (x,) = await fleet.start(["x"])              # ship_interval 1h: ships at stop only
    key = await customer_key(s, x)
    await _requests(s, x, key, 2)                # seqs 1, 2
    path = fleet.tmp / "x" / "journal.db"
    kept = await wait_until(lambda: _journal_row(path, 2), what="seq 2 in x's journal")
    await fleet.stop_all()                       # ships seqs 1, 2 as "x" (then prunes them)
    x2 = fleet.add("x2", member_id="x", journal_of="x")
    await x2.proc.wait_ready(60)
    await _requests(s, x2, key, 3)               # seqs 3..5, not shipped
    x2.proc.kill()
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("DELETE FROM journal_owner")
        conn.execute("UPDATE journal_seq SET hwm = 0")     # (a seq at or below it is renumbered)
        conn.execute("INSERT INTO journal (seq, row) VALUES (2, ?)", (kept,))
        conn.execute("UPDATE journal_seq SET hwm = 1")     # seq 1 pruned, 2 kept
    finally:
        conn.close()
    return key


async def test_a_journal_from_before_the_recorded_member_id_ships_under_the_id_that_shipped_it(
        tmp_path: Path, upstream: str) -> None:
    """A volume the previous version wrote (no member id recorded, its newest shipped row
    kept) reused by a process under a new member id (a new hostname): the kept row does not
    ship again, and the rows journaled after it ship once, under the id that numbered them
    (they used to ship under the new id: the kept row's usage and credits counted twice)."""
    async with fleet_of(tmp_path, upstream, fleet={"ship_interval": "1h"}) as fleet:
        async with aiohttp.ClientSession() as s:
            key = await _journal_of_the_old_version(fleet, s)
            y = fleet.add("y", journal_of="x")
            await y.proc.wait_ready(60)
            await _requests(s, y, key, 1)
            await fleet.stop_all()
        assert await _by_member(fleet.dsn) == {"x": (5, 5), "y": (1, 1)}
        assert await _ledger(fleet.dsn) == (6, 6)


async def test_a_journal_from_before_the_recorded_member_id_shipped_under_two_ids_is_refused(
        tmp_path: Path, upstream: str) -> None:
    """Its rows in the ledger under two ids (the previous version's double count): which one
    numbered the rest cannot be told, so the start is refused until ``fleet.member_id`` says."""
    async with fleet_of(tmp_path, upstream, fleet={"ship_interval": "1h"}) as fleet:
        async with aiohttp.ClientSession() as s:
            key = await _journal_of_the_old_version(fleet, s)
            conn = await asyncpg.connect(fleet.dsn)
            try:
                cols = ("customer_id, seq, item, request_id, at_ms, key_id, rule, rules_version,"
                        " status, method, path, meter, quantity, credits, billable, flags")
                await conn.execute(f"INSERT INTO usage_ledger (member_id, {cols})"
                                   f" SELECT 'w', {cols} FROM usage_ledger WHERE seq = 2")
            finally:
                await conn.close()
            log = await _refused(fleet.add("y", journal_of="x"))
            assert "its rows were shipped under several member ids: w, x" in log, log[-2000:]
            x3 = fleet.add("x3", member_id="x", journal_of="x")
            await x3.proc.wait_ready(60)
            await _requests(s, x3, key, 1)
            await fleet.stop_all()
        assert await _by_member(fleet.dsn) == {"w": (1, 1), "x": (6, 6)}


@pytest.mark.parametrize("fail_mode", ["closed", "open"])
async def test_a_member_whose_id_another_process_claims_stops_metering_and_leaves_its_leases(
        tmp_path: Path, upstream: str, fail_mode: str) -> None:
    """A process whose member id another process claimed (it stalled past leader_ttl, or
    two run under one id) cannot ship what it journals: it stops metering (metered requests
    503, as with broken storage), /readyz says why, and its shutdown neither ships nor
    returns the leases under the id (the claiming process's now: a return would cut them to
    this one's spending). Unmetered requests are still served."""
    async with fleet_of(tmp_path, upstream, rules_text=CREDIT_RULES,
                        storage={"fail_mode": fail_mode}) as fleet:
        (a,) = await fleet.start(["a"])
        async with aiohttp.ClientSession() as s:
            await admin_call(s, a, "POST", "/admin/customers", {"id": "cust", "overage": "block"})
            await admin_call(s, a, "POST", "/admin/customers/cust/grants",
                             {"credits": "100", "idempotency_key": "g1"})
            key = (await admin_call(s, a, "POST", "/admin/customers/cust/keys"))["key"]
            await _requests(s, a, key, 3)
            await wait_until(lambda: _ledger(fleet.dsn), ok=lambda v: v == (3, 3), timeout=5,
                             what="a's three requests shipped")
            conn = await asyncpg.connect(fleet.dsn)
            try:
                lease = await conn.fetchrow("SELECT id, granted FROM credit_leases "
                                            "WHERE member_id = 'a' AND state = 'active'")
                assert lease is not None
                await conn.execute("UPDATE members SET instance = 'intruder', last_seen = now()"
                                   " WHERE id = 'a'")

                async def ready() -> tuple[int, str]:
                    async with s.get(a.admin + "/readyz") as r:
                        return r.status, await r.text()
                _, body = await wait_until(ready, ok=lambda r: r[0] == 503, timeout=5,
                                                what="a's /readyz degraded")
                assert "member id a was claimed by another process" in body
                # closed: refused; open: forwarded unbilled, no lease used (a lease spent
                # here could never ship)
                for _ in range(3):
                    async with s.get(a.url + "/v1/items",
                                     headers={"Authorization": f"Bearer {key}"}) as r:
                        assert r.status == (503 if fail_mode == "closed" else 200), r.status
                async with s.get(a.url + "/healthz") as r:
                    assert r.status == 200
                await fleet.stop_all()
                after = await conn.fetchrow("SELECT granted, state FROM credit_leases "
                                            "WHERE id = $1", lease["id"])
                assert (after["granted"], after["state"]) == (lease["granted"], "active")
                assert await conn.fetchval(
                    "SELECT instance FROM members WHERE id = 'a'") == "intruder"
            finally:
                await conn.close()
        assert "stopped metering" in (tmp_path / "a" / "proxy.log").read_text()
        assert await _ledger(fleet.dsn) == (3, 3)


async def test_a_fully_shipped_journal_is_adopted_while_its_old_id_runs_elsewhere(
        tmp_path: Path, upstream: str) -> None:
    """A stopped member's volume, everything in it shipped, reused under a new id while a
    process under the old id runs on another volume: nothing of it is left to ship, so the
    new process starts at once (it used to claim the old id to ship the rest, and was
    refused on every start while that id was alive) and numbers its rows under its own id."""
    async with fleet_of(tmp_path, upstream) as fleet:
        async with aiohttp.ClientSession() as s:
            (a,) = await fleet.start(["a"])
            key = await customer_key(s, a)
            await _requests(s, a, key, 2)
            await fleet.stop_all()                  # ships both, then stops
            again = fleet.add("a-elsewhere", member_id="a")   # id a, another volume
            await again.proc.wait_ready(60)
            b = fleet.add("b", journal_of="a")
            await b.proc.wait_ready(60)
            await _requests(s, b, key, 3)
            await _requests(s, again, key, 1)
            await fleet.stop_all()
        assert await _by_member(fleet.dsn) == {"a": (3, 3), "b": (3, 3)}
        assert "all of it shipped" in (tmp_path / "a" / "proxy-b.log").read_text()


@pytest.mark.parametrize("back_as", ["a", "b"])
async def test_rows_journaled_under_seqs_another_process_of_the_id_shipped_ship_renumbered(
        tmp_path: Path, upstream: str, back_as: str) -> None:
    """Member "a" killed with rows unshipped (seqs 1..3); a process under id "a" on another
    volume (the pod rescheduled) ships its own seqs 1..5; "a"'s volume comes back, under
    "a" or under a new id "b" (the journal records "a": it ships the rest under "a" first).
    Its three rows are not the ones the ledger holds under those seqs (other request ids):
    they ship under "a", renumbered above its watermark (they used to be taken for shipped
    by the watermark, then pruned: three requests served and never billed). A row the
    ledger does hold under its seq is not resent (the journal of the old version, above)."""
    async with fleet_of(tmp_path, upstream, fleet={"ship_interval": "1h"}) as fleet:
        async with aiohttp.ClientSession() as s:
            (a,) = await fleet.start(["a"])
            key = await customer_key(s, a)
            await _requests(s, a, key, 3)            # seqs 1..3, not shipped (1h)
            path = fleet.tmp / "a" / "journal.db"
            await wait_until(lambda: _journal_row(path, 3), what="seq 3 in a's journal")
            a.proc.kill()
            elsewhere = fleet.add("a-elsewhere", member_id="a")   # waits out a's claim
            await elsewhere.proc.wait_ready(60)
            await _requests(s, elsewhere, key, 5)
            if back_as == "b":
                # "a"'s rows must ship under "a", which runs elsewhere: refused until it stops
                log = await _refused(fleet.add("b-early", member_id="b", journal_of="a"))
                assert "start this member once that process stopped" in log, log[-2000:]
            await fleet.stop_all()                   # ships seqs 1..5 under "a"
            assert await _by_member(fleet.dsn) == {"a": (5, 5)}
            back = fleet.add("a-back", member_id=back_as, journal_of="a")
            await back.proc.wait_ready(60)
            await _requests(s, back, key, 1)
            await fleet.stop_all()
        assert await _by_member(fleet.dsn) == (
            {"a": (9, 9)} if back_as == "a" else {"a": (8, 8), "b": (1, 1)})
        conn = await asyncpg.connect(fleet.dsn)
        try:
            seqs = [int(r[0]) for r in await conn.fetch(
                "SELECT seq FROM usage_ledger WHERE member_id = 'a' ORDER BY seq")]
        finally:
            await conn.close()
        assert seqs == list(range(1, 10 if back_as == "a" else 9))
        log = (tmp_path / "a" / "proxy-a-back.log").read_text()
        assert "renumbered 3 journal row(s)" in log, log[-2000:]
