"""The ``Outbox`` owner on PostgreSQL: ``outbox``, ``carry`` and ``dead_letters``.

The same floor-and-carry (or transform) staging as SQLite (``proxy.store.outbox``), over
the minutes the shipped usage ledger maintains. Each verb is one transaction.

Staging across the fleet: a transaction-scoped advisory lock serializes stagers (two
members staging at once: the second waits, then finds the first's work done), so only one
transaction at a time changes ``reported``/``reported_covered`` and ``carry``; shipping
only ever adds to ``billable``/``covered`` (the trigger on ``usage_ledger``). The minutes to
stage are read ``FOR UPDATE`` in primary-key order, the order the trigger's upsert locks
them in (an ``UPDATE .. FROM unnest`` alone locks in join order and deadlocks with a
shipping batch), and ``reported`` moves by exactly the deltas read: a batch that commits
after the read waits for the staging and stays unstaged for the next one. No unit is staged
twice or lost. Identifiers
are ``mp_<install id>_<outbox id>_<salt>`` with the id from the table's sequence and a
random salt per staging transaction (``proxy.store.outbox``: a restored database repeats
ids).

``dead_letters`` mirrors the outbox's ``dead`` rows (reason, time, replayed when).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any

from proxy.periods import period_bounds
from proxy.pricing import TransformQuantity
from proxy.store.outbox import UNCONFIRMED, WINDOW, StagedEvent, events_from_buckets
from proxy.store.postgres.conn import Conn
from proxy.store.postgres.pool import PgPool, retried
from proxy.store.protocols import DueEvent, HourTotal, OutboxCounts, OutboxEntry

_STAGE_LOCK = "SELECT pg_advisory_xact_lock(hashtext('meterproxy_outbox_stage'))"
_ENTRY_COLS = ("id, identifier, customer_id, meter, event_name, covered, value, timestamp,"
               " created_at, status, attempts, sent_at, sink, outcome, last_error, dead_at")
_HOUR = 3600

# (customer, meter, period start, window start) -> [period end, last minute, billable, covered]
Buckets = dict[tuple[str, str, int, int], list[int]]


def bucket_minutes(rows: Sequence[tuple[str, str, int, int, int]],
                   anchors: Mapping[str, int | None]) -> Buckets:
    """Pure: unstaged (customer, meter, minute, billable, covered) deltas into hour windows
    cut at each customer's billing-period boundary (the part of an hour before a mid-hour
    anchor is its own window, in the old period), as ``proxy.store.outbox.stage`` does."""
    out: Buckets = {}
    bounds: dict[tuple[str, int], tuple[int, int]] = {}
    for customer, meter, minute, billable, covered in rows:
        key = (customer, minute)
        pb = bounds.get(key)
        if pb is None:
            pb = bounds[key] = period_bounds(anchors.get(customer), minute)
        window = minute // WINDOW * WINDOW
        lo = max(window, pb[0])
        b = out.get((customer, meter, pb[0], lo))
        if b is None:
            out[customer, meter, pb[0], lo] = [pb[1], minute, billable, covered]
        else:
            b[1] = max(b[1], minute)
            b[2] += billable
            b[3] += covered
    return out


async def _stage(c: Conn, event_names: Mapping[str, tuple[str, str | None]], now: float,
                 transforms: Mapping[str, TransformQuantity]) -> list[StagedEvent]:
    await c.execute(_STAGE_LOCK)
    locked = await c.fetch(
        "SELECT customer_id, key_id, meter, minute, rules_version,"
        " billable - reported AS b, covered - reported_covered AS cv FROM usage_minute"
        " WHERE billable > reported OR covered > reported_covered"
        " ORDER BY customer_id, key_id, meter, minute, rules_version FOR UPDATE")
    if not locked:
        return []
    customers = sorted({r["customer_id"] for r in locked})
    anchors: dict[str, int | None] = {r["id"]: r["billing_anchor"] for r in await c.fetch(
        "SELECT id, billing_anchor FROM customers WHERE id = ANY($1::text[])", customers)}
    buckets = bucket_minutes([(r["customer_id"], r["meter"], r["minute"], r["b"], r["cv"])
                              for r in locked], anchors)
    before: dict[tuple[str, str, int], list[int]] = {}
    for customer, meter, pstart, _w in buckets:
        if meter in transforms and (customer, meter, pstart) not in before:
            pend = buckets[customer, meter, pstart, _w][0]
            rep = await c.fetchrow(
                "SELECT COALESCE(SUM(reported), 0)::bigint AS r,"
                " COALESCE(SUM(reported_covered), 0)::bigint AS rc FROM usage_minute"
                " WHERE customer_id=$1 AND meter=$2 AND minute>=$3 AND minute<$4",
                customer, meter, pstart, pend)
            before[customer, meter, pstart] = [int(rep["r"]), int(rep["rc"])] if rep else [0, 0]
    await c.execute(
        "UPDATE usage_minute u SET reported = u.reported + x.b,"
        " reported_covered = u.reported_covered + x.cv"
        " FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[],"
        " $6::bigint[], $7::bigint[]) AS x(c, k, m, mi, v, b, cv)"
        " WHERE u.customer_id = x.c AND u.key_id = x.k AND u.meter = x.m"
        " AND u.minute = x.mi AND u.rules_version = x.v",
        *[[r[i] for r in locked] for i in range(7)])
    carry: dict[tuple[str, str, str], int] = {
        (r[0], r[1], r[2]): int(r[3]) for r in await c.fetch(
            "SELECT customer_id, meter, event_name, remainder FROM carry"
            " WHERE customer_id = ANY($1::text[]) FOR UPDATE", customers)}
    out = events_from_buckets(buckets, before, carry, event_names, transforms, now)
    if carry:
        keys = sorted(carry)
        await c.execute(
            "INSERT INTO carry(customer_id, meter, event_name, remainder)"
            " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])"
            " ON CONFLICT (customer_id, meter, event_name)"
            " DO UPDATE SET remainder = EXCLUDED.remainder",
            [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys],
            [carry[k] for k in keys])
    if out:
        prefix = "mp_" + str(await c.fetchval("SELECT v FROM meta WHERE k='install_id'")) + "_"
        salt = "_" + secrets.token_hex(4)
        ids = sorted(int(r[0]) for r in await c.fetch(
            "SELECT nextval('outbox_id_seq') FROM generate_series(1, $1::int)", len(out)))
        await c.execute(
            "INSERT INTO outbox(id, identifier, customer_id, meter, event_name, covered, value,"
            " window_start, timestamp, created_at)"
            " SELECT *, $10::bigint FROM unnest($1::bigint[], $2::text[], $3::text[],"
            " $4::text[], $5::text[], $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[])",
            ids, [f"{prefix}{i}{salt}" for i in ids], [e.customer_id for e in out],
            [e.meter for e in out], [e.event_name for e in out], [int(e.covered) for e in out],
            [e.value for e in out], [e.window_start for e in out], [e.timestamp for e in out],
            int(now))
    return out


def _entry(r: Any) -> OutboxEntry:
    return OutboxEntry(r[0], r[1], r[2], r[3], r[4], bool(r[5]), *r[6:])


def _count(status: str) -> int:
    """Rows an asyncpg command tag (``UPDATE 3``) reports."""
    return int(status.split()[-1])


class PostgresOutbox:
    def __init__(self, pool: PgPool) -> None:
        self.pool = pool

    @retried
    async def stage(self, event_names: Mapping[str, tuple[str, str | None]],
                    transforms: Mapping[str, TransformQuantity] | None = None,
                    now: float | None = None) -> list[StagedEvent]:
        now = time.time() if now is None else now
        async with self.pool.acquire() as c, c.transaction():
            return await _stage(c, event_names, now, transforms or {})

    async def due(self, now: float, limit: int = 5000) -> list[DueEvent]:
        async with self.pool.acquire() as c:
            rows = await c.fetch(
                "SELECT o.id, o.identifier, o.customer_id, o.meter, o.event_name, o.value,"
                " o.timestamp, o.attempts, cu.stripe_customer_id,"
                # a call an earlier version made recorded no time: dated from its creation
                " COALESCE(o.first_attempt_at,"
                " CASE WHEN o.attempts > 0 THEN o.created_at::float8 END) FROM outbox o"
                " LEFT JOIN customers cu ON cu.id = o.customer_id"
                " WHERE o.status='pending' AND o.next_attempt_at <= $1 ORDER BY o.id LIMIT $2",
                now, limit)
        return [DueEvent(*r) for r in rows]

    @retried
    async def begin_attempt(self, ids: Sequence[int], at: float | None = None) -> None:
        async with self.pool.acquire() as c:
            await c.execute("UPDATE outbox SET attempts = attempts + 1, first_attempt_at ="
                            " COALESCE(first_attempt_at,"
                            " CASE WHEN attempts > 0 THEN created_at::float8 ELSE $2::float8 END)"
                            " WHERE id = ANY($1::bigint[])", list(ids),
                            time.time() if at is None else at)

    @retried
    async def mark_sent(self, outbox_id: int, *, sink: str, outcome: str, at: int) -> None:
        async with self.pool.acquire() as c:
            await c.execute("UPDATE outbox SET status='sent', sent_at=$2, sink=$3, outcome=$4,"
                            " last_error=NULL WHERE id=$1", outbox_id, at, sink, outcome)

    @retried
    async def mark_dry_run(self, outbox_id: int, *, sink: str, outcome: str) -> None:
        async with self.pool.acquire() as c:
            await c.execute("UPDATE outbox SET status='dry_run', sink=$2,"
                            " outcome=$3, last_error=NULL WHERE id=$1", outbox_id, sink, outcome)

    @retried
    async def retry_at(self, outbox_id: int, when: float, error: str,
                       not_called: float | None = None) -> None:
        async with self.pool.acquire() as c:
            await c.execute("UPDATE outbox SET next_attempt_at=$2, last_error=$3,"
                            " attempts = CASE WHEN first_attempt_at = $4::float8"
                            " THEN attempts - 1 ELSE attempts END,"
                            " first_attempt_at = CASE WHEN first_attempt_at = $4::float8"
                            " THEN NULL ELSE first_attempt_at END WHERE id=$1",
                            outbox_id, when, error[:500], not_called)

    @retried
    async def mark_dead(self, outbox_id: int, *, reason: str, sink: str, at: int) -> None:
        async with self.pool.acquire() as c, c.transaction():
            done = await c.execute("UPDATE outbox SET status='dead', dead_at=$2, last_error=$3,"
                                   " sink=$4 WHERE id=$1", outbox_id, at, reason[:500], sink)
            if _count(done):
                await c.execute(
                    "INSERT INTO dead_letters(outbox_id, reason, dead_at) VALUES ($1, $2, $3)"
                    " ON CONFLICT (outbox_id) DO UPDATE SET reason = EXCLUDED.reason,"
                    " dead_at = EXCLUDED.dead_at, replayed_at = NULL",
                    outbox_id, reason[:500], at)

    @retried
    async def requeue_dry_run(self) -> int:
        async with self.pool.acquire() as c:
            return _count(await c.execute(
                "UPDATE outbox SET status='pending', next_attempt_at=0, sink=NULL, outcome=NULL"
                " WHERE status='dry_run'"))

    @retried
    async def replay(self, outbox_id: int, restamp_at: int | None = None,
                     now: float | None = None) -> bool:
        async with self.pool.acquire() as c, c.transaction():
            done = await c.execute(
                "UPDATE outbox SET status='pending', next_attempt_at=0, dead_at=NULL,"
                " timestamp = COALESCE($2::bigint, timestamp), first_attempt_at ="
                " CASE WHEN last_error LIKE $3 THEN $4::float8 ELSE first_attempt_at END"
                " WHERE id=$1 AND status='dead'",
                outbox_id, None if restamp_at is None else int(restamp_at), UNCONFIRMED + "%",
                time.time() if now is None else now)
            if not _count(done):
                return False
            await c.execute("UPDATE dead_letters SET replayed_at = extract(epoch FROM now())"
                            "::bigint WHERE outbox_id = $1", outbox_id)
            return True

    @retried
    async def make_due(self, ids: Sequence[int]) -> int:
        async with self.pool.acquire() as c:
            return _count(await c.execute(
                "UPDATE outbox SET next_attempt_at=0 WHERE id = ANY($1::bigint[])"
                " AND status='pending'", list(ids)))

    async def rows(self, *, status: str | None = None, outbox_id: int | None = None,
                   customer_id: str | None = None, limit: int = 500) -> list[OutboxEntry]:
        async with self.pool.acquire() as c:
            rows = await c.fetch(
                f"SELECT {_ENTRY_COLS} FROM outbox WHERE ($1::text IS NULL OR status=$1)"
                " AND ($2::bigint IS NULL OR id=$2) AND ($3::text IS NULL OR customer_id=$3)"
                " ORDER BY id DESC LIMIT $4", status, outbox_id, customer_id, int(limit))
        return [_entry(r) for r in rows]

    async def counts(self) -> OutboxCounts:
        async with self.pool.acquire() as c:
            got = {r[0]: int(r[1]) for r in await c.fetch(
                "SELECT status, COUNT(*) FROM outbox WHERE status IN ('pending', 'dead',"
                " 'dry_run') GROUP BY status")}
        return OutboxCounts(got.get("pending", 0), got.get("dead", 0), got.get("dry_run", 0))

    async def oldest_pending_created(self) -> int | None:
        async with self.pool.acquire() as c:
            a = await c.fetchval("SELECT MIN(created_at) FROM outbox WHERE status='pending'")
        return None if a is None else int(a)

    async def hour_totals(self, start: int, end: int) -> list[HourTotal]:
        async with self.pool.acquire() as c:
            rows = await c.fetch(
                "SELECT customer_id, event_name, timestamp / $1 * $1 AS h, SUM(value),"
                " SUM(CASE WHEN status='sent' THEN value ELSE 0 END),"
                " SUM(CASE WHEN status='pending' THEN value ELSE 0 END),"
                " SUM(CASE WHEN status='dead' THEN value ELSE 0 END),"
                " COALESCE(MAX(CASE WHEN status='sent' THEN sent_at END), 0), COUNT(*)"
                " FROM outbox WHERE timestamp >= $2 AND timestamp < $3"
                " GROUP BY customer_id, event_name, h", _HOUR, start, end)
        return [HourTotal(str(r[0]), str(r[1]), *(int(v) for v in r[2:])) for r in rows]

    async def rows_in_hour(self, customer_id: str, event_name: str,
                           hour: int) -> list[tuple[int, str, str]]:
        async with self.pool.acquire() as c:
            rows = await c.fetch(
                "SELECT id, identifier, status FROM outbox WHERE customer_id=$1 AND"
                " event_name=$2 AND timestamp >= $3 AND timestamp < $4 ORDER BY id",
                customer_id, event_name, hour, hour + _HOUR)
        return [(int(r[0]), str(r[1]), str(r[2])) for r in rows]

    async def remainders(self, customer_id: str) -> dict[str, int]:
        async with self.pool.acquire() as c:
            rows = await c.fetch("SELECT meter, event_name, remainder FROM carry"
                                 " WHERE customer_id=$1", customer_id)
        return {f"{r[0]}:{r[1]}": int(r[2]) for r in rows}
