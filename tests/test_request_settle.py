"""Settlement (proxy.request.settle): credit costs per quantity (pure, property-tested) and the
per-rule cache that keeps the constant-quantity path free of per-request work."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from proxy.credits.reserve import Reservations
from proxy.request.settle import Settlement, _costs
from proxy.rules import Quantity, load_rules
from proxy.store.db import Store
from proxy.store.keys import KeyCache
from proxy.units import cost_micro

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
rates = st.dictionaries(meters, st.none() | st.decimals(0, 10**6, places=6), max_size=3)


@given(quantities, rates)
def test_costs_are_each_quantitys_cost_at_its_rate(qs: list[Quantity],
                                                   rs: dict[str, Decimal | None]) -> None:
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
        assert m.rates == {"tokens": Decimal("0.001")}
        reloaded = load_rules([path]).rules[0]               # a reload: a new rule object
        assert s.for_rule(reloaded) is not rc and s.for_rule(reloaded).costs == rc.costs
    finally:
        s.store.close()
