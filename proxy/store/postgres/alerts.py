"""The ``AlertsFired`` owner on PostgreSQL: ``alerts``.

UNIQUE (customer, period, threshold) with ``ON CONFLICT DO NOTHING`` makes ``fire`` fire
each alert once fleet-wide, whichever members cross the threshold together. ``claim`` is one
conditional ``UPDATE``: a second concurrent claim waits for the first's row lock, then
re-checks ``next_attempt_at <= now`` on the new row version and finds it hidden, so two
claims (on any members) never both succeed.
"""

from __future__ import annotations

from collections.abc import Sequence

from proxy.store.postgres.pool import PgPool
from proxy.store.protocols import AlertRecord, NewAlert


def _count(status: str) -> int:
    return int(status.split()[-1])


class PostgresAlerts:
    def __init__(self, pool: PgPool) -> None:
        self.pool = pool

    async def fired(self) -> set[tuple[str, str, str]]:
        async with self.pool.acquire() as c:
            rows = await c.fetch("SELECT customer_id, period_key, threshold FROM alerts")
        return {(str(r[0]), str(r[1]), str(r[2])) for r in rows}

    async def fire(self, alerts: Sequence[NewAlert]) -> int:
        if not alerts:
            return 0
        async with self.pool.acquire() as c:
            rows = await c.fetch(
                "INSERT INTO alerts(customer_id, period_key, threshold, payload, created_at)"
                " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],"
                " $5::bigint[]) ON CONFLICT (customer_id, period_key, threshold) DO NOTHING"
                " RETURNING id",
                [a.customer_id for a in alerts], [a.period_key for a in alerts],
                [a.threshold for a in alerts], [a.payload for a in alerts],
                [a.created_at for a in alerts])
        return len(rows)

    async def due(self, now: float, limit: int = 100) -> list[AlertRecord]:
        async with self.pool.acquire() as c:
            rows = await c.fetch(
                "SELECT id, customer_id, period_key, threshold, payload, attempts FROM alerts"
                " WHERE status = 'pending' AND next_attempt_at <= $1 ORDER BY id LIMIT $2",
                now, limit)
        return [AlertRecord(*r) for r in rows]

    async def next_due(self) -> float | None:
        async with self.pool.acquire() as c:
            nxt = await c.fetchval("SELECT MIN(next_attempt_at) FROM alerts"
                                   " WHERE status = 'pending'")
        return None if nxt is None else float(nxt)

    async def claim(self, alert_id: int, now: float, lease_until: float) -> int | None:
        async with self.pool.acquire() as c:
            n = await c.fetchval(
                "UPDATE alerts SET attempts = attempts + 1, next_attempt_at = $2"
                " WHERE id = $1 AND status = 'pending' AND next_attempt_at <= $3"
                " RETURNING attempts", alert_id, lease_until, now)
        return None if n is None else int(n)

    async def finish(self, alert_id: int, status: str, error: str | None,
                     sent_at: int | None) -> bool:
        async with self.pool.acquire() as c:
            return _count(await c.execute(
                "UPDATE alerts SET status = $2, last_error = COALESCE($3, last_error),"
                " sent_at = COALESCE($4, sent_at) WHERE id = $1 AND status = 'pending'",
                alert_id, status, error, sent_at)) == 1

    async def retry_at(self, alert_id: int, when: float, error: str) -> None:
        async with self.pool.acquire() as c:
            await c.execute("UPDATE alerts SET next_attempt_at = $2, last_error = $3"
                            " WHERE id = $1 AND status = 'pending'", alert_id, when, error)

    async def list_dead(self, limit: int = 100) -> list[AlertRecord]:
        async with self.pool.acquire() as c:
            rows = await c.fetch(
                "SELECT id, customer_id, period_key, threshold, payload, attempts, created_at,"
                " last_error FROM alerts WHERE status = 'dead' ORDER BY id LIMIT $1", limit)
        return [AlertRecord(*r) for r in rows]

    async def requeue(self, ids: Sequence[int]) -> int:
        async with self.pool.acquire() as c:
            return _count(await c.execute(
                "UPDATE alerts SET status = 'pending', attempts = 0, next_attempt_at = 0"
                " WHERE id = ANY($1::bigint[]) AND status = 'dead'", [int(i) for i in ids]))
