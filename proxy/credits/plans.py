"""Plan allowances over a subscription's life (docs/credits.md, issue 12 findings 1, 8, 9).

Pure parts (property-tested in tests/test_plan_lifecycle.py):
- ``prorate_allowance``: the extra allowance a mid-period upgrade earns, prorated by the
  seconds left in the period, as Stripe prorates the price.
- ``subscription_items`` / ``subscription_period`` / ``monthly_anchor``: read a Stripe
  Subscription (both the pre- and post-2025-03-31 shapes).

Persistence: ``plan_invoices`` (schema migration 8) records each subscription invoice a
plan grant was made for and whether it is ``open`` (granted when the renewal invoice was
created, before payment), ``paid`` or ``unpaid`` (voided, uncollectible or its subscription
deleted: the grant was clawed back).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any


def prorate_allowance(old: int, new: int, start: int, end: int, at: int) -> int:
    """Extra allowance (micro-credits) for a change from an ``old`` to a ``new`` per-period
    allowance at ``at`` within the period [start, end): ``(new - old) x (end - at) / (end -
    start)``, floored, and 0 for a downgrade (what was granted for the period stays; the
    smaller allowance applies from the next renewal). ``at`` outside the period is clamped."""
    if new <= old or end <= start:
        return 0
    at = min(max(at, start), end)
    return (new - old) * (end - at) // (end - start)


@dataclass(frozen=True, slots=True)
class Item:
    price: str
    quantity: int
    interval: str | None = None
    interval_count: int = 1
    period: tuple[int, int] | None = None


def _id(v: Any) -> str | None:
    if isinstance(v, dict):
        v = v.get("id")
    return v if isinstance(v, str) and v else None


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def subscription_items(items: Any) -> list[Item]:
    """The items of a Subscription's ``items`` list (or a ``previous_attributes.items``)."""
    data = items.get("data") if isinstance(items, dict) else None
    out: list[Item] = []
    for it in data if isinstance(data, list) else ():
        if not isinstance(it, dict):
            continue
        raw = it.get("price")
        price: dict[str, Any] = raw if isinstance(raw, dict) else {}
        pid = _id(it.get("price")) or _id(it.get("plan"))
        if pid is None:
            continue
        q = _int(it.get("quantity"))
        r = price.get("recurring")
        rec: dict[str, Any] = r if isinstance(r, dict) else {}
        s, e = _int(it.get("current_period_start")), _int(it.get("current_period_end"))
        out.append(Item(pid, q if q is not None and q > 0 else 1,
                        rec.get("interval") if isinstance(rec.get("interval"), str) else None,
                        _int(rec.get("interval_count")) or 1,
                        (s, e) if s is not None and e is not None else None))
    return out


def subscription_period(sub: dict[str, Any], item: Item | None = None) -> tuple[int, int] | None:
    """The current period: on the item from API 2025-03-31 on, on the Subscription before."""
    if item is not None and item.period is not None:
        return item.period
    s, e = _int(sub.get("current_period_start")), _int(sub.get("current_period_end"))
    return (s, e) if s is not None and e is not None and s < e else None


def new_cycle(previous_attributes: Any, sub: dict[str, Any]) -> bool:
    """Whether a ``customer.subscription.updated`` started a new billing period (a change
    with ``billing_cycle_anchor: now``): the anchor or the period start is among the changed
    attributes, on the Subscription (before API 2025-03-31) or on an item."""
    if not isinstance(previous_attributes, dict):
        return False
    if "billing_cycle_anchor" in previous_attributes \
            or "current_period_start" in previous_attributes:
        return True
    old = {i.period for i in subscription_items(previous_attributes.get("items"))
           if i.period is not None}
    new = {i.period for i in subscription_items(sub.get("items")) if i.period is not None}
    return bool(old) and not old <= new


def monthly_anchor(sub: dict[str, Any]) -> tuple[int | None, str | None]:
    """(anchor, None) when the subscription bills monthly from ``billing_cycle_anchor``;
    (None, why not) otherwise: meterproxy's periods are monthly (``proxy.periods``)."""
    anchor = _int(sub.get("billing_cycle_anchor"))
    if anchor is None or anchor <= 0:
        return None, "the subscription has no billing_cycle_anchor"
    items = subscription_items(sub.get("items"))
    cycles = {(i.interval, i.interval_count) for i in items if i.interval is not None}
    if cycles and cycles != {("month", 1)}:
        return None, f"the subscription does not bill monthly ({sorted(map(str, cycles))})"
    return anchor, None


# ---- plan_invoices (one row per subscription invoice a plan grant was made for) ----------

def record_invoice(c: sqlite3.Connection, invoice_id: str, grant_id: str, customer_id: str,
                   subscription: str, state: str, now: int) -> None:
    """Open -> paid; unpaid is final for that invoice (a later payment grants anew)."""
    c.execute("INSERT INTO plan_invoices(invoice_id, grant_id, customer_id, subscription, state,"
              " updated_at) VALUES (?,?,?,?,?,?) ON CONFLICT(invoice_id) DO UPDATE SET"
              " state=excluded.state, updated_at=excluded.updated_at"
              " WHERE plan_invoices.state='open'",
              (invoice_id, grant_id, customer_id, subscription, state, now))


def invoice_state(conn: sqlite3.Connection, invoice_id: str) -> str | None:
    row = conn.execute("SELECT state FROM plan_invoices WHERE invoice_id=?",
                       (invoice_id,)).fetchone()
    return str(row[0]) if row else None


def open_invoices(conn: sqlite3.Connection, customer_id: str,
                  subscription: str | None = None) -> list[tuple[str, str]]:
    """(invoice, grant) still waiting for payment, for a customer (and subscription)."""
    sql = ("SELECT invoice_id, grant_id FROM plan_invoices WHERE customer_id=? AND state='open'")
    args: tuple[str, ...] = (customer_id,)
    if subscription is not None:
        sql, args = sql + " AND subscription=?", (*args, subscription)
    return [(str(i), str(g)) for i, g in conn.execute(sql + " ORDER BY invoice_id", args)]


def plan_grant_for(conn: sqlite3.Connection, customer_id: str, subscription: str,
                   at: int) -> tuple[str, int, int] | None:
    """(grant id, period start, period end) of the subscription's plan grant whose period
    contains ``at``."""
    prefix = f"stripe:plan:{subscription}:"
    row = conn.execute("SELECT id, period_start, period_end FROM grants WHERE customer_id=?"
                       " AND substr(idempotency_key, 1, ?)=? AND period_start <= ?"
                       " AND period_end > ? ORDER BY period_start DESC LIMIT 1",
                       (customer_id, len(prefix), prefix, at, at)).fetchone()
    return (str(row[0]), int(row[1]), int(row[2])) if row else None


def subscription_customer(conn: sqlite3.Connection, subscription: str) -> str | None:
    """The local customer a subscription's plan grants went to (shared Stripe customers)."""
    prefixes = [f"stripe:plan:{subscription}:", f"stripe:planchange:{subscription}:"]
    for prefix in prefixes:
        row = conn.execute("SELECT customer_id FROM grants WHERE substr(idempotency_key, 1, ?)=?"
                           " LIMIT 1", (len(prefix), prefix)).fetchone()
        if row is not None:
            return str(row[0])
    row = conn.execute("SELECT customer_id FROM plan_invoices WHERE subscription=? LIMIT 1",
                       (subscription,)).fetchone()
    return str(row[0]) if row else None


def set_anchor(c: sqlite3.Connection, customer_id: str, anchor: int, event_at: int) -> bool:
    """Set the billing anchor from a subscription event unless a newer event already did."""
    n: int = c.execute("UPDATE customers SET billing_anchor=?, anchor_event_at=? WHERE id=?"
                       " AND (anchor_event_at IS NULL OR anchor_event_at <= ?)",
                       (anchor, event_at, customer_id, event_at)).rowcount
    return n == 1
