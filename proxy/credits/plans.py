"""Plan allowances over a subscription's life (docs/credits.md, issue 12 findings 1, 8, 9).

Pure parts (property-tested in tests/test_plan_lifecycle.py):
- ``prorate_allowance``: the extra allowance a mid-period upgrade earns, prorated by the
  seconds left in the period, as Stripe prorates the price.
- ``subscription_items`` / ``subscription_period`` / ``monthly_anchor``: read a Stripe
  Subscription (both the pre- and post-2025-03-31 shapes).

Persistence: ``plan_invoices`` (schema migration 8, written through the ``CreditLedger``
verbs ``record_plan_invoice`` / ``write_off_plan_invoice``) records each subscription invoice
a plan grant was made for and whether it is ``open`` (granted when the renewal invoice was
created, before payment), ``paid`` or ``unpaid`` (voided, uncollectible or its subscription
deleted: the grant was clawed back).
"""

from __future__ import annotations

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
