"""The ``Customers`` owner on PostgreSQL: ``customers`` and ``api_keys``.

Input is validated exactly as on SQLite (``proxy.store.keys``: ``valid_id``, the allowed
values). Concurrency between members: a customer row is read ``FOR UPDATE`` before it is
changed, and creation is ``INSERT .. ON CONFLICT DO NOTHING`` followed by that locked read,
so two members upserting one new id both succeed, one of them reporting ``created``.

``data_version`` must answer synchronously with no I/O, which a server cannot do exactly,
so it has two modes:

- unwatched (the default): a new value on every call. A caller that reloads its key cache
  when the value changes (``proxy.app._refresh_keys``) reloads on every poll: always
  correct, one ``snapshot`` per poll interval.
- watched (``PostgresStorage.watch``, one LISTEN connection): a counter that moves on every
  write through this owner and on every notification of a key change (``meterproxy_keys``,
  sent by the ``api_keys`` trigger) or customer change (``meterproxy_customers``) committed
  by any member. Cheap; a change shows once its notification arrives (normally before the
  writer's own call returns), and a lost listener turns it back to unwatched.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any, Literal

from proxy.store.keys import (
    KEEP,
    Customer,
    KeyEntry,
    billing_values,
    credit_mode_value,
    currency_code,
    hash_key,
    valid_choice,
    valid_id,
)
from proxy.store.postgres.conn import Conn
from proxy.store.postgres.pool import PgPool, retried
from proxy.store.protocols import KeySnapshot
from proxy.timeutil import rfc3339

_COLS = ("id, stripe_customer_id, status, overage, billing_anchor, minimum_commitment,"
         " created_at, currency, credit_mode")


async def _get(c: Conn, cid: str) -> Customer | None:
    row = await c.fetchrow(f"SELECT {_COLS} FROM customers WHERE id=$1", cid)
    return None if row is None else Customer(*row)


async def _upsert(c: Conn, cid: object, stripe_customer_id: object, overage: object,
                  status: object) -> tuple[Customer, bool]:
    cid = valid_id(cid, "id")
    scid = valid_choice(stripe_customer_id, "stripe_customer_id", None)
    ov = valid_choice(overage, "overage", ("bill", "block"))
    st = valid_choice(status, "status", ("active", "suspended"))
    now = int(time.time())
    created = await c.fetchval(
        "INSERT INTO customers(id, stripe_customer_id, status, overage, created_at, updated_at)"
        " VALUES ($1,$2,$3,$4,$5,$5) ON CONFLICT (id) DO NOTHING RETURNING id",
        cid, scid, st or "active", ov or "bill", now)
    if created is not None:
        got = await _get(c, cid)
        assert got is not None
        return got, True
    row = await c.fetchrow("SELECT stripe_customer_id, status, overage FROM customers"
                           " WHERE id=$1 FOR UPDATE", cid)
    assert row is not None
    # an explicit status is the operator's: no webhook may lift it
    await c.execute(
        "UPDATE customers SET stripe_customer_id=$2, status=$3, overage=$4, updated_at=$5,"
        " suspended_for = CASE WHEN $6 THEN NULL ELSE suspended_for END WHERE id=$1",
        cid, scid if scid is not None else row[0], st or row[1], ov or row[2], now,
        st is not None)
    got = await _get(c, cid)
    assert got is not None
    return got, False


async def _set_billing(c: Conn, cid: str, anchor: object, minimum: object) -> None:
    a, m = billing_values(anchor, minimum)
    await c.execute("UPDATE customers SET billing_anchor=$2, minimum_commitment=$3 WHERE id=$1",
                    cid, a, m)


async def _update_if_changed(c: Conn, cid: str, column: Literal["currency", "credit_mode"],
                             value: str | None) -> bool:
    return await c.fetchval(f"UPDATE customers SET {column}=$2 WHERE id=$1 AND"
                            f" {column} IS DISTINCT FROM $2 RETURNING 1", cid, value) is not None


class PostgresCustomers:
    def __init__(self, pool: PgPool) -> None:
        self.pool = pool
        self._version = 0
        self.watched = False

    def changed(self) -> None:
        """A change was committed (here, or seen by a notification)."""
        self._version += 1

    @retried
    async def upsert(self, cid: object, stripe_customer_id: object, overage: object,
                     status: object,
                     billing: Callable[[Customer], tuple[object, object]] | None = None,
                     *, currency: object = None, credit_mode: object = KEEP
                     ) -> tuple[Customer, bool]:
        code = None if currency is None else currency_code(currency)
        keep = credit_mode is KEEP
        mode = None if keep else credit_mode_value(credit_mode)
        async with self.pool.acquire() as c, c.transaction():
            cust, created = await _upsert(c, cid, stripe_customer_id, overage, status)
            if billing is not None:
                await _set_billing(c, cust.id, *billing(cust))
            if code is not None:
                await _update_if_changed(c, cust.id, "currency", code)
            if not keep:
                await _update_if_changed(c, cust.id, "credit_mode", mode)
            if billing is not None or code is not None or not keep:
                cust = await _get(c, cust.id) or cust
        self.changed()
        return cust, created

    @retried
    async def set_billing(self, cid: str, anchor: object, minimum: object) -> None:
        async with self.pool.acquire() as c:
            await _set_billing(c, cid, anchor, minimum)
        self.changed()

    async def set_currency(self, cid: str, currency: object) -> bool:
        return await self._set_column(cid, "currency", currency_code(currency))

    async def set_credit_mode(self, cid: str, mode: object) -> bool:
        return await self._set_column(cid, "credit_mode", credit_mode_value(mode))

    @retried
    async def _set_column(self, cid: str, column: Literal["currency", "credit_mode"],
                          value: str | None) -> bool:
        """Set one of the customer's settings; True when it changed."""
        async with self.pool.acquire() as c:
            done = await _update_if_changed(c, cid, column, value)
        if done:
            self.changed()
        return done

    @retried
    async def follow_anchor(self, cid: str, anchor: int, event_at: int) -> bool:
        # one statement: the row lock orders concurrent calls, and the second re-checks the
        # condition on the first's committed row (READ COMMITTED re-evaluation)
        async with self.pool.acquire() as c:
            done = await c.fetchval(
                "UPDATE customers SET billing_anchor=$2, anchor_event_at=$3 WHERE id=$1"
                " AND (anchor_event_at IS NULL OR anchor_event_at <= $3) RETURNING 1",
                cid, int(anchor), int(event_at))
        if done is not None:
            self.changed()
        return done is not None

    async def get(self, cid: str) -> Customer | None:
        async with self.pool.acquire() as c:
            return await _get(c, cid)

    async def all(self) -> list[Customer]:
        async with self.pool.acquire() as c:
            return [Customer(*r) for r in await c.fetch(
                f"SELECT {_COLS} FROM customers ORDER BY id")]

    async def by_stripe_id(self, stripe_customer_id: str) -> list[str]:
        async with self.pool.acquire() as c:
            return [str(r[0]) for r in await c.fetch(
                "SELECT id FROM customers WHERE stripe_customer_id=$1 ORDER BY id",
                stripe_customer_id)]

    async def stripe_ids(self) -> dict[str, str]:
        async with self.pool.acquire() as c:
            return {str(r[0]): str(r[1]) for r in await c.fetch(
                "SELECT id, stripe_customer_id FROM customers WHERE stripe_customer_id IS NOT"
                " NULL AND stripe_customer_id != ''")}

    @retried
    async def change_suspension(self, cid: str,
                                decide: Callable[[str, str | None],
                                                 tuple[str, str | None] | None]) -> bool:
        async with self.pool.acquire() as c, c.transaction():
            while True:
                row = await c.fetchrow("SELECT status, suspended_for FROM customers WHERE id=$1"
                                       " FOR UPDATE", cid)
                status, why = (row[0], row[1]) if row is not None else ("active", None)
                new = decide(status, why)
                if new is None or (row is not None and new == (status, why)):
                    return False
                if row is None:
                    now = int(time.time())
                    made = await c.fetchval(
                        "INSERT INTO customers(id, status, suspended_for, created_at, updated_at)"
                        " VALUES ($1,$2,$3,$4,$4) ON CONFLICT (id) DO NOTHING RETURNING id",
                        valid_id(cid, "id"), valid_choice(new[0], "status", ("active", "suspended")),
                        new[1], now)
                    if made is None:
                        continue        # another member created it meanwhile: decide again
                else:
                    await _upsert(c, cid, None, None, new[0])
                    await c.execute("UPDATE customers SET suspended_for=$2 WHERE id=$1",
                                    cid, new[1])
                break
        self.changed()
        return True

    @retried
    async def create_key(self, customer_id: str, name: str = "") -> dict[str, Any]:
        key_id = "key_" + secrets.token_hex(8)
        raw = "mp_" + secrets.token_urlsafe(32)
        async with self.pool.acquire() as c, c.transaction():
            if await c.fetchval("SELECT 1 FROM customers WHERE id=$1 FOR KEY SHARE",
                                customer_id) is None:
                raise LookupError(f"no customer {customer_id!r}")
            await c.execute("INSERT INTO api_keys(key_id, customer_id, name, hash, prefix,"
                            " created_at) VALUES ($1,$2,$3,$4,$5,$6)",
                            key_id, customer_id, name, hash_key(raw), raw[:7], int(time.time()))
        self.changed()
        return {"key_id": key_id, "key": raw, "customer_id": customer_id, "name": name}

    @retried
    async def revoke_key(self, key_id: str) -> bool:
        async with self.pool.acquire() as c, c.transaction():
            done = await c.fetchval("UPDATE api_keys SET revoked_at=$2 WHERE key_id=$1 AND"
                                    " revoked_at IS NULL RETURNING 1", key_id, int(time.time()))
            if done is not None:
                self.changed()
                return True
            if await c.fetchval("SELECT 1 FROM api_keys WHERE key_id=$1", key_id) is None:
                raise LookupError(f"no key {key_id!r}")
            return False

    async def list_keys(self, customer_id: str | None = None) -> list[dict[str, Any]]:
        async with self.pool.acquire() as c:
            rows = await c.fetch(
                "SELECT key_id, customer_id, name, prefix, created_at, revoked_at FROM api_keys"
                " WHERE $1::text IS NULL OR customer_id=$1 ORDER BY created_at, ord",
                customer_id)
        return [{"key_id": r[0], "customer_id": r[1], "name": r[2], "prefix": r[3],
                 "created_at": rfc3339(r[4]),
                 "revoked_at": rfc3339(r[5]) if r[5] is not None else None} for r in rows]

    async def snapshot(self) -> KeySnapshot:
        async with self.pool.acquire() as c, c.transaction(isolation="repeatable_read",
                                                          readonly=True):
            keys = {r[2]: KeyEntry(r[0], r[1], r[3] is not None) for r in await c.fetch(
                "SELECT key_id, customer_id, hash, revoked_at FROM api_keys")}
            customers = {r[0]: Customer(*r) for r in await c.fetch(
                f"SELECT {_COLS} FROM customers ORDER BY id")}
        return KeySnapshot(keys, customers)

    def data_version(self) -> int:
        if not self.watched:
            self._version += 1
        return self._version
