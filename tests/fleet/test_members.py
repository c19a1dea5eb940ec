"""One live process per member id on a real PostgreSQL (proxy/store/postgres/members.py): a
claim is refused while another process holds the id and heartbeats, and a process whose id
another one claimed can neither ship (usage, grant debits) nor take or keep the flusher."""

from __future__ import annotations

import asyncio

import pytest

from proxy.fleet.book import Decision, LeaseBook
from proxy.fleet.sizing import LeasePolicy
from proxy.store.postgres import members
from proxy.store.postgres.journal import ship_debit_columns
from proxy.store.postgres.leader import Deposed, Leadership
from proxy.store.postgres.leases import LeaseStore
from proxy.store.postgres.members import MemberIdInUse, Superseded
from proxy.store.postgres.pool import PgPool
from proxy.store.postgres.shipping import LocalRow, ShipItem, Shipper
from tests.fleet.conftest import add_customer
from tests.helpers import wait_until

C = 1_000_000
TTL = 600


def _row(seq: int, rid: str) -> LocalRow:
    return LocalRow(seq, rid, 0, "acme", "k", "r", "v1", 200, (ShipItem("api_calls", C),))


async def _ledger(pool: PgPool) -> list[tuple[int, str]]:
    async with pool.acquire() as c:
        return [(r[0], r[1]) for r in await c.fetch(
            "SELECT seq, request_id FROM usage_ledger WHERE member_id = 'm' ORDER BY seq")]


async def _claimed_by_new(pool: PgPool) -> None:
    """"old" heartbeats once and goes silent; "new" claims member id m once "old" was not
    seen for 50 ms (it stalled past its stale time)."""
    await members.heartbeat(pool, "m", "v1", "old")
    await wait_until(lambda: members.claim(pool, "m", "new", 50), ok=lambda v: v is None,
                     what="the silent process's id claimed")


async def test_a_live_member_id_is_refused_and_a_released_or_silent_one_claimed(
        pool: PgPool) -> None:
    assert await members.claim(pool, "m", "one", TTL) is None
    assert await members.claim(pool, "m", "one", TTL) is None       # its own: again
    held = await members.claim(pool, "m", "two", TTL)
    assert held is not None and held[0] == "one"

    async def alive() -> None:          # "one" heartbeats every ttl/3, as a member does
        while True:
            await members.heartbeat(pool, "m", "v1", "one")
            await asyncio.sleep(TTL / 3000)

    beating = asyncio.ensure_future(alive())
    try:
        with pytest.raises(MemberIdInUse, match="member id m is in use by another running"):
            await members.claim_or_refuse(pool, "m", "two", TTL)
    finally:
        beating.cancel()
    # "one" went silent (its process died): its id is free once it was not seen for TTL
    await members.claim_or_refuse(pool, "m", "two", TTL)
    await members.release(pool, "m", "one")                         # not its any more: no-op
    assert await members.claim(pool, "m", "three", TTL) is not None
    await members.release(pool, "m", "two")                         # shutdown frees it at once
    assert await members.claim(pool, "m", "three", TTL) is None


async def test_a_process_whose_member_id_was_claimed_cannot_ship_or_heartbeat(
        pool: PgPool) -> None:
    await add_customer(pool, "acme", 10 * C)
    assert await members.claim(pool, "m", "old", TTL) is None
    old = Shipper(pool, "m", instance="old")
    await old.ship([_row(1, "old-1")])
    await _claimed_by_new(pool)
    with pytest.raises(Superseded):
        await old.ship([_row(2, "old-2")])
    with pytest.raises(Superseded):
        await ship_debit_columns(pool, "m", [["acme"], ["g"], ["debit"], [-C], ["old-2"],
                                             ["api_calls"], [0], [2], [0]], "old")
    with pytest.raises(Superseded):
        await members.heartbeat(pool, "m", "v1", "old")
    assert old.watermark == 1
    new = Shipper(pool, "m", instance="new")
    assert await new.load_watermark() == 1
    await new.ship([_row(2, "new-2")])                  # its seq 2 is not taken by "old"
    assert await _ledger(pool) == [(1, "old-1"), (2, "new-2")]
    async with pool.acquire() as c:
        assert await c.fetchval("SELECT count(*) FROM credit_entries") == 0


async def test_only_the_process_holding_its_member_id_leads_and_another_gets_a_new_fence(
        pool: PgPool) -> None:
    assert await members.claim(pool, "m", "old", TTL) is None
    old = Leadership(pool, "flusher", "m", ttl_ms=TTL, instance="old")
    assert await old.try_lead() and old.fence == 1
    await wait_until(lambda: members.claim(pool, "m", "new", 50), ok=lambda v: v is None,
                     what="the silent process's id claimed")
    assert not await old.try_lead()                     # superseded: no renewal
    new = Leadership(pool, "flusher", "m", ttl_ms=TTL, instance="new")
    assert not await new.try_lead()                     # the same id, another holder: waits
    await wait_until(new.try_lead, timeout=5, what="the old lease's expiry")
    assert new.fence == 2                               # a fence of its own
    old.fence, old._until_ms = 1, old.clock() + 60_000  # a stalled clock: still believes
    with pytest.raises(Deposed):
        async with old.fenced():
            pass


async def test_a_process_whose_member_id_was_claimed_cannot_spend_keep_or_cut_its_leases(
        pool: PgPool) -> None:
    """The leases under a member id are one row per customer, whichever process of the id
    holds it: a superseded process could take more credit (``grant``), keep the lease alive
    (``renew``) or cut it to its own spending (``release``) under the new process. With its
    instance token each is refused: ``Superseded`` from the grant, no renewal, no return."""
    await add_customer(pool, "acme", 100 * C)
    policy = LeasePolicy(floor=10 * C, k=1)
    assert await members.claim(pool, "m", "old", TTL) is None
    old = LeaseStore(pool, "m", policy, "old")
    first = await old.grant("acme", 0, C)
    assert first.amount == 10 * C and first.lease_id is not None
    await _claimed_by_new(pool)
    with pytest.raises(Superseded):
        await old.grant("acme", 0, C)
    assert await old.renew("acme") is None
    assert await old.release("acme", first.lease_id, 0) == 0
    async with pool.acquire() as c:
        lease = await c.fetchrow("SELECT granted, state FROM credit_leases WHERE id = $1",
                                 first.lease_id)
        escrowed = await c.fetchval("SELECT escrowed FROM credit_accounts")
    assert (lease["granted"], lease["state"], escrowed) == (10 * C, "active", 10 * C)
    new = LeaseStore(pool, "m", policy, "new")
    assert await new.renew("acme") == (first.lease_id, 10 * C)
    assert (await new.grant("acme", 0, C)).amount == 10 * C
    assert await new.release("acme", first.lease_id, 0) == 20 * C


async def test_a_grant_that_finds_its_member_id_claimed_stops_the_book_at_once(
        pool: PgPool) -> None:
    """A superseded process learns it from a refill before its next heartbeat: the book
    tells the runtime (which stops metering), drops the leases it held in memory, and asks
    the database nothing more; its requests get what an unreachable database gives."""
    await add_customer(pool, "acme", 100 * C)
    await add_customer(pool, "beta", 100 * C)
    assert await members.claim(pool, "m", "old", TTL) is None
    book = LeaseBook(LeaseStore(pool, "m", LeasePolicy(floor=C, k=1), "old"))
    told: list[Superseded] = []
    book.on_superseded = told.append
    assert await book.admit("acme", C) is Decision.ADMIT        # acme's lease: 1 credit
    await _claimed_by_new(pool)
    assert await book.admit("beta", C) is Decision.UNAVAILABLE   # its grant is refused
    assert len(told) == 1 and book.superseded and book.held == {}
    before = pool.statements
    assert await book.admit("acme", C) is Decision.UNAVAILABLE   # no lease used, none asked
    assert pool.statements == before
