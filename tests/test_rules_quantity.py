"""Quantity extraction: sources, presets, transforms, unreadable values (never raises)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from proxy.rules import UNREADABLE, BodyView, Measurement, Quantity, Rule, compute, load_rules
from proxy.rules.quantity import (
    _int_micro,
    _one_exact,
    _readable_constants,
    body_measurement,
    constant_quantities,
    fallback_reason,
    parse_number,
    reads_body_only,
)
from proxy.units import CreditRate, cost_micro, to_micro

M = 1_000_000

RULES = """\
version: 1
meters:
  m: {stripe_event_name: m}
  gb: {stripe_event_name: gb}
rules:
  - name: chat
    match: {path: /chat}
    usage: [{meter: m, preset: openai_chat}]
  - name: anthropic
    match: {path: /anthropic}
    usage: [{meter: m, preset: anthropic_messages}]
  - name: responses
    match: {path: /responses}
    usage: [{meter: m, preset: openai_responses}]
  - name: field
    match: {path: /field}
    usage: [{meter: m, quantity: response.json.choices.0.n, on_unreadable: 7}]
  - name: many
    match: {path: "/many/{n}"}
    usage:
      - {meter: m, quantity: 3}
      - {meter: m, quantity: request.header.x-units}
      - {meter: m, quantity: response.header.x-cost}
      - {meter: m, quantity: request.query.n}
      - {meter: m, quantity: path.n}
      - {meter: m, quantity: request.json.input.1.len}
      - {meter: m, quantity: request.bytes}
      - {meter: m, quantity: response.bytes}
      - {meter: m, quantity: duration_ms}
  - name: mixed
    match: {path: /mixed}
    usage:
      - {meter: m, preset: openai_chat}
      - {meter: m, quantity: 1}
      - {meter: m, quantity: response.json.usage.total_tokens, estimate: 3}
  - name: gb
    match: {path: /gb}
    usage:
      - {meter: gb, quantity: request.bytes, transform: {divide_by: 1000000000, round: up},
         credits: 2}
"""


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Rule]:
    p: Path = tmp_path_factory.mktemp("r") / "r.yaml"
    p.write_text(RULES)
    return {r.name: r for r in load_rules([p]).rules}


def meas(body: BodyView | None = None, **kw: Any) -> Measurement:
    base: dict[str, Any] = dict(
        status=200, request_headers={}, response_headers={}, query={}, path_params={},
        request_json=UNREADABLE, response_body=body, request_bytes=0, response_bytes=0,
        duration_ms=Decimal(0))
    base.update(kw)
    return Measurement(**base)


def run(rule: Rule, content_type: str, chunks: list[bytes], **kw: Any) -> list[Quantity]:
    insp = rule.new_inspector(content_type, 1 << 20)
    assert insp is not None
    for c in chunks:
        insp.feed(c)
    return compute(rule, meas(insp.result(), **kw))


def sse(*events: dict[str, Any], event_names: bool = False) -> list[bytes]:
    out = []
    for e in events:
        head = f"event: {e['type']}\n".encode() if event_names else b""
        out.append(head + b"data: " + orjson.dumps(e) + b"\n\n")
    return out


def test_openai_chat_stream_and_json(rules: dict[str, Rule]) -> None:
    r = rules["chat"]
    stream = sse({"choices": [{"delta": {"content": "a"}}], "usage": None},
                 {"choices": [], "usage": {"prompt_tokens": 3, "total_tokens": 12}})
    stream.append(b"data: [DONE]\n\n")
    assert run(r, "text/event-stream", stream) == [Quantity("m", 12 * M, False)]
    body = orjson.dumps({"usage": {"total_tokens": 30}})
    assert run(r, "application/json", [body]) == [Quantity("m", 30 * M, False)]


def test_openai_chat_stream_without_usage_bills_the_reservation(rules: dict[str, Rule]) -> None:
    stream = sse({"choices": [{"delta": {"content": "a"}}]})
    # no estimate on the rule: the reservation is credits.default_estimate (1 unit here)
    assert run(rules["chat"], "text/event-stream", stream) == [
        Quantity("m", M, True, "no_usage_event")]


def test_anthropic_stream_and_json(rules: dict[str, Rule]) -> None:
    r = rules["anthropic"]
    stream = sse(
        {"type": "message_start",
         "message": {"usage": {"input_tokens": 25, "output_tokens": 1}}},
        {"type": "content_block_delta", "delta": {"text": "hi"}},
        {"type": "message_delta", "usage": {"output_tokens": 10}},
        {"type": "message_delta", "usage": {"output_tokens": 15}},
        {"type": "message_stop"},
        event_names=True)
    assert run(r, "text/event-stream", stream) == [Quantity("m", 40 * M, False)]
    body = orjson.dumps({"usage": {"input_tokens": 4, "output_tokens": 6}})
    assert run(r, "application/json", [body]) == [Quantity("m", 10 * M, False)]


def test_anthropic_abandoned_before_delta_bills_the_reservation(rules: dict[str, Rule]) -> None:
    stream = sse({"type": "message_start", "message": {"usage": {"input_tokens": 25}}})
    assert run(rules["anthropic"], "text/event-stream", stream, abandoned=True) == [
        Quantity("m", M, True, "stream_abandoned")]
    assert run(rules["anthropic"], "text/event-stream", stream) == [
        Quantity("m", M, True, "no_usage_event")]


def test_openai_responses_stream_and_json(rules: dict[str, Rule]) -> None:
    r = rules["responses"]
    stream = sse({"type": "response.created", "response": {"usage": None}},
                 {"type": "response.output_text.delta", "delta": "x"},
                 {"type": "response.completed", "response": {"usage": {"total_tokens": 99}}},
                 event_names=True)
    assert run(r, "text/event-stream", stream) == [Quantity("m", 99 * M, False)]
    body = orjson.dumps({"usage": {"total_tokens": 5}})
    assert run(r, "application/json", [body]) == [Quantity("m", 5 * M, False)]


@pytest.mark.parametrize(("cache", "expected"), [
    ({"cache_creation_input_tokens": 200, "cache_read_input_tokens": 3000},
     Quantity("m", 3210 * M, False)),
    ({}, Quantity("m", 10 * M, False)),               # older API versions: no cache fields
    ({"cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
     Quantity("m", 10 * M, False)),
    ({"cache_creation_input_tokens": None, "cache_read_input_tokens": 7},
     Quantity("m", 17 * M, False)),                 # null: none reported, as absent
    ({"cache_creation_input_tokens": "200", "cache_read_input_tokens": 0.5},
     Quantity("m", 210_500_000, False)),
    ({"cache_read_input_tokens": -1}, Quantity("m", M, True, "unreadable")),
    ({"cache_read_input_tokens": "lots"}, Quantity("m", M, True, "unreadable")),
    ({"cache_creation_input_tokens": True}, Quantity("m", M, True, "unreadable")),
    ({"cache_read_input_tokens": 10**12}, Quantity("m", M, True, "unreadable")),  # sum over
])
@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_bills_the_prompt_cache_tokens(rules: dict[str, Rule], cache: dict[str, Any],
                                                  expected: Quantity, stream: bool) -> None:
    """Anthropic's ``input_tokens`` leaves out the prompt cache, reported apart: the preset
    adds ``cache_creation_input_tokens`` and ``cache_read_input_tokens`` (in a stream, from
    ``message_start``). Absent or null, each counts 0, so an answer without them is still
    read; a value that is there but is no quantity makes the total unreadable (the
    fallback, here the default reservation of 1 unit), as any other."""
    usage = {"input_tokens": 4, **cache, "output_tokens": 6}
    if stream:
        chunks = sse({"type": "message_start",
                      "message": {"usage": {**usage, "output_tokens": 1}}},
                     {"type": "content_block_delta", "delta": {"text": "hi"}},
                     {"type": "message_delta", "usage": {"output_tokens": 6}},
                     {"type": "message_stop"}, event_names=True)
        assert run(rules["anthropic"], "text/event-stream", chunks) == [expected]
    else:
        body = orjson.dumps({"usage": usage})
        assert run(rules["anthropic"], "application/json", [body]) == [expected]


def test_anthropic_cache_fields_alone_are_not_a_reading(rules: dict[str, Rule]) -> None:
    """The cache fields are added to input and output tokens, never read instead of them: a
    stream that ends (or is abandoned) after ``message_start`` bills the fallback, whatever
    cache tokens it announced; so does a body without ``input_tokens``."""
    start = sse({"type": "message_start", "message": {"usage": {
        "input_tokens": 25, "cache_read_input_tokens": 9000, "output_tokens": 1}}})
    assert run(rules["anthropic"], "text/event-stream", start, abandoned=True) == [
        Quantity("m", M, True, "stream_abandoned")]
    assert run(rules["anthropic"], "text/event-stream", start) == [
        Quantity("m", M, True, "no_usage_event")]
    body = orjson.dumps({"usage": {"cache_read_input_tokens": 9000, "output_tokens": 6}})
    assert run(rules["anthropic"], "application/json", [body]) == [
        Quantity("m", M, True, "unreadable")]
    # the cache fields of message_start and message_delta only: the same names elsewhere
    # (a content block's text, another event type) are not read
    other = sse({"type": "message_start", "message": {"usage": {"input_tokens": 25}}},
                {"type": "content_block_delta", "usage": {"cache_read_input_tokens": 9000}},
                {"type": "message_delta", "usage": {"output_tokens": 15}})
    assert run(rules["anthropic"], "text/event-stream", other) == [Quantity("m", 40 * M, False)]


def test_anthropic_message_delta_counts_are_cumulative_and_win(rules: dict[str, Rule]) -> None:
    """``message_delta``'s usage is cumulative, its input and cache counts optional (newer
    API versions send them, higher than ``message_start``'s when server tools ran): the
    last count sent wins; one that is null or absent leaves ``message_start``'s."""
    r = rules["anthropic"]
    start = {"type": "message_start", "message": {"usage": {
        "input_tokens": 25, "cache_creation_input_tokens": 100, "output_tokens": 1}}}
    grown = sse(start,
                {"type": "message_delta", "usage": {"output_tokens": 15, "input_tokens": 300,
                                                     "cache_read_input_tokens": 7000}},
                {"type": "message_stop"}, event_names=True)
    assert run(r, "text/event-stream", grown) == [Quantity("m", (300 + 100 + 7000 + 15) * M, False)]
    nulls = sse(start,
                {"type": "message_delta", "usage": {"output_tokens": 15, "input_tokens": None,
                                                     "cache_creation_input_tokens": None,
                                                     "cache_read_input_tokens": None}},
                event_names=True)
    assert run(r, "text/event-stream", nulls) == [Quantity("m", (25 + 100 + 15) * M, False)]
    # a non-number there is unreadable, as anywhere: the reservation
    bad = sse(start, {"type": "message_delta", "usage": {"output_tokens": 15,
                                                         "input_tokens": "many"}})
    assert run(r, "text/event-stream", bad) == [Quantity("m", M, True, "unreadable")]


@pytest.mark.parametrize(("last", "expected"), [
    ("response.completed", Quantity("m", 99 * M, False)),
    ("response.incomplete", Quantity("m", 99 * M, False)),
    ("response.failed", Quantity("m", 99 * M, False)),
    ("response.in_progress", Quantity("m", M, True, "no_usage_event")),
    ("response.created", Quantity("m", M, True, "no_usage_event")),
])
def test_openai_responses_reads_the_usage_of_every_final_event(
        rules: dict[str, Rule], last: str, expected: Quantity) -> None:
    """A Responses stream ends in ``response.completed``, ``response.incomplete`` or
    ``response.failed``, each with ``response.usage``: all three are read. The usage of any
    other event type is not (``response.created`` and ``response.in_progress`` carry the
    response so far, with no final usage)."""
    stream = sse({"type": "response.created", "response": {"usage": None}},
                 {"type": "response.output_text.delta", "delta": "x"},
                 {"type": last, "response": {"usage": {"total_tokens": 99}}},
                 event_names=True)
    assert run(rules["responses"], "text/event-stream", stream) == [expected]


@pytest.mark.parametrize(("body", "expected"), [
    (b'{"choices": [{"n": 2.5}]}', Quantity("m", 2_500_000, False)),
    (b'{"choices": [{"n": "4"}]}', Quantity("m", 4 * M, False)),
    (b'{"choices": [{"n": -1}]}', Quantity("m", 7 * M, True, "unreadable")),
    (b'{"choices": [{"n": true}]}', Quantity("m", 7 * M, True, "unreadable")),
    (b'{"choices": [{"n": "4x"}]}', Quantity("m", 7 * M, True, "unreadable")),
    (b'{"choices": [{"n": "NaN"}]}', Quantity("m", 7 * M, True, "unreadable")),
    (b'{"choices": [{"n": "1_000"}]}', Quantity("m", 7 * M, True, "unreadable")),
    (b'{"choices": [{"n": null}]}', Quantity("m", 7 * M, True, "unreadable")),
    (b'{"choices": []}', Quantity("m", 7 * M, True, "unreadable")),
    (b'{"choices": [{"n": 1e300}]}', Quantity("m", 7 * M, True, "unreadable")),
    (b'{"choices": [{"n": 1', Quantity("m", 7 * M, True, "unreadable")),
    (b"[1, 2]", Quantity("m", 7 * M, True, "unreadable")),
])
def test_response_json_field(rules: dict[str, Rule], body: bytes, expected: Quantity) -> None:
    assert run(rules["field"], "application/json", [body]) == [expected]


def test_response_json_over_cap(rules: dict[str, Rule]) -> None:
    insp = rules["field"].new_inspector("application/json", 8)
    assert insp is not None
    insp.feed(b'{"choices": [{"n": 2}]}')
    # a list index cannot be followed by the over-cap key scan
    assert compute(rules["field"], meas(insp.result())) == [
        Quantity("m", 7 * M, True, "over_cap")]


def test_response_json_field_on_sse(rules: dict[str, Rule]) -> None:
    stream = sse({"choices": [{"n": 1}]}, {"choices": [{"n": 3}]})
    assert run(rules["field"], "text/event-stream", stream) == [Quantity("m", 3 * M, False)]


def test_no_body_view_is_unreadable(rules: dict[str, Rule]) -> None:
    assert compute(rules["field"], meas(None)) == [Quantity("m", 7 * M, True, "unreadable")]


def test_all_simple_sources(rules: dict[str, Rule]) -> None:
    r = rules["many"]
    m = meas(request_headers={"x-units": " 1.25 "}, response_headers={"x-cost": "2e1"},
             query={"n": "3"}, path_params={"n": "4"},
             request_json={"input": [{"len": 0}, {"len": 5}]},
             request_bytes=100, response_bytes=200, duration_ms=Decimal("12.3456789"))
    assert [q.micro for q in compute(r, m)] == [
        3 * M, 1_250_000, 20 * M, 3 * M, 4 * M, 5 * M, 100 * M, 200 * M, 12_345_679]
    assert not any(q.unreadable for q in compute(r, m))


def test_missing_simple_sources_are_unreadable(rules: dict[str, Rule]) -> None:
    qs = compute(rules["many"], meas(request_headers={"x-units": "abc"},
                                     response_headers={"x-cost": "-1"}))
    assert [q.unreadable for q in qs] == [False, True, True, True, True, True, False, False,
                                          False]


def test_transform_is_not_applied_per_request(rules: dict[str, Rule]) -> None:
    """A request records raw units; the transform rounds the period total (proxy.transform)."""
    r = rules["gb"]
    assert [q.micro for q in compute(r, meas(request_bytes=1))] == [1 * M]
    assert [q.micro for q in compute(r, meas(request_bytes=0))] == [0]
    assert [q.micro for q in compute(r, meas(request_bytes=2_000_000_001))] == [2_000_000_001 * M]
    # credits are per transformed unit (2 per GB), charged on the raw fraction
    assert r.usage[0].credits_per_unit == CreditRate(1, 500_000_000)
    assert str(r.usage[0].credits_per_unit) == "0.000000002"


def test_parse_number() -> None:
    assert parse_number("10") == Decimal(10)
    assert parse_number(" .5 ") == Decimal("0.5")
    assert parse_number(0.1) == Decimal("0.1")
    bads: list[object] = ["", "inf", "Infinity", "nan", "0x10", "1_0", True, None, [1], {}, -1,
            float("nan"), float("inf"), "1e13", 10**40]
    for bad in bads:
        assert parse_number(bad) is None, bad


# --------------------------------------------------------------- every split of every preset

PRESET_STREAMS: dict[str, tuple[bytes, int]] = {
    "chat": (b"".join([
        *sse({"id": "c1", "choices": [{"delta": {"content": "Hel"}}], "usage": None},
             {"id": "c1", "choices": [{"delta": {"content": "lo"}}], "usage": None},
             {"id": "c1", "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 31,
                                                   "total_tokens": 40}}),
        b"data: [DONE]\n\n"]), 40),
    "anthropic": (b"".join(sse(
        {"type": "message_start", "message": {"usage": {"input_tokens": 25, "output_tokens": 1}}},
        {"type": "content_block_delta", "delta": {"text": "hi"}},
        {"type": "message_delta", "usage": {"output_tokens": 15}},
        {"type": "message_stop"}, event_names=True)), 40),
    "responses": (b"".join(sse(
        {"type": "response.created", "response": {"usage": None}},
        {"type": "response.output_text.delta", "delta": "x"},
        {"type": "response.completed", "response": {"usage": {"total_tokens": 77}}},
        event_names=True)), 77),
}


@pytest.mark.parametrize("name", sorted(PRESET_STREAMS))
def test_preset_stream_reads_the_same_at_every_split_point(rules: dict[str, Rule],
                                                           name: str) -> None:
    """The SSE inspector (and its fast path) must read the same usage however the stream
    is cut into chunks: here at every byte offset, and one byte at a time."""
    stream, tokens = PRESET_STREAMS[name]
    want = [Quantity("m", tokens * M, False)]
    for i in range(len(stream) + 1):
        assert run(rules[name], "text/event-stream", [stream[:i], stream[i:]]) == want, i
    for crlf in (False, True):
        s = stream.replace(b"\n", b"\r\n") if crlf else stream
        assert run(rules[name], "text/event-stream", [s[i:i + 1] for i in range(len(s))]) == want


# --------------------------------------------------------------- exact values for any JSON

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
        st.sampled_from(["usage", "total_tokens", "choices", "0", "n", "input_tokens",
                         "output_tokens", "type", "message", "response"]), kids, max_size=4),
    max_leaves=20)


# what orjson can encode (64-bit integers), for documents the test must serialize
JSON64 = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
        st.sampled_from(["usage", "total_tokens", "choices", "0", "n", "type"]), kids,
        max_size=4),
    max_leaves=20)
VALID = st.one_of(
    st.integers(0, 10**9).map(lambda n: (n, n * M)),
    st.just(10**12).map(lambda n: (n, n * M)),          # MAX_UNITS itself is billable
    st.just("1000000000000").map(lambda n: (n, 10**12 * M)),
    st.decimals(0, 10**6, places=6).map(lambda d: (str(d), to_micro(d))),
    st.integers(0, 10**6).map(lambda n: (str(n), n * M)),
    st.floats(0, 10**6, allow_nan=False).map(lambda f: (f, to_micro(f))),
)
INVALID = st.one_of(
    st.integers(-2**63, -1), st.floats(max_value=-0.001, allow_infinity=False), st.none(), st.booleans(),
    st.sampled_from(["", "abc", "4x", "1_000", "NaN", "inf", "-1", "0x10", "1e400"]),
    st.lists(st.integers(0, 5), max_size=2), st.dictionaries(st.just("n"), st.integers(0, 5)),
    st.sampled_from([10**12 + 1, 10**13, 2**63 - 1]),   # over MAX_UNITS (10**12)
)


@given(JSON64, st.one_of(VALID.map(lambda v: (True, v)),
                        INVALID.map(lambda v: (False, (v, 0)))),
       st.sampled_from(["field", "chat"]), st.booleans())
def test_a_number_at_the_path_is_billed_exactly_anything_else_is_unreadable(
        rules: dict[str, Rule], noise: object, case: tuple[bool, tuple[object, int]],
        name: str, stream: bool) -> None:
    """Whatever surrounds it, the value at the rule's path decides the quantity: a
    non-negative number (JSON number or numeric string) is billed exactly; anything else
    bills the usage's fallback as unreadable: its ``on_unreadable`` (7 for ``field``), else the
    reservation (no ``estimate`` here: ``credits.default_estimate``, 1 unit), never 0."""
    valid, (value, micro) = case
    doc: dict[str, object] = {"noise": noise}
    if name == "field":
        doc["choices"] = [{"n": value, "other": noise}, noise]
    else:
        doc["usage"] = {"total_tokens": value, "prompt_tokens": noise}
    raw = orjson.dumps(doc)
    chunks = [b"data: " + raw + b"\n\n", b"data: [DONE]\n\n"] if stream else [raw]
    got = run(rules[name], "text/event-stream" if stream else "application/json", chunks)
    if valid:
        assert got == [Quantity("m", micro, False)]
    else:
        fallback = 7 * M if name == "field" else M
        assert got == [Quantity("m", fallback, True, "unreadable")]


@given(JSON, st.sampled_from(["chat", "anthropic", "responses", "field", "many"]),
       st.booleans())
def test_compute_of_arbitrary_json_is_one_quantity_per_usage(rules: dict[str, Rule],
                                                             doc: object, name: str,
                                                             stream: bool) -> None:
    rule = rules[name]
    try:
        raw = orjson.dumps(doc)
    except (orjson.JSONEncodeError, TypeError):
        raw = b"{bad"
    insp = rule.new_inspector("text/event-stream" if stream else "application/json", 4096)
    assert insp is not None or name == "many"
    if insp is not None:
        insp.feed(b"data: " + raw + b"\n\n" if stream else raw)
    view = insp.result() if insp is not None else None
    qs = compute(rule, meas(view, request_json=doc, request_headers={"x-units": str(doc)},
                            path_params={"n": str(doc)[:10]}))
    assert [q.meter for q in qs] == [u.meter for u in rule.usage]
    # a value that does not parse is billed at the fallback, flagged: on_unreadable, else the
    # reservation (credits.default_estimate, 1 unit: no rule here has an estimate), never 0
    assert all(q.micro == M for q in qs if q.unreadable and name != "field")
    assert all(q.micro == 7 * M for q in qs if q.unreadable and name == "field")


def test_constant_quantities_are_computed_once_per_rule(rules: dict[str, Rule],
                                                         tmp_path: Path) -> None:
    """The hot path's shortcut: a rule whose every quantity is a constant gets them computed
    once (the same tuple every call); any other rule gets None (measure per request)."""
    p = tmp_path / "c.yaml"
    p.write_text(RULES.replace("usage: [{meter: m, preset: openai_chat}]",
                               "usage: [{meter: m, quantity: 3}, {meter: m, quantity: 0.5}]"))
    const = {r.name: r for r in load_rules([p]).rules}["chat"]
    first = constant_quantities(const)
    assert first == (Quantity("m", 3 * M, False), Quantity("m", 500_000, False))
    assert constant_quantities(const) is first
    assert constant_quantities(rules["many"]) is None       # a constant among other sources
    assert constant_quantities(rules["chat"]) is None
    assert constant_quantities(rules["chat"]) is None


def test_preset_total_over_max_units_is_unreadable(rules: dict[str, Rule]) -> None:
    r = rules["anthropic"]
    at = orjson.dumps({"usage": {"input_tokens": 10**12 - 1, "output_tokens": 1}})
    assert run(r, "application/json", [at]) == [Quantity("m", 10**12 * M, False)]
    over = orjson.dumps({"usage": {"input_tokens": 10**12, "output_tokens": 1}})
    assert run(r, "application/json", [over]) == [Quantity("m", M, True, "unreadable")]


def test_a_missing_query_parameter_is_unreadable_and_bills_the_reservation(
        rules: dict[str, Rule]) -> None:
    """``request.query.n`` absent: the value is unreadable, so the quantity is the fallback
    (flagged), never a silent 0 or an error."""
    out = compute(rules["many"], meas(query={}, path_params={"n": "4"},
                                      request_headers={"x-units": "2"},
                                      response_headers={"x-cost": "5"}))
    q = out[3]
    assert q.meter == "m" and q.unreadable and q.micro == M


# the integer shortcut (no Decimal for a plain JSON integer) against the Decimal path
BODY_VALUE = st.one_of(
    st.integers(-2**70, 2**70), st.integers(0, 10**12 + 2),
    st.sampled_from([0, 1, 10**12 - 1, 10**12, 10**12 + 1, True, False, None, -1]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.decimals(allow_nan=False, allow_infinity=False), st.lists(st.integers(0, 3), max_size=2))


@given(st.sampled_from(["chat", "anthropic", "responses", "field", "many"]),
       st.lists(BODY_VALUE, min_size=4, max_size=4), st.booleans(), st.booleans(),
       st.booleans(), st.booleans())
@example("chat", [True, 0, 0, 0], False, False, True, False)
@example("anthropic", [5, False, 0, 0], False, False, True, False)
@example("field", [10**12, 0, 0, 0], True, False, False, False)
@example("anthropic", [10**12, 1, 0, 0], False, False, True, False)
@example("responses", [-1, 0, 0, 0], False, False, True, False)
# anthropic's keys, sorted: cache_creation, cache_read, input, output (the first two optional)
@example("anthropic", [None, 5, 3, 4], False, False, True, False)
@example("anthropic", [None, None, 3, 4], False, False, False, True)
@example("anthropic", [-1, 5, 3, 4], False, False, True, False)
@example("anthropic", [1.5, "2", 3, 4], False, False, False, False)
def test_integer_shortcut_bills_what_the_decimal_path_bills(
        rules: dict[str, Rule], name: str, vals: list[object], abandoned: bool,
        malformed: bool, streamed: bool, absent: bool) -> None:
    """``compute`` reads a plain JSON integer without Decimal and takes constants computed
    once per rule: every quantity is still the Decimal path's, for any value (huge,
    negative, bool, float, string, over MAX_UNITS), any body state, any rule."""
    rule = rules[name]
    keys = sorted({p.key for p in rule.json_probes + rule.sse_probes})
    values = dict(zip(keys, vals, strict=False))
    if absent and values:
        values.pop(keys[0])
    view = BodyView(values, malformed=malformed, streamed=streamed,
                    reason="unreadable" if malformed else "")
    m = meas(view, abandoned=abandoned, request_headers={"x-units": str(vals[0])},
             response_headers={"x-cost": str(vals[1])}, query={"n": "2"}, path_params={"n": "3"},
             request_json={"input": [0, {"len": vals[2]}]})
    for dflt in (M, 5 * M):
        assert compute(rule, m, dflt) == [_one_exact(u, m, dflt) for u in rule.usage]


@given(st.sampled_from(["chat", "anthropic", "responses", "field", "mixed"]),
       st.lists(BODY_VALUE, min_size=4, max_size=4), st.booleans(), st.booleans(),
       st.booleans(), st.booleans(), st.booleans(), st.sampled_from([200, 201, 404, 500]),
       st.integers(0, 10**9), st.integers(0, 10**9),
       st.decimals(0, 10**6, allow_nan=False, allow_infinity=False))
@example("mixed", [7, 0, 0, 0], False, False, True, False, False, 200, 0, 0, Decimal(0))
@example("chat", [7, 0, 0, 0], True, False, True, False, True, 200, 0, 0, Decimal(0))
def test_the_body_measurement_bills_what_the_full_measurement_bills(
        rules: dict[str, Rule], name: str, vals: list[object], abandoned: bool,
        malformed: bool, streamed: bool, absent: bool, no_body: bool, status: int,
        req_bytes: int, resp_bytes: int, ms: Decimal) -> None:
    """A rule whose usages are constants and response-body reads is measured with the body
    view alone (``body_measurement``): every quantity, fallback and reason is what the full
    measurement (headers, query, path, request JSON, sizes, duration: anything) gives."""
    rule = rules[name]
    assert reads_body_only(rule)
    keys = sorted({p.key for p in rule.json_probes + rule.sse_probes})
    values = dict(zip(keys, vals, strict=False))
    if absent and values:
        values.pop(keys[0])
    view = None if no_body else BodyView(values, malformed=malformed, streamed=streamed,
                                         reason="unreadable" if malformed else "")
    full = meas(view, status=status, abandoned=abandoned,
                request_headers={"x-units": str(vals[0])}, response_headers={"x-cost": "5"},
                query={"n": "2"}, path_params={"n": "3"}, request_json={"input": [0, vals[1]]},
                request_bytes=req_bytes, response_bytes=resp_bytes, duration_ms=ms)
    for dflt in (M, 5 * M):
        assert compute(rule, body_measurement(status, view, abandoned), dflt) == \
            compute(rule, full, dflt) == [_one_exact(u, full, dflt) for u in rule.usage]


def test_only_constants_and_body_reads_are_body_only(rules: dict[str, Rule]) -> None:
    """A rule reading a header, the query, a path parameter, the request JSON, a size or the
    duration is not measured by the body alone."""
    assert {n for n, r in rules.items() if reads_body_only(r)} == \
        {"chat", "anthropic", "responses", "field", "mixed"}


def test_measurement_view_and_quantity_cannot_be_changed_once_made() -> None:
    """NamedTuples since issue 13 (cheaper to build than frozen dataclasses): still
    immutable, a field set after construction raises."""
    view = BodyView({"k": 1}, streamed=True)
    m = Measurement(status=200, request_headers={}, response_headers={}, query={},
                    path_params={}, request_json=UNREADABLE, response_body=view,
                    request_bytes=0, response_bytes=0, duration_ms=Decimal(0))
    q = Quantity("m", 1, False)
    for obj, name in ((view, "malformed"), (m, "status"), (q, "micro")):
        with pytest.raises(AttributeError):
            setattr(obj, name, 5)
    assert (view.streamed, view.skipped_events, m.abandoned, q.reason) == (True, 0, False, "")


def test_the_integer_shortcut_answers_and_per_rule_tables_are_made_once(
        rules: dict[str, Rule]) -> None:
    """The shortcuts are taken, not silently skipped: plain integers read by a preset get
    their micro-units from ``_int_micro`` (no Decimal), a rule's readable constants are
    computed once and handed back as the same object, and the reference path's fallback for
    an unreadable value is the reservation (flagged)."""
    chat = rules["chat"]
    keys = sorted({p.key for p in chat.json_probes + chat.sse_probes})
    (u,) = chat.usage
    assert keys == ["openai_chat.total"]
    assert _int_micro(u, BodyView({"openai_chat.total": 3})) == 3 * M
    assert _int_micro(u, BodyView({"openai_chat.total": 0})) == 0      # zero is a count
    assert _int_micro(u, BodyView(dict.fromkeys(keys, True))) is None      # a bool is no count
    many = rules["many"]
    assert _readable_constants(many) is _readable_constants(many)
    m = meas(query={}, path_params={"n": "4"}, request_headers={"x-units": "2"},
             response_headers={"x-cost": "5"})
    q = _one_exact(many.usage[3], m, M)
    assert (q.meter, q.micro, q.unreadable) == ("m", M, True)


def test_a_malformed_body_without_a_reason_falls_back_as_unreadable(
        rules: dict[str, Rule]) -> None:
    """A body marked malformed with no reason given is counted as ``unreadable`` (one of
    the documented fallback reasons), never an empty or invented one."""
    (u,) = rules["chat"].usage
    m = meas(BodyView({}, malformed=True))
    assert fallback_reason(u, m) == "unreadable"
    assert compute(rules["chat"], m) == [Quantity("m", M, True, "unreadable")]


@pytest.mark.parametrize(("credits", "divide_by", "units", "micro_credits"), [
    ("1", 3600, 27, 7500),          # 27/3600 credits = 0.0075 exactly: never 7501
    ("0.5", 3, 3, 500_000),         # 0.5 credits per 3 units, 3 units: exactly half a credit
    ("1", 3, 1, 333_334),           # an inexact cost still rounds up (333,333.3...)
    ("2", 1_000_000_000, 1, 1),     # 2e-9 credits: one micro-credit, never 0
])
def test_transformed_credit_rate_charges_the_exact_ceiling(
        tmp_path: Path, credits: str, divide_by: int, units: int, micro_credits: int) -> None:
    """``credits`` per transformed unit is kept exact (credits / divide_by is not rounded to
    28 digits at load time), so an exact cost is never rounded up by one micro-credit."""
    p = tmp_path / "r.yaml"
    p.write_text(f"""version: 1
meters:
  s: {{stripe_event_name: s}}
rules:
  - name: t
    match: {{path: /t}}
    usage:
      - {{meter: s, quantity: request.json.n, transform: {{divide_by: {divide_by}, round: up}},
         credits: {credits}}}
""")
    (rule,) = load_rules([p]).rules
    rate = rule.usage[0].credits_per_unit
    assert rate is not None
    assert cost_micro(units * M, rate) == micro_credits


@pytest.mark.parametrize("value", [10**12, "1000000000000"])
def test_max_units_itself_is_billed_and_one_more_is_unreadable(rules: dict[str, Rule],
                                                              value: object) -> None:
    """MAX_UNITS (10**12 units) is the largest quantity one request records; one unit more
    is unreadable (the fallback: ``on_unreadable`` 7 for ``field``)."""
    for v, expected in ((value, Quantity("m", 10**12 * M, False)),
                        (10**12 + 1, Quantity("m", 7 * M, True, "unreadable"))):
        raw = orjson.dumps({"choices": [{"n": v}]})
        assert run(rules["field"], "application/json", [raw]) == [expected]
