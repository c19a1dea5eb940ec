"""The compiled, immutable metering-rules model.

Owns: the value types the loader produces and the handler consumes: :class:`Meter`,
:class:`Rule`, :class:`UsageSpec`, :class:`QuantitySource`, :class:`Transform`,
:class:`CountWhen`, :class:`RuleSet`, :class:`Match`, the preset table and the
problem / error types.

Invariants:
- Every object is a frozen, slotted dataclass built once at load; nothing here
  changes per request and nothing here does I/O.
- Quantities and credits follow ``proxy.units``: quantities in micro-units (int),
  credit prices as exact ``proxy.units.CreditRate`` fractions; no floats.
- A rule's response needs (``response_body``, the probes) are derived at load from
  its usage, so a rule that needs nothing from the body gets no inspector at all.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

from proxy.errors import MeterproxyError
from proxy.pricing import Price, TransformQuantity
from proxy.rules.matcher import Matcher, MatchIndex
from proxy.rules.sse import Probe, ResponseInspector, new_inspector
from proxy.units import CreditRate

__all__ = [
    "PRESETS",
    "CountWhen",
    "Match",
    "Meter",
    "PresetSpec",
    "Problem",
    "QuantitySource",
    "ResponseNeed",
    "Rule",
    "RuleSet",
    "RulesError",
    "SourceKind",
    "Transform",
    "UsageSpec",
]


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a rules file, at a 1-based position."""

    file: str
    line: int
    col: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}: {self.message}"


class RulesError(MeterproxyError):
    """The rule files have problems; ``problems`` lists every one of them."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass(frozen=True, slots=True)
class Meter:
    """A Stripe meter. ``price``: the rules file's own Price (Stripe's field names,
    validated at load); ``price_id``: the Stripe Price to fetch (it wins when fetched)."""

    name: str
    stripe_event_name: str
    covered_event_name: str | None = None
    description: str | None = None
    price: Price | None = None
    price_id: str | None = None
    display_name: str | None = None     # what customers see (usage page, usage API)
    unit_label: str | None = None       # plural noun for the unit, e.g. "tokens"
    # the usages' ``transform`` (all agree), applied to the period total (proxy.transform)
    transform: TransformQuantity | None = None

    @property
    def label(self) -> str:
        """The name customers see: ``display_name``, else the meter's id."""
        return self.display_name or self.name

    @property
    def units(self) -> str:
        """The unit customers see: ``unit_label``, else "units"."""
        return self.unit_label or "units"


class SourceKind(enum.Enum):
    CONSTANT = "constant"
    REQUEST_HEADER = "request.header"
    RESPONSE_HEADER = "response.header"
    REQUEST_QUERY = "request.query"
    PATH_PARAM = "path"
    REQUEST_JSON = "request.json"
    RESPONSE_JSON = "response.json"
    REQUEST_BYTES = "request.bytes"
    RESPONSE_BYTES = "response.bytes"
    DURATION_MS = "duration_ms"
    PRESET = "preset"


@dataclass(frozen=True, slots=True)
class QuantitySource:
    """Where a usage quantity comes from.

    ``name`` is the header / query / path-param name; ``path`` the JSON path;
    ``constant`` the number for CONSTANT; ``preset`` the preset name for PRESET;
    ``text`` is what the operator wrote."""

    kind: SourceKind
    text: str
    name: str = ""
    path: tuple[str, ...] = ()
    constant: Decimal | None = None
    preset: str | None = None

    @property
    def probe_key(self) -> str:
        """Key of this source's value in a ``BodyView`` (response sources only)."""
        return "json:" + ".".join(self.path)


@dataclass(frozen=True, slots=True)
class PresetSpec:
    """An LLM response shape: which probes to read and which keys add up to the total.

    Every key of ``sum_keys`` must be read (one that is absent makes the quantity
    unreadable: the fallback); a key of ``optional_keys`` is added when present and counts
    0 when absent or ``null`` (a field older API versions do not send), but a value that is
    present and not a quantity is unreadable like any other."""

    name: str
    json_probes: tuple[Probe, ...]
    sse_probes: tuple[Probe, ...]
    sum_keys: tuple[str, ...]
    optional_keys: tuple[str, ...] = ()


# the event types that end a Responses API stream, each carrying ``response.usage``
_RESPONSES_FINAL_EVENTS = ("response.completed", "response.incomplete", "response.failed")


def _presets() -> dict[str, PresetSpec]:
    oc = Probe("openai_chat.total", ("usage", "total_tokens"))
    ai = "anthropic_messages.input"
    ao = "anthropic_messages.output"
    # Anthropic's input_tokens excludes the prompt cache's tokens, reported (and billed) apart
    acw = "anthropic_messages.cache_creation"
    acr = "anthropic_messages.cache_read"
    ort = "openai_responses.total"
    return {
        "openai_chat": PresetSpec("openai_chat", (oc,), (oc,), (oc.key,)),
        "anthropic_messages": PresetSpec(
            "anthropic_messages",
            (Probe(ai, ("usage", "input_tokens")),
             Probe(acw, ("usage", "cache_creation_input_tokens")),
             Probe(acr, ("usage", "cache_read_input_tokens")),
             Probe(ao, ("usage", "output_tokens"))),
            (Probe(ai, ("message", "usage", "input_tokens"), "message_start"),
             Probe(acw, ("message", "usage", "cache_creation_input_tokens"), "message_start"),
             Probe(acr, ("message", "usage", "cache_read_input_tokens"), "message_start"),
             # message_delta's counts are cumulative, the input and cache ones optional
             # (newer API versions send them, higher than message_start's when server tools
             # ran): the last one sent wins; a null leaves message_start's
             Probe(ai, ("usage", "input_tokens"), "message_delta", True),
             Probe(acw, ("usage", "cache_creation_input_tokens"), "message_delta", True),
             Probe(acr, ("usage", "cache_read_input_tokens"), "message_delta", True),
             Probe(ao, ("usage", "output_tokens"), "message_delta")),
            (ai, ao), (acw, acr)),
        "openai_responses": PresetSpec(
            "openai_responses",
            (Probe(ort, ("usage", "total_tokens")),),
            # one probe per final event type, all setting the one key (the last seen wins)
            tuple(Probe(ort, ("response", "usage", "total_tokens"), t)
                  for t in _RESPONSES_FINAL_EVENTS),
            (ort,)),
    }


PRESETS: Mapping[str, PresetSpec] = _presets()


# A usage's ``transform`` is Stripe's ``transform_quantity``, the same value a Price has.
Transform = TransformQuantity


@dataclass(frozen=True, slots=True)
class CountWhen:
    """Which upstream statuses make a request billable. ``matches`` is one set lookup."""

    statuses: frozenset[int]
    any: bool = False
    text: tuple[str, ...] = ("2xx",)

    def matches(self, status: int) -> bool:
        return self.any or status in self.statuses


DEFAULT_COUNT_WHEN = CountWhen(frozenset(range(200, 300)))


@dataclass(frozen=True, slots=True)
class UsageSpec:
    """One meter a rule reports, and how to compute its quantity."""

    meter: str
    source: QuantitySource
    credits_per_unit: CreditRate | None = None      # exact (proxy.units.CreditRate)
    estimate_micro: int | None = None
    transform: Transform | None = None
    # None: an unreadable quantity bills the reservation (``estimate``, else
    # ``credits.default_estimate``), never 0 unless the operator writes on_unreadable: 0
    on_unreadable_micro: int | None = None
    line: int = 0
    # a request-side upper bound to reserve credits from (proxy.credits.reserve)
    reserve_from: QuantitySource | None = None


class ResponseNeed(enum.Enum):
    """What the handler must feed the inspector: nothing, a JSON body (response.json.*
    paths, which also read SSE ``data:`` events), or an LLM preset shape (SSE or JSON)."""

    NONE = "none"
    JSON = "json"
    SSE_OR_JSON = "sse_or_json"


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    auth: Literal["required", "none"]
    usage: tuple[UsageSpec, ...]
    count_when: CountWhen
    request_json: bool
    response_body: ResponseNeed
    matcher: Matcher = field(default_factory=Matcher)
    description: str | None = None
    file: str = ""
    line: int = 0
    json_probes: tuple[Probe, ...] = ()
    sse_probes: tuple[Probe, ...] = ()
    # an openai_chat preset: a request that may stream (proxy.rules.sse.may_stream) without
    # stream_options.include_usage gets it added, so the upstream reports usage (see
    # docs/metering-bodies.md)
    stream_usage: bool = False
    # a usage counts request.bytes: a compressed request body is refused (415), as for
    # request_json, since the upstream may process its decoded size (docs/metering-bodies.md)
    request_bytes: bool = False

    def new_inspector(self, content_type: str | None, max_inspect_bytes: int,
                      content_encoding: str | None = None) -> ResponseInspector | None:
        """A per-request inspector for the response body, or None if none is needed."""
        if self.response_body is ResponseNeed.NONE:
            return None
        return new_inspector(self.json_probes, self.sse_probes, content_type,
                             max_inspect_bytes, content_encoding)


_MISS = object()
_MEMO_ENTRIES = 4096
_MEMO_PATH_LEN = 256


@dataclass(frozen=True, slots=True)
class Match:
    rule: Rule
    path_params: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class RuleSet:
    """All rules (file order) and meters; ``match`` is compiled once at construction."""

    version: str
    meters: Mapping[str, Meter]
    rules: tuple[Rule, ...]
    # (file name, text) of every file, in order: kept per version so a dispute can be
    # explained with the exact rules that priced a request
    sources: tuple[tuple[str, str], ...] = ()
    # how the upstream routes (the rules file's ``routing:``): paths matched without ASCII
    # case; a trailing slash optional (``/v1/items/`` also matched as ``/v1/items``)
    case_insensitive: bool = False
    ignore_trailing_slash: bool = False
    _index: MatchIndex[Rule] = field(init=False, repr=False, compare=False)
    # some rule matches on a query parameter: only then does the pipeline hand ``match``
    # the request's parsed query (otherwise it is never parsed for matching)
    reads_query: bool = field(init=False, repr=False, compare=False)
    # the request headers and query parameters some rule matches on or reads a quantity
    # from: a request repeating one is refused (the pipeline: the rules would read one value
    # and the upstream may act on another). Headers as a lenient upstream reads their names
    # (`_` for `-`: CGI, WSGI and FastCGI upstreams read X_Tier as X-Tier) -> the rules'
    # lower-case spelling; query parameter names as the rules spell them, and case-folded
    # (``proxy.request.pipeline.lenient_param``)
    header_spellings: Mapping[str, str] = field(init=False, repr=False, compare=False)
    single_params: tuple[str, ...] = field(init=False, repr=False, compare=False)
    param_spellings: frozenset[str] = field(init=False, repr=False, compare=False)
    # (method, path) -> the match, when no rule matches on headers or the query (then the
    # answer depends on those two alone): API traffic repeats a few paths. Bounded like
    # proxy.target's memo; per rule set, so a reload starts a fresh one.
    _memo: dict[tuple[str, str], Match | None] | None = field(
        init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = MatchIndex([(r.matcher, r) for r in self.rules], fold=self.case_insensitive,
                           slash=self.ignore_trailing_slash)
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "reads_query", any(r.matcher.query for r in self.rules))
        headers: set[str] = set()
        params: set[str] = set()
        for r in self.rules:
            headers.update(name.lower() for name, _ in r.matcher.headers)
            params.update(name for name, _ in r.matcher.query)
            for u in r.usage:
                for src in (u.source, u.reserve_from):
                    if src is not None and src.kind is SourceKind.REQUEST_HEADER:
                        headers.add(src.name.lower())
                    elif src is not None and src.kind is SourceKind.REQUEST_QUERY:
                        params.add(src.name)
        object.__setattr__(self, "single_params", tuple(sorted(params)))
        object.__setattr__(self, "header_spellings",
                           {h.replace("_", "-"): h for h in sorted(headers)})
        object.__setattr__(self, "param_spellings", frozenset(p.casefold() for p in params))
        pure = not any(r.matcher.query or r.matcher.headers for r in self.rules)
        object.__setattr__(self, "_memo", {} if pure else None)

    def fits(self, matcher: Matcher, method: str, path: str) -> dict[str, str] | None:
        """``matcher``'s path params for ``method path`` (no header or query values), matched
        as this rule set's ``routing`` says: for tools that re-check a recorded request."""
        return matcher.match(method, path, {}, {}, self.case_insensitive,
                             self.ignore_trailing_slash)

    def match(self, method: str, path: str, headers: Mapping[str, str],
              query: Mapping[str, str]) -> Match | None:
        """The first rule matching the request (headers mapping is case-insensitive).
        The returned ``path_params`` must not be changed (a memoised match is shared)."""
        memo = self._memo
        if memo is not None:
            key = (method, path)
            hit = memo.get(key, _MISS)
            if hit is not _MISS:
                return hit  # type: ignore[return-value]
        found = self._index.match(method, path, headers, query)
        result = None if found is None else Match(found[0], found[1])
        if memo is not None and len(path) <= _MEMO_PATH_LEN:
            if len(memo) >= _MEMO_ENTRIES:
                memo.clear()
            memo[key] = result
        return result
