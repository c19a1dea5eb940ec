"""The flusher: the one owner of the usage sink; moves the outbox to Stripe exactly once.

Delivery guarantee, step by step (the numbers are repeated at each failure point below):
  1. Usage is committed to ``usage_minute`` by the group commit before it can be staged.
  2. Staging mints meter events with deterministic identifiers and marks the usage staged,
     in ONE transaction: a crash before it commits leaves the usage unstaged (staged next
     time); after it, the events exist and nothing can stage the same usage again.
  3. ``attempts`` is incremented and committed before a call is made, so every call's
     Idempotency-Key (identifier, attempt, in-cycle retry: three separate parts) is new and
     a crash never reuses a stale one. ``attempts`` is never reset (a dry-run sink, which
     makes no call, does not count one), so no row ever reuses a key.
  4. The call. A crash, timeout or dropped connection here leaves the row ``pending``: it
     is resent with the SAME identifier, and Stripe's identifier dedupe ("An event already
     exists with identifier ...") turns the resend into DUPLICATE = delivered.
  5. The outcome is committed (sent / pending with backoff / dead). A crash between 4 and 5
     is the case step 4 covers.
  6. Transient failures are never dead-lettered: they stay pending with capped exponential
     backoff and jitter, behind a circuit breaker, and show in flush lag and /readyz.
     Only permanent answers (unknown event name, no Stripe customer, outside Stripe's
     35-day window, validation) become dead letters, replayable after a fix.
  7. Step 4's dedupe holds only while Stripe remembers the identifier: a rolling 24 hours.
     So a row is resent only within ``RESEND_HORIZON`` (20 h) of the start of its first call
     that Stripe may have applied (``first_attempt_at``, set with step 3's count and cleared
     again for a row whose call was never made). Past it (a long outage with the breaker
     open, the proxy down a day) the row is dead-lettered as ``unconfirmed``, not resent
     blindly: the operator checks Stripe's meter event summaries (``meterproxy reconcile``)
     and replays it only if Stripe does not have it (that replay clears the horizon).
Calls for one (customer, event name) never overlap: each such key is served by exactly one
task at a time; after an *ambiguous* failure (timeout, dropped connection: the call may still
be running at Stripe) the key waits ``ambiguous_hold`` (the Stripe timeout) before its next
call, in this cycle or any later one; a key with a row attempted by a previous process (or
by the leader a fleet member took over from) waits the same after start-up (or takeover),
every row of it, so a newer row cannot overlap that process's last call; and shutdown
lets a flush in progress finish instead of cancelling its call. An account-wide token
bucket caps the call rate.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_result, stop_after_attempt

from proxy import metrics
from proxy.backoff import backoff
from proxy.pricing import TransformQuantity
from proxy.sinks.base import Kind, Outcome, OutEvent, Sink
from proxy.store.db import Store
from proxy.store.outbox import UNCONFIRMED, SqliteOutbox
from proxy.store.protocols import DueEvent, Outbox, UsageLedger
from proxy.store.usage import SqliteUsage
from proxy.tasks import wait_event

log = logging.getLogger("meterproxy.flusher")

STRIPE_WINDOW = 35 * 86400
WINDOW_MARGIN = 3600          # dead-letter an hour early rather than race the boundary
MAX_BACKOFF = 300.0
# Stripe dedupes a meter event identifier over a rolling 24 hours (docs/stripe-notes.md):
# resend a row whose first call may have been applied only this long after that call
# began, leaving 4 h for a slow last call, clock skew and Stripe's window being "at least" 24 h
RESEND_HORIZON = 20 * 3600.0


class TokenBucket:
    """Account-wide call rate (Stripe: 1000/s live, 25 ops/s in test mode)."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.capacity = burst if burst is not None else max(1.0, rate)
        self.tokens = self.capacity
        self.stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self) -> None:
        if self.rate <= 0:
            return
        async with self._lock:
            while True:
                now = time.monotonic()
                self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.tokens >= 1:
                    self.tokens -= 1
                    return
                await asyncio.sleep((1 - self.tokens) / self.rate)


class CircuitBreaker:
    """Opens after ``threshold`` consecutive transient failures; cool-down doubles to 5 min."""

    def __init__(self, threshold: int = 8, cooldown: float = 2.0) -> None:
        self.threshold = threshold
        self.base = cooldown
        self.cooldown = cooldown
        self.failures = 0
        self.open_until = 0.0

    @property
    def open(self) -> bool:
        return time.monotonic() < self.open_until

    def success(self) -> None:
        self.failures = 0
        self.cooldown = self.base
        metrics.circuit_open.set(0)

    def failure(self) -> None:
        self.failures += 1
        if self.failures >= self.threshold:
            self.open_until = time.monotonic() + self.cooldown
            log.warning("sink circuit open for %.1fs after %d transient failures",
                        self.cooldown, self.failures)
            self.cooldown = min(self.cooldown * 2, MAX_BACKOFF)
            self.failures = 0
            metrics.circuit_open.set(1)


def default_rate(api_key: str) -> float:
    if api_key.startswith(("sk_live", "rk_live")):
        return 500.0
    if api_key:
        return 20.0
    return 0.0


@dataclass
class FlushReport:
    staged: int = 0
    attempted: int = 0
    delivered: int = 0
    duplicates: int = 0
    retrying: int = 0
    dead: int = 0
    dry_run: int = 0          # logged by the dry-run sink: NOT delivered (outbox state dry_run)
    requeued_dry_run: int = 0  # dry-run rows handed to this (real) sink for delivery
    skipped_circuit_open: bool = False
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"staged": self.staged, "attempted": self.attempted,
                "delivered": self.delivered, "duplicates": self.duplicates,
                "retrying": self.retrying, "dead": self.dead, "dry_run": self.dry_run,
                "requeued_dry_run": self.requeued_dry_run,
                "circuit_open": self.skipped_circuit_open, "errors": self.errors[:20]}


class Flusher:
    def __init__(self, store: Store, sink: Sink,
                 event_names: Callable[[], Mapping[str, tuple[str, str | None]]], *,
                 rate: float, concurrency: int = 16, retries_per_cycle: int = 3,
                 retry_wait_max: float = 2.0, ambiguous_hold: float = 10.0,
                 seed: int | None = None,
                 transforms: Callable[[], Mapping[str, TransformQuantity]] | None = None,
                 outbox: Outbox | None = None, usage: UsageLedger | None = None,
                 leads: Callable[[], bool] | None = None,
                 errors: tuple[type[Exception], ...] = (sqlite3.Error,),
                 shared: Outbox | None = None,
                 resend_horizon: float = RESEND_HORIZON,
                 ) -> None:
        """``leads`` (fleet mode): whether this member leads the flusher duty now; when it
        does not, a flush only materializes (ships the journal). ``errors``: failures ``run``
        logs and retries next interval. ``shared``: the outbox for what any member may do
        whoever leads (fleet mode: unfenced): the gauges' and the flush lag's reads, and the
        operator's replay of a dead letter (a conditional update); default ``outbox``."""
        self.store = store
        self.outbox: Outbox = outbox if outbox is not None else SqliteOutbox(store)
        self.shared: Outbox = shared if shared is not None else self.outbox
        self.usage: UsageLedger = usage if usage is not None else SqliteUsage(store)
        self.sink = sink
        self.event_names = event_names
        self.transforms: Callable[[], Mapping[str, TransformQuantity]] = \
            transforms or (lambda: {})
        self.bucket = TokenBucket(rate)
        self.breaker = CircuitBreaker()
        self.concurrency = concurrency
        self.retries_per_cycle = retries_per_cycle
        self.retry_wait_max = retry_wait_max
        self.rng = random.Random(seed)
        self._lock = asyncio.Lock()
        self._inflight: set[tuple[str, str]] = set()
        self.last_success: float | None = None
        self.ambiguous_hold = ambiguous_hold
        self._held_until: dict[tuple[str, str], float] = {}   # key -> monotonic time
        self._started = time.monotonic()
        self._stop = asyncio.Event()
        self._dry_run_requeued = sink.name == "dry_run"   # a real sink takes them over once
        self.leads = leads
        self.errors = errors
        self.resend_horizon = resend_horizon
        self._begun = 0.0         # the ``at`` of this cycle's begin_attempt

    def took_over(self) -> None:
        """This member just became the fleet's flusher: rows the previous leader attempted
        wait ``ambiguous_hold`` from now (its last call may still be running at Stripe)."""
        self._started = time.monotonic()
        self._held_until.clear()
        self._dry_run_requeued = self.sink.name == "dry_run"

    # ---- one flush ------------------------------------------------------------------------

    async def flush(self, force: bool = False) -> FlushReport:
        """Stage, then deliver everything due (``force``: everything pending, ignoring the
        backoff schedule; the circuit breaker still applies). Flushes never overlap."""
        async with self._lock:
            report = FlushReport()
            if self.leads is not None and not self.leads():
                await self.usage.materialize()      # another member flushes the fleet
                return report
            if not self._dry_run_requeued:
                report.requeued_dry_run = await self.requeue_dry_run()
            # 1: every committed usage row is in the ledger tables before staging reads them
            await self.usage.materialize()
            # 2: staging is one transaction on the one write connection
            staged = await self.outbox.stage(self.event_names(), transforms=self.transforms())
            report.staged = len(staged)
            await self._deliver(report, force)
            await self.refresh_gauges()
            if report.retrying == 0 and not report.skipped_circuit_open:
                self.last_success = time.time()
                metrics.last_flush_success.set(self.last_success)
            return report

    async def _deliver(self, report: FlushReport, force: bool) -> None:
        now = time.time()
        due = [_as_row(d) for d in
               await self.outbox.due(float("inf") if force else now)]
        if not due:
            return
        if self.breaker.open:
            report.skipped_circuit_open = True
            report.retrying = len(due)
            return
        ready: list[dict[str, Any]] = []
        mono = time.monotonic()
        # after start-up or a takeover, a key with a row attempted before may have a call
        # still running at Stripe (a previous process's, or the deposed leader's): the whole
        # key waits, its rows attempted before and any newer row alike
        attempted = {(r["stripe_customer_id"], r["event_name"]) for r in due
                     if r["attempts"] > 0} \
            if mono < self._started + self.ambiguous_hold else set()
        for row in due:
            dead = self._precheck(row, now)
            key = (row["stripe_customer_id"], row["event_name"])
            if dead is not None:
                await self._mark(row, Outcome(Kind.DEAD, dead), report)
            elif key in attempted or self._held_until.get(key, 0) > mono:
                # a call for this key may still be running at Stripe (ours, or a previous
                # process's): leave it for a later cycle rather than overlap it
                report.retrying += 1
            else:
                ready.append(row)
        if not ready:
            return
        # 3: attempts committed before any call, so Idempotency-Keys are never reused (a
        # dry-run sink makes no call: it counts no attempt, and uses no key)
        if self.sink.name != "dry_run":
            self._begun = now
            await self.outbox.begin_attempt([r["id"] for r in ready], at=now)
        events = [self._event(r) for r in ready]
        rows = {r["id"]: r for r in ready}
        if self.sink.max_batch > 1:
            await self._send_batches(events, rows, report)
        else:
            await self._send_per_key(events, rows, report)

    def _leading(self) -> bool:
        """Whether this process may call Stripe now: always on its own; in a fleet, while
        it leads the flusher (False from the moment a fenced write found it deposed)."""
        return self.leads is None or self.leads()

    def _precheck(self, row: Mapping[str, Any], now: float) -> str | None:
        first = row["first_attempt_at"]
        if row["attempts"] > 0 and first is not None and now - first > self.resend_horizon:
            # 7: Stripe may have applied an earlier call and forgotten its identifier by now
            return (f"{UNCONFIRMED}: first sent {(now - first) / 3600:.1f} h ago with no"
                    " confirmation; Stripe dedupes identifiers for 24 h only, so a resend"
                    " could count it twice: check Stripe's summaries (meterproxy reconcile)"
                    " and replay only if it is missing")
        if not row["stripe_customer_id"]:
            return f"customer {row['customer_id']!r} has no stripe_customer_id"
        if row["timestamp"] < now - STRIPE_WINDOW + WINDOW_MARGIN:
            return "usage is older than Stripe's 35-day meter event window"
        return None

    @staticmethod
    def _event(row: Mapping[str, Any]) -> OutEvent:
        return OutEvent(outbox_id=row["id"], identifier=row["identifier"],
                        event_name=row["event_name"],
                        stripe_customer_id=row["stripe_customer_id"], value=row["value"],
                        timestamp=row["timestamp"], meter=row["meter"],
                        attempt=row["attempts"] + 1)

    async def _send_per_key(self, events: list[OutEvent], rows: Mapping[int, Any],
                            report: FlushReport) -> None:
        by_key: dict[tuple[str, str], list[OutEvent]] = defaultdict(list)
        for ev in events:
            by_key[(ev.stripe_customer_id, ev.event_name)].append(ev)
        gate = asyncio.Semaphore(self.concurrency)

        async def run_key(key: tuple[str, str], evs: list[OutEvent]) -> None:
            async with gate:
                assert key not in self._inflight, "two calls for one customer and meter"
                self._inflight.add(key)
                try:
                    for ev in evs:
                        if not self._leading():
                            # deposed (another member flushes): no new call; the rows stay
                            # pending, attempted, for the new leader to resend after its hold
                            return
                        if self.breaker.open:
                            report.retrying += 1
                            await self._mark(rows[ev.outbox_id],
                                             Outcome(Kind.RETRY, "circuit open"), report,
                                             count=False, called=False)
                            continue
                        outcome = await self._call([ev])
                        await self._mark(rows[ev.outbox_id], outcome[0], report)
                        if outcome[0].kind is Kind.RETRY:
                            # keep this key's later events behind the one that failed
                            for rest in evs[evs.index(ev) + 1:]:
                                await self._mark(rows[rest.outbox_id],
                                           Outcome(Kind.RETRY, "behind a failed event"),
                                           report, count=False, called=False)
                                report.retrying += 1
                            return
                finally:
                    self._inflight.discard(key)

        # every key's task ends before the flush does (a deposed leader's first refused
        # write must not leave the others calling in the background); then the first failure
        done = await asyncio.gather(*(run_key(k, v) for k, v in by_key.items()),
                                    return_exceptions=True)
        for got in done:
            if isinstance(got, BaseException):
                raise got

    async def _send_batches(self, events: list[OutEvent], rows: Mapping[int, Any],
                            report: FlushReport) -> None:
        n = self.sink.max_batch
        for i in range(0, len(events), n):
            batch = events[i:i + n]
            if not self._leading():
                return          # deposed: the rows stay pending for the new leader
            if self.breaker.open:
                for ev in events[i:]:
                    await self._mark(rows[ev.outbox_id], Outcome(Kind.RETRY, "circuit open"),
                                     report, called=False)
                return
            outcomes = await self._call(batch)
            for ev, out in zip(batch, outcomes, strict=True):
                await self._mark(rows[ev.outbox_id], out, report)

    async def _call(self, batch: Sequence[OutEvent]) -> list[Outcome]:
        """One logical send with a few quick in-cycle retries (tenacity)."""

        def wait(state: RetryCallState) -> float:
            # 0.05 s x 2^(n-1) plus up to 1 s of jitter, at most retry_wait_max (tenacity's
            # wait_exponential_jitter, whose initial= newer releases deprecate)
            base = min(0.05 * 2.0 ** (state.attempt_number - 1) + self.rng.uniform(0, 1),
                       self.retry_wait_max)
            last = state.outcome.result() if state.outcome is not None else None
            hinted = max((o.retry_after or 0.0) for o in last) if last else 0.0
            return float(max(base, min(hinted, self.retry_wait_max)))

        def transient(result: list[Outcome]) -> bool:
            # an ambiguous failure is not retried in this cycle: its call may still be running
            return any(o.kind is Kind.RETRY for o in result) and \
                not any(o.ambiguous for o in result)

        sub = 0
        result: list[Outcome] = []
        async for attempt in AsyncRetrying(stop=stop_after_attempt(self.retries_per_cycle),
                                           wait=wait, retry=retry_if_result(transient),
                                           retry_error_callback=lambda s: s.outcome.result()
                                           if s.outcome else [], reraise=False):
            with attempt:
                if sub:
                    reason = result[0].reason[:40] if result else "?"
                    metrics.stripe_retries_total.labels(
                        "lock_timeout" if result and result[0].lock_timeout else "transient").inc()
                    log.debug("retrying %s: %s", batch[0].identifier, reason)
                await self.bucket.take()
                # 4: the call itself; any failure here leaves the row pending for a resend
                evs = [_with_sub(ev, sub) for ev in batch]
                try:
                    result = await self.sink.send(evs)
                except asyncio.CancelledError:
                    self._hold(batch)      # cancelled mid-call: Stripe may still be on it
                    raise
                sub += 1
                if any(o.ambiguous for o in result):
                    self._hold(batch)
                for o in result:
                    if o.kind is not Kind.DRY_RUN:     # no call was made
                        metrics.stripe_requests_total.labels(o.kind.value).inc()
                if any(o.kind is Kind.RETRY for o in result):
                    if not any(o.lock_timeout for o in result):
                        self.breaker.failure()
                else:
                    self.breaker.success()
            if not attempt.retry_state.outcome or attempt.retry_state.outcome.failed:
                continue
            attempt.retry_state.set_result(result)
        return result

    def _hold(self, batch: Sequence[OutEvent]) -> None:
        until = time.monotonic() + self.ambiguous_hold
        for ev in batch:
            self._held_until[(ev.stripe_customer_id, ev.event_name)] = until

    async def _mark(self, row: Mapping[str, Any], out: Outcome, report: FlushReport,
                    count: bool = True, called: bool = True) -> None:
        """5: the outcome is committed; a crash before this resends (see 4). ``called``
        False: no call was made for the row this cycle (7: its first-call time, if this
        cycle set it, is cleared)."""
        now = time.time()
        if count:
            report.attempted += 1
        if out.kind in (Kind.DELIVERED, Kind.DUPLICATE):
            if out.kind is Kind.DUPLICATE:
                report.duplicates += 1
            report.delivered += 1
            await self.outbox.mark_sent(row["id"], sink=self.sink.name, outcome=out.kind.value,
                                        at=int(now))
        elif out.kind is Kind.DRY_RUN:
            # logged, not sent: its own state, never 'sent'; attempts unchanged (no call was
            # made and none counted, so a real sink later goes on past every key it used)
            report.dry_run += 1
            await self.outbox.mark_dry_run(row["id"], sink=self.sink.name, outcome=out.kind.value)
        elif out.kind is Kind.RETRY:
            if count:
                report.retrying += 1
            # 6: transient failures stay pending; never dead-lettered
            # attempts counts calls made before this one: the n-th failure waits about
            # 2^(n-1) x 0.5 s, spread over [cap/2, cap) once it reaches the cap
            delay = max(backoff(row["attempts"] + 1, first=0.5, cap=MAX_BACKOFF, rng=self.rng,
                                spread_at_cap=True),
                        out.retry_after or 0.0, self.ambiguous_hold if out.ambiguous else 0.0)
            await self.outbox.retry_at(row["id"], now + delay, out.reason,
                                       not_called=None if called else self._begun)
        else:
            report.dead += 1
            metrics.dead_letters_total.labels(_reason_kind(out.reason)).inc()
            log.error("dead letter %s (%s, %s, %d units): %s", row["identifier"],
                      row["customer_id"], row["event_name"], row["value"], out.reason)
            await self.outbox.mark_dead(row["id"], reason=out.reason, sink=self.sink.name,
                                        at=int(now))
            report.errors.append(f"{row['identifier']}: {out.reason}")

    async def requeue_dry_run(self) -> int:
        """Make the events an earlier dry-run sink only logged pending again, so this (real)
        sink delivers them with their original identifiers. ``attempts`` still counts every
        real call made before (a dry run counts none), so no Idempotency-Key is reused."""
        n = await self.outbox.requeue_dry_run()
        self._dry_run_requeued = True
        if n:
            log.warning("%d meter event(s) only logged by an earlier dry-run sink are now sent"
                        " to %s", n, self.sink.name)
        return n

    # ---- dead letters and gauges --------------------------------------------------------

    async def replay(self, outbox_id: int, restamp: bool = False) -> bool:
        now = time.time()
        ok = await self.shared.replay(outbox_id, int(now) if restamp else None, now)
        await self.refresh_gauges()
        return ok

    async def refresh_gauges(self) -> None:
        counts = await self.shared.counts()
        metrics.dead_letters.set(counts.dead)
        metrics.outbox_pending.set(counts.pending)
        metrics.outbox_dry_run.set(counts.dry_run)
        metrics.flush_lag_seconds.set(await self.lag())

    async def lag(self) -> float:
        """Age of the oldest usage not yet delivered (staged or not)."""
        a = await self.shared.oldest_pending_created()
        b = await self.usage.oldest_unstaged_minute()
        oldest = min(x for x in (a, b, time.time()) if x is not None)
        return max(0.0, time.time() - oldest)

    async def run(self, interval: float) -> None:
        """Flush every ``interval`` until ``stop()``; a flush in progress is never cancelled
        by stopping (its calls finish or time out), so the final flush cannot overlap it."""
        while not self._stop.is_set():
            if await wait_event(self._stop, interval):
                return
            try:
                rep = await self.flush()
                if rep.staged or rep.attempted:
                    log.info("flush: %s", rep.to_json())
            except self.errors as exc:
                log.error("flush failed (storage): %s; will retry next interval", exc)

    def stop(self) -> None:
        self._stop.set()

    async def close(self) -> None:
        await self.sink.close()


def _with_sub(ev: OutEvent, sub: int) -> OutEvent:
    """The event for in-cycle retry ``sub`` of its attempt: a part of its own in the key
    (``attempt * 100 + sub`` once made attempt 1's retry 1 and attempt 101 one key)."""
    if sub == 0:
        return ev
    return OutEvent(ev.outbox_id, ev.identifier, ev.event_name, ev.stripe_customer_id, ev.value,
                    ev.timestamp, ev.meter, ev.attempt, sub)


def _reason_kind(reason: str) -> str:
    r = reason.lower()
    if r.startswith(UNCONFIRMED):
        return "unconfirmed"
    if "stripe_customer_id" in r or "customer" in r:
        return "customer_mapping"
    if "35-day" in r or "timestamp" in r:
        return "timestamp_window"
    if "no active meter" in r or "event name" in r:
        return "unknown_event_name"
    return "invalid"


def _as_row(d: DueEvent) -> dict[str, Any]:
    return {"id": d.id, "identifier": d.identifier, "customer_id": d.customer_id,
            "meter": d.meter, "event_name": d.event_name, "value": d.value,
            "timestamp": d.timestamp, "attempts": d.attempts,
            "stripe_customer_id": d.stripe_customer_id, "first_attempt_at": d.first_attempt_at}
