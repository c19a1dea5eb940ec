"""The ``AlertsFired`` owner on PostgreSQL: ``alerts``.

UNIQUE (customer, period, threshold) with ``ON CONFLICT DO NOTHING`` makes ``fire`` fire
each alert once fleet-wide, whichever members cross the threshold together.

``fire`` is called on the request path and must not wait for the network: it queues the
alerts in memory and one background task per member inserts them (durable shortly after;
the sender only sees committed alerts). While PostgreSQL is unreachable the queue is kept
and retried every ``retry_seconds``; it holds at most ``max_queued`` alerts (default
10,000; the oldest beyond that are dropped and logged: at most one alert per customer,
period and threshold is ever queued, so only a fleet with more than that many distinct
crossings during one outage loses any). ``flush`` waits until the queue is committed;
``fired``, ``fire_new``, ``due``, ``next_due`` and ``close`` flush first (a member reads its
own fires). ``fire_new`` (off the request path) inserts at once and returns what it
inserted. ``claim`` is one conditional ``UPDATE``: a second concurrent claim waits for the
first's row lock, then re-checks ``next_attempt_at <= now`` on the new row version and finds
it hidden, so two claims (on any members) never both succeed.

Inserts are serialized fleet-wide by a transaction-scoped advisory lock (``_INSERT_LOCK``):
an insert keeps the caller's order (alert ids, and so delivery, follow the firing order),
and two members inserting overlapping alerts in different orders took the unique index's
locks in opposite orders and deadlocked; PostgreSQL aborted one each ``deadlock_timeout``
(1 s) until a statement ran into its timeout. Alerts are rare (threshold crossings), so
waiting for one another costs nothing measurable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from proxy.store.postgres.errors import PgConflict, PgUnavailable
from proxy.store.postgres.pool import PgPool, retried
from proxy.store.protocols import AlertRecord, NewAlert
from proxy.tasks import cancel_and_wait

_INSERT_LOCK = "SELECT pg_advisory_xact_lock(hashtext('meterproxy_alerts_insert'))"

log = logging.getLogger("meterproxy.store.postgres.alerts")


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("committing alerts failed", exc_info=task.exception())


def _count(status: str) -> int:
    return int(status.split()[-1])


class PostgresAlerts:
    def __init__(self, pool: PgPool, max_queued: int = 10_000,
                 retry_seconds: float = 1.0) -> None:
        self.pool = pool
        self.max_queued = max_queued
        self.retry_seconds = retry_seconds
        self.dropped = 0
        self._queue: dict[tuple[str, str, str], NewAlert] = {}
        self._task: asyncio.Task[None] | None = None

    def fire(self, alerts: Sequence[NewAlert]) -> None:
        for a in alerts:
            self._queue.setdefault((a.customer_id, a.period_key, a.threshold), a)
        over = len(self._queue) - self.max_queued
        if over > 0:
            for k in list(self._queue)[:over]:
                del self._queue[k]
            self.dropped += over
            log.error("dropped %d queued alerts: PostgreSQL unreachable and %d are queued",
                      over, self.max_queued)
        if self._queue and (self._task is None or self._task.done()):
            # (proxy.tasks.spawn, less its import: the store imports no runtime module)
            self._task = asyncio.get_running_loop().create_task(self._drain(),
                                                                name="pg-alerts-fire")
            self._task.add_done_callback(_log_failure)

    async def _drain(self) -> None:
        while self._queue:
            try:
                await self._commit_queue()
            except (PgUnavailable, PgConflict) as exc:
                log.warning("alerts not committed yet (will retry): %s", exc)
                await asyncio.sleep(self.retry_seconds)

    async def _commit_queue(self) -> int:
        batch = list(self._queue.values())
        n = await self._insert(batch)
        for a in batch:      # a re-fire queued meanwhile is the same alert: done too
            self._queue.pop((a.customer_id, a.period_key, a.threshold), None)
        return n

    async def flush(self) -> int:
        """Commit every queued alert now; returns how many were new. Raises
        PgUnavailable (the alerts stay queued)."""
        return await self._commit_queue() if self._queue else 0

    async def close(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        try:
            await self.flush()
        except (PgUnavailable, PgConflict) as exc:
            log.error("%d alerts not committed at shutdown: %s", len(self._queue), exc)

    async def fired(self) -> set[tuple[str, str, str]]:
        await self.flush()
        async with self.pool.acquire() as c:
            rows = await c.fetch("SELECT customer_id, period_key, threshold FROM alerts")
        return {(str(r[0]), str(r[1]), str(r[2])) for r in rows}

    async def fire_new(self, alerts: Sequence[NewAlert]) -> list[NewAlert]:
        """Awaited: inserted now (not queued); the alerts of ``alerts`` this call inserted, in
        order (a repeat, here or on another member, inserts nothing). This member's queued
        ``fire`` alerts are committed first, so one it fired already is not new."""
        await self.flush()
        ordinals = set(await self._insert_returning(alerts))
        return [a for i, a in enumerate(alerts) if i in ordinals]

    async def _insert(self, alerts: Sequence[NewAlert]) -> int:
        return len(await self._insert_returning(alerts))

    @retried
    async def _insert_returning(self, alerts: Sequence[NewAlert]) -> list[int]:
        """Insert the alerts; the (0-based) positions in ``alerts`` of those inserted."""
        if not alerts:
            return []
        async with self.pool.acquire() as c, c.transaction():
            await c.execute(_INSERT_LOCK)
            rows = await c.fetch(
                "INSERT INTO alerts(customer_id, period_key, threshold, payload, created_at)"
                " SELECT c, p, t, pl, ca FROM unnest($1::text[], $2::text[], $3::text[],"
                " $4::text[], $5::bigint[]) WITH ORDINALITY AS u(c, p, t, pl, ca, n)"
                " ORDER BY n ON CONFLICT (customer_id, period_key, threshold) DO NOTHING"
                " RETURNING customer_id, period_key, threshold",
                [a.customer_id for a in alerts], [a.period_key for a in alerts],
                [a.threshold for a in alerts], [a.payload for a in alerts],
                [a.created_at for a in alerts])
        inserted = {(str(r[0]), str(r[1]), str(r[2])) for r in rows}
        out: list[int] = []
        for i, a in enumerate(alerts):
            k = (a.customer_id, a.period_key, a.threshold)
            if k in inserted:          # the first of duplicates within one call
                inserted.discard(k)
                out.append(i)
        return out

    async def due(self, now: float, limit: int = 100) -> list[AlertRecord]:
        await self.flush()
        async with self.pool.acquire() as c:
            rows = await c.fetch(
                "SELECT id, customer_id, period_key, threshold, payload, attempts FROM alerts"
                " WHERE status = 'pending' AND next_attempt_at <= $1 ORDER BY id LIMIT $2",
                now, limit)
        return [AlertRecord(*r) for r in rows]

    async def next_due(self) -> float | None:
        await self.flush()
        async with self.pool.acquire() as c:
            nxt = await c.fetchval("SELECT MIN(next_attempt_at) FROM alerts"
                                   " WHERE status = 'pending'")
        return None if nxt is None else float(nxt)

    @retried
    async def claim(self, alert_id: int, now: float, lease_until: float) -> int | None:
        async with self.pool.acquire() as c:
            n = await c.fetchval(
                "UPDATE alerts SET attempts = attempts + 1, next_attempt_at = $2"
                " WHERE id = $1 AND status = 'pending' AND next_attempt_at <= $3"
                " RETURNING attempts", alert_id, lease_until, now)
        return None if n is None else int(n)

    @retried
    async def finish(self, alert_id: int, status: str, error: str | None,
                     sent_at: int | None) -> bool:
        async with self.pool.acquire() as c:
            return _count(await c.execute(
                "UPDATE alerts SET status = $2, last_error = COALESCE($3, last_error),"
                " sent_at = COALESCE($4, sent_at) WHERE id = $1 AND status = 'pending'",
                alert_id, status, error, sent_at)) == 1

    @retried
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

    @retried
    async def requeue(self, ids: Sequence[int]) -> int:
        async with self.pool.acquire() as c:
            return _count(await c.execute(
                "UPDATE alerts SET status = 'pending', attempts = 0, next_attempt_at = 0"
                " WHERE id = ANY($1::bigint[]) AND status = 'dead'", [int(i) for i in ids]))
