"""Invoice previews in the Stripe double: ``POST /v1/invoices/create_preview`` and
``GET /v1/invoices/{id}/lines`` of a preview.

A test declares a customer's subscription with ``State.add_subscription`` (its period and
the metered prices on it, seeded with ``State.add_price``; each price names its meter in
``recurring.meter``). The preview is that period's invoice as Stripe would draft it now:

- ``customer`` is required (400 ``parameter_missing``); a customer with no subscription
  has no upcoming invoice (404 ``invoice_upcoming_none``).
- One line per price: the quantity is the meter's aggregation (``sum`` of values, or
  ``count``) of the customer's accepted, uncancelled events whose ``timestamp`` is in
  [period start, period end), whatever their summary lag (Stripe drafts from everything
  received). The amount: ``per_unit`` is ``unit_amount_decimal x quantity``; ``tiered``
  ``graduated`` sums each reached tier's units and flat fee (the first tier's even at 0),
  ``volume`` prices every unit at the
  tier the total falls in; each line is rounded once, half up, to minor units.
- Every pending invoice item of the customer is a further line (``parent.type``
  ``invoice_item_details``).
- A subscription in another currency than a price's prices it with that price's
  ``currency_options`` entry for the subscription's currency (its ``unit_amount(_decimal)``
  or ``tiers``; scheme, tiers mode and transform stay the price's); a price without one is
  refused (400), as Stripe refuses such a subscription.
- Billing credits (``credits.py``): the customer's credit grants in the invoice's currency
  apply to the metered price lines (never to invoice items), as a finalization now would
  apply them: each line's ``pretax_credit_amounts``, the invoice's
  ``total_pretax_credit_amounts``; nothing is consumed.
- The invoice: ``currency`` (the subscription's, else the first price's), ``period_start``/``period_end``,
  ``subtotal`` = the sum of the lines, ``total`` = ``amount_due`` = ``subtotal`` minus the
  credits applied, ``lines`` a list object.
- ``lines`` embeds the first ``EMBEDDED_LINES`` (10) lines, as Stripe does; ``has_more``
  says more exist and ``url`` is ``/v1/invoices/{id}/lines`` of the preview's own ``id``
  (``upcoming_in_...``), which pages the rest like any Stripe list (``limit`` 1-100, default
  10, ``starting_after`` a line's id; ``preview_lines``). The double remembers the last
  ``KEPT_PREVIEWS`` previews' lines; an unknown id answers 404 ``resource_missing``.
Written independently of meterproxy's pricing engine, so a preview is a second opinion.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING, Any

from .state import DoubleError, missing

if TYPE_CHECKING:
    from .state import State

EMBEDDED_LINES = 10         # Stripe embeds the first 10 lines of an invoice
KEPT_PREVIEWS = 100         # previews whose lines can still be paged


@dataclass
class Subscription:
    id: str
    customer: str
    prices: list[str]
    period: tuple[int, int]
    currency: str | None = None       # None: the prices' own currency


def _dec(v: Any) -> Decimal:
    return Decimal(str(v)) if v not in (None, "") else Decimal(0)


def price_amount(price: dict[str, Any], quantity: int) -> int:
    """A line's amount in minor units (rounded once, half up)."""
    if price.get("billing_scheme", "per_unit") == "per_unit":
        raw = _dec(price.get("unit_amount_decimal", price.get("unit_amount"))) * quantity
    else:
        raw, below = Decimal(0), 0
        for n, tier in enumerate(price.get("tiers") or []):
            up_to = tier.get("up_to")
            cap = None if up_to in (None, "inf") else int(up_to)
            unit = _dec(tier.get("unit_amount_decimal", tier.get("unit_amount")))
            flat = _dec(tier.get("flat_amount_decimal", tier.get("flat_amount")))
            reached = cap is None or quantity <= cap
            if price.get("tiers_mode") == "volume":
                if reached:
                    raw = unit * quantity + flat
                    break
                continue
            units = (quantity if cap is None else min(quantity, cap)) - below
            if units > 0 or n == 0:        # the first tier's flat fee is due at 0 too
                raw += unit * max(units, 0) + flat
            if reached:
                break
            below = cap or 0
    return int(raw.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def in_currency(price: dict[str, Any], currency: str | None) -> dict[str, Any]:
    """The price as billed in ``currency`` (its ``currency_options`` entry)."""
    if currency is None or currency == price.get("currency"):
        return price
    option = (price.get("currency_options") or {}).get(currency)
    if option is None:
        raise DoubleError(400, f"The price {price.get('id')} has no currency option for "
                               f"{currency}.", param="currency")
    amounts = {k: v for k, v in option.items()
               if k in ("unit_amount", "unit_amount_decimal", "tiers")}
    base = {k: v for k, v in price.items()
            if k not in ("unit_amount", "unit_amount_decimal", "tiers")}
    return {**base, **amounts, "currency": currency}


def preview(state: State, params: dict[str, Any]) -> dict[str, Any]:
    customer = params.get("customer")
    if not customer:
        raise missing("customer")
    sub = state.subscriptions.get(str(customer))
    if sub is None:
        raise DoubleError(404, f"No upcoming invoices for customer: {customer}",
                          code="invoice_upcoming_none")
    start, end = sub.period
    lines: list[dict[str, Any]] = []
    currency = sub.currency
    for pid in sub.prices:
        price = in_currency(state.prices[pid], sub.currency)
        currency = currency or price.get("currency")
        meter = state.meters[price["recurring"]["meter"]]
        events = [e for e in state.accepted_events(sub.customer, meter.event_name)
                  if start <= e.timestamp < end]
        qty = len(events) if meter.formula == "count" else sum(e.value for e in events)
        lines.append({"id": "il_tmp_" + secrets.token_hex(8), "object": "line_item",
                      "amount": price_amount(price, qty), "currency": price.get("currency"),
                      "description": f"{qty} x {meter.display_name or meter.event_name}",
                      "quantity": qty, "period": {"start": start, "end": end},
                      "parent": {"type": "subscription_item_details",
                                 "subscription_item_details": {"subscription": sub.id}},
                      "pricing": {"type": "price_details",
                                  "price_details": {"price": pid, "product": "prod_double"}}})
    for item in state.invoice_items.items.values():
        if item["customer"] == sub.customer and item["invoice"] is None:
            lines.append({"id": "il_tmp_" + secrets.token_hex(8), "object": "line_item",
                          "amount": item["amount"], "currency": item["currency"],
                          "description": item["description"], "quantity": 1,
                          "period": item["period"],
                          "parent": {"type": "invoice_item_details",
                                     "invoice_item_details": {"invoice_item": item["id"]}},
                          "pricing": None})
    subtotal = sum(int(ln["amount"]) for ln in lines)
    metered = [ln for ln in lines if ln["pricing"] is not None]
    credits = 0
    for ln, applied in zip(metered, state.credit_grants.preview_credits(
            sub.customer, currency or "usd", [int(ln["amount"]) for ln in metered]),
            strict=True):
        ln["pretax_credit_amounts"] = [
            {"amount": a, "credit_balance_transaction": f"cbtxn_preview_{gid}",
             "discount": None, "type": "credit_balance_transaction"} for gid, a in applied]
        credits += sum(a for _g, a in applied)
    for ln in lines:
        ln.setdefault("pretax_credit_amounts", [])
    total = subtotal - credits
    inv_id = "upcoming_in_" + secrets.token_hex(6)
    state.previews[inv_id] = lines
    while len(state.previews) > KEPT_PREVIEWS:
        del state.previews[next(iter(state.previews))]
    return {"id": inv_id, "object": "invoice",
            "customer": sub.customer, "subscription": sub.id, "currency": currency or "usd",
            "period_start": start, "period_end": end, "status": "draft",
            "subtotal": subtotal, "total": total, "amount_due": total, "livemode": False,
            "total_pretax_credit_amounts": [
                c for ln in lines for c in ln["pretax_credit_amounts"]],
            "lines": {"object": "list", "data": lines[:EMBEDDED_LINES],
                      "has_more": len(lines) > EMBEDDED_LINES,
                      "url": f"/v1/invoices/{inv_id}/lines"}}


def preview_lines(state: State, invoice_id: str) -> list[dict[str, Any]]:
    """Every line of a preview made earlier (``GET /v1/invoices/{id}/lines`` pages them)."""
    lines = state.previews.get(invoice_id)
    if lines is None:
        raise DoubleError(404, f"No such invoice: '{invoice_id}'", code="resource_missing",
                          param="invoice")
    return lines
