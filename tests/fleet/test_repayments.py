"""Repayments of debt in fleet mode, on a real PostgreSQL (docs/fleet.md, "Repayments"):
several members' books repaying one debt repay it once (capped under the account lock by
the debt the shared ledger still shows), the expiry task survives writes whose outcome is
unknown (a COMMIT that reached the server, its answer lost with the connection) and writes
each entry once, with every book read back equal to the ledger; repayments beyond the debt
that a ledger written before the cap holds are given back once at start-up, by one of the
members starting together (real member processes)."""

from __future__ import annotations

import asyncio
import time
from functools import partial
from pathlib import Path

import aiohttp

from proxy.credits.book import CreditBook
from proxy.credits.ledger import Entry, GrantState
from proxy.credits.service import CreditService
from proxy.store.postgres.grant_debits import grant_states, overpaid
from proxy.store.postgres.ledger import PostgresCreditLedger
from proxy.store.postgres.pool import PgPool, PoolSettings
from proxy.store.protocols import LedgerEntry, NewGrant
from tests.fleet.conftest import PoolFactory, add_customer, via_relay
from tests.fleet.members import FleetOfMembers, admin_call, fleet_of
from tests.fleet.tcp_cut import CuttableRelay

C = 1_000_000
NOW = 1_800_000_000


async def _reload(pool: PgPool, book: CreditBook, customers: list[str]) -> None:
    """What a member's ``Fleet.reload_credits`` does (proxy/fleet/runtime.py)."""
    for cc in await grant_states(pool, customers):
        book.replace(cc.customer_id, cc.grants, cc.debt)


async def _member(pool: PgPool) -> CreditService:
    """A member's credit service: its book loaded from the shared ledger as
    ``Fleet.credit_book`` loads it, read back after the expiry task writes (``reload``, as
    ``proxy/app.py`` sets it in fleet mode)."""
    book = CreditBook()
    await _reload(pool, book, ["acme", "beta"])
    svc = CreditService(None, book, PostgresCreditLedger(pool))  # type: ignore[arg-type]
    svc.reload = partial(_reload, pool, book)
    return svc


async def _grant(pool: PgPool, gid: str, amount: int, created: int, *,
                 expires_at: int | None = None, effective_at: int | None = None,
                 customer: str = "acme") -> None:
    await PostgresCreditLedger(pool).create_grant(NewGrant(GrantState(
        gid, customer, amount, 50, expires_at, created, "admin", effective_at=effective_at)))


async def _debt(pool: PgPool, amount: int) -> None:
    await PostgresCreditLedger(pool).append([LedgerEntry("acme", Entry("", "debt", amount))])


async def _ledger(pool: PgPool) -> tuple[int, dict[str, int], dict[tuple[str, str], int]]:
    """The shared ledger: acme's debt (debt less repay, may be negative), each grant's
    remaining, and the entries summed per (grant, kind)."""
    async with pool.acquire() as c:
        debt = int(await c.fetchval("SELECT debt FROM credit_accounts WHERE customer_id='acme'"))
        remaining = {str(r[0]): int(r[1]) for r in await c.fetch(
            "SELECT id, amount - used FROM grants WHERE customer_id='acme'")}
        sums = {(str(r[0] or ""), str(r[1])): int(r[2]) for r in await c.fetch(
            "SELECT grant_id, kind, SUM(amount) FROM credit_entries GROUP BY 1, 2")}
    return debt, remaining, sums


def _book_says(svc: CreditService, customer: str = "acme") -> tuple[int, dict[str, int]]:
    return svc.book.debt(customer), {g.id: g.remaining for g in svc.book.grants(customer)}


async def test_two_members_repaying_one_debt_at_once_repay_it_once(
        open_pool: PoolFactory) -> None:
    """A renewal paid before its period (effective later) and a debt of 10: at its
    ``effective_at`` every member's expiry task repays the debt out of it (``repay_due``),
    each from its own book. The ledger takes 10 once, not 10 per member (before the cap
    under the account lock: 20, a debt of -10 and 10 credits of the grant gone), and both
    books read back what the ledger says."""
    a_pool, b_pool = await open_pool(), await open_pool()
    await add_customer(a_pool, "acme")
    await _debt(a_pool, 10 * C)
    await _grant(a_pool, "renewal", 20 * C, 1, effective_at=NOW + 10)
    a, b = await _member(a_pool), await _member(b_pool)
    assert _book_says(a) == _book_says(b) == (10 * C, {"renewal": 20 * C})
    await asyncio.gather(a.repay_due(NOW + 11), b.repay_due(NOW + 11))
    debt, remaining, sums = await _ledger(a_pool)
    assert (debt, remaining, sums[("renewal", "repay")]) == (0, {"renewal": 10 * C}, 10 * C)
    assert _book_says(a) == _book_says(b) == (0, {"renewal": 10 * C})


async def test_a_grant_on_a_member_that_has_not_seen_a_repayment_repays_nothing_more(
        open_pool: PoolFactory) -> None:
    """Member A grants 10, which repays the debt of 10; member B, whose book has not
    reloaded since, grants 5 and would repay 5 more of a debt that is gone. The ledger
    writes nothing for B's repayment, and B's book reads back the 5 it granted, whole."""
    a_pool, b_pool = await open_pool(), await open_pool()
    await add_customer(a_pool, "acme")
    await _debt(a_pool, 10 * C)
    a, b = await _member(a_pool), await _member(b_pool)
    ga, _ = await a.grant("acme", "10", idempotency_key="a")
    gb, _ = await b.grant("acme", "5", idempotency_key="b")
    debt, remaining, sums = await _ledger(a_pool)
    assert (debt, remaining) == (0, {ga.id: 0, gb.id: 5 * C})
    assert sums.get((gb.id, "repay")) is None and sums[(ga.id, "repay")] == 10 * C
    assert _book_says(b) == (0, {ga.id: 0, gb.id: 5 * C})
    assert _book_says(a) == (0, {ga.id: 0})        # a reloads b's grant at its next pass


async def test_the_expiry_task_writes_once_through_commits_whose_outcome_is_unknown(
        open_pool: PoolFactory, pg_dsn: str, relay: CuttableRelay) -> None:
    """Beta's grant expires with 3 left and acme's renewal becomes effective against acme's
    debt of 10 in the same second; the answers to the expiry's and to the repayment's
    COMMIT are lost with their connections (both committed; the member sees PostgreSQL
    unreachable: ``StorageOutcomeUnknown``). The expiry task goes on (before the fix it
    ended for good at the first: the repayment was never written), writes each entry once
    (one expiry of 3, one repayment of 10), and its book is read back equal to the
    ledger."""
    direct = await open_pool()
    await add_customer(direct, "acme")
    await add_customer(direct, "beta")
    await _debt(direct, 10 * C)
    at = int(time.time()) + 1
    await _grant(direct, "old", 3 * C, 1, expires_at=at, customer="beta")
    await _grant(direct, "renewal", 20 * C, 2, effective_at=at)
    via = await open_pool(dsn=via_relay(relay.port, pg_dsn), connect_timeout=1.0, command_timeout=2.0,
                          size=2, statement_cache_size=0)
    svc = await _member(via)
    relay.lose_commit_replies(2)
    task = asyncio.ensure_future(svc.run_expiry(max_sleep=0.5))
    want = (0, {"renewal": 10 * C})

    async def done() -> bool:
        return relay.commits_lost == 2 and (await _ledger(direct))[:2] == want \
            and _book_says(svc) == want and _book_says(svc, "beta") == (0, {"old": 0})
    try:
        deadline = time.monotonic() + 10
        while not await done():
            assert not task.done(), task.exception()
            assert time.monotonic() < deadline, (relay.commits_lost, await _ledger(direct),
                                                 _book_says(svc), _book_says(svc, "beta"))
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)                    # another retry would have written again
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await via.close()
    _, _, sums = await _ledger(direct)
    assert (sums[("old", "expire")], sums[("renewal", "repay")]) == (3 * C, 10 * C)
    assert await done()


async def test_a_give_back_whose_outcome_is_unknown_is_written_once(
        open_pool: PoolFactory, pg_dsn: str, relay: CuttableRelay) -> None:
    """Repayments beyond the debt (10 over) queued for a give-back: the answer to its
    COMMIT is lost. The expiry task retries under the same key, which finds what the
    first attempt wrote: 10 given back once, the book read back equal to the ledger."""
    direct = await open_pool()
    await add_customer(direct, "acme")
    await _grant(direct, "g1", 10 * C, 1)
    await _grant(direct, "g2", 10 * C, 2)
    await _debt(direct, 10 * C)
    await _over_repay(direct)
    via = await open_pool(dsn=via_relay(relay.port, pg_dsn), connect_timeout=1.0, command_timeout=2.0,
                          size=2, statement_cache_size=0)
    svc = await _member(via)
    relay.lose_commit_replies(1)
    assert await svc.give_back_unmatched(await overpaid(via)) == 0     # not confirmed
    task = asyncio.ensure_future(svc.run_expiry(max_sleep=0.5))
    want = (0, {"g1": 0, "g2": 10 * C})
    try:
        deadline = time.monotonic() + 10
        while svc.give_back_pending() or _book_says(svc) != want:
            assert not task.done(), task.exception()
            assert time.monotonic() < deadline, (await _ledger(direct), _book_says(svc))
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await via.close()
    debt, remaining, sums = await _ledger(direct)
    assert (relay.commits_lost, debt, remaining, sums[("g2", "repay")]) == (1, 0, want[1], 0)
    assert svc.give_back_pending() == 0


async def _over_repay(pool: PgPool) -> None:
    """g1 repaid acme's debt of 10 and g2 repaid it again: what two members' books could
    write before repayments were capped by the debt (entered raw: the ledger now refuses)."""
    async with pool.acquire() as c:
        await c.execute("INSERT INTO credit_entries(customer_id, grant_id, kind, amount, at_ms)"
                        " VALUES ('acme', 'g1', 'repay', $1, 0), ('acme', 'g2', 'repay', $1, 1)",
                        10 * C)


async def test_members_starting_together_give_back_an_over_repayment_once(
        tmp_path: Path, upstream: str) -> None:
    """Real member processes: the shared ledger holds 10 repaid twice (a debt of -10, g2
    short of 10 it never owed). Two members start at once; each looks for repayments
    beyond the debt at start-up, and the give-back is capped under the account lock by
    what the ledger still shows over: 10 comes back to g2 once, and both members show it."""
    async with fleet_of(tmp_path, upstream) as fleet:
        pool = PgPool(PoolSettings(dsn=fleet.dsn))
        await pool.open()
        try:
            await _started_together(fleet, pool)
        finally:
            await pool.close()


async def _started_together(fleet: FleetOfMembers, pool: PgPool) -> None:
    await add_customer(pool, "acme")
    await _grant(pool, "g1", 10 * C, 1)
    await _grant(pool, "g2", 10 * C, 2)
    await _debt(pool, 10 * C)
    await _over_repay(pool)
    assert await overpaid(pool) == {"acme": -10 * C}
    members = await fleet.start(["b", "c"])
    debt, remaining, sums = await _ledger(pool)
    assert (debt, remaining) == (0, {"g1": 0, "g2": 10 * C})
    assert sums[("g2", "repay")] == 0 and await overpaid(pool) == {}
    async with pool.acquire() as c:
        back = await c.fetch("SELECT grant_id, amount, request_id FROM credit_entries"
                             " WHERE kind = 'repay' AND amount < 0")
    assert [(r[0], r[1]) for r in back] == [("g2", -10 * C)]
    assert str(back[0][2]).startswith("unmatched:acme:")
    async with aiohttp.ClientSession() as s:
        for m in members:
            view = await admin_call(s, m, "GET", "/admin/customers/acme/grants")
            assert (view["debt"], {g["grant_id"]: g["remaining"] for g in view["grants"]}) \
                == ("0", {"g1": "0", "g2": "10"}), (m.name, view)


async def test_debt_shipped_before_the_customers_first_grant_is_repaid_by_it(
        open_pool: PoolFactory) -> None:
    """A block customer with no credit account yet (never granted) admitted during an
    outage with ``fail_mode: open`` (``LeaseBook._unreachable``): its usage ships later as
    debt (``grant_debits.debit_grants``: no grant covers it). Its first grant then repays
    that debt, as in a single process: the cap under the account lock reads the debt from
    ``credit_accounts.debt``, which must count it. Before the fix the migration-6 trigger
    only updated existing account rows: the debt was in the ledger's entries but not in
    ``credit_accounts.debt`` (0), so the grant repaid nothing, every member's book read a
    debt of 0, and the ledger reloaded entry by entry (``load``) still owed 10."""
    from proxy.store.postgres.shipping import LocalRow, ShipItem, Shipper

    pool = await open_pool()
    async with pool.acquire() as c:         # a customer row, no credit account
        await c.execute("INSERT INTO customers(id, created_at, updated_at) VALUES"
                        " ('acme', 0, 0)")
    await Shipper(pool, "a").ship([LocalRow(1, "r1", NOW * 1000, "acme", "k", "chat", "v1",
                                            200, (ShipItem("api_calls", C, credits=10 * C),))])
    async with pool.acquire() as c:
        assert await c.fetchval("SELECT debt FROM credit_accounts WHERE customer_id='acme'") \
            == 10 * C
    a = await _member(pool)
    assert _book_says(a) == (10 * C, {})
    g, _ = await a.grant("acme", "50", idempotency_key="first")
    debt, remaining, _ = await _ledger(pool)
    assert (debt, remaining) == (0, {g.id: 40 * C})
    assert _book_says(a) == (0, {g.id: 40 * C})
    assert (await PostgresCreditLedger(pool).load()).debts == {"acme": 0}
    async with pool.acquire() as c:     # leases escrow what the grant holds: 40
        row = await c.fetchrow("SELECT balance, settled, escrowed FROM credit_accounts"
                               " WHERE customer_id='acme'")
    assert row["balance"] - row["settled"] - row["escrowed"] == 40 * C
