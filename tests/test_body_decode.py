"""Body inspection without a network: every preset's sample stream split at every byte
boundary (and random chunkings), bounded decoding of gzip/deflate/br/zstd including a
decompression bomb, the over-cap key scanner, the include_usage request rewrite and the
filter that removes the usage chunk the client did not ask for."""

from __future__ import annotations

import gzip
import itertools
import zlib
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import brotli
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.rules import UNREADABLE, BodyView, Measurement, Quantity, Rule, compute, load_rules
from proxy.rules.decode import PIECE, DecodingInspector, new_decoder
from proxy.rules.jsonscan import KeyScanner
from proxy.rules.sse import Probe, UsageChunkFilter, may_stream, with_stream_usage

try:
    from compression import zstd  # type: ignore[import-not-found,unused-ignore]
except ImportError:
    from backports import zstd  # type: ignore[no-redef,unused-ignore]

M = 1_000_000

RULES = """\
version: 1
meters:
  t: {stripe_event_name: t}
rules:
  - name: chat
    match: {path: /chat}
    usage: [{meter: t, preset: openai_chat, estimate: 1000}]
  - name: anthropic
    match: {path: /anthropic}
    usage: [{meter: t, preset: anthropic_messages, estimate: 500}]
  - name: responses
    match: {path: /responses}
    usage: [{meter: t, preset: openai_responses}]
  - name: field
    match: {path: /field}
    usage: [{meter: t, quantity: response.json.usage.units, on_unreadable: 3}]
"""


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Rule]:
    p: Path = tmp_path_factory.mktemp("r") / "r.yaml"
    p.write_text(RULES)
    return {r.name: r for r in load_rules([p]).rules}


def _ev(data: Any, event: str | None = None, eol: str = "\n") -> str:
    head = f"event: {event}{eol}" if event else ""
    payload = data if isinstance(data, str) else orjson.dumps(data).decode()
    return f"{head}data: {payload}{eol}{eol}"


def openai_chat_stream(eol: str = "\n") -> bytes:
    parts = [_ev({"id": "c", "choices": [{"delta": {"content": f"w{i} "}}], "usage": None},
                 eol=eol) for i in range(3)]
    parts.append(_ev({"id": "c", "choices": [], "usage": {"prompt_tokens": 11,
                                                          "completion_tokens": 31,
                                                          "total_tokens": 42}}, eol=eol))
    parts.append(_ev("[DONE]", eol=eol))
    return "".join(parts).encode()


def anthropic_stream(eol: str = "\n") -> bytes:
    parts = [_ev({"type": "message_start", "message": {"usage": {"input_tokens": 25,
                                                                  "output_tokens": 1}}},
                 "message_start", eol)]
    for i in range(3):
        parts.append(_ev({"type": "content_block_delta", "delta": {"text": f"w{i}"}},
                         "content_block_delta", eol))
        parts.append(_ev({"type": "message_delta", "usage": {"output_tokens": 5 * (i + 1)}},
                         "message_delta", eol))
    parts.append(_ev({"type": "message_stop"}, "message_stop", eol))
    return "".join(parts).encode()


def anthropic_cached_stream(eol: str = "\n") -> bytes:
    """:func:`anthropic_stream` whose prompt was partly written to, partly read from the cache."""
    return anthropic_stream(eol).replace(
        b'"input_tokens":25,', b'"input_tokens":25,"cache_creation_input_tokens":300,'
                               b'"cache_read_input_tokens":4000,')


def responses_stream(eol: str = "\n", last: str = "response.completed") -> bytes:
    return "".join([
        _ev({"type": "response.created", "response": {"usage": None}}, "response.created", eol),
        _ev({"type": "response.output_text.delta", "delta": "x"}, "response.output_text.delta",
            eol),
        _ev({"type": last, "response": {"usage": {"total_tokens": 77}}}, last, eol),
    ]).encode()


def responses_incomplete_stream(eol: str = "\n") -> bytes:
    return responses_stream(eol, "response.incomplete")


# (rule, sample stream, exact quantity in micro-units)
SAMPLES = [
    ("chat", openai_chat_stream, 42 * M),
    ("anthropic", anthropic_stream, 40 * M),      # 25 input + last cumulative 15 output
    ("anthropic", anthropic_cached_stream, 4340 * M),     # + 300 cache written + 4000 read
    ("responses", responses_stream, 77 * M),
    ("responses", responses_incomplete_stream, 77 * M),
]


def measure(rule: Rule, chunks: list[bytes], content_type: str = "text/event-stream",
            encoding: str | None = None, cap: int = 1 << 20, abandoned: bool = False
            ) -> list[Quantity]:
    insp = rule.new_inspector(content_type, cap, encoding)
    assert insp is not None
    for c in chunks:
        insp.feed(c)
    m = Measurement(status=200, request_headers={}, response_headers={}, query={},
                    path_params={}, request_json=UNREADABLE, response_body=insp.result(),
                    request_bytes=0, response_bytes=0, duration_ms=Decimal(0),
                    abandoned=abandoned)
    return compute(rule, m)


@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"])
@pytest.mark.parametrize(("name", "make", "expected"), SAMPLES)
def test_every_byte_boundary(rules: dict[str, Rule], name: str, make: Any, expected: int,
                             eol: str) -> None:
    data: bytes = make(eol)
    rule = rules[name]
    want = [Quantity("t", expected, False)]
    for i in range(len(data) + 1):
        assert measure(rule, [data[:i], data[i:]]) == want, i
    assert measure(rule, [data[i:i + 1] for i in range(len(data))]) == want


@pytest.mark.parametrize(("name", "make", "expected"), SAMPLES)
def test_every_byte_boundary_gzip(rules: dict[str, Rule], name: str, make: Any,
                                  expected: int) -> None:
    data = gzip.compress(make())
    rule = rules[name]
    for i in range(len(data) + 1):
        assert measure(rule, [data[:i], data[i:]], encoding="gzip") == [
            Quantity("t", expected, False)], i


@st.composite
def chunkings(draw: st.DrawFn) -> tuple[int, list[int]]:
    idx = draw(st.integers(0, len(SAMPLES) - 1))
    n = len(SAMPLES[idx][1]())
    cuts = draw(st.lists(st.integers(0, n), max_size=40))
    return idx, sorted(set(cuts))


@given(chunkings())
def test_random_chunkings(rules: dict[str, Rule], case: tuple[int, list[int]]) -> None:
    idx, cuts = case
    name, make, expected = SAMPLES[idx]
    data: bytes = make()
    bounds = [0, *cuts, len(data)]
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    assert measure(rules[name], chunks) == [Quantity("t", expected, False)]


def test_last_event_carrying_usage_wins(rules: dict[str, Rule]) -> None:
    data = openai_chat_stream().replace(b"data: [DONE]", orjson.dumps(
        {"choices": [], "usage": {"total_tokens": 50}}).join([b"data: ", b""])
        + b"\n\ndata: [DONE]")
    assert measure(rules["chat"], [data]) == [Quantity("t", 50 * M, False)]


def test_stream_without_usage_bills_the_estimate(rules: dict[str, Rule]) -> None:
    full = openai_chat_stream()
    cut = full[:full.index(b'data: {"id":"c","choices":[]')]
    assert measure(rules["chat"], [cut]) == [Quantity("t", 1000 * M, True, "no_usage_event")]
    assert measure(rules["chat"], [cut], abandoned=True) == [
        Quantity("t", 1000 * M, True, "stream_abandoned")]
    # anthropic: abandoned after message_start, before any message_delta
    a = anthropic_stream()
    a = a[:a.index(b"event: message_delta")]
    assert measure(rules["anthropic"], [a], abandoned=True) == [
        Quantity("t", 500 * M, True, "stream_abandoned")]
    # an explicit on_unreadable wins over the reservation
    assert measure(rules["field"], [b'{"x": 1}'], "application/json") == [
        Quantity("t", 3 * M, True, "unreadable")]


# ------------------------------------------------------------------ decoding


def _encode(encoding: str, data: bytes) -> bytes:
    if encoding == "gzip":
        return gzip.compress(data)
    if encoding == "deflate":
        return zlib.compress(data)
    if encoding == "deflate-raw":
        c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        return c.compress(data) + c.flush()
    if encoding == "br":
        return bytes(brotli.compress(data))
    assert encoding == "zstd"
    return bytes(zstd.compress(data))


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "deflate-raw", "br", "zstd"])
def test_decoded_json_every_boundary(rules: dict[str, Rule], encoding: str) -> None:
    body = orjson.dumps({"id": "x", "choices": [{"message": {"content": "hi " * 50}}],
                         "usage": {"total_tokens": 321}})
    data = _encode(encoding, body)
    header = "deflate" if encoding == "deflate-raw" else encoding
    for i in range(len(data) + 1):
        assert measure(rules["chat"], [data[:i], data[i:]], "application/json", header) == [
            Quantity("t", 321 * M, False)], i


def test_gzip_members_and_zstd_frames_concatenated(rules: dict[str, Rule]) -> None:
    body = orjson.dumps({"usage": {"total_tokens": 9}, "pad": "p" * 100})
    half = len(body) // 2
    g = gzip.compress(body[:half]) + gzip.compress(body[half:])
    assert measure(rules["chat"], [g], "application/json", "gzip") == [Quantity("t", 9 * M, False)]
    z = bytes(zstd.compress(body[:half])) + bytes(zstd.compress(body[half:]))
    assert measure(rules["chat"], [z], "application/json", "zstd") == [Quantity("t", 9 * M, False)]


@pytest.mark.parametrize(("encoding", "data"), [
    ("gzip", b"not gzip at all"),
    ("br", b"\xff\xff\xff\xff garbage"),
    ("zstd", b"garbage that is not a frame"),
    ("gzip, br", b"x"),            # stacked encodings are not decoded
    ("compress", b"x"),            # unknown encoding
])
def test_undecodable_bills_the_reservation(rules: dict[str, Rule], encoding: str,
                                           data: bytes) -> None:
    assert measure(rules["chat"], [data], "application/json", encoding) == [
        Quantity("t", 1000 * M, True, "unreadable")]


def _bomb(encoding: str, total: int) -> Iterator[bytes]:
    """A compressed body of ``total`` zero bytes, produced without holding it."""
    block = b"0" * (1 << 20)
    if encoding == "gzip":
        c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        for _ in range(total // len(block)):
            yield c.compress(block)
        yield c.flush()
    elif encoding == "br":
        b = brotli.Compressor(quality=5)
        for _ in range(total // len(block)):
            yield bytes(b.process(block))
        yield bytes(b.finish())
    else:
        z = zstd.ZstdCompressor()
        for _ in range(total // len(block)):
            yield bytes(z.compress(block))
        yield bytes(z.flush())


class _Counting:
    """An inner inspector that records the size of every piece it is fed."""

    def __init__(self) -> None:
        self.pieces: list[int] = []

    def feed(self, chunk: bytes) -> None:
        self.pieces.append(len(chunk))

    def result(self) -> BodyView:
        return BodyView({})


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_decompression_bomb_is_bounded(encoding: str) -> None:
    inner = _Counting()
    limit = 4 << 20
    insp = DecodingInspector(inner, encoding, limit)
    compressed = b"".join(_bomb(encoding, 256 << 20))     # 256 MiB of zeros
    assert len(compressed) < 1 << 20
    insp.feed(compressed)                                  # one chunk, all of it
    assert max(inner.pieces) <= (2 * PIECE if encoding == "br" else PIECE)
    assert sum(inner.pieces) <= limit
    assert insp.decoded_bytes <= limit + 2 * PIECE
    view = insp.result()
    assert view.malformed and view.reason == "compressed_too_large"


def test_decoder_pieces_are_bounded_and_complete() -> None:
    body = bytes(range(256)) * 4096                        # 1 MiB, compressible
    for enc in ("gzip", "deflate", "br", "zstd"):
        d = new_decoder(enc)
        assert d is not None
        out = list(d.decode(_encode(enc, body)))
        assert max(len(p) for p in out) <= 2 * PIECE and b"".join(out) == body, enc
        assert len(out) > 1, enc
    assert new_decoder("identity") is None and new_decoder("gzip, br") is None


# ------------------------------------------------------------------ over-cap key scan


def _scan(probes: tuple[Probe, ...], doc: bytes, step: int,
          max_run: int = 1 << 20) -> dict[str, object] | None:
    s = KeyScanner(probes, max_run)
    for i in range(0, len(doc), step):
        s.feed(doc[i:i + step])
    return dict(s.values) if s.close() else None


TOTAL = Probe("t", ("usage", "total_tokens"))


def test_key_scanner_follows_structure() -> None:
    doc = orjson.dumps({
        "text": '"usage": {"total_tokens": 999}',                # inside a string
        "choices": [{"usage": {"total_tokens": 888}}],           # another depth
        "meta": {"usage": {"total_tokens": 777}},
        "usage": {"prompt_tokens": 1, "total_tokens": 12.5},
    })
    for step in (1, 3, 7, 64, len(doc)):
        assert _scan((TOTAL,), doc, step) == {"t": Decimal("12.5")}
    assert _scan((TOTAL,), doc[:-1], 5) is None                  # truncated
    assert _scan((TOTAL,), b'{"usage": {"total_tokens": 1}} x', 4) is None
    # duplicate key: the last one wins, as with orjson.loads
    assert _scan((TOTAL,), b'{"usage":{"total_tokens":1},"usage":{"total_tokens":2}}', 3) \
        == {"t": 2}


@given(st.sampled_from(["usage.total_tokens", "usage\\u002etotal_tokens",
                        "\\u0075sage.total_tokens", "usage\\u002Etotal\\u005ftokens"]),
       st.integers(1, 40), st.booleans())
def test_key_scanner_gives_up_on_a_key_it_would_confuse_with_the_path(
        spelled: str, step: int, before: bool) -> None:
    """ijson names a path by joining keys with '.': a top-level key spelling
    ``usage.total_tokens`` (JSON escapes included) would read as the nested value, and the
    last one would win. The scan gives up instead (the rule's fallback), wherever the key
    sits and however the body is chunked; a key that only looks similar does not stop it."""
    echo = b'"' + spelled.encode() + b'": 7'
    real = b'"usage": {"total_tokens": 5000}'
    doc = b"{" + (echo + b", " + real if before else real + b", " + echo) + b"}"
    assert _scan((TOTAL,), doc, step) is None
    near = b'{"usage": {"total_tokens": 5000}, "usage.total": 7, "Usage.total_tokens": 7}'
    assert _scan((TOTAL,), near, step) == {"t": 5000}


def test_key_scanner_gives_up_on_a_token_longer_than_the_bound() -> None:
    usage = b', "usage": {"total_tokens": 5}}'
    for filler in (b"x", b'\\"', b"\\\\"):                # plain, escaped quotes, backslashes
        long_string = b'{"a": "' + filler * (5000 // len(filler)) + b'"' + usage
        assert _scan((TOTAL,), long_string, 100, max_run=4000) is None, filler
        assert _scan((TOTAL,), long_string, 100, max_run=6000) == {"t": 5}, filler
    numbers = b'{"a": [' + b"1," * 3000 + b'1]' + usage           # no quote for 6 KB
    assert _scan((TOTAL,), numbers, 64, max_run=4000) is None
    assert _scan((TOTAL,), numbers, 64, max_run=7000) == {"t": 5}


def test_last_unescaped_quote() -> None:
    from proxy.rules.jsonscan import last_unescaped_quote, trailing_backslashes
    assert last_unescaped_quote(b'ab"cd', 0) == 2
    assert last_unescaped_quote(b'a"b\\"c', 0) == 1            # the second one is escaped
    assert last_unescaped_quote(b'a"b\\\\"c', 0) == 5        # escaped backslash, then a quote
    assert last_unescaped_quote(b'"x', 1) == -1                  # escaped by the chunk before
    assert last_unescaped_quote(b'\\"x', 1) == 1               # \\ then a real quote
    assert last_unescaped_quote(b"xyz", 0) == -1
    assert trailing_backslashes(b"a\\\\", 0) == 2 and trailing_backslashes(b"\\", 3) == 4


@pytest.mark.parametrize("where", ["start", "end"])
def test_over_cap_json_is_scanned(rules: dict[str, Rule], where: str) -> None:
    usage = {"prompt_tokens": 100, "completion_tokens": 23, "total_tokens": 123}
    pad = {"choices": [{"logprobs": {"content": [{"token": "tok", "logprob": -0.25}] * 40000}}]}
    doc = {"usage": usage, **pad} if where == "start" else {**pad, "usage": usage}
    body = orjson.dumps(doc)
    assert len(body) > 1 << 20
    chunks = [body[i:i + 65536] for i in range(0, len(body), 65536)]
    assert measure(rules["chat"], chunks, "application/json") == [Quantity("t", 123 * M, False)]
    # over the cap and truncated: the reservation, reason over_cap
    assert measure(rules["chat"], chunks[:-1], "application/json") == [
        Quantity("t", 1000 * M, True, "over_cap")]


# ------------------------------------------------------------------ include_usage


def test_with_stream_usage() -> None:
    raw = b' {"model": "m", "stream": true, "messages": []}'
    out = with_stream_usage(orjson.loads(raw), raw)
    assert out == b' {"stream_options":{"include_usage":true},"model": "m", "stream": true, ' \
                  b'"messages": []}'
    assert orjson.loads(out)["stream_options"] == {"include_usage": True}
    raw = b'{"stream": true, "stream_options": {"include_usage": false, "x": 1}}'
    assert orjson.loads(with_stream_usage(orjson.loads(raw), raw) or b"") == {
        "stream": True, "stream_options": {"include_usage": True, "x": 1}}
    raw = b'{"stream": true, "stream_options": null}'
    assert orjson.loads(with_stream_usage(orjson.loads(raw), raw) or b"") == {
        "stream": True, "stream_options": {"include_usage": True}}
    for unchanged in (b'{"stream": true, "stream_options": {"include_usage": true}}',
                      b'{"stream": false}', b'{"messages": []}', b'[1]', b'{"stream": 0}',
                      b'{"stream": null}', b'{"stream": ""}', b'{"stream": -0.0}'):
        assert with_stream_usage(orjson.loads(unchanged), unchanged) is None, unchanged


@pytest.mark.parametrize("value", [b"1", b"1.0", b"-1", b"2", b'"true"', b'"1"', b'"yes"',
                                   b'"false"', b'"0"', b'" "', b"[]", b"{}", b"[0]"])
def test_with_stream_usage_for_a_loosely_read_stream(value: bytes) -> None:
    """A ``"stream"`` an upstream may take for true (pydantic's lax mode, a test of the value's
    truth in Python or JavaScript) gets ``include_usage`` like ``true``: anything but
    ``false``, ``null``, 0 and ``""``. The client's bytes are kept, the key inserted first."""
    raw = b'{"stream": ' + value + b', "stream_options": {"x": 1}}'
    assert orjson.loads(with_stream_usage(orjson.loads(raw), raw) or b"") == {
        "stream": orjson.loads(value), "stream_options": {"x": 1, "include_usage": True}}
    raw = b'{"stream": ' + value + b"}"
    assert with_stream_usage(orjson.loads(raw), raw) == \
        b'{"stream_options":{"include_usage":true},"stream": ' + value + b"}"


def test_may_stream_holds_false_only_what_no_upstream_streams_for() -> None:
    """The values JavaScript holds false, and NaN (Python's ``json`` reads it, and holds it
    true); a body Python's ``json`` reads can also hold an infinity."""
    for no in (False, None, 0, 0.0, -0.0, ""):
        assert not may_stream(no), no
    for yes in (True, 1, -1, 0.5, float("nan"), float("inf"), "false", "0", " ", [], {}, [0]):
        assert may_stream(yes), yes


def test_usage_chunk_filter_every_boundary() -> None:
    data = openai_chat_stream()
    usage_event = data[data.index(b'data: {"id":"c","choices":[]'):data.index(b"data: [DONE]")]
    want = data.replace(usage_event, b"")
    assert len(want) == len(data) - len(usage_event)
    for i in range(len(data) + 1):
        f = UsageChunkFilter(1 << 20)
        assert f.feed(data[:i]) + f.feed(data[i:]) + f.flush() == want, i
    f = UsageChunkFilter(1 << 20)
    assert b"".join(f.feed(data[i:i + 1]) for i in range(len(data))) + f.flush() == want


def test_usage_chunk_filter_keeps_everything_else() -> None:
    other = (b'data: {"choices":[],"usage":null}\n\n'           # no usage object
             b'data: {"choices":[{"delta":{}}],"usage":{"total_tokens":1}}\n\n'
             b': comment "choices":[] "usage"\n\n'
             b"data: [DONE]\n\n")
    f = UsageChunkFilter(1 << 20)
    assert f.feed(other) + f.flush() == other
    # no event boundary within the bound: filtering stops, nothing is lost
    f = UsageChunkFilter(16)
    assert f.feed(b"data: " + b"x" * 10) == b""
    assert f.feed(b"y" * 10) == b"data: " + b"x" * 10 + b"y" * 10
    assert f.feed(b'\n\ndata: {"choices":[],"usage":{}}\n\n') == \
        b'\n\ndata: {"choices":[],"usage":{}}\n\n'
