"""Contract of the ``TrueUps`` owner (minimum-commitment true-ups, decided once)."""

from __future__ import annotations

import asyncio

import pytest

from proxy.store.protocols import TrueUpRecord
from tests.store.conftest import Backend


def _t(cid: str = "c1", start: int = 100, status: str = "sent",
       item: str | None = "ii_1", amount: int = 550, scid: str | None = None) -> TrueUpRecord:
    return TrueUpRecord(cid, start, start + 100, 1000, 1000 - amount, amount, "usd", status,
                        item, 7, scid)


async def test_a_period_is_decided_once(backend: Backend) -> None:
    tu = backend.storage.trueups
    await backend.customer("c1")
    assert not await tu.decided("c1", 100)
    assert await tu.record(_t())
    assert await tu.decided("c1", 100) and not await tu.decided("c1", 200)
    assert not await tu.record(_t(status="none", item=None, amount=0))   # the first stays
    assert await tu.recent("c1") == [_t()]


async def test_concurrent_decisions_record_one(backend: Backend) -> None:
    await backend.customer("c1")
    got = await asyncio.gather(*(s.trueups.record(_t(item=f"ii_{i}"))
                                 for i, s in enumerate([backend.storage, backend.peer()] * 2)))
    assert sum(got) == 1
    assert len(await backend.storage.trueups.recent()) == 1


async def test_recent_is_newest_period_first(backend: Backend) -> None:
    tu = backend.storage.trueups
    await tu.record(_t("c1", 100))
    await tu.record(_t("c2", 300, status="none", item=None, amount=0))
    await tu.record(_t("c1", 200))
    assert [(t.customer_id, t.period_start) for t in await tu.recent()] == [
        ("c2", 300), ("c1", 200), ("c1", 100)]
    assert [t.period_start for t in await tu.recent("c1", limit=1)] == [200]
    with pytest.raises(ValueError):
        await tu.record(_t("c3", 100, status="pending"))
    with pytest.raises(ValueError):
        await tu.record(_t("c3", 100, status="sending", item=None))     # names no customer


async def test_a_sending_true_up_keeps_its_parameters_until_marked_sent(
        backend: Backend) -> None:
    tu = backend.storage.trueups
    frozen = _t(status="sending", item=None, scid="cus_1")
    assert await tu.record(frozen)
    assert await tu.decided("c1", 100)          # decided: nothing recomputes it
    # another member's later decision (other amount) does not replace the frozen one
    assert not await tu.record(_t(status="sending", item=None, amount=300, scid="cus_1"))
    assert await tu.record(_t("c2", 50, status="sending", item=None, amount=10, scid="cus_2"))
    assert await tu.sending() == [_t("c2", 50, status="sending", item=None, amount=10,
                                     scid="cus_2"), frozen]
    assert not await tu.mark_sent("c1", 999, "ii_x")            # no such row
    got = await asyncio.gather(tu.mark_sent("c1", 100, "ii_1"),
                               backend.peer().trueups.mark_sent("c1", 100, "ii_1"))
    assert sorted(got) == [False, True]
    assert not await tu.mark_sent("c1", 100, "ii_other")        # sent stays as it was
    assert [t.customer_id for t in await tu.sending()] == ["c2"]
    assert await tu.recent("c1") == [_t(scid="cus_1")]
