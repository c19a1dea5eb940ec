"""Shipping journals to the shared ledger on a real PostgreSQL: idempotent by (member, seq),
exact totals, settlement only from rows really inserted, watermark after commit."""

from __future__ import annotations

import asyncpg
import pytest

from proxy.fleet.sizing import LeasePolicy
from proxy.store.postgres import leases
from proxy.store.postgres.leases import LeaseStore
from proxy.store.postgres.pool import PgPool
from proxy.store.postgres.shipping import LocalRow, ShipItem, Shipper
from tests.fleet.conftest import add_customer
from tests.fleet.member import MemoryJournal

C = 1_000_000


def _rows(n: int, customer: str = "acme") -> list[LocalRow]:
    return [LocalRow(i, f"r{i}", 1000 + i, customer, "k", "chat", "v1", 200,
                     (ShipItem("llm_tokens", 7 * C, credits=C, billable=7 * C),
                      ShipItem("api_calls", C)))
            for i in range(1, n + 1)]


async def _totals(pool: PgPool) -> tuple[int, int, int]:
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT count(*), coalesce(sum(quantity), 0), "
                                  "coalesce(sum(credits), 0) FROM usage_ledger")
    return int(row[0]), int(row[1]), int(row[2])


async def test_a_resend_after_a_crash_is_a_no_op(pool: PgPool) -> None:
    await add_customer(pool, "acme", 100 * C)
    grant = await LeaseStore(pool, "m1", LeasePolicy(floor=20 * C)).grant("acme", 0, C)
    assert grant.amount == 20 * C
    journal = MemoryJournal()
    journal.rows = _rows(120)
    shipper = Shipper(pool, "m1", batch_size=50)
    assert await shipper.ship_pending(journal) == 120
    assert shipper.watermark == 120
    assert await _totals(pool) == (240, 120 * 8 * C, 120 * C)
    # the process died after the commits but before it could persist its watermark:
    # a new shipper starting from 0 sends everything again
    again = Shipper(pool, "m1", batch_size=50)
    first = await again.ship(journal.rows[:50])
    assert (first.rows, first.inserted) == (50, 0)
    assert await again.ship_pending(journal) == 70
    assert await _totals(pool) == (240, 120 * 8 * C, 120 * C)
    async with pool.acquire() as conn:
        acct = await leases.account(conn, "acme")
        lease = await conn.fetchrow("SELECT granted, reported FROM credit_leases")
        assert await conn.fetchval("SELECT last_shipped_seq FROM members WHERE id = 'm1'") == 120
    # 20 credits of lease covered, 100 settled as debt beyond it; settled once, not twice
    assert (acct.settled, acct.escrowed) == (120 * C, 0)
    assert (lease["granted"], lease["reported"]) == (20 * C, 20 * C)
    assert await Shipper(pool, "m1").load_watermark() == 120


async def test_members_own_their_sequences(pool: PgPool) -> None:
    await add_customer(pool, "acme", 0)
    rows = _rows(3)
    for m in ("m1", "m2"):
        assert (await Shipper(pool, m).ship(rows)).inserted == 6
    assert await _totals(pool) == (12, 2 * 3 * 8 * C, 6 * C)


async def test_a_failed_batch_does_not_move_the_watermark(pool: PgPool) -> None:
    await add_customer(pool, "acme", 0)
    shipper = Shipper(pool, "m1")
    bad = [*_rows(2), LocalRow(3, "r3\x00", 0, "acme", "k", "chat", "v1", 200,
                                (ShipItem("x", 1),))]   # PostgreSQL text refuses NUL
    with pytest.raises(asyncpg.PostgresError):
        await shipper.ship(bad)
    assert shipper.watermark == 0
    assert await _totals(pool) == (0, 0, 0)
    assert (await shipper.ship(_rows(2))).inserted == 4
    assert shipper.watermark == 2


async def test_every_text_and_number_arrives_exactly_as_journaled(pool: PgPool) -> None:
    """The batch travels as one JSON parameter: quotes, backslashes, JSON escapes, control
    characters, non-ASCII and the 64-bit integer range come back unchanged."""
    await add_customer(pool, "acme", 0)
    nasty = ['"quoted"', "back\\slash", "\\u0041 not an escape", "tab\there\nnewline\x01\x1f",
             "ünï €", "emoji \U0001F600", "'; DROP TABLE members; --", "", " "]
    big = 2**63 - 1
    rows = [LocalRow(n + 1, f"req-{t}", big // 2 + n, "acme", t, f"rule {t}", t, 200 + n,
                     (ShipItem(f"m{t}", big, credits=0, billable=big, flags=t),),
                     method=t, path=f"/p/{t}")
            for n, t in enumerate(nasty)]
    assert (await Shipper(pool, "m1").ship(rows)).inserted == len(nasty)
    async with pool.acquire() as conn:
        got = await conn.fetch(
            "SELECT seq, item, request_id, at_ms, key_id, rule, rules_version, status, method,"
            " path, meter, quantity, credits, billable, flags FROM usage_ledger ORDER BY seq")
    assert [tuple(r) for r in got] == [
        (r.seq, 0, r.request_id, r.at_ms, r.key_id, r.rule, r.rules_version, r.status,
         r.method, r.path, "m" + r.key_id, big, 0, big, r.key_id) for r in rows]
