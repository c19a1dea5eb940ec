"""Reconciliation: the outbox (what meterproxy owes Stripe) against Stripe's meter event
summaries, per customer, event name and UTC hour.

Rules (docs/stripe-notes.md, "Meters and summaries"; README "Reconciliation")
  * Every event name the rules report under must map to an ACTIVE Stripe meter (``sum``
    formula, payload keys ``stripe_customer_id`` / ``value``), else the run is refused:
    :class:`ReconcileRefused` names what is missing. Nothing is guessed.
  * Summaries are asked with ``value_grouping_window=hour`` over ``[from, to)`` aligned
    down to the hour (start inclusive, end exclusive), 100 per page, every page read.
  * The ledger of an hour is the sum of every outbox row whose event ``timestamp`` falls in
    it (sent, pending and dead: what Stripe should have); ``sent`` and ``undelivered``
    (pending + dead) are reported beside it. Stripe's ``aggregated_value`` is a float.
  * Comparisons are per STRIPE customer: Stripe's summaries are a Stripe customer's, and
    several local customers may share one ``stripe_customer_id`` (docs/credits.md), so the
    ledger is summed over every local customer of a Stripe customer before it is compared,
    and a shortfall's pending rows are made due for each of them. Asking for some customers
    reconciles every Stripe customer they are billed to, with all its local customers.
  * Eventual consistency: an hour is ``pending`` (not judged) while it ends after
    ``now - grace`` or while one of its rows was sent after ``now - grace`` (Stripe
    processes events asynchronously from receipt, not from the event timestamp).
  * Judged hours are ``match``, ``shortfall`` (Stripe < ledger) or ``excess``. Hours with
    nothing on either side are skipped (not counted).
  * The only automatic action: a shortfall hour's ``pending`` rows are made due now
    (``next_attempt_at = 0``) so the flusher resends them with their ORIGINAL identifier
    (Stripe dedupes). ``dead`` rows are reported as dead letters (replay is the operator's
    call); a shortfall not explained by undelivered rows (rows marked sent yet missing) and
    every excess are reported for the operator. No event is ever minted here.
  * The ledger is read, and the one write made, through the ``Outbox`` and ``Customers``
    owners (``proxy.store.protocols``). Stripe failures arrive as
    :class:`proxy.errors.StripeCallError` (translated by :mod:`proxy.stripe.client`); no
    stripe SDK exception is caught here.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from proxy.errors import MeterproxyError, StorageError, StripeCallError, StripeUnavailable
from proxy.meter_check import problem
from proxy.store.protocols import Customers, Outbox
from proxy.stripe.client import EventSummary, Page, StripeClient, StripeMeterInfo
from proxy.timeutil import rfc3339

log = logging.getLogger("meterproxy.reconcile")

T = TypeVar("T")

HOUR = 3600
PAGE = 100
DEFAULT_WINDOW = 48 * HOUR
DEFAULT_THRESHOLD = 0.01

Status = Literal["match", "shortfall", "excess", "pending"]
EventNames = Callable[[], Mapping[str, tuple[str, str | None]]]


class ReconcileError(MeterproxyError):
    """The run could not be carried out (Stripe unreachable, a bad range)."""


class InvalidRange(ReconcileError):
    """The requested range or grace makes no sense (empty after alignment, negative)."""


class ReconcileRefused(ReconcileError):
    """A rules event name has no usable Stripe meter: the reconcile does not start."""

    def __init__(self, message: str, missing: Sequence[str]) -> None:
        super().__init__(message)
        self.missing = list(missing)


# ---- the pure comparison ----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class HourResult:
    hour: int               # unix seconds, aligned to the hour
    ledger: int             # whole units the outbox holds for the hour
    stripe: float           # Stripe's aggregated_value
    status: Status

    @property
    def difference(self) -> float:
        """Stripe minus ledger (negative: shortfall)."""
        return self.stripe - self.ledger


def align_down(ts: float) -> int:
    return int(ts // HOUR) * HOUR


def compare(ledger: Mapping[int, int], stripe: Mapping[int, float], judge_before: int,
            fresh: AbstractSet[int] = frozenset()) -> list[HourResult]:
    """Hour-by-hour verdicts, sorted by hour. An hour is judged only if it ends at or before
    ``judge_before`` and is not in ``fresh``; hours with nothing on either side are left out.
    Float vs int comparisons are exact in Python, so 3.0 == 3 and 2.5 < 3."""
    out: list[HourResult] = []
    for hour in sorted(set(ledger) | set(stripe)):
        lv = ledger.get(hour, 0)
        sv = float(stripe.get(hour, 0.0))
        if lv == 0 and sv == 0:
            continue
        status: Status
        if hour + HOUR > judge_before or hour in fresh:
            status = "pending"
        elif sv == lv:
            status = "match"
        elif sv < lv:
            status = "shortfall"
        else:
            status = "excess"
        out.append(HourResult(hour, lv, sv, status))
    return out


def discrepancy_rate(counts: Mapping[str, int]) -> float:
    judged = counts.get("match", 0) + counts.get("shortfall", 0) + counts.get("excess", 0)
    if judged == 0:
        return 0.0
    return (counts.get("shortfall", 0) + counts.get("excess", 0)) / judged


# ---- the report ---------------------------------------------------------------------------

@dataclass(slots=True)
class LedgerHour:
    total: int = 0
    sent: int = 0
    pending: int = 0
    dead: int = 0
    last_sent_at: int = 0
    rows: int = 0


@dataclass(slots=True)
class HourLine:
    result: HourResult
    ledger: LedgerHour
    action: str = ""                         # resend | dead_letter | operator | ""
    identifiers: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        r = self.result
        d: dict[str, Any] = {
            "hour": rfc3339(r.hour), "ledger": r.ledger, "sent": self.ledger.sent,
            "undelivered": self.ledger.pending + self.ledger.dead,
            "stripe": _num(r.stripe), "difference": _num(r.difference), "status": r.status}
        if self.action:
            d["action"] = self.action
            d["identifiers"] = self.identifiers
        return d


@dataclass(slots=True)
class PairResult:
    """One Stripe customer and event name. ``customer_ids``: the local customers billed to
    that Stripe customer (usually one); ``customer_id`` labels them (joined by ``+``)."""
    customer_id: str
    stripe_customer_id: str
    event_name: str
    meter_id: str
    lines: list[HourLine] = field(default_factory=list)
    error: str | None = None
    customer_ids: tuple[str, ...] = ()


@dataclass(slots=True)
class Report:
    start: int
    end: int
    grace_s: float
    now: float
    threshold: float
    meters: dict[str, str] = field(default_factory=dict)          # event name -> meter id
    pairs: list[PairResult] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)               # identifiers made due
    dead_letters: list[str] = field(default_factory=list)
    operator: list[dict[str, Any]] = field(default_factory=list)  # for a human to look at
    errors: list[str] = field(default_factory=list)
    unmapped: dict[str, int] = field(default_factory=dict)        # customer -> outbox rows
    unknown_event_names: list[str] = field(default_factory=list)
    dry_run: bool = False
    duration_s: float = 0.0

    @property
    def counts(self) -> dict[str, int]:
        c: Counter[str] = Counter({"match": 0, "shortfall": 0, "excess": 0, "pending": 0})
        for p in self.pairs:
            c.update(line.result.status for line in p.lines)
        return dict(c)

    @property
    def discrepancy_rate(self) -> float:
        return discrepancy_rate(self.counts)

    @property
    def alert(self) -> bool:
        return self.discrepancy_rate > self.threshold

    def to_json(self) -> dict[str, Any]:
        customers: dict[str, Any] = {}
        for p in self.pairs:
            cust = customers.setdefault(p.customer_id, {
                "stripe_customer_id": p.stripe_customer_id,
                "customers": list(p.customer_ids or (p.customer_id,)), "events": {}})
            ledger = sum(ln.result.ledger for ln in p.lines)
            stripe = sum(ln.result.stripe for ln in p.lines)
            ev: dict[str, Any] = {
                "meter": p.meter_id, "hours": [ln.to_json() for ln in p.lines],
                "totals": {"ledger": ledger, "stripe": _num(stripe),
                           "difference": _num(stripe - ledger)}}
            if p.error:
                ev["error"] = p.error
            cust["events"][p.event_name] = ev
        counts = self.counts
        return {
            "from": rfc3339(self.start), "to": rfc3339(self.end), "grace_seconds": self.grace_s,
            "now": rfc3339(self.now), "meters": self.meters, "customers": customers,
            "counts": counts,
            "judged_hours": counts["match"] + counts["shortfall"] + counts["excess"],
            "discrepancy_rate": round(self.discrepancy_rate, 6), "threshold": self.threshold,
            "alert": self.alert, "dry_run": self.dry_run,
            "actions": {"resent": self.resent, "dead_letters": self.dead_letters,
                        "operator": self.operator},
            "unmapped_customers": self.unmapped, "unknown_event_names": self.unknown_event_names,
            "errors": self.errors, "duration_seconds": round(self.duration_s, 3),
        }

    def to_table(self, all_hours: bool = False) -> str:
        """Fixed-width text; discrepancies only unless ``all_hours``."""
        head = ("CUSTOMER", "EVENT", "HOUR (UTC)", "LEDGER", "STRIPE", "DIFF", "STATUS", "ACTION")
        rows: list[tuple[str, ...]] = []
        for p in self.pairs:
            for ln in p.lines:
                r = ln.result
                if not all_hours and r.status in ("match", "pending"):
                    continue
                rows.append((p.customer_id, p.event_name, rfc3339(r.hour)[:16].replace("T", " "),
                             str(r.ledger), _fmt(r.stripe), _fmt(r.difference), r.status,
                             ln.action or "-"))
            if p.error:
                rows.append((p.customer_id, p.event_name, "-", "-", "-", "-", "error", p.error))
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
                  for i, h in enumerate(head)]
        numeric = {3, 4, 5}

        def fmt(cells: Sequence[str]) -> str:
            return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                             for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

        c = self.counts
        lines = [f"reconcile {rfc3339(self.start)} .. {rfc3339(self.end)} (grace {self.grace_s:g}s)"
                 f"{' [dry run]' if self.dry_run else ''}",
                 fmt(head), fmt(["-" * w for w in widths])]
        lines += [fmt(r) for r in rows]
        if not rows:
            lines.append("(no discrepancies)")
        lines.append("")
        lines.append(f"match {c['match']}  shortfall {c['shortfall']}  excess {c['excess']}"
                     f"  pending {c['pending']}  discrepancy rate {self.discrepancy_rate:.2%}"
                     f" (threshold {self.threshold:.2%}){'  ALERT' if self.alert else ''}")
        if self.resent:
            lines.append(f"made due for resend (original identifiers): {', '.join(self.resent)}")
        if self.dead_letters:
            lines.append(f"dead letters to replay after a fix: {', '.join(self.dead_letters)}")
        if self.operator:
            lines.append(f"for the operator: {len(self.operator)} hour(s) not explained by"
                         " the outbox (see JSON)")
        lines += [f"unmapped customer {k}: {v} outbox row(s)" for k, v in self.unmapped.items()]
        if self.unknown_event_names:
            lines.append(f"outbox event names with no Stripe meter: "
                         f"{', '.join(self.unknown_event_names)}")
        lines += [f"error: {e}" for e in self.errors]
        return "\n".join(lines) + "\n"


def _num(v: float) -> float | int:
    return int(v) if float(v).is_integer() else v


def _fmt(v: float) -> str:
    n = _num(v)
    return f"{n:+d}" if isinstance(n, int) and v < 0 else str(n)


# ---- the run ----------------------------------------------------------------------------

class Reconciler:
    def __init__(self, outbox: Outbox, customers: Customers,
                 stripe: StripeClient, event_names: EventNames, *,
                 threshold: float = DEFAULT_THRESHOLD, concurrency: int = 4,
                 call_attempts: int = 3,
                 metrics: ReconcileMetrics | None = None) -> None:
        self.outbox = outbox
        self.customers = customers
        self.stripe = stripe
        self.event_names = event_names
        self.threshold = threshold
        self.concurrency = concurrency
        self.call_attempts = call_attempts
        self.metrics = metrics
        self._lock = asyncio.Lock()

    async def run(self, from_ts: float | None = None, to_ts: float | None = None,
                  grace_s: float = 7200.0, now: float | None = None, *,
                  customers: Iterable[str] | None = None, dry_run: bool = False) -> Report:
        """One reconcile over ``[from, to)`` (default: the last 48 hours up to now).

        Raises :class:`ReconcileRefused` when a rules event name has no usable Stripe meter,
        :class:`ReconcileError` when Stripe cannot list its meters or the range is empty."""
        async with self._lock:
            try:
                report = await self._run(from_ts, to_ts, grace_s, now, customers, dry_run)
            except ReconcileError as exc:
                if self.metrics is not None:
                    self.metrics.runs.labels(
                        "refused" if isinstance(exc, ReconcileRefused) else "error").inc()
                raise
        if report.alert:
            log.error("reconcile: discrepancy rate %.2f%% exceeds %.2f%% (%s)",
                      report.discrepancy_rate * 100, report.threshold * 100, report.counts)
        if self.metrics is not None:
            self.metrics.publish(report)
        return report

    async def _run(self, from_ts: float | None, to_ts: float | None, grace_s: float,
                   now: float | None, only: Iterable[str] | None, dry_run: bool) -> Report:
        t0 = time.monotonic()
        now = time.time() if now is None else now
        end = align_down(now if to_ts is None else min(to_ts, now))
        start = align_down(end - DEFAULT_WINDOW if from_ts is None else from_ts)
        if end <= start:
            raise InvalidRange(f"empty range: [{rfc3339(start)}, {rfc3339(end)}) after"
                                 " aligning to the hour (to is capped at now)")
        if grace_s < 0:
            raise InvalidRange("grace must not be negative")
        report = Report(start, end, grace_s, now, self.threshold, dry_run=dry_run)

        rules_names = sorted({n for pair in self.event_names().values() for n in pair if n})
        meters = await self._stripe_meters()
        usable: dict[str, StripeMeterInfo] = {}
        problems: list[str] = []
        missing: list[str] = []
        for name in rules_names:
            problem = _meter_problem(name, meters.get(name, []))
            if problem is None:
                usable[name] = next(m for m in meters[name] if m.status == "active")
            else:
                problems.append(problem)
                missing.append(name)
        if missing:
            raise ReconcileRefused("reconcile refused, rules event names without a usable Stripe"
                                   " meter: " + "; ".join(problems), missing)

        ledger = await self._ledger(start, end)
        groups = await self._groups(only)            # Stripe customer -> its local customers
        cust = {cid: scid for scid, cids in groups.items() for cid in cids}
        want = None if only is None else set(only) | set(cust)
        for (cid, name), hours in ledger.items():
            if want is not None and cid not in want:
                continue
            if cid not in cust:
                report.unmapped[cid] = report.unmapped.get(cid, 0) + sum(
                    lh.rows for lh in hours.values())
            if name not in usable and name not in report.unknown_event_names:
                extra = [m for m in meters.get(name, []) if m.status == "active"]
                if extra and _meter_problem(name, extra) is None:
                    usable[name] = extra[0]
                else:
                    report.unknown_event_names.append(name)
        report.unknown_event_names.sort()
        report.meters = {n: m.id for n, m in sorted(usable.items())}

        judge_before = int(now - grace_s)
        gate = asyncio.Semaphore(self.concurrency)
        pairs = [PairResult("+".join(cids), scid, name, usable[name].id, customer_ids=cids)
                 for scid, cids in sorted(groups.items(), key=lambda g: g[1])
                 for name in sorted(usable)]
        # the ledger of each Stripe customer: its local customers' hours summed
        by_stripe: dict[tuple[str, str], dict[int, LedgerHour]] = {}
        for (cid, name), hours in ledger.items():
            if cid in cust:
                into = by_stripe.setdefault((cust[cid], name), {})
                for h, lh in hours.items():
                    into[h] = _add(into.get(h), lh)

        async def one(p: PairResult) -> None:
            async with gate:
                got = await self._summaries(p.meter_id, p.stripe_customer_id, start, end)
            if isinstance(got, str):
                p.error = got
                report.errors.append(f"{p.customer_id}/{p.event_name}: {got}")
                return
            hours = by_stripe.get((p.stripe_customer_id, p.event_name), {})
            fresh = {h for h, lh in hours.items() if lh.last_sent_at > judge_before}
            results = compare({h: lh.total for h, lh in hours.items()}, got, judge_before, fresh)
            p.lines = [HourLine(r, hours.get(r.hour, LedgerHour())) for r in results]

        await asyncio.gather(*(one(p) for p in pairs))
        report.pairs = pairs
        await self._decide(report, dry_run)
        report.duration_s = time.monotonic() - t0
        return report

    # ---- Stripe ---------------------------------------------------------------------------

    async def _call(self, make: Callable[[], Awaitable[T]]) -> T:
        """One Stripe call with a few quick retries on transient failures; the last
        :class:`~proxy.errors.StripeCallError` is raised."""
        for i in range(self.call_attempts):
            try:
                return await make()
            except StripeUnavailable as exc:
                if i + 1 >= self.call_attempts:
                    raise
                await asyncio.sleep(min(2.0, 0.2 * 2 ** i, exc.retry_after or 2.0))
        raise AssertionError("call_attempts must be at least 1")

    async def _stripe_meters(self) -> dict[str, list[StripeMeterInfo]]:
        out: dict[str, list[StripeMeterInfo]] = {}
        after: str | None = None
        while True:
            def list_meters(a: str | None = after) -> Awaitable[Page[StripeMeterInfo]]:
                return self.stripe.list_meters_page(limit=PAGE, starting_after=a)

            try:
                page = await self._call(list_meters)
            except StripeCallError as exc:
                raise ReconcileError(f"cannot list Stripe meters: {exc.reason}") from exc
            for m in page.items:
                out.setdefault(m.event_name, []).append(m)
            if not page.has_more or not page.items:
                return out
            after = page.items[-1].id

    async def _summaries(self, meter_id: str, customer: str, start: int,
                         end: int) -> dict[int, float] | str:
        out: dict[int, float] = {}
        after: str | None = None
        while True:
            def list_summaries(a: str | None = after) -> Awaitable[Page[EventSummary]]:
                return self.stripe.list_event_summaries_page(
                    meter_id, customer=customer, start_time=start, end_time=end, limit=PAGE,
                    starting_after=a)

            try:
                page = await self._call(list_summaries)
            except StripeCallError as exc:
                return f"event summaries unavailable: {exc.reason}"
            for s in page.items:
                hour = align_down(s.start_time)
                out[hour] = out.get(hour, 0.0) + s.aggregated_value
            if not page.has_more or not page.items:
                return out
            after = page.items[-1].id

    # ---- the ledger -----------------------------------------------------------------------

    async def _ledger(self, start: int,
                      end: int) -> dict[tuple[str, str], dict[int, LedgerHour]]:
        out: dict[tuple[str, str], dict[int, LedgerHour]] = {}
        for h in await self.outbox.hour_totals(start, end):
            out.setdefault((h.customer_id, h.event_name), {})[h.hour] = LedgerHour(
                h.total, h.sent, h.pending, h.dead, h.last_sent_at, h.rows)
        return out

    async def _groups(self, only: Iterable[str] | None) -> dict[str, tuple[str, ...]]:
        """Stripe customer -> its local customers (sorted), for every Stripe customer (or
        every one a customer in ``only`` is billed to: all of its local customers, since
        Stripe's summaries cannot be split between them)."""
        rows = await self.customers.stripe_ids()
        want = None if only is None else set(only)
        groups: dict[str, list[str]] = {}
        for cid, scid in rows.items():
            groups.setdefault(scid, []).append(cid)
        return {scid: tuple(sorted(cids)) for scid, cids in groups.items()
                if want is None or want.intersection(cids)}

    async def _rows(self, p: PairResult, hour: int) -> list[tuple[int, str, str]]:
        """The outbox rows of the hour, of every local customer of ``p``'s Stripe customer."""
        out: list[tuple[int, str, str]] = []
        for cid in p.customer_ids or (p.customer_id,):
            out += await self.outbox.rows_in_hour(cid, p.event_name, hour)
        return out

    # ---- decisions ------------------------------------------------------------------------

    async def _decide(self, report: Report, dry_run: bool) -> None:
        due: list[int] = []
        for p in report.pairs:
            for ln in p.lines:
                r, lh = ln.result, ln.ledger
                if r.status == "excess":
                    ln.action = "operator"
                    ln.identifiers = [i for _, i, _ in await self._rows(p, r.hour)]
                    report.operator.append(_issue(p, ln, "excess: Stripe has more than the"
                                                  " ledger (events not sent by this install?)"))
                    continue
                if r.status != "shortfall":
                    continue
                rows = await self._rows(p, r.hour)
                pending = [(i, ident) for i, ident, st in rows if st == "pending"]
                dead = [ident for _, ident, st in rows if st == "dead"]
                actions: list[str] = []
                if pending:
                    actions.append("resend")
                    due += [i for i, _ in pending]
                    report.resent += [ident for _, ident in pending]
                if dead:
                    actions.append("dead_letter")
                    report.dead_letters += dead
                missing = -r.difference - (lh.pending + lh.dead)
                if missing > 0:
                    actions.append("operator")
                    report.operator.append(_issue(
                        p, ln, f"shortfall of {_num(missing)} unit(s) not explained by"
                        " undelivered rows: rows marked sent are missing in Stripe"
                        " (not resent: check Stripe's meter error reports)",
                        [ident for _, ident, st in rows if st == "sent"]))
                ln.action = "+".join(actions)
                ln.identifiers = [ident for _, ident, _ in rows]
        if due and not dry_run:
            n = await self.outbox.make_due(due)
            log.warning("reconcile: %d undelivered event(s) made due for resend", n)

    # ---- schedule ------------------------------------------------------------------------

    async def run_every(self, interval: float, grace_s: float,
                        window_s: float = DEFAULT_WINDOW) -> None:
        """The scheduled reconcile: every ``interval`` over the last ``window_s``."""
        while True:
            await asyncio.sleep(interval)
            try:
                now = time.time()
                rep = await self.run(now - window_s - grace_s, now, grace_s, now)
                log.info("reconcile: %s, rate %.4f%s", rep.counts, rep.discrepancy_rate,
                         " ALERT" if rep.alert else "")
            except ReconcileError as exc:
                log.error("scheduled reconcile did not run: %s", exc)
            except (sqlite3.Error, StorageError) as exc:
                log.error("scheduled reconcile failed (storage): %s", exc)


def _issue(p: PairResult, ln: HourLine, why: str,
           identifiers: list[str] | None = None) -> dict[str, Any]:
    return {"customer": p.customer_id, "customers": list(p.customer_ids or (p.customer_id,)),
            "stripe_customer_id": p.stripe_customer_id,
            "event_name": p.event_name, "hour": rfc3339(ln.result.hour),
            "ledger": ln.result.ledger, "stripe": _num(ln.result.stripe),
            "difference": _num(ln.result.difference), "reason": why,
            "identifiers": identifiers if identifiers is not None else ln.identifiers}


def _add(a: LedgerHour | None, b: LedgerHour) -> LedgerHour:
    """Two local customers' ledgers of one hour, as one Stripe customer's."""
    if a is None:
        return LedgerHour(b.total, b.sent, b.pending, b.dead, b.last_sent_at, b.rows)
    return LedgerHour(a.total + b.total, a.sent + b.sent, a.pending + b.pending,
                      a.dead + b.dead, max(a.last_sent_at, b.last_sent_at), a.rows + b.rows)


def _meter_problem(name: str, candidates: Sequence[StripeMeterInfo]) -> str | None:
    return problem(f"event name {name!r}", candidates)


@dataclass(frozen=True, slots=True)
class ReconcileMetrics:
    """The Prometheus objects a run updates (declared in ``proxy.metrics``; no customer
    labels): ``discrepancies`` gauge{kind}, ``rate`` gauge, ``alerts`` counter,
    ``runs`` counter{outcome}, ``last_run`` gauge."""

    discrepancies: Any
    rate: Any
    alerts: Any
    runs: Any
    last_run: Any

    def publish(self, report: Report) -> None:
        for kind, n in report.counts.items():
            self.discrepancies.labels(kind).set(n)
        self.discrepancies.labels("resend").set(len(report.resent))
        self.discrepancies.labels("dead_letter").set(len(report.dead_letters))
        self.discrepancies.labels("operator").set(len(report.operator))
        self.rate.set(report.discrepancy_rate)
        if report.alert:
            self.alerts.inc()
        self.runs.labels("partial" if report.errors else "ok").inc()
        self.last_run.set(time.time())
