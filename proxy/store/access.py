"""How the SQLite owners reach the database: a read connection and one write entry point.

``Store`` (the running proxy's single writer) is one; ``Direct`` wraps a connection of its
own for offline processes (the CLI, the demo set-up, tools), where each write is one
``BEGIN IMMEDIATE .. COMMIT`` that may wait for the lock.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Writer(Protocol):
    conn: sqlite3.Connection

    def execute_write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``fn`` in one write transaction; commit, or roll back and re-raise."""
        ...


class Direct:
    """A connection of the caller's own (not the running proxy's): writes may wait for the
    lock for the connection's ``busy_timeout``."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute_write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            out = fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return out
