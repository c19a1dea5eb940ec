"""Metering rules: load, validate, match requests, extract quantities (pure).

Owns the public ``proxy.rules`` API described in docs/DESIGN.md. Everything is
compiled once when the rule files load; per-request work is matching
(:meth:`RuleSet.match`), optional body inspection (:meth:`Rule.new_inspector`)
and :func:`compute`. Nothing here does I/O except reading the rule files.
"""

from proxy.rules.loader import check_rules, cli_check, load_rules
from proxy.rules.matcher import Matcher
from proxy.rules.model import (
    PRESETS,
    CountWhen,
    Match,
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
from proxy.rules.quantity import (
    Measurement,
    Quantity,
    body_measurement,
    compute,
    constant_quantities,
    reads_body_only,
)
from proxy.rules.sse import UNREADABLE, BodyView, ResponseInspector, SseEvent, SseParser

__all__ = [
    "PRESETS",
    "UNREADABLE",
    "BodyView",
    "CountWhen",
    "Match",
    "Matcher",
    "Measurement",
    "Meter",
    "Problem",
    "Quantity",
    "QuantitySource",
    "ResponseInspector",
    "ResponseNeed",
    "Rule",
    "RuleSet",
    "RulesError",
    "SourceKind",
    "SseEvent",
    "SseParser",
    "Transform",
    "UsageSpec",
    "body_measurement",
    "check_rules",
    "cli_check",
    "compute",
    "constant_quantities",
    "load_rules",
    "reads_body_only",
]
