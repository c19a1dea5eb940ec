"""The SQLite backend: every owner of ``proxy.store.protocols`` on one database file.

The running proxy builds it on its ``Store`` (the single writer, plus the read-only
``aiosqlite`` connection for large reads); offline processes (CLI, tools, demo set-up)
build it on a connection of their own with ``offline()``.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

from proxy.store.access import Direct, Writer
from proxy.store.alerts import SqliteAlerts
from proxy.store.db import Store
from proxy.store.keys import SqliteCustomers
from proxy.store.ledger import SqliteCreditLedger
from proxy.store.mirrors import SqliteGrantMirrors
from proxy.store.outbox import SqliteOutbox
from proxy.store.protocols import Maintenance, Storage
from proxy.store.rules_history import SqliteRulesHistory
from proxy.store.trueups import SqliteTrueUps
from proxy.store.usage import SqliteUsage
from proxy.store.webhooks import SqliteWebhookEvents


class _NoMaintenance:
    """An offline connection does not own the file's health (the proxy does)."""

    def check_file(self) -> str | None:
        return None

    async def checkpoint_once(self) -> None:
        return None

    async def integrity_check(self) -> str | None:
        return None


@dataclass(slots=True)
class SqliteStorage:
    outbox: SqliteOutbox
    ledger: SqliteCreditLedger
    usage: SqliteUsage
    customers: SqliteCustomers
    webhooks: SqliteWebhookEvents
    alerts: SqliteAlerts
    rules: SqliteRulesHistory
    trueups: SqliteTrueUps
    maintenance: Maintenance
    mirrors: SqliteGrantMirrors

    @classmethod
    def on(cls, db: Writer, reader: aiosqlite.Connection | None = None) -> SqliteStorage:
        return cls(SqliteOutbox(db, reader), SqliteCreditLedger(db), SqliteUsage(db, reader),
                   SqliteCustomers(db), SqliteWebhookEvents(db), SqliteAlerts(db),
                   SqliteRulesHistory(db), SqliteTrueUps(db),
                   db if isinstance(db, Store) else _NoMaintenance(), SqliteGrantMirrors(db))


async def open_reader(path: Path) -> aiosqlite.Connection:
    """The read-only connection for large reads off the event-loop thread."""
    reader = await aiosqlite.connect(str(path))
    try:
        await reader.execute("PRAGMA query_only=1")
    except BaseException:
        await reader.close()
        raise
    return reader


def offline(conn: sqlite3.Connection) -> SqliteStorage:
    """The owners on a connection of the caller's own (CLI, tools)."""
    return SqliteStorage.on(Direct(conn))


def as_storage(s: SqliteStorage) -> Storage:
    """Typed as the Protocol (mypy checks here that every SQLite owner implements its
    Protocol)."""
    return s

