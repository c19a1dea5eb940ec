"""Shipping a member's journal to the shared usage ledger, in idempotent batches.

Each journal row carries the member's own sequence number; in the ledger a row is keyed
``(customer_id, member_id, seq, item)``. A batch (``Batch``: one tuple per usage item) is
shipped atomically:

1. one statement (``_SHIP``): ``INSERT ... SELECT FROM jsonb_array_elements(...) ON CONFLICT
   DO NOTHING RETURNING`` (the batch is one JSON parameter: no temporary staging table, so
   a transaction pooler is fine), and, in the same statement, ``members.last_shipped_seq``
   moved to the batch's highest seq; it returns the inserted rows that carry credits and
   the count of rows inserted;
2. when any row carries credits: settle the member's leases and the customers' accounts
   from the rows that came back only (proxy.store.postgres.leases.settle), so a row shipped
   twice settles once; then the same rows' credits become grant-level entries (which grant
   each spend came from, or debt: proxy.store.postgres.grant_debits); steps 1 and 2 are one
   transaction. A batch without credits has nothing to settle: step 1 alone is atomic (one
   round trip, no BEGIN/COMMIT);
3. only after the commit does the local watermark advance.

With the running process's instance token (``Shipper.instance``) step 1 inserts and marks
only while that process holds the member id (``proxy.store.postgres.members``); refused,
nothing is written and ``ship_batch`` raises ``Superseded``.

A crash anywhere before 3 leaves the watermark behind: the batch is sent again and step 1
inserts nothing. A crash after the commit but before the local watermark moved does the
same. So totals in the ledger are exact whatever fails when. PostgreSQL unreachable: the
batch stays in the journal and the next pass retries it (``ship_pending`` returns).

``LocalRow`` is a row as tests and benchmarks build it; ``Batch.of`` turns rows into
items. The running member builds its batches straight from the journal's blobs
(``proxy.store.postgres.journal.SqliteJournal.batch_after``), without a row object.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from proxy.store.postgres.errors import PgConflict, PgUnavailable
from proxy.store.postgres.grant_debits import ShippedItem, debit_grants
from proxy.store.postgres.leases import settle
from proxy.store.postgres.members import Superseded
from proxy.store.postgres.pool import PgPool, retried
from proxy.tasks import wait_event

log = logging.getLogger("meterproxy.fleet.shipping")


@dataclass(frozen=True, slots=True)
class ShipItem:
    meter: str
    quantity: int         # micro-units
    credits: int = 0      # micro-credits debited (settles the lease)
    billable: int = 0     # micro-units for Stripe
    flags: str = ""


@dataclass(frozen=True, slots=True)
class LocalRow:
    seq: int              # the member's journal sequence (strictly increasing)
    request_id: str
    at_ms: int
    customer_id: str
    key_id: str
    rule: str
    rules_version: str
    status: int
    items: tuple[ShipItem, ...]
    method: str = ""
    path: str = ""


class Journal(Protocol):
    """Where rows to ship come from (the member's local journal)."""

    def rows_after(self, seq: int, limit: int) -> Sequence[LocalRow]: ...


@dataclass(frozen=True, slots=True)
class Shipped:
    rows: int             # journal rows in the batch
    inserted: int         # ledger items that were new (the rest were resends)
    watermark: int


_SHIP = """
WITH own AS (SELECT instance FROM members WHERE id = $1 FOR UPDATE),
ok AS (SELECT $4::text IS NULL OR EXISTS (SELECT 1 FROM own WHERE instance = $4) AS ok),
x AS (
    SELECT e->>0 AS c, (e->>1)::bigint AS s, (e->>2)::smallint AS i, e->>3 AS r,
           (e->>4)::bigint AS a, e->>5 AS k, e->>6 AS ru, e->>7 AS v, (e->>8)::int AS st,
           e->>9 AS m, e->>10 AS p, e->>11 AS me, (e->>12)::bigint AS q,
           (e->>13)::bigint AS cr, (e->>14)::bigint AS b, e->>15 AS f
    FROM jsonb_array_elements($2::jsonb) AS e WHERE (SELECT ok FROM ok)),
ins AS (
    INSERT INTO usage_ledger (customer_id, member_id, seq, item, request_id, at_ms, key_id,
        rule, rules_version, status, method, path, meter, quantity, credits, billable, flags)
    SELECT c, $1, s, i, r, a, k, ru, v, st, m, p, me, q, cr, b, f FROM x
    ON CONFLICT DO NOTHING
    RETURNING customer_id, credits, seq, item, at_ms, request_id, meter),
mark AS (
    INSERT INTO members(id, last_shipped_seq) SELECT $1, $3 WHERE (SELECT ok FROM ok)
    ON CONFLICT (id) DO UPDATE
    SET last_shipped_seq = GREATEST(members.last_shipped_seq, $3), last_seen = now())
SELECT customer_id, credits, seq, item, at_ms, request_id, meter FROM ins WHERE credits <> 0
UNION ALL
SELECT NULL, count(*), (SELECT ok FROM ok)::int, NULL, NULL, NULL, NULL FROM ins
"""
# ``own``/``ok``: with an instance token ($4, the running member's: ``Shipper.instance``)
# the batch is inserted and the mark moved only while that process holds the member id
# (``proxy.store.postgres.members.claim``); the row is locked FOR UPDATE (the newest version,
# under READ COMMITTED), so a claim by another process waits for this statement's commit or
# is seen by it. Refused: nothing inserted, the count row's third column 0 (``Superseded``).
# The batch travels as ONE json parameter (an array of 16-element arrays, in the column
# order of the INSERT), not as 16 array parameters: asyncpg encodes an array parameter
# element by element in Python-visible calls (~4,000 CPU instructions per element, so
# ~60,000 per journal row), while orjson writes the whole batch in one C call.
# PostgreSQL's JSON parser unescapes exactly what orjson escaped; integers travel as JSON
# integers (exact, 64-bit), and the timestamp is already integer milliseconds. ``jsonb``, not
# ``json``: it is parsed once, where each ``->>`` on ``json`` parses the element again
# (measured: ~1.5x the server CPU per batch with ``json``; with ``jsonb`` about what the 16
# arrays cost the server).


@dataclass(slots=True)
class Batch:
    """Journal rows as ``_SHIP``'s items: one 16-tuple per usage item, in the INSERT's
    column order (customer, seq, item index, request id, at_ms, key, rule, rules version,
    status, method, path, meter, quantity, credits, billable, flags)."""

    items: Sequence[tuple[object, ...]]
    rows: int = 0               # journal rows
    top: int = 0                # their highest seq
    credits: bool = False       # some item carries credits (settlement needed)

    @classmethod
    def of_items(cls, items: Sequence[tuple[object, ...]], rows: int, top: int) -> Batch:
        return cls(items, rows, top, any(it[13] for it in items))

    @classmethod
    def of(cls, member_rows: Sequence[LocalRow]) -> Batch:
        items = [(r.customer_id, r.seq, i, r.request_id, r.at_ms, r.key_id, r.rule,
                  r.rules_version, r.status, r.method, r.path, it.meter, it.quantity,
                  it.credits, it.billable, it.flags)
                 for r in member_rows for i, it in enumerate(r.items)]
        return cls.of_items(items, len(member_rows),
                            max((r.seq for r in member_rows), default=0))

    def payload(self) -> str:
        """``_SHIP``'s $2: the items as one JSON array."""
        return orjson.dumps(self.items).decode()


def _returned(back: Sequence[Any]) -> tuple[int, dict[str, int], list[ShippedItem], bool]:
    """``_SHIP``'s rows: (rows inserted, credits per customer, the credit-carrying items,
    whether the member id's holder let it ship). The row whose customer is NULL carries the
    count and that flag."""
    inserted = 0
    ok = False
    spent: dict[str, int] = {}
    items: list[ShippedItem] = []
    for b in back:
        if b[0] is None:
            inserted = int(b[1])
            ok = bool(b[2])
            continue
        spent[b[0]] = spent.get(b[0], 0) + int(b[1])
        items.append(ShippedItem(b[0], int(b[2]), int(b[3]), int(b[4]), b[5], b[6], int(b[1])))
    return inserted, spent, items, ok


class Shipper:
    """One per member: moves journal rows after ``watermark`` into the shared ledger."""

    def __init__(self, pool: PgPool, member_id: str, batch_size: int = 1000,
                 instance: str | None = None) -> None:
        self.pool = pool
        self.member_id = member_id
        self.batch_size = batch_size
        self.instance = instance      # the running process's claim on member_id (None: none)
        self.watermark = 0

    async def load_watermark(self) -> int:
        """The database's view of this member's last shipped seq (0 for a new member)."""
        async with self.pool.acquire() as conn:
            v = await conn.fetchval("SELECT last_shipped_seq FROM members WHERE id = $1",
                                    self.member_id)
        self.watermark = max(self.watermark, int(v or 0))
        return self.watermark

    async def ship(self, rows: Sequence[LocalRow]) -> Shipped:
        """Ship one batch of rows atomically; the watermark moves after the commit."""
        return await self.ship_batch(Batch.of(rows))

    @retried
    async def ship_batch(self, batch: Batch) -> Shipped:
        """Ship one batch atomically (see the module doc); the watermark moves after."""
        if not batch.rows:
            return Shipped(0, 0, self.watermark)
        args = (self.member_id, batch.payload(), batch.top, self.instance)
        async with self.pool.acquire() as conn:
            if batch.credits:
                async with conn.transaction():
                    back = await conn.fetch(_SHIP, *args)
                    inserted, spent, items, ok = _returned(back)
                    if ok:
                        await settle(conn, self.member_id, spent)
                        await debit_grants(conn, self.member_id, items)
            else:       # nothing to settle: the one statement is the whole batch
                inserted, _s, _i, ok = _returned(await conn.fetch(_SHIP, *args))
        if not ok:
            raise Superseded(f"member id {self.member_id} is held by another process: "
                             "shipping refused (two processes under one member id)")
        self.watermark = max(self.watermark, batch.top)
        return Shipped(batch.rows, inserted, self.watermark)

    async def ship_pending(self, journal: Journal) -> int:
        """Ship everything after the watermark, batch by batch; returns rows shipped.
        Stops quietly at the first ``PgUnavailable`` (the rows stay in the journal)."""
        total = 0
        while True:
            rows = journal.rows_after(self.watermark, self.batch_size)
            if not rows:
                return total
            try:
                done = await self.ship(rows)
            except (PgUnavailable, PgConflict) as exc:
                log.warning("shipping paused, PostgreSQL unreachable or conflicting: %s", exc)
                return total
            total += done.rows

    async def run(self, journal: Journal, interval: float, stop: asyncio.Event) -> None:
        """Ship every ``interval`` seconds until ``stop`` is set, then once more (drain)."""
        while not stop.is_set():
            await self.ship_pending(journal)
            await wait_event(stop, interval)
        await self.ship_pending(journal)
