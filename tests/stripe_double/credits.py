"""Billing Credits in the Stripe double: credit grants and the credit balance summary.

What Stripe documents and the double enforces (docs/stripe-notes.md, "Billing credits"):
- ``POST /v1/billing/credit_grants``: ``customer`` and ``amount`` are required; the amount
  is ``type=monetary`` with ``monetary[value]`` (a positive integer, minor units) and
  ``monetary[currency]`` (lowercase ISO code); ``applicability_config[scope]`` is required
  and is either ``price_type=metered`` or a list of ``prices[][id]``; ``category`` is
  ``paid`` (default) or ``promotional``; ``priority`` an integer 0-100 (default 50, 0 is
  applied first); ``effective_at`` (default now) and ``expires_at`` unix times, the expiry
  after the effective time; ``name`` at most 100 characters; ``metadata``.
- ``POST .../{id}/void``: a voided grant no longer counts; voiding twice is an error.
  ``POST .../{id}/expire``: expires it now (its ``expires_at`` becomes now).
- ``GET /v1/billing/credit_balance_summary``: ``customer`` and ``filter[type]`` are required
  (``applicability_scope`` with ``filter[applicability_scope][price_type]=metered``, or
  ``credit_grant`` with ``filter[credit_grant]``); one balance per currency with
  ``available_balance`` (effective, unexpired, unvoided grants minus what invoices applied)
  and ``ledger_balance`` (the same here: no invoice is in draft in the double).
- Credits are applied to invoices at finalization, to metered price lines only, from grants
  effective and unexpired then, in Stripe's order (priority, then the earliest expiry, then
  promotional before paid, then the earliest effective time, then the oldest). The double
  finalizes no invoices: a test applies an invoice's credit use with ``apply_to_invoice``
  (control API ``POST /_double/credit_applications``); an invoice preview shows what a
  finalization now would apply (``preview_credits``: each metered line's
  ``pretax_credit_amounts``, the invoice's ``total_pretax_credit_amounts``, and ``total``
  and ``amount_due`` net of them) without consuming anything.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .state import DoubleError, invalid, missing, parse_int

_CURRENCY = re.compile(r"^[a-z]{3}$")


@dataclass
class CreditGrant:
    id: str
    customer: str
    value: int
    currency: str
    scope: dict[str, Any]
    category: str
    priority: int
    effective_at: int
    expires_at: int | None
    name: str | None
    metadata: dict[str, Any]
    created: int
    voided_at: int | None = None
    applied: int = 0

    def available(self, now: float) -> int:
        if self.voided_at is not None or now < self.effective_at:
            return 0
        if self.expires_at is not None and now >= self.expires_at:
            return 0
        return self.value - self.applied

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "object": "billing.credit_grant",
                "amount": {"type": "monetary",
                           "monetary": {"currency": self.currency, "value": self.value}},
                "applicability_config": {"scope": self.scope}, "category": self.category,
                "created": self.created, "customer": self.customer,
                "effective_at": self.effective_at, "expires_at": self.expires_at,
                "livemode": False, "metadata": self.metadata, "name": self.name,
                "priority": self.priority, "test_clock": None, "updated": self.created,
                "voided_at": self.voided_at}


def _opt_time(p: dict[str, Any], key: str) -> int | None:
    raw = p.get(key)
    if raw in (None, ""):
        return None
    v = parse_int(raw, key)
    if v <= 0:
        raise invalid(key, f"Invalid timestamp: {key} must be a positive unix time.",
                      "parameter_invalid_integer")
    return v


class CreditGrants:
    def __init__(self, now: Callable[[], float]) -> None:
        self.now = now
        self.grants: dict[str, CreditGrant] = {}

    def create(self, p: dict[str, Any]) -> CreditGrant:
        customer = p.get("customer")
        if not customer:
            raise missing("customer")
        amount = p.get("amount")
        if not isinstance(amount, dict):
            raise missing("amount")
        if amount.get("type") != "monetary":
            raise invalid("amount[type]", "Invalid amount[type]: only monetary credit grants"
                                          " are supported.", "parameter_invalid")
        mon = amount.get("monetary")
        if not isinstance(mon, dict) or "value" not in mon:
            raise missing("amount[monetary][value]")
        value = parse_int(mon["value"], "amount[monetary][value]")
        if value <= 0:
            raise invalid("amount[monetary][value]", "The credit grant amount must be"
                          " positive.", "parameter_invalid_integer")
        currency = mon.get("currency")
        if not currency:
            raise missing("amount[monetary][currency]")
        if not isinstance(currency, str) or not _CURRENCY.match(currency):
            raise invalid("amount[monetary][currency]", f"Invalid currency: {currency}.",
                          "parameter_invalid")
        cfg = p.get("applicability_config")
        scope = cfg.get("scope") if isinstance(cfg, dict) else None
        if not isinstance(scope, dict):
            raise missing("applicability_config[scope]")
        if "price_type" in scope:
            if scope["price_type"] != "metered" or "prices" in scope:
                raise invalid("applicability_config[scope][price_type]",
                              "Invalid price_type: credit grants apply to metered prices"
                              " only (price_type=metered, or a list of prices).",
                              "parameter_invalid")
            scope = {"price_type": "metered"}
        elif isinstance(scope.get("prices"), list) and scope["prices"] and all(
                isinstance(x, dict) and x.get("id") for x in scope["prices"]):
            scope = {"prices": [{"id": x["id"]} for x in scope["prices"]]}
        else:
            raise missing("applicability_config[scope][price_type]")
        category = p.get("category") or "paid"
        if category not in ("paid", "promotional"):
            raise invalid("category", f"Invalid category: {category}; must be one of paid,"
                                      " promotional.", "parameter_invalid")
        priority = 50 if p.get("priority") in (None, "") else parse_int(p["priority"],
                                                                       "priority")
        if not 0 <= priority <= 100:
            raise invalid("priority", "Invalid priority: must be between 0 and 100.",
                          "parameter_invalid_integer")
        now = int(self.now())
        effective = _opt_time(p, "effective_at") or now
        expires = _opt_time(p, "expires_at")
        if expires is not None and expires <= effective:
            raise invalid("expires_at", "expires_at must be after effective_at.",
                          "parameter_invalid_integer")
        name = p.get("name")
        if name is not None and len(str(name)) > 100:
            raise invalid("name", "name must be at most 100 characters.")
        meta = p.get("metadata")
        g = CreditGrant("credgr_" + secrets.token_hex(12), str(customer), value, currency,
                        scope, category, priority, effective, expires,
                        None if name is None else str(name),
                        meta if isinstance(meta, dict) else {}, now)
        self.grants[g.id] = g
        return g

    def get(self, grant_id: str) -> CreditGrant:
        g = self.grants.get(grant_id)
        if g is None:
            raise DoubleError(404, f"No such credit grant: '{grant_id}'",
                              code="resource_missing", param="id")
        return g

    def void(self, grant_id: str) -> CreditGrant:
        g = self.get(grant_id)
        if g.voided_at is not None:
            raise DoubleError(400, f"The credit grant {grant_id} is already voided.",
                              code="credit_grant_already_voided")
        g.voided_at = int(self.now())
        return g

    def expire(self, grant_id: str) -> CreditGrant:
        g = self.get(grant_id)
        now = int(self.now())
        if g.voided_at is not None or (g.expires_at is not None and g.expires_at <= now):
            raise DoubleError(400, f"The credit grant {grant_id} is no longer active.",
                              code="credit_grant_inactive")
        g.expires_at = max(now, g.effective_at + 1) if now < g.effective_at else now
        return g

    def list(self, customer: str | None) -> list[dict[str, Any]]:
        return [g.to_json() for g in sorted(self.grants.values(), key=lambda g: -g.created)
                if customer is None or g.customer == customer]

    def _order(self, customer: str, currency: str, now: float) -> list[CreditGrant]:
        """Stripe's application order: priority (0 first), then the earliest expiry (none
        last), then promotional before paid, then the earliest effective time, then the
        oldest."""
        live = [g for g in self.grants.values()
                if g.customer == customer and g.currency == currency and g.available(now) > 0]
        return sorted(live, key=lambda g: (g.priority, g.expires_at or 2**62,
                                           g.category != "promotional", g.effective_at,
                                           g.created, g.id))

    def preview_credits(self, customer: str, currency: str,
                        amounts: list[int]) -> list[list[tuple[str, int]]]:
        """What an invoice finalized now would apply to each metered line of ``amounts``
        (minor units), per line as (grant id, amount), in line order; nothing is consumed
        (a preview)."""
        now = self.now()
        left = {g.id: g.available(now) for g in self._order(customer, currency, now)}
        out: list[list[tuple[str, int]]] = []
        for amount in amounts:
            applied: list[tuple[str, int]] = []
            need = max(amount, 0)
            for gid in left:
                if need == 0:
                    break
                take = min(need, left[gid])
                if take:
                    applied.append((gid, take))
                    left[gid] -= take
                    need -= take
            out.append(applied)
        return out

    def summary(self, p: dict[str, Any]) -> dict[str, Any]:
        customer = p.get("customer")
        if not customer:
            raise missing("customer")
        flt = p.get("filter")
        if not isinstance(flt, dict) or not flt.get("type"):
            raise missing("filter[type]")
        now = self.now()
        if flt["type"] == "applicability_scope":
            sc = flt.get("applicability_scope")
            if not isinstance(sc, dict) or sc.get("price_type") != "metered":
                raise missing("filter[applicability_scope][price_type]")
            grants = [g for g in self.grants.values() if g.customer == customer]
        elif flt["type"] == "credit_grant":
            gid = flt.get("credit_grant")
            if not gid:
                raise missing("filter[credit_grant]")
            grants = [self.get(str(gid))]
        else:
            raise invalid("filter[type]", f"Invalid filter[type]: {flt['type']}.",
                          "parameter_invalid")
        per: dict[str, int] = {}
        for g in grants:
            per[g.currency] = per.get(g.currency, 0) + g.available(now)
        money = [{"type": "monetary", "monetary": {"currency": c, "value": v}}
                 for c, v in sorted(per.items())]
        return {"object": "billing.credit_balance_summary", "customer": customer,
                "livemode": False,
                "balances": [{"available_balance": m, "ledger_balance": m} for m in money]}

    def apply_to_invoice(self, customer: str, currency: str, amount: int) -> int:
        """An invoice finalized with ``amount`` (minor units) of eligible metered lines:
        take it from the customer's grants in Stripe's order; returns what was applied."""
        left, now = amount, self.now()
        for g in self._order(customer, currency, now):
            take = min(left, g.available(now))
            g.applied += take
            left -= take
            if left == 0:
                break
        return amount - left


class InvoiceItems:
    """``POST /v1/invoiceitems`` (one-off amounts): ``customer`` is required, and an
    ``amount`` (integer minor units, may be negative) with its ``currency``; ``period`` needs
    both ``start`` and ``end``, the end not before the start. Pending items wait for the
    customer's next invoice (the double keeps them as created)."""

    def __init__(self, now: Callable[[], float]) -> None:
        self.now = now
        self.items: dict[str, dict[str, Any]] = {}

    def create(self, p: dict[str, Any]) -> dict[str, Any]:
        customer = p.get("customer")
        if not customer:
            raise missing("customer")
        if p.get("amount") in (None, ""):
            raise missing("amount")
        amount = parse_int(p["amount"], "amount")
        currency = p.get("currency")
        if not currency:
            raise missing("currency")
        if not isinstance(currency, str) or not _CURRENCY.match(currency):
            raise invalid("currency", f"Invalid currency: {currency}.", "parameter_invalid")
        period = p.get("period")
        start = end = int(self.now())
        if period is not None:
            if not isinstance(period, dict) or "start" not in period:
                raise missing("period[start]")
            if "end" not in period:
                raise missing("period[end]")
            start = parse_int(period["start"], "period[start]")
            end = parse_int(period["end"], "period[end]")
            if end < start:
                raise invalid("period[end]", "period[end] must be on or after period[start].",
                              "parameter_invalid_integer")
        meta = p.get("metadata")
        item = {"id": "ii_" + secrets.token_hex(12), "object": "invoiceitem",
                "customer": str(customer), "amount": amount, "currency": currency,
                "description": p.get("description"), "date": int(self.now()),
                "invoice": None, "livemode": False,
                "metadata": meta if isinstance(meta, dict) else {},
                "period": {"start": start, "end": end}, "proration": False, "quantity": 1}
        self.items[item["id"]] = item
        return item
