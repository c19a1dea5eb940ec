"""The one canonical request target (pure; no I/O).

Owns: turning the raw request target (``request.raw_path``, exactly the bytes of the
request line) into the form the rules match and the form the upstream receives.

    canonical(raw) -> (path, target)
        path    the decoded path the rules match, the reserved prefix is checked against
                and the audit row records ("/v1/é;x")
        target  the canonical encoded path plus the original query, forwarded byte for
                byte ("/v1/%C3%A9;x?a=1")
    or raises InvalidTarget (answered 400 ``invalid_path``)

Invariants (docs/paths.md is the user-facing table):
- ``path`` is exactly what a percent-decoding upstream routes on for ``target``: there is
  no dot segment, no empty segment, no escaped or raw slash/backslash, no control
  character, and it is valid UTF-8. So whatever shape a consumer sends, the rule that
  matched is the rule for the resource the upstream serves.
- Already-canonical targets (almost every request) take one regex scan and allocate at
  most the path slice before ``?``; the returned ``target`` is then ``raw`` itself. A
  target seen recently is one dict lookup (a bounded memo).
- The query string is never changed (only checked for printable ASCII and ``#``); an
  empty one (a bare ``?``) is dropped, as the HTTP client would drop it anyway.
"""

from __future__ import annotations

import re

from proxy.errors import HttpError

__all__ = ["MAX_PATH", "InvalidTarget", "canonical"]

# Longest path accepted (the query is not counted). It bounds the normalization work a
# hostile target can cause to about a millisecond; nginx's default request line is 8 KiB.
MAX_PATH = 8192


class InvalidTarget(HttpError, ValueError):
    """The request target cannot be given one unambiguous meaning; the message says why
    (one sentence, safe to show the consumer). Answered 400 ``invalid_path``."""

    status = 400
    type = "invalid_path"


# RFC 3986 pchar without '%': unreserved / sub-delims / ':' / '@'
_PCHAR = r"A-Za-z0-9\-._~!$&'()*+,;=:@"
# A query character: printable ASCII except '#' (the query is forwarded verbatim).
_QCHAR = r"!-\"$-~"

# Already canonical: '/' or non-empty segments of plain pchars that are not '.' or '..',
# an optional trailing '/', an optional query.
_FAST = re.compile(
    rf"(?:(?:/(?!\.\.?(?:[/?]|\Z))[{_PCHAR}]+)+/?|/)(?:\?[{_QCHAR}]*)?")

_ABSOLUTE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*")
# Characters allowed raw in a path before normalization: pchar, '/', '%', and the
# printable ASCII characters RFC 3986 does not allow raw, which are percent-encoded.
_BAD_RAW = re.compile(rf"[^{_PCHAR}/%\"<>\[\]^`{{|}}]")
_ENCODE_RAW = re.compile(r"[\"<>\[\]^`{|}]")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_CANON_ESCAPE_B = re.compile(rb"%[0-9A-F]{2}")
_REFUSED_ESCAPE = re.compile(r"%(?:[01][0-9A-Fa-f]|2[Ff]|5[Cc]|7[Ff])")
_BAD_QUERY = re.compile(rf"[^{_QCHAR}]")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEXDIGITS = "0123456789abcdefABCDEF"
# "%xy" as sent -> its canonical text: unreserved characters decoded, others upper-cased
# (refused escapes never get here: _REFUSED_ESCAPE is checked first)
_CANON_ESCAPE = {
    "%" + a + b: chr(int(a + b, 16)) if int(a + b, 16) in _UNRESERVED else "%" + (a + b).upper()
    for a in _HEXDIGITS for b in _HEXDIGITS}
# "%XY" in a canonical path -> the byte it stands for
_ESCAPE_BYTE = {k.encode(): bytes([int(k[1:], 16)]) for k in _CANON_ESCAPE
                if k == k.upper()}


# Memo of recent results: API traffic repeats a few targets, and a dict hit costs a tenth
# of a regex match. Bounded in entries and key length (a hostile stream of unique
# targets costs at most ~3 MB, then the memo starts over); refusals are not memoised.
_MEMO: dict[str, tuple[str, str]] = {}
_MEMO_ENTRIES = 4096
_MEMO_KEY_LEN = 256


def canonical(raw: str) -> tuple[str, str]:
    """``(path, target)`` for a raw request target; raises :class:`InvalidTarget`."""
    hit = _MEMO.get(raw)
    if hit is not None:
        return hit
    if len(raw) <= MAX_PATH and _FAST.fullmatch(raw) is not None:
        q = raw.find("?")
        if q < 0:
            result = raw, raw
        else:
            path = raw[:q]
            result = path, (raw if q < len(raw) - 1 else path)   # an empty query is dropped
    else:
        result = _slow(raw)
    if len(raw) <= _MEMO_KEY_LEN:
        if len(_MEMO) >= _MEMO_ENTRIES:
            _MEMO.clear()
        _MEMO[raw] = result
    return result


def _slow(raw: str) -> tuple[str, str]:
    if "#" in raw:
        raise InvalidTarget("The request target contains a fragment ('#').")
    if not raw.startswith("/"):
        m = _ABSOLUTE.match(raw)
        if m is None:
            raise InvalidTarget("The request target must be a path starting with '/' "
                                "(or an absolute http(s) URL).")
        raw = raw[m.end():]
        if not raw.startswith("/"):
            raw = "/" + raw
    path, sep, query = raw.partition("?")
    if len(path) > MAX_PATH:
        raise InvalidTarget(f"The path is longer than {MAX_PATH} characters.")
    if query and _BAD_QUERY.search(query) is not None:
        raise InvalidTarget("The query string contains a character that is not printable "
                            "ASCII.")
    bad = _BAD_RAW.search(path)
    if bad is not None:
        ch = bad.group()
        if ch == "\\":
            raise InvalidTarget("The path contains a backslash.")
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise InvalidTarget("The path contains a control character.")
        raise InvalidTarget("The path contains a character that is not ASCII; "
                            "percent-encode it as UTF-8.")
    if "%" in path:
        path = _normalize_escapes(path)
    if _ENCODE_RAW.search(path) is not None:
        path = _ENCODE_RAW.sub(_encode_raw, path)
    out: list[str] = []
    segments = path.split("/")
    for seg in segments:
        if seg == "" or seg == ".":          # repeated slashes merge; '.' goes away
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        out.append(seg)
    trailing = bool(out) and segments[-1] in ("", ".", "..")
    canon = "/" + "/".join(out) + ("/" if trailing else "")
    decoded = _decode(canon) if "%" in canon else canon
    return decoded, (canon + sep + query if query else canon)


def _normalize_escapes(path: str) -> str:
    """Validate every ``%``; decode unreserved escapes, upper-case the others. The work is
    one C-level ``str.replace`` per distinct escape, never a Python step per escape (a
    hostile path of MAX_PATH characters of escapes costs about a millisecond)."""
    if _BAD_PERCENT.search(path) is not None:
        raise InvalidTarget("The path contains '%' not followed by two hex digits.")
    refused = _REFUSED_ESCAPE.search(path)
    if refused is not None:
        code = int(refused.group()[1:], 16)
        if code in (0x2F, 0x5C):
            raise InvalidTarget("The path contains an encoded slash or backslash "
                                "(%2F or %5C); send '/' or use another character.")
        raise InvalidTarget("The path contains an encoded control character "
                            "(%00-%1F, %7F).")
    # every '%' now starts exactly one escape, and no replacement produces a '%', so the
    # replacements cannot create or overlap escapes
    for esc in set(_ESCAPE.findall(path)):
        canon = _CANON_ESCAPE[esc]
        if canon != esc:
            path = path.replace(esc, canon)
    return path


def _decode(canon: str) -> str:
    """Percent-decode a canonical path once (strict UTF-8), one ``bytes.replace`` per
    distinct escape. ``%25`` goes last: it is the only escape whose byte is '%'."""
    raw = canon.encode("ascii")
    escapes = set(_CANON_ESCAPE_B.findall(raw))
    for esc in escapes:
        if esc != b"%25":
            raw = raw.replace(esc, _ESCAPE_BYTE[esc])
    if b"%25" in escapes:
        raw = raw.replace(b"%25", b"%")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidTarget("The path's percent-encoded bytes are not valid UTF-8.") from None


def _encode_raw(m: re.Match[str]) -> str:
    return f"%{ord(m.group()):02X}"
