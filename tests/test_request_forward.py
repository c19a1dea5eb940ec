"""proxy/request/forward.py's header builders, against the multidict operations they replace.

``forward_headers`` and ``response_headers`` build the heads as lists of pairs in one pass
(no multidict per request); what they produce must be exactly what copying into a
``CIMultiDict`` and setting the proxy's headers on it produced (the reference below, the
code they replaced): same names, same values, same order, for any headers a consumer or an
upstream sends (hostile case, duplicates, Connection-named headers, the proxy's own
headers sent by the consumer).
"""

from __future__ import annotations

from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, istr

from proxy.request.forward import HOP_BY_HOP, forward_headers, response_headers, set_header

NAMES = ["X-Forwarded-For", "x-forwarded-for", "X-FORWARDED-PROTO", "X-Forwarded-Host",
         "X-Request-Id", "x-request-id", "Connection", "Keep-Alive", "TE", "Host",
         "Authorization", "X-Api-Key", "Accept", "X-Private", "x-private", "Content-Type",
         "Content-Length", "Transfer-Encoding", "Accept-Encoding"]
VALUES = st.sampled_from(["1", "a, b", "X-Private", "x-private, te", "keep-alive", "",
                          "10.0.0.1", "close, X-Api-Key", "gzip"])
HEADERS = st.lists(st.tuples(st.sampled_from(NAMES), VALUES), max_size=12)


def reference_up(headers: list[tuple[str, str]], rid: str, drop: frozenset[str],
                 peer: str, scheme: str, host: str) -> list[tuple[str, str]]:
    """The multidict version forward_headers replaced."""
    src: CIMultiDict[str] = CIMultiDict(headers)
    out: CIMultiDict[str] = CIMultiDict()
    conn = src.get("Connection")
    skip = HOP_BY_HOP | drop if drop else HOP_BY_HOP
    if conn:
        skip = skip | {t.strip().lower() for t in conn.split(",") if t.strip()}
    for k, v in src.items():
        if k.lower() not in skip:
            out.add(k, v)
    prior = src.get("X-Forwarded-For")
    out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    out["X-Forwarded-Proto"] = scheme
    out["X-Forwarded-Host"] = host
    out[istr("X-Request-Id")] = rid
    return list(out.items())


def reference_down(headers: list[tuple[str, str]], rid: str) -> list[tuple[str, str]]:
    """The multidict version response_headers replaced."""
    skip = HOP_BY_HOP
    for k, v in headers:
        if k.lower() == "connection":
            skip = skip | {t.strip().lower() for t in v.split(",") if t.strip()}
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers:
        if k.lower() not in skip:
            out.add(k, v)
    out[istr("X-Request-Id")] = rid
    return list(out.items())


@settings(max_examples=400)
@given(HEADERS, st.sampled_from([frozenset({"host"}), frozenset({"host", "x-api-key"}),
                                 frozenset({"host", "authorization"})]))
def test_forward_headers_equal_the_multidict_copy(headers: list[tuple[str, str]],
                                                  drop: frozenset[str]) -> None:
    req = make_mocked_request("GET", "/v1/x", headers=CIMultiDict(
        [("Host", "api.example"), *headers]))
    host = req.host
    got = forward_headers(req, "rid-1", HOP_BY_HOP | drop)
    want = reference_up([("Host", "api.example"), *headers], "rid-1", drop,
                        req.remote or "", req.scheme, host)
    assert got == want


@settings(max_examples=400)
@given(HEADERS)
def test_response_headers_equal_the_multidict_copy(headers: list[tuple[str, str]]) -> None:
    assert response_headers(headers, "rid-2") == reference_down(headers, "rid-2")


@given(HEADERS, st.sampled_from(["Accept-Encoding", "Content-Length", "x-request-id"]), VALUES)
def test_set_header_is_a_multidict_setitem(headers: list[tuple[str, str]], name: str,
                                           value: str) -> None:
    md: CIMultiDict[str] = CIMultiDict(headers)
    md[name] = value
    assert set_header(headers, name, value) == list(md.items())


def test_the_consumers_own_forwarding_headers_are_replaced_in_place() -> None:
    req = make_mocked_request("GET", "/", headers=CIMultiDict([
        ("Host", "h"), ("X-Request-Id", "theirs"), ("A", "1"), ("x-forwarded-for", "9.9.9.9"),
        ("X-Request-Id", "again"), ("B", "2")]))
    assert forward_headers(req, "ours", HOP_BY_HOP | {"host"}) == [
        ("X-Request-Id", "ours"), ("A", "1"), ("X-Forwarded-For", "9.9.9.9, "), ("B", "2"),
        ("X-Forwarded-Proto", "http"), ("X-Forwarded-Host", "h")]
