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
  most the path slice before ``?``; the returned ``target`` is then ``raw`` itself.
- The query string is never changed (only checked for printable ASCII and ``#``); an
  empty one (a bare ``?``) is dropped, as the HTTP client would drop it anyway.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

__all__ = ["InvalidTarget", "canonical"]


class InvalidTarget(ValueError):
    """The request target cannot be given one unambiguous meaning; the message says why
    (one sentence, safe to show the consumer)."""


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
_TO_ENCODE = "\"<>[]^`{|}"
_BAD_RAW = re.compile(rf"[^{_PCHAR}/%\"<>\[\]^`{{|}}]")
_ENCODE_RAW = re.compile(r"[\"<>\[\]^`{|}]")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_QUERY = re.compile(rf"[^{_QCHAR}]")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def canonical(raw: str) -> tuple[str, str]:
    """``(path, target)`` for a raw request target; raises :class:`InvalidTarget`."""
    if _FAST.fullmatch(raw) is not None:
        q = raw.find("?")
        if q < 0:
            return raw, raw
        path = raw[:q]
        return path, (raw if q < len(raw) - 1 else path)     # an empty query is dropped
    return _slow(raw)


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
        if _BAD_PERCENT.search(path) is not None:
            raise InvalidTarget("The path contains '%' not followed by two hex digits.")
        path = _ESCAPE.sub(_escape, path)
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
    try:
        decoded = unquote_to_bytes(canon).decode("utf-8") if "%" in canon else canon
    except UnicodeDecodeError:
        raise InvalidTarget("The path's percent-encoded bytes are not valid UTF-8.") from None
    return decoded, (canon + sep + query if query else canon)


def _escape(m: re.Match[str]) -> str:
    """One ``%XX``: unreserved characters are decoded, slashes and control characters
    refused, everything else kept encoded with upper-case hex."""
    b = int(m.group(1), 16)
    if b in _UNRESERVED:
        return chr(b)
    if b == 0x2F or b == 0x5C:
        raise InvalidTarget("The path contains an encoded slash or backslash "
                            "(%2F or %5C); send '/' or use another character.")
    if b < 0x20 or b == 0x7F:
        raise InvalidTarget("The path contains an encoded control character (%00-%1F, %7F).")
    return "%" + m.group(1).upper()


def _encode_raw(m: re.Match[str]) -> str:
    return f"%{ord(m.group()):02X}"
