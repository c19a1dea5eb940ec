"""Response-body inspection: an incremental SSE parser and bounded JSON buffering.

Owns: :class:`SseParser` (the WHATWG event-stream line/field/dispatch rules),
:class:`Probe` (one JSON path a rule needs from a response body), the two
:class:`ResponseInspector` implementations, and :class:`BodyView` (what they
measured).

Invariants:
- Memory is bounded by ``max_inspect_bytes``: a JSON body is buffered up to the
  cap (beyond it the body is unreadable); an SSE stream keeps only the current
  event's data (an event over the cap is skipped), the chunks not read yet (at
  most ``min(cap, BATCH)`` bytes plus one chunk) and the last value seen for each
  probe, never the stream.
- Line splitting accepts ``\\n``, ``\\r\\n`` and ``\\r`` even when a ``\\r\\n`` pair
  straddles two chunks: events are identical however the bytes are chunked.
- ``feed`` and ``result`` never raise on any input; ``result`` may be called at any
  time (e.g. when the client abandons the stream) and reports what was seen so far.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import orjson

from proxy.rules.jsonscan import KeyScanner

__all__ = [
    "UNREADABLE",
    "BodyView",
    "JsonInspector",
    "Probe",
    "ResponseInspector",
    "SseEvent",
    "SseInspector",
    "SseParser",
    "UsageChunkFilter",
    "lookup",
    "may_stream",
    "with_stream_usage",
]

JsonPath = tuple[str, ...]


class _Unreadable:
    """Sentinel: a value that could not be read (malformed, over the cap, absent)."""

    _inst: _Unreadable | None = None

    def __new__(cls) -> _Unreadable:
        if cls._inst is None:
            cls._inst = super().__new__(cls)
        return cls._inst

    def __repr__(self) -> str:
        return "UNREADABLE"

    def __bool__(self) -> bool:
        return False


UNREADABLE: object = _Unreadable()
_MISSING = object()


def lookup(doc: object, path: JsonPath) -> object:
    """Follow a dotted path; a digit segment indexes a list. Returns UNREADABLE if absent."""
    cur = doc
    for seg in path:
        if isinstance(cur, dict):
            cur = cur.get(seg, _MISSING)
            if cur is _MISSING:
                return UNREADABLE
        elif isinstance(cur, list) and seg.isdigit():
            idx = int(seg)
            if idx >= len(cur):
                return UNREADABLE
            cur = cur[idx]
        else:
            return UNREADABLE
    return cur


@dataclass(frozen=True, slots=True)
class Probe:
    """One value a rule needs from a response body.

    ``key`` names the value in :attr:`BodyView.values`; ``path`` is looked up in the
    JSON document (or in each SSE ``data:`` event); ``type_filter``, when set, only
    accepts events whose top-level ``"type"`` equals it (e.g. ``message_start``);
    ``skip_null``: a ``null`` there leaves the value an earlier event set (a later event
    that may or may not repeat a count, e.g. Anthropic's ``message_delta``)."""

    key: str
    path: JsonPath
    type_filter: str | None = None
    skip_null: bool = False

    @property
    def needles(self) -> tuple[bytes, ...]:
        """Every key of the path, JSON-quoted: all must occur for the probe to match."""
        return tuple(orjson.dumps(k) for k in self.path if not k.isdigit())


class BodyView(NamedTuple):
    """What an inspector measured: probe key -> last value seen (absent if never seen).

    ``malformed`` is set when the body could not be read (not valid JSON, truncated,
    undecodable); ``reason`` then says why, as counted in
    ``meterproxy_quantity_fallback_total``: ``unreadable``, ``over_cap`` (over
    ``max_inspect_bytes`` and the key scan failed) or ``compressed_too_large``.
    ``scanned`` is set when an over-cap JSON body was read by the key scanner.

    A NamedTuple, not a frozen dataclass: as immutable, and built once per metered response
    for about a fifth of the instructions (a frozen dataclass sets each field through
    ``object.__setattr__``; docs/PERFORMANCE.md, SSE metering)."""

    values: Mapping[str, object]
    malformed: bool = False
    streamed: bool = False
    skipped_events: int = 0
    reason: str = ""
    scanned: bool = False

    def get(self, key: str) -> object:
        return self.values.get(key, UNREADABLE)


class ResponseInspector(Protocol):
    """Made per request by ``Rule.new_inspector``; fed every response chunk."""

    def feed(self, chunk: bytes) -> None: ...

    def result(self) -> BodyView: ...


# ---------------------------------------------------------------- SSE parsing

_EOL = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class SseEvent:
    """A dispatched event: its ``event:`` type ("message" if none) and joined data."""

    event: str
    data: bytes


class SseParser:
    """Incremental text/event-stream parser (fields ``data`` and ``event``; ``id`` and
    ``retry`` are accepted and ignored). Events whose data exceed ``max_event_bytes``
    are dropped and counted in :attr:`oversized`."""

    __slots__ = ("_data", "_discard_line", "_event", "_max", "_partial", "_size",
                 "_skip_lf", "_started", "oversized")

    def __init__(self, max_event_bytes: int) -> None:
        self._max = max_event_bytes
        self._partial = b""
        self._skip_lf = False
        self._started = False
        self._discard_line = False
        self._data: list[bytes] = []
        self._size = 0
        self._event = b""
        self.oversized = 0

    def at_event_boundary(self, or_unstarted: bool = False) -> bool:
        """True when no line or event is half-read: whole events can then be skipped
        (:meth:`skip`) without changing what later events parse to. ``or_unstarted``: also
        true before any byte was fed (the stream's start is a boundary too)."""
        return ((self._started or or_unstarted) and not self._partial and not self._skip_lf
                and not self._data and not self._event and self._size == 0
                and not self._discard_line)

    def skip(self) -> None:
        """The caller passed over whole events (through a blank line) at an event boundary
        without feeding them: the stream has started (a BOM from here on is not the
        stream's)."""
        self._started = True

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """Consume bytes; return the events completed by them, in order."""
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[0] == 0x0A:
                chunk = chunk[1:]
                if not chunk:
                    return []
        if not self._started:
            buf = self._partial + chunk
            if len(buf) < 3 and _BOM.startswith(buf):
                self._partial = buf
                return []
            self._started = True
            chunk = buf[3:] if buf.startswith(_BOM) else buf
            self._partial = b""
        data = self._partial + chunk if self._partial else chunk
        lines = _EOL.split(data)
        tail = lines.pop()
        self._skip_lf = data.endswith(b"\r")
        events: list[SseEvent] = []
        for line in lines:
            if self._discard_line:
                self._discard_line = False
                continue
            ev = self._line(line)
            if ev is not None:
                events.append(ev)
        self._keep_partial(tail)
        return events

    def _keep_partial(self, tail: bytes) -> None:
        """Hold an unterminated line, but never more than the cap (then drop the event)."""
        if self._discard_line:
            self._partial = b""
        elif len(tail) > self._max + 16:
            self._discard_line = True
            self._partial = b""
            self._long_line(tail)
        else:
            self._partial = tail

    def _long_line(self, line: bytes) -> None:
        """A line longer than the cap is dropped; if it carried data, so is its event."""
        if line.startswith(b"data"):
            self._mark_oversized()

    def _mark_oversized(self) -> None:
        if self._size >= 0:
            self.oversized += 1
        self._size = -1
        self._data.clear()

    def _line(self, line: bytes) -> SseEvent | None:
        if not line:
            return self._dispatch()
        if len(line) > self._max + 16:
            self._long_line(line)
            return None
        if line[0] == 0x3A:  # ":" comment
            return None
        name, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._add_data(value)
        elif name == b"event":
            self._event = value
        return None

    def _add_data(self, value: bytes) -> None:
        if self._size < 0:
            return
        self._size += len(value) + 1
        if self._size > self._max + 1:
            self._mark_oversized()
            return
        self._data.append(value)

    def _dispatch(self) -> SseEvent | None:
        size, parts, etype = self._size, self._data, self._event
        self._data = []
        self._size = 0
        self._event = b""
        if size <= 0:
            return None
        name = etype.decode("utf-8", "replace") if etype else "message"
        return SseEvent(name, b"\n".join(parts))


# ---------------------------------------------------------------- inspectors


def _match_probes(doc: object, probes: tuple[Probe, ...], out: dict[str, object]) -> None:
    """Record each probe's value in ``doc`` (keeping earlier values when absent here, or
    null for a ``skip_null`` probe)."""
    etype: object = doc.get("type") if isinstance(doc, dict) else None
    for p in probes:
        if p.type_filter is not None and etype != p.type_filter:
            continue
        v = lookup(doc, p.path)
        if v is not UNREADABLE and (v is not None or not p.skip_null):
            out[p.key] = v


class JsonInspector:
    """Buffers a (non-SSE) body up to the cap and parses it once at :meth:`result`. A body
    over the cap is not given up: from then on it goes through a :class:`KeyScanner`, which
    finds the probes' values without keeping the body (the buffer is dropped)."""

    __slots__ = ("_buf", "_cap", "_probes", "_result", "_scanner")

    def __init__(self, probes: tuple[Probe, ...], max_inspect_bytes: int) -> None:
        self._probes = probes
        self._cap = max_inspect_bytes
        self._buf = bytearray()
        self._scanner: KeyScanner | None = None
        self._result: BodyView | None = None

    def feed(self, chunk: bytes) -> None:
        if self._scanner is not None:
            self._scanner.feed(chunk)
            return
        if len(self._buf) + len(chunk) > self._cap:
            self._scanner = KeyScanner(self._probes, self._cap)
            self._scanner.feed(bytes(self._buf))
            self._buf = bytearray()
            self._scanner.feed(chunk)
            return
        self._buf += chunk

    def result(self) -> BodyView:
        """What the body says so far (a partial body is malformed). Once the key scanner
        took over, the first call ends the scan: it is made when the body ended."""
        scanner = self._scanner
        if scanner is not None:
            if self._result is None:
                self._result = BodyView(dict(scanner.values), scanned=True, reason="over_cap") \
                    if scanner.close() else BodyView({}, malformed=True, reason="over_cap")
            return self._result
        try:
            doc = orjson.loads(self._buf)
        except orjson.JSONDecodeError:
            return BodyView({}, malformed=True, reason="unreadable")
        values: dict[str, object] = {}
        _match_probes(doc, self._probes, values)
        return BodyView(values)


class SseInspector:
    """Parses an event stream, keeping the last value of each probe.

    Fed chunks are held (at most ``min(max_inspect_bytes, BATCH)`` bytes plus the last
    chunk) and read in one pass when that is exceeded or when :meth:`result` is called, so
    a chunk costs an append, not a scan. A pass that starts at an event boundary passes
    over, unparsed, the whole events before the next occurrence of a probe's key (an event
    without that key cannot hold the probe's value): only the events that may hold a value
    are parsed. Events end at ``\\n\\n``, which always closes a blank line (an LF after an
    LF is a line of its own, whatever the line endings around it); events ended by CRLF or
    CR blank lines are not told apart, just parsed. Events passed over that together
    exceed the cap are parsed all the same, so an oversized one is counted. A half-read
    event or a probe without a key (a path of list indexes) sends the pass through the
    parser whole. The view is the parser's alone, however the stream is chunked
    (tests/test_sse.py)."""

    __slots__ = ("_cap", "_held", "_keys", "_limit", "_needles", "_nkeys", "_parser",
                 "_pending", "_probes", "_skipped", "_values")

    def __init__(self, probes: tuple[Probe, ...], max_inspect_bytes: int) -> None:
        self._probes = probes
        # made only when some bytes must be parsed (:meth:`_parse`): a stream whose key
        # event is read by the one-line shortcut never needs one; until then ``_skipped``
        # says whether events were passed over (the stream has started)
        self._parser: SseParser | None = None
        self._skipped = False
        self._values: dict[str, object] = {}
        self._needles, self._keys, self._nkeys = _plan(probes)
        self._pending: list[bytes] = []
        self._held = 0
        self._cap = max_inspect_bytes
        self._limit = min(max_inspect_bytes, BATCH)

    def _may_match(self, data: bytes) -> bool:
        # (bytes.find, not `in`: on Python 3.11 `bytes in bytes` first tries the operand as
        # an integer and formats a TypeError it then discards, ~2,000 instructions a test)
        for keys in self._needles:
            for n in keys:
                if data.find(n) < 0:
                    break
            else:
                return True
        return False

    def feed(self, chunk: bytes) -> None:
        self._pending.append(chunk)
        self._held += len(chunk)
        if self._held > self._limit:
            self._read(False)

    def _read(self, final: bool) -> None:
        """Read the held chunks; unless ``final``, the bytes after the last ``\\n\\n`` read
        at a boundary stay held (so the next pass can start at a boundary too)."""
        pending = self._pending
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        self._pending = []
        self._held = 0
        parser = self._parser
        keys = self._keys
        if keys is None or (parser is not None and not parser.at_event_boundary(True)):
            self._parse(data)
            return
        end = len(data)
        pos = self._from_last(data) if len(keys) == 1 else 0
        # each key's next occurrence at or after pos (-1: none left), searched again only
        # once passed: the pass stays linear however many events hold a key
        found = [data.find(k, pos) for k in keys]
        while pos < end:
            hit = -1
            for j, i in enumerate(found):
                if 0 <= i < pos:
                    i = found[j] = data.find(keys[j], pos)
                if i >= 0 and (hit < 0 or i < hit):
                    hit = i
            if hit < 0:
                # no probe's key in the rest: its whole events are passed over
                cut = data.rfind(b"\n\n", pos)
                if cut >= 0:
                    self._pass(data, pos, cut + 2)
                    pos = cut + 2
                break
            start = data.rfind(b"\n\n", pos, hit)
            if start >= 0:           # whole events before the key: passed over
                self._pass(data, pos, start + 2)
                pos = start + 2
            stop = data.find(b"\n\n", hit)
            if stop < 0:
                break
            # the event holding the key, through the next blank line
            self._segment(data[pos:stop + 2])
            pos = stop + 2
        if pos < end:
            rest = data[pos:] if pos else data
            if final or len(rest) > self._limit:
                self._parse(rest)
            else:
                self._pending.append(rest)
                self._held = len(rest)

    def _from_last(self, data: bytes) -> int:
        """The usual stream's shortcut (one probe key, the value in the last event holding
        it), from a boundary: where the pass goes on after that event, or 0 when it does not
        apply. It applies when the last occurrence of the key is in a one-line ``data:``
        event (:meth:`_segment`'s shortcut) that sets every probe's value, and the whole
        events before it fit in the cap together: their values would all be replaced by
        that event's (the last value seen wins), and none of them is over the cap, so they
        are passed over unread (:meth:`_pass`) and the key is searched for from the end
        instead of through the whole stream. Anything else reads the events in order."""
        last = data.rfind(self._keys[0])  # type: ignore[index]
        if last < 0:
            return 0
        start = data.rfind(b"\n\n", 0, last) + 2
        if start == 1:
            start = 0
        stop = data.find(b"\n\n", last)
        if start > self._cap or stop < 0 or not data.startswith(b"data:", start) \
                or data.find(b"\n", start, stop) >= 0 or data.find(b"\r", start, stop) >= 0:
            return 0
        value = data[start + 6:stop] if data[start + 5:start + 6] == b" " \
            else data[start + 5:stop]
        if len(value) > self._cap or not self._may_match(value):
            return 0
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError:
            return 0
        values: dict[str, object] = {}
        _match_probes(doc, self._probes, values)
        if len(values) < self._nkeys:
            return 0
        if self._parser is None:
            self._skipped = True
        else:
            self._parser.skip()
        self._values.update(values)
        return stop + 2

    def _pass(self, data: bytes, start: int, stop: int) -> None:
        """``data[start:stop]``: whole events at a boundary, none holding a probe's key.
        Skipped unparsed when they fit in the cap together (then none is over it); else
        parsed, so the parser counts an oversized one as it would have (the count does not
        depend on how the stream was read)."""
        if stop - start <= self._cap:
            if self._parser is None:
                self._skipped = True
            else:
                self._parser.skip()
        else:
            self._parse(data[start:stop])

    def _segment(self, seg: bytes) -> None:
        """Events at a boundary, through a blank line. The usual one, a single ``data:``
        line within the cap (``data: {...}\\n\\n``), is read as the parser reads it without
        it: its value (one leading space dropped) is the event's data, and the parser is
        at a boundary after it as before; anything else goes through the parser."""
        if seg.startswith(b"data:") and seg.find(b"\n") == len(seg) - 2 \
                and seg.find(b"\r") < 0:
            value = seg[6:-2] if seg[5:6] == b" " else seg[5:-2]
            if len(value) <= self._cap:
                if self._parser is None:
                    self._skipped = True
                else:
                    self._parser.skip()
                self._event(value)
                return
        self._parse(seg)

    def _parse(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            parser = self._parser = SseParser(self._cap)
            if self._skipped:
                parser.skip()
        for ev in parser.feed(data):
            self._event(ev.data)

    def _event(self, data: bytes) -> None:
        if data == b"[DONE]" or not self._may_match(data):
            return
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        _match_probes(doc, self._probes, self._values)

    def result(self) -> BodyView:
        """What the stream said so far (the held bytes are read first)."""
        if self._pending:
            self._read(True)
        parser = self._parser
        # (positional: a NamedTuple's keyword call costs ~1.7x; values, malformed, streamed,
        # skipped_events)
        return BodyView(dict(self._values), False, True,
                        0 if parser is None else parser.oversized)


_Plan = tuple[tuple[tuple[bytes, ...], ...], tuple[bytes, ...] | None, int]
_NEEDLES: dict[int, tuple[tuple[Probe, ...], _Plan]] = {}


def _needles(probes: tuple[Probe, ...]) -> tuple[tuple[tuple[bytes, ...], ...],
                                                 tuple[bytes, ...] | None]:
    """Each probe's JSON-quoted keys (all must occur in an event it can match), and the one
    key per probe searched for when skipping events: the last of its path (the most
    specific); None when a probe has no key (a path of list indexes matches any event).
    Made once per probe tuple (a rule's)."""
    needles, keys, _ = _plan(probes)
    return needles, keys


def _plan(probes: tuple[Probe, ...]) -> _Plan:
    """:func:`_needles`, and how many distinct value keys the probes set; once per tuple."""
    hit = _NEEDLES.get(id(probes))
    if hit is not None and hit[0] is probes:
        return hit[1]
    needles = tuple({p.needles for p in probes})
    # each skip key once (several probes may end in one key: anthropic_messages reads
    # input_tokens from message_start and message_delta): one find per key and read
    keys = tuple(dict.fromkeys(k[-1] for k in needles)) if all(needles) else None
    if len(_NEEDLES) > 10_000:        # rules reloaded many times: drop stale entries
        _NEEDLES.clear()
    plan = _NEEDLES[id(probes)] = (probes, (needles, keys, len({p.key for p in probes})))
    return plan[1]


BATCH = 64 * 1024
"""Most bytes an :class:`SseInspector` holds before reading them (or the cap if lower)."""


_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")


class UsageChunkFilter:
    """Removes, from an OpenAI chat completion stream, the usage-only chunk (``"choices": []``
    with a ``usage`` object) that the proxy asked for on behalf of a client that did not:
    the client then receives the stream it asked for. Every other byte passes unchanged and
    in order; only whole events are held back (at most ``max_pending`` bytes, beyond which
    filtering stops and everything passes)."""

    __slots__ = ("_max", "_off", "_pending")

    def __init__(self, max_pending: int) -> None:
        self._pending = b""
        self._max = max_pending
        self._off = False

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to send now for ``chunk``."""
        if self._off:
            return chunk
        data = self._pending + chunk if self._pending else chunk
        if not self._pending and data.endswith(b"\n\n") and data.find(b'"choices":[]') < 0 \
                and data.find(b'"choices": []') < 0:
            return data                      # whole events, none of them the usage chunk
        end = 0
        for m in _BOUNDARY.finditer(data):
            end = m.end()
        if end == 0:
            if len(data) > self._max:        # no event boundary in sight: stop filtering
                self._off = True
                self._pending = b""
                return data
            self._pending = data
            return b""
        self._pending = data[end:]
        return self._drop_usage_events(data[:end])

    def flush(self) -> bytes:
        """What is still held (an unterminated last event) at the end of the stream."""
        rest, self._pending = self._pending, b""
        return rest

    @staticmethod
    def _drop_usage_events(events: bytes) -> bytes:
        if events.find(b'"choices":[]') < 0 and events.find(b'"choices": []') < 0:
            return events
        out: list[bytes] = []
        start = 0
        for m in _BOUNDARY.finditer(events):
            ev = events[start:m.end()]
            start = m.end()
            if not _is_usage_chunk(ev):
                out.append(ev)
        return b"".join(out)


def _is_usage_chunk(event: bytes) -> bool:
    if event.find(b'"usage"') < 0:
        return False
    data = b"\n".join(line[5:].removeprefix(b" ") for line in _EOL.split(event)
                      if line.startswith(b"data:"))
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return isinstance(doc, dict) and doc.get("choices") == [] \
        and isinstance(doc.get("usage"), dict)


_INCLUDE_USAGE = b'"stream_options":{"include_usage":true},'


def may_stream(value: object) -> bool:
    """Whether an upstream may take a request's ``"stream"`` value as asking for a stream:
    anything but absent, ``false``, ``null``, a number equal to 0 and ``""`` (the values
    JavaScript holds false). Upstreams read the field loosely: pydantic's lax mode (vLLM,
    SGLang) streams for 1, 1.0, "true", "yes", "on"...; a handler testing the value's truth
    (``if body.get("stream")``, ``if (body.stream)``) for any non-empty string, "false" and
    "0" included. None of them streams for the values left out, and vLLM refuses
    ``stream_options`` (400) when the raw ``stream`` is falsy, so those are left as sent.
    ``[]`` and ``{}`` count as a stream (JavaScript's truth), though Python holds them
    false: pydantic refuses both anyway."""
    if isinstance(value, (bool, int, float)):
        return bool(value)            # (NaN, which Python's json reads, is true)
    return value is not None and value != ""


def with_stream_usage(doc: object, raw: bytes) -> bytes | None:
    """For an ``openai_chat`` request: the body with ``stream_options.include_usage`` set to
    true when ``doc`` (the parsed ``raw``) may ask for a stream (:func:`may_stream`) without
    it; None when nothing needs to change. An absent ``stream_options`` is inserted as the
    first key, leaving every byte the client sent as it was; one that is present is
    rewritten (re-encoded)."""
    if not isinstance(doc, dict) or not may_stream(doc.get("stream")):
        return None
    so = doc.get("stream_options", _MISSING)
    if isinstance(so, dict) and so.get("include_usage") is True:
        return None
    if so is _MISSING:
        i = raw.find(b"{")           # only whitespace precedes the object's opening brace
        return raw[:i + 1] + _INCLUDE_USAGE + raw[i + 1:]
    new = dict(doc)
    new["stream_options"] = {**so, "include_usage": True} if isinstance(so, dict) \
        else {"include_usage": True}
    try:
        return orjson.dumps(new)
    except orjson.JSONEncodeError:
        return None


def is_event_stream(content_type: str | None) -> bool:
    """True for ``text/event-stream`` (any parameters, any case). The answer for each
    Content-Type value seen is kept (at most ``_SEEN_TYPES`` of them): an upstream sends a
    handful of values, each asked for once per response."""
    if not content_type:
        return False
    hit = _EVENT_STREAM.get(content_type)
    if hit is None:
        hit = _is_event_stream(content_type)
        if len(_EVENT_STREAM) >= _SEEN_TYPES:
            _EVENT_STREAM.clear()
        _EVENT_STREAM[content_type] = hit
    return hit


def _is_event_stream(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "text/event-stream"


_EVENT_STREAM: dict[str, bool] = {}
_SEEN_TYPES = 256


DECODE_LIMIT_FACTOR = 16
"""A compressed body is decoded for inspection up to this many times ``max_inspect_bytes``."""


def new_inspector(probes_json: tuple[Probe, ...], probes_sse: tuple[Probe, ...],
                  content_type: str | None, max_inspect_bytes: int,
                  content_encoding: str | None = None) -> ResponseInspector | None:
    """The inspector for a response, or None when no probe is needed. A compressed body
    (any ``Content-Encoding`` but identity) is decoded for inspection, bounded."""
    inner: ResponseInspector | None
    if is_event_stream(content_type):
        inner = SseInspector(probes_sse, max_inspect_bytes) if probes_sse else None
    else:
        inner = JsonInspector(probes_json, max_inspect_bytes) if probes_json else None
    if inner is None or not content_encoding or content_encoding.strip().lower() == "identity":
        return inner
    return DecodingInspector(inner, content_encoding, DECODE_LIMIT_FACTOR * max_inspect_bytes)


from proxy.rules.decode import DecodingInspector  # noqa: E402  (decode builds on this module)
