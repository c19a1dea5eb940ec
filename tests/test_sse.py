"""SSE parser and response inspectors: chunking invariance, bounded memory, presets."""

from __future__ import annotations

import itertools

import orjson
from hypothesis import given
from hypothesis import strategies as st

from proxy.rules import sse
from proxy.rules.model import PRESETS
from proxy.rules.sse import (
    UNREADABLE,
    BodyView,
    JsonInspector,
    Probe,
    SseEvent,
    SseInspector,
    SseParser,
    UsageChunkFilter,
    _is_event_stream,
    _needles,
    is_event_stream,
    lookup,
    new_inspector,
    with_stream_usage,
)


def parse_all(data: bytes, cuts: list[int] | None = None, cap: int = 1 << 20) -> list[SseEvent]:
    p = SseParser(cap)
    out: list[SseEvent] = []
    prev = 0
    for c in sorted(cuts or []):
        out += p.feed(data[prev:c])
        prev = c
    out += p.feed(data[prev:])
    return out


def test_basic_fields_and_dispatch() -> None:
    stream = (b": comment\n"
              b"event: ping\ndata: one\n\n"
              b"data:two\ndata:  three\n\n"
              b"id: 7\nretry: 10\n\n"          # no data: not dispatched
              b"data\n\n"                       # field with no colon: empty data
              b"event: x\n\n"                   # event type without data: not dispatched
              b"data: after\n\n")
    assert parse_all(stream) == [
        SseEvent("ping", b"one"), SseEvent("message", b"two\n three"),
        SseEvent("message", b""), SseEvent("message", b"after")]


def test_line_endings_cr_crlf_lf_and_split_crlf() -> None:
    stream = b"data: a\r\rdata: b\r\n\r\ndata: c\n\n"
    expected = [SseEvent("message", b"a"), SseEvent("message", b"b"), SseEvent("message", b"c")]
    assert parse_all(stream) == expected
    for i in range(len(stream) + 1):
        assert parse_all(stream, [i]) == expected


def test_bom_is_stripped_even_split() -> None:
    stream = b"\xef\xbb\xbfdata: x\n\n"
    for i in range(5):
        assert parse_all(stream, [i]) == [SseEvent("message", b"x")]


def test_incomplete_event_is_not_dispatched() -> None:
    assert parse_all(b"data: x\n") == []


def test_oversized_event_is_skipped_and_counted() -> None:
    p = SseParser(10)
    events = p.feed(b"data: " + b"x" * 50 + b"\n\ndata: ok\n\n")
    assert events == [SseEvent("message", b"ok")]
    assert p.oversized == 1
    # over the cap across many lines and chunks
    p = SseParser(10)
    out = []
    for _ in range(20):
        out += p.feed(b"data: 12345\n")
    out += p.feed(b"\ndata: ok\n\n")
    assert out == [SseEvent("message", b"ok")] and p.oversized == 1
    # a single long line arriving in small chunks: memory stays bounded
    p = SseParser(10)
    for _ in range(100):
        assert p.feed(b"data: " + b"y" * 20) == []
    assert p.feed(b"\n\ndata: z\n\n") == [SseEvent("message", b"z")]
    assert p.oversized == 1


LINE = st.one_of(
    st.builds(lambda v: b"data: " + v, st.binary(max_size=20).filter(
        lambda b: b"\r" not in b and b"\n" not in b)),
    st.sampled_from([b"", b": c", b"event: e", b"event:", b"data", b"id: 1", b"x: y",
                     b"data: [DONE]"]),
)
EOL = st.sampled_from([b"\n", b"\r\n", b"\r"])


@given(st.lists(st.tuples(LINE, EOL), max_size=30), st.lists(st.integers(0, 1000), max_size=12))
def test_same_events_however_the_stream_is_chunked(lines: list[tuple[bytes, bytes]],
                                                   cuts: list[int]) -> None:
    data = b"".join(line + eol for line, eol in lines)
    whole = parse_all(data)
    assert parse_all(data, [c % (len(data) + 1) for c in cuts]) == whole
    # byte by byte
    assert parse_all(data, list(range(len(data)))) == whole


@given(st.lists(st.tuples(LINE, EOL), max_size=30), st.lists(st.integers(0, 1000), max_size=12))
def test_same_events_with_a_small_cap(lines: list[tuple[bytes, bytes]],
                                      cuts: list[int]) -> None:
    data = b"".join(line + eol for line, eol in lines)
    whole = parse_all(data, cap=8)
    assert parse_all(data, [c % (len(data) + 1) for c in cuts], cap=8) == whole


def test_lookup() -> None:
    doc = {"choices": [{"x": 3}], "a": {"b": None}}
    assert lookup(doc, ("choices", "0", "x")) == 3
    assert lookup(doc, ("choices", "1", "x")) is UNREADABLE
    assert lookup(doc, ("a", "b")) is None
    assert lookup(doc, ("a", "b", "c")) is UNREADABLE
    assert lookup([1, 2], ("1",)) == 2
    assert lookup({"0": 5}, ("0",)) == 5


TOTAL = Probe("t", ("usage", "total_tokens"))


def test_json_inspector_parses_at_result() -> None:
    insp = JsonInspector((TOTAL,), 1024)
    body = orjson.dumps({"usage": {"total_tokens": 42}})
    insp.feed(body[:5])
    assert insp.result().malformed  # abandoned mid-body
    insp.feed(body[5:])
    assert insp.result().get("t") == 42


def test_json_inspector_over_cap_is_scanned() -> None:
    insp = JsonInspector((TOTAL,), 10)
    insp.feed(b'{"usage": {"total_tokens": 1}}')
    view = insp.result()
    assert not view.malformed and view.scanned and view.get("t") == 1


def test_json_inspector_over_cap_truncated_is_malformed() -> None:
    insp = JsonInspector((TOTAL,), 10)
    insp.feed(b'{"usage": {"total_tokens": 1}')
    view = insp.result()
    assert view.malformed and view.reason == "over_cap" and view.get("t") is UNREADABLE


def test_sse_inspector_keeps_last_value() -> None:
    insp = SseInspector((TOTAL,), 1024)
    chunks = [
        b'data: {"choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n',
        b'data: {"usage":{"total_tokens":5}}\n\n',
        b'data: {"choices":[]}\n\n',
        b'data: {"usage":{"total_tokens":17}}\n\n',
        b"data: [DONE]\n\n",
    ]
    for c in chunks:
        insp.feed(c)
    view = insp.result()
    assert view.get("t") == 17 and view.streamed


def test_sse_inspector_mid_stream_result() -> None:
    insp = SseInspector((TOTAL,), 1024)
    insp.feed(b'data: {"usage":{"total_tokens":5}}\n\ndata: {"usage":{"tot')
    assert insp.result().get("t") == 5


def test_sse_type_filter() -> None:
    p = Probe("in", ("message", "usage", "input_tokens"), "message_start")
    insp = SseInspector((p,), 1024)
    insp.feed(b'data: {"type":"other","message":{"usage":{"input_tokens":1}}}\n\n')
    assert insp.result().get("in") is UNREADABLE
    insp.feed(b'data: {"type":"message_start","message":{"usage":{"input_tokens":9}}}\n\n')
    assert insp.result().get("in") == 9


def test_new_inspector_by_content_type() -> None:
    assert isinstance(new_inspector((TOTAL,), (TOTAL,), "text/event-stream; charset=utf-8", 9),
                      SseInspector)
    assert isinstance(new_inspector((TOTAL,), (TOTAL,), "application/json", 9), JsonInspector)
    assert isinstance(new_inspector((TOTAL,), (TOTAL,), None, 9), JsonInspector)
    assert new_inspector((), (), "text/event-stream", 9) is None
    assert is_event_stream("Text/Event-Stream")
    assert not is_event_stream("text/plain")


CONTENT_TYPES = st.one_of(
    st.text(max_size=40),
    st.builds(lambda a, t, p: a + t + p, st.sampled_from(["", " ", "\t"]),
              st.sampled_from(["text/event-stream", "Text/Event-Stream", "TEXT/EVENT-STREAM",
                               "text/event-streams", "text/event", "application/json"]),
              st.sampled_from(["", ";", "; charset=utf-8", " ;x=1", "\t"])))


@given(st.lists(CONTENT_TYPES, max_size=20))
def test_remembered_content_type_answers_are_the_split_s(values: list[str]) -> None:
    """``is_event_stream`` keeps its answer per Content-Type value: asked once or again, in
    any order, it answers what the split and compare says."""
    for v in values + values[::-1]:
        assert is_event_stream(v) is (bool(v) and _is_event_stream(v))


def test_remembered_content_types_are_bounded() -> None:
    """However many distinct Content-Type values an upstream sends, at most ``_SEEN_TYPES``
    answers are kept, and each is still right."""
    for i in range(3 * sse._SEEN_TYPES):
        assert not is_event_stream(f"text/plain; n={i}")
        assert is_event_stream(f"text/event-stream; n={i}")
        assert len(sse._EVENT_STREAM) <= sse._SEEN_TYPES


def feed_cut(insp: SseInspector | JsonInspector, data: bytes, cuts: list[int]) -> None:
    prev = 0
    for c in sorted(x % (len(data) + 1) for x in cuts):
        insp.feed(data[prev:c])
        prev = c
    insp.feed(data[prev:])


@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=8))
def test_inspectors_read_arbitrary_bytes_the_same_however_chunked(data: bytes,
                                                                   cuts: list[int]) -> None:
    """Any bytes, cut anywhere: the same view as one chunk (including the skipped-event
    count), and a JSON body that is not valid JSON is malformed with no values."""
    probes = (TOTAL, Probe("i", ("0",)), Probe("f", ("type",), "x"))
    for cls in (SseInspector, JsonInspector):
        whole, cut = cls(probes, 64), cls(probes, 64)
        whole.feed(data)
        feed_cut(cut, data, cuts)
        assert cut.result() == whole.result()
    view = JsonInspector(probes, 1 << 20)
    view.feed(data)
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        assert view.result() == BodyView({}, malformed=True, reason="unreadable")


@given(st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=8),
       st.integers(0, 10**9))
def test_usage_event_after_arbitrary_bytes_is_read_exactly(garbage: bytes, cuts: list[int],
                                                           tokens: int) -> None:
    """Whatever came before, once a blank line ends it, the next usage event is read."""
    data = garbage + b"\n\n" + b'data: {"usage":{"total_tokens":%d}}\n\n' % tokens
    insp = SseInspector((TOTAL,), 1 << 20)
    feed_cut(insp, data, cuts)
    assert insp.result().get("t") == tokens


def test_the_inspector_holds_at_most_its_batch_however_small_the_chunks() -> None:
    """What an SSE inspector holds between passes is bounded by its batch (the smaller of
    BATCH and the inspect cap) plus one chunk, whatever the chunk sizes: many small chunks
    are read once their sum passes the bound, not kept until the stream ends."""
    insp = SseInspector((TOTAL,), 64)
    event = b'data: {"x":1}\n\n'
    for _ in range(200):
        insp.feed(event)
        assert sum(len(c) for c in insp._pending) <= 64 + len(event)
    insp.feed(b'data: {"usage":{"total_tokens":7}}\n\n')
    assert insp.result().get("t") == 7


def test_top_level_list_index_probe_on_sse() -> None:
    insp = SseInspector((Probe("i", ("0",)),), 64)
    insp.feed(b"data: [4, 5]\n\n")
    assert insp.result().get("i") == 4


def test_with_stream_usage_rewrites_a_present_stream_options_keeping_every_other_key() -> None:
    """``stream_options`` present without ``include_usage``: the body is re-encoded with
    ``include_usage`` true added to the client's options, every other key kept."""
    doc = {"model": "m", "stream": True, "stream_options": {"chunk": 3}, "n": 1}
    out = with_stream_usage(doc, orjson.dumps(doc))
    assert out is not None
    assert orjson.loads(out) == {"model": "m", "stream": True, "n": 1,
                                 "stream_options": {"chunk": 3, "include_usage": True}}
    # a non-object stream_options is replaced by one that asks for usage
    out = with_stream_usage({"stream": True, "stream_options": 7}, b'{"stream":true,'
                            b'"stream_options":7}')
    assert out is not None and orjson.loads(out) == {"stream": True,
                                                     "stream_options": {"include_usage": True}}


def test_usage_chunk_filter_flush_hands_over_the_held_tail_once() -> None:
    f = UsageChunkFilter(1024)
    assert f.feed(b"data: {\"a\":1}") == b""          # an unterminated event is held
    assert f.flush() == b"data: {\"a\":1}"
    assert f.flush() == b""                            # nothing is handed over twice
    assert f.feed(b"data: {\"b\":2}\n\n") == b"data: {\"b\":2}\n\n"


def test_usage_chunk_filter_keeps_an_event_that_only_mentions_usage() -> None:
    """Only the usage chunk the proxy asked for (valid JSON, ``choices: []``, a ``usage``
    object) is taken out of the consumer's stream: an event whose data mentions "usage" but
    is not JSON, or is JSON of another shape, reaches the consumer as sent."""
    f = UsageChunkFilter(1024)
    broken = b'data: {"usage": {"total_tokens": 4}\n\n'          # not JSON (unclosed)
    other = b'data: {"choices": [{"delta": {}}], "usage": {"total_tokens": 4}}\n\n'
    ours = b'data: {"choices": [], "usage": {"total_tokens": 4}}\n\n'
    done = b"data: [DONE]\n\n"
    assert f.feed(broken + other + ours + done) == broken + other + done
    assert f.flush() == b""


# ------------------------------------ the batched inspector against the parser alone

ANTHROPIC = (Probe("in", ("message", "usage", "input_tokens"), "message_start"),
             Probe("out", ("usage", "output_tokens"), "message_delta"))
PROBE_SETS = [(TOTAL,), ANTHROPIC, (TOTAL, Probe("i", ("0",))),
              (TOTAL, Probe("u", ("usage", "total_tokens"), "x")),   # one key, two values
              # the presets' own: optional cache keys; one key set by three event types
              PRESETS["anthropic_messages"].sse_probes, PRESETS["openai_responses"].sse_probes]


def parser_view(probes: tuple[Probe, ...], data: bytes, cap: int) -> BodyView:
    """The reference: the whole stream through :class:`SseParser` in one piece, and every
    event that holds all the keys of some probe decoded and matched (what
    :class:`SseInspector` reads, without holding chunks or passing over events)."""
    p = SseParser(cap)
    values: dict[str, object] = {}
    for ev in p.feed(data):
        if ev.data == b"[DONE]" or not any(all(n in ev.data for n in pr.needles)
                                           for pr in probes):
            continue
        try:
            doc = orjson.loads(ev.data)
        except orjson.JSONDecodeError:
            continue
        etype = doc.get("type") if isinstance(doc, dict) else None
        for pr in probes:
            if (pr.type_filter is None or etype == pr.type_filter) \
                    and (v := lookup(doc, pr.path)) is not UNREADABLE:
                values[pr.key] = v
    return BodyView(values, streamed=True, skipped_events=p.oversized)


EVENT_LINES = st.one_of(
    st.integers(0, 99).map(lambda n: [b'data: {"type":"message_start","message":{"usage":'
                                      b'{"input_tokens":%d,"cache_read_input_tokens":%d}}}'
                                      % (n, 2 * n)]),
    st.tuples(st.sampled_from([b"response.completed", b"response.incomplete", b"response.failed",
                               b"response.created"]), st.integers(0, 99)).map(
        lambda t: [b'data: {"type":"%s","response":{"usage":{"total_tokens":%d}}}' % t]),
    st.integers(0, 10**6).map(lambda n: [b'data: {"usage":{"total_tokens":%d}}' % n]),
    st.integers(0, 99).map(lambda n: [b'data: {"choices":[{"delta":{"content":"w%d"}}],'
                                      b'"usage":null}' % n]),
    st.integers(0, 99).map(lambda n: [b"event: message_start",
                                      b'data: {"type":"message_start","message":{"usage":'
                                      b'{"input_tokens":%d,"output_tokens":1}}}' % n]),
    st.integers(0, 99).map(lambda n: [b'data: {"type":"message_delta","usage":'
                                      b'{"output_tokens":%d}}' % n]),
    st.integers(0, 99).map(lambda n: [b'data: {"usage":{"total_', b'data: tokens":%d}}' % n]),
    st.integers(0, 99).map(lambda n: [b'data: {"total_tokens":%d}' % n]),   # key, not path
    st.integers(0, 99).map(lambda n: [b'data: {"type":"x","usage":{"total_tokens":%d}}' % n]),
    st.integers(0, 99).map(lambda n: [b"data: [%d, 1]" % n]),
    st.integers(0, 99).map(lambda n: [b'data: {"usage":{"total_tokens":%d},"pad":"%s"}'
                                      % (n, b"x" * 60)]),                   # over a small cap
    st.just([b'data: {"pad":"' + b"y" * 70 + b'"}']),        # over a small cap, no key
    st.integers(0, 99).map(lambda n: [b'data:{"usage":{"total_tokens":%d}}' % n]),
    st.integers(0, 99).map(lambda n: [b'data:  {"usage":{"total_tokens":%d}}' % n]),
    st.integers(0, 99).map(lambda n: [b'data: {"usage":{"total_tokens":%d}}' % n,
                                      b'data: {"usage":{"total_tokens":1}}']),
    st.integers(0, 99).map(lambda n: [b'event: x', b'data: {"usage":{"total_tokens":%d}}' % n]),
    st.integers(0, 99).map(lambda n: [b'data: {"usage":{"total_tokens":%d}}' % n, b": c"]),
    st.sampled_from([[b"data: [DONE]"], [b": keep-alive"], [b"id: 7", b"retry: 5"],
                     [b"\xef\xbb\xbfdata: {\"usage\":{\"total_tokens\":1}}"], [b"data"],
                     [b"event: ping"], [b'data: {"usage":{"total_tokens":']]),
)
LF_MOSTLY = st.sampled_from([b"\n"] * 8 + [b"\r\n", b"\r"])


@st.composite
def event_streams(draw: st.DrawFn) -> bytes:
    out = [draw(st.sampled_from([b"", b"", b"\xef\xbb\xbf", b"\xef\xbb", b"\n", b"garbage"]))]
    for lines in draw(st.lists(EVENT_LINES, max_size=12)):
        for line in lines:
            out += [line, draw(LF_MOSTLY)]
        out.append(draw(LF_MOSTLY))                                          # the blank line
    out.append(draw(st.sampled_from([b"", b"", b'data: {"usage":{"total_tokens":9}}',
                                     b'data: {"usage":{"total_tokens":9}}\n'])))
    return b"".join(out)


@given(event_streams(), st.lists(st.integers(0, 2000), max_size=10),
       st.sampled_from(PROBE_SETS), st.sampled_from([16, 48, 80, 200, 1 << 20]),
       st.integers(0, 2000))
def test_batched_inspector_reads_what_the_parser_reads(data: bytes, cuts: list[int],
                                                       probes: tuple[Probe, ...], cap: int,
                                                       mid: int) -> None:
    """Any stream of LLM-like events (keys split across data lines, a key outside its path,
    CR/CRLF/LF, a BOM, events over the cap, an unterminated last event), cut anywhere,
    with the view also asked for mid-stream: the view is the parser's alone (every field,
    the oversized count included). Small caps make the inspector read while chunks are
    still coming (it holds at most min(cap, BATCH) bytes)."""
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    ask = mid % (len(chunks) + 1)
    insp = SseInspector(probes, cap)
    fed = b""
    for i, c in enumerate(chunks):
        if i == ask:
            assert insp.result() == parser_view(probes, fed, cap)
        insp.feed(c)
        fed += c
    assert insp.result() == parser_view(probes, data, cap)
    assert insp.result() == parser_view(probes, data, cap)                 # asked again


def test_events_before_the_key_are_passed_over_and_the_key_event_is_read() -> None:
    """The shape of the benchmark's stream (20 whole events, only the last with the usage
    key): one pass at the end reads the value; the same when the key event comes first."""
    noise = [b'data: {"choices":[{"delta":{"content":"w%d"}}],"usage":null}\n\n' % i
             for i in range(19)]
    last = b'data: {"usage": {"total_tokens": 42}}\n\n'
    crlf = [c.replace(b"\n", b"\r\n") for c in [*noise, last]]      # no \n\n: all parsed
    for chunks in ([*noise, last], [last, *noise], [b"".join(noise) + last], crlf):
        insp = SseInspector((TOTAL,), 1 << 20)
        for c in chunks:
            insp.feed(c)
        assert insp.result() == BodyView({"t": 42}, streamed=True)


def test_a_stream_read_by_the_shortcuts_makes_no_parser() -> None:
    """The benchmark's stream (whole events, the key event one ``data:`` line) is read
    without an :class:`SseParser`; one is made, marked started, once bytes must be parsed
    (an event over the cap still counted)."""
    noise = b"".join(b'data: {"choices":[{"delta":{"content":"w%d"}}]}\n\n' % i
                     for i in range(19))
    insp = SseInspector((TOTAL,), 1 << 20)
    insp.feed(noise + b'data: {"usage": {"total_tokens": 42}}\n\n')
    assert insp.result() == BodyView({"t": 42}, streamed=True)
    assert insp._parser is None
    data = noise + b'data: {"pad":"' + b"x" * 40 + b'"}\n\n\xef\xbb\xbfdata: {"usage":{"total_tokens":1}}\n\n'
    insp = SseInspector((TOTAL,), 48)
    insp.feed(data)
    assert insp.result() == parser_view((TOTAL,), data, 48) == \
        BodyView({}, streamed=True, skipped_events=1)
    assert insp._parser is not None


def test_the_last_key_event_read_first_when_it_sets_every_value() -> None:
    """One probe key whose last event (one ``data:`` line) sets every value: the events
    before it (within the cap together) are passed over without searching them; when that
    event does not set every value, or the events before it exceed the cap, they are read
    in order. The view is the parser's either way."""
    noise = b"".join(b'data: {"choices":[{"delta":{"content":"w%d"}}]}\n\n' % i
                     for i in range(5))
    early = b'data: {"type":"x","usage":{"total_tokens":1}}\n\n'
    last = b'data: {"usage":{"total_tokens":42}}\n\n'
    both = (TOTAL, Probe("u", ("usage", "total_tokens"), "x"))
    for probes, data, cap, shortcut in (((TOTAL,), noise + early + noise + last, 1 << 20, True),
                                        (both, noise + early + noise + last, 1 << 20, False),
                                        ((TOTAL,), noise + early + noise + last, 300, False),
                                        ((TOTAL,), noise + last.replace(b"\n\n", b"\r\n\n"),
                                         1 << 20, False)):
        insp = SseInspector(probes, cap)
        assert (insp._from_last(data) == len(data)) is shortcut
        insp = SseInspector(probes, cap)
        insp.feed(data)
        assert insp.result() == parser_view(probes, data, cap)


def test_a_bom_after_passed_over_events_is_not_the_streams() -> None:
    """Only the stream's first bytes may be a BOM: after events passed over unparsed, a BOM
    is part of a field name (so the line is ignored), as the parser alone reads it."""
    data = b'data: {}\n\n\xef\xbb\xbfdata: {"usage":{"total_tokens":3}}\n\n'
    insp = SseInspector((TOTAL,), 1 << 20)
    insp.feed(data)
    assert insp.result() == parser_view((TOTAL,), data, 1 << 20) == BodyView({}, streamed=True)


def test_a_cr_inside_a_one_line_looking_event_ends_the_line() -> None:
    """``data: X\\r: c\\n\\n`` is a data line and a comment (CR ends a line), not one data
    line: the event's data is X, as the parser reads it."""
    data = b'data: {}\n\ndata: {"usage":{"total_tokens":4}}\r: c\n\n'
    insp = SseInspector((TOTAL,), 1 << 20)
    insp.feed(data)
    assert insp.result() == parser_view((TOTAL,), data, 1 << 20) == \
        BodyView({"t": 4}, streamed=True)


def test_a_probe_tuple_s_needles_are_made_once() -> None:
    """``_needles`` is computed once per probe tuple (a rule's) and handed back as the same
    objects, not made again for every response."""
    probes = (Probe("t", ("usage", "total_tokens")), Probe("i", ("usage", "input_tokens")))
    first, keys = _needles(probes)
    again, keys_again = _needles(probes)
    assert first is again and keys is keys_again
    assert set(first) == {(b'"usage"', b'"total_tokens"'), (b'"usage"', b'"input_tokens"')}
    assert keys is not None and set(keys) == {b'"total_tokens"', b'"input_tokens"'}


def test_usage_chunk_filter_joins_an_event_split_across_chunks_and_drops_the_usage_one() -> None:
    """Chunks that end mid-event are held and joined to the next one: every split of a
    stream passes its bytes unchanged, except the usage-only chunk the proxy asked for."""
    content = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
    usage = b'data: {"choices":[],"usage":{"total_tokens":7}}\n\n'
    done = b"data: [DONE]\n\n"
    stream = content + usage + done
    for cut in range(1, len(stream)):
        for cut2 in (cut, min(cut + 7, len(stream))):
            f = UsageChunkFilter(1024)
            out = f.feed(stream[:cut]) + f.feed(stream[cut:cut2]) + f.feed(stream[cut2:])
            assert out + f.flush() == content + done, (cut, cut2)


# one-line events aimed at the last-key-first read (SseInspector._from_last): the key as a
# string value or escaped inside one, after a tab or two spaces, a trailing space or CR, a
# duplicate key, a key event the type filter refuses, a key in a comment, a BOM
LAST_KEY_LINES = [
    b'data: {"usage":{"total_tokens":%d}}',
    b'data: {"note":"\\"total_tokens\\"","usage":{"total_tokens":%d}}',
    b'data: {"usage":{"x":%d},"k":"total_tokens"}',
    b'data: {"k":"total_tokens","usage":{"total_tokens":%d}}',
    b'data: {"type":"x","usage":{"total_tokens":%d}}',
    b'data:{"usage":{"total_tokens":%d}}', b'data:  {"usage":{"total_tokens":%d}}',
    b'data:\t{"usage":{"total_tokens":%d}}', b'data: {"usage":{"total_tokens":%d}} ',
    b'data: {"usage":{"total_tokens":null}}',
    b'data: {"usage":{"total_tokens":%d},"usage":{"total_tokens":1}}',
    b'data: {"usage":[{"total_tokens":%d}]}', b"data: [DONE]",
    b': {"usage":{"total_tokens":%d}}', b"event: x", b"id: 1",
    b'data: {"type":"message_delta","usage":{"output_tokens":%d}}',
    b'data: {"type":"message_start","message":{"usage":{"input_tokens":%d,'
    b'"output_tokens":2}}}',
    b'data: {"pad":"' + b"y" * 70 + b'", "usage":{"total_tokens":%d}}',
    b'\xef\xbb\xbfdata: {"usage":{"total_tokens":%d}}',
    b'data: {"usage":{"total_tokens":%d}}\r', b'data: {"usage":{"total_', b'data: tokens":%d}}',
    b"data",
]
# two probes of one key whose needles are the same (a list index is not a needle)
ALTERNATIVES = (TOTAL, Probe("t", ("usage", "0", "total_tokens")))


@given(st.lists(st.tuples(st.integers(0, len(LAST_KEY_LINES) - 1), st.integers(0, 99),
                          st.sampled_from([b"\n", b"\n", b"\r\n", b"\r"]),
                          st.sampled_from([b"", b"\n", b"\n", b"\r\n", b"\r"])),
                max_size=15),
       st.lists(st.integers(0, 3000), max_size=6),
       st.sampled_from([*PROBE_SETS, ALTERNATIVES]), st.sampled_from([16, 48, 80, 200, 1 << 20]))
def test_the_last_key_first_read_is_the_parsers_view(
        lines: list[tuple[int, int, bytes, bytes]], cuts: list[int],
        probes: tuple[Probe, ...], cap: int) -> None:
    """Streams of one-line events built to mislead the last-key-first read (the key outside
    its path or inside a string, data-line spacing variants, CR/CRLF endings, events over a
    small cap, several usage events), cut anywhere: the view is still the parser's."""
    out = []
    for i, n, eol, blank in lines:
        line = LAST_KEY_LINES[i]
        out += [line % n if b"%d" in line else line, eol, blank]
    data = b"".join(out)
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    insp = SseInspector(probes, cap)
    for a, b in itertools.pairwise(bounds):
        insp.feed(data[a:b])
    assert insp.result() == parser_view(probes, data, cap)


def test_a_usage_chunk_is_found_wherever_its_markers_start_in_the_bytes() -> None:
    """The byte checks in front of the JSON parse (``"usage"``, ``"choices":[]``) accept a
    marker at offset 0 too: an event whose first line is a stray field named like the marker
    (a line an SSE client ignores) is still read, and the usage chunk in it still removed."""
    usage = b'data: {"choices":[],"usage":{"total_tokens":3}}\n\n'
    assert sse._is_usage_chunk(b'"usage": 1\n' + usage)
    spaced = b'data: {"choices": [], "usage": {"total_tokens": 3}}\n\n'
    for stray, chunk in ((b'"choices":[]\n', usage), (b'"choices": []\n', spaced)):
        assert UsageChunkFilter(1024).feed(stray + chunk) == b""
        kept = b'data: {"choices":[{"delta":{}}]}\n\n'
        assert UsageChunkFilter(1024).feed(stray + kept) == stray + kept


def test_filtering_stops_for_good_once_no_event_boundary_fits_max_pending() -> None:
    """Past ``max_pending`` bytes without an event boundary the filter passes everything
    from then on (docstring): a later usage chunk is no longer removed."""
    f = UsageChunkFilter(8)
    long = b"data: " + b"x" * 20
    assert f.feed(long) == long
    usage = b'\n\ndata: {"choices":[],"usage":{"total_tokens":1}}\n\n'
    assert f.feed(usage) == usage
    assert f.flush() == b""
