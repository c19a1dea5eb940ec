"""Adaptive reservations: what a request holds at admission for quantities only known after
the response (tokens, bytes, duration).

Per usage spec, the quantity reserved is, in order:

1. the request's own hint when the rule names one (``reserve_from: request.json.max_tokens``),
   read once the request body is buffered, never below the floor;
2. else the learned high percentile (``PERCENTILE``, nearest rank) of the last ``WINDOW``
   quantities measured for that rule and meter, once ``MIN_SAMPLES`` were seen, never
   below the floor;
3. else the floor: the spec's ``estimate``, or ``credits.default_estimate``.

Learning is per (rule name, meter), across customers: it describes what the endpoint
returns, not who calls it. The percentile is recomputed every ``RECOMPUTE_EVERY``
observations (a sort of at most ``WINDOW`` integers), so admission reads one cached int.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from proxy.rules import UNREADABLE, Rule, UsageSpec
from proxy.rules.model import SourceKind
from proxy.rules.quantity import parse_number
from proxy.rules.sse import lookup
from proxy.units import CreditRate, UnitError, cost_micro, to_micro

PERCENTILE = 95
WINDOW = 256
MIN_SAMPLES = 8
RECOMPUTE_EVERY = 32
MAX_CACHED_RULES = 4096


def high_percentile(samples: Sequence[int], pct: int) -> int:
    """Nearest-rank percentile: the smallest sample with at least ``pct``% of the samples at
    or below it. ``samples`` must not be empty."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(pct * len(ordered) / 100))
    return ordered[rank - 1]


class Estimator:
    """The reservation for one (rule, meter): a bounded window of measured quantities."""

    __slots__ = ("_next", "cost", "floor", "learned", "micro", "rate", "samples", "seen")

    def __init__(self, floor: int, rate: CreditRate) -> None:
        self.samples: list[int] = []
        self._next = 0
        self.seen = 0
        self.learned: int | None = None
        self.floor = floor
        self.rate = rate
        self.micro = floor
        self.cost = cost_micro(floor, rate)

    def configure(self, floor: int, rate: CreditRate) -> None:
        """A rules reload: keep what was learned, take the new floor and rate."""
        self.floor, self.rate = floor, rate
        self._update()

    def observe(self, micro: int) -> None:
        if len(self.samples) < WINDOW:
            self.samples.append(micro)
        else:
            self.samples[self._next] = micro
            self._next = (self._next + 1) % WINDOW
        self.seen += 1
        if self.seen >= MIN_SAMPLES and (self.seen == MIN_SAMPLES
                                         or self.seen % RECOMPUTE_EVERY == 0):
            self.learned = high_percentile(self.samples, PERCENTILE)
            self._update()

    def _update(self) -> None:
        micro = self.floor if self.learned is None else max(self.floor, self.learned)
        if micro != self.micro or self.cost != cost_micro(micro, self.rate):
            self.micro = micro
            self.cost = cost_micro(micro, self.rate)


def hint_micro(u: UsageSpec, request_json: object, headers: Mapping[str, str],
               query: Mapping[str, str]) -> int | None:
    """The quantity a request says it will use at most (``reserve_from``), in raw micro-units
    (the unit requests are recorded and credits charged in); None when the rule names no
    hint or the request has none."""
    src = u.reserve_from
    if src is None:
        return None
    raw: object
    if src.kind is SourceKind.REQUEST_JSON:
        raw = UNREADABLE if request_json is UNREADABLE else lookup(request_json, src.path)
    elif src.kind is SourceKind.REQUEST_HEADER:
        raw = headers.get(src.name, UNREADABLE)
    elif src.kind is SourceKind.REQUEST_QUERY:
        raw = query.get(src.name, UNREADABLE)
    else:
        return None
    d = parse_number(raw)
    if d is None:
        return None
    try:
        return to_micro(d)          # raw units, as recorded (transforms round period totals)
    except (ArithmeticError, UnitError, ValueError):
        return None


class RuleReserve:
    """A rule's admission cost: the constant quantities' cost plus each estimator's cost."""

    __slots__ = ("constant", "estimators", "hinted", "rule")

    def __init__(self, rule: Rule, constant: int, estimators: dict[str, Estimator],
                 hinted: tuple[tuple[UsageSpec, Estimator], ...]) -> None:
        self.rule = rule                        # held: its id cannot be reused while cached
        self.constant = constant
        self.estimators = estimators            # meter -> estimator (variable quantities)
        self.hinted = hinted                    # specs with reserve_from

    def cost(self) -> int:
        total = self.constant
        for e in self.estimators.values():
            total += e.cost
        return total

    def hint_extra(self, request_json: object, headers: Mapping[str, str],
                   query: Mapping[str, str]) -> int:
        """Micro-credits to hold on top of ``cost()`` once the request's hints are known
        (never negative: a hint below what is already held reserves nothing less)."""
        extra = 0
        for u, e in self.hinted:
            h = hint_micro(u, request_json, headers, query)
            if h is not None and h > e.micro:
                extra += cost_micro(h, e.rate) - e.cost
        return extra


class Reservations:
    """Every rule's reservation, built once per rule object, learning kept across reloads."""

    def __init__(self, default_estimate: int) -> None:
        self.default_estimate = default_estimate
        self._by_rule: dict[int, RuleReserve] = {}
        self._estimators: dict[tuple[str, str], Estimator] = {}

    def for_rule(self, rule: Rule) -> RuleReserve:
        r = self._by_rule.get(id(rule))
        if r is not None and r.rule is rule:
            return r
        if len(self._by_rule) >= MAX_CACHED_RULES:
            self._by_rule.clear()               # old rule sets (reloads); learning is kept
        constant = 0
        ests: dict[str, Estimator] = {}
        hinted: list[tuple[UsageSpec, Estimator]] = []
        for u in rule.usage:
            if u.credits_per_unit is None:
                continue
            if u.source.kind is SourceKind.CONSTANT and u.source.constant is not None:
                constant += cost_micro(to_micro(u.source.constant), u.credits_per_unit)
                continue
            floor = u.estimate_micro if u.estimate_micro is not None else self.default_estimate
            key = (rule.name, u.meter)
            e = self._estimators.get(key)
            if e is None:
                e = self._estimators[key] = Estimator(floor, u.credits_per_unit)
            else:
                e.configure(floor, u.credits_per_unit)
            ests[u.meter] = e
            if u.reserve_from is not None:
                hinted.append((u, e))
        r = RuleReserve(rule, constant, ests, tuple(hinted))
        self._by_rule[id(rule)] = r
        return r

    def quantities(self, rule: Rule, request_json: object = None,
                   headers: Mapping[str, str] | None = None,
                   query: Mapping[str, str] | None = None) -> list[tuple[str, int]]:
        """(meter, micro-units) a request of ``rule`` holds at admission, for the monetary
        mode (which prices quantities, not ``credits:`` rates): constants as they are, other
        usages the learned reservation (the floor for a usage without a ``credits:`` rate),
        raised to the request's ``reserve_from`` hint when ``headers`` are given."""
        r = self.for_rule(rule)
        out: list[tuple[str, int]] = []
        for u in rule.usage:
            if u.source.kind is SourceKind.CONSTANT and u.source.constant is not None:
                out.append((u.meter, to_micro(u.source.constant)))
                continue
            e = r.estimators.get(u.meter)
            micro = e.micro if e is not None else (
                u.estimate_micro if u.estimate_micro is not None else self.default_estimate)
            if headers is not None:
                h = hint_micro(u, request_json, headers, query or {})
                if h is not None and h > micro:
                    micro = h
            out.append((u.meter, micro))
        return out
