"""The two store-side halves of shipping a member's journal (``proxy.fleet.journal_shipping``
puts them together with the fleet's ``Shipper``):

- ``SqliteJournal``: reads the rows of the member's local ``Store`` journal after a
  sequence number (read only; the SQLite ``UsageLedger`` owner writes the table).
- ``ship_debits``: the grant debits a journal row carries (``UsageRow.debits``) into
  PostgreSQL's ``credit_entries``, keyed ``(member_id, seq, index)`` with ``ON CONFLICT DO
  NOTHING`` (``proxy.store.postgres.owners_schema``), so a resend inserts nothing; an
  ``expire``/``void`` entry also lowers the account balance, as ``CreditLedger.append``
  does. One transaction.

Requirement on the journal (for the integration): ``seq`` must never be reused by one
member id. The ``Store`` journal never reuses one itself, even once every row was pruned
(``journal_seq.hwm``, SQLite migration 13); a journal that starts empty under a member id
that shipped before starts above that id's shipped seq (``LockedShipping.resume``, at
start); and a journal records the member id its rows ship under (``Store.journal_owner``,
SQLite migration 16), so rows are never shipped under an id that did not number them
(``proxy.fleet.runtime``); rows a journal numbered at seqs another process of its id shipped
(that process and this journal both numbered from one watermark) are found at start
(``shipped_as``) and renumbered above the watermark (``Store.renumber_journal``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from proxy.credits.ledger import Entry
from proxy.store.db import UsageRow, decode_row
from proxy.store.postgres.grant_debits import INSERT_ENTRIES
from proxy.store.postgres.ledger import balance_change
from proxy.store.postgres.members import Superseded
from proxy.store.postgres.pool import PgPool
from proxy.store.postgres.shipping import Batch

_AFTER = "SELECT seq, row FROM journal WHERE seq > ? ORDER BY seq LIMIT ?"
# (every seq SQLite can hold: keys_between over the whole journal)
_LOWEST, _HIGHEST = -(2 ** 63), 2 ** 63 - 1
_BETWEEN = "SELECT seq, row FROM journal WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?"


@dataclass(frozen=True, slots=True)
class JournalBatch:
    """Journal rows after a seq, as the two shipping statements' parameters."""

    usage: Batch                       # for ``Shipper.ship_batch``
    debits: Sequence[Sequence[object]]  # for ``ship_debit_columns`` (empty: none)


class SqliteJournal:
    """The rows of a ``Store``'s ``journal`` table after a sequence number."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def rows_after(self, seq: int, limit: int) -> list[tuple[int, UsageRow]]:
        return [(int(s), decode_row(blob)) for s, blob in self.conn.execute(
            _AFTER, (seq, limit))]

    def batch_after(self, seq: int, limit: int) -> JournalBatch:
        """``rows_after`` straight into shipping parameters: each journal blob is decoded once
        into one tuple per usage item and per debit, with no row objects in between (the
        same values ``Batch.of`` and ``ship_debits`` derive from ``rows_after``)."""
        items: list[tuple[object, ...]] = []
        debits: list[tuple[object, ...]] = []
        n = top = 0
        for s, blob in self.conn.execute(_AFTER, (seq, limit)):
            rid, at, cid, kid, rule, ver, status, method, path, its, dbs = orjson.loads(blob)
            at_ms = int(at * 1000)
            items += [(cid, s, i, rid, at_ms, kid, rule, ver, status, method, path,
                       meter, q, cr, b, f) for i, (meter, q, cr, b, f) in enumerate(its)]
            if dbs:
                debits += [(cid, g, k, a, rid, meter, at_ms, s, i)
                           for i, (meter, g, k, a) in enumerate(dbs)]
            n += 1
            top = s
        return JournalBatch(Batch.of_items(items, n, top),
                            list(zip(*debits, strict=True)))

    def oldest_keys(self, limit: int) -> list[tuple[str, int, str]]:
        """The oldest ``limit`` journal rows as the shared ledger finds what they shipped:
        (request id, seq, customer)."""
        return [(rid, seq, cid) for rid, seq, cid, _at, _has
                in self.keys_between(_LOWEST, _HIGHEST, limit)]

    def keys_between(self, after: int, upto: int,
                     limit: int) -> list[tuple[str, int, str, int, bool]]:
        """The first ``limit`` journal rows with a seq in (``after``, ``upto``], as the shared
        ledger finds what they shipped (``shipped_as``): (request id, seq, customer, at in ms
        as shipped, whether the row carries a usage item)."""
        out: list[tuple[str, int, str, int, bool]] = []
        for s, blob in self.conn.execute(_BETWEEN, (after, upto, limit)):
            row = orjson.loads(blob)
            out.append((str(row[0]), int(s), str(row[2]), int(row[1] * 1000), bool(row[9])))
        return out


_SHIPPED_UNDER = """
SELECT DISTINCT u.member_id FROM usage_ledger u
JOIN unnest($1::text[], $2::bigint[], $3::text[]) AS j(r, s, c)
  ON u.request_id = j.r AND u.seq = j.s AND u.customer_id = j.c
ORDER BY 1
"""


async def shipped_under(pool: PgPool, keys: Sequence[tuple[str, int, str]]) -> list[str]:
    """The member ids under which any of ``keys`` (``SqliteJournal.oldest_keys``) already
    shipped, sorted: one statement (by the request-id index; ``len(keys)`` probes)."""
    if not keys:
        return []
    cols = [list(c) for c in zip(*keys, strict=True)]

    async def once() -> list[str]:
        async with pool.acquire() as c:
            return [str(r[0]) for r in await c.fetch(_SHIPPED_UNDER, *cols)]
    return await pool.retrying(once)


_SHIPPED_AS = """
SELECT j.s,
       EXISTS (SELECT 1 FROM usage_ledger u WHERE u.request_id = j.r AND u.member_id = $1
               AND u.seq = j.s AND u.customer_id = j.c AND u.at_ms = j.t),
       EXISTS (SELECT 1 FROM credit_entries e WHERE e.member_id = $1 AND e.member_seq = j.s
               AND e.request_id = j.r AND e.customer_id = j.c AND e.at_ms = j.t),
       (SELECT before_ms FROM audit_pruned WHERE id = 0)
FROM unnest($2::text[], $3::bigint[], $4::text[], $5::bigint[]) AS j(r, s, c, t)
"""


@dataclass(frozen=True, slots=True)
class Lookup:
    """What the shared ledger holds of some journal rows (``shipped_as``)."""

    shipped: set[int]     # seqs whose row it holds under the member id at that seq
    debited: set[int]     # seqs whose grant debits it holds (the same way)
    pruned_before: int    # ms: rows older than this may have been pruned by the retention


async def shipped_as(pool: PgPool, member_id: str,
                     keys: Sequence[tuple[str, int, str, int]]) -> Lookup:
    """Which of ``keys`` ((request id, seq, customer, at in ms)) the shared ledger holds
    under ``member_id`` at that seq (shipped by this journal: the same request, customer
    and time, so a client's reused request id is not taken for the row), which have their
    debits in ``credit_entries``, and below what time the audit retention may have deleted
    rows (``audit_pruned``, PostgreSQL migration 14): one statement, one snapshot (by the
    request-id and the shipped-debit indexes)."""
    if not keys:
        return Lookup(set(), set(), 0)
    cols = [list(c) for c in zip(*keys, strict=True)]

    async def once() -> Lookup:
        async with pool.acquire() as c:
            rows = await c.fetch(_SHIPPED_AS, member_id, *cols)
        return Lookup({int(r[0]) for r in rows if r[1]}, {int(r[0]) for r in rows if r[2]},
                      int(rows[0][3]))
    return await pool.retrying(once)


_DEBITS = INSERT_ENTRIES + "RETURNING customer_id, grant_id, kind, amount\n"
# the process still holds its member id (locked: a claim waits for this transaction)
_HOLDS = "SELECT 1 FROM members WHERE id = $1 AND instance = $2 FOR SHARE"


async def ship_debits(pool: PgPool, member_id: str,
                      rows: Sequence[tuple[int, UsageRow]]) -> int:
    """Insert the debits of ``(seq, row)`` pairs not shipped before; returns how many."""
    debits = [(r.customer_id, e.grant_id, e.kind, e.amount, r.request_id, meter,
               int(r.at * 1000), seq, i)
              for seq, r in rows for i, (meter, e) in enumerate(r.debits)]
    return await ship_debit_columns(pool, member_id, list(zip(*debits, strict=True)))


async def ship_debit_columns(pool: PgPool, member_id: str,
                             cols: Sequence[Sequence[object]],
                             instance: str | None = None) -> int:
    """``ship_debits`` for debits already in ``_DEBITS``'s column arrays (none: no
    statement). With ``instance`` (the running process's claim on ``member_id``): only while
    it holds the id, else ``Superseded`` and nothing written."""
    if not cols or not cols[0]:
        return 0
    return await pool.retrying(lambda: _ship_debit_columns(pool, member_id, cols, instance))


async def _ship_debit_columns(pool: PgPool, member_id: str,
                              cols: Sequence[Sequence[object]], instance: str | None) -> int:
    async with pool.acquire() as c, c.transaction():
        if instance is not None and await c.fetchval(_HOLDS, member_id, instance) is None:
            raise Superseded(f"member id {member_id} is held by another process: shipping "
                             "refused (two processes under one member id)")
        back = await c.fetch(_DEBITS, member_id, *cols)
        change: dict[str, int] = {}
        for b in back:
            d = balance_change([Entry(b["grant_id"] or "", b["kind"], b["amount"])])
            change[b["customer_id"]] = change.get(b["customer_id"], 0) + d
        for cid in sorted(cid for cid, d in change.items() if d):
            await c.execute("UPDATE credit_accounts SET balance = balance + $2"
                            " WHERE customer_id = $1", cid, change[cid])
    return len(back)
