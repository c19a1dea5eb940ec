"""Credit leases on a real PostgreSQL: the escrow statement, settlement by shipping, returns,
the reaper, and fleet-wide admission through three LeaseBooks with zero overspend."""

from __future__ import annotations

import asyncio
import random

import pytest

from proxy import tasks
from proxy.credits.book import Hold
from proxy.fleet import sizing
from proxy.fleet.book import Decision, LeaseBook
from proxy.fleet.credits import FleetCredits
from proxy.fleet.sizing import LeasePolicy
from proxy.store.postgres import leases
from proxy.store.postgres.leases import Grant, LeaseStore
from proxy.store.postgres.pool import PgPool
from tests.fleet.conftest import PoolFactory, add_customer, via_relay
from tests.fleet.member import Member
from tests.fleet.tcp_cut import CuttableRelay
from tests.helpers import wait_until

C = 1_000_000   # one credit in micro-credits


async def _account(pool: PgPool, customer: str) -> leases.Account:
    async with pool.acquire() as conn:
        return await leases.account(conn, customer)


def _clocked(m: Member) -> tuple[Member, list[int]]:
    """``m`` with its book on a clock the test sets (``now[0]``, ms), starting at 0."""
    now = [0]
    m.book.clock = lambda: now[0]
    return m, now


@pytest.mark.parametrize(("balance", "wanted", "floor", "k", "others", "quantum"), [
    (100 * C, 0, 10 * C, 2, 0, C),
    (100 * C, 500 * C, 10 * C, 2, 0, C),
    (100 * C, 500 * C, 10 * C, 2, 2, C),
    (3 * C, 0, 10 * C, 2, 2, C),
    (C // 2, 0, C, 2, 0, C),
    (0, 0, C, 2, 0, 1),
    (7, 7, 0, 1, 0, 3),
])
async def test_grant_statement_matches_the_pure_sizing(pool: PgPool, balance: int, wanted: int,
                                                       floor: int, k: int, others: int,
                                                       quantum: int) -> None:
    await add_customer(pool, "acme", balance)
    policy = LeasePolicy(floor=floor, k=k)
    for i in range(others):   # other holders: each took its own lease first
        await LeaseStore(pool, f"other{i}", policy).grant("acme", 0, 1)
    before = await _account(pool, "acme")
    got = await LeaseStore(pool, "me", policy).grant("acme", wanted, quantum)
    assert got.available == before.available
    assert got.amount == sizing.lease_size(wanted, floor, before.available, k, others + 1, quantum)
    after = await _account(pool, "acme")
    assert after.escrowed == before.escrowed + got.amount
    assert after.settled + after.escrowed <= after.balance


async def test_refill_tops_up_one_lease_and_release_returns_the_unspent(pool: PgPool) -> None:
    await add_customer(pool, "acme", 100 * C)
    store = LeaseStore(pool, "m1", LeasePolicy(floor=10 * C))
    a = await store.grant("acme", 0, C)
    b = await store.grant("acme", 0, C)
    assert (a.amount, b.amount) == (10 * C, 10 * C)
    assert a.lease_id == b.lease_id and b.granted_total == 20 * C
    assert await store.release("acme", a.lease_id or 0, 3 * C) == 17 * C
    acct = await _account(pool, "acme")
    assert (acct.balance, acct.settled, acct.escrowed) == (100 * C, 0, 3 * C)
    assert await store.renew("acme") == (a.lease_id, 3 * C)   # still active: 3 unreported


async def test_settlement_moves_escrow_to_settled_and_excess_is_debt(pool: PgPool) -> None:
    await add_customer(pool, "acme", 100 * C)
    m = Member(pool, "m1", LeasePolicy(floor=5 * C))
    for _ in range(3):
        assert await m.request("acme", C) is Decision.ADMIT
    await m.shipper.ship_pending(m.journal)
    acct = await _account(pool, "acme")
    assert (acct.settled, acct.escrowed) == (3 * C, 2 * C)
    async with pool.acquire() as conn, conn.transaction():   # a post-response excess
        await leases.settle(conn, "m1", {"acme": 4 * C})
    acct = await _account(pool, "acme")
    assert (acct.settled, acct.escrowed) == (7 * C, 0)   # 2 from the lease, 2 as debt


async def _burst(members: list[Member], customer: str, n: int, seed: int) -> list[Decision]:
    rng = random.Random(seed)
    picks = [members[rng.randrange(len(members))] for _ in range(n)]
    return list(await asyncio.gather(*(m.request(customer, C) for m in picks)))


async def _settle_all(members: list[Member]) -> None:
    for m in members:
        await m.shipper.ship_pending(m.journal)
    for m in members:
        await m.book.release_all()


async def test_three_members_admit_exactly_the_balance(open_pool: object) -> None:
    pools = [await open_pool() for _ in range(3)]  # type: ignore[operator]
    await add_customer(pools[0], "acme", 100 * C)
    policy = LeasePolicy(floor=10 * C, cover_ms=1000)
    members = [Member(p, f"m{i}", policy) for i, p in enumerate(pools)]
    decisions = await _burst(members, "acme", 300, seed=1)
    assert decisions.count(Decision.ADMIT) == 100
    assert decisions.count(Decision.INSUFFICIENT) == 200
    await _settle_all(members)
    acct = await _account(pools[0], "acme")
    assert (acct.balance, acct.settled, acct.escrowed, acct.available) == (100 * C, 100 * C, 0, 0)
    assert sum(len(m.journal.rows) for m in members) == 100


async def test_a_killed_members_lease_returns_after_expiry(open_pool: object) -> None:
    pools = [await open_pool() for _ in range(3)]  # type: ignore[operator]
    await add_customer(pools[0], "acme", 100 * C)
    policy = LeasePolicy(floor=30 * C, k=1, ttl_ms=1500, cover_ms=1000)
    members = [Member(p, f"m{i}", policy) for i, p in enumerate(pools)]
    dead = members[2]
    for _ in range(5):   # it holds a lease, spends 5 of it, ships, then is killed
        assert await dead.request("acme", C) is Decision.ADMIT
    await dead.shipper.ship_pending(dead.journal)
    held = dead.book.held["acme"].remaining
    assert held > 0
    live = members[:2]
    first = await _burst(live, "acme", 300, seed=2)
    assert first.count(Decision.ADMIT) == 100 - 5 - held // C    # the dead lease is still escrowed
    for m in live:
        await m.shipper.ship_pending(m.journal)
    assert await LeaseStore(pools[0], "reaper", policy).reap(grace_ms=0) == {}   # not yet expired
    reaped: dict[str, int] = {}
    while not reaped:     # the lease expires 1.5 s after its last grant (the database's clock)
        await asyncio.sleep(0.1)
        reaped = await LeaseStore(pools[0], "reaper", policy).reap(grace_ms=200)
    assert reaped == {"acme": held}
    second = await _burst(live, "acme", 300, seed=3)
    assert second.count(Decision.ADMIT) == held // C
    await _settle_all(live)
    acct = await _account(pools[0], "acme")
    assert (acct.settled, acct.escrowed, acct.available) == (100 * C, 0, 0)
    assert first.count(Decision.ADMIT) + second.count(Decision.ADMIT) + 5 == 100


async def test_holder_stops_spending_at_its_own_deadline(pool: PgPool) -> None:
    await add_customer(pool, "acme", 100 * C)
    m, now = _clocked(Member(pool, "m1", LeasePolicy(floor=10 * C, ttl_ms=10_000, drift_margin_ppm=100_000)))
    assert await m.request("acme", C) is Decision.ADMIT
    now[0] = 8_999
    assert m.book.try_admit("acme", C)
    now[0] = 9_000                        # sent at 0 + 10 s * (1 - 10%)
    assert not m.book.try_admit("acme", C)


async def test_an_empty_grant_answers_402_locally_for_the_backoff(pool: PgPool) -> None:
    await add_customer(pool, "acme", 0)
    m, now = _clocked(Member(pool, "m1", LeasePolicy(floor=C, empty_backoff_ms=1000)))
    assert await m.request("acme", C) is Decision.INSUFFICIENT
    assert await m.request("acme", C) is Decision.INSUFFICIENT
    assert m.book.refills == 1                      # the second 402 asked nobody
    async with pool.acquire() as conn:
        await leases.deposit(conn, "acme", 5 * C)   # a top-up
    now[0] = 999
    assert await m.request("acme", C) is Decision.INSUFFICIENT
    now[0] = 1000                                   # seen within the backoff
    assert await m.request("acme", C) is Decision.ADMIT
    assert m.book.refills == 2


async def test_a_restarted_member_trusts_only_what_it_was_granted_now(pool: PgPool) -> None:
    await add_customer(pool, "acme", 100 * C)
    policy = LeasePolicy(floor=10 * C, k=1)
    before = Member(pool, "m1", policy)
    for _ in range(5):       # spent 5 of a 10-credit lease; the journal never shipped
        assert await before.request("acme", C) is Decision.ADMIT
    after = Member(pool, "m1", policy, first_seq=6)   # the same member id, a new process
    assert await after.request("acme", C) is Decision.ADMIT
    held = after.book.held["acme"]
    assert (held.granted, held.spent) == (20 * C, 11 * C)   # the old 10 counted as spent
    await before.shipper.ship_pending(before.journal)       # the old journal ships after all
    await after.shipper.ship_pending(after.journal)
    assert await after.book.release_all() == 9 * C
    async with pool.acquire() as conn:
        acct = await leases.account(conn, "acme")
    # 6 spent and settled; the 5 the old process never spent stay escrowed until the reaper
    assert (acct.settled, acct.escrowed) == (6 * C, 5 * C)


async def test_shipping_while_admitting_stays_exact(open_pool: object) -> None:
    """Grants, settlements and returns from three members at once (the lock order holds:
    no deadlock, no lost update)."""
    pools = [await open_pool() for _ in range(3)]  # type: ignore[operator]
    for i in range(5):
        await add_customer(pools[0], f"c{i}", 40 * C)
    policy = LeasePolicy(floor=3 * C, cover_ms=1000)
    members = [Member(p, f"m{i}", policy) for i, p in enumerate(pools)]
    stop = asyncio.Event()
    shipping = [tasks.spawn(f"ship-{m.id}", m.shipper.run(m.journal, 0.01, stop)) for m in members]
    rng = random.Random(4)
    picks = [(members[rng.randrange(3)], f"c{rng.randrange(5)}") for _ in range(400)]
    decisions = await asyncio.gather(*(m.request(c, C) for m, c in picks))
    stop.set()
    await asyncio.gather(*shipping)
    for m in members:
        await m.book.release_all()
    assert decisions.count(Decision.ADMIT) == 200
    for i in range(5):
        acct = await _account(pools[0], f"c{i}")
        assert (acct.settled, acct.escrowed) == (40 * C, 0)


async def test_a_lease_is_renewed_ahead_of_its_deadline(pool: PgPool) -> None:
    await add_customer(pool, "acme", 100 * C)
    m, now = _clocked(Member(pool, "m1", LeasePolicy(floor=10 * C, ttl_ms=30_000, drift_margin_ppm=0)))
    assert await m.request("acme", C) is Decision.ADMIT
    assert m.book.held["acme"].usable_until_ms == 30_000
    now[0] = 20_000                          # a third of the lifetime left: refill ahead
    assert await m.request("acme", C) is Decision.ADMIT
    assert m.book.refills == 1               # the request did not wait for it
    await m.book.wait_refills()
    assert m.book.refills == 2
    assert m.book.held["acme"].usable_until_ms == 50_000


@pytest.mark.timeout(30)
async def test_a_finished_refill_is_never_awaited_again(pool: PgPool) -> None:
    """A refill that finished (its grant already spent by the request that woke first) but
    whose done callback has not run yet must not be handed out again: awaiting a finished
    future does not yield, so ``admit`` would spin on it forever with the event loop blocked
    (seen on real members under uvloop: a 300-request burst hung a member)."""
    await add_customer(pool, "acme", 10 * C)
    book = LeaseBook(LeaseStore(pool, "m1", LeasePolicy(floor=C)))
    done: asyncio.Future[Grant | None] = asyncio.get_running_loop().create_future()
    done.set_result(Grant(C, 10 * C, 1, C))      # spent elsewhere: this book holds nothing
    book._refills["acme"] = done
    assert await book.admit("acme", C) is Decision.ADMIT
    assert book.held["acme"].spent == C


async def test_an_idle_lease_is_returned_and_a_used_one_is_not(pool: PgPool) -> None:
    """docs/fleet.md, Return: a lease with no admission for ``idle_ms`` goes back to the
    balance at the renewal pass (``release_idle``), so other members can spend it; one that
    admitted within ``idle_ms`` stays. The next request asks for a new lease."""
    await add_customer(pool, "acme", 100 * C)
    await add_customer(pool, "busy", 100 * C)
    await add_customer(pool, "broke", 0)
    m, now = _clocked(Member(pool, "m1", LeasePolicy(floor=10 * C, k=1, idle_ms=5_000)))
    assert await m.request("acme", C) is Decision.ADMIT
    assert await m.request("busy", C) is Decision.ADMIT
    assert await m.request("broke", C) is Decision.INSUFFICIENT     # a 1 s local backoff
    await m.shipper.ship_pending(m.journal)
    now[0] = 4_999
    assert m.book.try_admit("busy", C)                  # busy admits again at 4.999 s
    assert await m.book.release_idle() == 0             # nobody idle for 5 s yet
    now[0] = 5_000
    assert await m.book.release_idle() == 9 * C         # acme's 9 unspent credits
    assert list(m.book.held) == ["busy"] and m.book.idle_returns == 1
    # per-customer state is kept for active customers only: the returned customer's spend
    # rate and the ended backoff are forgotten (the book does not grow with every customer)
    assert set(m.book._rate_at) == {"busy"} and m.book._empty_until == {}
    acct = await _account(pool, "acme")
    assert (acct.balance, acct.settled, acct.escrowed) == (100 * C, C, 0)
    assert await m.book.renew("busy")
    assert await m.request("acme", C) is Decision.ADMIT
    assert m.book.refills == 4                          # (broke asked once) a new lease for acme
    assert (await _account(pool, "acme")).escrowed == 10 * C


async def test_a_lease_a_request_still_holds_credit_on_is_not_idle(pool: PgPool) -> None:
    """A request admitted here and not ended (a long stream: its hold is open) keeps the
    lease from being idle, however long ago the admission was: returned, the lease would
    not be renewed, the reaper would hand its held credit to other members, and the
    stream's cost would ship as overspend. Once the hold ends (settled at its actual
    cost), the lease is returned with the rest."""
    await add_customer(pool, "acme", 100 * C)
    m, now = _clocked(Member(pool, "m1", LeasePolicy(floor=10 * C, k=1, idle_ms=1_000)))
    credits = FleetCredits(m.book)
    hold = await credits.admit("acme", C, 0.0)
    assert isinstance(hold, Hold)
    now[0] = 60_000
    assert await m.book.release_idle() == 0 and "acme" in m.book.held
    assert await m.book.renew("acme")
    credits.settle(hold, [3 * C], 60.0)                     # the stream ends: it cost 3
    assert m.book.holding == {}
    assert await m.book.release_idle() == 7 * C             # 10 granted, 3 spent
    assert (await _account(pool, "acme")).escrowed == 3 * C   # until its row ships
    released = await credits.admit("acme", C, 61.0)          # and a request refused later
    assert isinstance(released, Hold)
    credits.release(released)
    assert m.book.holding == {}


@pytest.mark.parametrize("fault", ["cut", "reply lost"])
async def test_a_return_that_failed_is_sent_again_and_gives_back_once(
        open_pool: PoolFactory, pg_dsn: str, relay: CuttableRelay, fault: str) -> None:
    """The return's statement fails (PostgreSQL cut away), or commits with its reply lost:
    the return is remembered, sent again at the next pass, and gives the unspent credit back
    exactly once; a refill for the customer sends it first."""
    direct = await open_pool()
    await add_customer(direct, "acme", 100 * C)
    via = await open_pool(dsn=via_relay(relay.port, pg_dsn), connect_timeout=1.0,
                          command_timeout=2.0, size=2, statement_cache_size=0)
    m, now = _clocked(Member(via, "m1", LeasePolicy(floor=10 * C, k=1, idle_ms=1_000)))
    assert await m.request("acme", C) is Decision.ADMIT
    await m.shipper.ship_pending(m.journal)
    now[0] = 1_000
    if fault == "cut":
        relay.cut()
    else:
        relay.lose_commit_replies(1, writes=(b"UPDATE",))
    assert await m.book.release_idle() == 0                  # failed, logged
    assert m.book.held == {} and "acme" in m.book._unreturned
    escrowed = (await _account(direct, "acme")).escrowed
    assert escrowed == (9 * C if fault == "cut" else 0)      # the lost reply had committed
    relay.restore()
    assert await m.book.release_idle() == (9 * C if fault == "cut" else 0)
    assert m.book._unreturned == {}
    assert (await _account(direct, "acme")).escrowed == 0
    # again, then a refill: it sends the remembered return before its grant
    assert await m.request("acme", C) is Decision.ADMIT
    await m.shipper.ship_pending(m.journal)
    now[0] = 3_000
    relay.cut()
    assert await m.book.release_idle() == 0
    relay.restore()
    assert await m.request("acme", C) is Decision.ADMIT
    assert m.book._unreturned == {}
    await m.shipper.ship_pending(m.journal)
    assert await m.book.release_all() == 9 * C
    acct = await _account(direct, "acme")
    assert (acct.settled, acct.escrowed) == (3 * C, 0)


async def test_a_refill_waits_for_the_idle_return_in_flight(pool: PgPool) -> None:
    """The return cuts the lease to what was spent: a grant committed before it would be cut
    too, while this book spends it as escrowed. So a refill for the customer sends nothing
    until the return is done: with the account row locked by another transaction, only the
    return's statement waits on the lock (the refill's was not sent)."""
    await add_customer(pool, "acme", 100 * C)
    m, now = _clocked(Member(pool, "m1", LeasePolicy(floor=10 * C, k=1, idle_ms=1_000)))
    assert await m.request("acme", C) is Decision.ADMIT
    await m.shipper.ship_pending(m.journal)
    now[0] = 1_000
    async with pool.acquire() as locker, locker.transaction():
        await locker.execute("SELECT 1 FROM credit_accounts WHERE customer_id = 'acme' "
                             "FOR UPDATE")
        returning = asyncio.ensure_future(m.book.release_idle())
        admitting = asyncio.ensure_future(m.request("acme", C))
        async with pool.acquire() as probe:
            waiting = await wait_until(lambda: probe.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"), ok=lambda n: n >= 1, timeout=5,
                what="the return waiting on the account lock")
            await asyncio.sleep(0.3)
            waiting = await probe.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'")
        assert waiting == 1, f"{waiting} statements waiting on the account lock"
        assert not admitting.done()
    assert await returning == 9 * C
    assert await admitting is Decision.ADMIT
    h = m.book.held["acme"]
    async with pool.acquire() as conn:
        granted, reported = await conn.fetchrow(
            "SELECT granted, reported FROM credit_leases WHERE id = $1", h.lease_id)
    # what the book may still spend is escrowed in its lease
    assert granted - reported >= h.remaining > 0
    assert (await _account(pool, "acme")).escrowed == granted - reported
