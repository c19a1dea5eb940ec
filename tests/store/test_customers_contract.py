"""Contract of the ``Customers`` owner (customers and API keys)."""

from __future__ import annotations

import hashlib
import time

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


async def test_follow_anchor_never_goes_back_to_an_older_event(backend: Backend) -> None:
    cu = backend.storage.customers
    await backend.customer("c1")
    assert await cu.follow_anchor("c1", 5000, event_at=200)
    assert not await cu.follow_anchor("c1", 4000, event_at=100)     # an older event
    got = await cu.get("c1")
    assert got is not None and got.billing_anchor == 5000
    assert await backend.peer().customers.follow_anchor("c1", 6000, event_at=200)  # a tie
    got = await cu.get("c1")
    assert got is not None and got.billing_anchor == 6000
    assert not await cu.follow_anchor("nobody", 1, event_at=1)
    assert await cu.get("nobody") is None


async def test_customers_carry_their_creation_time(backend: Backend) -> None:
    """``Customer.created_at`` (unix seconds): the commitment true-up counts whole periods
    only, from it."""
    before = int(time.time())
    await backend.customer("c1")
    got = await backend.storage.customers.get("c1")
    assert got is not None and before <= got.created_at <= int(time.time()) + 1
    [listed] = await backend.storage.customers.all()
    assert listed.created_at == got.created_at
    await backend.storage.customers.upsert("c1", None, "block", None)   # an update keeps it
    again = await backend.storage.customers.get("c1")
    assert again is not None and again.created_at == got.created_at


async def test_set_currency_is_the_customer_s_currency_everywhere(backend: Backend) -> None:
    """``Customer.currency``: the currency a customer is charged in (a price's
    ``currency_options``), stored lower case, in get/all/snapshot, seen by another member."""
    cu = backend.storage.customers
    await backend.customer("c1")
    got = await cu.get("c1")
    assert got is not None and got.currency is None
    assert await cu.set_currency("c1", "EUR")
    assert not await backend.peer().customers.set_currency("c1", "eur")   # unchanged
    for c in (await cu.get("c1"), (await cu.all())[0],
              (await backend.peer().customers.snapshot()).customers["c1"]):
        assert c is not None and c.currency == "eur"
    assert (await cu.get("c1")).to_json()["currency"] == "eur"  # type: ignore[union-attr]
    await cu.upsert("c1", None, "block", None)                # an update keeps it
    again = await cu.get("c1")
    assert again is not None and again.currency == "eur"
    with pytest.raises(InvalidInput, match="three-letter"):
        await cu.set_currency("c1", "euro")
    assert not await cu.set_currency("nobody", "usd")
    assert await cu.get("nobody") is None


async def test_upsert_sets_the_currency_in_the_same_transaction(backend: Backend) -> None:
    """``upsert(..., currency=)``: a customer is created (or updated) with its currency in one
    transaction; a bad currency writes nothing, not even the customer."""
    cu = backend.storage.customers
    cust, created = await cu.upsert("c1", None, None, None, currency="EUR")
    assert created and cust.currency == "eur"
    seen = await backend.peer().customers.get("c1")
    assert seen is not None and seen.currency == "eur"
    cust, created = await cu.upsert("c1", None, "block", None, currency="usd",
                                    billing=lambda c: (1_700_000_000, 7))
    assert not created and (cust.currency, cust.overage, cust.minimum_commitment) == (
        "usd", "block", 7)
    cust, _ = await cu.upsert("c1", None, None, None)              # None keeps it
    assert cust.currency == "usd"
    with pytest.raises(InvalidInput, match="three-letter"):
        await cu.upsert("c2", None, None, None, currency="euro")
    assert await cu.get("c2") is None
    with pytest.raises(InvalidInput, match="three-letter"):
        await cu.upsert("c1", None, None, "suspended", currency="euro")
    got = await cu.get("c1")
    assert got is not None and (got.status, got.currency) == ("active", "usd")


async def test_upsert_sets_the_credit_mode_in_the_same_transaction(backend: Backend) -> None:
    """``upsert(..., credit_mode=)``: set with the customer in one transaction (None is the
    configured default; ``KEEP``, the default, keeps it); a bad mode, or a ``billing``
    callback that refuses, writes nothing, not even the customer."""
    from proxy.store.keys import KEEP

    cu = backend.storage.customers
    cust, created = await cu.upsert("c1", None, None, None, credit_mode="monetary")
    assert created and cust.credit_mode == "monetary"
    seen = await backend.peer().customers.get("c1")
    assert seen is not None and seen.credit_mode == "monetary"
    cust, _ = await cu.upsert("c1", None, "block", None)               # KEEP
    assert (cust.credit_mode, cust.overage) == ("monetary", "block")
    cust, _ = await cu.upsert("c1", None, None, None, credit_mode=KEEP)
    assert cust.credit_mode == "monetary"
    cust, _ = await cu.upsert("c1", None, None, None, credit_mode=None)
    assert cust.credit_mode is None
    with pytest.raises(InvalidInput, match="credit_mode"):
        await cu.upsert("c2", None, None, None, credit_mode="cash")
    assert await cu.get("c2") is None

    def refuse(c: object) -> tuple[object, object]:
        raise InvalidInput("refused")

    with pytest.raises(InvalidInput, match="refused"):
        await cu.upsert("c1", None, None, "suspended", refuse, credit_mode="units")
    with pytest.raises(InvalidInput, match="refused"):
        await cu.upsert("c3", None, None, None, refuse, credit_mode="units")
    got = await cu.get("c1")
    assert got is not None and (got.status, got.credit_mode) == ("active", None)
    assert await cu.get("c3") is None


async def test_set_credit_mode_is_the_customer_s_mode_everywhere(backend: Backend) -> None:
    """``Customer.credit_mode``: units, monetary, or None (the configured default)."""
    cu = backend.storage.customers
    await backend.customer("c1")
    got = await cu.get("c1")
    assert got is not None and got.credit_mode is None
    assert await cu.set_credit_mode("c1", "monetary")
    assert not await backend.peer().customers.set_credit_mode("c1", "monetary")   # unchanged
    for c in (await cu.get("c1"), (await cu.all())[0],
              (await backend.peer().customers.snapshot()).customers["c1"]):
        assert c is not None and c.credit_mode == "monetary"
    assert (await cu.get("c1")).to_json()["credit_mode"] == "monetary"  # type: ignore[union-attr]
    await cu.upsert("c1", None, "block", None)                # an update keeps it
    assert (await cu.get("c1")).credit_mode == "monetary"  # type: ignore[union-attr]
    with pytest.raises(InvalidInput, match="credit_mode"):
        await cu.set_credit_mode("c1", "money")
    assert await cu.set_credit_mode("c1", None)
    assert (await cu.get("c1")).credit_mode is None  # type: ignore[union-attr]
    assert not await cu.set_credit_mode("nobody", "units")
