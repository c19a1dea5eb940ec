"""Minimum-commitment true-ups on SQLite (the ``TrueUps`` owner): the only writer of
``trueups`` (schema migration 8). The primary key (customer, period start) makes each
period's decision once."""

from __future__ import annotations

from proxy.store.access import Writer
from proxy.store.protocols import TrueUpRecord

_COLS = ("customer_id, period_start, period_end, commitment, charged, amount, currency,"
         " status, invoice_item, created_at")


class SqliteTrueUps:
    def __init__(self, db: Writer) -> None:
        self.db = db

    async def decided(self, customer_id: str, period_start: int) -> bool:
        return self.db.conn.execute("SELECT 1 FROM trueups WHERE customer_id=? AND"
                                    " period_start=?", (customer_id, period_start)
                                    ).fetchone() is not None

    async def record(self, t: TrueUpRecord) -> bool:
        if t.status not in ("none", "sent"):
            raise ValueError(f"a true-up is none or sent, not {t.status!r}")
        n: int = self.db.execute_write(lambda c: c.execute(
            f"INSERT OR IGNORE INTO trueups({_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (t.customer_id, t.period_start, t.period_end, t.commitment, t.charged, t.amount,
             t.currency, t.status, t.invoice_item, t.created_at)).rowcount)
        return n == 1

    async def recent(self, customer_id: str | None = None,
                     limit: int = 100) -> list[TrueUpRecord]:
        where, args = ("WHERE customer_id=?", (customer_id,)) if customer_id else ("", ())
        return [TrueUpRecord(*r) for r in self.db.conn.execute(
            f"SELECT {_COLS} FROM trueups {where} ORDER BY period_start DESC, customer_id"
            " LIMIT ?", (*args, limit))]
