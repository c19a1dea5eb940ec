"""The ``GrantMirrors`` owner on PostgreSQL: ``grant_mirrors`` (owners' migration 7) and
``invoice_finalized`` (migration 8).

Members race only on the same row: ``want`` is one ``INSERT .. ON CONFLICT DO UPDATE``
(a void never goes back to live), and ``progress``/``fail`` are single-row updates, so two
members working one row leave it in one of the states either would have written; the
Stripe calls behind them are idempotent (``proxy.credits.mirror``)."""

from __future__ import annotations

from collections.abc import Sequence

from proxy.store.mirrors import check_want
from proxy.store.postgres.pool import PgPool, retried
from proxy.store.protocols import GrantMirrorRecord

_COLS = ("grant_id, customer_id, want, done, stripe_grant_id, status, attempts,"
         " next_attempt_at, last_error, created_at, updated_at")


class PostgresGrantMirrors:
    def __init__(self, pool: PgPool) -> None:
        self.pool = pool

    @retried
    async def want(self, rows: Sequence[tuple[str, str, str]], at: int) -> int:
        n = 0
        async with self.pool.acquire() as c, c.transaction():
            for gid, cid, want in rows:
                check_want(want)
                got = await c.fetchval(
                    "INSERT INTO grant_mirrors(grant_id, customer_id, want, created_at,"
                    " updated_at) VALUES ($1,$2,$3,$4,$4) ON CONFLICT (grant_id) DO UPDATE SET"
                    " want=EXCLUDED.want, status=CASE WHEN grant_mirrors.done=EXCLUDED.want"
                    " THEN 'mirrored' ELSE 'pending' END, next_attempt_at=0, attempts=0,"
                    " updated_at=EXCLUDED.updated_at WHERE grant_mirrors.want <> EXCLUDED.want"
                    " AND grant_mirrors.want <> 'void' RETURNING 1", gid, cid, want, int(at))
                n += got is not None
        return n

    async def due(self, now: float, limit: int = 100) -> list[GrantMirrorRecord]:
        async with self.pool.acquire() as c:
            rows = await c.fetch(
                f"SELECT {_COLS} FROM grant_mirrors WHERE status='pending' AND"
                " next_attempt_at<=$1 ORDER BY created_at, grant_id COLLATE \"C\" LIMIT $2",
                float(now), int(limit))
        return [GrantMirrorRecord(*r) for r in rows]

    @retried
    async def progress(self, grant_id: str, done: str, stripe_grant_id: str | None,
                       at: int) -> None:
        check_want(done)
        async with self.pool.acquire() as c:
            await c.execute(
                "UPDATE grant_mirrors SET done=$2, stripe_grant_id=COALESCE($3,"
                " stripe_grant_id), status=CASE WHEN want=$2 THEN 'mirrored' ELSE 'pending'"
                " END, next_attempt_at=0, attempts=0, last_error=NULL, updated_at=$4"
                " WHERE grant_id=$1", grant_id, done, stripe_grant_id, int(at))

    @retried
    async def fail(self, grant_id: str, error: str, retry_at: float | None, at: int) -> None:
        async with self.pool.acquire() as c:
            await c.execute(
                "UPDATE grant_mirrors SET attempts=attempts+1, last_error=$2,"
                " next_attempt_at=COALESCE($3, next_attempt_at),"
                " status=CASE WHEN $3::double precision IS NULL THEN 'dead' ELSE status END,"
                " updated_at=$4 WHERE grant_id=$1 AND status='pending'",
                grant_id, error[:500], retry_at, int(at))

    async def rows(self, *, status: str | None = None, customer_id: str | None = None,
                   limit: int = 500) -> list[GrantMirrorRecord]:
        async with self.pool.acquire() as c:
            rows = await c.fetch(
                f"SELECT {_COLS} FROM grant_mirrors WHERE ($1::text IS NULL OR status=$1)"
                " AND ($2::text IS NULL OR customer_id=$2)"
                " ORDER BY updated_at DESC, grant_id COLLATE \"C\" LIMIT $3",
                status, customer_id, int(limit))
        return [GrantMirrorRecord(*r) for r in rows]

    async def known(self) -> dict[str, str]:
        async with self.pool.acquire() as c:
            return {str(r[0]): str(r[1]) for r in await c.fetch(
                "SELECT grant_id, want FROM grant_mirrors")}

    @retried
    async def requeue(self, grant_ids: Sequence[str] | None, at: int) -> int:
        async with self.pool.acquire() as c:
            if grant_ids is None:
                got = await c.fetch(
                    "UPDATE grant_mirrors SET status='pending', next_attempt_at=0, attempts=0,"
                    " updated_at=$1 WHERE status='dead' RETURNING 1", int(at))
            else:
                got = await c.fetch(
                    "UPDATE grant_mirrors SET status='pending', next_attempt_at=0, attempts=0,"
                    " updated_at=$1 WHERE status='dead' AND grant_id = ANY($2::text[])"
                    " RETURNING 1", int(at), list(grant_ids))
        return len(got)

    @retried
    async def finalize(self, customer_id: str, period_end: int, at: int) -> bool:
        async with self.pool.acquire() as c:
            got = await c.fetchval(
                "INSERT INTO invoice_finalized(customer_id, period_end, updated_at)"
                " VALUES ($1,$2,$3) ON CONFLICT (customer_id) DO UPDATE SET"
                " period_end=EXCLUDED.period_end, updated_at=EXCLUDED.updated_at"
                " WHERE EXCLUDED.period_end > invoice_finalized.period_end RETURNING 1",
                customer_id, int(period_end), int(at))
        return got is not None

    async def finalized(self) -> dict[str, int]:
        async with self.pool.acquire() as c:
            rows = await c.fetch("SELECT customer_id, period_end FROM invoice_finalized")
        return {str(r[0]): int(r[1]) for r in rows}
