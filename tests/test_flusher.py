"""The flusher against the Stripe double: never two calls at once for one customer and meter,
even when a call times out while Stripe is still processing it."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from proxy.flusher import Flusher
from proxy.store.db import Store
from proxy.stripe.client import StripeClient
from proxy.stripe.meter_events import MeterEventsSink
from tests.helpers import wait_until
from tests.stripe_double.fixture import TEST_API_KEY, RunningDouble

Q = 1_000_000


def _usage(store: Store, customer: str, units: int) -> None:
    def tx(c: object) -> None:
        import sqlite3
        assert isinstance(c, sqlite3.Connection)
        c.execute("INSERT OR IGNORE INTO customers(id, stripe_customer_id, created_at, updated_at)"
                  " VALUES (?, ?, 0, 0)", (customer, f"cus_{customer}"))
        c.execute("INSERT INTO usage_minute(customer_id, key_id, meter, minute, rules_version,"
                  " quantity, requests, billable) VALUES (?, 'k', 'api_calls', ?, 'v', ?, 1, ?)",
                  (customer, int(time.time()) // 60 * 60, units * Q, units * Q))
    store.execute_write(tx)


async def test_timeout_while_stripe_still_processes_never_overlaps(
        tmp_path: Path, stripe_double_factory: Callable[..., Awaitable[RunningDouble]]) -> None:
    double = await stripe_double_factory(processing_delay=1.5)
    double.state.add_meter("api_calls")
    store = Store.open(tmp_path / "f.db")
    conn = StripeClient(TEST_API_KEY, api_base=double.url, meter_events_base=double.url,
                            timeout=1.0)
    sink = MeterEventsSink(conn)
    flusher = Flusher(store, sink, lambda: {"api_calls": ("api_calls", None)}, rate=0,
                      ambiguous_hold=2.0)
    try:
        _usage(store, "a", 3)
        first = await flusher.flush(force=True)       # times out after 1 s; Stripe finishes at 1.5
        assert first.retrying == 1 and first.delivered == 0
        double.state.processing_delay = 0.0           # Stripe recovers
        again = await flusher.flush(force=True)       # the key is held: no second call
        assert again.attempted == 0 and again.retrying == 1
        rep = await wait_until(lambda: flusher.flush(force=True), ok=lambda r: r.delivered,
                               interval=0.05, what="the resend after the hold")
        assert rep.delivered == 1 and rep.duplicates == 1   # Stripe had it: the resend dedupes
        assert double.state.concurrency_violations == []
        assert double.state.totals("cus_a", "api_calls") == 3
    finally:
        await flusher.close()
        store.close()


async def test_a_transient_failure_is_retried_within_the_cycle(
        tmp_path: Path, stripe_double_factory: Callable[..., Awaitable[RunningDouble]]) -> None:
    """A 500 (nothing stored at Stripe) is retried in the same flush with a new
    Idempotency-Key, after the in-cycle wait (exponential, with jitter)."""
    double = await stripe_double_factory()
    double.state.add_meter("api_calls")
    double.state.faults.script("meter_events", ["500"])
    store = Store.open(tmp_path / "f.db")
    conn = StripeClient(TEST_API_KEY, api_base=double.url, meter_events_base=double.url,
                        timeout=5.0)
    flusher = Flusher(store, MeterEventsSink(conn), lambda: {"api_calls": ("api_calls", None)},
                      rate=0, seed=1, retry_wait_max=0.2)
    try:
        _usage(store, "a", 2)
        rep = await flusher.flush(force=True)
        assert rep.delivered == 1 and rep.retrying == 0, rep.to_json()
        assert double.state.totals("cus_a", "api_calls") == 2
        keys = [r.idempotency_key for r in double.state.call_log
                if r.path == "/v1/billing/meter_events"]
        assert len(keys) == 2 and len(set(keys)) == 2
    finally:
        await flusher.close()
        store.close()


def _restore(db: Path, backup: Path) -> None:
    for p in db.parent.glob(db.name + "*"):
        p.unlink()
    backup.rename(db)


async def test_usage_after_a_restore_from_backup_is_not_taken_for_a_duplicate(
        tmp_path: Path, stripe_double_factory: Callable[..., Awaitable[RunningDouble]]) -> None:
    """docs/resources.md's recovery: "restore the file (or repair it) and restart the
    proxy". Events sent after the backup was taken are in Stripe, not in the restored file;
    usage recorded after the restore must still reach Stripe."""
    import sqlite3

    double = await stripe_double_factory()
    double.state.add_meter("api_calls")
    db, backup = tmp_path / "f.db", tmp_path / "backup.db"
    names = {"api_calls": ("api_calls", None)}

    def flusher(store: Store) -> Flusher:
        conn = StripeClient(TEST_API_KEY, api_base=double.url, meter_events_base=double.url,
                            timeout=5.0)
        return Flusher(store, MeterEventsSink(conn), lambda: names, rate=0)

    store = Store.open(db)
    src, dst = sqlite3.connect(db), sqlite3.connect(backup)
    src.backup(dst)                                 # the backup: before any usage
    src.close()
    dst.close()
    f = flusher(store)
    try:
        _usage(store, "a", 3)
        assert (await f.flush(force=True)).delivered == 1
    finally:
        await f.close()
        store.close()
    _restore(db, backup)                            # the file is lost; restored from backup
    store = Store.open(db)
    f = flusher(store)
    try:
        _usage(store, "a", 2)                       # usage after the restore
        assert (await f.flush(force=True)).delivered == 1
    finally:
        await f.close()
        store.close()
    assert double.state.totals("cus_a", "api_calls") == 5


def _keys(double: RunningDouble) -> list[str]:
    return [r.idempotency_key or "" for r in double.state.call_log
            if r.path == "/v1/billing/meter_events"]


async def test_an_in_cycle_retry_key_is_never_a_later_attempts_key(
        tmp_path: Path, stripe_double_factory: Callable[..., Awaitable[RunningDouble]]) -> None:
    """Attempt 1's in-cycle retry and attempt 101's first call once shared a key (suffix
    attempt x 100 + retry: both 101), so attempt 101, well inside Stripe's 24 h key window,
    got attempt 1's stored 500 replayed instead of being sent."""
    double = await stripe_double_factory()
    double.state.add_meter("api_calls")
    double.state.faults.script("meter_events", ["500", "500"])
    store = Store.open(tmp_path / "f.db")
    conn = StripeClient(TEST_API_KEY, api_base=double.url, meter_events_base=double.url,
                        timeout=5.0)
    flusher = Flusher(store, MeterEventsSink(conn), lambda: {"api_calls": ("api_calls", None)},
                      rate=0, seed=1, retries_per_cycle=2, retry_wait_max=0.05,
                      ambiguous_hold=0.0)
    try:
        _usage(store, "a", 2)
        rep = await flusher.flush(force=True)        # attempt 1: a 500, its retry a 500
        assert rep.delivered == 0 and rep.retrying == 1, rep.to_json()
        # 99 more cycles of failures later (minutes at a 5-minute backoff cap)
        store.execute_write(lambda c: c.execute("UPDATE outbox SET attempts = 100"))
        rep = await flusher.flush(force=True)        # attempt 101
        assert rep.delivered == 1, rep.to_json()
        assert double.state.totals("cus_a", "api_calls") == 2
        keys = _keys(double)
        assert len(keys) == 3 and len(set(keys)) == 3, keys
    finally:
        await flusher.close()
        store.close()


async def test_a_dry_run_never_makes_a_real_sink_reuse_a_key(
        tmp_path: Path, stripe_double_factory: Callable[..., Awaitable[RunningDouble]]) -> None:
    """A row a real sink attempted, then logged by a dry-run sink, then handed back to a
    real sink: its next call has a key of its own (the dry run once reset ``attempts`` to 0,
    so the next call reused attempt 1's key and got its stored 500)."""
    from proxy.sinks.dry_run import DryRunSink

    double = await stripe_double_factory()
    double.state.add_meter("api_calls")
    double.state.faults.script("meter_events", ["500"])
    store = Store.open(tmp_path / "f.db")
    names = {"api_calls": ("api_calls", None)}

    def real() -> Flusher:
        conn = StripeClient(TEST_API_KEY, api_base=double.url, meter_events_base=double.url,
                            timeout=5.0)
        return Flusher(store, MeterEventsSink(conn), lambda: names, rate=0, seed=1,
                       retries_per_cycle=1, ambiguous_hold=0.0)

    try:
        first = real()
        _usage(store, "a", 2)
        assert (await first.flush(force=True)).retrying == 1     # attempt 1: a 500
        await first.close()
        dry = Flusher(store, DryRunSink(), lambda: names, rate=0, ambiguous_hold=0.0)
        assert (await dry.flush(force=True)).dry_run == 1
        second = real()
        rep = await second.flush(force=True)
        await second.close()
        assert rep.delivered == 1, rep.to_json()
        keys = _keys(double)
        assert len(keys) == 2 and len(set(keys)) == 2, keys
        assert double.state.totals("cus_a", "api_calls") == 2
    finally:
        store.close()


def _one_second_flusher(tmp_path: Path, double: RunningDouble) -> tuple[Store, Flusher]:
    """A store and a flusher to ``double`` (meter api_calls) whose calls time out after 1 s."""
    double.state.add_meter("api_calls")
    store = Store.open(tmp_path / "f.db")
    conn = StripeClient(TEST_API_KEY, api_base=double.url, meter_events_base=double.url,
                        timeout=1.0)
    return store, Flusher(store, MeterEventsSink(conn),
                          lambda: {"api_calls": ("api_calls", None)}, rate=0,
                          ambiguous_hold=0.0)


class _Later:
    """``proxy.flusher``'s clock, ``ahead`` seconds in the future (a day-long outage)."""

    def __init__(self, ahead: float) -> None:
        self.ahead = ahead

    def time(self) -> float:
        return time.time() + self.ahead

    def monotonic(self) -> float:
        return time.monotonic() + self.ahead


async def test_horizon_dates_an_earlier_versions_call_early_and_never_an_uncalled_row(
        tmp_path: Path, stripe_double_factory: Callable[..., Awaitable[RunningDouble]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two rows pending a day: one a version before the resend horizon called (attempts 2,
    no first_attempt_at: a rolling upgrade's old leader) is dated from its creation and
    parked, never resent blind; one never called (an outage: every cycle it waited behind
    a failure, each attempt undone) is sent when Stripe answers again."""
    import proxy.flusher as flusher_mod

    double = await stripe_double_factory()
    store, flusher = _one_second_flusher(tmp_path, double)
    try:
        _usage(store, "old", 3)
        _usage(store, "new", 4)
        await flusher.outbox.stage(flusher.event_names(), transforms=flusher.transforms())
        old_id, new_id = (r for (r,) in store.conn.execute(
            "SELECT id FROM outbox ORDER BY customer_id DESC"))
        store.conn.execute("UPDATE outbox SET attempts = 2 WHERE id = ?", (old_id,))
        for cycle in range(3):          # an outage: begun, never called, undone, each cycle
            at = time.time() + cycle
            await flusher.shared.begin_attempt([new_id], at=at)
            await flusher.shared.retry_at(new_id, 0, "behind a failed event", not_called=at)
        day = 25 * 3600
        double.state.advance(day)
        monkeypatch.setattr(flusher_mod, "time", _Later(day))
        rep = await flusher.flush(force=True)
        assert (rep.dead, rep.delivered) == (1, 1), rep.to_json()
        assert [r.id for r in await flusher.shared.rows(status="dead")] == [old_id]
        assert double.state.totals("cus_old", "api_calls") == 0        # parked, not resent
        assert double.state.totals("cus_new", "api_calls") == 4
    finally:
        await flusher.close()
        store.close()


async def test_an_unconfirmed_send_is_not_resent_after_stripes_identifier_window(
        tmp_path: Path, stripe_double_factory: Callable[..., Awaitable[RunningDouble]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A call that timed out may have been applied. Stripe dedupes identifiers over 24 h
    only, so a resend a day later (an outage, the proxy down a day) would count it twice:
    past the resend horizon (20 h after its first call) the row is dead-lettered for the
    operator instead, and a replay of that dead letter (the operator checked Stripe) sends."""
    import proxy.flusher as flusher_mod

    double = await stripe_double_factory(processing_delay=1.5)
    store, flusher = _one_second_flusher(tmp_path, double)
    try:
        _usage(store, "a", 3)
        first = await flusher.flush(force=True)        # times out; Stripe applies it
        assert first.retrying == 1 and first.delivered == 0
        await wait_until(lambda: double.state.totals("cus_a", "api_calls") == 3,
                         what="Stripe applying the timed-out call")
        (first_at,) = store.conn.execute("SELECT first_attempt_at FROM outbox").fetchone()
        assert first_at is not None and abs(first_at - time.time()) < 60
        double.state.processing_delay = 0.0
        day = 25 * 3600
        double.state.advance(day)                      # Stripe has forgotten the identifier
        monkeypatch.setattr(flusher_mod, "time", _Later(day))
        rep = await flusher.flush(force=True)
        assert rep.dead == 1 and rep.attempted == 1 and rep.delivered == 0, rep.to_json()
        assert "24 h" in rep.errors[0] and "reconcile" in rep.errors[0]
        assert double.state.totals("cus_a", "api_calls") == 3      # never sent twice
        (oid,) = [r.id for r in await flusher.shared.rows(status="dead")]
        assert await flusher.replay(oid)               # the operator found it missing: send
        assert (await flusher.flush(force=True)).delivered == 1
        assert double.state.identifier_count(
            store.conn.execute("SELECT identifier FROM outbox").fetchone()[0]) == 2
        assert double.state.totals("cus_a", "api_calls") == 6      # (it was not missing)
    finally:
        await flusher.close()
        store.close()
