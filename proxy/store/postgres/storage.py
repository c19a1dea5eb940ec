"""The PostgreSQL backend: every owner of ``proxy.store.protocols`` on one database, the
same shape as ``proxy.store.sqlite.SqliteStorage``.

Every fleet member builds one on its ``PgPool``; two members are two ``PostgresStorage``
objects on one database, and each owner's docstring says how its verbs stay correct when
members call them concurrently (unique constraints with ``ON CONFLICT``, row locks in a
fixed order, transaction-scoped advisory locks; nothing session-scoped, so a transaction
pooler is safe). Each verb is one transaction on one pooled connection; connection failures
surface as ``PgUnavailable`` (``proxy.store.postgres.errors``).

``open`` also brings the schema to ``ALL_MIGRATIONS`` (the fleet's migrations plus the
owners', ``proxy.store.postgres.owners_schema``). ``watch`` opens one direct connection
that LISTENs for key and customer changes so ``Customers.data_version`` moves when another
member commits one (a pooled connection cannot LISTEN behind a transaction pooler).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from proxy.store.postgres.alerts import PostgresAlerts
from proxy.store.postgres.customers import PostgresCustomers
from proxy.store.postgres.errors import translated
from proxy.store.postgres.ledger import PostgresCreditLedger
from proxy.store.postgres.maintenance import PostgresMaintenance
from proxy.store.postgres.migrate import migrate
from proxy.store.postgres.mirrors import PostgresGrantMirrors
from proxy.store.postgres.outbox import PostgresOutbox
from proxy.store.postgres.owners_schema import ALL_MIGRATIONS, CUSTOMERS_CHANNEL
from proxy.store.postgres.pool import PgPool, PoolSettings
from proxy.store.postgres.rules_history import PostgresRulesHistory
from proxy.store.postgres.schema import KEYS_CHANNEL
from proxy.store.postgres.trueups import PostgresTrueUps
from proxy.store.postgres.usage import LocalRecorder, PostgresUsage, Shipping
from proxy.store.postgres.webhooks import PostgresWebhookEvents
from proxy.store.protocols import Storage


async def ensure_schema(pool: PgPool) -> int:
    """Apply the missing migrations of ``ALL_MIGRATIONS``; returns the version it was at."""
    async with pool.acquire() as c:
        return await migrate(c, ALL_MIGRATIONS)


@dataclass(slots=True)
class PostgresStorage:
    outbox: PostgresOutbox
    ledger: PostgresCreditLedger
    usage: PostgresUsage
    customers: PostgresCustomers
    webhooks: PostgresWebhookEvents
    alerts: PostgresAlerts
    rules: PostgresRulesHistory
    trueups: PostgresTrueUps
    maintenance: PostgresMaintenance
    mirrors: PostgresGrantMirrors
    pool: PgPool
    owns_pool: bool = False
    listener: Any = field(default=None)     # asyncpg.Connection while ``watch`` runs

    @classmethod
    def on(cls, pool: PgPool, local: LocalRecorder | None = None,
           shipping: Shipping | None = None) -> PostgresStorage:
        """The owners on an open pool whose schema is current (``ensure_schema``);
        ``local``: the member's journal that ``usage.record`` delegates to; ``shipping``:
        what ships that journal (``usage.materialize``)."""
        return cls(PostgresOutbox(pool), PostgresCreditLedger(pool),
                   PostgresUsage(pool, local, shipping),
                   PostgresCustomers(pool), PostgresWebhookEvents(pool), PostgresAlerts(pool),
                   PostgresRulesHistory(pool), PostgresTrueUps(pool),
                   PostgresMaintenance(pool), PostgresGrantMirrors(pool), pool)

    @classmethod
    async def open(cls, settings: PoolSettings, local: LocalRecorder | None = None,
                   shipping: Shipping | None = None) -> PostgresStorage:
        """A pool of its own (closed by ``close``), schema brought up to date."""
        pool = PgPool(settings)
        await pool.open(run_migrations=False)
        try:
            await ensure_schema(pool)
        except BaseException:
            await pool.close()
            raise
        s = cls.on(pool, local, shipping)
        s.owns_pool = True
        return s

    async def watch(self) -> None:
        """LISTEN for key and customer changes committed by any member."""
        async with translated():
            conn = await asyncpg.connect(self.pool.settings.dsn,
                                         timeout=self.pool.settings.connect_timeout)
        for channel in (KEYS_CHANNEL, CUSTOMERS_CHANNEL):
            await conn.add_listener(channel, self._notified)
        conn.add_termination_listener(self._lost)
        self.listener = conn
        self.customers.watched = True

    def _notified(self, *_args: object) -> None:
        self.customers.changed()

    def _lost(self, *_args: object) -> None:
        """The listener died: changes may be missed, so back to a new version per call."""
        self.customers.watched = False

    async def close(self) -> None:
        conn, self.listener = self.listener, None
        self.customers.watched = False
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close(timeout=1)
        await self.alerts.close()
        if self.owns_pool:
            await self.pool.close()


def as_storage(s: PostgresStorage) -> Storage:
    """Typed as the Protocol (mypy checks here that every PostgreSQL owner implements its
    Protocol)."""
    return s
