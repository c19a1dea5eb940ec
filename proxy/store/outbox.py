"""The outbox: usage -> meter events with deterministic identifiers, persisted before sending.

Staging (one transaction on the Store's connection, so it cannot interleave with a group
commit) takes, per customer, meter and hour window (cut at the customer's billing-period
boundary, so usage before a mid-hour anchor is stamped inside the old period), the usage not yet staged
(``billable - reported``; for a meter with ``covered_event_name`` also
``covered - reported_covered``), adds the customer's carried remainder, and mints one
event of ``floor(total)`` whole units; the fraction stays in ``carry``. So after any number
of flushes: sum(events) == floor(sum(usage)) and sum(events) + remainder == sum(usage),
exactly, in integers. A meter with a ``transform`` instead reports
``T(period total after) - T(period total before)`` (no carry): the events of one billing
period sum to ``T(period total)`` (docs/billing-semantics.md).

Identifiers are ``mp_<install id>_<outbox id>_<salt>``: unique per database (the install id
is random per database, so two sidecars on one Stripe account never collide) and stable
across every resend of the same row (it is stored with the row). The salt, 8 random hex
digits per staging transaction, keeps them unique when row ids repeat: a database restored
from a backup numbers its new rows from where the backup was, and rows sent after the
backup had those ids (Stripe would take the new usage for a duplicate).
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiosqlite

from proxy.periods import period_bounds
from proxy.pricing import TransformQuantity
from proxy.store.access import Writer
from proxy.store.protocols import DueEvent, HourTotal, OutboxCounts, OutboxEntry
from proxy.transform import transformed_delta
from proxy.units import QSCALE

WINDOW = 3600
# the reason of a row the flusher parked past its resend horizon (proxy.flusher): its replay
# starts first_attempt_at over (the operator checked Stripe's summaries and found it missing)
UNCONFIRMED = "unconfirmed"


@dataclass(frozen=True, slots=True)
class StagedEvent:
    customer_id: str
    meter: str
    event_name: str
    covered: bool
    value: int
    window_start: int
    timestamp: int


def install_id(conn: sqlite3.Connection) -> str:
    return str(conn.execute("SELECT v FROM meta WHERE k='install_id'").fetchone()[0])


def split_whole(total_micro: int) -> tuple[int, int]:
    """(whole units, remainder micro) with 0 <= remainder < QSCALE (floor division)."""
    whole, rem = divmod(total_micro, QSCALE)
    return whole, rem


def _periods(conn: sqlite3.Connection, customers: set[str]) -> dict[str, int | None]:
    """customer -> billing anchor (None: calendar months)."""
    out: dict[str, int | None] = dict.fromkeys(customers)
    for cid, anchor in conn.execute("SELECT id, billing_anchor FROM customers"
                                    " WHERE billing_anchor IS NOT NULL"):
        if cid in out:
            out[cid] = anchor
    return out



def events_from_buckets(buckets: Mapping[tuple[str, str, int, int], Sequence[int]],
                        before: Mapping[tuple[str, str, int], list[int]],
                        carry: dict[tuple[str, str, str], int],
                        event_names: Mapping[str, tuple[str, str | None]],
                        transforms: Mapping[str, TransformQuantity], now: float,
                        ) -> list[StagedEvent]:
    """The pure core of staging, shared by every backend: each (customer, meter, period,
    window) bucket of newly billable/covered micro-units becomes at most one event per event
    name. A meter with a transform and known period totals (``before``: reported so far,
    updated in place) is charged the transformed difference; any other meter floors whole
    units and carries the fraction (``carry``, updated in place). Buckets are visited in key
    order, so the events come out in identifier order."""
    out: list[StagedEvent] = []
    for (customer, meter, pstart, window), (pend, last_minute, billable, covered) \
            in sorted(buckets.items()):
        names = event_names.get(meter, (meter, None))
        ts = int(min(last_minute + 59, pend - 1, now))
        t = transforms.get(meter)
        totals = before.get((customer, meter, pstart))
        for i, (event_name, delta, is_cov) in enumerate(
                ((names[0], billable, False), (names[1], covered, True))):
            if event_name is None or not delta:
                continue
            if t is not None and totals is not None:
                whole = transformed_delta(totals[i], totals[i] + delta, t)
                totals[i] += delta
            else:
                ckey = (customer, meter, event_name)
                whole, rem = split_whole(carry.get(ckey, 0) + delta)
                carry[ckey] = rem
            if whole:
                out.append(StagedEvent(customer, meter, event_name, is_cov, whole, window, ts))
    return out

# stage()'s SQL, at module level so mutmut (which mutates only inside functions) leaves it
# alone: SQL text is case-insensitive, so its case-flip mutants are equivalent; what the
# statements do is pinned by the outbox tests (tests/test_outbox_dry_run.py,
# tests/store/test_outbox_contract.py).
_UNREPORTED_WINDOWS = (
    "SELECT customer_id, meter, minute / ? * ? AS w, MAX(minute),"
    " SUM(billable - reported), SUM(covered - reported_covered)"
    " FROM usage_minute INDEXED BY usage_minute_unreported"
    " WHERE billable > reported OR covered > reported_covered"
    " GROUP BY customer_id, meter, w ORDER BY customer_id, meter, w")
_UNREPORTED_SPAN = (
    "SELECT MAX(minute), COALESCE(SUM(billable - reported), 0),"
    " COALESCE(SUM(covered - reported_covered), 0)"
    " FROM usage_minute INDEXED BY usage_minute_unreported"
    " WHERE (billable > reported OR covered > reported_covered)"
    " AND customer_id=? AND meter=? AND minute>=? AND minute<?")
_REPORTED_SPAN = (
    "SELECT COALESCE(SUM(reported), 0), COALESCE(SUM(reported_covered), 0)"
    " FROM usage_minute WHERE customer_id=? AND meter=? AND minute>=? AND minute<?")
_MARK_REPORTED = (
    "UPDATE usage_minute INDEXED BY usage_minute_unreported"
    " SET reported = billable, reported_covered = covered"
    " WHERE billable > reported OR covered > reported_covered")
_CARRY_ALL = "SELECT customer_id, meter, event_name, remainder FROM carry"
_CARRY_UPSERT = (
    "INSERT INTO carry(customer_id, meter, event_name, remainder) VALUES (?,?,?,?)"
    " ON CONFLICT(customer_id, meter, event_name) DO UPDATE SET remainder=excluded.remainder")
_LAST_OUTBOX_ID = "SELECT COALESCE(MAX(id), 0) FROM outbox"
_OUTBOX_INSERT = (
    "INSERT INTO outbox(id, identifier, customer_id, meter, event_name, covered, value,"
    " window_start, timestamp, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)")


def stage(conn: sqlite3.Connection, event_names: Mapping[str, tuple[str, str | None]],
          now: float | None = None,
          transforms: Mapping[str, TransformQuantity] | None = None) -> list[StagedEvent]:
    """Move unstaged usage into outbox rows. Caller holds the transaction.

    ``event_names`` maps meter -> (stripe_event_name, covered_event_name or None). Usage of a
    meter no longer in the rules keeps the event name it was last staged with, else the
    meter's own name (an operator can fix a wrong name through a dead-letter replay).

    Windows are the hour, cut at the customer's billing-period boundary (a mid-hour anchor
    splits the hour: the part before it is stamped inside the old period). ``transforms``
    (meter -> transform) makes a meter report ``T(period total after) - T(before)`` instead of
    the floor-and-carry of raw units (see :mod:`proxy.transform`)."""
    now = time.time() if now is None else now
    transforms = transforms or {}
    rows = conn.execute(_UNREPORTED_WINDOWS, (WINDOW, WINDOW)).fetchall()
    if not rows:
        return []
    anchors = _periods(conn, {r[0] for r in rows})
    # (customer, meter, period start, window start) -> [period end, last minute, billable, cov]
    buckets: dict[tuple[str, str, int, int], list[int]] = {}
    bounds: dict[str, tuple[int, int]] = {}
    for customer, meter, window, last_minute, billable, covered in rows:
        b = bounds.get(customer)
        if b is None or not b[0] <= window < b[1]:
            b = bounds[customer] = period_bounds(anchors[customer], window)
        if b[1] >= window + WINDOW:          # the common case: the hour is inside one period
            buckets[customer, meter, b[0], window] = [b[1], last_minute, billable, covered]
            continue
        # a period boundary inside this hour (a mid-hour anchor): split the hour there
        nxt = period_bounds(anchors[customer], b[1])
        for lo, hi, pb in ((window, b[1], b), (b[1], window + WINDOW, nxt)):
            last, bill, cov = conn.execute(_UNREPORTED_SPAN,
                                           (customer, meter, lo, hi)).fetchone()
            if last is not None:
                buckets[customer, meter, pb[0], lo] = [pb[1], last, bill, cov]
    # a transformed meter's period total already reported, before this staging
    before: dict[tuple[str, str, int], list[int]] = {}
    for customer, meter, pstart, _w in buckets:
        if meter in transforms and (customer, meter, pstart) not in before:
            pend = buckets[customer, meter, pstart, _w][0]
            rep, rep_cov = conn.execute(_REPORTED_SPAN,
                                        (customer, meter, pstart, pend)).fetchone()
            before[customer, meter, pstart] = [rep, rep_cov]
    conn.execute(_MARK_REPORTED)
    carry: dict[tuple[str, str, str], int] = {
        (c, m, e): r for c, m, e, r in conn.execute(_CARRY_ALL)}
    out = events_from_buckets(buckets, before, carry, event_names, transforms, now)
    created = int(now)
    conn.executemany(_CARRY_UPSERT, [(*k, v) for k, v in carry.items()])
    prefix = "mp_" + install_id(conn) + "_"
    salt = "_" + secrets.token_hex(4)
    (last_id,) = conn.execute(_LAST_OUTBOX_ID).fetchone()
    conn.executemany(
        _OUTBOX_INSERT,
        [(last_id + i, f"{prefix}{last_id + i}{salt}", ev.customer_id, ev.meter, ev.event_name,
          int(ev.covered), ev.value, ev.window_start, ev.timestamp, created)
         for i, ev in enumerate(out, start=1)])
    return out


def pending(conn: sqlite3.Connection, now: float, limit: int = 5000) -> list[dict[str, Any]]:
    cur = conn.execute(
        "SELECT o.id, o.identifier, o.customer_id, o.meter, o.event_name, o.value, o.timestamp,"
        " o.attempts, c.stripe_customer_id,"
        # a call an earlier version made recorded no time: dated from the row's creation
        " COALESCE(o.first_attempt_at, CASE WHEN o.attempts > 0 THEN o.created_at END)"
        " AS first_attempt_at FROM outbox o LEFT JOIN customers c"
        " ON c.id = o.customer_id WHERE o.status='pending' AND o.next_attempt_at <= ?"
        " ORDER BY o.id LIMIT ?", (now, limit))
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in cur]


def remainders(conn: sqlite3.Connection, customer_id: str) -> dict[str, int]:
    return {f"{m}:{e}": r for m, e, r in conn.execute(
        "SELECT meter, event_name, remainder FROM carry WHERE customer_id=?", (customer_id,))}


_ENTRY_COLS = ("id, identifier, customer_id, meter, event_name, covered, value, timestamp,"
               " created_at, status, attempts, sent_at, sink, outcome, last_error, dead_at")
_HOUR = 3600


class SqliteOutbox:
    """The ``Outbox`` owner on SQLite: the only writer of ``outbox`` and ``carry``. Every
    verb is one transaction through the ``Writer`` (no ``await`` inside). ``rows`` (the
    admin listing) reads through ``reader``, off the loop thread, when one is given."""

    def __init__(self, db: Writer, reader: aiosqlite.Connection | None = None) -> None:
        self.db = db
        self.reader = reader

    async def stage(self, event_names: Mapping[str, tuple[str, str | None]],
                    transforms: Mapping[str, TransformQuantity] | None = None,
                    now: float | None = None) -> list[StagedEvent]:
        out: list[StagedEvent] = self.db.execute_write(
            lambda c: stage(c, event_names, now, transforms))
        return out

    async def due(self, now: float, limit: int = 5000) -> list[DueEvent]:
        return [DueEvent(**r) for r in pending(self.db.conn, now, limit)]

    async def begin_attempt(self, ids: Sequence[int], at: float | None = None) -> None:
        stamp = time.time() if at is None else at
        self.db.execute_write(lambda c: c.executemany(
            "UPDATE outbox SET attempts = attempts + 1, first_attempt_at ="
            " COALESCE(first_attempt_at, CASE WHEN attempts > 0 THEN created_at ELSE ? END)"
            " WHERE id=?",
            [(stamp, i) for i in ids]))

    async def mark_sent(self, outbox_id: int, *, sink: str, outcome: str, at: int) -> None:
        self.db.execute_write(lambda c: c.execute(
            "UPDATE outbox SET status='sent', sent_at=?, sink=?, outcome=?, last_error=NULL"
            " WHERE id=?", (at, sink, outcome, outbox_id)))

    async def mark_dry_run(self, outbox_id: int, *, sink: str, outcome: str) -> None:
        self.db.execute_write(lambda c: c.execute(
            "UPDATE outbox SET status='dry_run', sink=?, outcome=?,"
            " last_error=NULL WHERE id=?", (sink, outcome, outbox_id)))

    async def retry_at(self, outbox_id: int, when: float, error: str,
                       not_called: float | None = None) -> None:
        self.db.execute_write(lambda c: c.execute(
            "UPDATE outbox SET next_attempt_at=?, last_error=?,"
            " attempts = CASE WHEN first_attempt_at = ? THEN attempts - 1 ELSE attempts END,"
            " first_attempt_at = CASE WHEN first_attempt_at = ? THEN NULL ELSE first_attempt_at END"
            " WHERE id=?",
            (when, error[:500], not_called, not_called, outbox_id)))

    async def mark_dead(self, outbox_id: int, *, reason: str, sink: str, at: int) -> None:
        self.db.execute_write(lambda c: c.execute(
            "UPDATE outbox SET status='dead', dead_at=?, last_error=?, sink=? WHERE id=?",
            (at, reason[:500], sink, outbox_id)))

    async def requeue_dry_run(self) -> int:
        n: int = self.db.execute_write(lambda c: c.execute(
            "UPDATE outbox SET status='pending', next_attempt_at=0, sink=NULL, outcome=NULL"
            " WHERE status='dry_run'").rowcount)
        return n

    async def replay(self, outbox_id: int, restamp_at: int | None = None,
                     now: float | None = None) -> bool:
        at = time.time() if now is None else now

        def tx(c: sqlite3.Connection) -> bool:
            sets = ("status='pending', next_attempt_at=0, dead_at=NULL, first_attempt_at ="
                    " CASE WHEN last_error LIKE ? THEN ? ELSE first_attempt_at END")
            args: tuple[int | float | str, ...] = (UNCONFIRMED + "%", at, outbox_id)
            if restamp_at is not None:
                sets += ", timestamp=?"
                args = (UNCONFIRMED + "%", at, int(restamp_at), outbox_id)
            cur = c.execute(f"UPDATE outbox SET {sets} WHERE id=? AND status='dead'", args)
            return cur.rowcount == 1

        ok: bool = await self.db.write(tx)
        return ok

    async def make_due(self, ids: Sequence[int]) -> int:
        def tx(c: sqlite3.Connection) -> int:
            cur = c.executemany("UPDATE outbox SET next_attempt_at=0 WHERE id=? AND"
                                " status='pending'", [(i,) for i in ids])
            return int(cur.rowcount)

        n: int = self.db.execute_write(tx)
        return n

    async def rows(self, *, status: str | None = None, outbox_id: int | None = None,
                   customer_id: str | None = None, limit: int = 500) -> list[OutboxEntry]:
        where: list[str] = []
        args: list[Any] = []
        if status is not None:
            where.append("status=?")
            args.append(status)
        if outbox_id is not None:
            where.append("id=?")
            args.append(outbox_id)
        if customer_id is not None:
            where.append("customer_id=?")
            args.append(customer_id)
        sql = f"SELECT {_ENTRY_COLS} FROM outbox"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        if self.reader is not None:
            async with self.reader.execute(sql, (*args, int(limit))) as cur:
                rows: list[Any] = list(await cur.fetchall())
        else:
            rows = self.db.conn.execute(sql, (*args, int(limit))).fetchall()
        return [OutboxEntry(r[0], r[1], r[2], r[3], r[4], bool(r[5]), *r[6:]) for r in rows]

    async def counts(self) -> OutboxCounts:
        got = dict(self.db.conn.execute(
            "SELECT status, COUNT(*) FROM outbox WHERE status IN ('pending', 'dead', 'dry_run')"
            " GROUP BY status").fetchall())
        return OutboxCounts(got.get("pending", 0), got.get("dead", 0), got.get("dry_run", 0))

    async def oldest_pending_created(self) -> int | None:
        (a,) = self.db.conn.execute(
            "SELECT MIN(created_at) FROM outbox WHERE status='pending'").fetchone()
        return None if a is None else int(a)

    async def hour_totals(self, start: int, end: int) -> list[HourTotal]:
        return [HourTotal(str(cid), str(name), int(h), int(total), int(sent), int(pend),
                          int(dead), int(last), int(n))
                for cid, name, h, total, sent, pend, dead, last, n in self.db.conn.execute(
                    "SELECT customer_id, event_name, timestamp / ? * ? AS h, SUM(value),"
                    " SUM(CASE WHEN status='sent' THEN value ELSE 0 END),"
                    " SUM(CASE WHEN status='pending' THEN value ELSE 0 END),"
                    " SUM(CASE WHEN status='dead' THEN value ELSE 0 END),"
                    " COALESCE(MAX(CASE WHEN status='sent' THEN sent_at END), 0), COUNT(*)"
                    " FROM outbox WHERE timestamp >= ? AND timestamp < ?"
                    " GROUP BY customer_id, event_name, h", (_HOUR, _HOUR, start, end))]

    async def rows_in_hour(self, customer_id: str, event_name: str,
                           hour: int) -> list[tuple[int, str, str]]:
        return [(int(i), str(ident), str(st)) for i, ident, st in self.db.conn.execute(
            "SELECT id, identifier, status FROM outbox WHERE customer_id=? AND event_name=?"
            " AND timestamp >= ? AND timestamp < ? ORDER BY id",
            (customer_id, event_name, hour, hour + _HOUR))]

    async def remainders(self, customer_id: str) -> dict[str, int]:
        return remainders(self.db.conn, customer_id)
