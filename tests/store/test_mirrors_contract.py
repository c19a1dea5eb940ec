"""Contract of the ``GrantMirrors`` owner (each local grant's Stripe credit grant mirror,
monetary credits mode): a durable intent per grant, retried until Stripe holds it."""

from __future__ import annotations

import asyncio

import pytest

from tests.store.conftest import Backend


async def test_a_wanted_grant_is_pending_until_stripe_holds_it(backend: Backend) -> None:
    m = backend.storage.mirrors
    assert await m.want([("grt_1", "c1", "live"), ("grt_2", "c1", "live")], at=10) == 2
    assert await m.want([("grt_1", "c1", "live")], at=11) == 0          # unchanged: no-op
    assert [r.grant_id for r in await m.due(0)] == ["grt_1", "grt_2"]
    await m.progress("grt_1", "live", "credgr_1", at=12)
    [r] = await m.rows(customer_id="c1", status="mirrored")
    assert (r.grant_id, r.done, r.stripe_grant_id, r.status) == ("grt_1", "live", "credgr_1",
                                                                 "mirrored")
    assert [r.grant_id for r in await m.due(100)] == ["grt_2"]
    assert await backend.peer().mirrors.known() == {"grt_1": "live", "grt_2": "live"}


async def test_a_void_reopens_a_mirrored_row_and_is_final(backend: Backend) -> None:
    m = backend.storage.mirrors
    await m.want([("grt_1", "c1", "live")], at=10)
    await m.progress("grt_1", "live", "credgr_1", at=11)
    assert await m.want([("grt_1", "c1", "void")], at=12) == 1
    [r] = await m.due(0)
    assert (r.want, r.done, r.status, r.stripe_grant_id) == ("void", "live", "pending",
                                                             "credgr_1")
    await m.progress("grt_1", "void", None, at=13)
    [r] = await m.rows()
    assert (r.done, r.status, r.stripe_grant_id) == ("void", "mirrored", "credgr_1")
    assert await m.want([("grt_1", "c1", "live")], at=14) == 0         # never back to live
    with pytest.raises(ValueError):
        await m.want([("grt_9", "c1", "expired")], at=15)


async def test_failures_back_off_then_dead_letter_then_requeue(backend: Backend) -> None:
    m = backend.storage.mirrors
    await m.want([("grt_1", "c1", "live"), ("grt_2", "c2", "live")], at=10)
    await m.fail("grt_1", "stripe down", retry_at=50.0, at=11)
    assert [r.grant_id for r in await m.due(20)] == ["grt_2"]
    [r] = [r for r in await m.due(60) if r.grant_id == "grt_1"]
    assert (r.attempts, r.last_error) == (1, "stripe down")
    await m.fail("grt_1", "rejected", retry_at=None, at=12)
    [dead] = await m.rows(status="dead")
    assert (dead.grant_id, dead.attempts, dead.last_error) == ("grt_1", 2, "rejected")
    assert [r.grant_id for r in await m.due(1e12)] == ["grt_2"]
    assert await m.requeue(["grt_2"], at=13) == 0                      # not dead
    assert await backend.peer().mirrors.requeue(["grt_1"], at=13) == 1
    [r] = [r for r in await m.due(0) if r.grant_id == "grt_1"]
    assert (r.status, r.attempts) == ("pending", 0)
    await m.fail("grt_2", "x", retry_at=None, at=14)
    await m.fail("grt_1", "x", retry_at=None, at=14)
    assert await m.requeue(None, at=15) == 2


async def test_concurrent_wants_insert_one_row(backend: Backend) -> None:
    got = await asyncio.gather(*(s.mirrors.want([("grt_1", "c1", "live")], at=10)
                                 for s in [backend.storage, backend.peer()] * 2))
    assert sum(got) == 1
    assert len(await backend.storage.mirrors.rows()) == 1


async def test_finalized_period_ends_are_kept_and_never_lowered(backend: Backend) -> None:
    """``finalize``: per customer, the latest usage-period end of an invoice Stripe
    finalized, durable and seen by another member; an earlier end never lowers it."""
    m = backend.storage.mirrors
    assert await m.finalized() == {}
    assert await m.finalize("c1", 1000, at=10)
    assert not await m.finalize("c1", 1000, at=11)                       # unchanged
    assert not await backend.peer().mirrors.finalize("c1", 900, at=12)   # never lowered
    assert await m.finalize("c2", 500, at=13)
    assert await m.finalize("c1", 2000, at=14)
    assert await backend.peer().mirrors.finalized() == {"c1": 2000, "c2": 500}
