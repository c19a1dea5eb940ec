"""Acceptance (issue 11, #3) on real processes: a key created on one member works on the
others, and a key revoked on member A is refused (403 key_revoked) on B and C within the stated bound
(docs/fleet.md: ``fleet.key_poll_interval`` plus one query; 1 s asserted here with the
interval at 200 ms)."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.fleet.members import AH, RunningMember, admin_call, fleet_of, wait_status

BOUND = 1.0


async def test_key_revoked_on_one_member_is_refused_on_the_others(tmp_path: Path,
                                                                 upstream: str) -> None:
    async with fleet_of(tmp_path, upstream) as fleet:
        a, b, c = await fleet.start(["a", "b", "c"])
        async with aiohttp.ClientSession() as s:
            await admin_call(s, a, "POST", "/admin/customers", {"id": "cust"})
            created = await admin_call(s, a, "POST", "/admin/customers/cust/keys", {"name": "k"})
            key, kid = created["key"], created["key_id"]
            for m in (b, c):
                assert await wait_status(s, m.url + "/v1/items", key, 200, BOUND) < BOUND
            await admin_call(s, a, "DELETE", f"/admin/keys/{kid}")
            took = [await wait_status(s, m.url + "/v1/items", key, 403, BOUND)
                    for m in (b, c)]
            assert max(took) < BOUND
            # every member answers for the fleet: B lists the key as revoked
            keys = await admin_call(s, b, "GET", "/admin/customers/cust/keys")
            assert [k["revoked_at"] is not None for k in keys] == [True], keys


async def _suspend_answers_503(s: aiohttp.ClientSession, member: RunningMember,
                              type_: str) -> None:
    """Suspending customer 'cust' on ``member`` answers 503 ``type_`` with Retry-After: 1."""
    async with s.post(member.admin + "/admin/customers", headers=AH,
                      json={"id": "cust", "status": "suspended"}) as r:
        body = await r.json()
        assert r.status == 503, body
        assert body["error"]["type"] == type_
        assert r.headers["Retry-After"] == "1"


async def test_admin_write_behind_a_row_lock_answers_503(tmp_path: Path, upstream: str) -> None:
    """PostgreSQL's equivalent of a locked SQLite file: another session holds the customer's
    row lock; the admin write waits the pool's command_timeout, then answers 503 with
    Retry-After, as SQLite does, but as storage_outcome_unknown (PostgreSQL's failures
    cannot promise that nothing was written); here it wrote nothing."""
    import asyncpg

    async with fleet_of(tmp_path, upstream) as fleet:
        (a,) = await fleet.start(["a"])
        async with aiohttp.ClientSession() as s:
            await admin_call(s, a, "POST", "/admin/customers", {"id": "cust"})
            blocker = await asyncpg.connect(fleet.dsn)
            try:
                tx = blocker.transaction()
                await tx.start()
                await blocker.execute("SELECT * FROM customers WHERE id='cust' FOR UPDATE")
                await _suspend_answers_503(s, a, "storage_outcome_unknown")
                await tx.rollback()
            finally:
                await blocker.close()
            cust = await admin_call(s, a, "GET", "/admin/customers/cust")
            assert cust["status"] == "active"
            await admin_call(s, a, "POST", "/admin/customers",
                             {"id": "cust", "status": "suspended"})


async def test_an_admin_write_that_keeps_conflicting_answers_503_storage_unavailable(
        tmp_path: Path, upstream: str) -> None:
    """A serialization failure (40001) is retried whole (``PgPool.retrying``); one that
    recurs on every attempt (here another session commits a change to the customer's row
    under each attempt's snapshot, the database's default isolation being repeatable read)
    is answered 503 storage_unavailable with Retry-After, not 500: the transaction was
    rolled back, so nothing was written and the same request can be sent again."""
    import asyncio

    import asyncpg

    from proxy.store.postgres.pool import CONFLICT_ATTEMPTS
    from tests.store_pg.test_pool import lock_waiters

    async with fleet_of(tmp_path, upstream) as fleet:
        admin = await asyncpg.connect(fleet.dsn)
        try:
            name = await admin.fetchval("SELECT current_database()")
            await admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_isolation'
                                " = 'repeatable read'")
        finally:
            await admin.close()
        (a,) = await fleet.start(["a"])
        async with aiohttp.ClientSession() as s:
            await admin_call(s, a, "POST", "/admin/customers", {"id": "cust"})
            other = await asyncpg.connect(fleet.dsn)
            watch = await asyncpg.connect(fleet.dsn)

            holding = asyncio.Event()

            async def keep_conflicting() -> int:
                """Hold the row, wait for the member's attempt to queue behind it, commit a
                change: that attempt fails with 40001. Returns how many it broke."""
                broke = 0
                while True:
                    async with other.transaction():
                        await other.execute("UPDATE customers SET updated_at = updated_at + 1"
                                            " WHERE id = 'cust'")
                        holding.set()       # the row is held before the first attempt
                        try:
                            await lock_waiters(watch, other, within=3)
                        except AssertionError:
                            return broke
                    broke += 1

            try:
                breaker = asyncio.ensure_future(keep_conflicting())
                await asyncio.wait_for(holding.wait(), 10)
                await _suspend_answers_503(s, a, "storage_unavailable")
                # (an attempt woken by one commit may queue behind the next one: at least
                # one broken per attempt)
                assert await asyncio.wait_for(breaker, 10) >= CONFLICT_ATTEMPTS
            finally:
                await other.close()
                await watch.close()
            async with s.get(a.admin + "/metrics", headers=AH) as r:
                text = await r.text()
            assert 'meterproxy_fleet_pg_conflicts_total{outcome="exhausted"} 1.0' in text
            assert (f'meterproxy_fleet_pg_conflicts_total{{outcome="retried"}} '
                    f'{CONFLICT_ATTEMPTS - 1}.0') in text
            cust = await admin_call(s, a, "GET", "/admin/customers/cust")
            assert cust["status"] == "active"          # nothing was written
            await admin_call(s, a, "POST", "/admin/customers",
                             {"id": "cust", "status": "suspended"})
            cust = await admin_call(s, a, "GET", "/admin/customers/cust")
            assert cust["status"] == "suspended"
