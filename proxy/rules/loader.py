"""Rule files -> :class:`RuleSet`, or every problem with ``file:line:col``.

Owns: reading and validating ``rules/*.yaml`` (format: rules/example.yaml): the schema, meter
prices (a ``price:`` mapping in Stripe's Price field names, checked by
:mod:`proxy.pricing`, and/or a ``price_id``), meter references, path templates,
quantity sources, presets, transforms, count_when, duplicate names and rules shadowed
by an earlier catch-all.

Invariants:
- Validation never stops at the first problem: each file, rule and usage is checked
  independently and every problem is reported, in file order.
- Positions are 1-based and point at the offending key (unknown keys) or value
  (bad values); a missing key points at the mapping that should hold it.
- ``load_rules`` returns a RuleSet only when there are no problems at all.
- Meters from all files merge (a name defined twice is a problem); rules keep file
  order; a file's top-level ``count_when`` is the default for its own rules.
"""

from __future__ import annotations

import difflib
import hashlib
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Literal

from proxy.pricing import Price, price_issues
from proxy.rules.matcher import (
    Matcher,
    Template,
    TemplateError,
    ascii_lower,
    compile_glob,
    compile_template,
)
from proxy.rules.model import (
    DEFAULT_COUNT_WHEN,
    PRESETS,
    CountWhen,
    Meter,
    Problem,
    QuantitySource,
    ResponseNeed,
    Rule,
    RulesError,
    RuleSet,
    SourceKind,
    Transform,
    UsageSpec,
)
from proxy.rules.sse import Probe
from proxy.units import CreditRate, to_micro
from proxy.yamlpos import KeyPath, YamlDoc, YamlError, load_yaml, type_name

__all__ = ["check_rules", "cli_check", "load_rules"]

TOP_KEYS = ("version", "meters", "rules", "count_when", "routing")
ROUTING_KEYS = ("case", "trailing_slash")
ROUTING_VALUES = {"case": ("sensitive", "insensitive"), "trailing_slash": ("strict", "ignore")}
METER_KEYS = ("stripe_event_name", "covered_event_name", "description", "display_name",
              "unit_label", "price", "price_id")
# customer-facing labels (usage page, usage API): one short line of text
LABEL_MAX = {"display_name": 60, "unit_label": 30}
RULE_KEYS = ("name", "match", "auth", "usage", "count_when", "description")
MATCH_KEYS = ("methods", "path", "params", "headers", "query")
USAGE_KEYS = ("meter", "quantity", "preset", "credits", "estimate", "transform", "on_unreadable",
              "reserve_from")
_RESERVE_KINDS = (SourceKind.REQUEST_JSON, SourceKind.REQUEST_HEADER, SourceKind.REQUEST_QUERY)
TRANSFORM_KEYS = ("divide_by", "round")

_SIMPLE_SOURCES = {
    "request.bytes": SourceKind.REQUEST_BYTES,
    "response.bytes": SourceKind.RESPONSE_BYTES,
    "duration_ms": SourceKind.DURATION_MS,
}
_PREFIX_SOURCES = {
    "request.header": SourceKind.REQUEST_HEADER,
    "response.header": SourceKind.RESPONSE_HEADER,
    "request.query": SourceKind.REQUEST_QUERY,
    "path": SourceKind.PATH_PARAM,
    "request.json": SourceKind.REQUEST_JSON,
    "response.json": SourceKind.RESPONSE_JSON,
}
_SOURCE_FORMS = ("request.header.<name>, response.header.<name>, request.query.<name>, "
                 "path.<param>, request.json.<path>, response.json.<path>, request.bytes, "
                 "response.bytes, duration_ms")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_METHOD = re.compile(r"[A-Za-z]+\Z")
_NUMERIC = re.compile(r"\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?\s*\Z")
_CLASS = re.compile(r"([1-5])xx\Z", re.IGNORECASE)


# ------------------------------------------------------------------ helpers


def _suggest(word: str, choices: Iterable[str]) -> str | None:
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


@dataclass(slots=True)
class _File:
    """Per-file validation context: where problems go and how positions are found."""

    name: str
    doc: YamlDoc
    problems: list[Problem]

    def at_value(self, path: KeyPath, message: str) -> None:
        pos = self.doc.value_pos(path)
        self.problems.append(Problem(self.name, pos.line, pos.col, message))

    def at_key(self, path: KeyPath, message: str) -> None:
        pos = self.doc.key_pos(path)
        self.problems.append(Problem(self.name, pos.line, pos.col, message))

    def line(self, path: KeyPath) -> int:
        return self.doc.value_pos(path).line

    def mapping(self, path: KeyPath, value: object, what: str) -> dict[str, object] | None:
        """``value`` as a mapping with string keys, or None after reporting."""
        if not isinstance(value, dict):
            self.at_value(path, f"{what} must be a mapping, got {type_name(value)}")
            return None
        return {str(k): v for k, v in value.items()}

    def keys(self, path: KeyPath, m: Mapping[str, object], allowed: Sequence[str],
             what: str) -> None:
        """Report every key of ``m`` not in ``allowed``, with the closest valid key."""
        for k in m:
            if k in allowed:
                continue
            close = _suggest(k, allowed)
            hint = f"; did you mean '{close}'?" if close else f" (expected: {', '.join(allowed)})"
            self.at_key((*path, k), f"unknown key '{k}' in {what}{hint}")

    def string(self, path: KeyPath, value: object, what: str) -> str | None:
        if not isinstance(value, str) or not value.strip():
            got = "an empty string" if isinstance(value, str) else type_name(value)
            self.at_value(path, f"{what} must be a non-empty string, got {got}")
            return None
        return value

    def number(self, path: KeyPath, value: object, what: str) -> Decimal | None:
        """A finite number >= 0 (int or exact YAML decimal), or None after reporting."""
        if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
            self.at_value(path, f"{what} must be a number, got {type_name(value)} {value!r}")
            return None
        d = Decimal(value)
        if not d.is_finite():
            self.at_value(path, f"{what} must be a finite number, got {value}")
            return None
        if d < 0:
            self.at_value(path, f"{what} must not be negative, got {value}")
            return None
        return d


# ------------------------------------------------------------------ match


def _template(f: _File, path: KeyPath, value: object) -> Template | None:
    text = f.string(path, value, "path")
    if text is None:
        return None
    try:
        return compile_template(text)
    except TemplateError as exc:
        f.at_value(path, f"bad path template {text!r}: {exc}")
        return None


def _methods(f: _File, path: KeyPath, value: object) -> frozenset[str] | None:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        f.at_value(path, "methods must be a non-empty list like [GET, POST] "
                         "(omit it to match any method)")
        return None
    out: set[str] = set()
    for i, m in enumerate(items):
        ipath = path if isinstance(value, str) else (*path, i)
        if not isinstance(m, str) or not _METHOD.match(m):
            f.at_value(ipath, f"bad HTTP method {m!r}")
            continue
        out.add(m.upper())
    return frozenset(out)


def _conds(f: _File, path: KeyPath, value: object,
           what: str) -> tuple[tuple[str, re.Pattern[str] | None], ...]:
    m = f.mapping(path, value, what)
    if m is None:
        return ()
    out: list[tuple[str, re.Pattern[str] | None]] = []
    for name, v in m.items():
        vpath = (*path, name)
        if v is True:
            out.append((name, None))
        elif isinstance(v, (str, int)) and not isinstance(v, bool):
            out.append((name, compile_glob(str(v))))
        else:
            f.at_value(vpath, f"{what} condition '{name}' must be a glob string or true "
                              f"(= present), got {type_name(v)}")
    return tuple(out)


def _params(f: _File, path: KeyPath, value: object,
            template: Template | None) -> tuple[tuple[str, re.Pattern[str]], ...]:
    m = f.mapping(path, value, "params")
    if m is None:
        return ()
    out: list[tuple[str, re.Pattern[str]]] = []
    known = template.params if template is not None else ()
    for name, v in m.items():
        if name not in known:
            have = ", ".join(f"{{{p}}}" for p in known) or "none"
            f.at_key((*path, name), f"params: '{name}' is not a parameter of the path "
                                    f"(path parameters: {have})")
            continue
        if not isinstance(v, (str, int)) or isinstance(v, bool):
            f.at_value((*path, name), f"params: '{name}' must be a glob string, "
                                      f"got {type_name(v)}")
            continue
        out.append((name, compile_glob(str(v))))
    return tuple(out)


def _matcher(f: _File, path: KeyPath, value: object) -> Matcher | None:
    """Compile a ``match:`` block; None if it had problems (already reported)."""
    if value is None:
        return Matcher()
    m = f.mapping(path, value, "match")
    if m is None:
        return None
    before = len(f.problems)
    f.keys(path, m, MATCH_KEYS, "match")
    template = _template(f, (*path, "path"), m["path"]) if "path" in m else None
    methods = _methods(f, (*path, "methods"), m["methods"]) if "methods" in m else None
    params = _params(f, (*path, "params"), m["params"], template) if "params" in m else ()
    headers = _conds(f, (*path, "headers"), m["headers"], "headers") if "headers" in m else ()
    query = _conds(f, (*path, "query"), m["query"], "query") if "query" in m else ()
    if len(f.problems) != before:
        return None
    return Matcher(methods=methods, template=template, params=params,
                   headers=headers, query=query)


# ------------------------------------------------------------------ count_when


def _count_item(item: object) -> frozenset[int] | Literal["any"] | None:
    if isinstance(item, bool):
        return None
    if isinstance(item, str):
        s = item.strip()
        if s.lower() == "any":
            return "any"
        cls = _CLASS.match(s)
        if cls:
            base = int(cls.group(1)) * 100
            return frozenset(range(base, base + 100))
        if s.isdigit():
            item = int(s)
    if isinstance(item, int) and 100 <= item <= 599:
        return frozenset({item})
    return None


def _count_when(f: _File, path: KeyPath, value: object) -> CountWhen | None:
    if not isinstance(value, list) or not value:
        f.at_value(path, "count_when must be a non-empty list like [2xx] or [2xx, 404]")
        return None
    statuses: set[int] = set()
    is_any = False
    ok = True
    for i, item in enumerate(value):
        got = _count_item(item)
        if got is None:
            f.at_value((*path, i), f"bad count_when item {item!r} "
                                   "(use a class like 2xx, a status like 404, or any)")
            ok = False
        elif got == "any":
            is_any = True
        else:
            statuses |= got
    if not ok:
        return None
    return CountWhen(frozenset(statuses), is_any, tuple(str(v) for v in value))


# ------------------------------------------------------------------ usage


def _source_text(f: _File, path: KeyPath, text: str,
                 template: Template | None) -> QuantitySource | None:
    if text in _SIMPLE_SOURCES:
        return QuantitySource(_SIMPLE_SOURCES[text], text)
    for prefix, kind in _PREFIX_SOURCES.items():
        if text.startswith(prefix + "."):
            return _prefixed(f, path, text, kind, text[len(prefix) + 1:], template)
    parts = text.split(".")
    head2, head1 = ".".join(parts[:2]), parts[0]
    close = _suggest(text, _SIMPLE_SOURCES) or next(
        (f"{c}.{'.'.join(parts[n:])}" for n, c in (
            (2, _suggest(head2, _PREFIX_SOURCES)), (1, _suggest(head1, _PREFIX_SOURCES)))
         if c is not None and len(parts) > n), None)
    hint = f"; did you mean '{close}'?" if close else f" (expected a number or {_SOURCE_FORMS})"
    f.at_value(path, f"bad quantity source {text!r}{hint}")
    return None


def _prefixed(f: _File, path: KeyPath, text: str, kind: SourceKind, rest: str,
              template: Template | None) -> QuantitySource | None:
    if kind in (SourceKind.REQUEST_JSON, SourceKind.RESPONSE_JSON):
        segs = tuple(rest.split("."))
        if not rest or any(not s for s in segs):
            f.at_value(path, f"bad quantity source {text!r}: empty segment in JSON path")
            return None
        return QuantitySource(kind, text, path=segs)
    if kind is SourceKind.PATH_PARAM:
        known = template.params if template is not None else ()
        if rest not in known:
            have = ", ".join(f"{{{p}}}" for p in known) or "none"
            f.at_value(path, f"bad quantity source {text!r}: the rule's path has no "
                             f"parameter {{{rest}}} (path parameters: {have})")
            return None
        return QuantitySource(kind, text, name=rest)
    if not _TOKEN.match(rest):
        f.at_value(path, f"bad quantity source {text!r}: missing or invalid name after "
                         f"'{text[: len(text) - len(rest)]}'")
        return None
    return QuantitySource(kind, text, name=rest)


def _quantity(f: _File, path: KeyPath, value: object,
              template: Template | None) -> QuantitySource | None:
    if isinstance(value, str) and _NUMERIC.match(value):
        value = Decimal(value.strip())
    if isinstance(value, str):
        return _source_text(f, path, value.strip(), template)
    d = f.number(path, value, "quantity")
    if d is None:
        return None
    return QuantitySource(SourceKind.CONSTANT, str(value), constant=d)


def _preset(f: _File, path: KeyPath, value: object) -> QuantitySource | None:
    if not isinstance(value, str) or value not in PRESETS:
        close = _suggest(str(value), PRESETS)
        hint = f"; did you mean '{close}'?" if close else f" (expected: {', '.join(PRESETS)})"
        f.at_value(path, f"unknown preset {value!r}{hint}")
        return None
    return QuantitySource(SourceKind.PRESET, value, preset=value)


def _transform(f: _File, path: KeyPath, value: object) -> Transform | None:
    m = f.mapping(path, value, "transform")
    if m is None:
        return None
    before = len(f.problems)
    f.keys(path, m, TRANSFORM_KEYS, "transform")
    div, rnd = m.get("divide_by"), m.get("round")
    if "divide_by" not in m:
        f.at_value(path, "transform needs divide_by (a positive integer)")
    elif isinstance(div, bool) or not isinstance(div, int) or div <= 0:
        f.at_value((*path, "divide_by"), f"transform divide_by must be a positive integer, "
                                         f"got {div!r}")
    if "round" not in m:
        f.at_value(path, "transform needs round (up or down)")
    elif rnd not in ("up", "down"):
        f.at_value((*path, "round"), f"transform round must be up or down, got {rnd!r}")
    if len(f.problems) != before:
        return None
    assert isinstance(div, int)
    return Transform(div, "up" if rnd == "up" else "down")


@dataclass(slots=True)
class _MeterRef:
    file: _File
    path: KeyPath
    name: str
    transform: Transform | None = None


def _optional_micro(f: _File, m: Mapping[str, object], path: KeyPath, key: str,
                    default: int | None) -> tuple[bool, int | None]:
    if key not in m:
        return True, default
    d = f.number((*path, key), m[key], key)
    return (False, None) if d is None else (True, to_micro(d))


def _usage(f: _File, path: KeyPath, value: object, template: Template | None,
           refs: list[_MeterRef]) -> UsageSpec | None:
    m = f.mapping(path, value, "usage item")
    if m is None:
        return None
    before = len(f.problems)
    f.keys(path, m, USAGE_KEYS, "usage")
    meter = f.string((*path, "meter"), m.get("meter"), "meter") if "meter" in m else None
    transform = _transform(f, (*path, "transform"), m["transform"]) if "transform" in m else None
    if "meter" not in m:
        f.at_value(path, "usage item needs 'meter'")
    elif meter is not None:
        refs.append(_MeterRef(f, (*path, "meter"), meter, transform))
    source = _usage_source(f, path, m, template)
    credits: CreditRate | None = None
    if "credits" in m:
        per_unit = f.number((*path, "credits"), m["credits"], "credits")
        if per_unit is not None:
            # credits are per transformed unit, charged on the exact fraction of raw units:
            # kept as an exact fraction (a Decimal quotient would round 1/3600 up)
            credits = CreditRate.of(per_unit, transform.divide_by if transform is not None else 1)
    _, estimate = _optional_micro(f, m, path, "estimate", None)
    _, on_unreadable = _optional_micro(f, m, path, "on_unreadable", None)
    reserve = _reserve_from(f, (*path, "reserve_from"), m["reserve_from"], template, source) \
        if "reserve_from" in m else None
    if len(f.problems) != before or meter is None or source is None:
        return None
    return UsageSpec(meter=meter, source=source, credits_per_unit=credits,
                     estimate_micro=estimate, transform=transform,
                     on_unreadable_micro=on_unreadable, line=f.line(path),
                     reserve_from=reserve)


def _reserve_from(f: _File, path: KeyPath, value: object, template: Template | None,
                  source: QuantitySource | None) -> QuantitySource | None:
    """``reserve_from``: a request-side value (request.json.*, request.header.*,
    request.query.*) bounding a quantity known only after the response."""
    if not isinstance(value, str):
        f.at_value(path, "reserve_from must be a request source like request.json.max_tokens")
        return None
    if source is not None and source.kind is SourceKind.CONSTANT:
        f.at_key(path, "reserve_from is for quantities known after the response; this "
                       "quantity is a constant")
        return None
    src = _source_text(f, path, value, template)
    if src is None:
        return None
    if src.kind not in _RESERVE_KINDS:
        f.at_value(path, f"reserve_from {value!r} must be read from the request "
                         "(request.json.*, request.header.*, request.query.*)")
        return None
    return src


def _usage_source(f: _File, path: KeyPath, m: Mapping[str, object],
                  template: Template | None) -> QuantitySource | None:
    has_q, has_p = "quantity" in m, "preset" in m
    if has_q and has_p:
        f.at_key((*path, "preset"), "usage has both quantity and preset; use one")
        return None
    if not (has_q or has_p):
        f.at_value(path, "usage item needs quantity (a number or a source like "
                         "response.json.usage.total_tokens) or preset")
        return None
    if has_p:
        return _preset(f, (*path, "preset"), m["preset"])
    return _quantity(f, (*path, "quantity"), m["quantity"], template)


# ------------------------------------------------------------------ rules


@dataclass(slots=True)
class _RuleEntry:
    """One parsed rule item, kept even when broken so later checks can still run."""

    file: _File
    path: KeyPath
    name: str | None
    matcher: Matcher | None
    rule: Rule | None


def _response_needs(usage: Sequence[UsageSpec]) -> tuple[ResponseNeed, tuple[Probe, ...],
                                                         tuple[Probe, ...]]:
    # each probe once, in order (a dict as an ordered set); several probes may set one key
    # (openai_responses: one per event type that ends a stream)
    json_p: dict[Probe, None] = {}
    sse_p: dict[Probe, None] = {}
    need = ResponseNeed.NONE
    for u in usage:
        src = u.source
        if src.kind is SourceKind.PRESET and src.preset is not None:
            spec = PRESETS[src.preset]
            json_p.update(dict.fromkeys(spec.json_probes))
            sse_p.update(dict.fromkeys(spec.sse_probes))
            need = ResponseNeed.SSE_OR_JSON
        elif src.kind is SourceKind.RESPONSE_JSON:
            probe = Probe(src.probe_key, src.path)
            json_p[probe] = None
            sse_p[probe] = None
            if need is ResponseNeed.NONE:
                need = ResponseNeed.JSON
    return need, tuple(json_p), tuple(sse_p)


def _auth(f: _File, path: KeyPath, m: Mapping[str, object]) -> Literal["required", "none"]:
    value = m.get("auth", "required")
    if value not in ("required", "none"):
        f.at_value((*path, "auth"), f"auth must be required or none, got {value!r}")
        return "required"
    return "none" if value == "none" else "required"


def _rule(f: _File, path: KeyPath, value: object, default_cw: CountWhen,
          refs: list[_MeterRef]) -> _RuleEntry:
    m = f.mapping(path, value, "rule")
    if m is None:
        return _RuleEntry(f, path, None, None, None)
    before = len(f.problems)
    f.keys(path, m, RULE_KEYS, "rule")
    name = f.string((*path, "name"), m["name"], "rule name") if "name" in m else None
    if "name" not in m:
        f.at_value(path, "rule needs a name")
    matcher = _matcher(f, (*path, "match"), m.get("match"))
    auth = _auth(f, path, m)
    template = matcher.template if matcher is not None else _loose_template(m)
    usage = _usage_list(f, (*path, "usage"), m.get("usage"), template, refs)
    if usage and auth == "none":
        f.at_key((*path, "usage"), "a rule with auth: none cannot meter usage "
                                  "(there is no customer to bill)")
    cw = _count_when(f, (*path, "count_when"), m["count_when"]) if "count_when" in m \
        else default_cw
    desc = m.get("description")
    if desc is not None and not isinstance(desc, str):
        f.at_value((*path, "description"), "description must be a string")
    if len(f.problems) != before or name is None or matcher is None or cw is None:
        return _RuleEntry(f, path, name, matcher, None)
    need, jp, sp = _response_needs(usage)
    rule = Rule(name=name, auth=auth, usage=tuple(usage), count_when=cw,
                request_json=any(u.source.kind is SourceKind.REQUEST_JSON
                                 or (u.reserve_from is not None
                                     and u.reserve_from.kind is SourceKind.REQUEST_JSON)
                                 for u in usage),
                response_body=need, matcher=matcher,
                description=desc if isinstance(desc, str) else None,
                file=f.name, line=f.line(path), json_probes=jp, sse_probes=sp,
                stream_usage=any(u.source.preset == "openai_chat" for u in usage),
                request_bytes=any(u.source.kind is SourceKind.REQUEST_BYTES for u in usage))
    return _RuleEntry(f, path, name, matcher, rule)


def _loose_template(m: Mapping[str, object]) -> Template | None:
    """Best-effort template of a broken match block, so path.<param> checks still run."""
    match = m.get("match")
    path = match.get("path") if isinstance(match, dict) else None
    try:
        return compile_template(path) if isinstance(path, str) else None
    except TemplateError:
        return None


def _usage_list(f: _File, path: KeyPath, value: object, template: Template | None,
                refs: list[_MeterRef]) -> list[UsageSpec]:
    if value is None:
        return []
    if not isinstance(value, list):
        f.at_value(path, f"usage must be a list of {{meter, quantity}} items, "
                         f"got {type_name(value)}")
        return []
    out = [_usage(f, (*path, i), item, template, refs) for i, item in enumerate(value)]
    return [u for u in out if u is not None]


# ------------------------------------------------------------------ files


@dataclass(slots=True)
class _State:
    problems: list[Problem] = field(default_factory=list)
    meters: dict[str, Meter] = field(default_factory=dict)
    meter_where: dict[str, str] = field(default_factory=dict)
    entries: list[_RuleEntry] = field(default_factory=list)
    refs: list[_MeterRef] = field(default_factory=list)
    # ``routing:`` settings: key -> (value, where it was set); one value for all files
    routing: dict[str, tuple[str, str]] = field(default_factory=dict)

    def routing_is(self, key: str, value: str) -> bool:
        got = self.routing.get(key)
        return got is not None and got[0] == value


def _routing(f: _File, value: object, st: _State) -> None:
    """``routing:``: how the upstream routes paths, which every rule's path template is
    matched the way of (the same in every file that says it)."""
    m = f.mapping(("routing",), value, "routing")
    if m is None:
        return
    f.keys(("routing",), m, ROUTING_KEYS, "routing")
    for key in ROUTING_KEYS:
        if key not in m:
            continue
        path: KeyPath = ("routing", key)
        got = m[key]
        allowed = ROUTING_VALUES[key]
        if got not in allowed:
            f.at_value(path, f"routing.{key} must be {' or '.join(allowed)}, got {got!r}")
            continue
        pos = f.doc.value_pos(path)
        here = f"{f.name}:{pos.line}:{pos.col}"
        before = st.routing.setdefault(key, (str(got), here))
        if before[0] != got:
            f.at_value(path, f"routing.{key} is {got!r} here but {before[0]!r} at "
                             f"{before[1]}: the upstream routes one way")


def _meter(f: _File, path: KeyPath, name: str, value: object) -> Meter | None:
    m = f.mapping(path, value, f"meter '{name}'")
    if m is None:
        return None
    before = len(f.problems)
    f.keys(path, m, METER_KEYS, "meter")
    if "stripe_event_name" not in m:
        f.at_value(path, f"meter '{name}' needs stripe_event_name")
        return None
    event = f.string((*path, "stripe_event_name"), m["stripe_event_name"], "stripe_event_name")
    covered = m.get("covered_event_name")
    if covered is not None:
        covered = f.string((*path, "covered_event_name"), covered, "covered_event_name")
    desc = m.get("description")
    if desc is not None and not isinstance(desc, str):
        f.at_value((*path, "description"), "description must be a string")
    price_id = f.string((*path, "price_id"), m["price_id"], "price_id") \
        if "price_id" in m else None
    price = _price(f, (*path, "price"), m["price"]) if "price" in m else None
    labels = {k: _label(f, (*path, k), m[k], k) for k in LABEL_MAX if k in m}
    if len(f.problems) != before or event is None:
        return None
    return Meter(name, event, covered if isinstance(covered, str) else None,
                 desc if isinstance(desc, str) else None,
                 price.with_id(price_id) if price is not None else None, price_id,
                 display_name=labels.get("display_name"), unit_label=labels.get("unit_label"))


def _label(f: _File, path: KeyPath, value: object, what: str) -> str | None:
    """A customer-facing label: one line of printable text, trimmed, bounded."""
    text = f.string(path, value, what)
    if text is None:
        return None
    text = text.strip()
    if any(not c.isprintable() for c in text):
        f.at_value(path, f"{what} must be one line of printable text, got {text!r}")
        return None
    if len(text) > LABEL_MAX[what]:
        f.at_value(path, f"{what} must be at most {LABEL_MAX[what]} characters, "
                         f"got {len(text)}")
        return None
    return text


def _price(f: _File, path: KeyPath, value: object) -> Price | None:
    """A meter's ``price:`` (Stripe's Price field names), every issue at its position."""
    price, issues = price_issues(value, strict=True)
    for issue in issues:
        where = (*path, *issue.path)
        if issue.at_key:
            f.at_key(where, issue.message)
        else:
            f.at_value(where, issue.message)
    return price


def _meters(f: _File, value: object, st: _State) -> None:
    m = f.mapping(("meters",), value, "meters")
    if m is None:
        return
    for name, spec in m.items():
        path: KeyPath = ("meters", name)
        meter = _meter(f, path, name, spec)
        pos = f.doc.key_pos(path)
        where = f"{f.name}:{pos.line}:{pos.col}"
        if name in st.meter_where:
            f.at_key(path, f"meter '{name}' is already defined at {st.meter_where[name]}")
            continue
        st.meter_where[name] = where
        if meter is not None:
            st.meters[name] = meter


def _file(f: _File, st: _State) -> None:
    data = f.doc.data
    if data is None:
        f.at_value((), "file is empty (expected version: 1, meters and rules)")
        return
    top = f.mapping((), data, "a rules file")
    if top is None:
        return
    f.keys((), top, TOP_KEYS, "the rules file")
    if "version" not in top:
        f.at_value((), "missing 'version: 1' at the top of the file")
    elif top["version"] != 1 or isinstance(top["version"], bool):
        f.at_value(("version",), f"version must be 1, got {top['version']!r}")
    if "meters" in top:
        _meters(f, top["meters"], st)
    if "routing" in top:
        _routing(f, top["routing"], st)
    cw = DEFAULT_COUNT_WHEN
    if "count_when" in top:
        cw = _count_when(f, ("count_when",), top["count_when"]) or DEFAULT_COUNT_WHEN
    rules = top.get("rules")
    if rules is None:
        return
    if not isinstance(rules, list):
        f.at_value(("rules",), f"rules must be a list, got {type_name(rules)}")
        return
    for i, item in enumerate(rules):
        st.entries.append(_rule(f, ("rules", i), item, cw, st.refs))


def _cross_checks(st: _State) -> None:
    """Checks that span files: meter references, duplicate names, unreachable rules."""
    for ref in st.refs:
        if ref.name not in st.meters and ref.name not in st.meter_where:
            close = _suggest(ref.name, st.meter_where)
            hint = f"; did you mean '{close}'?" if close else " (define it under meters:)"
            ref.file.at_value(ref.path, f"unknown meter '{ref.name}'{hint}")
    # a transform applies to a meter's period total: every usage of the meter must agree
    first: dict[str, _MeterRef] = {}
    for ref in st.refs:
        seen_ref = first.setdefault(ref.name, ref)
        if seen_ref.transform != ref.transform:
            pos = seen_ref.file.doc.value_pos(seen_ref.path)
            ref.file.at_value(ref.path, (
                f"meter '{ref.name}' has a different transform here than at "
                f"{seen_ref.file.name}:{pos.line}:{pos.col}: a transform applies to the "
                "meter's period total, so every usage of one meter must use the same one"))
    for name, ref in first.items():
        if ref.transform is not None and name in st.meters:
            st.meters[name] = replace(st.meters[name], transform=ref.transform)
    seen: dict[str, str] = {}
    catch_all: str | None = None
    if st.routing_is("trailing_slash", "ignore"):
        for e in st.entries:
            t = e.matcher.template if e.matcher is not None else None
            if t is not None and len(t.text) > 1 and t.text.endswith("/"):
                e.file.at_value((*e.path, "match", "path"), (
                    f"path {t.text!r} ends with '/': with routing.trailing_slash: ignore, "
                    "write it without the slash (it then matches the path with and without "
                    "one, as the upstream routes it)"))
    # under routing.case insensitive two templates equal but for ASCII case, with the same
    # methods and no other condition, match the same requests: the later one never does
    fold = st.routing_is("case", "insensitive")
    same_paths: dict[tuple[str, frozenset[str] | None], str] = {}
    for e in st.entries:
        name_path = (*e.path, "name")
        pos = e.file.doc.value_pos(e.path)
        here = f"{e.file.name}:{pos.line}:{pos.col}"
        m = e.matcher
        if fold and m is not None and m.template is not None and m.template.text != "/**" \
                and not (m.params or m.headers or m.query):
            key = (ascii_lower(m.template.text), m.methods)
            if (earlier := same_paths.get(key)) is not None:
                e.file.at_value((*e.path, "match", "path"), (
                    f"this rule is unreachable: the earlier rule {earlier} has the same path "
                    "but for case, which routing.case: insensitive matches alike"))
            else:
                same_paths[key] = f"'{e.name}' ({here})" if e.name else f"at {here}"
        if e.name is not None:
            if e.name in seen:
                e.file.at_value(name_path, f"duplicate rule name '{e.name}' "
                                           f"(first defined at {seen[e.name]})")
            else:
                seen[e.name] = here
        label = f"'{e.name}'" if e.name else "this rule"
        if catch_all is not None:
            e.file.at_value(name_path, f"rule {label} is unreachable: "
                                       f"the earlier rule {catch_all} matches every request")
        elif e.matcher is not None and e.matcher.catch_all:
            catch_all = f"'{e.name}' ({here})" if e.name else f"at {here}"


def _read(path: Path, st: _State) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as exc:
        st.problems.append(Problem(str(path), 1, 1,
                                   f"cannot read rules file: {exc.strerror or exc}"))
        return None


def _parse(name: str, raw: bytes, st: _State) -> _File | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        st.problems.append(Problem(name, 1, 1, f"not UTF-8 text: {exc.reason}"))
        return None
    try:
        doc = load_yaml(text)
    except YamlError as exc:
        st.problems.append(Problem(name, exc.line, exc.col, exc.message))
        return None
    return _File(name, doc, st.problems)


def _load(paths: Sequence[Path]) -> tuple[list[Problem], RuleSet | None]:
    st = _State()
    digest = hashlib.sha256()
    sources: list[tuple[str, str]] = []
    if not paths:
        st.problems.append(Problem("<rules>", 1, 1, "no rules files given"))
    for p in paths:
        raw = _read(Path(p), st)
        if raw is None:
            continue
        digest.update(raw)
        sources.append((str(Path(p)), raw.decode("utf-8", errors="replace")))
        f = _parse(str(Path(p)), raw, st)
        if f is not None:
            _file(f, st)
    _cross_checks(st)
    if st.problems:
        return sorted(st.problems, key=_order(paths)), None
    rules = tuple(e.rule for e in st.entries if e.rule is not None)
    return [], RuleSet(version=digest.hexdigest()[:16], meters=dict(st.meters), rules=rules,
                       sources=tuple(sources),
                       case_insensitive=st.routing_is("case", "insensitive"),
                       ignore_trailing_slash=st.routing_is("trailing_slash", "ignore"))


def _order(paths: Sequence[Path]) -> _ProblemOrder:
    return _ProblemOrder({str(Path(p)): i for i, p in enumerate(paths)})


@dataclass(frozen=True, slots=True)
class _ProblemOrder:
    """Sort key: file order as given, then line, then column."""

    files: Mapping[str, int]

    def __call__(self, p: Problem) -> tuple[int, int, int]:
        return (self.files.get(p.file, -1), p.line, p.col)


def check_rules(paths: Sequence[Path]) -> list[Problem]:
    """Every problem in ``paths`` (file order, then position); empty when all is well."""
    return _load(paths)[0]


def load_rules(paths: Sequence[Path]) -> RuleSet:
    """The compiled RuleSet; raises :class:`RulesError` listing every problem."""
    problems, ruleset = _load(paths)
    if ruleset is None:
        raise RulesError(problems)
    return ruleset


def cli_check(paths: Sequence[Path | str]) -> int:
    """``meterproxy rules check``: print ``FILE:LINE:COL: message`` per problem to stderr.

    Returns 0 when the files are valid, 1 otherwise."""
    problems, ruleset = _load([Path(p) for p in paths])
    for p in problems:
        print(p, file=sys.stderr)
    if ruleset is None:
        print(f"{len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"ok: {len(ruleset.rules)} rules, {len(ruleset.meters)} meters "
          f"(version {ruleset.version})")
    return 0
