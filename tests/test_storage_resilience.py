"""The store cannot freeze the proxy or vanish silently (docs/resources.md, "Storage"):
a write lock held by another process delays only metered writes, the WAL stays bounded
under sustained load, a deleted / replaced / corrupt database file fails readiness, and a
request answered 503 metering_unavailable is never billed."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp

from proxy import metrics
from tests.conftest import SOAK, Proxy, ProxyFactory
from tests.helpers import wait_until

CREDIT_RULES = """\
version: 1
meters:
  api_calls: {stripe_event_name: api_calls}
rules:
  - name: health
    match: {path: /healthz}
    auth: none
  - name: fixed
    match: {path: /v1/items}
    usage:
      - {meter: api_calls, quantity: 1, credits: 1}
"""

_HOLDER = """
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
c.execute("COMMIT")
print("released", flush=True)
"""


@contextmanager
def foreign_write_lock(db: Path) -> Iterator[Callable[[], None]]:
    """Another process holds ``BEGIN IMMEDIATE`` on ``db`` until the block exits or the
    yielded ``release()`` is called (which returns once the lock is gone)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(db)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    stdin, stdout = proc.stdin, proc.stdout
    assert stdin is not None and stdout is not None
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            stdin.write("\n")
            stdin.flush()
            assert stdout.readline().strip() == "released"
            proc.wait(10)

    try:
        assert stdout.readline().strip() == "locked"
        yield release
    finally:
        try:
            release()
        finally:
            stdin.close()
            stdout.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


async def _get(p: Proxy, path: str, key: str | None = None,
               rid: str | None = None) -> tuple[int, dict[str, object] | str, float]:
    headers = {}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    if rid is not None:
        headers["X-Request-Id"] = rid
    t0 = time.perf_counter()
    async with p.session.get(p.url + path, headers=headers) as r:
        body = await r.json() if r.content_type == "application/json" else await r.text()
        return r.status, body, time.perf_counter() - t0


async def _probe_latencies(url: str, session: aiohttp.ClientSession, n: int,
                           gap: float) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        async with session.get(url) as r:
            assert r.status == 200
            await r.read()
        out.append(time.perf_counter() - t0)
        await asyncio.sleep(gap)
    return out


def _audited(p: Proxy) -> set[str]:
    with p.db() as c:
        return {r for (r,) in c.execute("SELECT request_id FROM audit")}


async def test_foreign_lock_delays_only_metered_writes_closed(make_proxy: ProxyFactory,
                                                              tmp_path: Path) -> None:
    p = await make_proxy(rules_text=CREDIT_RULES,
                         storage={"lock_wait": "1s", "fail_mode": "closed"})
    key = await p.customer_with_key("c1")
    await p.admin("POST", "/admin/customers/c1/grants",
                  {"credits": "10", "idempotency_key": "c1-g"}, expect=201)
    status, _, _ = await _get(p, "/v1/items", key, rid="before")
    assert status == 200
    db = tmp_path / "meter.db"

    with foreign_write_lock(db):
        # a metered request waits for the lock (lock_wait 1s) while health and unmetered
        # routes keep answering fast: nothing on the loop waits for SQLite
        metered = asyncio.ensure_future(_get(p, "/v1/items", key, rid="withheld"))
        admin_lat, public_lat = await asyncio.gather(
            _probe_latencies(p.admin_url + "/healthz", p.session, 60, 0.02),
            _probe_latencies(p.url + "/healthz", p.session, 60, 0.02))
        status, body, took = await metered
        assert status == 503 and body["error"]["type"] == "metering_unavailable"  # type: ignore[index]
        assert took >= 1.0
        # while storage is down, metered requests are refused up front
        status, body, took = await _get(p, "/v1/items", key, rid="refused")
        assert status == 503 and took < 0.5
        credits = await p.admin("GET", "/admin/customers/c1/grants", expect=200)
        assert credits["balance"] == "9"     # the withheld request's debit was refunded
    for lat in (admin_lat, public_lat):
        lat.sort()
        assert lat[int(len(lat) * 0.99) - 1] < 0.1, lat[-5:]

    # after the release the store recovers by itself; a request that waited less than
    # lock_wait is served and billed
    async def ok() -> bool:
        return (await _get(p, "/v1/items", key))[0] == 200
    await wait_until(ok)
    with foreign_write_lock(db) as release:
        waiting = asyncio.ensure_future(_get(p, "/v1/items", key, rid="waited"))
        await asyncio.sleep(0.4)
        assert not waiting.done()
        release()
        status, _, took = await waiting
        assert status == 200 and 0.4 <= took < 1.0
    audited = _audited(p)
    assert {"before", "waited"} <= audited
    assert "withheld" not in audited and "refused" not in audited
    with p.db() as c:
        (n,) = c.execute("SELECT COUNT(*) FROM audit").fetchone()
        (debited,) = c.execute("SELECT SUM(amount) FROM credit_entries WHERE kind='debit'"
                               ).fetchone()
    assert n == 3 and debited == 3_000_000       # before, the recovery probe, waited
    credits = await p.admin("GET", "/admin/customers/c1/grants", expect=200)
    assert credits["balance"] == "7"


async def test_foreign_lock_fail_open_serves_and_bills_after_release(
        make_proxy: ProxyFactory, tmp_path: Path) -> None:
    p = await make_proxy(storage={"lock_wait": "300ms", "fail_mode": "open"})
    key = await p.customer_with_key("c2")
    with foreign_write_lock(tmp_path / "meter.db"):
        status, _, took = await _get(p, "/v1/items", key, rid="open-1")
        assert status == 200 and took >= 0.3
        assert not p.server.rt.store.healthy
        assert "open-1" not in _audited(p)
    await wait_until(lambda: p.server.rt.store.healthy and "open-1" in _audited(p))


async def test_wal_stays_bounded_under_sustained_load(make_proxy: ProxyFactory,
                                                      tmp_path: Path) -> None:
    """12.5 s of metered requests at a steady ~400/s (5,000; 25 s at ~200/s in the soak
    profile): the WAL never grows past wal_truncate_size plus the writes of one checkpoint
    tick (asserted: 4 MiB with a 1 MiB wal_truncate_size and 0.5 s ticks; with passive
    checkpoints only it passed 8 MB at ~200/s)."""
    p = await make_proxy(storage={"wal_truncate_size": "1MiB", "checkpoint_interval": "500ms"})
    key = await p.customer_with_key("load")
    wal = tmp_path / "meter.db-wal"
    truncates_before = metrics.wal_checkpoints_total.labels("truncate", "ok")._value.get()
    sizes: list[int] = []
    done = 0
    clients, per_client_rate, seconds = (10, 20.0, 25.0) if SOAK else (20, 20.0, 12.5)
    start = time.monotonic()
    stop = start + seconds

    async def client(i: int) -> None:
        nonlocal done
        headers = {"Authorization": f"Bearer {key}"}
        n = 0
        while (due := start + (n + i / clients) / per_client_rate) < stop:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            async with p.session.get(p.url + "/v1/items?size=600", headers=headers) as r:
                assert r.status == 200
                await r.read()
            done += 1
            n += 1

    async def sampler() -> None:
        while time.monotonic() < stop:
            sizes.append(wal.stat().st_size if wal.exists() else 0)
            await asyncio.sleep(0.05)

    await asyncio.gather(sampler(), *(client(i) for i in range(clients)))
    assert done == clients * per_client_rate * seconds
    assert max(sizes) < 4 * 1024 * 1024, max(sizes)
    assert metrics.wal_checkpoints_total.labels("truncate", "ok")._value.get() > truncates_before
    with p.db() as c:
        (n,) = c.execute("SELECT COUNT(*) FROM audit WHERE customer_id='load'").fetchone()
    assert n == done
    scraped = await p.admin("GET", "/metrics")
    assert "meterproxy_sqlite_wal_bytes " in scraped


async def test_the_proxys_wal_file_is_allocated_up_front_and_the_gauge_shows_it(
        make_proxy: ProxyFactory, tmp_path: Path) -> None:
    """The README's promise: the WAL file's disk blocks are allocated up to twice
    wal_truncate_size when the proxy starts (commits then never allocate under a
    checkpoint's fdatasync), and meterproxy_sqlite_wal_bytes reports the file's size."""
    p = await make_proxy(storage={"wal_truncate_size": "1MiB", "checkpoint_interval": "100ms"})
    wal = tmp_path / "meter.db-wal"
    assert wal.stat().st_size == 2 * 1024 * 1024
    assert wal.stat().st_blocks * 512 >= 2 * 1024 * 1024
    key = await p.customer_with_key("prealloc")
    async with p.session.get(p.url + "/v1/items", headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200
    assert wal.stat().st_size == 2 * 1024 * 1024        # written inside the allocation

    async def gauge() -> float:
        for line in (await p.admin("GET", "/metrics")).splitlines():
            if line.startswith("meterproxy_sqlite_wal_bytes "):
                return float(line.split()[1])
        return 0.0

    deadline = time.monotonic() + 10
    while await gauge() != 2 * 1024 * 1024:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)

    def audited() -> bool:      # (materialized from the journal within a tick or two)
        with p.db() as c:
            return c.execute("SELECT COUNT(*) FROM audit WHERE customer_id='prealloc'"
                             ).fetchone() == (1,)

    await wait_until(audited, timeout=10)


async def _ready(p: Proxy) -> tuple[int, list[str]]:
    async with p.session.get(p.admin_url + "/readyz") as r:
        body = await r.json()
        return r.status, list(body["problems"])


async def test_deleted_database_fails_readiness_and_is_never_recreated(
        make_proxy: ProxyFactory, tmp_path: Path) -> None:
    p = await make_proxy(storage={"checkpoint_interval": "100ms"})
    key = await p.customer_with_key("d")
    assert (await _get(p, "/v1/items", key))[0] == 200
    assert (await _ready(p))[0] == 200
    db = tmp_path / "meter.db"
    db.unlink()
    status, problems = await _ready(p)
    assert status == 503 and any("was deleted" in x for x in problems), problems
    status, body, _ = await _get(p, "/v1/items", key)
    assert status == 503 and body["error"]["type"] == "metering_unavailable"  # type: ignore[index]
    assert (await _get(p, "/healthz"))[0] == 200       # unmetered routes still served
    await asyncio.sleep(0.5)                           # several checkpoint ticks
    assert not db.exists()
    assert metrics.storage_broken._value.get() == 1


async def test_replaced_database_fails_readiness(make_proxy: ProxyFactory,
                                                 tmp_path: Path) -> None:
    p = await make_proxy(storage={"checkpoint_interval": "100ms"})
    await p.customer_with_key("r")
    db = tmp_path / "meter.db"
    shutil.copy(db, tmp_path / "other.db")
    os.replace(tmp_path / "other.db", db)
    await wait_until(lambda: not p.server.rt.store.healthy)   # found by the checkpoint tick
    status, problems = await _ready(p)
    assert status == 503 and any("was replaced" in x for x in problems), problems


async def test_corrupt_database_fails_readiness(make_proxy: ProxyFactory,
                                                tmp_path: Path) -> None:
    p = await make_proxy(storage={"checkpoint_interval": "100ms",
                                  "integrity_check_interval": "200ms"})
    key = await p.customer_with_key("x")
    for _ in range(20):
        assert (await _get(p, "/v1/items", key))[0] == 200
    p.server.rt.store.materialize()
    p.server.rt.store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert (await _ready(p))[0] == 200
    db = tmp_path / "meter.db"
    size = db.stat().st_size
    with db.open("r+b") as fh:           # every page but the first (the schema) is garbage
        fh.seek(4096)
        fh.write(b"\xa5" * (size - 4096))
    await wait_until(lambda: not p.server.rt.store.healthy)
    status, problems = await _ready(p)
    assert status == 503 and any("corrupt" in x for x in problems), problems


async def test_store_connection_never_waits_for_a_lock(tmp_path: Path) -> None:
    """The loop connection's busy timeout is 0: a locked database is an immediate error."""
    from proxy.store.db import Store, is_busy

    store = Store.open(tmp_path / "s.db")
    try:
        (timeout,) = store.conn.execute("PRAGMA busy_timeout").fetchone()
        assert timeout == 0
        with foreign_write_lock(tmp_path / "s.db"):
            t0 = time.perf_counter()
            try:
                store.execute_write(lambda c: c.execute("INSERT INTO meta VALUES ('k', 'v')"))
            except sqlite3.OperationalError as exc:
                assert is_busy(exc)
            else:
                raise AssertionError("the write went through a held lock")
            assert time.perf_counter() - t0 < 0.05
    finally:
        store.close()


async def test_a_lone_request_whose_commit_fails_at_once_is_never_served_unbilled(
        make_proxy: ProxyFactory) -> None:
    """Strict durability, fail_mode closed: a request's answer leaves only once its row is
    committed; a commit that fails answers 503 and its credits are refunded. The database
    refusing to grow (SQLITE_FULL, as on a full disk) fails the commit of a request that is
    alone in flight, the one ``Store.record`` commits inline: every 200 must still be billed
    (its row in the ledger, its credit debited) and every 503 not."""
    p = await make_proxy(rules_text=CREDIT_RULES)
    key = await p.customer_with_key("full")
    await p.admin("POST", "/admin/customers/full/grants",
                  {"credits": "1000", "idempotency_key": "full-g"}, expect=201)
    store = p.server.rt.store
    (pages,) = store.conn.execute("PRAGMA page_count").fetchone()
    store.conn.execute(f"PRAGMA max_page_count = {pages}")    # no page more: SQLITE_FULL
    served: list[str] = []
    refused = 0
    for i in range(400):
        status, body, _ = await _get(p, "/v1/items", key, rid=f"full-{i}")
        if status == 200:
            served.append(f"full-{i}")
            continue
        assert status == 503, (status, body)
        refused += 1
        if refused == 3:
            break
    assert refused, "the database never refused to grow"
    store.conn.execute("PRAGMA max_page_count = 1073741823")
    await wait_until(lambda: store.healthy and not store._pending)
    audited = _audited(p)
    assert set(served) <= audited, sorted(set(served) - audited)
    credits = await p.admin("GET", "/admin/customers/full/grants", expect=200)
    assert credits["balance"] == str(1000 - len(audited & {f"full-{i}" for i in range(400)}))
