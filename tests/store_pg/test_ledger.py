"""The credit service on the PostgreSQL ledger: a grant is expired or voided once for the fleet.

Every fleet member runs the expiry loop from its own in-memory book, and two admin voids may
race on one member (the PostgreSQL append awaits between the book's check and its update),
so the same closing can be decided twice. The ledger appends a grant's ``expire`` or
``void`` entry at most once (a unique index, PostgreSQL migration 5) and moves the account
balance only for what it appended, so no paid credit disappears and the book can always be
rebuilt at start-up. (Found by review; each test failed before the fix.)
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from proxy.credits.service import CreditService, load_book
from proxy.store.db import Store
from proxy.store.postgres.storage import PostgresStorage
from tests.store_pg.conftest import MemberFactory


async def _balance(s: PostgresStorage, cid: str) -> int:
    async with s.pool.acquire() as c:
        v = await c.fetchval("SELECT balance FROM credit_accounts WHERE customer_id=$1", cid)
    return 0 if v is None else int(v)


async def _kinds(s: PostgresStorage, grant_id: str, kind: str) -> int:
    async with s.pool.acquire() as c:
        return int(await c.fetchval("SELECT COUNT(*) FROM credit_entries WHERE grant_id=$1"
                                    " AND kind=$2", grant_id, kind))


async def _service(s: PostgresStorage, store: Store) -> CreditService:
    return CreditService(store, load_book(await s.ledger.load()), s.ledger)


async def test_expiry_is_written_once_for_the_fleet(member: MemberFactory,
                                                    tmp_path: Path) -> None:
    a, b = await member(), await member()
    await a.customers.upsert("acme", None, None, None)
    store = Store.open(tmp_path / "unused.db")      # CreditService's (unused) SQLite store
    try:
        svc_a = await _service(a, store)
        g, _ = await svc_a.grant("acme", "10", expires_at=int(time.time()) + 1)
        svc_b = await _service(b, store)               # member b starts after the grant
        now = time.time() + 1.2                        # past the grant's expiry
        # each member's expiry loop (CreditService.run_expiry) finds the grant due
        await asyncio.gather(svc_a.expire_due(now), svc_b.expire_due(now))
        assert await _kinds(a, g.id, "expire") == 1
        assert await _balance(a, "acme") == 0
    finally:
        store.close()


async def test_concurrent_voids_of_one_grant_void_it_once(pg: PostgresStorage,
                                                          tmp_path: Path) -> None:
    await pg.customers.upsert("acme", None, None, None)
    store = Store.open(tmp_path / "unused.db")
    try:
        svc = await _service(pg, store)
        g, _ = await svc.grant("acme", "10")
        # two admin POSTs of .../void arriving together on one member: the book says "not
        # voided" to both because the PostgreSQL append awaits between check and apply
        # (the second call may still raise from the book; the ledger appends one entry only)
        await asyncio.gather(svc.void(g.id), svc.void(g.id), return_exceptions=True)
        assert await _kinds(pg, g.id, "void") == 1
        assert await _balance(pg, "acme") == 0
    finally:
        store.close()


async def test_a_member_restarts_after_two_members_expired_one_grant(member: MemberFactory,
                                                                      tmp_path: Path) -> None:
    """The consequence at start-up: the book is rebuilt from the ledger, and the second
    expire entry takes the grant below zero, so ``load_book`` raises and no member starts."""
    a, b = await member(), await member()
    await a.customers.upsert("acme", None, None, None)
    store = Store.open(tmp_path / "unused.db")
    try:
        svc_a = await _service(a, store)
        await svc_a.grant("acme", "10", expires_at=int(time.time()) + 1)
        svc_b = await _service(b, store)
        now = time.time() + 1.2                        # past the grant's expiry
        await asyncio.gather(svc_a.expire_due(now), svc_b.expire_due(now))
        load_book(await a.ledger.load())
    finally:
        store.close()
