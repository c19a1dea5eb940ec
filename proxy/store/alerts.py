"""Threshold alerts on SQLite (the ``AlertsFired`` owner): the only writer of ``alerts``.
UNIQUE (customer, period, threshold) makes ``fire`` fire each alert once."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from proxy.store.access import Writer
from proxy.store.protocols import AlertRecord, NewAlert


class SqliteAlerts:
    def __init__(self, db: Writer) -> None:
        self.db = db

    async def fired(self) -> set[tuple[str, str, str]]:
        return {(str(c), str(p), str(t)) for c, p, t in self.db.conn.execute(
            "SELECT customer_id, period_key, threshold FROM alerts")}

    def fire(self, alerts: Sequence[NewAlert]) -> None:
        def tx(c: sqlite3.Connection) -> int:
            n = 0
            for a in alerts:
                n += c.execute(
                    "INSERT OR IGNORE INTO alerts(customer_id, period_key, threshold, payload,"
                    " created_at) VALUES (?,?,?,?,?)",
                    (a.customer_id, a.period_key, a.threshold, a.payload, a.created_at)
                ).rowcount
            return n

        self.db.execute_write(tx)

    async def fire_new(self, alerts: Sequence[NewAlert]) -> list[NewAlert]:
        def tx(c: sqlite3.Connection) -> list[NewAlert]:
            return [a for a in alerts if c.execute(
                "INSERT OR IGNORE INTO alerts(customer_id, period_key, threshold, payload,"
                " created_at) VALUES (?,?,?,?,?)",
                (a.customer_id, a.period_key, a.threshold, a.payload, a.created_at)
            ).rowcount == 1]

        if not alerts:
            return []
        new: list[NewAlert] = self.db.execute_write(tx)
        return new

    async def due(self, now: float, limit: int = 100) -> list[AlertRecord]:
        return [AlertRecord(*r) for r in self.db.conn.execute(
            "SELECT id, customer_id, period_key, threshold, payload, attempts FROM alerts"
            " WHERE status = 'pending' AND next_attempt_at <= ? ORDER BY id LIMIT ?",
            (now, limit)).fetchall()]

    async def next_due(self) -> float | None:
        (nxt,) = self.db.conn.execute(
            "SELECT MIN(next_attempt_at) FROM alerts WHERE status = 'pending'").fetchone()
        return None if nxt is None else float(nxt)

    async def claim(self, alert_id: int, now: float, lease_until: float) -> int | None:
        def tx(conn: sqlite3.Connection) -> int | None:
            cur = conn.execute(
                "UPDATE alerts SET attempts = attempts + 1, next_attempt_at = ?"
                " WHERE id = ? AND status = 'pending' AND next_attempt_at <= ?",
                (lease_until, alert_id, now))
            if cur.rowcount != 1:
                return None
            (n,) = conn.execute("SELECT attempts FROM alerts WHERE id = ?", (alert_id,)).fetchone()
            return int(n)

        result: int | None = self.db.execute_write(tx)
        return result

    async def finish(self, alert_id: int, status: str, error: str | None,
                     sent_at: int | None) -> bool:
        def tx(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE alerts SET status = ?, last_error = COALESCE(?, last_error),"
                " sent_at = COALESCE(?, sent_at) WHERE id = ? AND status = 'pending'",
                (status, error, sent_at, alert_id))
            return cur.rowcount == 1

        return bool(self.db.execute_write(tx))

    async def retry_at(self, alert_id: int, when: float, error: str) -> None:
        self.db.execute_write(lambda conn: conn.execute(
            "UPDATE alerts SET next_attempt_at = ?, last_error = ? WHERE id = ? AND status = 'pending'",
            (when, error, alert_id)))

    async def list_dead(self, limit: int = 100) -> list[AlertRecord]:
        return [AlertRecord(i, c, p, t, pl, a, cr, e) for i, c, p, t, pl, cr, a, e in
                self.db.conn.execute(
                    "SELECT id, customer_id, period_key, threshold, payload, created_at, attempts,"
                    " last_error FROM alerts WHERE status = 'dead' ORDER BY id LIMIT ?",
                    (limit,)).fetchall()]

    async def requeue(self, ids: Sequence[int]) -> int:
        def tx(conn: sqlite3.Connection) -> int:
            n = 0
            for i in ids:
                n += conn.execute(
                    "UPDATE alerts SET status = 'pending', attempts = 0, next_attempt_at = 0"
                    " WHERE id = ? AND status = 'dead'", (int(i),)).rowcount
            return n

        return int(self.db.execute_write(tx))
