"""Customers and API keys: the SQLite owner of both tables, plus the in-memory lookup cache.

Invariants
- A key's secret exists only in the response that created it; the database keeps the
  SHA-256 of it (keys are 32 random bytes, so a fast hash is the right hash) and a short
  display prefix.
- The hot path never queries SQLite: ``KeyCache.lookup`` is a dict lookup. The cache is
  replaced whole (``replace()`` with ``Customers.snapshot()``) after every admin write in
  this process and whenever another process (the CLI) changes the database
  (``Customers.data_version``, SQLite's ``PRAGMA data_version``).
- ``SqliteCustomers`` is the ``Customers`` owner (``proxy.store.protocols``): the only
  writer of ``customers`` and ``api_keys``.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from proxy.store.access import Writer
    from proxy.store.protocols import KeySnapshot

from proxy.errors import InvalidInput

_ID = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Customer:
    id: str
    stripe_customer_id: str | None
    status: str
    overage: str
    billing_anchor: int | None = None      # unix seconds; None = the 1st of the month, UTC
    minimum_commitment: int = 0            # minor units of the price currency per period
    created_at: int = field(default=0, compare=False)   # unix seconds (whole periods only)
    # the currency it is charged in (Stripe's customer currency: a subscription's), which
    # picks a price's ``currency_options``; None = each price's own currency
    currency: str | None = None
    # the credits mode chosen for this customer (``units`` or ``monetary``, docs/credits.md);
    # None = the configured default (``credits.mode``)
    credit_mode: str | None = None

    def to_json(self) -> dict[str, Any]:
        from proxy.timeutil import rfc3339

        return {"id": self.id, "stripe_customer_id": self.stripe_customer_id,
                "status": self.status, "overage": self.overage,
                "billing_anchor": rfc3339(self.billing_anchor)
                if self.billing_anchor is not None else None,
                "minimum_commitment": self.minimum_commitment, "currency": self.currency,
                "credit_mode": self.credit_mode}


@dataclass(frozen=True, slots=True)
class KeyEntry:
    key_id: str
    customer_id: str
    revoked: bool


def currency_code(value: object) -> str:
    """A three-letter ISO currency code, lower case (Stripe's form)."""
    if not isinstance(value, str) or len(value.strip()) != 3 or not value.strip().isalpha():
        raise InvalidInput("currency must be a three-letter ISO code like usd")
    return value.strip().lower()


def valid_id(value: object, what: str) -> str:
    if not isinstance(value, str) or not _ID.match(value):
        raise InvalidInput(f"{what} must be 1-128 characters of letters, digits and _.:@-")
    return value


def valid_choice(value: object, what: str, allowed: tuple[str, ...] | None) -> str | None:
    """``value`` if it is None, or a string (one of ``allowed`` when given); else InvalidInput."""
    if value is None:
        return None
    if not isinstance(value, str) or (allowed is not None and value not in allowed):
        options = " or ".join(repr(a) for a in allowed) if allowed else "a string"
        raise InvalidInput(f"{what} must be {options}")
    return value


_COLS = ("id, stripe_customer_id, status, overage, billing_anchor, minimum_commitment,"
         " created_at, currency, credit_mode")
CREDIT_MODES = ("units", "monetary")


class _Keep:
    """``Customers.upsert``'s ``credit_mode`` when the request names none (None is a value
    there: the configured default)."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP: Any = _Keep()


def credit_mode_value(value: object) -> str | None:
    """A customer's credits mode: ``units``, ``monetary`` or None (the configured default)."""
    if value is None:
        return None
    if value not in CREDIT_MODES:
        raise InvalidInput("credit_mode must be 'units', 'monetary' or null (the configured"
                           " default, credits.mode)")
    return str(value)


def billing_values(anchor: object, minimum: object) -> tuple[int | None, int]:
    """Pure: the validated (billing cycle anchor: unix seconds or None, minimum commitment:
    minor units), for every backend's ``Customers.set_billing``."""
    if anchor is not None and (isinstance(anchor, bool) or not isinstance(anchor, int)):
        raise InvalidInput("billing_anchor must be a time")
    if isinstance(minimum, bool) or not isinstance(minimum, int) or minimum < 0:
        raise InvalidInput("minimum_commitment must be a non-negative integer of minor units")
    return anchor, minimum


def set_billing(conn: sqlite3.Connection, cid: str, anchor: object, minimum: object) -> None:
    """Billing cycle anchor (unix seconds or None) and minimum commitment (minor units)."""
    anchor, minimum = billing_values(anchor, minimum)
    conn.execute("UPDATE customers SET billing_anchor=?, minimum_commitment=? WHERE id=?",
                 (anchor, minimum, cid))


def upsert_customer(conn: sqlite3.Connection, cid: object, stripe_customer_id: object,
                    overage: object, status: object) -> tuple[Customer, bool]:
    """Create or update; returns (customer, created). Arguments come straight from JSON."""
    cid = valid_id(cid, "id")
    stripe_customer_id = valid_choice(stripe_customer_id, "stripe_customer_id", None)
    overage = valid_choice(overage, "overage", ("bill", "block"))
    status = valid_choice(status, "status", ("active", "suspended"))
    now = int(time.time())
    row = conn.execute("SELECT stripe_customer_id, status, overage FROM customers WHERE id=?",
                       (cid,)).fetchone()
    if row is None:
        conn.execute("INSERT INTO customers(id, stripe_customer_id, status, overage, created_at,"
                     " updated_at) VALUES (?,?,?,?,?,?)",
                     (cid, stripe_customer_id, status or "active", overage or "bill", now, now))
        return get_customer(conn, cid) or Customer(cid, None, "active", "bill"), True
    scid = stripe_customer_id if stripe_customer_id is not None else row[0]
    st = status or row[1]
    ov = overage or row[2]
    conn.execute("UPDATE customers SET stripe_customer_id=?, status=?, overage=?, updated_at=?"
                 " WHERE id=?", (scid, st, ov, now, cid))
    if status is not None:    # an explicit status is the operator's: no webhook may lift it
        conn.execute("UPDATE customers SET suspended_for=NULL WHERE id=?", (cid,))
    return get_customer(conn, cid) or Customer(cid, scid, st, ov), False


def get_customer(conn: sqlite3.Connection, cid: str) -> Customer | None:
    row = conn.execute(f"SELECT {_COLS} FROM customers WHERE id=?", (cid,)).fetchone()
    return Customer(*row) if row else None


def list_customers(conn: sqlite3.Connection) -> list[Customer]:
    return [Customer(*r) for r in conn.execute(f"SELECT {_COLS} FROM customers ORDER BY id")]


def create_key(conn: sqlite3.Connection, customer_id: str, name: str = "") -> dict[str, Any]:
    """Mint a key. The returned ``key`` is the only copy of the secret that will ever exist."""
    if get_customer(conn, customer_id) is None:
        raise LookupError(f"no customer {customer_id!r}")
    key_id = "key_" + secrets.token_hex(8)
    raw = "mp_" + secrets.token_urlsafe(32)
    conn.execute("INSERT INTO api_keys(key_id, customer_id, name, hash, prefix, created_at)"
                 " VALUES (?,?,?,?,?,?)",
                 (key_id, customer_id, name, hash_key(raw), raw[:7], int(time.time())))
    return {"key_id": key_id, "key": raw, "customer_id": customer_id, "name": name}


def revoke_key(conn: sqlite3.Connection, key_id: str) -> bool:
    cur = conn.execute("UPDATE api_keys SET revoked_at=? WHERE key_id=? AND revoked_at IS NULL",
                       (int(time.time()), key_id))
    if cur.rowcount:
        return True
    if conn.execute("SELECT 1 FROM api_keys WHERE key_id=?", (key_id,)).fetchone() is None:
        raise LookupError(f"no key {key_id!r}")
    return False


def list_keys(conn: sqlite3.Connection, customer_id: str | None = None) -> list[dict[str, Any]]:
    sql = "SELECT key_id, customer_id, name, prefix, created_at, revoked_at FROM api_keys"
    args: tuple[str, ...] = ()
    if customer_id is not None:
        sql += " WHERE customer_id=?"
        args = (customer_id,)
    from proxy.timeutil import rfc3339

    return [{"key_id": r[0], "customer_id": r[1], "name": r[2], "prefix": r[3],
             "created_at": rfc3339(r[4]), "revoked_at": rfc3339(r[5]) if r[5] is not None else None}
            for r in conn.execute(sql + " ORDER BY created_at, rowid", args)]


class KeyCache:
    """Hash -> key entry and id -> customer, replaced whole on reload."""

    _MEMO_MAX = 100_000

    def __init__(self) -> None:
        self._keys: dict[str, KeyEntry] = {}
        self._memo: dict[str, KeyEntry | None] = {}   # raw key -> entry, skips the hash
        self.customers: dict[str, Customer] = {}
        self.generation = 0     # + 1 per snapshot: what a lookup answers may have changed

    def replace(self, keys: dict[str, KeyEntry], customers: dict[str, Customer]) -> None:
        """Swap in a whole new snapshot (``Customers.snapshot``)."""
        self._keys, self.customers, self._memo = keys, customers, {}
        self.generation += 1

    def lookup(self, raw: str) -> KeyEntry | None:
        try:
            return self._memo[raw]
        except KeyError:
            pass
        if not raw.isascii():            # keys are ASCII; header bytes >= 0x80 are not keys
            return None
        entry = self._keys.get(hash_key(raw))
        if entry is not None:            # unknown keys are not memoised: no memory for junk
            if len(self._memo) >= self._MEMO_MAX:
                self._memo.clear()
            self._memo[raw] = entry
        return entry


def by_stripe_id(conn: sqlite3.Connection, stripe_customer_id: str) -> list[str]:
    return [str(r[0]) for r in conn.execute(
        "SELECT id FROM customers WHERE stripe_customer_id=? ORDER BY id", (stripe_customer_id,))]


def snapshot(conn: sqlite3.Connection) -> tuple[dict[str, KeyEntry], dict[str, Customer]]:
    keys = {h: KeyEntry(kid, cid, rev is not None) for kid, cid, h, rev in conn.execute(
        "SELECT key_id, customer_id, hash, revoked_at FROM api_keys")}
    return keys, {c.id: c for c in list_customers(conn)}


def _update_if_changed(c: sqlite3.Connection, cid: str,
                       column: Literal["currency", "credit_mode"], value: str | None) -> bool:
    return c.execute(f"UPDATE customers SET {column}=? WHERE id=? AND {column} IS NOT ?",
                     (value, cid, value)).rowcount == 1


class SqliteCustomers:
    """The ``Customers`` owner on SQLite: the only writer of ``customers`` and ``api_keys``."""

    def __init__(self, db: Writer) -> None:
        self.db = db

    async def upsert(self, cid: object, stripe_customer_id: object, overage: object,
                     status: object,
                     billing: Callable[[Customer], tuple[object, object]] | None = None,
                     *, currency: object = None, credit_mode: object = KEEP
                     ) -> tuple[Customer, bool]:
        code = None if currency is None else currency_code(currency)
        keep = credit_mode is KEEP
        mode = None if keep else credit_mode_value(credit_mode)

        def tx(c: sqlite3.Connection) -> tuple[Customer, bool]:
            cust, created = upsert_customer(c, cid, stripe_customer_id, overage, status)
            if billing is not None:
                set_billing(c, cust.id, *billing(cust))
            if code is not None:
                _update_if_changed(c, cust.id, "currency", code)
            if not keep:
                _update_if_changed(c, cust.id, "credit_mode", mode)
            if billing is not None or code is not None or not keep:
                cust = get_customer(c, cust.id) or cust
            return cust, created

        out: tuple[Customer, bool] = await self.db.write(tx)
        return out

    async def set_billing(self, cid: str, anchor: object, minimum: object) -> None:
        await self.db.write(lambda c: set_billing(c, cid, anchor, minimum))

    async def set_currency(self, cid: str, currency: object) -> bool:
        return await self._set_column(cid, "currency", currency_code(currency))

    async def set_credit_mode(self, cid: str, mode: object) -> bool:
        return await self._set_column(cid, "credit_mode", credit_mode_value(mode))

    async def _set_column(self, cid: str, column: Literal["currency", "credit_mode"],
                    value: str | None) -> bool:
        """Set one of the customer's settings; True when it changed."""
        changed: bool = await self.db.write(lambda c: _update_if_changed(c, cid, column, value))
        return changed

    async def follow_anchor(self, cid: str, anchor: int, event_at: int) -> bool:
        n: int = await self.db.write(lambda c: c.execute(
            "UPDATE customers SET billing_anchor=?, anchor_event_at=? WHERE id=?"
            " AND (anchor_event_at IS NULL OR anchor_event_at <= ?)",
            (anchor, event_at, cid, event_at)).rowcount)
        return n == 1

    async def get(self, cid: str) -> Customer | None:
        return get_customer(self.db.conn, cid)

    async def all(self) -> list[Customer]:
        return list_customers(self.db.conn)

    async def by_stripe_id(self, stripe_customer_id: str) -> list[str]:
        return by_stripe_id(self.db.conn, stripe_customer_id)

    async def stripe_ids(self) -> dict[str, str]:
        return {str(c): str(s) for c, s in self.db.conn.execute(
            "SELECT id, stripe_customer_id FROM customers WHERE stripe_customer_id IS NOT NULL"
            " AND stripe_customer_id != ''")}

    async def change_suspension(self, cid: str,
                                decide: Callable[[str, str | None],
                                                 tuple[str, str | None] | None]) -> bool:
        def tx(c: sqlite3.Connection) -> bool:
            row = c.execute("SELECT status, suspended_for FROM customers WHERE id=?",
                            (cid,)).fetchone()
            status, why = row if row else ("active", None)
            new = decide(status, why)
            if new is None or (row is not None and new == (status, why)):
                return False
            upsert_customer(c, cid, None, None, new[0])
            c.execute("UPDATE customers SET suspended_for=? WHERE id=?", (new[1], cid))
            return True

        changed: bool = await self.db.write(tx)
        return changed

    async def create_key(self, customer_id: str, name: str = "") -> dict[str, Any]:
        out: dict[str, Any] = await self.db.write(lambda c: create_key(c, customer_id, name))
        return out

    async def revoke_key(self, key_id: str) -> bool:
        out: bool = await self.db.write(lambda c: revoke_key(c, key_id))
        return out

    async def list_keys(self, customer_id: str | None = None) -> list[dict[str, Any]]:
        return list_keys(self.db.conn, customer_id)

    async def snapshot(self) -> KeySnapshot:
        from proxy.store.protocols import KeySnapshot

        keys, customers = snapshot(self.db.conn)
        return KeySnapshot(keys, customers)

    def data_version(self) -> int:
        return self.db.data_version()
