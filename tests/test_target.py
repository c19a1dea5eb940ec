"""proxy.target as a pure function: the limits the end-to-end tests cannot reach (aiohttp's
C parser refuses targets over 8,190 bytes before the proxy sees them) and the invariants
that must hold for any input."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.target import MAX_PATH, InvalidTarget, canonical


def test_path_length_limit_counts_the_path_not_the_query() -> None:
    at_limit = "/" + "a" * (MAX_PATH - 1)
    assert canonical(at_limit) == (at_limit, at_limit)
    assert canonical(at_limit + "?" + "q" * 50_000) == (at_limit, at_limit + "?" + "q" * 50_000)
    assert canonical("/a/../" + "a" * (MAX_PATH - 6)) == ("/" + "a" * (MAX_PATH - 6),) * 2
    for over in ("/" + "a" * MAX_PATH, "/" + "%41" * (MAX_PATH // 3 + 1),
                 "http://h.test/" + "a" * MAX_PATH):
        with pytest.raises(InvalidTarget, match=r"^The path is longer than 8192 characters\.$"):
            canonical(over)


def test_escapes_that_decode_to_percent_are_decoded_once() -> None:
    assert canonical("/%2541%41/%25c3%c3%a9") == ("/%41A/%c3é", "/%2541A/%25c3%C3%A9")


ATOMS = st.sampled_from(["a", "Z", ".", "..", "%2e", "%2E", "%25", "%41", "%c3%a9", "%3f",
                         "%20", ";", "{", "~", "-", "", "%e2%82%ac", "@", ":"])


@given(st.lists(st.lists(ATOMS, max_size=4).map("".join), max_size=10).map(
    lambda segs: "/" + "/".join(segs)), st.sampled_from(["", "?", "?a=1", "?x=/../%2F"]))
def test_canonical_is_a_fixed_point_without_dots_or_empty_segments(path: str, q: str) -> None:
    decoded, target = canonical(path + q)
    assert canonical(target) == (decoded, target)            # idempotent
    tpath = target.partition("?")[0]
    assert "//" not in tpath and "//" not in decoded
    assert not {".", ".."} & set(tpath.split("/")) and not {".", ".."} & set(decoded.split("/"))
    assert all(c in string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@/%" for c in tpath)
    assert target.endswith(q if q != "?" else "")
