"""Incremental key scanning of a JSON body too large to buffer.

Owns: :class:`KeyScanner`, which finds the values of a few key paths (``usage.total_tokens``)
in a JSON document fed chunk by chunk, keeping none of the document.

It is built on ijson's C backend (yajl2_c) push interface: the parser keeps only its
nesting state and the token being read; values are built only at the requested paths
(the ``usage`` object of an LLM response is a few numbers). It follows JSON's structure,
so a key inside a string never matches, and for a key given twice the last occurrence wins
(as ``orjson.loads`` does for the buffered path). ijson names a path by joining its keys with
".", so a key containing a dot at a shallower depth (a top-level ``"usage.total_tokens"``)
would read as the nested path: the scan gives up (no values, the rule's fallback) when the
body holds a string spelling any such joined form of a probed path (``_collisions``; JSON
escapes of its characters included), since it cannot tell the two apart.

Memory: the parser holds a token that spans chunks (a long string) whole, so the scan
gives up (no values) when more than ``max_run`` bytes pass without an unescaped ``"``:
no string, and no stretch of numbers and punctuation, may be longer than that.

Invariants: ``feed`` and ``values`` never raise; malformed or truncated JSON, or a run
over ``max_run``, yields no values (``close`` returns False). Paths with list indexes or
an event-type filter are not supported here (they read as absent).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import ijson

if TYPE_CHECKING:
    from proxy.rules.sse import Probe

__all__ = ["KeyScanner", "scannable"]


def scannable(p: Probe) -> bool:
    """True when the scanner can find this probe (plain object keys, no type filter)."""
    return p.type_filter is None and bool(p.path) and not any(
        s.isdigit() or "." in s for s in p.path)


def last_unescaped_quote(chunk: bytes, carried_backslashes: int) -> int:
    """Index of the last ``"`` in ``chunk`` not escaped by a backslash (``carried_backslashes``
    end the previous chunk), or -1."""
    end = len(chunk)
    while True:
        i = chunk.rfind(b'"', 0, end)
        if i < 0:
            return -1
        j = i
        while j > 0 and chunk[j - 1] == 0x5C:
            j -= 1
        n = i - j + (carried_backslashes if j == 0 else 0)
        if n % 2 == 0:
            return i
        end = j


def trailing_backslashes(chunk: bytes, carried: int) -> int:
    n = len(chunk) - len(chunk.rstrip(b"\\"))
    return n + carried if n == len(chunk) else n


def _char(c: str) -> bytes:
    """A regex (bytes) for one character of a JSON string: itself, or its \\u escape."""
    raw = re.escape(c.encode())
    if ord(c) > 0xFFFF:
        return raw          # (a surrogate pair's escape is not matched: keys are ASCII in practice)
    hexes = b"".join(b"[" + h.lower().encode() + h.upper().encode() + b"]"
                     for h in f"{ord(c):04x}")
    return b"(?:" + raw + rb"|\\u" + hexes + b")"


def _collisions(paths: Iterable[tuple[str, ...]]) -> tuple[re.Pattern[bytes] | None, int]:
    """A pattern matching a JSON string equal to a dotted join of two or more consecutive
    segments of a probed path (``"usage.total_tokens"`` for ``usage.total_tokens``: as a key
    at a shallower depth ijson would give it the same path), and the longest match's length
    (the bytes kept across a chunk boundary). None when no path has two segments."""
    forms = {".".join(p[i:j]) for p in paths for i in range(len(p))
             for j in range(i + 2, len(p) + 1)}
    if not forms:
        return None, 0
    alts = [b'"' + b"".join(_char(c) for c in f) + b'"' for f in sorted(forms)]
    return re.compile(b"|".join(alts)), max(2 + 6 * len(f) for f in forms)


class KeyScanner:
    __slots__ = ("_bs", "_clash", "_clash_len", "_coros", "_failed", "_found", "_keys",
                 "_max_run", "_run", "_sinks", "_tail")

    def __init__(self, probes: tuple[Probe, ...], max_run: int) -> None:
        by_prefix: dict[str, list[str]] = {}
        for p in probes:
            if scannable(p):
                by_prefix.setdefault(".".join(p.path), []).append(p.key)
        self._keys = tuple(by_prefix.values())
        self._sinks: list[Any] = [ijson.sendable_list() for _ in by_prefix]
        self._coros: list[Any] = [ijson.items_coro(sink, prefix, use_float=False)
                                  for sink, prefix in zip(self._sinks, by_prefix, strict=True)]
        self._found: dict[str, object] = {}
        self._failed = False
        self._max_run = max_run
        self._run = 0            # bytes since the last unescaped quote
        self._bs = 0             # backslashes ending the previous chunk
        self._clash, self._clash_len = _collisions(p.path for p in probes if scannable(p))
        self._tail = b""         # the end of the previous chunk (a match may span chunks)

    def feed(self, chunk: bytes) -> None:
        if self._failed or not chunk:
            return
        q = last_unescaped_quote(chunk, self._bs)
        self._run = self._run + len(chunk) if q < 0 else len(chunk) - q - 1
        self._bs = trailing_backslashes(chunk, self._bs)
        if self._run > self._max_run:
            self._fail()
            return
        clash = self._clash
        if clash is not None:
            n = self._clash_len
            if clash.search(chunk) is not None or \
                    clash.search(self._tail + chunk[:n]) is not None:
                self._fail()        # a key ijson would confuse with a probed path
                return
            self._tail = (self._tail + chunk)[-n:] if len(chunk) < n else chunk[-n:]
        try:
            for co, sink, keys in zip(self._coros, self._sinks, self._keys, strict=True):
                co.send(chunk)
                if sink:
                    for k in keys:
                        self._found[k] = sink[-1]
                    del sink[:]
        except ijson.JSONError:
            self._fail()

    def _fail(self) -> None:
        self._failed = True
        self._found.clear()
        self._coros.clear()

    def close(self) -> bool:
        """Signal the end of the document; True when it was complete, valid JSON."""
        if self._failed:
            return False
        try:
            for co, sink, keys in zip(self._coros, self._sinks, self._keys, strict=True):
                co.close()
                if sink:
                    for k in keys:
                        self._found[k] = sink[-1]
        except ijson.JSONError:
            self._fail()
            return False
        self._coros.clear()
        return True

    @property
    def values(self) -> dict[str, object]:
        return self._found
