"""Stripe credit grant mirrors on SQLite (the ``GrantMirrors`` owner): the only writer of
``grant_mirrors`` (schema migration 10). One row per local grant of a monetary customer, the
durable intent the mirror worker (``proxy.credits.mirror``) retries until Stripe holds it.
Also ``invoice_finalized`` (migration 12): per customer, the latest usage-period end of an
invoice Stripe finalized, which lets the worker void grants kept live for that invoice."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from proxy.store.access import Writer
from proxy.store.protocols import GrantMirrorRecord

_COLS = ("grant_id, customer_id, want, done, stripe_grant_id, status, attempts,"
         " next_attempt_at, last_error, created_at, updated_at")
WANTS = ("live", "void")


def check_want(want: str) -> str:
    if want not in WANTS:
        raise ValueError(f"a mirror wants live or void, not {want!r}")
    return want


class SqliteGrantMirrors:
    def __init__(self, db: Writer) -> None:
        self.db = db

    async def want(self, rows: Sequence[tuple[str, str, str]], at: int) -> int:
        def tx(c: sqlite3.Connection) -> int:
            n = 0
            for gid, cid, want in rows:
                check_want(want)
                n += c.execute(
                    "INSERT INTO grant_mirrors(grant_id, customer_id, want, created_at,"
                    " updated_at) VALUES (?,?,?,?,?) ON CONFLICT(grant_id) DO UPDATE SET"
                    " want=excluded.want, status=CASE WHEN done=excluded.want THEN 'mirrored'"
                    " ELSE 'pending' END, next_attempt_at=0, attempts=0,"
                    " updated_at=excluded.updated_at"
                    " WHERE grant_mirrors.want <> excluded.want AND grant_mirrors.want <> 'void'",
                    (gid, cid, want, at, at)).rowcount
            return n

        out: int = self.db.execute_write(tx)
        return out

    async def due(self, now: float, limit: int = 100) -> list[GrantMirrorRecord]:
        return [GrantMirrorRecord(*r) for r in self.db.conn.execute(
            f"SELECT {_COLS} FROM grant_mirrors WHERE status='pending' AND next_attempt_at<=?"
            " ORDER BY created_at, grant_id LIMIT ?", (now, limit))]

    async def progress(self, grant_id: str, done: str, stripe_grant_id: str | None,
                       at: int) -> None:
        check_want(done)
        self.db.execute_write(lambda c: c.execute(
            "UPDATE grant_mirrors SET done=?, stripe_grant_id=COALESCE(?, stripe_grant_id),"
            " status=CASE WHEN want=? THEN 'mirrored' ELSE 'pending' END, next_attempt_at=0,"
            " attempts=0, last_error=NULL, updated_at=? WHERE grant_id=?",
            (done, stripe_grant_id, done, at, grant_id)))

    async def fail(self, grant_id: str, error: str, retry_at: float | None, at: int) -> None:
        self.db.execute_write(lambda c: c.execute(
            "UPDATE grant_mirrors SET attempts=attempts+1, last_error=?,"
            " next_attempt_at=COALESCE(?, next_attempt_at),"
            " status=CASE WHEN ? THEN 'dead' ELSE status END, updated_at=?"
            " WHERE grant_id=? AND status='pending'",
            (error[:500], retry_at, retry_at is None, at, grant_id)))

    async def rows(self, *, status: str | None = None, customer_id: str | None = None,
                   limit: int = 500) -> list[GrantMirrorRecord]:
        return [GrantMirrorRecord(*r) for r in self.db.conn.execute(
            f"SELECT {_COLS} FROM grant_mirrors WHERE (? IS NULL OR status=?) AND"
            " (? IS NULL OR customer_id=?) ORDER BY updated_at DESC, grant_id LIMIT ?",
            (status, status, customer_id, customer_id, int(limit)))]

    async def known(self) -> dict[str, str]:
        return {str(g): str(w) for g, w in self.db.conn.execute(
            "SELECT grant_id, want FROM grant_mirrors")}

    async def requeue(self, grant_ids: Sequence[str] | None, at: int) -> int:
        def tx(c: sqlite3.Connection) -> int:
            sql = ("UPDATE grant_mirrors SET status='pending', next_attempt_at=0, attempts=0,"
                   " updated_at=? WHERE status='dead'")
            if grant_ids is None:
                return int(c.execute(sql, (at,)).rowcount)
            return sum(int(c.execute(sql + " AND grant_id=?", (at, g)).rowcount)
                       for g in grant_ids)

        n: int = await self.db.write(tx)
        return n

    async def finalize(self, customer_id: str, period_end: int, at: int) -> bool:
        n: int = await self.db.write(lambda c: c.execute(
            "INSERT INTO invoice_finalized(customer_id, period_end, updated_at) VALUES (?,?,?)"
            " ON CONFLICT(customer_id) DO UPDATE SET period_end=excluded.period_end,"
            " updated_at=excluded.updated_at"
            " WHERE excluded.period_end > invoice_finalized.period_end",
            (customer_id, int(period_end), int(at))).rowcount)
        return n == 1

    async def finalized(self) -> dict[str, int]:
        return {str(c): int(e) for c, e in self.db.conn.execute(
            "SELECT customer_id, period_end FROM invoice_finalized")}
