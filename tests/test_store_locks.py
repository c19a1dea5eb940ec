"""The store's write lock held elsewhere (proxy/store/db.py): by our own maintenance thread's
TRUNCATE when shutdown cancels the checkpoint tick, and by another connection while rows
pile up in memory. Both were defects found in review (2026-11-30), each test failing before
its fix."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.store import db as dbmod
from proxy.store.db import Store
from proxy.store.outbox import SqliteOutbox
from tests.helpers import wait_until
from tests.test_store import _row
from tests.test_store_wal import wal_due_for_idle_truncate


async def test_a_cancelled_checkpoint_task_leaves_no_truncate_holding_the_write_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shutdown (proxy/app.py Server.shutdown) cancels the wal-checkpoint task, then makes
    the final flush (materialize, then ``outbox.stage`` through ``execute_write``, which
    never waits for a lock). Since the idle TRUNCATE moved into the maintenance thread, a
    cancel that lands while it runs only cancels the await: the thread keeps the write lock
    (7-15 ms at 20 MB, longer on a slow disk or a starved CPU) and the final flush, started
    right after, fails with DatabaseBusy ("final flush did not finish"). Before, the
    TRUNCATE ran on the loop and a cancelled task could never leave our own lock behind.
    The task, once it has ended (cancel_and_wait), must have released the lock."""
    db = tmp_path / "s.db"
    store = await wal_due_for_idle_truncate(db, 64 * 1024)
    entered = threading.Event()
    real = dbmod.checkpoint

    def slow_truncate(conn: sqlite3.Connection, mode: str = "PASSIVE") -> Any:
        if mode == "TRUNCATE" and conn is not store._conn:
            conn.execute("BEGIN IMMEDIATE")     # the write lock, as the TRUNCATE holds it
            entered.set()
            time.sleep(0.3)                     # a slow ftruncate
            conn.execute("COMMIT")
        return real(conn, mode)

    monkeypatch.setattr(dbmod, "checkpoint", slow_truncate)
    tick = asyncio.ensure_future(store.checkpoint_once())    # an idle tick: TRUNCATE
    await wait_until(entered.is_set, what="the truncate to start")
    tick.cancel()                                             # proxy.tasks.cancel_and_wait
    with contextlib.suppress(asyncio.CancelledError):
        await tick
    # the final flush: materialize, then stage in one execute_write
    store.materialize()
    await SqliteOutbox(store).stage({})
    store.close()


async def test_rows_held_while_a_lock_is_waited_for_stay_within_max_pending_rows(
        tmp_path: Path) -> None:
    """docs/configuration.md, storage.max_pending_rows: 'Bound on usage rows held in memory
    while SQLite cannot commit; beyond it fail_mode applies at once.' While a group commit
    waits (up to lock_wait) for a lock another connection holds, ``_wait_for_lock`` puts
    the rows back and ``record`` keeps appending: nothing checks the bound until lock_wait
    has passed (only ``_on_failure`` does), and ``accepting`` stays true (the store is still
    healthy), so every request admitted meanwhile adds a row. Here 100 is the bound and 300
    rows are held in memory, none refused, for the whole wait."""
    db = tmp_path / "s.db"
    store = Store.open(db, max_pending_rows=100, lock_wait=5.0, fail_mode="closed")
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")        # another process holds the write lock
    try:
        futs = [store.record(_row(i), wait=True) for i in range(300)]
        # over the bound, fail_mode decides at once (closed: the store turns unhealthy),
        # not after lock_wait (5 s)
        await wait_until(lambda: not store.healthy, timeout=3, what="fail_mode deciding")
        held = len(store._pending)
        refused = sum(1 for f in futs if f is not None and f.done() and f.exception())
        assert held <= store.max_pending_rows, (held, refused)
    finally:
        other.execute("COMMIT")
        other.close()
        await store.drain(10)
        store.close()


async def test_committed_for_waits_for_the_customer_s_rows_and_gives_up_past_its_bound(
        tmp_path: Path) -> None:
    """``Store.committed_for`` (a monetary account's opening reads the ledger once the
    customer's rows recorded before it are committed): True at once with none waiting, True
    once a lock another connection held is released within the wait, False when storage
    still does not take them at the end of it (the opening is then deferred)."""
    db = tmp_path / "s.db"
    store = Store.open(db, lock_wait=0.2, fail_mode="open", durability="batched",
                       commit_interval=0.05)
    other = sqlite3.connect(db, isolation_level=None)
    try:
        assert await store.committed_for("c", 0.5) and await store.committed_for("c")
        other.execute("BEGIN IMMEDIATE")        # another process holds the write lock
        store.record(_row(1), wait=False)
        assert store.pending_for("c") and not store.pending_for("d")
        assert await store.committed_for("d", 0.1)          # another customer's rows only
        started = time.monotonic()
        assert not await store.committed_for("c", 0.6)      # locked past the wait
        assert time.monotonic() - started >= 0.6
        other.execute("COMMIT")
        assert await store.committed_for("c", 5)            # the retries commit it
        assert not store.pending_for("c")
    finally:
        if other.in_transaction:
            other.execute("COMMIT")
        other.close()
        await store.drain(10)
        store.close()
