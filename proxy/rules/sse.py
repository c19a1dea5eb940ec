"""Response-body inspection: an incremental SSE parser and bounded JSON buffering.

Owns: :class:`SseParser` (the WHATWG event-stream line/field/dispatch rules),
:class:`Probe` (one JSON path a rule needs from a response body), the two
:class:`ResponseInspector` implementations, and :class:`BodyView` (what they
measured).

Invariants:
- Memory is bounded by ``max_inspect_bytes``: a JSON body is buffered up to the
  cap (beyond it the body is unreadable); an SSE stream keeps only the current
  event's data (an event over the cap is skipped) plus the last value seen for
  each probe, never the stream.
- Line splitting accepts ``\\n``, ``\\r\\n`` and ``\\r`` even when a ``\\r\\n`` pair
  straddles two chunks: events are identical however the bytes are chunked.
- ``feed`` and ``result`` never raise on any input; ``result`` may be called at any
  time (e.g. when the client abandons the stream) and reports what was seen so far.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import orjson

__all__ = [
    "UNREADABLE",
    "BodyView",
    "JsonInspector",
    "Probe",
    "ResponseInspector",
    "SseEvent",
    "SseInspector",
    "SseParser",
    "lookup",
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
    accepts events whose top-level ``"type"`` equals it (e.g. ``message_start``)."""

    key: str
    path: JsonPath
    type_filter: str | None = None

    @property
    def needles(self) -> tuple[bytes, ...]:
        """Every key of the path, JSON-quoted: all must occur for the probe to match."""
        return tuple(orjson.dumps(k) for k in self.path if not k.isdigit())


@dataclass(frozen=True, slots=True)
class BodyView:
    """What an inspector measured: probe key -> last value seen (absent if never seen).

    ``malformed`` is set when a JSON body was over the cap or not valid JSON."""

    values: Mapping[str, object]
    malformed: bool = False
    streamed: bool = False
    skipped_events: int = 0

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

    def at_event_boundary(self) -> bool:
        """True when no line or event is half-read: a chunk of whole events can then be
        skipped without changing what later events parse to."""
        return (self._started and not self._partial and not self._skip_lf and not self._data
                and not self._event and self._size == 0 and not self._discard_line)

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
    """Record each probe's value in ``doc`` (keeping earlier values when absent here)."""
    etype: object = doc.get("type") if isinstance(doc, dict) else None
    for p in probes:
        if p.type_filter is not None and etype != p.type_filter:
            continue
        v = lookup(doc, p.path)
        if v is not UNREADABLE:
            out[p.key] = v


class JsonInspector:
    """Buffers a (non-SSE) body up to the cap and parses it once at :meth:`result`."""

    __slots__ = ("_buf", "_cap", "_over", "_probes")

    def __init__(self, probes: tuple[Probe, ...], max_inspect_bytes: int) -> None:
        self._probes = probes
        self._cap = max_inspect_bytes
        self._buf = bytearray()
        self._over = False

    def feed(self, chunk: bytes) -> None:
        if self._over:
            return
        if len(self._buf) + len(chunk) > self._cap:
            self._over = True
            self._buf = bytearray()
            return
        self._buf += chunk

    def result(self) -> BodyView:
        if self._over:
            return BodyView({}, malformed=True)
        try:
            doc = orjson.loads(self._buf)
        except orjson.JSONDecodeError:
            return BodyView({}, malformed=True)
        values: dict[str, object] = {}
        _match_probes(doc, self._probes, values)
        return BodyView(values)


class SseInspector:
    """Parses an event stream incrementally, keeping the last value of each probe."""

    __slots__ = ("_needles", "_parser", "_probes", "_values")

    def __init__(self, probes: tuple[Probe, ...], max_inspect_bytes: int) -> None:
        self._probes = probes
        self._parser = SseParser(max_inspect_bytes)
        self._values: dict[str, object] = {}
        self._needles = tuple({p.needles for p in probes})

    def _may_match(self, data: bytes) -> bool:
        for keys in self._needles:
            for n in keys:
                if n not in data:
                    break
            else:
                return True
        return False

    def feed(self, chunk: bytes) -> None:
        # Fast path: a chunk of whole events (the usual shape of LLM streams) that cannot
        # contain any probe's keys is skipped without parsing; the parser state is unchanged
        # because every event in it is complete.
        if not self._may_match(chunk) and chunk.endswith(b"\n\n") and b"\r" not in chunk \
                and self._parser.at_event_boundary():
            return
        for ev in self._parser.feed(chunk):
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
        return BodyView(dict(self._values), streamed=True,
                        skipped_events=self._parser.oversized)


def is_event_stream(content_type: str | None) -> bool:
    """True for ``text/event-stream`` (any parameters, any case)."""
    if not content_type:
        return False
    return content_type.split(";", 1)[0].strip().lower() == "text/event-stream"


def new_inspector(probes_json: tuple[Probe, ...], probes_sse: tuple[Probe, ...],
                  content_type: str | None, max_inspect_bytes: int) -> ResponseInspector | None:
    """The inspector for a response, or None when no probe is needed."""
    if is_event_stream(content_type):
        return SseInspector(probes_sse, max_inspect_bytes) if probes_sse else None
    return JsonInspector(probes_json, max_inspect_bytes) if probes_json else None
