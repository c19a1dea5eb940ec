"""Contract of the ``Customers`` owner (customers and API keys)."""

from __future__ import annotations

import hashlib

import pytest

from proxy.errors import InvalidInput
from tests.store.conftest import Backend


async def test_upsert_creates_updates_and_keeps_unset_fields(backend: Backend) -> None:
    cs = backend.storage.customers
    c, created = await cs.upsert("c1", "cus_1", "block", None)
    assert created and (c.id, c.stripe_customer_id, c.overage, c.status) == (
        "c1", "cus_1", "block", "active")
    c, created = await cs.upsert("c1", None, None, "suspended")
    assert not created and (c.stripe_customer_id, c.overage, c.status) == (
        "cus_1", "block", "suspended")
    again, created = await cs.upsert("c1", None, None, "suspended")
    assert not created and again == c
    assert await cs.get("c1") == c
    assert await cs.get("nope") is None


@pytest.mark.parametrize("args", [("bad id!", None, None, None), ("c", 5, None, None),
                                  ("c", None, "maybe", None), ("c", None, None, "gone")])
async def test_upsert_refuses_bad_input_and_writes_nothing(
        backend: Backend, args: tuple[object, object, object, object]) -> None:
    with pytest.raises(InvalidInput):
        await backend.storage.customers.upsert(*args)
    assert await backend.storage.customers.all() == []


async def test_billing_is_set_in_the_same_upsert(backend: Backend) -> None:
    cs = backend.storage.customers
    c, _ = await cs.upsert("c1", None, None, None, lambda cust: (1_700_000_000, 500))
    assert (c.billing_anchor, c.minimum_commitment) == (1_700_000_000, 500)
    with pytest.raises(InvalidInput):
        await cs.upsert("c2", None, None, None, lambda cust: (None, -1))
    assert await cs.get("c2") is None                       # one transaction: nothing written
    await cs.set_billing("c1", None, 0)
    c2 = await cs.get("c1")
    assert c2 is not None and (c2.billing_anchor, c2.minimum_commitment) == (None, 0)


async def test_listing_and_stripe_lookups(backend: Backend) -> None:
    cs = backend.storage.customers
    for cid, scid in (("b", "cus_x"), ("a", "cus_x"), ("c", None), ("d", "")):
        await cs.upsert(cid, scid, None, None)
    assert [c.id for c in await cs.all()] == ["a", "b", "c", "d"]
    assert await cs.by_stripe_id("cus_x") == ["a", "b"]
    assert await cs.by_stripe_id("cus_none") == []
    assert await cs.stripe_ids() == {"a": "cus_x", "b": "cus_x"}


async def test_change_suspension_is_a_read_modify_write(backend: Backend) -> None:
    cs = backend.storage.customers
    await cs.upsert("c1", None, None, None)
    seen: list[tuple[str, str | None]] = []

    def suspend(status: str, why: str | None) -> tuple[str, str | None] | None:
        seen.append((status, why))
        return None if status == "suspended" else ("suspended", "payment_failed:in_1")

    assert await cs.change_suspension("c1", suspend) is True
    assert await cs.change_suspension("c1", suspend) is False
    assert seen == [("active", None), ("suspended", "payment_failed:in_1")]
    c = await cs.get("c1")
    assert c is not None and c.status == "suspended"
    # an explicit status is the operator's: it clears the automatic reason
    await cs.upsert("c1", None, None, "active")

    def look(status: str, why: str | None) -> None:
        seen.append((status, why))

    assert await cs.change_suspension("c1", look) is False
    assert seen[-1] == ("active", None)
    # an unknown customer starts as ("active", None) and is created when changed
    assert await cs.change_suspension("new", lambda s, w: ("suspended", "subscription_deleted"))
    c = await cs.get("new")
    assert c is not None and c.status == "suspended"


async def test_keys_store_only_a_hash_and_revoke_idempotently(backend: Backend) -> None:
    cs = backend.storage.customers
    with pytest.raises(LookupError):
        await cs.create_key("nobody")
    await cs.upsert("c1", None, None, None)
    made = await cs.create_key("c1", "ci")
    secret = made["key"]
    snap = await cs.snapshot()
    digest = hashlib.sha256(secret.encode()).hexdigest()
    assert list(snap.keys) == [digest]                         # the secret itself is not kept
    entry = snap.keys[digest]
    assert (entry.key_id, entry.customer_id, entry.revoked) == (made["key_id"], "c1", False)
    assert set(snap.customers) == {"c1"}
    (listed,) = await cs.list_keys("c1")
    assert (listed["key_id"], listed["name"], listed["revoked_at"]) == (made["key_id"], "ci", None)
    assert secret not in str(listed)
    assert await cs.revoke_key(made["key_id"]) is True
    assert await cs.revoke_key(made["key_id"]) is False
    with pytest.raises(LookupError):
        await cs.revoke_key("key_nope")
    assert (await cs.snapshot()).keys[digest].revoked
    other = await cs.create_key("c1")
    assert [k["key_id"] for k in await cs.list_keys()] == [made["key_id"], other["key_id"]]
    assert await cs.list_keys("c2") == []


async def test_data_version_moves_when_another_member_commits(backend: Backend) -> None:
    cs = backend.storage.customers
    before = cs.data_version()
    await backend.peer().customers.upsert("c1", None, None, None)
    assert cs.data_version() != before
    assert [c.id for c in (await cs.snapshot()).customers.values()] == ["c1"]
