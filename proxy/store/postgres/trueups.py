"""The ``TrueUps`` owner on PostgreSQL: ``trueups`` (owners' migrations 3 and 10).

The primary key (customer, period start) with ``ON CONFLICT DO NOTHING`` makes each
period's decision once fleet-wide: of two members recording it, one inserts and the other
gets False (the first decision stays). A ``sending`` row's parameters are the first
member's, whichever member sends them; ``mark_sent`` changes it once."""

from __future__ import annotations

from proxy.store.postgres.pool import PgPool, retried
from proxy.store.protocols import TrueUpRecord
from proxy.store.trueups import check_record

_COLS = ("customer_id, period_start, period_end, commitment, charged, amount, currency,"
         " status, invoice_item, created_at, stripe_customer_id")


class PostgresTrueUps:
    def __init__(self, pool: PgPool) -> None:
        self.pool = pool

    async def decided(self, customer_id: str, period_start: int) -> bool:
        async with self.pool.acquire() as c:
            return await c.fetchval("SELECT 1 FROM trueups WHERE customer_id=$1 AND"
                                    " period_start=$2", customer_id,
                                    int(period_start)) is not None

    @retried
    async def record(self, t: TrueUpRecord) -> bool:
        check_record(t)
        async with self.pool.acquire() as c:
            done = await c.fetchval(
                f"INSERT INTO trueups({_COLS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11)"
                " ON CONFLICT (customer_id, period_start) DO NOTHING RETURNING 1",
                t.customer_id, t.period_start, t.period_end, t.commitment, t.charged,
                t.amount, t.currency, t.status, t.invoice_item, t.created_at,
                t.stripe_customer_id)
        return done is not None

    async def sending(self) -> list[TrueUpRecord]:
        async with self.pool.acquire() as c:
            rows = await c.fetch(f"SELECT {_COLS} FROM trueups WHERE status='sending'"
                                 " ORDER BY period_start, customer_id COLLATE \"C\"")
        return [TrueUpRecord(*r) for r in rows]

    @retried
    async def mark_sent(self, customer_id: str, period_start: int, invoice_item: str) -> bool:
        async with self.pool.acquire() as c:
            done = await c.fetchval(
                "UPDATE trueups SET status='sent', invoice_item=$3 WHERE customer_id=$1 AND"
                " period_start=$2 AND status='sending' RETURNING 1",
                customer_id, int(period_start), invoice_item)
        return done is not None

    async def recent(self, customer_id: str | None = None,
                     limit: int = 100) -> list[TrueUpRecord]:
        async with self.pool.acquire() as c:
            rows = await c.fetch(
                f"SELECT {_COLS} FROM trueups WHERE $1::text IS NULL OR customer_id=$1"
                " ORDER BY period_start DESC, customer_id COLLATE \"C\" LIMIT $2",
                customer_id or None, limit)
        return [TrueUpRecord(*r) for r in rows]
