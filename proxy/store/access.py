"""How the SQLite owners reach the database: a read connection and one write entry point.

``Store`` (the running proxy's single writer) is one; ``Direct`` wraps a connection of its
own for offline processes (the CLI, the demo set-up, tools), where each write is one
``BEGIN IMMEDIATE .. COMMIT`` that may wait for the lock.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from proxy.store.db import data_version, run_write

T = TypeVar("T")


class Writer(Protocol):
    @property
    def conn(self) -> sqlite3.Connection:
        """The write connection (the running proxy's ``Store``: on the loop thread)."""
        ...

    def execute_write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``fn`` in one write transaction; commit, or roll back and re-raise (a
        locked database as ``proxy.store.db.DatabaseBusy``)."""
        ...

    async def write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """``execute_write`` that first waits for a lock another process holds (the running
        proxy: ``storage.lock_wait``, on a timer; elsewhere the connection's
        ``busy_timeout``), then raises ``DatabaseBusy``."""
        ...

    def data_version(self) -> int:
        """``PRAGMA data_version`` of ``conn``: moves when another connection commits."""
        ...


class Direct:
    """A connection of the caller's own (not the running proxy's): writes may wait for the
    lock for the connection's ``busy_timeout``."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute_write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        return run_write(self.conn, fn)

    async def write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        return self.execute_write(fn)     # the connection's busy_timeout is the wait

    def data_version(self) -> int:
        return data_version(self.conn)
