"""Properties of the PostgreSQL backend's pure parts: the staging windows (every unit in
exactly one window, inside one billing period and one hour) and the balance change of
ledger entries."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from proxy.credits.ledger import Entry
from proxy.periods import period_bounds
from proxy.store.postgres.ledger import balance_change
from proxy.store.postgres.outbox import bucket_minutes

T0 = 1_767_225_600
minutes = st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(["m", "n"]),
                             st.integers(0, 60 * 24 * 70).map(lambda i: T0 + 60 * i),
                             st.integers(0, 10**9), st.integers(0, 10**9)), max_size=40)
anchors = st.fixed_dictionaries({"a": st.one_of(st.none(), st.integers(0, 10**9)),
                                 "b": st.one_of(st.none(), st.integers(0, 10**9))})


@given(minutes, anchors)
@example([("a", "m", T0 + 60, 5, 1), ("a", "m", T0 + 2400, 7, 0)], {"a": T0 + 1800, "b": None})
def test_every_unit_lands_in_one_window_of_one_period(
        rows: list[tuple[str, str, int, int, int]], anchor: dict[str, int | None]) -> None:
    out = bucket_minutes(rows, anchor)
    assert sum(b[2] for b in out.values()) == sum(r[3] for r in rows)
    assert sum(b[3] for b in out.values()) == sum(r[4] for r in rows)
    for customer, meter, minute, _b, _c in rows:
        start, end = period_bounds(anchor[customer], minute)
        window = minute // 3600 * 3600
        key = (customer, meter, start, max(window, start))
        assert key in out
        pend, last, _bill, _cov = out[key]
        assert pend == end and minute <= last < min(window + 3600, end)
    for (_cu, _me, pstart, lo), (pend, last, _bi, _co) in out.items():
        assert pstart <= lo <= last < pend and last - lo < 3600


kinds = st.sampled_from(["debit", "expire", "void", "refund", "debt", "repay"])
entries = st.lists(st.builds(Entry, st.just("g"), kinds, st.integers(-10**6, 10**6)))


@given(entries, entries)
def test_only_expiry_voids_and_refunds_take_credits_out_of_the_balance(
        a: list[Entry], b: list[Entry]) -> None:
    assert balance_change(a + b) == balance_change(a) + balance_change(b)
    assert balance_change(a) == -sum(e.amount for e in a if e.kind in ("expire", "void", "refund"))
    assert balance_change([Entry("g", "debit", 5), Entry("g", "expire", 3)]) == -3
