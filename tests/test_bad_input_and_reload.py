"""Bad input never crashes or loses a unit; rule hot reload keeps the old rules on error."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import orjson

from proxy import metrics
from tests.conftest import TEST_RULES, Proxy, ProxyFactory
from tests.helpers import wait_until

Q = 1_000_000


def _audit(proxy: Proxy, customer: str) -> list[tuple[str, int, str]]:
    with proxy.db() as c:
        return list(c.execute("SELECT meter, quantity, flags FROM audit WHERE customer_id=?"
                              " ORDER BY seq", (customer,)))


async def test_malformed_json_uses_on_unreadable(proxy: Proxy) -> None:
    key = await proxy.customer_with_key("m")
    h = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    bodies = [b"{not json", b'{"n": "abc"}', b'{"n": -4}', b'{"n": true}', b"[1,2]", b""]
    for body in bodies:
        async with proxy.session.post(proxy.url + "/v1/echo", data=body, headers=h) as r:
            assert r.status == 200
            assert await r.read() == body
    rows = [(m, q, f) for m, q, f in _audit(proxy, "m") if m == "units"]
    # the empty body has no JSON at all: unreadable too
    assert [q for _, q, _ in rows] == [7 * Q] * len(bodies)
    assert all("unreadable" in f for _, _, f in rows)


async def test_body_over_inspect_cap_streams_and_is_unreadable(make_proxy: ProxyFactory) -> None:
    p = await make_proxy(max_inspect_bytes=1024)
    key = await p.customer_with_key("cap")
    body = orjson.dumps({"n": 2, "pad": "y" * 5000})
    async with p.session.post(p.url + "/v1/echo", data=body,
                              headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200
        assert await r.read() == body
    assert p.ledger_totals() == {("cap", "units"): 7 * Q, ("cap", "bytes_in"): len(body) * Q}


async def test_non_numeric_and_negative_header_quantities(make_proxy: ProxyFactory,
                                                          tmp_path: Path) -> None:
    rules = TEST_RULES.replace(
        "  - name: everything-else",
        "  - name: header-units\n"
        "    match: {path: /v1/items, headers: {X-Units: true}}\n"
        "    usage:\n"
        "      - {meter: units, quantity: request.header.X-Units, on_unreadable: 1}\n"
        "  - name: everything-else")
    p = await make_proxy(rules_text=rules)
    key = await p.customer_with_key("hq")
    for v in ["abc", "-3", "NaN", "inf", "2.5", "1e400"]:
        async with p.session.get(p.url + "/v1/items",
                                 headers={"Authorization": f"Bearer {key}", "X-Units": v}) as r:
            assert r.status == 200
    qs = [q for m, q, _ in _audit(p, "hq")]
    assert qs == [Q, Q, Q, Q, 2_500_000, Q]


async def test_huge_headers_and_unknown_methods(proxy: Proxy) -> None:
    """Oversized headers and unusual methods get exact statuses; only the 2xx answers are
    billed (the catch-all rule counts 2xx), so a refused request never costs anything."""
    key = await proxy.customer_with_key("hh")
    h = {"Authorization": f"Bearer {key}"}
    async with proxy.session.get(proxy.url + "/v1/items",
                                 headers={**h, "X-Big": "z" * 4_000}) as r:
        assert r.status == 200                     # a big but ordinary header: forwarded
    for size in (100_000, 300_000):
        # 100 KB: refused by the upstream's (or the proxy's) header-line bound; 300 KB: over
        # the proxy's own bound, refused before anything is forwarded
        async with proxy.session.get(proxy.url + "/v1/items",
                                     headers={**h, "X-Big": "z" * size}) as r:
            assert r.status == 400, size
            assert "Got more than" in await r.text()
    for method, status in (("PURGE", 405), ("FOO", 400), ("PROPFIND", 405)):
        async with proxy.session.request(method, proxy.url + "/v1/items", headers=h) as r:
            assert r.status == status, method      # FOO: llhttp refuses an unknown method
    async with proxy.session.get(proxy.url + "/v1/items", headers=h) as r:
        assert r.status == 200
    assert [(m, q) for m, q, _ in _audit(proxy, "hh")] == [("api_calls", Q), ("api_calls", Q)]
    assert proxy.ledger_totals() == {("hh", "api_calls"): 2 * Q}


async def test_broken_hot_reload_keeps_old_rules(proxy: Proxy, tmp_path: Path) -> None:
    key = await proxy.customer_with_key("hr")
    h = {"Authorization": f"Bearer {key}"}
    rt = proxy.server.rt
    v1 = rt.rules.version
    before = metrics.rules_reloads_total.labels("error")._value.get()
    (tmp_path / "rules.yaml").write_text(TEST_RULES.replace("meter: api_calls, quantity: 1}\n"
                                                            "  - name: items",
                                                            "meter: nope, quantity: 1}\n"
                                                            "  - name: items", 1)
                                         + "\n  - {oops: 1}\n")
    os.utime(tmp_path / "rules.yaml", (time.time() + 5, time.time() + 5))
    await wait_until(lambda: rt.rules_error, what="the reload to be refused")
    assert rt.rules_error and "rules.yaml:" in rt.rules_error
    assert rt.rules.version == v1
    assert metrics.rules_reloads_total.labels("error")._value.get() == before + 1
    async with proxy.session.get(proxy.url + "/v1/items", headers=h) as r:
        assert r.status == 200
    # a good edit takes effect and prices later requests with the new version
    (tmp_path / "rules.yaml").write_text(TEST_RULES.replace(
        "  - name: everything-else\n    match: {path: \"/**\"}\n    usage:\n"
        "      - {meter: api_calls, quantity: 1}",
        "  - name: everything-else\n    match: {path: \"/**\"}\n    usage:\n"
        "      - {meter: api_calls, quantity: 3}"))
    os.kill(os.getpid(), 0)
    from proxy.app import reload_rules  # what SIGHUP calls
    assert await reload_rules(rt)
    assert rt.rules.version != v1 and rt.rules_error is None
    async with proxy.session.get(proxy.url + "/v1/items", headers=h) as r:
        assert r.status == 200
    with proxy.db() as c:
        rows = list(c.execute("SELECT rules_version, quantity FROM audit WHERE customer_id='hr'"
                              " ORDER BY seq"))
    assert rows == [(v1, Q), (rt.rules.version, 3 * Q)]
    assert signal.SIGHUP  # the serve loop wires SIGHUP to reload_rules (see proxy.app)


async def test_a_reload_storage_refused_is_retried_until_the_new_rules_are_stored(
        proxy: Proxy, tmp_path: Path) -> None:
    """The rules file changes while another process holds the database's write lock: the
    new version cannot be stored (a version that prices a request must be explainable), so
    the old rules keep serving, the reload counts as failing and says why, and the watcher
    (which once ended on that error, with the change dropped for good) tries the same change
    again until it is stored: then the new rules price requests and the failure clears."""
    import sqlite3

    key = await proxy.customer_with_key("rr")
    h = {"Authorization": f"Bearer {key}"}
    rt = proxy.server.rt
    v1 = rt.rules.version
    other = sqlite3.connect(tmp_path / "meter.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        (tmp_path / "rules.yaml").write_text(TEST_RULES.replace(
            "  - name: everything-else\n    match: {path: \"/**\"}\n    usage:\n"
            "      - {meter: api_calls, quantity: 1}",
            "  - name: everything-else\n    match: {path: \"/**\"}\n    usage:\n"
            "      - {meter: api_calls, quantity: 5}"))
        os.utime(tmp_path / "rules.yaml", (time.time() + 5, time.time() + 5))
        await wait_until(lambda: rt.rules_error, what="the reload to fail")
        assert "could not be stored" in (rt.rules_error or "")
        assert rt.rules.version == v1
        assert metrics.rules_reload_failing._value.get() == 1
        failed = metrics.rules_reloads_total.labels("error")._value.get()
        await wait_until(lambda: metrics.rules_reloads_total.labels("error")._value.get()
                         >= failed + 2, what="two more retries, refused")
        assert rt.rules.version == v1
    finally:
        other.execute("ROLLBACK")
        other.close()
    await wait_until(lambda: rt.rules.version != v1, what="the retried reload")
    assert rt.rules_error is None and metrics.rules_reload_failing._value.get() == 0
    async with proxy.session.get(proxy.url + "/v1/items", headers=h) as r:
        assert r.status == 200
    with proxy.db() as c:
        assert c.execute("SELECT count(*) FROM rules_versions WHERE version=?",
                         (rt.rules.version,)).fetchone() == (1,)
        rows = list(c.execute("SELECT rules_version, quantity FROM audit WHERE customer_id='rr'"))
    assert rows == [(rt.rules.version, 5 * Q)]
