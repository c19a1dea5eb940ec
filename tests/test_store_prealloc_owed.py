"""Review of bb36bb1 (the owed WAL preallocation retried every checkpoint tick)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from proxy.store import db as dbmod
from proxy.store.db import Store
from tests.test_store import _commit_each


async def test_a_preallocation_the_file_system_refuses_is_not_retried_every_tick(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """posix_fallocate refused for a reason that is not a lock (ENOSPC, EOPNOTSUPP):
    ``preallocate_wal`` returns False exactly as for a busy database, so the preallocation
    stays owed forever: every tick takes the write lock again and logs the same warning
    (once a second in production). It was one warning at open."""
    calls: list[int] = []

    def refuse(fd: int, off: int, n: int) -> None:
        calls.append(n)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", refuse)
    caplog.set_level(logging.WARNING)
    store = Store.open(tmp_path / "s.db", wal_truncate_size=4 * 1024 * 1024)
    try:
        for i in range(5):
            _commit_each(store, [i])
            await store.checkpoint_once()
    finally:
        store.close()
    warned = [r for r in caplog.records if "could not preallocate the WAL" in r.getMessage()]
    assert len(calls) <= 1 and len(warned) <= 1, (len(calls), len(warned))


async def test_the_owed_preallocation_is_not_taken_for_a_foreign_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The owed retry runs under traffic (unlike the idle TRUNCATE's), outside the hold the
    RESTART uses: a group commit meanwhile meets our own write lock, counts as "locked" and
    calls ``_foreign_lock`` (drops the WAL pin, meant for another process's checkpoint)."""
    store = Store.open(tmp_path / "s.db", wal_truncate_size=4 * 1024 * 1024)
    foreign: list[bool] = []
    monkeypatch.setattr(store, "_foreign_lock", lambda: foreign.append(True))

    entered = threading.Event()

    def slow(conn: sqlite3.Connection, wal: Path, n: int) -> bool:
        conn.execute("BEGIN IMMEDIATE")     # as preallocate_wal: its fallocate under the
        entered.set()                       # write lock, slow (a slow disk, a big file)
        time.sleep(0.3)
        conn.execute("ROLLBACK")
        return True

    try:
        store._prealloc_owed = True
        monkeypatch.setattr(dbmod, "preallocate_wal", slow)
        tick = asyncio.ensure_future(store.checkpoint_once())
        await asyncio.to_thread(entered.wait, 5)
        _commit_each(store, [1])          # a group commit while the retry holds the lock
        await tick
        await asyncio.sleep(0.05)
        assert foreign == [], "our own preallocation taken for a foreign lock"
    finally:
        store.close()
