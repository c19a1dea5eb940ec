"""Fixed examples at every boundary of the pure billing core.

Each test states one billing rule with exact values. They exist because a mutation pass
(scripts/mutation, docs/testing.md) showed that property tests alone catch a boundary bug
only when hypothesis happens to draw the boundary.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import AsyncIterator
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import orjson
import pytest

from proxy.credits.book import CreditBook
from proxy.credits.ledger import (
    Entry,
    GrantState,
    allocate,
    available,
    burn_order,
    covered_quantity,
    expire_due,
    repay,
    rollover_grant,
)
from proxy.credits.thresholds import DEPLETED, ThresholdWatch, crossed, period_key
from proxy.pricing import Price, Tier, exact_amount, line_amount, round_line, whole_units
from proxy.rules.quantity import parse_number
from proxy.rules.sse import (
    UNREADABLE,
    BodyView,
    JsonInspector,
    Probe,
    SseEvent,
    SseInspector,
    SseParser,
    lookup,
    new_inspector,
)
from proxy.store.alerts import SqliteAlerts
from proxy.store.db import Store, connect
from proxy.store.outbox import split_whole, stage
from proxy.units import QSCALE, CreditRate, UnitError, cost_micro, fmt_micro, to_decimal, to_micro

U = QSCALE

# (up_to, unit, flat): 1-5 at 5 + 10 flat, 6-10 at 4 + 20 flat, 11+ at 3 + 30 flat
FLAT_TIERS = (Tier(5, Decimal(5), Decimal(10)), Tier(10, Decimal(4), Decimal(20)),
              Tier(None, Decimal(3), Decimal(30)))


def tiered(mode: str) -> Price:
    return Price("usd", "tiered", tiers_mode=mode, tiers=FLAT_TIERS)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ pricing

@pytest.mark.parametrize(("q", "amount"), [
    (0, 10),                 # zero usage: the first tier's flat fee only
    (1, 15),
    (5, 35),                 # exactly at up_to: tier 2 is NOT reached, no 20 flat fee
    (6, 59),                 # 25 + 10 + 4 + 20: unit 6 reaches tier 2 and its flat fee
    (10, 75),                # exactly at the second up_to: no 30 flat fee
    (11, 108),               # 75 + 3 + 30
])
def test_graduated_flat_fee_of_a_tier_is_billed_only_once_a_unit_reaches_it(
        q: int, amount: int) -> None:
    assert exact_amount(tiered("graduated"), q) == Fraction(amount)
    assert line_amount(tiered("graduated"), q * U) == amount


@pytest.mark.parametrize(("q", "amount"), [
    (0, 10), (1, 15),
    (5, 35),                 # exactly at up_to: the total is still in tier 1
    (6, 44),                 # 6 * 4 + 20: the whole quantity at tier 2
    (10, 60),                # exactly at the second up_to: tier 2
    (11, 63),                # 11 * 3 + 30
])
def test_volume_total_at_up_to_stays_in_that_tier(q: int, amount: int) -> None:
    assert exact_amount(tiered("volume"), q) == Fraction(amount)
    assert line_amount(tiered("volume"), q * U) == amount


def test_line_prices_only_whole_units_and_rounds_half_up_once() -> None:
    assert whole_units(5 * U - 1) == 4
    assert whole_units(-1) == 0
    assert line_amount(tiered("graduated"), 6 * U - 1) == 35      # 5.999999 units bill as 5
    assert round_line(Fraction(1, 2)) == 1
    assert round_line(Fraction(49, 100)) == 0
    assert round_line(Fraction(-3, 2)) == 0


# ------------------------------------------------------------------------------ units

@pytest.mark.parametrize(("quantity", "rate", "cost"), [
    (1, "0.000001", 1),          # 1e-6 micro-credits: rounds UP to one micro-credit
    (1, "0.0000001", 1),         # any sub-micro cost is at least one micro-credit
    (999_999, "0.000001", 1),    # 0.999999 -> 1
    (1_000_001, "0.000001", 2),  # 1.000001 -> 2, never 1
    (3, "0.5", 2),               # 1.5 -> 2
    (2, "0.5", 1),               # exact: never over-charged
    (1_000_000, "0.001", 1000),  # one token at 0.001 credits = 1000 micro-credits
    (0, "5", 0),
])
def test_credit_cost_rounds_up_never_under_charges(quantity: int, rate: str, cost: int) -> None:
    got = cost_micro(quantity, CreditRate.of(Decimal(rate)))
    assert got == cost
    assert type(got) is int


def test_micro_conversions_are_exact() -> None:
    assert to_micro("0.0000005") == 0          # half-even at the 6th place
    assert to_micro("0.0000015") == 2
    assert to_micro("0.4") == 400_000
    assert to_micro(3) == 3 * U
    assert fmt_micro(950_500_000) == "950.5"
    assert fmt_micro(-1) == "-0.000001"
    assert fmt_micro(3 * U) == "3"


@pytest.mark.parametrize(("value", "message"), [
    (True, "expected a number, got True"),
    ([1], "expected a number, got list"),
    (None, "expected a number, got NoneType"),
    ("abc", "not a number: 'abc'"),
    ("inf", "not a finite number: 'inf'"),
    (float("nan"), "not a finite number: nan"),
])
def test_not_a_number_is_refused_with_a_clear_message(value: object, message: str) -> None:
    with pytest.raises(UnitError) as err:
        to_decimal(value)
    assert str(err.value) == message


def test_readings_up_to_max_units_inclusive() -> None:
    assert parse_number(10**12) == Decimal(10**12)
    assert parse_number("1000000000000") == Decimal(10**12)
    assert parse_number(10**12 + 1) is None
    assert parse_number(None) is None
    assert parse_number(False) is None


# ------------------------------------------------------------------------------ ledger

def grant(gid: str, amount: int, *, priority: int = 50, expires_at: int | None = None,
          created_at: int = 0) -> GrantState:
    return GrantState(gid, "c", amount, priority, expires_at, created_at)


def test_repay_takes_what_the_new_grant_holds_never_more_than_the_debt() -> None:
    """A block customer's debt is paid back first by the next live grant: exactly
    min(debt, remaining), one ``repay`` entry on that grant; nothing for no debt, a dead
    grant or an empty one."""
    g = grant("g", 10, expires_at=100)
    assert repay(g, 4, now=50) == [Entry("g", "repay", 4)]       # debt below what it holds
    assert repay(g, 10, now=50) == [Entry("g", "repay", 10)]     # exactly what it holds
    assert repay(g, 11, now=50) == [Entry("g", "repay", 10)]     # more: the rest stays debt
    assert repay(g, 1, now=99) == [Entry("g", "repay", 1)]       # live until expires_at
    assert repay(g, 1, now=100) == []                            # expired AT expires_at
    assert repay(g, 0, now=50) == []
    assert repay(g, -5, now=50) == []
    empty = grant("e", 10)
    empty.remaining = 0
    assert repay(empty, 3, now=50) == []
    partly = grant("p", 10)
    partly.remaining = 1
    assert repay(partly, 3, now=50) == [Entry("p", "repay", 1)]
    voided = grant("v", 10)
    voided.voided = True
    assert repay(voided, 3, now=50) == []


def test_a_grant_is_expired_at_expires_at() -> None:
    g = grant("g", 10, expires_at=100)
    assert g.live(99)
    assert g.live(99.999)
    assert not g.live(100)                       # expired AT expires_at, not after it
    assert available([g], 99) == 10
    assert available([g], 100) == 0
    assert expire_due([g], 99) == []
    assert expire_due([g], 100) == [Entry("g", "expire", 10)]


def test_allocate_never_debits_a_grant_expired_but_not_yet_swept() -> None:
    expired = grant("old", 50, priority=0, expires_at=100)     # first in burn order
    live = grant("new", 30)
    order = burn_order([expired, live])
    assert [g.id for g in order] == ["old", "new"]
    assert allocate(order, 20, 100) == ([Entry("new", "debit", 20)], 0)
    assert allocate(order, 40, 100) == ([Entry("new", "debit", 30)], 10)
    assert allocate([expired], 5, 100) == ([], 5)
    # one second earlier the expiring grant burns first
    assert allocate(order, 20, 99) == ([Entry("old", "debit", 20)], 0)


def test_book_settles_after_expiry_before_the_sweep_from_live_grants_only() -> None:
    book = CreditBook()
    book.load([grant("old", 50, priority=0, expires_at=100), grant("new", 30)], [])
    hold = book.try_hold("c", 0, 100, block=False)
    assert hold is not None
    assert book.settle(hold, [40], 100) == [([Entry("new", "debit", 30)], 10)]
    assert book.grant("old") is not None and book.grant("old").remaining == 50  # type: ignore[union-attr]
    assert book.balance("c", 100) == 0
    assert book.due_expiries(100) == [Entry("old", "expire", 50)]


def test_allocate_skips_empty_grants_and_stops_when_covered() -> None:
    a, b, c = grant("a", 10, priority=1), grant("b", 10, priority=2), grant("c", 10, priority=3)
    a.remaining = 0
    assert allocate([a, b, c], 10, 0) == ([Entry("b", "debit", 10)], 0)
    assert allocate([a, b, c], 0, 0) == ([], 0)
    assert allocate([a, b, c], -5, 0) == ([], 0)


def test_hold_admits_exactly_the_available_amount_and_not_one_more() -> None:
    book = CreditBook()
    book.load([grant("g", 100)], [])
    assert book.try_hold("c", 101, 0, block=True) is None
    assert book.inflight("c") == 0
    h = book.try_hold("c", 100, 0, block=True)
    assert h is not None and h.amount == 100
    assert book.available("c", 0) == 0 and book.held("c") == 100 and book.inflight("c") == 1
    over = book.try_hold("c", 7, 0, block=False)          # pay-as-you-go: admitted, holds 0
    assert over is not None and over.amount == 0
    book.release(h)
    book.release(h)                                       # idempotent
    assert book.available("c", 0) == 100 and book.held("c") == 0 and book.inflight("c") == 1
    book.release(over)
    assert book.inflight("c") == 0
    assert book.balance("c", 0) == 100


def test_next_expiry_ignores_spent_voided_and_endless_grants() -> None:
    book = CreditBook()
    spent = grant("spent", 5, expires_at=10)
    book.load([spent, grant("later", 5, expires_at=30), grant("soon", 5, expires_at=20),
               grant("forever", 5)], [Entry("spent", "debit", 5)])
    assert book.next_expiry(0) == 20.0
    book.apply([Entry("soon", "void", 5)])
    assert book.next_expiry(0) == 30.0
    assert CreditBook().next_expiry(0) is None
    last = CreditBook()
    last.load([grant("one", 5, expires_at=7)], [Entry("one", "debit", 4)])   # 1 micro left
    assert last.next_expiry(0) == 7.0
    assert book.has_credits("c") and not book.has_credits("other")


@pytest.mark.parametrize(("q", "cost", "covered_cost", "covered"), [
    (10, 3, 1, 3),           # 3.33 covered: rounds DOWN, the rest is billable
    (10, 3, 2, 6),           # 6.67 -> 6
    (7, 2, 1, 3),            # 3.5 -> 3
    (10, 3, 3, 10),          # full coverage covers everything
    (10, 3, 4, 10),
    (10, 3, 0, 0),
    (10, 0, 0, 0),           # zero cost covers nothing
    (10, 0, 5, 0),           # ... even with a covered cost (a free request bills nothing)
    (10, -1, 5, 0),
])
def test_partial_coverage_rounds_covered_down(q: int, cost: int, covered_cost: int,
                                              covered: int) -> None:
    assert covered_quantity(q, cost, covered_cost) == covered


@pytest.mark.parametrize(("allowance", "previous", "cap", "amount"), [
    (100, 0, None, 100),     # monthly reset
    (100, 50, None, 150),
    (100, -5, None, 100),    # nothing negative rolls over
    (100, 50, 120, 120),     # capped
    (100, 10, 200, 110),
    (100, 50, 80, 100),      # a cap below the allowance never cuts the allowance
])
def test_rollover(allowance: int, previous: int, cap: int | None, amount: int) -> None:
    assert rollover_grant(allowance, previous, cap) == amount


# ------------------------------------------------------------------------------ thresholds

@pytest.mark.parametrize(("granted", "consumed", "fired"), [
    (100, 49, []),
    (100, 50, ["0.5"]),                       # exactly 50% fires
    (100, 89, ["0.5"]),
    (100, 90, ["0.5", "0.9"]),
    (100, 99, ["0.5", "0.9"]),
    (100, 100, ["0.5", "0.9", DEPLETED]),
    (100, 130, ["0.5", "0.9", DEPLETED]),    # overage: still depleted
    (0, 0, []),
    (-5, 0, []),
])
def test_thresholds_fire_at_exactly_the_fraction(granted: int, consumed: int,
                                                  fired: list[str]) -> None:
    assert crossed(granted, consumed, [Decimal("0.5"), Decimal("0.9")]) == fired


def test_one_micro_credit_granted_and_spent_crosses_everything() -> None:
    assert crossed(1, 1, [Decimal("0.5")]) == ["0.5", DEPLETED]
    assert crossed(1, 0, [Decimal("0.5")]) == []


def test_period_key_is_the_sha256_of_the_sorted_grant_ids() -> None:
    """Stored in the alerts table: the format must not change, or every alert re-fires."""
    import hashlib
    assert period_key([grant("b", 1), grant("a", 1)]) == \
        hashlib.sha256(b"a,b").hexdigest()[:16]
    assert period_key([grant("g1", 5)]) == hashlib.sha256(b"g1").hexdigest()[:16]


def test_threshold_fraction_is_exact_not_float() -> None:
    third = [Decimal("0.333")]
    assert crossed(1000, 333, third) == ["0.333"]
    assert crossed(1000, 332, third) == []
    assert crossed(3, 1, [Decimal("0.333")]) == ["0.333"]   # 1/3 >= 0.333


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store.open(tmp_path / "t.db")
    yield s
    s.close()


async def test_threshold_alert_fires_once_per_period_even_after_restart(store: Store) -> None:
    book = CreditBook()
    g = grant("g1", 100 * U)
    book.load([g], [])
    notified: list[int] = []
    watch = await ThresholdWatch.open(SqliteAlerts(store), book, [0.9, 0.5],
                                      on_new=lambda: notified.append(1))
    assert watch.check("c", now=1000) == []                # nothing consumed
    book.apply([Entry("g1", "debit", 50 * U)])
    key = "0"        # the billing period's start (no anchor: the calendar month, 1970-01)
    assert watch.check("c", now=1000) == [{
        "type": "credits.threshold_crossed", "customer_id": "c", "threshold": "0.5",
        "period": key, "granted": "100", "remaining": "50", "consumed": "50", "at": 1000}]
    assert notified == [1]
    assert watch.check("c", now=1001) == []                # no re-fire in this process
    assert notified == [1]
    again = await ThresholdWatch.open(SqliteAlerts(store), book, [0.5, 0.9])        # nor after a restart
    assert again.check("c", now=1002) == []
    book.apply([Entry("g1", "debit", 50 * U)])
    fired = again.check("c", now=1003)
    assert [(a["type"], a["threshold"], a["remaining"]) for a in fired] == [
        ("credits.threshold_crossed", "0.9", "0"), ("credits.depleted", DEPLETED, "0")]
    rows = store.conn.execute(
        "SELECT customer_id, period_key, threshold, created_at, payload FROM alerts"
        " ORDER BY created_at, threshold").fetchall()
    assert [r[:4] for r in rows] == [("c", key, "0.5", 1000), ("c", key, "0.9", 1003),
                                     ("c", f"{key}:g1", DEPLETED, 1003)]
    assert orjson.loads(rows[0][4])["consumed"] == "50"
    # a top-up is not a new period: 0.5 and 0.9 never fire twice in one billing period
    book.add_grant(grant("g2", 100 * U))
    assert again.check("c", now=1004) == []
    # only depletion re-arms, with the new grant: running the top-up dry alerts once more
    book.apply([Entry("g2", "debit", 100 * U)])
    assert [(a["type"], a["period"]) for a in again.check("c", now=1005)] == [
        ("credits.depleted", f"{key}:g2")]
    assert again.check("c", now=1006) == []


async def test_threshold_check_ignores_expired_grants_and_customers_without_grants(store: Store) -> None:
    book = CreditBook()
    book.load([grant("g", 10, expires_at=50)], [Entry("g", "debit", 9)])
    watch = await ThresholdWatch.open(SqliteAlerts(store), book, [0.5])
    assert watch.check("c", now=50) == []
    assert watch.check("nobody", now=10) == []
    assert [a["threshold"] for a in watch.check("c", now=49)] == ["0.5"]


# ------------------------------------------------------------------------------ outbox

def usage(conn: sqlite3.Connection, customer: str, meter: str, minute: int, q: int,
          covered: int = 0) -> None:
    conn.execute(
        "INSERT INTO usage_minute(customer_id, key_id, meter, minute, rules_version,"
        " quantity, requests, billable, covered) VALUES (?,'k',?,?,'v',?,1,?,?)"
        " ON CONFLICT DO UPDATE SET quantity=quantity+excluded.quantity,"
        " billable=billable+excluded.billable, covered=covered+excluded.covered",
        (customer, meter, minute, q + covered, q, covered))


def test_outbox_identifiers_are_mp_install_id_row_id(tmp_path: Path) -> None:
    conn = connect(tmp_path / "o.db")
    (install,) = conn.execute("SELECT v FROM meta WHERE k='install_id'").fetchone()
    assert re.fullmatch(r"[0-9a-f]{12}", install)
    names = {"m": ("ev_m", "ev_m_cov"), "n": ("ev_n", None)}
    usage(conn, "a", "m", 7200, 2 * U + 500_000, covered=U)
    usage(conn, "a", "n", 60, 3 * U)
    usage(conn, "b", "m", 120, U)
    conn.execute("BEGIN")
    staged = stage(conn, names, now=10_000)
    conn.execute("COMMIT")
    assert [(e.customer_id, e.meter, e.event_name, e.covered, e.value, e.window_start,
             e.timestamp) for e in staged] == [
        ("a", "m", "ev_m", False, 2, 7200, 7259),
        ("a", "m", "ev_m_cov", True, 1, 7200, 7259),
        ("a", "n", "ev_n", False, 3, 0, 119),
        ("b", "m", "ev_m", False, 1, 0, 179)]
    rows = conn.execute("SELECT id, identifier, value, covered, window_start, timestamp,"
                        " created_at, status FROM outbox ORDER BY id").fetchall()
    assert [r[:1] + r[2:] for r in rows] == [
        (1, 2, 0, 7200, 7259, 10_000, "pending"),
        (2, 1, 1, 7200, 7259, 10_000, "pending"),
        (3, 3, 0, 0, 119, 10_000, "pending"),
        (4, 1, 0, 0, 179, 10_000, "pending")]
    # mp_<install id>_<row id>_<salt>: one salt per staging transaction
    salt = rows[0][1].rsplit("_", 1)[1]
    assert re.fullmatch(r"[0-9a-f]{8}", salt)
    assert [r[1] for r in rows] == [f"mp_{install}_{i}_{salt}" for i in (1, 2, 3, 4)]
    assert dict(((c, m, e), r) for c, m, e, r in conn.execute(
        "SELECT customer_id, meter, event_name, remainder FROM carry")) == {
        ("a", "m", "ev_m"): 500_000, ("a", "m", "ev_m_cov"): 0, ("a", "n", "ev_n"): 0,
        ("b", "m", "ev_m"): 0}
    # the next flush continues the numbering and adds the carried half unit
    usage(conn, "a", "m", 7260, 500_000)
    conn.execute("BEGIN")
    again = stage(conn, names, now=7300.5)
    conn.execute("COMMIT")
    assert [(e.event_name, e.value, e.timestamp) for e in again] == [("ev_m", 1, 7300)]
    [(five, ident)] = conn.execute("SELECT id, identifier FROM outbox WHERE id > 4").fetchall()
    assert five == 5 and re.fullmatch(rf"mp_{install}_5_[0-9a-f]{{8}}", ident)
    assert not ident.endswith(salt)            # another staging transaction, another salt
    conn.execute("BEGIN")
    assert stage(conn, names, now=8000) == []
    conn.execute("COMMIT")
    conn.close()


def test_outbox_hours_after_a_period_boundary_stay_apart(tmp_path: Path) -> None:
    """One customer's unreported hours on both sides of a billing-period boundary (no
    anchor: the calendar month, here 1 Feb 1970), staged at once: each hour is its own
    window in its own period (the per-customer period cache is refreshed when an hour
    leaves it)."""
    feb = 31 * 86400
    conn = connect(tmp_path / "o.db")
    usage(conn, "a", "m", feb - 3600, U)                    # the last hour of January
    usage(conn, "a", "m", feb + 60, 2 * U)                  # the first two of February
    usage(conn, "a", "m", feb + 3600, 3 * U)
    conn.execute("BEGIN")
    staged = stage(conn, {"m": ("ev", None)}, now=feb + 86400)
    conn.execute("COMMIT")
    assert [(e.window_start, e.timestamp, e.value) for e in staged] == [
        (feb - 3600, feb - 3600 + 59, 1), (feb, feb + 119, 2), (feb + 3600, feb + 3659, 3)]
    conn.close()


def test_outbox_stages_a_covered_delta_without_a_billable_one(tmp_path: Path) -> None:
    conn = connect(tmp_path / "o.db")
    usage(conn, "a", "m", 0, 0, covered=2 * U)              # fully prepaid: nothing billable
    usage(conn, "b", "m", 0, 3 * U)
    conn.execute("BEGIN")
    staged = stage(conn, {"m": ("ev", "ev_cov")}, now=100)
    conn.execute("COMMIT")
    assert [(e.customer_id, e.event_name, e.covered, e.value) for e in staged] == [
        ("a", "ev_cov", True, 2), ("b", "ev", False, 3)]
    conn.close()


def test_outbox_unknown_meter_uses_its_own_name(tmp_path: Path) -> None:
    conn = connect(tmp_path / "o.db")
    usage(conn, "a", "gone", 0, 4 * U, covered=2 * U)
    conn.execute("BEGIN")
    staged = stage(conn, {}, now=100)
    conn.execute("COMMIT")
    assert [(e.event_name, e.covered, e.value) for e in staged] == [("gone", False, 4)]
    conn.close()


def test_split_whole_floors() -> None:
    assert split_whole(QSCALE - 1) == (0, QSCALE - 1)
    assert split_whole(QSCALE) == (1, 0)
    assert split_whole(-1) == (-1, QSCALE - 1)


# ------------------------------------------------------------------------------ SSE fast path

TOTAL = Probe("t", ("usage", "total_tokens"))


def test_usage_event_split_inside_a_key_is_still_read() -> None:
    """The fast path skips a chunk of whole events that cannot hold a probe's keys, but only
    when the parser is at an event boundary: here the second chunk completes an event
    begun in the first, and it alone does not contain the key ``total_tokens``."""
    insp = SseInspector((TOTAL,), 1 << 20)
    insp.feed(b'data: {"choices":[]}\n\ndata: {"usage":{"total_')
    insp.feed(b'tokens":40}}\n\n')
    assert insp.result().get("t") == 40


def test_fast_path_skips_whole_events_without_the_keys() -> None:
    insp = SseInspector((TOTAL,), 1 << 20)
    insp.feed(b'data: {"usage":{"total_tokens":3}}\n\n')
    insp.feed(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n')
    insp.feed(b"data: [DONE]\n\n")
    view = insp.result()
    assert view.get("t") == 3 and view.streamed and view.skipped_events == 0


def test_parser_boundary_state() -> None:
    p = SseParser(1 << 20)
    assert not p.at_event_boundary()            # nothing read yet (a BOM may follow)
    assert p.feed(b"data: a\n\n") != []
    assert p.at_event_boundary()
    p.feed(b"data: b\n")
    assert not p.at_event_boundary()            # an event is half-read
    p.feed(b"\n")
    assert p.at_event_boundary()
    p.feed(b"event: x\n")
    assert not p.at_event_boundary()            # an event type is pending
    p.feed(b"\ndata: c\r")
    assert not p.at_event_boundary()            # a CR may be followed by LF
    p.feed(b"\n\n")
    assert p.at_event_boundary()
    p.feed(b"da")
    assert not p.at_event_boundary()            # half a line


def test_every_oversized_event_is_counted() -> None:
    insp = SseInspector((TOTAL,), 16)
    insp.feed(b'data: {"usage":{"total_tokens":1}}\n\n')          # 33 bytes > 16: skipped
    insp.feed(b'data: {"usage":\ndata: {"total_tokens":2}}\n\n')  # skipped on its 2nd line
    insp.feed(b"data: {}\n\n")
    view = insp.result()
    assert view.skipped_events == 2 and view.get("t") is UNREADABLE


def test_unreadable_is_falsy_and_named() -> None:
    assert not UNREADABLE
    assert bool(UNREADABLE) is False
    assert repr(UNREADABLE) == "UNREADABLE"


def test_unreadable_when_no_usage_event() -> None:
    insp = SseInspector((TOTAL,), 1 << 20)
    insp.feed(b'data: {"choices":[]}\n\ndata: [DONE]\n\n')
    assert insp.result().get("t") is UNREADABLE


def test_lookup_absent_is_unreadable_but_null_is_a_value() -> None:
    assert lookup({"a": {}}, ("a", "b")) is UNREADABLE
    assert lookup({"a": {"b": None}}, ("a", "b")) is None
    assert lookup({"a": [1, 2]}, ("a", "1")) == 2
    assert lookup({"a": [1, 2]}, ("a", "2")) is UNREADABLE
    assert lookup({"a": [1]}, ("a", "x")) is UNREADABLE
    assert lookup(5, ("a",)) is UNREADABLE


def test_a_later_event_without_the_value_keeps_the_earlier_one() -> None:
    insp = SseInspector((TOTAL,), 1 << 20)
    insp.feed(b'data: {"usage":{"total_tokens":5}}\n\n')
    insp.feed(b'data: {"usage":{"note":"total_tokens"}}\n\n')    # the keys, not the path
    assert insp.result().get("t") == 5


def test_each_probe_is_matched_on_its_own_keys() -> None:
    a, b = Probe("a", ("alpha", "x")), Probe("b", ("beta", "y"))
    insp = SseInspector((a, b), 1 << 20)
    insp.feed(b'data: {"alpha":{"x":1}}\n\n')
    insp.feed(b'data: {"beta":{"y":2}}\n\n')
    assert insp.result() == BodyView({"a": 1, "b": 2}, streamed=True)


def test_json_body_exactly_at_the_cap_is_parsed_one_byte_over_is_scanned() -> None:
    """Up to the cap the body is buffered and parsed whole; one byte over, the incremental key
    scanner reads the same value (docs/metering-bodies.md): over-cap is never billed 0."""
    body = b'{"usage":{"total_tokens":7}}'
    at = JsonInspector((TOTAL,), len(body))
    at.feed(body[:10])
    at.feed(body[10:])
    assert at.result() == BodyView({"t": 7})
    over = JsonInspector((TOTAL,), len(body) - 1)
    over.feed(body)
    assert over.result() == BodyView({"t": 7}, reason="over_cap", scanned=True)


def test_json_key_text_inside_an_over_cap_string_is_never_read() -> None:
    """A value that only looks like the key (inside a string longer than the cap) is not
    billed: the scan gives up and the quantity takes the fallback (the reservation)."""
    insp = JsonInspector((TOTAL,), 40)
    insp.feed(b'{"pad": "')
    insp.feed(b"x" * 40)                                   # over the cap, inside a string
    insp.feed(b'{"usage":{"total_tokens":1}}')             # would parse on its own
    assert insp.result() == BodyView({}, malformed=True, reason="over_cap")


def test_no_probes_no_inspector() -> None:
    assert new_inspector((), (), "application/json", 9) is None
    assert new_inspector((), (), None, 9) is None
    assert new_inspector((), (TOTAL,), "application/json", 9) is None
    assert isinstance(new_inspector((TOTAL,), (), "text/event-stream; x=1", 9), type(None))


@pytest.mark.parametrize(("stream", "events", "oversized"), [
    (b"data: 0123456789\n\n", [SseEvent("message", b"0123456789")], 0),   # exactly the cap
    (b"data: 0123456789a\n\n", [], 1),                                    # one byte over
    (b"data: 12345\ndata: 6789\n\n", [SseEvent("message", b"12345\n6789")], 0),  # 10 joined
    (b"data: 12345\ndata: 67890\n\n", [], 1),
])
def test_sse_event_data_cap_is_exact(stream: bytes, events: list[SseEvent],
                                     oversized: int) -> None:
    p = SseParser(10)
    assert p.feed(stream) == events
    assert p.oversized == oversized


def test_event_name_that_is_not_utf8_is_replaced_not_fatal() -> None:
    p = SseParser(1 << 10)
    assert p.feed(b"event: \xff\xfeok\ndata: x\n\n") == [SseEvent("\ufffd\ufffdok", b"x")]


@pytest.mark.parametrize("split", [False, True])
def test_lines_longer_than_the_cap_plus_16_are_dropped(split: bool) -> None:
    """A line of up to max_event_bytes + 16 bytes is parsed; a longer one is dropped whole
    (here an ``event:`` line, whose loss is visible as the default event type)."""
    def parse(head: bytes) -> list[SseEvent]:
        p = SseParser(10)
        if split:                                   # the long line arrives unterminated
            return p.feed(head) + p.feed(b"\ndata: x\n\n")
        return p.feed(head + b"\ndata: x\n\n")

    assert parse(b"event: " + b"e" * 19) == [SseEvent("e" * 19, b"x")]      # 26 = 10 + 16
    assert parse(b"event: " + b"e" * 20) == [SseEvent("message", b"x")]     # 27: dropped


def test_the_rest_of_a_dropped_line_is_dropped_too() -> None:
    p = SseParser(10)
    assert p.feed(b"y" * 30) == []                    # over the bound, unterminated
    assert p.feed(b"data: evil\ndata: ok\n\n") == [SseEvent("message", b"ok")]
