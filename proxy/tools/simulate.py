"""``meterproxy simulate``: what-if re-rating of recorded requests through a candidate rules file.

Owns: the re-rating core (:func:`rerate`, pure: audit rows + old RuleSet + new RuleSet ->
:class:`Simulation`), reading a period's audit rows (:func:`audit_rows`, :func:`run`) and
the table / JSON reports.

How a recorded request is re-rated (README "Prices, billing periods and what consumers see"):
- OLD charges price the recorded *billable* micro-units per meter (what credits did not cover)
  with the prices of the old rules (the rules configured now), one line per meter, exactly as
  the invoice does (``proxy.pricing.period_charges``).
- NEW: the request's method and path are matched again against the candidate rules. Header
  and query conditions are not in the audit: a condition is taken as met when the rule that
  priced the request (in its own recorded version) had it, as not met when an earlier rule
  that was skipped had it, and otherwise as not met, and the request is counted ``uncertain``.
- If the candidate routes the request to a rule of another name, it is ``rerouted``.
- Each usage line of the new rule: a constant quantity is recomputed; any other source keeps
  the recorded quantity of the same meter (the audit holds no bodies or headers to re-read);
  a source whose meter the request never recorded counts as ``missing`` (0).
- Credits coverage is kept as recorded: the micro-units credits covered stay covered, so
  new billable = max(0, new quantity - recorded covered).
- A request the new rule does not bill (no rule, no usage, or count_when excludes the recorded
  status) is ``unmetered``. Requests the old rules did not meter are not in the audit, so a
  candidate that would start billing them cannot be simulated.
- Usage of meters the candidate file no longer has is dropped and reported.
- Prices are the rules files' own ``price:`` blocks; a meter known only by ``price_id`` is
  unpriced here (the simulation does not call Stripe).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Any

from proxy.pricing import Price, exact_amount, fmt_minor, meter_prices, period_charges, whole_units
from proxy.rules import UNREADABLE, Matcher, Measurement, Rule, RuleSet, SourceKind, compute
from proxy.store.protocols import Storage
from proxy.timeutil import rfc3339
from proxy.tools.explain import conditions, stored_version, structural
from proxy.transform import transformed_units
from proxy.units import QSCALE, fmt_micro

__all__ = ["AuditRow", "CustomerSim", "Rerater", "Simulation", "render_table", "rerate",
           "run", "to_json"]


@dataclass(frozen=True, slots=True)
class AuditRow:
    """One audit row (one request and meter). Quantities in micro-units."""

    request_id: str
    at_ms: int
    customer_id: str
    rule: str
    rules_version: str
    status: int
    meter: str
    quantity: int
    billable: int
    method: str = ""
    path: str = ""
    flags: str = ""


@dataclass(slots=True)
class CustomerSim:
    customer: str
    requests: int = 0
    rerouted: int = 0
    unmetered: int = 0
    uncertain: int = 0
    recomputed: int = 0     # usage lines recomputed from a constant quantity
    kept: int = 0           # usage lines that kept the recorded quantity
    missing: int = 0        # usage lines the audit cannot give a quantity for (0 used)
    old_billable: dict[str, int] = field(default_factory=dict)
    new_billable: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)   # meters the new file lacks
    old_charges: dict[str, int] = field(default_factory=dict)
    new_charges: dict[str, int] = field(default_factory=dict)
    old_exact: dict[str, Fraction] = field(default_factory=dict)
    new_exact: dict[str, Fraction] = field(default_factory=dict)

    def meters(self) -> list[str]:
        return sorted(set(self.old_billable) | set(self.new_billable) | set(self.old_charges)
                      | set(self.new_charges))


@dataclass(slots=True)
class Simulation:
    old_version: str
    new_version: str
    old_prices: dict[str, Price]
    new_prices: dict[str, Price]
    customers: dict[str, CustomerSim] = field(default_factory=dict)
    reroutes: Counter[tuple[str, str]] = field(default_factory=Counter)
    ledger_mismatch: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)


# ------------------------------------------------------------------ routing without headers


class _Router:
    """Re-matches a recorded request (method, path) in the new rules; see the module doc."""

    def __init__(self, new: RuleSet, priced_by: Mapping[str, RuleSet], old: RuleSet) -> None:
        self.new = new
        self.priced_by = priced_by
        self.old = old
        self._structural: dict[int, Matcher] = {}

    def _fits(self, rule: Rule, method: str, path: str) -> bool:
        m = self._structural.get(id(rule))
        if m is None:
            m = self._structural[id(rule)] = structural(rule.matcher)
        return self.new.fits(m, method, path) is not None

    def route(self, method: str, path: str, rule_name: str,
              version: str) -> tuple[Rule | None, bool]:
        """(the new rule, whether header/query conditions made the answer a guess)."""
        if not method and not path:   # not recorded: assume the rule of the same name
            return next((r for r in self.new.rules if r.name == rule_name), None), True
        priced = self.priced_by.get(version, self.old)
        met: set[tuple[str, str, str | None]] = set()
        failed: list[frozenset[tuple[str, str, str | None]]] = []
        for r in priced.rules:
            if r.name == rule_name:
                met.update(conditions(r.matcher))
                break
            if conditions(r.matcher) and self._fits(r, method, path):
                failed.append(frozenset(conditions(r.matcher)))
        uncertain = False
        for r in self.new.rules:
            if not self._fits(r, method, path):
                continue
            conds = frozenset(conditions(r.matcher))
            if conds <= met:
                return r, uncertain
            if any(f <= conds for f in failed):
                continue    # a superset of conditions that failed: cannot be met
            uncertain = True
        return None, uncertain


_BLANK = Measurement(status=200, request_headers={}, response_headers={}, query={},
                     path_params={}, request_json=UNREADABLE, response_body=None,
                     request_bytes=0, response_bytes=0, duration_ms=Decimal(0))


def _key(r: AuditRow) -> tuple[Any, ...]:
    return (r.request_id, r.at_ms, r.customer_id, r.rule, r.rules_version, r.status, r.method,
            r.path)


def _add(d: dict[str, int], k: str, v: int) -> None:
    d[k] = d.get(k, 0) + v


def rerate(rows: Iterable[AuditRow], old: RuleSet, new: RuleSet,
           priced_by: Mapping[str, RuleSet] | None = None) -> Simulation:
    """Re-rate recorded requests through ``new``; pure. ``rows`` must keep the rows of one
    request together (audit ``seq`` order does). ``priced_by`` maps a rules version to its
    RuleSet (for the header/query inference); a version not in it falls back to ``old``."""
    r = Rerater(old, new, priced_by)
    for _, group in itertools.groupby(rows, key=_key):
        r.add(list(group))
    return r.finish()


class Rerater:
    """``rerate`` one request at a time (for rows that arrive in batches)."""

    def __init__(self, old: RuleSet, new: RuleSet,
                 priced_by: Mapping[str, RuleSet] | None = None) -> None:
        self.old, self.new = old, new
        self.sim = Simulation(old.version, new.version, meter_prices(old.meters),
                              meter_prices(new.meters))
        self.router = _Router(new, priced_by or {}, old)

    def add(self, items: list[AuditRow]) -> None:
        """The audit rows of one request."""
        sim, new = self.sim, self.new
        first = items[0]
        c = sim.customers.get(first.customer_id)
        if c is None:
            c = sim.customers[first.customer_id] = CustomerSim(first.customer_id)
        c.requests += 1
        for it in items:
            _add(c.old_billable, it.meter, it.billable)
            if it.meter not in new.meters:
                _add(c.dropped, it.meter, it.billable)
        rule, uncertain = self.router.route(first.method, first.path, first.rule,
                                            first.rules_version)
        c.uncertain += uncertain
        if rule is None or rule.name != first.rule:
            sim.reroutes[(first.rule, rule.name if rule is not None else "(no rule)")] += 1
            c.rerouted += rule is not None
        if rule is None or not rule.usage or not rule.count_when.matches(first.status):
            c.unmetered += 1
            return
        constants = compute(rule, _BLANK)
        unused = list(items)
        for spec, const in zip(rule.usage, constants, strict=True):
            rec = next((it for it in unused if it.meter == spec.meter), None)
            if rec is not None:
                unused.remove(rec)
            if spec.source.kind is SourceKind.CONSTANT:
                covered = rec.quantity - rec.billable if rec is not None else 0
                c.recomputed += 1
                _add(c.new_billable, spec.meter, max(0, const.micro - covered))
            elif rec is not None:
                c.kept += 1
                _add(c.new_billable, spec.meter, rec.billable)
            else:
                c.missing += 1
                _add(c.new_billable, spec.meter, 0)

    def finish(self) -> Simulation:
        sim, old, new = self.sim, self.old, self.new
        for c in sim.customers.values():
            # a meter's transform rounds the period total (proxy.transform), under each rules set
            old_b = _billed(old, c.old_billable)
            new_b = _billed(new, c.new_billable)
            c.old_charges = period_charges(sim.old_prices, old_b)
            c.new_charges = period_charges(sim.new_prices, new_b)
            c.old_exact = {m: exact_amount(p, whole_units(old_b.get(m, 0)))
                           for m, p in sim.old_prices.items()}
            c.new_exact = {m: exact_amount(p, whole_units(new_b.get(m, 0)))
                           for m, p in sim.new_prices.items()}
        return sim


def _billed(rules: RuleSet, billable: Mapping[str, int]) -> dict[str, int]:
    out = dict(billable)
    for m, v in billable.items():
        meter = rules.meters.get(m)
        if meter is not None and meter.transform is not None:
            out[m] = transformed_units(v, meter.transform) * QSCALE
    return out


# ------------------------------------------------------------------ reading the database


async def run(storage: Storage, old: RuleSet, new: RuleSet, start: float, end: float,
              customers: Sequence[str] | None = None) -> Simulation:
    """Re-rate the period [start, end) and compare the audit with the ledger's aggregates.
    The audit is read in batches (commit order keeps a request's rows together)."""
    priced_by = {}
    for v in await storage.usage.audit_versions(start, end):
        sv = await stored_version(storage.rules, v)
        if sv.rules is not None:
            priced_by[v] = sv.rules
    r = Rerater(old, new, priced_by)
    group: list[AuditRow] = []
    async for batch in storage.usage.audit_stream(None, start, end, customers):
        for a in batch:
            row = AuditRow(a.request_id, a.at_ms, a.customer_id, a.rule, a.rules_version,
                           a.status, a.meter, a.quantity, a.billable, a.method, a.path, a.flags)
            if group and _key(group[-1]) != _key(row):
                r.add(group)
                group = []
            group.append(row)
    if group:
        r.add(group)
    sim = r.finish()
    if start % 60 == 0 and end % 60 == 0:   # minute-aligned: usage_minute covers the same rows
        for (cust, meter), billable in (await storage.usage.billable(int(start),
                                                                      int(end))).items():
            c = sim.customers.get(cust)
            if customers and cust not in customers:
                continue
            audited = c.old_billable.get(meter, 0) if c is not None else 0
            if audited != billable:
                sim.ledger_mismatch[(cust, meter)] = (audited, billable)
    return sim


# ------------------------------------------------------------------ reports


def _exact(fr: Fraction) -> str:
    """An exact amount in minor units as a decimal string (prices have <= 12 decimals)."""
    scaled = fr * 10 ** 12
    if scaled.denominator != 1:
        return str(fr)
    return format(Decimal(int(scaled)).scaleb(-12).normalize(), "f")


def _line(sim: Simulation, c: CustomerSim, meter: str) -> dict[str, Any]:
    op, np_ = sim.old_prices.get(meter), sim.new_prices.get(meter)
    old, new = c.old_charges.get(meter), c.new_charges.get(meter)
    out: dict[str, Any] = {"meter": meter,
                           "old_billable": fmt_micro(c.old_billable.get(meter, 0)),
                           "new_billable": fmt_micro(c.new_billable.get(meter, 0)),
                           "old_currency": op.currency if op else None,
                           "new_currency": np_.currency if np_ else None,
                           "old_minor": old, "new_minor": new,
                           "old": fmt_minor(old, op.currency) if op and old is not None else None,
                           "new": fmt_minor(new, np_.currency) if np_ and new is not None
                           else None,
                           "old_exact_minor": _exact(c.old_exact[meter]) if meter in c.old_exact
                           else None,
                           "new_exact_minor": _exact(c.new_exact[meter]) if meter in c.new_exact
                           else None,
                           "delta": None, "delta_minor": None}
    priced = op or np_
    cur = priced.currency if priced is not None else None
    if cur is not None and (op is None or op.currency == cur) and \
            (np_ is None or np_.currency == cur):
        d = (new or 0) - (old or 0)
        out.update(delta_minor=d, delta=("+" if d > 0 else "") + fmt_minor(d, cur), currency=cur)
    return out


def _totals(lines: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    by: dict[str, list[int]] = {}
    for ln in lines:
        if ln.get("currency") is None:
            continue
        t = by.setdefault(ln["currency"], [0, 0])
        t[0] += ln["old_minor"] or 0
        t[1] += ln["new_minor"] or 0
    return {cur: {"old_minor": o, "new_minor": n, "old": fmt_minor(o, cur),
                  "new": fmt_minor(n, cur), "delta_minor": n - o,
                  "delta": ("+" if n > o else "") + fmt_minor(n - o, cur)}
            for cur, (o, n) in sorted(by.items())}


def to_json(sim: Simulation, start: float, end: float, old_label: str = "",
            new_label: str = "") -> dict[str, Any]:
    customers = []
    for cid in sorted(sim.customers):
        c = sim.customers[cid]
        lines = [_line(sim, c, m) for m in c.meters()]
        customers.append({
            "customer": cid, "requests": c.requests, "rerouted": c.rerouted,
            "unmetered": c.unmetered, "uncertain": c.uncertain, "recomputed": c.recomputed,
            "kept": c.kept, "missing": c.missing,
            "dropped_meters": {m: fmt_micro(q) for m, q in sorted(c.dropped.items())},
            "lines": lines, "totals": _totals(lines)})
    unpriced_old = sorted({m for c in sim.customers.values() for m, q in c.old_billable.items()
                           if q and m not in sim.old_prices})
    unpriced_new = sorted({m for c in sim.customers.values() for m, q in c.new_billable.items()
                           if q and m not in sim.new_prices})
    return {
        "from": rfc3339(start), "to": rfc3339(end),
        "old": {"version": sim.old_version, "source": old_label},
        "new": {"version": sim.new_version, "source": new_label},
        "customers": customers,
        "reroutes": [{"from_rule": a, "to_rule": b, "requests": n}
                     for (a, b), n in sorted(sim.reroutes.items())],
        "unpriced_meters": {"old": unpriced_old, "new": unpriced_new},
        "ledger_mismatch": [{"customer": c, "meter": m, "audit_billable": fmt_micro(a),
                             "ledger_billable": fmt_micro(b)}
                            for (c, m), (a, b) in sorted(sim.ledger_mismatch.items())],
    }


def render_table(report: Mapping[str, Any]) -> str:
    out = [f"simulate {report['from']} .. {report['to']}",
           f"  old rules {report['old']['version']}  {report['old']['source']}",
           f"  new rules {report['new']['version']}  {report['new']['source']}", ""]
    head = ("customer", "meter", "billable old", "billable new", "old", "new", "delta")
    rows: list[tuple[str, ...]] = [head]
    notes: list[str] = []
    for c in report["customers"]:
        for ln in c["lines"]:
            cur = ln.get("currency") or ln["new_currency"] or ln["old_currency"] or ""
            rows.append((c["customer"], ln["meter"], ln["old_billable"], ln["new_billable"],
                         ln["old"] or "-", ln["new"] or "-",
                         f"{ln['delta']} {cur}" if ln["delta"] is not None else "(currency changed)"))
        for cur, t in c["totals"].items():
            rows.append((c["customer"], "TOTAL", "", "", t["old"], t["new"], f"{t['delta']} {cur}"))
        notes.append(f"{c['customer']}: {c['requests']} requests, {c['rerouted']} rerouted, "
                     f"{c['unmetered']} no longer metered, {c['uncertain']} uncertain "
                     f"(header/query conditions), {c['recomputed']} quantities recomputed, "
                     f"{c['kept']} kept as recorded, {c['missing']} missing")
        if c["dropped_meters"]:
            notes.append(f"{c['customer']}: dropped (meter not in the new file): "
                         + ", ".join(f"{m} {q}" for m, q in c["dropped_meters"].items()))
    if len(rows) == 1:
        out.append("no metered requests in this period")
    else:
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        for r in rows:
            out.append("  ".join(v.ljust(w) if i < 2 else v.rjust(w)
                                 for i, (v, w) in enumerate(zip(r, widths, strict=True))).rstrip())
    out.append("")
    out.extend(notes)
    for r in report["reroutes"]:
        out.append(f"rerouted: {r['from_rule']} -> {r['to_rule']}: {r['requests']} requests")
    for side in ("old", "new"):
        if report["unpriced_meters"][side]:
            out.append(f"unpriced in the {side} rules (no price: block): "
                       + ", ".join(report["unpriced_meters"][side]))
    for m in report["ledger_mismatch"]:
        out.append(f"warning: {m['customer']} {m['meter']}: audit billable "
                   f"{m['audit_billable']} != ledger {m['ledger_billable']} (audit rows pruned "
                   "or not yet materialized?)")
    return "\n".join(out) + "\n"
