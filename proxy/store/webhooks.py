"""Stripe webhook events on SQLite (the ``WebhookEvents`` owner): the only writer of
``webhook_events``. The event id is the primary key, so ``record`` is the dedupe."""

from __future__ import annotations

from collections.abc import Sequence

from proxy.store.access import Writer
from proxy.store.protocols import StoredEvent

_COLS = "id, type, created, status, result, received_at, processed_at"


class SqliteWebhookEvents:
    def __init__(self, db: Writer) -> None:
        self.db = db

    async def record(self, event_id: str, type_: str, created: int | None, payload: str,
                     received_at: int) -> bool:
        inserted: bool = self.db.execute_write(lambda c: c.execute(
            "INSERT OR IGNORE INTO webhook_events(id, type, created, payload, received_at)"
            " VALUES (?,?,?,?,?)",
            (event_id, type_, created, payload, received_at)).rowcount == 1)
        return inserted

    async def waiting(self, statuses: Sequence[str], after: int,
                      limit: int = 100) -> list[tuple[int, str]]:
        marks = ",".join("?" * len(statuses))
        return [(int(r), str(i)) for r, i in self.db.conn.execute(
            f"SELECT rowid, id FROM webhook_events WHERE status IN ({marks}) AND rowid > ?"
            " ORDER BY rowid LIMIT ?", (*statuses, after, limit))]

    async def payload(self, event_id: str) -> str | None:
        row = self.db.conn.execute("SELECT payload FROM webhook_events WHERE id=?",
                                   (event_id,)).fetchone()
        return None if row is None else str(row[0])

    async def set_outcome(self, event_id: str, status: str, result: str,
                          processed_at: int) -> None:
        self.db.execute_write(lambda c: c.execute(
            "UPDATE webhook_events SET status=?, result=?, processed_at=? WHERE id=?",
            (status, result, processed_at, event_id)))

    async def invoice_paid_seen(self, invoice_id: str | None) -> bool:
        return self.db.conn.execute(
            "SELECT 1 FROM webhook_events WHERE type='invoice.paid'"
            " AND json_extract(payload, '$.data.object.id')=?", (invoice_id,)
        ).fetchone() is not None

    async def recent(self, status: str | None = None,
                     limit: int = 100) -> list[StoredEvent]:
        where, args = ("WHERE status=?", (status,)) if status else ("", ())
        rows = self.db.conn.execute(f"SELECT {_COLS} FROM webhook_events {where}"
                                    " ORDER BY rowid DESC LIMIT ?", (*args, limit)).fetchall()
        return [StoredEvent(*r) for r in rows]

    async def get(self, event_id: str) -> StoredEvent | None:
        row = self.db.conn.execute(f"SELECT {_COLS}, payload FROM webhook_events WHERE id=?",
                                   (event_id,)).fetchone()
        return None if row is None else StoredEvent(*row)
