"""The ``WebhookEvents`` owner on PostgreSQL: ``webhook_events``.

The event id is the primary key and ``record`` is ``INSERT .. ON CONFLICT DO NOTHING``: of
any number of members receiving one event (Stripe retries, or delivers to several
endpoints), exactly one stores it and answers True. The cursor of ``waiting`` is the
``arrival`` identity (SQLite's ``rowid``).
"""

from __future__ import annotations

from collections.abc import Sequence

from proxy.store.postgres.pool import PgPool, retried
from proxy.store.protocols import StoredEvent

_COLS = "id, type, created, status, result, received_at, processed_at"


class PostgresWebhookEvents:
    def __init__(self, pool: PgPool) -> None:
        self.pool = pool

    @retried
    async def record(self, event_id: str, type_: str, created: int | None, payload: str,
                     received_at: int) -> bool:
        async with self.pool.acquire() as c:
            return await c.fetchval(
                "INSERT INTO webhook_events(id, type, created, payload, received_at)"
                " VALUES ($1,$2,$3,$4,$5) ON CONFLICT (id) DO NOTHING RETURNING true",
                event_id, type_, created, payload, received_at) is not None

    async def waiting(self, statuses: Sequence[str], after: int,
                      limit: int = 100) -> list[tuple[int, str]]:
        async with self.pool.acquire() as c:
            rows = await c.fetch("SELECT arrival, id FROM webhook_events WHERE status ="
                                 " ANY($1::text[]) AND arrival > $2 ORDER BY arrival LIMIT $3",
                                 list(statuses), after, limit)
        return [(int(r[0]), str(r[1])) for r in rows]

    async def payload(self, event_id: str) -> str | None:
        async with self.pool.acquire() as c:
            p = await c.fetchval("SELECT payload FROM webhook_events WHERE id=$1", event_id)
        return None if p is None else str(p)

    @retried
    async def set_outcome(self, event_id: str, status: str, result: str,
                          processed_at: int) -> None:
        async with self.pool.acquire() as c:
            await c.execute("UPDATE webhook_events SET status=$2, result=$3, processed_at=$4"
                            " WHERE id=$1", event_id, status, result, processed_at)

    async def invoice_paid_seen(self, invoice_id: str | None) -> bool:
        if invoice_id is None:
            return False
        async with self.pool.acquire() as c:
            return await c.fetchval(
                "SELECT 1 FROM webhook_events WHERE type='invoice.paid'"
                " AND payload::jsonb #>> '{data,object,id}' = $1 LIMIT 1",
                invoice_id) is not None

    async def recent(self, status: str | None = None,
                     limit: int = 100) -> list[StoredEvent]:
        async with self.pool.acquire() as c:
            rows = await c.fetch(f"SELECT {_COLS} FROM webhook_events WHERE $1::text IS NULL"
                                 " OR status=$1 ORDER BY arrival DESC LIMIT $2", status, limit)
        return [StoredEvent(*r) for r in rows]

    async def get(self, event_id: str) -> StoredEvent | None:
        async with self.pool.acquire() as c:
            row = await c.fetchrow(f"SELECT {_COLS}, payload FROM webhook_events WHERE id=$1",
                                   event_id)
        return None if row is None else StoredEvent(*row)
