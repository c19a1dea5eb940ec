"""Settlement (proxy.request.settle): credit costs per quantity (pure, property-tested), the
per-rule cache that keeps the constant-quantity path free of per-request work, and the
settlements that wait for a customer's monetary account to open."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

from aiohttp.test_utils import make_mocked_request
from hypothesis import given
from hypothesis import strategies as st

from proxy.credits.money import MoneyBook, Opening
from proxy.credits.reserve import Reservations
from proxy.request.context import RequestContext
from proxy.request.settle import Settlement, _costs
from proxy.rules import Quantity, Rule, load_rules
from proxy.store.db import Store
from proxy.store.keys import KeyCache
from proxy.units import CreditRate, cost_micro

RULES = """\
version: 1
meters:
  calls: {stripe_event_name: calls}
  tokens: {stripe_event_name: tokens}
rules:
  - name: fixed
    match: {path: /a}
    usage:
      - {meter: calls, quantity: 2, credits: 0.5}
      - {meter: tokens, quantity: 3}
  - name: measured
    match: {path: /b}
    usage:
      - {meter: tokens, quantity: response.json.n, credits: 0.001}
"""

meters = st.sampled_from(["calls", "tokens", "other"])
quantities = st.lists(st.builds(lambda m, q: Quantity(m, q, False, ""), meters,
                                st.integers(0, 10**15)), max_size=5)
rates = st.dictionaries(meters, st.none() | st.builds(CreditRate.of, st.decimals(0, 10**6, places=6),
                                                     st.integers(1, 10**9)), max_size=3)


@given(quantities, rates)
def test_costs_are_each_quantitys_cost_at_its_rate(qs: list[Quantity],
                                                   rs: dict[str, CreditRate | None]) -> None:
    costs = _costs(qs, rs)
    assert len(costs) == len(qs)
    for q, c in zip(qs, costs, strict=True):
        r = rs.get(q.meter)
        assert c == (0 if r is None else cost_micro(q.micro, r))
        assert c >= 0 and (c == 0 or q.micro > 0)


def _settlement(tmp_path: Path) -> Settlement:
    return Settlement(Store.open(tmp_path / "m.db"), KeyCache(), None, None, Reservations(0), 0,
                      True)


async def test_constant_rules_are_costed_once_per_rule_object(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    s = _settlement(tmp_path)
    try:
        fixed, measured = load_rules([path]).rules
        rc = s.for_rule(fixed)
        assert s.for_rule(fixed) is rc                       # cached: no per-request work
        assert rc.quantities is not None and [q.micro for q in rc.quantities] == [2_000_000,
                                                                                  3_000_000]
        assert rc.costs == [1_000_000, 0]                    # 2 calls at 0.5; tokens unpriced
        m = s.for_rule(measured)
        assert m.quantities is None and m.costs is None      # measured per request
        assert m.rates == {"tokens": CreditRate(1, 1000)}
        reloaded = load_rules([path]).rules[0]               # a reload: a new rule object
        assert s.for_rule(reloaded) is not rc and s.for_rule(reloaded).costs == rc.costs
    finally:
        s.store.close()


def _ctx(rule: object, rid: str, customer: str) -> RequestContext:
    return RequestContext(make_mocked_request("GET", "/a"), rid, rule, {},  # type: ignore[arg-type]
                          "k1", customer, "v1", 0.0, True, None, "/a", "/a")


def _audited(s: Settlement) -> list[tuple[str, str]]:
    s.store.materialize()
    return s.store.conn.execute("SELECT request_id, customer_id FROM audit ORDER BY seq").fetchall()


@contextlib.contextmanager
def _opening(tmp_path: Path, limit: int = 10) -> Iterator[tuple[Settlement, Rule, Opening]]:
    """A strict Settlement on a real store whose MoneyBook has customer acme's account
    opening (an ``Opening`` of ``limit``), and the rule ``fixed``."""
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    s = _settlement(tmp_path)
    s.money = money = MoneyBook()
    opening = money.opening["acme"] = Opening(limit)
    try:
        yield s, load_rules([path]).rules[0], opening
    finally:
        s.store.close()


def _opened(s: Settlement, opening: Opening) -> None:
    """What the opener does once the account has opened: the customer's settlements no
    longer wait, and the ones that waited are made, in order."""
    assert s.money is not None
    del s.money.opening["acme"]
    for settle in opening.waiting:
        settle()


async def test_a_settlement_during_its_customer_s_opening_waits_and_commits_after(
        tmp_path: Path) -> None:
    """While a customer's monetary account opens (``MoneyBook.opening``), its settlements
    are queued, not recorded (the opening's reads see none of them), and the strict
    request waits on a future that is the commit's once the opener makes them; another
    customer's settle at once."""
    with _opening(tmp_path) as (s, fixed, opening):
        fut = s.record(_ctx(fixed, "r1", "acme"), fixed, None, 200, "")
        assert fut is not None and not fut.done() and len(opening.waiting) == 1
        assert not s.store.pending_for("acme")           # not recorded while it opens
        other = s.record(_ctx(fixed, "r2", "beta"), fixed, None, 200, "")
        assert other is not None
        await asyncio.wait_for(other, 5)
        assert _audited(s) == [("r2", "beta"), ("r2", "beta")]     # (two meters)
        assert not fut.done()                            # still waiting for the opening
        _opened(s, opening)
        await asyncio.wait_for(fut, 5)
        assert _audited(s)[2:] == [("r1", "acme"), ("r1", "acme")]


async def test_a_waiter_that_left_during_the_opening_still_gets_its_row_committed(
        tmp_path: Path) -> None:
    """A consumer that disconnects while its settlement waits for the opening: the request's
    usage is still recorded once the opening is over (as when it leaves during a commit),
    and nothing raises."""
    with _opening(tmp_path) as (s, fixed, opening):
        fut = s.record(_ctx(fixed, "r1", "acme"), fixed, None, 200, "")
        assert fut is not None
        waiter = asyncio.ensure_future(fut)
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        _opened(s, opening)
        assert await s.store.committed_for("acme", 5)
        assert _audited(s) == [("r1", "acme"), ("r1", "acme")]


async def test_past_the_opening_s_bound_a_settlement_is_made_at_once_and_spoils_it(
        tmp_path: Path) -> None:
    """At most ``Opening.limit`` settlements wait (memory, and a batched store's crash
    window); the next one is made at once, in the unit mode, and marks the opening spoiled
    (its reads may miss that row: the opener defers instead of opening)."""
    with _opening(tmp_path, limit=2) as (s, fixed, opening):
        futs = [s.record(_ctx(fixed, f"r{i}", "acme"), fixed, None, 200, "") for i in range(3)]
        assert len(opening.waiting) == 2 and opening.spoiled
        assert futs[0] is not None and not futs[0].done()
        assert futs[2] is not None
        await asyncio.wait_for(futs[2], 5)                   # made at once
        assert _audited(s) == [("r2", "acme"), ("r2", "acme")]
