"""Minimum-commitment true-ups on SQLite (the ``TrueUps`` owner): the only writer of
``trueups`` (schema migrations 8 and 14). The primary key (customer, period start) makes
each period's decision once; a ``sending`` row holds the parameters of an invoice item not
confirmed yet, and only ``mark_sent`` changes it."""

from __future__ import annotations

from proxy.store.access import Writer
from proxy.store.protocols import TrueUpRecord

_COLS = ("customer_id, period_start, period_end, commitment, charged, amount, currency,"
         " status, invoice_item, created_at, stripe_customer_id")
STATUSES = ("none", "sending", "sent")


def check_record(t: TrueUpRecord) -> None:
    """What both backends refuse before writing (ValueError)."""
    if t.status not in STATUSES:
        raise ValueError(f"a true-up is none, sending or sent, not {t.status!r}")
    if t.status == "sending" and not t.stripe_customer_id:
        raise ValueError("a sending true-up names the Stripe customer it is for")


class SqliteTrueUps:
    def __init__(self, db: Writer) -> None:
        self.db = db

    async def decided(self, customer_id: str, period_start: int) -> bool:
        return self.db.conn.execute("SELECT 1 FROM trueups WHERE customer_id=? AND"
                                    " period_start=?", (customer_id, period_start)
                                    ).fetchone() is not None

    async def record(self, t: TrueUpRecord) -> bool:
        check_record(t)
        n: int = self.db.execute_write(lambda c: c.execute(
            f"INSERT OR IGNORE INTO trueups({_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (t.customer_id, t.period_start, t.period_end, t.commitment, t.charged, t.amount,
             t.currency, t.status, t.invoice_item, t.created_at, t.stripe_customer_id)
        ).rowcount)
        return n == 1

    async def sending(self) -> list[TrueUpRecord]:
        return [TrueUpRecord(*r) for r in self.db.conn.execute(
            f"SELECT {_COLS} FROM trueups WHERE status='sending'"
            " ORDER BY period_start, customer_id")]

    async def mark_sent(self, customer_id: str, period_start: int, invoice_item: str) -> bool:
        n: int = self.db.execute_write(lambda c: c.execute(
            "UPDATE trueups SET status='sent', invoice_item=? WHERE customer_id=? AND"
            " period_start=? AND status='sending'",
            (invoice_item, customer_id, period_start)).rowcount)
        return n == 1

    async def recent(self, customer_id: str | None = None,
                     limit: int = 100) -> list[TrueUpRecord]:
        where, args = ("WHERE customer_id=?", (customer_id,)) if customer_id else ("", ())
        return [TrueUpRecord(*r) for r in self.db.conn.execute(
            f"SELECT {_COLS} FROM trueups {where} ORDER BY period_start DESC, customer_id"
            " LIMIT ?", (*args, limit))]
