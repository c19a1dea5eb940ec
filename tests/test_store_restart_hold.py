"""Review of the RESTART in the niced maintenance thread (commit 506afd6): the group
commits hold their rows while it holds the write lock. The cases around that hold."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from proxy.errors import MeteringUnavailable
from proxy.store.db import Store
from tests.helpers import wait_until
from tests.test_store import _commit_each, _row
from tests.test_store_wal import _holding_restart


def _due_for_restart(db: Path, **kw: object) -> Store:
    """A store whose WAL holds more than wal_truncate_size after a tick's passive pass."""
    store = Store.open(db, wal_truncate_size=4096, **kw)  # type: ignore[arg-type]
    _commit_each(store, range(20))
    return store


def _audit_count(db: Path, rid: str) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM audit WHERE request_id=?",
                                (rid,)).fetchone()[0])


@pytest.mark.parametrize("fail_mode", ["closed", "open"])
async def test_a_restart_holding_the_lock_past_lock_wait_lets_fail_mode_decide(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_mode: str) -> None:
    """Invariant 5: a commit that finds the database locked, by another process or by our
    own checkpoint, waits at most ``lock_wait``; then ``fail_mode`` decides (closed: the
    request fails and admission closes; open: it is let through). A RESTART whose
    fdatasync stalls (a slow or hung disk) held the group commits' rows for as long as it
    lasted, with the store reported healthy: every metered request hung, in both modes.
    The row itself is kept and committed once the RESTART ends."""
    db = tmp_path / "s.db"
    store = _due_for_restart(db, lock_wait=0.2, fail_mode=fail_mode)
    _threads, entered, release = _holding_restart(monkeypatch)
    tick = asyncio.ensure_future(store.checkpoint_once())
    try:
        await wait_until(entered.is_set, timeout=10)
        fut = store.record(_row(3000), wait=True)
        assert fut is not None
        await asyncio.wait({fut}, timeout=1.5)     # lock_wait 0.2 s (+ the retries' timer)
        assert fut.done(), "the RESTART's hold outlived lock_wait: fail_mode never decided"
        if fail_mode == "closed":
            assert isinstance(fut.exception(), MeteringUnavailable)
            assert not store.accepting
        else:
            assert fut.exception() is None
    finally:
        release.set()
        await tick
    await wait_until(lambda: store.healthy and not store._pending, timeout=5)
    assert store._busy_since is None        # a later foreign lock gets its full lock_wait
    store.close()
    assert _audit_count(db, "r3000") == 1


async def test_the_shutdown_commit_during_a_restart_lands_each_held_row_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """App.shutdown's ``commit_pending`` (after a drain that timed out) while the RESTART
    holds the lock: it waits for the thread, commits the held rows, and the end of the
    hold (its scheduled commit), the cancelled tick and ``close`` commit nothing twice."""
    db = tmp_path / "s.db"
    store = _due_for_restart(db)
    _threads, entered, release = _holding_restart(monkeypatch)
    tick = asyncio.ensure_future(store.checkpoint_once())
    await wait_until(entered.is_set, timeout=10)
    waits = [store.record(_row(4000 + i), wait=True) for i in range(3)]
    await asyncio.sleep(0.05)
    assert len(store._pending) == 3
    threading.Timer(0.1, release.set).start()
    store.commit_pending()
    assert not store._pending
    assert all(w is not None and w.done() and w.exception() is None for w in waits)
    await tick
    await asyncio.sleep(0.05)
    store.close()
    for i in range(3):
        assert _audit_count(db, f"r{4000 + i}") == 1


async def test_readers_during_a_stalled_restart_block_the_loop_at_most_lock_wait_in_all(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every admin request and the consumer /usage and event exports call
    ``try_materialize`` first, which waits on the loop thread for the RESTART (at most
    ``lock_wait``). A stalled RESTART (its fdatasync) blocked the whole loop for lock_wait
    per such read: four reads, four times lock_wait, /healthz and every request frozen;
    the stall the RESTART was moved off the loop for came back through its readers. The
    wait is one budget per RESTART, the group commits' (``_commit_now``): past it a read
    finds the lock, logs and lags, and a write is retried on the timer (``write``)."""
    db = tmp_path / "s.db"
    store = _due_for_restart(db, lock_wait=0.3)
    _threads, entered, release = _holding_restart(monkeypatch)
    tick = asyncio.ensure_future(store.checkpoint_once())
    try:
        await wait_until(entered.is_set, timeout=10)
        started = time.monotonic()
        for _ in range(4):
            store.try_materialize()
        blocked = time.monotonic() - started
        assert blocked < 0.3 + 0.15, f"the loop was blocked {blocked:.2f}s"
    finally:
        release.set()
        await tick
    assert store.try_materialize()
    store.close()
    assert _audit_count(db, "r19") == 1


async def test_max_pending_rows_is_enforced_while_a_restart_holds_the_rows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/resources.md: while the RESTART holds the write lock, 'past max_pending_rows
    the write is tried and fail_mode decides, as for any lock'. Nothing called the group
    commit during the hold (``record`` only schedules one when none is), so the bound was
    never checked: fail_mode closed kept admitting past it for the whole hold (pending
    grew without bound for as long as the RESTART stalled) and, once the hold ended after
    lock_wait, dropped every row beyond the bound at once. It is checked as rows arrive:
    admission closes at the bound, long before lock_wait."""
    db = tmp_path / "s.db"
    store = _due_for_restart(db, lock_wait=5.0, fail_mode="closed", max_pending_rows=5)
    _threads, entered, release = _holding_restart(monkeypatch)
    tick = asyncio.ensure_future(store.checkpoint_once())
    try:
        await wait_until(entered.is_set, timeout=10)
        waits = []
        for i in range(8):
            if not store.accepting:
                break
            waits.append(store.record(_row(5000 + i), wait=True))
            await asyncio.sleep(0.01)
        assert not store.accepting, f"{len(store._pending)} rows held past max_pending_rows 5"
        assert len(store._pending) <= 5
    finally:
        release.set()
        await tick
    await wait_until(lambda: store.healthy and not store._pending, timeout=5)
    store.close()
    assert len(waits) == 6      # the 6th row met the bound: it failed and closed admission
