"""Request matching: path templates, glob conditions and a first-match index.

Owns: compiling a rule's ``match:`` block (:func:`compile_template`,
:func:`compile_glob`, :class:`Matcher`) and :class:`MatchIndex`, which finds the
first matching entry for a request.

Invariants:
- Everything is compiled once at load; matching does no parsing, only dict
  lookups, set membership and at most one regex per candidate rule.
- Template syntax: ``{name}`` matches one non-empty segment (captured),
  ``*`` matches within one segment, a ``**`` segment matches any number of
  segments (including zero). Everything else is literal.
- :class:`MatchIndex` preserves first-match order exactly: rules are bucketed by
  their literal first path segment, and every bucket also holds the rules whose
  first segment is not literal, merged in the original order.
- This module knows nothing of ``Rule``: the index is generic over its payload.
"""

from __future__ import annotations

import fnmatch
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from proxy.errors import MeterproxyError

__all__ = [
    "MatchIndex",
    "Matcher",
    "Template",
    "TemplateError",
    "ascii_lower",
    "compile_glob",
    "compile_template",
]

T = TypeVar("T")
# ``routing: {case: insensitive}`` folds ASCII letters only, as Express does (it matches the
# still percent-encoded path: only ASCII letters can differ in case there)
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def ascii_lower(text: str) -> str:
    """``text`` with its ASCII letters in lower case (the rest as it is)."""
    return text.translate(_ASCII_LOWER)

_PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class TemplateError(MeterproxyError, ValueError):
    """A path template that cannot be compiled; the message says why."""


@dataclass(frozen=True, slots=True)
class Template:
    """A compiled path template.

    ``literal`` is set when the template has no wildcard or parameter (then matching is
    string equality); ``first`` is the literal first segment, or None when the first
    segment can vary."""

    text: str
    regex: re.Pattern[str]
    params: tuple[str, ...]
    literal: str | None
    first: str | None
    catch_all: bool
    # the same, matched without ASCII case (``routing: {case: insensitive}``): path
    # parameters are still the request's own text
    iregex: re.Pattern[str]

    def match(self, path: str, fold: bool = False) -> dict[str, str] | None:
        """Path params if ``path`` matches (without case when ``fold``), else None."""
        if self.literal is not None and not fold:
            return {} if path == self.literal else None
        m = (self.iregex if fold else self.regex).fullmatch(path)
        if m is None:
            return None
        return {name: m.group(f"p{i}") for i, name in enumerate(self.params)}


def _segment_regex(seg: str, params: list[str]) -> str:
    """Regex for one segment: literal text, ``*`` and ``{param}`` pieces."""
    out: list[str] = []
    i = 0
    while i < len(seg):
        ch = seg[i]
        if ch == "{":
            end = seg.find("}", i + 1)
            if end < 0:
                raise TemplateError("unbalanced '{' (missing '}')")
            name = seg[i + 1:end]
            if "{" in name:
                raise TemplateError("unbalanced '{' (missing '}')")
            if not name:
                raise TemplateError("empty path parameter '{}'")
            if not _PARAM_NAME.match(name):
                raise TemplateError(f"bad path parameter name {name!r} (use letters, digits, _)")
            if name in params:
                raise TemplateError(f"duplicate path parameter {{{name}}}")
            out.append(f"(?P<p{len(params)}>[^/]+)")
            params.append(name)
            i = end + 1
        elif ch == "}":
            raise TemplateError("unbalanced '}' (no matching '{')")
        elif ch == "*":
            if seg[i:i + 2] == "**":
                raise TemplateError("'**' must be a whole path segment, like /a/**")
            out.append("[^/]*")
            i += 1
        else:
            out.append(re.escape(ch))
            i += 1
    return "".join(out)


def compile_template(text: str) -> Template:
    """Compile a path template; raises :class:`TemplateError` with a one-line reason."""
    if not text.startswith("/"):
        raise TemplateError("path must start with '/'")
    segments = text[1:].split("/")
    params: list[str] = []
    parts: list[str] = []
    for seg in segments:
        if seg == "**":
            parts.append("(?:/[^/]*)*")
        else:
            parts.append("/" + _segment_regex(seg, params))
    regex = re.compile("".join(parts), re.DOTALL)
    is_literal = not params and "*" not in text
    first_seg = segments[0]
    first = first_seg if ("{" not in first_seg and "*" not in first_seg) else None
    return Template(text=text, regex=regex, params=tuple(params),
                    literal=text if is_literal else None, first=first,
                    catch_all=text == "/**",
                    iregex=re.compile("".join(parts), re.DOTALL | re.IGNORECASE | re.ASCII))


def compile_glob(pattern: str) -> re.Pattern[str]:
    """fnmatch-style glob (``*``, ``?``, ``[seq]``), case-sensitive, whole string."""
    return re.compile(fnmatch.translate(pattern))


Cond = tuple[str, "re.Pattern[str] | None"]  # (name, glob) ; None glob = must be present


@dataclass(frozen=True, slots=True)
class Matcher:
    """A compiled ``match:`` block. Absent parts match anything."""

    methods: frozenset[str] | None = None
    template: Template | None = None
    params: tuple[tuple[str, re.Pattern[str]], ...] = ()
    headers: tuple[Cond, ...] = ()
    query: tuple[Cond, ...] = ()

    @property
    def catch_all(self) -> bool:
        """Matches every request (so any later rule is unreachable)."""
        return (self.methods is None and not self.params and not self.headers
                and not self.query and (self.template is None or self.template.catch_all))

    @property
    def first(self) -> str | None:
        return None if self.template is None else self.template.first

    def match(self, method: str, path: str, headers: Mapping[str, str],
              query: Mapping[str, str], fold: bool = False,
              slash: bool = False) -> dict[str, str] | None:
        """Path params when the request matches, else None. ``fold``: the path without
        ASCII case; ``slash``: a path ending in '/' also matches as it is without it (the
        template is tried on the path as sent first)."""
        if self.methods is not None and method not in self.methods:
            return None
        t = self.template
        if t is None:
            found: dict[str, str] | None = {}
        else:
            found = t.match(path, fold)
            if found is None and slash and len(path) > 1 and path[-1] == "/":
                found = t.match(path[:-1], fold)
        if found is None:
            return None
        for name, pat in self.params:
            if pat.match(found.get(name, "")) is None:
                return None
        if not (_conds_ok(self.headers, headers) and _conds_ok(self.query, query)):
            return None
        return found


def _conds_ok(conds: tuple[Cond, ...], values: Mapping[str, str]) -> bool:
    for name, pat in conds:
        v = values.get(name)
        if v is None or (pat is not None and pat.match(v) is None):
            return False
    return True


class MatchIndex(Generic[T]):
    """First-match lookup over ``(Matcher, payload)`` pairs, bucketed by first segment."""

    __slots__ = ("_buckets", "_default", "_fold", "_slash")

    def __init__(self, entries: Sequence[tuple[Matcher, T]], fold: bool = False,
                 slash: bool = False) -> None:
        """``fold``: paths are matched without ASCII case (the buckets keyed in lower
        case); ``slash``: a trailing slash is optional (``Matcher.match``)."""
        def key(seg: str | None) -> str | None:
            return ascii_lower(seg) if fold and seg is not None else seg
        literal_firsts = {key(m.first) for m, _ in entries if m.first is not None}
        self._buckets: dict[str | None, tuple[tuple[Matcher, T], ...]] = {
            seg: tuple(e for e in entries if key(e[0].first) in (None, seg))
            for seg in literal_firsts
        }
        self._default: tuple[tuple[Matcher, T], ...] = tuple(
            e for e in entries if e[0].first is None)
        self._fold = fold
        self._slash = slash

    def match(self, method: str, path: str, headers: Mapping[str, str],
              query: Mapping[str, str]) -> tuple[T, dict[str, str]] | None:
        """The first entry matching the request, with its path params."""
        end = path.find("/", 1)
        first = path[1:] if end < 0 else path[1:end]
        fold, slash = self._fold, self._slash
        for matcher, payload in self._buckets.get(ascii_lower(first) if fold else first,
                                                  self._default):
            params = matcher.match(method, path, headers, query, fold, slash)
            if params is not None:
                return payload, params
        return None
