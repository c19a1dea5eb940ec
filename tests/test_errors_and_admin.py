"""Every error the README documents (that this build answers) and the admin API."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiohttp

from tests.conftest import ADMIN_TOKEN, Proxy, ProxyFactory
from tests.helpers import wait_until
from tests.ports import held_port

Q = 1_000_000


async def _err(resp: aiohttp.ClientResponse) -> tuple[int, str, str]:
    body = await resp.json()
    assert set(body) == {"error"}
    assert resp.content_type == "application/json"
    return resp.status, body["error"]["type"], body["error"]["message"]


async def test_missing_and_invalid_key(proxy: Proxy) -> None:
    async with proxy.session.get(proxy.url + "/v1/items") as r:
        status, typ, msg = await _err(r)
        assert (status, typ) == (401, "missing_api_key") and msg
    async with proxy.session.get(proxy.url + "/v1/items",
                                 headers={"Authorization": "Bearer nope"}) as r:
        assert (await _err(r))[:2] == (401, "invalid_api_key")
    async with proxy.session.get(proxy.url + "/healthz") as r:  # auth: none
        assert r.status == 200


async def test_revoked_key_and_suspended_customer(proxy: Proxy) -> None:
    key = await proxy.customer_with_key("r")
    h = {"Authorization": f"Bearer {key}"}
    async with proxy.session.get(proxy.url + "/v1/items", headers=h) as r:
        assert r.status == 200
    keys = await proxy.admin("GET", "/admin/customers/r/keys", expect=200)
    await proxy.admin("DELETE", f"/admin/keys/{keys[0]['key_id']}", expect=200)
    async with proxy.session.get(proxy.url + "/v1/items", headers=h) as r:
        assert (await _err(r))[:2] == (403, "key_revoked")
    key2 = await proxy.customer_with_key("s")
    await proxy.admin("POST", "/admin/customers", {"id": "s", "status": "suspended"}, expect=200)
    async with proxy.session.get(proxy.url + "/v1/items",
                                 headers={"Authorization": f"Bearer {key2}"}) as r:
        assert (await _err(r))[:2] == (403, "customer_suspended")
    assert proxy.ledger_totals() == {("r", "api_calls"): Q}


async def test_upstream_refused_is_502(make_proxy: ProxyFactory) -> None:
    with held_port() as refused:               # bound, never listening: connections refused
        p = await make_proxy(upstream_url=f"http://127.0.0.1:{refused}")
        key = await p.customer_with_key("u")
        async with p.session.get(p.url + "/v1/items",
                                 headers={"Authorization": f"Bearer {key}"}) as r:
            assert (await _err(r))[:2] == (502, "upstream_unavailable")
        assert p.ledger_totals() == {}


async def test_upstream_reset_is_502(make_proxy: ProxyFactory) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.setblocking(False)
    loop = asyncio.get_running_loop()

    async def reset_all() -> None:
        while True:
            conn, _ = await loop.sock_accept(srv)
            await loop.sock_recv(conn, 65536)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            conn.close()

    task = asyncio.ensure_future(reset_all())
    try:
        p = await make_proxy(upstream_url=f"http://127.0.0.1:{srv.getsockname()[1]}")
        key = await p.customer_with_key("u")
        async with p.session.get(p.url + "/v1/items",
                                 headers={"Authorization": f"Bearer {key}"}) as r:
            assert (await _err(r))[:2] == (502, "upstream_unavailable")
    finally:
        task.cancel()
        srv.close()


async def test_upstream_timeout_is_504(make_proxy: ProxyFactory) -> None:
    p = await make_proxy(upstream={"read_timeout": "200ms"})
    key = await p.customer_with_key("t")
    async with p.session.get(p.url + "/v1/items?delay_ms=2000",
                             headers={"Authorization": f"Bearer {key}"}) as r:
        assert (await _err(r))[:2] == (504, "upstream_timeout")
    assert p.ledger_totals() == {}


async def test_storage_failure_closed_is_503_and_loses_nothing(make_proxy: ProxyFactory,
                                                                tmp_path: Path) -> None:
    p = await make_proxy(storage={"lock_wait": "50ms"})
    key = await p.customer_with_key("d")
    h = {"Authorization": f"Bearer {key}"}
    async with p.session.get(p.url + "/v1/items", headers=h) as r:
        assert r.status == 200
    # another connection holds the write lock: commits fail with "database is locked"
    store = p.server.rt.store
    import sqlite3
    blocker = sqlite3.connect(str(tmp_path / "meter.db"), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        async with p.session.get(p.url + "/v1/items", headers=h) as r:
            status, typ, _ = await _err(r)
            assert (status, typ) == (503, "metering_unavailable")
        async with p.session.get(p.url + "/v1/items", headers=h) as r:  # refused up front
            assert (await _err(r))[:2] == (503, "metering_unavailable")
        async with p.session.get(p.admin_url + "/readyz") as r:
            assert r.status == 503
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    await wait_until(lambda: store.healthy, what="the store to recover")
    async with p.session.get(p.url + "/v1/items", headers=h) as r:
        assert r.status == 200
    # the request answered 503 had its answer withheld: it is never billed, even though
    # the upstream did the work (the two 200s are)
    assert p.ledger_totals() == {("d", "api_calls"): 2 * Q}


async def test_storage_failure_open_serves(make_proxy: ProxyFactory, tmp_path: Path) -> None:
    p = await make_proxy(storage={"fail_mode": "open"})
    key = await p.customer_with_key("o")
    h = {"Authorization": f"Bearer {key}"}
    store = p.server.rt.store
    import sqlite3
    blocker = sqlite3.connect(str(tmp_path / "meter.db"), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        for _ in range(3):
            async with p.session.get(p.url + "/v1/items", headers=h) as r:
                assert r.status == 200
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    await store.drain(5)
    assert p.ledger_totals() == {("o", "api_calls"): 3 * Q}


async def test_admin_requires_token_and_is_not_on_public_port(proxy: Proxy) -> None:
    async with proxy.session.get(proxy.admin_url + "/admin/customers") as r:
        assert (await _err(r))[:2] == (401, "unauthorized")
    async with proxy.session.get(proxy.admin_url + "/admin/customers",
                                 headers={"Authorization": "Bearer wrong-token"}) as r:
        assert r.status == 401
    async with proxy.session.get(proxy.admin_url + "/metrics") as r:
        assert r.status == 401
    async with proxy.session.get(proxy.admin_url + "/healthz") as r:
        assert r.status == 200
    # the public port forwards /admin/* to the upstream like any path; it never answers it
    key = await proxy.customer_with_key("a")
    async with proxy.session.get(proxy.url + "/admin/customers",
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
        assert r.status == 401
    async with proxy.session.get(proxy.url + "/admin/customers",
                                 headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 404  # the example upstream has no such path


async def test_admin_customers_keys_usage_csv_metrics(proxy: Proxy) -> None:
    created = await proxy.admin("POST", "/admin/customers",
                                {"id": "acme", "stripe_customer_id": "cus_1", "overage": "block"},
                                expect=201)
    assert created == {"id": "acme", "stripe_customer_id": "cus_1", "status": "active",
                       "overage": "block", "billing_anchor": None, "minimum_commitment": 0,
                       "currency": None, "credit_mode": None}
    anchored = await proxy.admin("POST", "/admin/customers",
                                 {"id": "acme", "billing_anchor": "2026-01-15T00:00:00Z",
                                  "minimum_commitment": 5000}, expect=200)
    assert anchored["billing_anchor"] == "2026-01-15T00:00:00Z"
    assert anchored["minimum_commitment"] == 5000 and anchored["overage"] == "block"
    again = await proxy.admin("POST", "/admin/customers", {"id": "acme", "overage": "bill"},
                              expect=200)
    assert again["overage"] == "bill" and again["stripe_customer_id"] == "cus_1"
    # the currency it is charged in (prices' currency_options): set, kept by other updates
    eur = await proxy.admin("POST", "/admin/customers", {"id": "acme", "currency": "EUR"},
                            expect=200)
    assert eur["currency"] == "eur"
    kept = await proxy.admin("POST", "/admin/customers", {"id": "acme", "currency": None},
                             expect=200)
    assert kept["currency"] == "eur"
    wrong = await proxy.admin("POST", "/admin/customers", {"id": "acme", "currency": "euro"},
                              expect=400)
    assert "three-letter" in wrong["error"]["message"]
    bad = await proxy.admin("POST", "/admin/customers", {"id": "acme", "color": "red"},
                            expect=400)
    assert bad["error"]["type"] == "invalid_request"
    await proxy.admin("GET", "/admin/customers/nobody", expect=404)
    key = (await proxy.admin("POST", "/admin/customers/acme/keys", {"name": "ci"},
                             expect=201))["key"]
    listed = await proxy.admin("GET", "/admin/customers/acme/keys", expect=200)
    assert key not in str(listed)
    h = {"Authorization": f"Bearer {key}"}
    for _ in range(3):
        async with proxy.session.post(proxy.url + "/v1/chat/completions", headers=h,
                                      json={"prompt_tokens": 1, "completion_tokens": 2}) as r:
            assert r.status == 200
    detail = await proxy.admin("GET", "/admin/customers/acme", expect=200)
    assert detail["usage"] == {"api_calls": "3", "llm_tokens": "9"}
    usage = await proxy.admin("GET", "/admin/customers/acme/usage?from=2020-01-01", expect=200)
    assert usage["meters"] == {"api_calls": "3", "llm_tokens": "9"}
    csv = await proxy.admin("GET", "/admin/customers/acme/usage.csv?from=2020-01-01",
                            expect=200)
    lines = csv.strip().splitlines()
    assert lines[0].startswith("time,request_id,customer_id")
    assert len(lines) == 1 + 6
    total = {}
    for line in lines[1:]:
        cols = line.split(",")
        total[cols[7]] = total.get(cols[7], 0) + int(cols[8])
        assert cols[5] == proxy.server.rt.rules.version
    assert total == {"api_calls": 3, "llm_tokens": 9}
    text = await proxy.admin("GET", "/metrics", expect=200)
    for name in ("meterproxy_requests_total", "meterproxy_metered_units_total",
                 "meterproxy_pending_usage_rows", "meterproxy_upstream_seconds",
                 "meterproxy_overhead_seconds", "meterproxy_unreadable_quantities_total"):
        assert name in text
    assert 'meterproxy_requests_total{code_class="2xx",rule="chat"}' in text


async def test_cli_changes_reach_running_proxy(proxy: Proxy, tmp_path: Path) -> None:
    from proxy.cli import main

    db = str(tmp_path / "meter.db")
    assert main(["customers", "create", "cli-cust", "--db", db]) == 0
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["keys", "create", "--customer", "cli-cust", "--db", db]) == 0
    import orjson
    created = orjson.loads(out.getvalue())
    h = {"Authorization": f"Bearer {created['key']}"}
    async def status() -> int:
        async with proxy.session.get(proxy.url + "/v1/items", headers=h) as r:
            return r.status
    await wait_until(status, ok=lambda s: s == 200, interval=0.05,
                     what="the key created by the CLI to be accepted")
    assert main(["keys", "revoke", "--key-id", created["key_id"], "--db", db]) == 0
    await wait_until(status, ok=lambda s: s == 403, interval=0.05,
                     what="the key revoked by the CLI to be refused")


async def test_admin_write_while_another_process_holds_the_lock(make_proxy: ProxyFactory,
                                                                 tmp_path: Path) -> None:
    """An admin write that finds the database locked by another connection (a rolling
    restart's second process, the CLI in a transaction) waits ``storage.lock_wait`` on a
    timer, then answers 503 storage_unavailable with Retry-After, having written nothing."""
    import sqlite3
    import time

    p = await make_proxy(storage={"lock_wait": "300ms"})
    await p.admin("POST", "/admin/customers", {"id": "held"}, expect=201)
    kid = (await p.admin("POST", "/admin/customers/held/keys", {}, expect=201))["key_id"]
    blocker = sqlite3.connect(str(tmp_path / "meter.db"), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        for method, path, body in [
                ("POST", "/admin/customers", {"id": "new", "currency": "eur"}),
                ("POST", "/admin/customers", {"id": "held", "status": "suspended"}),
                ("POST", "/admin/customers/held/keys", {"name": "k2"}),
                ("DELETE", f"/admin/keys/{kid}", None)]:
            started = time.monotonic()
            async with p.session.request(method, p.admin_url + path, json=body,
                                         headers=p.admin_headers) as r:
                status, typ, msg = await _err(r)
                assert (status, typ) == (503, "storage_unavailable"), (path, msg)
                assert r.headers["Retry-After"] == "1"
                assert "locked" in msg and "retry" in msg
            assert time.monotonic() - started >= 0.3      # the store's busy wait first
        async with p.session.get(p.admin_url + "/healthz") as r:
            assert r.status == 200
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    # nothing was half-written
    custs = {c["id"]: c for c in await p.admin("GET", "/admin/customers", expect=200)}
    assert set(custs) == {"held"} and custs["held"]["status"] == "active"
    keys = await p.admin("GET", "/admin/customers/held/keys", expect=200)
    assert [(k["key_id"], k["revoked_at"]) for k in keys] == [(kid, None)]
    # the same writes succeed once the lock is gone
    await p.admin("POST", "/admin/customers", {"id": "new", "currency": "eur"}, expect=201)
    await p.admin("DELETE", f"/admin/keys/{kid}", expect=200)


async def test_admin_write_waits_for_a_lock_released_within_lock_wait(
        make_proxy: ProxyFactory, tmp_path: Path) -> None:
    """A lock released within ``storage.lock_wait`` is waited out on a timer (the loop
    keeps answering meanwhile) and the write then succeeds."""
    import sqlite3

    p = await make_proxy(storage={"lock_wait": "60s"})
    blocker = sqlite3.connect(str(tmp_path / "meter.db"), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        write = asyncio.ensure_future(
            p.admin("POST", "/admin/customers", {"id": "late"}, expect=201))
        await asyncio.sleep(0.2)
        assert not write.done()
        async with p.session.get(p.admin_url + "/healthz") as r:   # not blocked by the wait
            assert r.status == 200
        assert not write.done()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    await asyncio.wait_for(write, 30)
    assert [c["id"] for c in await p.admin("GET", "/admin/customers", expect=200)] == ["late"]


async def test_a_refused_credit_mode_writes_nothing_and_keeps_the_cache_true(
        proxy: Proxy) -> None:
    """POST /admin/customers answering 409 (credit_mode monetary cannot be priced) has
    written nothing: a status sent with it is not stored behind the key cache's back (it
    was: the upsert committed, then the 409 skipped the cache refresh, so the database said
    suspended while the proxy kept serving the customer)."""
    key = await proxy.customer_with_key("m")
    h = {"Authorization": f"Bearer {key}"}
    err = await proxy.admin("POST", "/admin/customers",
                            {"id": "m", "status": "suspended", "credit_mode": "monetary"},
                            expect=409)
    assert err["error"]["type"] == "monetary_unavailable"
    err = await proxy.admin("POST", "/admin/customers",
                            {"id": "fresh", "credit_mode": "monetary"}, expect=409)
    custs = {c["id"]: c for c in await proxy.admin("GET", "/admin/customers", expect=200)}
    assert set(custs) == {"m"} and custs["m"]["status"] == "active"
    async with proxy.session.get(proxy.url + "/v1/items", headers=h) as r:
        assert r.status == 200


async def test_a_customer_and_its_credit_mode_are_one_write(
        make_proxy: ProxyFactory, tmp_path: Path) -> None:
    """POST /admin/customers with credit_mode is one write transaction: another process
    taking the lock cannot come between the customer and its credit_mode (it could: the
    second write answered 503 "nothing was written" after the first had committed, and the
    key cache kept the old status while the database said suspended)."""
    import sqlite3

    p = await make_proxy(storage={"lock_wait": "300ms"})
    key = await p.customer_with_key("m")
    blocker = sqlite3.connect(str(tmp_path / "meter.db"), isolation_level=None)
    begins = 0

    def take_the_lock_before_a_second_write(sql: str) -> None:
        nonlocal begins
        if sql.startswith("BEGIN IMMEDIATE"):
            begins += 1
            if begins == 2 and not blocker.in_transaction:
                blocker.execute("BEGIN IMMEDIATE")    # a real foreign lock, between the two

    conn = p.server.rt.store.conn
    conn.set_trace_callback(take_the_lock_before_a_second_write)
    try:
        async with p.session.post(p.admin_url + "/admin/customers", headers=p.admin_headers,
                                  json={"id": "m", "status": "suspended",
                                        "credit_mode": "units"}) as r:
            assert r.status == 200, await r.text()
    finally:
        conn.set_trace_callback(None)
        if blocker.in_transaction:
            blocker.execute("ROLLBACK")
        blocker.close()
    assert begins == 1
    cust = {c["id"]: c for c in await p.admin("GET", "/admin/customers")}["m"]
    assert (cust["status"], cust["credit_mode"]) == ("suspended", "units")
    async with p.session.get(p.url + "/v1/items", headers={"Authorization": f"Bearer {key}"}) as r:
        assert (await _err(r))[:2] == (403, "customer_suspended")
