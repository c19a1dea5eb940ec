"""Quantity extraction: from a finished (or abandoned) request to micro-unit quantities.

Owns: :class:`Measurement` (everything known about one request), :class:`Quantity`
and :func:`compute`.

Invariants:
- Pure and total: :func:`compute` never raises, whatever the JSON, headers or body.
- Exact: numbers are parsed to ``Decimal`` (strings by a strict decimal grammar, no
  ``_`` separators, no NaN/inf), never through float arithmetic.
- A value that cannot be read (absent, not a number, bool, negative, non-finite,
  beyond ``MAX_UNITS``, malformed or undecodable body, stream abandoned before its usage
  event) yields the usage's fallback with ``unreadable=True`` and a ``reason``: its
  ``on_unreadable`` when the operator set one, else the reservation (its ``estimate``,
  else ``credits.default_estimate``), never 0 by default. The fallback is in meter units
  and is not transformed. A preset's optional keys (``PresetSpec.optional_keys``:
  Anthropic's prompt-cache counts) are the exception to "absent": absent or null, they count
  0; present, they must be quantities like the rest.
- A usage's ``transform`` is NOT applied here: a request records raw units, and the
  transform rounds the meter's period total once (:mod:`proxy.transform`), as Stripe's
  ``transform_quantity`` does. Rounding per request would bill 1,000 one-byte uploads as
  1,000 GB on a per-GB round-up.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import NamedTuple

from proxy.rules.model import PRESETS, Rule, SourceKind, UsageSpec
from proxy.rules.sse import UNREADABLE, BodyView, lookup
from proxy.units import QSCALE, UnitError, to_decimal, to_micro

__all__ = ["BODY_KINDS", "FALLBACK_REASONS", "MAX_UNITS", "UNREADABLE", "Measurement", "Quantity",
           "body_measurement", "compute", "fallback_micro", "parse_number", "reads_body_only"]

FALLBACK_REASONS = ("compressed_too_large", "over_cap", "stream_abandoned", "no_usage_event",
                    "unreadable")
"""Why a quantity took its fallback (the ``reason`` label of
``meterproxy_quantity_fallback_total``):

- ``compressed_too_large``: the body came compressed and decoded to more than the bound;
- ``over_cap``: the body was over ``max_inspect_bytes`` and the key scan did not find it;
- ``stream_abandoned``: the consumer went away (or the upstream cut the body) before the
  value came;
- ``no_usage_event``: a complete event stream never carried the value;
- ``unreadable``: anything else (absent, not a number, malformed JSON, corrupt encoding).
"""

MAX_UNITS = Decimal(10) ** 12  # above this a reading is treated as unreadable (int64 headroom)
_NUMBER = re.compile(r"\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?\s*\Z")


class Measurement(NamedTuple):
    """Everything known about one finished (or abandoned) request. A NamedTuple (immutable,
    built per metered request for a fraction of a frozen dataclass's cost)."""

    status: int
    request_headers: Mapping[str, str]
    response_headers: Mapping[str, str]
    query: Mapping[str, str]
    path_params: Mapping[str, str]
    request_json: object  # parsed JSON, or UNREADABLE (malformed / over cap / absent)
    response_body: BodyView | None
    request_bytes: int
    response_bytes: int
    duration_ms: Decimal
    abandoned: bool = False   # the body ended early (consumer left, upstream cut it)


class Quantity(NamedTuple):
    meter: str
    micro: int
    unreadable: bool
    reason: str = ""          # one of FALLBACK_REASONS when unreadable


def parse_number(value: object) -> Decimal | None:
    """A finite, non-negative, in-range Decimal from a JSON/header value, else None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str) and _NUMBER.match(value) is None:
        return None
    if not isinstance(value, (int, float, str, Decimal)):
        return None
    try:
        d = to_decimal(value)
    except (UnitError, ArithmeticError, ValueError):
        return None
    if d < 0 or d > MAX_UNITS:
        return None
    return d


def _body_value(body: BodyView | None, key: str) -> object:
    if body is None or body.malformed:
        return UNREADABLE
    return body.get(key)


def _preset_total(name: str, body: BodyView | None) -> Decimal | None:
    spec = PRESETS[name]
    total = Decimal(0)
    for key in spec.sum_keys:
        d = parse_number(_body_value(body, key))
        if d is None:
            return None
        total += d
    for key in spec.optional_keys:           # absent or null: 0; anything else must parse
        v = _body_value(body, key)
        if v is UNREADABLE or v is None:
            continue
        d = parse_number(v)
        if d is None:
            return None
        total += d
    return total if total <= MAX_UNITS else None


def _raw(u: UsageSpec, m: Measurement) -> object:
    """The unparsed value a source points at (UNREADABLE when absent)."""
    src = u.source
    kind = src.kind
    if kind is SourceKind.CONSTANT:
        return src.constant
    if kind is SourceKind.REQUEST_HEADER:
        return m.request_headers.get(src.name, UNREADABLE)
    if kind is SourceKind.RESPONSE_HEADER:
        return m.response_headers.get(src.name, UNREADABLE)
    if kind is SourceKind.REQUEST_QUERY:
        return m.query.get(src.name, UNREADABLE)
    if kind is SourceKind.PATH_PARAM:
        return m.path_params.get(src.name, UNREADABLE)
    if kind is SourceKind.REQUEST_JSON:
        rj = m.request_json
        return UNREADABLE if rj is UNREADABLE else lookup(rj, src.path)
    if kind is SourceKind.RESPONSE_JSON:
        return _body_value(m.response_body, src.probe_key)
    if kind is SourceKind.REQUEST_BYTES:
        return m.request_bytes
    if kind is SourceKind.RESPONSE_BYTES:
        return m.response_bytes
    if kind is SourceKind.DURATION_MS:
        return m.duration_ms
    return UNREADABLE


def _value(u: UsageSpec, m: Measurement) -> Decimal | None:
    if u.source.kind is SourceKind.PRESET:
        assert u.source.preset is not None
        return _preset_total(u.source.preset, m.response_body)
    return parse_number(_raw(u, m))


def fallback_micro(u: UsageSpec, default_estimate_micro: int) -> int:
    """What an unreadable quantity bills: ``on_unreadable`` if set, else the reservation."""
    if u.on_unreadable_micro is not None:
        return u.on_unreadable_micro
    return u.estimate_micro if u.estimate_micro is not None else default_estimate_micro


def _absent(u: UsageSpec, body: BodyView) -> bool:
    src = u.source
    if src.kind is SourceKind.PRESET:
        assert src.preset is not None
        return any(body.get(k) is UNREADABLE for k in PRESETS[src.preset].sum_keys)
    return body.get(src.probe_key) is UNREADABLE


def fallback_reason(u: UsageSpec, m: Measurement) -> str:
    """Why ``u`` could not be read from ``m`` (one of :data:`FALLBACK_REASONS`)."""
    if u.source.kind not in (SourceKind.RESPONSE_JSON, SourceKind.PRESET):
        return "unreadable"
    body = m.response_body
    if body is not None and not body.malformed and not _absent(u, body):
        return "unreadable"          # the value came, but is not a valid quantity
    if m.abandoned:
        return "stream_abandoned"
    if body is None:
        return "unreadable"
    if body.malformed or body.scanned:
        return body.reason or "unreadable"
    return "no_usage_event" if body.streamed else "unreadable"


def _int_micro(u: UsageSpec, body: BodyView | None) -> int | None:
    """The micro-units of a preset or ``response.json`` usage whose values are plain JSON
    integers (the usual token counts), exactly what the Decimal path gives (each value and
    their sum in [0, MAX_UNITS], times QSCALE), without it; None for anything else (the
    Decimal path then decides)."""
    if body is None or body.malformed:
        return None
    src = u.source
    values = body.values
    if src.kind is SourceKind.PRESET:
        assert src.preset is not None
        spec = PRESETS[src.preset]
        total = 0
        for key in spec.sum_keys:
            v = values.get(key)
            if type(v) is not int or v < 0:      # (not bool: a bool is not a quantity)
                return None
            total += v
        for key in spec.optional_keys:
            v = values.get(key)
            if v is None:                        # absent or null: counts 0
                continue
            if type(v) is not int or v < 0:
                return None
            total += v
    else:
        total = values.get(src.probe_key)       # type: ignore[assignment]
        if type(total) is not int or total < 0:
            return None
    return total * QSCALE if total <= _MAX_INT else None


_MAX_INT = int(MAX_UNITS)


def _one(u: UsageSpec, m: Measurement, default_estimate_micro: int) -> Quantity:
    kind = u.source.kind
    if kind is SourceKind.PRESET or kind is SourceKind.RESPONSE_JSON:
        micro = _int_micro(u, m.response_body)
        if micro is not None:
            return Quantity(u.meter, micro, False)
    return _one_exact(u, m, default_estimate_micro)


def _one_exact(u: UsageSpec, m: Measurement, default_estimate_micro: int) -> Quantity:
    """:func:`_one` through Decimal whatever the value (the reference its integer shortcut
    is tested against)."""
    d = _value(u, m)
    if d is not None:
        try:
            micro = to_micro(d)
        except (ArithmeticError, InvalidOperation, UnitError, ValueError):
            return Quantity(u.meter, fallback_micro(u, default_estimate_micro), True,
                            "unreadable")
        return Quantity(u.meter, micro, False)
    return Quantity(u.meter, fallback_micro(u, default_estimate_micro), True,
                    fallback_reason(u, m))


BODY_KINDS = frozenset({SourceKind.CONSTANT, SourceKind.PRESET, SourceKind.RESPONSE_JSON})
"""The sources that read nothing of a request but its response body (and constants): a rule
whose every usage is one of them is measured by :func:`body_measurement`."""


def reads_body_only(rule: Rule) -> bool:
    """True when every usage of ``rule`` is a constant or reads the response body only."""
    return all(u.source.kind in BODY_KINDS for u in rule.usage)


_EMPTY: Mapping[str, str] = MappingProxyType({})
_ZERO = Decimal(0)


def body_measurement(status: int, body: BodyView | None, abandoned: bool) -> Measurement:
    """The measurement of a request whose rule reads only the response body
    (:func:`reads_body_only`): the body view and whether it was abandoned, everything else
    empty (never read by such a rule's quantities: no headers copied, no query, no duration
    to a Decimal). :func:`compute` gives what the full measurement gives (tests)."""
    return Measurement(status, _EMPTY, _EMPTY, _EMPTY, _EMPTY, UNREADABLE, body, 0, 0, _ZERO,
                       abandoned)


def compute(rule: Rule, m: Measurement, default_estimate_micro: int = QSCALE) -> list[Quantity]:
    """One :class:`Quantity` per usage spec of ``rule``, in rule order. Never raises.
    ``default_estimate_micro`` is ``credits.default_estimate`` (the reservation of a usage
    without ``estimate``)."""
    consts = _readable_constants(rule)
    return [_one(u, m, default_estimate_micro) if c is None else c
            for u, c in zip(rule.usage, consts, strict=True)]


_READABLE: dict[int, tuple[Rule, tuple[Quantity | None, ...]]] = {}


def _readable_constants(rule: Rule) -> tuple[Quantity | None, ...]:
    """Per usage of ``rule``: its quantity when it is a readable constant (the same for
    every request, whatever the measurement), else None; computed once per rule object."""
    hit = _READABLE.get(id(rule))
    if hit is not None and hit[0] is rule:
        return hit[1]
    out: list[Quantity | None] = []
    for u in rule.usage:
        q = _one(u, _NO_MEASUREMENT, QSCALE) if u.source.kind is SourceKind.CONSTANT else None
        out.append(q if q is not None and not q.unreadable else None)
    if len(_READABLE) > 10_000:       # rules reloaded many times: drop stale entries
        _READABLE.clear()
    _READABLE[id(rule)] = (rule, tuple(out))
    return _READABLE[id(rule)][1]


_CONSTANTS: dict[int, tuple[Rule, tuple[Quantity, ...] | None]] = {}
_NO_MEASUREMENT = Measurement(status=200, request_headers={}, response_headers={}, query={},
                              path_params={}, request_json=UNREADABLE, response_body=None,
                              request_bytes=0, response_bytes=0, duration_ms=Decimal(0))


def constant_quantities(rule: Rule) -> tuple[Quantity, ...] | None:
    """The quantities of a rule whose every usage is a constant (the common ``quantity: 1``),
    computed once per rule object; None when any quantity depends on the request. Lets the
    hot path skip building a Measurement at all."""
    hit = _CONSTANTS.get(id(rule))
    if hit is not None and hit[0] is rule:
        return hit[1]
    result: tuple[Quantity, ...] | None = None
    if all(u.source.kind is SourceKind.CONSTANT for u in rule.usage):
        result = tuple(_one(u, _NO_MEASUREMENT, QSCALE) for u in rule.usage)
    if len(_CONSTANTS) > 10_000:      # rules reloaded many times: drop stale entries
        _CONSTANTS.clear()
    _CONSTANTS[id(rule)] = (rule, result)
    return result
