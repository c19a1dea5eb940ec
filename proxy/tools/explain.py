"""``meterproxy explain REQUEST_ID``: which rule and rules version priced a request, and why.

Owns: reading a stored rules version back (:func:`stored_version`, also used by
``proxy.tools.simulate``) and the explanation of one request id (:func:`explain`,
:func:`render_text`).

Invariants:
- Read only: nothing here writes to the database.
- The rules are the exact text of the version that priced the request (``rules_versions``),
  loaded with the ordinary loader from a temporary directory (same bytes, same version
  hash); the rules package is not changed for this.
- Honest about what cannot be known: the audit records method, path and status, not the
  request's headers or query string, so header/query conditions are shown but never
  claimed to have been re-checked.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from proxy.rules import Matcher, Rule, RulesError, RuleSet, SourceKind, UsageSpec, load_rules
from proxy.store.protocols import RulesHistory, Storage
from proxy.timeutil import rfc3339
from proxy.units import cost_micro, fmt_micro
from proxy.yamlpos import YamlError, load_yaml

__all__ = [
    "StoredVersion",
    "conditions",
    "explain",
    "load_rules_text",
    "render_text",
    "stored_version",
    "structural",
]

FLAG_MEANING = {
    "unreadable": "the quantity could not be read (missing, not a number, body too large, ...): "
                  "the usage's fallback (its on_unreadable, else the reservation) was recorded "
                  "instead",
    "fallback_compressed_too_large": "the body came compressed (the upstream ignored "
                                     "Accept-Encoding: identity) and decoded to more than the "
                                     "inspection bound",
    "fallback_over_cap": "the body was over max_inspect_bytes and the key scan did not find "
                         "the value",
    "fallback_stream_abandoned": "the response ended early (consumer disconnected or upstream "
                                 "cut it) before the value was delivered",
    "fallback_no_usage_event": "the event stream ended without an event carrying the value",
    "fallback_unreadable": "the value was absent, not a valid quantity, or the body was "
                           "malformed or undecodable",
    "abandoned": "the consumer disconnected before the end of the response: billed for what "
                 "was measured up to then",
    "upstream_aborted": "the upstream died in the middle of the body: billed for what was "
                        "delivered (the upstream's status) if part of it reached the "
                        "consumer, else recorded as status 502",
}


# ------------------------------------------------------------------ stored rules versions


@dataclass(frozen=True, slots=True)
class StoredVersion:
    """A rules version as kept in ``rules_versions``. ``rules`` is None when its text was not
    recorded (a database from before versions were kept) or no longer loads; ``problem``
    says which. ``names`` maps the loader's file names back to the original ones."""

    version: str
    files: tuple[tuple[str, str], ...] = ()
    rules: RuleSet | None = None
    problem: str | None = None
    first_loaded_at: int | None = None
    names: Mapping[str, str] = field(default_factory=dict)

    def file_of(self, rule: Rule) -> str:
        return self.names.get(rule.file, rule.file)

    def text_of(self, rule: Rule) -> str | None:
        name = self.file_of(rule)
        return next((t for f, t in self.files if f == name), None)


def load_rules_text(files: Sequence[tuple[str, str]]) -> tuple[RuleSet, dict[str, str]]:
    """Load rules from ``(file name, text)`` pairs, in order, through a temporary directory.

    Returns the RuleSet and a map from the loaded file names to the given ones. Raises
    :class:`RulesError` when the text does not load."""
    with tempfile.TemporaryDirectory(prefix="meterproxy-rules-") as tmp:
        paths: list[Path] = []
        names: dict[str, str] = {}
        for i, (name, text) in enumerate(files):
            p = Path(tmp) / str(i) / (Path(name).name or "rules.yaml")
            p.parent.mkdir()
            p.write_bytes(text.encode("utf-8"))
            paths.append(p)
            names[str(p)] = name
        try:
            rules = load_rules(paths)
        except RulesError as exc:
            raise RulesError([replace(p, file=names.get(p.file, p.file))
                              for p in exc.problems]) from exc
    return rules, names


async def stored_version(history: RulesHistory, version: str) -> StoredVersion:
    rec = await history.get(version)
    if rec is None:
        return StoredVersion(version, problem="the text of this rules version was not recorded "
                             "(the database is older than the rules_versions table, or the "
                             "version was never loaded by this database's proxy)")
    row = (rec.files, rec.first_loaded_at)
    files = tuple((str(f["file"]), str(f["text"])) for f in orjson.loads(row[0]))
    try:
        rules, names = load_rules_text(files)
    except RulesError as exc:
        return StoredVersion(version, files, problem="the recorded text no longer loads: "
                             + "; ".join(str(p) for p in exc.problems),
                             first_loaded_at=row[1])
    problem = None if rules.version == version else \
        f"the recorded text hashes to {rules.version}, not {version}"
    return StoredVersion(version, files, rules, problem, row[1], names)


# ------------------------------------------------------------------ matching, explained


def structural(m: Matcher) -> Matcher:
    """The part of a matcher that the audit lets us re-check: methods, path, path params."""
    return replace(m, headers=(), query=())


def conditions(m: Matcher) -> tuple[tuple[str, str, str | None], ...]:
    """The header and query conditions (not recorded, so never re-checkable), comparable."""
    return tuple(("header", n, p.pattern if p is not None else None) for n, p in m.headers) \
        + tuple(("query", n, p.pattern if p is not None else None) for n, p in m.query)


def _plain(v: Any) -> Any:
    if isinstance(v, Decimal):
        return str(v)
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def _written_match(sv: StoredVersion, rule: Rule) -> dict[str, Any] | None:
    """The rule's ``match:`` block exactly as written (globs and all), from the stored text."""
    text = sv.text_of(rule)
    if text is None:
        return None
    try:
        data = load_yaml(text).data
    except YamlError:
        return None
    items = data.get("rules") if isinstance(data, Mapping) else None
    for item in items if isinstance(items, list) else []:
        if isinstance(item, Mapping) and item.get("name") == rule.name:
            m = item.get("match")
            return _plain(m) if isinstance(m, Mapping) else {}
    return None


def match_json(sv: StoredVersion, rule: Rule) -> dict[str, Any]:
    written = _written_match(sv, rule)
    if written is not None:
        out: dict[str, Any] = {"methods": written.get("methods", "any"),
                               "path": written.get("path", "any")}
        for k in ("params", "headers", "query"):
            if k in written:
                out[k] = written[k]
        return out
    m = rule.matcher
    out = {"methods": sorted(m.methods) if m.methods is not None else "any",
           "path": m.template.text if m.template is not None else "any"}
    for kind, key in (("params", m.params), ("headers", m.headers), ("query", m.query)):
        if key:
            out[kind] = {n: (p.pattern if p is not None else True) for n, p in key}
    return out


def _why(rules: RuleSet, rule: Rule, method: str, path: str) -> dict[str, Any]:
    if not method and not path:
        return {"rematch": None, "first_match": None,
                "notes": ["method and path were not recorded for this request (audit rows "
                          "from before they were kept): the match cannot be re-run"]}
    found = rules.match(method, path, {}, {})
    first = found.rule.name if found is not None else None
    notes: list[str] = []
    consistent = True
    for r in rules.rules:
        if r is rule:
            break
        if rules.fits(structural(r.matcher), method, path) is None:
            continue
        if conditions(r.matcher):
            notes.append(f"the earlier rule '{r.name}' also matches {method} {path} by method "
                         "and path; it was skipped, so its header/query conditions were not met "
                         "(they are not recorded and cannot be re-checked)")
        else:
            consistent = False
            notes.append(f"the earlier rule '{r.name}' matches {method} {path} with no other "
                         "condition, so it would have been chosen: the audit row does not fit "
                         "this version (path truncated or rewritten?)")
    own = rules.fits(structural(rule.matcher), method, path)
    if own is None:
        consistent = False
        notes.append(f"{method} {path} does not match this rule's methods/path/params in this "
                     "version (the recorded path may have been truncated)")
    elif conditions(rule.matcher):
        notes.append("the rule matches by method, path and path params; it also has "
                     "header/query conditions, which the request met but the audit does not "
                     "record, so they cannot be re-checked here")
    elif first == rule.name:
        notes.append(f"re-matching {method} {path} (no headers, no query) against this version "
                     f"picks '{rule.name}': it is the first rule that matches by method and path")
    if own is not None and own:
        notes.append("path params: " + ", ".join(f"{k}={v}" for k, v in own.items()))
    return {"rematch": f"{method} {path}", "first_match": first,
            "same_rule": first == rule.name, "consistent": consistent, "notes": notes}


def _usage_json(u: UsageSpec) -> dict[str, Any]:
    src = u.source
    text = f"preset {src.text}" if src.kind is SourceKind.PRESET else src.text
    return {"meter": u.meter, "quantity_source": text,
            "credits_per_unit": str(u.credits_per_unit) if u.credits_per_unit is not None
            else None,
            "transform": {"divide_by": u.transform.divide_by, "round": u.transform.round}
            if u.transform is not None else None,
            "on_unreadable": _fallback_text(u),
            "estimate": fmt_micro(u.estimate_micro) if u.estimate_micro is not None else None,
            "line": u.line}


def _fallback_text(u: UsageSpec) -> str:
    """What an unreadable quantity of ``u`` bills: on_unreadable, else the reservation."""
    if u.on_unreadable_micro is not None:
        return fmt_micro(u.on_unreadable_micro)
    if u.estimate_micro is not None:
        return f"unset: the reservation, estimate {fmt_micro(u.estimate_micro)}"
    return "unset: the reservation, credits.default_estimate"


def _flags(flags: str, spec: UsageSpec | None) -> list[dict[str, str]]:
    out = []
    for f in (x for x in flags.split(",") if x):
        meaning = FLAG_MEANING.get(f, "")
        if f == "unreadable" and spec is not None:
            meaning += f" ({_fallback_text(spec)})"
        out.append({"flag": f, "meaning": meaning})
    return out


# ------------------------------------------------------------------ explain


def _time(at_ms: int) -> str:
    return rfc3339(at_ms / 1000)[:-1] + f".{at_ms % 1000:03d}Z"


async def explain(storage: Storage, request_id: str) -> list[dict[str, Any]]:
    """One explanation per metered request with this id (ids sent by clients may repeat).

    Raises LookupError when the audit has no row for the id."""
    rows = [(a.at_ms, a.customer_id, a.key_id, a.rule, a.rules_version, a.status, a.meter,
             a.quantity, a.credits, a.billable, a.flags, a.method, a.path)
            for a in await storage.usage.audit_for_request(request_id)]
    if not rows:
        raise LookupError(
            f"no metered request with id {request_id!r} in the audit (requests that no rule "
            "meters, or whose status count_when does not bill, are not recorded; audit rows "
            "older than storage.audit_retention are pruned)")
    groups: dict[tuple[Any, ...], list[tuple[Any, ...]]] = {}
    for r in rows:
        groups.setdefault((r[0], r[1], r[2], r[3], r[4], r[5], r[11], r[12]), []).append(r[6:11])
    versions: dict[str, StoredVersion] = {}
    out = []
    for (at_ms, cust, key, rule_name, version, status, method, path), items in groups.items():
        if version not in versions:
            versions[version] = await stored_version(storage.rules, version)
        sv = versions[version]
        out.append(_one(request_id, at_ms, cust, key, rule_name, sv, status, method, path, items))
    return out


def _one(rid: str, at_ms: int, cust: str, key: str, rule_name: str, sv: StoredVersion,
         status: int, method: str, path: str, items: list[tuple[Any, ...]]) -> dict[str, Any]:
    ex: dict[str, Any] = {
        "request_id": rid, "customer": cust, "key": key, "time": _time(at_ms),
        "method": method or None, "path": path or None, "status": status,
        "rule": rule_name, "rules_version": sv.version,
        "version_first_loaded": rfc3339(sv.first_loaded_at) if sv.first_loaded_at else None,
        "version_files": [f for f, _ in sv.files], "version_problem": sv.problem,
    }
    rule = None
    if sv.rules is not None:
        rule = next((r for r in sv.rules.rules if r.name == rule_name), None)
        if rule is None:
            ex["version_problem"] = f"rule '{rule_name}' is not in the recorded text of version " \
                                    f"{sv.version}"
    specs: list[UsageSpec] = list(rule.usage) if rule is not None else []
    if rule is not None and sv.rules is not None:
        ex["defined_at"] = f"{sv.file_of(rule)}:{rule.line}"
        ex["description"] = rule.description
        ex["match"] = match_json(sv, rule)
        ex["why"] = _why(sv.rules, rule, method, path)
        cw = rule.count_when
        ex["count_when"] = {"statuses": list(cw.text), "status": status,
                            "billable": cw.matches(status)}
    usage = []
    used: set[int] = set()
    for meter, q, credits, billable, flags in items:
        i = next((i for i, s in enumerate(specs) if s.meter == meter and i not in used), None)
        spec = specs[i] if i is not None else None
        if i is not None:
            used.add(i)
        u: dict[str, Any] = _usage_json(spec) if spec is not None else {"meter": meter}
        u["recorded"] = {"quantity": fmt_micro(q), "credits": fmt_micro(credits),
                         "billable": fmt_micro(billable),
                         "covered_by_credits": fmt_micro(q - billable),
                         "flags": _flags(flags, spec)}
        if spec is not None and spec.credits_per_unit is not None:
            u["recorded"]["cost_at_credits_per_unit"] = fmt_micro(
                cost_micro(q, spec.credits_per_unit))
        usage.append(u)
    ex["usage"] = usage
    return ex


def _fmt_match(m: Mapping[str, Any]) -> str:
    def val(v: Any) -> str:
        if isinstance(v, list):
            return ",".join(str(x) for x in v)
        if isinstance(v, Mapping):
            return ", ".join(f"{k}={'(present)' if x is True else x}" for k, x in v.items())
        return str(v)
    return "; ".join(f"{k} {val(v)}" for k, v in m.items())


def render_text(explanations: Sequence[Mapping[str, Any]]) -> str:
    out: list[str] = []
    if len(explanations) > 1:
        out.append(f"{len(explanations)} metered requests share this id (a client-supplied "
                   "X-Request-Id); each is explained below.\n")
    for ex in explanations:
        out.append(f"request   {ex['request_id']}")
        out.append(f"customer  {ex['customer']}   key {ex['key']}")
        out.append(f"time      {ex['time']}")
        req = f"{ex['method']} {ex['path']}" if ex["method"] else "(method and path not recorded)"
        out.append(f"request   {req}   status {ex['status']}")
        where = f", {ex['defined_at']}" if ex.get("defined_at") else ""
        out.append(f"rule      {ex['rule']}   (rules version {ex['rules_version']}{where})")
        if ex.get("version_first_loaded"):
            out.append(f"version   first loaded {ex['version_first_loaded']}; files: "
                       + ", ".join(ex["version_files"]))
        if ex.get("version_problem"):
            out.append(f"note      {ex['version_problem']}; showing what the audit recorded")
        if ex.get("description"):
            out.append(f"          {ex['description']}")
        if "match" in ex:
            out.append(f"match     {_fmt_match(ex['match'])}")
            why = ex["why"]
            if why["rematch"] is not None:
                out.append(f"why       RuleSet.match({why['rematch']}, no headers, no query) -> "
                           f"{why['first_match'] or '(no rule)'}")
            for n in why["notes"]:
                out.append(f"          - {n}")
            cw = ex["count_when"]
            verdict = "billable" if cw["billable"] else "NOT billable under this rule (unexpected)"
            out.append(f"count     count_when [{', '.join(cw['statuses'])}], status "
                       f"{cw['status']}: {verdict}")
        out.append("usage")
        for u in ex["usage"]:
            rec = u["recorded"]
            if "quantity_source" in u:
                extra = [f"quantity {u['quantity_source']}"]
                if u["credits_per_unit"] is not None:
                    extra.append(f"credits/unit {u['credits_per_unit']}")
                if u["transform"] is not None:
                    t = u["transform"]
                    extra.append(f"transform /{t['divide_by']} round {t['round']}")
                extra.append(f"on_unreadable {u['on_unreadable']}")
                out.append(f"  {u['meter']}: " + ", ".join(extra) + f"  (line {u['line']})")
            else:
                out.append(f"  {u['meter']}: (usage spec not available)")
            out.append(f"    recorded quantity {rec['quantity']}, credits {rec['credits']}, "
                       f"billable {rec['billable']}, covered by credits "
                       f"{rec['covered_by_credits']}")
            for f in rec["flags"]:
                out.append(f"    flag {f['flag']}: {f['meaning']}")
        out.append("")
    return "\n".join(out)
