"""Credit lifecycle (issue 12): settlement against the expiry state at admission (finding
10) and threshold alerts once per billing period (finding 5). Pure book/ledger functions,
and the watch on a real SQLite store."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.credits.book import CreditBook
from proxy.credits.ledger import (
    Entry,
    GrantState,
    burn_order,
    clawback,
    clawback_credits,
    settle_cost,
)
from proxy.credits.service import CreditService, load_book
from proxy.credits.thresholds import DEPLETED, ThresholdWatch, alert_period, crossed
from proxy.periods import period_bounds
from proxy.store.alerts import SqliteAlerts
from proxy.store.db import Store, _statements, connect
from proxy.store.keys import upsert_customer
from proxy.store.ledger import load as ledger_load
from proxy.store.schema import MIGRATIONS

Q = 1_000_000

# ---------------------------------------------------------------- finding 10


def _book(*grants: GrantState) -> CreditBook:
    b = CreditBook()
    b.load(grants, [])
    return b


def test_admitted_before_expiry_settled_after_is_covered() -> None:
    b = _book(GrantState("g", "c", 10 * Q, expires_at=1000))
    hold = b.try_hold("c", 4 * Q, 999, block=True, debt_ok=True)
    assert hold is not None and hold.amount == 4 * Q
    assert b.due_expiries(1000.5) == []            # deferred: a request admitted before
    assert b.next_expiry(1000.5) == 1001.5         # checked again shortly, no busy loop
    assert b.settle(hold, [4 * Q], 1001) == [([Entry("g", "debit", 4 * Q)], 0)]
    assert b.due_expiries(1001) == [Entry("g", "expire", 6 * Q)]


def test_admitted_at_expiry_is_refused_and_expiry_not_deferred() -> None:
    b = _book(GrantState("g", "c", 10 * Q, expires_at=1000))
    assert b.try_hold("c", 1, 1000, block=True) is None
    hold = b.try_hold("c", 0, 1000, block=False)
    assert hold is not None
    assert b.due_expiries(1000) == [Entry("g", "expire", 10 * Q)]
    assert b.settle(hold, [3 * Q], 1001) == [([], 3 * Q)]


def test_bill_customer_settled_after_expiry_uses_admission_state() -> None:
    b = _book(GrantState("a", "c", 2 * Q, expires_at=1000), GrantState("b", "c", 1 * Q))
    hold = b.try_hold("c", 0, 999, block=False)
    assert hold is not None
    # 'a' (earliest expiry) burns first even though it expired before settlement
    assert b.settle(hold, [4 * Q], 1500) == [([Entry("a", "debit", 2 * Q),
                                                Entry("b", "debit", 1 * Q)], 1 * Q)]


grant_st = st.builds(
    lambda i, amt, exp, prio: GrantState(f"g{i}", "c", amt, prio, exp),
    st.integers(0, 10**6), st.integers(1, 10**9),
    st.one_of(st.none(), st.integers(0, 2000)), st.integers(0, 100))


@given(st.lists(grant_st, min_size=1, max_size=6, unique_by=lambda g: g.id),
       st.integers(0, 2000), st.integers(0, 2000), st.integers(0, 5 * 10**9), st.booleans())
def test_settlement_covers_what_was_live_at_admission(grants: list[GrantState], admitted: int,
                                                      later: int, cost: int,
                                                      debt_ok: bool) -> None:
    live_then = sum(g.amount for g in grants if g.expires_at is None or admitted < g.expires_at)
    b = _book(*grants)
    hold = b.try_hold("c", 0, admitted, block=False, debt_ok=debt_ok)
    assert hold is not None
    [(entries, uncovered)] = b.settle(hold, [cost], admitted + later)
    debited = sum(e.amount for e in entries if e.kind == "debit")
    assert debited == min(cost, live_then)
    assert uncovered == (0 if debt_ok else cost - debited)
    debt = sum(e.amount for e in entries if e.kind == "debt")
    assert debt == (cost - debited if debt_ok else 0)
    assert b.debt("c") == debt
    assert all(g.remaining >= 0 for g in b.all_grants())


@given(st.lists(grant_st, min_size=1, max_size=6, unique_by=lambda g: g.id),
       st.integers(0, 2000), st.integers(0, 5 * 10**9))
def test_settle_cost_matches_plain_allocation_at_the_same_instant(
        grants: list[GrantState], at: int, cost: int) -> None:
    ordered = burn_order(grants)
    entries, uncovered = settle_cost(ordered, cost, at, debt_ok=False)
    assert sum(e.amount for e in entries) + uncovered == cost
    assert all(e.kind == "debit" for e in entries)


# ---------------------------------------------------------------- finding 5

T = (Decimal("0.5"), Decimal("0.75"), Decimal("0.9"))
NOW = 1_780_000_000            # inside a calendar month; anchor None = the 1st, UTC


def test_alert_period_is_the_billing_period_and_depletion_adds_the_grant_count() -> None:
    assert alert_period("0.5", 1_777_593_600, 3) == "1777593600"
    assert alert_period(DEPLETED, 1_777_593_600, 3) == "1777593600:g3"


def test_crossed_at_exact_boundaries() -> None:
    assert crossed(100 * Q, 50 * Q - 1, T) == []
    assert crossed(100 * Q, 50 * Q, T) == ["0.5"]
    assert crossed(100 * Q, 90 * Q, T) == ["0.5", "0.75", "0.9"]
    assert crossed(100 * Q, 100 * Q - 1, T) == ["0.5", "0.75", "0.9"]
    assert crossed(100 * Q, 100 * Q, T) == ["0.5", "0.75", "0.9", DEPLETED]


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[CreditService, ThresholdWatch]]:
    store = Store.open(tmp_path / "m.db")
    store.execute_write(lambda c: upsert_customer(c, "c", None, "block", "active"))
    book = CreditBook()
    svc = CreditService(store, book)
    yield svc, await ThresholdWatch.open(SqliteAlerts(store), book, T)
    store.close()


def _spend(svc: CreditService, amount: int, now: float) -> None:
    hold = svc.book.try_hold("c", 0, now, block=False)
    assert hold is not None
    svc.book.settle(hold, [amount], now)


def _fired(w: ThresholdWatch, now: float, anchor: int | None = None) -> list[str]:
    return [a["threshold"] for a in w.check("c", now, anchor)]


async def test_top_up_after_depletion_does_not_refire_thresholds(
        env: tuple[CreditService, ThresholdWatch]) -> None:
    svc, w = env
    await svc.grant("c", "100")
    _spend(svc, 100 * Q, NOW)
    assert _fired(w, NOW) == ["0.5", "0.75", "0.9", DEPLETED]
    await svc.grant("c", "10")
    _spend(svc, 1 * Q, NOW + 1)
    assert _fired(w, NOW + 1) == []                 # 101/110: nothing new this period
    _spend(svc, 9 * Q, NOW + 2)
    assert _fired(w, NOW + 2) == [DEPLETED]         # the top-up ran dry: told once more
    assert _fired(w, NOW + 3) == []


async def test_an_alert_write_refused_by_a_lock_is_logged_and_fired_at_the_next_check(
        env: tuple[CreditService, ThresholdWatch], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """``check`` runs inside settlement: an alert write that finds the database locked must
    not escape it. Nothing is fired (nor marked fired), the reason is logged with the
    customer, and the next check fires the same alerts once."""
    from tests.test_storage_resilience import foreign_write_lock

    svc, w = env
    await svc.grant("c", "100")
    _spend(svc, 60 * Q, NOW)
    with caplog.at_level(logging.WARNING, "meterproxy.credits"), \
            foreign_write_lock(tmp_path / "m.db"):
        assert _fired(w, NOW) == []
    [rec] = [r for r in caplog.records if "credit alert" in r.getMessage()]
    assert "for c not written" in rec.getMessage() and "lock" in rec.getMessage(), \
        rec.getMessage()
    assert _fired(w, NOW + 1) == ["0.5"]
    assert _fired(w, NOW + 2) == []


async def test_old_grant_expiry_does_not_refire(env: tuple[CreditService, ThresholdWatch]) -> None:
    svc, w = env
    await svc.grant("c", "100", expires_at=NOW + 100)
    await svc.grant("c", "100")
    _spend(svc, 180 * Q, NOW)                        # the expiring grant burns first
    assert _fired(w, NOW) == ["0.5", "0.75", "0.9"]
    assert await svc.expire_due(NOW + 100) == 0            # nothing left on it to expire
    assert _fired(w, NOW + 100) == []                # live: 80/100 consumed, already told


async def test_next_billing_period_rearms(env: tuple[CreditService, ThresholdWatch]) -> None:
    svc, w = env
    anchor = NOW - 10 * 86400
    await svc.grant("c", "100")
    _spend(svc, 60 * Q, NOW)
    assert _fired(w, NOW, anchor) == ["0.5"]
    assert _fired(w, NOW + 86400, anchor) == []
    # the anchored period ends 1 month after the anchor's day: from then on it fires again
    end = period_bounds(anchor, NOW)[1]
    assert _fired(w, end - 1, anchor) == []
    assert _fired(w, end, anchor) == ["0.5"]


# ---------------------------------------------------------------- finding 6 (pure part)

def test_clawback_layers_unused_then_expired_then_spent() -> None:
    g = GrantState("g", "c", 100 * Q, remaining=70 * Q)
    assert clawback(g, 50 * Q, 0, 30 * Q) == [Entry("g", "refund", 50 * Q)]
    g = GrantState("g", "c", 100 * Q, remaining=20 * Q)
    assert clawback(g, 50 * Q, 0, 80 * Q) == [Entry("g", "refund", 20 * Q),
                                              Entry("", "debt", 30 * Q)]
    g = GrantState("g", "c", 100 * Q, remaining=0)
    assert clawback(g, 50 * Q, 40 * Q, 60 * Q) == [Entry("", "debt", 10 * Q)]
    assert clawback(g, 50 * Q, 50 * Q, 60 * Q) == []
    assert clawback(g, 0, 0, 60 * Q) == []


def test_clawback_credits_share_of_the_payment() -> None:
    assert clawback_credits(100 * Q, 1000, 500) == 50 * Q
    assert clawback_credits(100 * Q, 3, 1) == 33_333_333          # floor
    assert clawback_credits(100 * Q, 1000, 1000) == 100 * Q
    assert clawback_credits(100 * Q, 1000, 5000) == 100 * Q
    assert clawback_credits(100 * Q, 0, 1) == 100 * Q             # payment amount unknown
    assert clawback_credits(100 * Q, 1000, 0) == 0
    # the edges: nothing returned takes nothing, whatever is known about the payment
    assert clawback_credits(100 * Q, 0, 0) == 0
    assert clawback_credits(0, 0, 0) == 0
    assert clawback_credits(100 * Q, 1000, -1) == 0               # a negative return: nothing
    assert clawback_credits(100 * Q, -5, 1) == 100 * Q            # a nonsense payment: all
    assert clawback_credits(100 * Q, 1000, 999) == 99_900_000     # just under: a share
    assert clawback_credits(0, 1000, 500) == 0                    # an empty grant: nothing
    assert clawback_credits(1, 2, 1) == 0                         # floor, even to zero


@given(st.integers(0, 10**15), st.integers(-5, 10**12), st.integers(-5, 10**12),
       st.integers(-5, 10**12))
def test_clawback_credits_is_a_bounded_monotone_share(amount: int, paid: int, r1: int,
                                                      r2: int) -> None:
    """Never more than the grant nor less than nothing; all of it once the whole payment (or
    more) is returned, or when its amount is unknown; otherwise the floor of the returned
    share; more returned never takes less; two partial returns of one payment (together
    less than it) never take more than their sum returned at once."""
    lo, hi = min(r1, r2), max(r1, r2)
    got = clawback_credits(amount, paid, hi)
    assert 0 <= got <= amount
    assert clawback_credits(amount, paid, lo) <= got                       # monotone
    if hi <= 0:
        assert got == 0
    elif paid <= 0 or hi >= paid:
        assert got == amount
    else:
        assert got * paid <= amount * hi < (got + 1) * paid                # the floor share
    if lo > 0 and hi < paid:
        assert clawback_credits(amount, paid, lo) + clawback_credits(amount, paid, hi - lo) \
            <= got


@given(st.integers(1, 10**12), st.integers(0, 10**12), st.integers(0, 10**12),
       st.integers(0, 10**12), st.integers(-5, 10**12))
def test_clawback_never_takes_more_than_its_layers(amount: int, remaining: int, credits: int,
                                                   expired: int, spent: int) -> None:
    g = GrantState("g", "c", amount, remaining=min(remaining, amount))
    entries = clawback(g, credits, expired, spent)
    refund = sum(e.amount for e in entries if e.kind == "refund")
    debt = sum(e.amount for e in entries if e.kind == "debt")
    assert refund == min(credits, g.remaining)
    assert debt == min(max(credits - refund - max(expired, 0), 0), max(spent, 0))
    assert all(e.amount > 0 for e in entries)


# ---------------------------------------------------------------- migration 7

def test_migration_7_keeps_the_ledger_and_constrains_debt(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    for i, script in enumerate(MIGRATIONS[:5], start=1):
        for stmt in _statements(script):
            conn.execute(stmt)
        conn.execute(f"PRAGMA user_version={i}")
    conn.execute("INSERT INTO customers(id, created_at, updated_at) VALUES ('c', 0, 0)")
    conn.execute("INSERT INTO grants(id, customer_id, amount, source, created_at)"
                 " VALUES ('g', 'c', 5, 'admin', 0)")
    conn.execute("INSERT INTO credit_entries(customer_id, grant_id, kind, amount, at_ms)"
                 " VALUES ('c', 'g', 'debit', 2, 7)")
    conn.commit()
    conn.close()
    conn = connect(path)
    assert conn.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
    assert conn.execute("SELECT seq, customer_id, grant_id, kind, amount, at_ms"
                        " FROM credit_entries").fetchall() == [(1, "c", "g", "debit", 2, 7)]
    conn.execute("INSERT INTO credit_entries(customer_id, grant_id, kind, amount, at_ms)"
                 " VALUES ('c', NULL, 'debt', 3, 8)")
    for bad in ("('c', 'g', 'debt', 1, 9)", "('c', NULL, 'debit', 1, 9)",
                "('c', 'nope', 'repay', 1, 9)"):
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("INSERT INTO credit_entries(customer_id, grant_id, kind, amount,"
                         f" at_ms) VALUES {bad}")
    book = load_book(ledger_load(conn))
    assert (book.debt("c"), book.balance("c", 0)) == (3, 0)
    conn.close()


async def test_a_grant_a_refresh_loaded_first_is_in_the_book_once(
        env: tuple[CreditService, ThresholdWatch], monkeypatch: pytest.MonkeyPatch) -> None:
    """Fleet mode refreshes a customer's grants from the shared ledger whenever it moves,
    and that refresh can land while ``grant`` awaits its own write. The new grant is then
    already in the book; added again it was there twice, its 10 credits spendable twice
    (23 available with the 3 granted before) until the next refresh."""
    import time

    svc, _ = env
    ledger_type = type(svc.ledger)
    real = ledger_type.create_grant

    async def then_refreshed(self: object, new: object, repay: object) -> object:
        got = await real(self, new, repay)          # type: ignore[arg-type]
        fresh = load_book(await svc.ledger.load())  # the refresh reads the ledger back
        svc.book.replace("c", fresh.grants("c"), fresh.debt("c"))
        return got

    await svc.grant("c", "3", idempotency_key="first")
    monkeypatch.setattr(ledger_type, "create_grant", then_refreshed)
    g, created = await svc.grant("c", "10", idempotency_key="k")
    assert created
    assert [x.id for x in svc.book.grants("c")].count(g.id) == 1
    assert svc.book.available("c", time.time()) == 13 * Q
    monkeypatch.undo()
    assert load_book(await svc.ledger.load()).available("c", time.time()) == 13 * Q
