"""Fleet mode's claw-backs and voids on a real PostgreSQL: the member's book is a view of
the shared ledger, and a refresh pass (``Fleet.refresh_credits``, every
``fleet.ship_interval``) can run between the write's COMMIT and the service's next step (the
pool connection's release is an await). ``CreditService`` reads the customer back after
those writes instead of applying them to the book: applied after a refresh had read them
already, a claw-back was taken twice (a refund emptied the grant, a debt doubled) or raised
after its commit (the grant below zero, the monetary mirror never told), and this member's
next expiry, capped by the short book, left credit on an expired grant for good.

The interleaving is forced: the real ledger, with one real refresh pass right after its
write returns (``RacingLedger``)."""

from __future__ import annotations

import types
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from proxy.credits.book import CreditBook
from proxy.credits.ledger import Entry, GrantState
from proxy.credits.service import CreditService
from proxy.fleet.runtime import Fleet
from proxy.store.postgres.grant_debits import grant_states
from proxy.store.postgres.ledger import PostgresCreditLedger
from proxy.store.postgres.pool import PgPool
from proxy.store.protocols import LedgerEntry, NewGrant
from tests.fleet.conftest import add_customer

C = 1_000_000
NOW = 1_800_000_000


class RacingLedger(PostgresCreditLedger):
    """The real ledger; once a claw-back or an append has committed, one refresh pass runs
    before the caller resumes (the refresh task taking the loop at the connection's
    release)."""

    def __init__(self, pool: PgPool) -> None:
        super().__init__(pool)
        self.after_commit: Callable[[], Awaitable[Any]] | None = None

    async def _raced(self) -> None:
        if self.after_commit is not None:
            await self.after_commit()

    async def claw_back(self, *a: Any, **kw: Any) -> Any:
        out = await super().claw_back(*a, **kw)
        await self._raced()
        return out

    async def append(self, *a: Any, **kw: Any) -> Any:
        out = await super().append(*a, **kw)
        await self._raced()
        return out


async def _member(pool: PgPool) -> tuple[CreditBook, RacingLedger, CreditService, list[str]]:
    """A member's credit wiring as proxy/app.py builds it in fleet mode: the book from
    ``Fleet.credit_book``, ``CreditService.reload`` = ``Fleet.reload_credits``, and the
    refresh pass ``Fleet.refresh_credits`` on the same book."""
    fleet = types.SimpleNamespace(pool=pool, _credit_revs=(-1, -1))
    book = await Fleet.credit_book(fleet)  # type: ignore[arg-type]
    ledger = RacingLedger(pool)
    service = CreditService(None, book, ledger)  # type: ignore[arg-type]
    service.reload = partial(Fleet.reload_credits, fleet, book)  # type: ignore[arg-type]
    taken: list[str] = []
    service.on_taken = taken.append
    ledger.after_commit = partial(Fleet.refresh_credits, fleet, book)  # type: ignore[arg-type]
    return book, ledger, service, taken


async def _shared(pool: PgPool) -> tuple[dict[str, int], int, int]:
    """The shared ledger: each grant's remaining, the debt, the account's balance."""
    [st] = await grant_states(pool, ["acme"])
    async with pool.acquire() as c:
        bal = int(await c.fetchval("SELECT balance FROM credit_accounts WHERE customer_id='acme'"))
    return {g.id: g.remaining for g in st.grants}, st.debt, bal


def _book(book: CreditBook) -> tuple[dict[str, int], int]:
    return {g.id: g.remaining for g in book.grants("acme")}, book.debt("acme")


async def _paid_grant(pool: PgPool, gid: str, amount: int, expires_at: int | None = None) -> None:
    await PostgresCreditLedger(pool).create_grant(NewGrant(
        GrantState(gid, "acme", amount, 50, expires_at, NOW - 100, "stripe"),
        f"k:{gid}", None, (f"ch_{gid}",), 2000))


async def test_a_refund_racing_a_refresh_is_taken_once(pool: PgPool) -> None:
    await add_customer(pool, "acme")
    await _paid_grant(pool, "g1", 100 * C)
    book, _ledger, service, taken = await _member(pool)
    out = await service.claw_back("acme", ["ch_g1"], 1000, "refund:ch_g1", "evt_1")
    assert out[0]["unused_taken"] == "50"
    assert await _shared(pool) == ({"g1": 50 * C}, 0, 50 * C)
    assert _book(book) == ({"g1": 50 * C}, 0)       # (was 0: the refund taken twice)
    assert taken == ["acme"]


async def test_a_full_refund_racing_a_refresh_neither_raises_nor_skips_the_mirror(
        pool: PgPool) -> None:
    await add_customer(pool, "acme")
    await _paid_grant(pool, "g1", 100 * C)
    book, _ledger, service, taken = await _member(pool)
    await service.claw_back("acme", ["ch_g1"], 2000, "refund:ch_g1", "evt_1")
    assert await _shared(pool) == ({"g1": 0}, 0, 0)
    assert _book(book) == ({"g1": 0}, 0)             # (raised: the grant below zero)
    assert taken == ["acme"]                          # the monetary mirror is told


async def test_a_spent_grant_clawed_back_racing_a_refresh_owes_its_debt_once(
        pool: PgPool) -> None:
    await add_customer(pool, "acme")
    await _paid_grant(pool, "g1", 100 * C)
    await PostgresCreditLedger(pool).append(
        [LedgerEntry("acme", Entry("g1", "debit", 100 * C), "r0")])
    book, _ledger, service, _taken = await _member(pool)
    await service.claw_back("acme", ["ch_g1"], 2000, "refund:ch_g1", "evt_1")
    assert (await _shared(pool))[1] == 100 * C
    assert _book(book)[1] == 100 * C                 # (was 200: the debt doubled)


async def test_an_expiry_after_a_racing_claw_back_expires_what_the_grant_holds(
        pool: PgPool) -> None:
    """The permanent case: the expire entry is the lesser of the book's remaining and the
    ledger's, written once per grant; from a book the claw-back had taken twice, it left
    credit on the expired grant, in the balance leases escrow from."""
    await add_customer(pool, "acme")
    far = 4_000_000_000
    await _paid_grant(pool, "g1", 100 * C, expires_at=far)
    book, ledger, service, _taken = await _member(pool)
    await service.claw_back("acme", ["ch_g1"], 500, "refund:ch_g1", "evt_1")   # a quarter
    assert await _shared(pool) == ({"g1": 75 * C}, 0, 75 * C)
    assert _book(book) == ({"g1": 75 * C}, 0)
    ledger.after_commit = None
    await service.expire_due(now=far + 1)
    assert await _shared(pool) == ({"g1": 0}, 0, 0)


async def test_a_void_racing_a_refresh_voids_the_grant_once(pool: PgPool) -> None:
    await add_customer(pool, "acme")
    await _paid_grant(pool, "g1", 100 * C)
    await _paid_grant(pool, "g2", 40 * C)
    book, _ledger, service, _taken = await _member(pool)
    g = await service.void("g1")
    assert g.id == "g1" and g.remaining == 0
    assert await _shared(pool) == ({"g1": 0, "g2": 40 * C}, 0, 40 * C)
    assert _book(book) == ({"g1": 0, "g2": 40 * C}, 0)
