"""Monetary credits (issue 12, finding 2): the pure math and the Stripe shapes.

The monetary credits mode (docs/credits.md, "Two credits modes") is built on this module,
tested on its own (tests/test_credits_monetary.py) against the pricing engine and the Stripe
double; ``proxy.credits.money`` keeps the accounts settlement burns against and
``proxy.credits.mirror`` mirrors grants and checks balances:

- Credits are money in the price's currency: 1 credit = 1 major unit (1 USD, 1 JPY), kept
  as micro-credits like unit credits, so 1 cent is 10,000 micro-credits and 1 yen 1,000,000
  (``micro_per_minor``).
- Usage burns credits at its **marginal price**: what the request adds to the Stripe invoice
  line of the customer's period total, computed by the pricing engine
  (``proxy.pricing.line_amount``: tiers, flat fees, transform and rounding once per line).
  ``burn`` takes ``line_amount(total after) - burned so far`` (never negative), so for
  per-unit and graduated prices the period's burns sum to exactly the invoice line, whatever
  the order or size of the requests; a volume price can cost less after crossing into a
  cheaper tier, and ``true_up`` is then the credit to give back when the period closes.
- All usage is reported to Stripe; Stripe prices the period with its tiers and applies the
  mirrored credit grants (``credit_grant_params``) to the invoice at finalization. Until an
  invoice is finalized Stripe has applied nothing of the period, so the local balance plus
  what the open period has burned equals Stripe's available balance
  (``stripe_available``); ``balance_check`` compares it with Stripe's summary and explains
  a difference.
- The Stripe calls are ``proxy.stripe.client.StripeClient`` methods:
  ``create_credit_grant`` (idempotent on its key), ``find_credit_grant``,
  ``void_credit_grant``, ``credit_balance_summary``, made by the background
  ``MonetaryService`` (``proxy.credits.mirror``), never on the request path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from proxy.credits.ledger import GrantState
from proxy.pricing import Price, line_amount, minor_exponent

MICRO = 1_000_000
Category = Literal["paid", "promotional"]
# Stripe applies credit grants when it finalizes an invoice, to grants unexpired *then*; a
# renewal's invoice for the period that just ended is finalized about an hour after the
# period end (the draft period: 1 h by default, up to 72 h). A mirrored grant therefore
# expires at Stripe this long after its local expiry, so the credits the period's usage
# took from it locally still come off that period's invoice (docs/stripe-notes.md).
FINALIZATION_GRACE = 73 * 3600


def micro_per_minor(currency: str) -> int:
    """Micro-credits in one minor unit of ``currency`` (1 credit = 1 major unit)."""
    per: int = MICRO // 10 ** minor_exponent(currency)
    return per


def burn(price: Price, burned_minor: int, total_after_micro: int) -> int:
    """Minor units a request burns when it brings the period total (micro-units of the
    meter) to ``total_after_micro``, given ``burned_minor`` already burned this period:
    ``line_amount(after) - burned``, never negative. The first burn of a period includes
    what the line costs at zero usage (a tiered price's first flat fee)."""
    return max(0, line_amount(price, total_after_micro) - burned_minor)


def true_up(price: Price, burned_minor: int, total_micro: int) -> int:
    """Minor units to give back at period end: what was burned beyond the final line
    (a volume price whose total moved into a cheaper tier). 0 for per-unit and graduated."""
    return max(0, burned_minor - line_amount(price, total_micro))


def replay(price: Price, quantities: Iterable[int]) -> tuple[int, int]:
    """(period total, minor units burned) after settling ``quantities`` (micro-units, in
    settlement order) from an empty period: what ``burn`` charged them, exactly. For a volume
    price this is the highest line the period reached, which its final total alone does not
    tell (a restart resumes from it)."""
    total = burned = 0
    for q in quantities:
        total += q
        burned += burn(price, burned, total)
    return total, burned


def give_back(price: Price, covered_micro: int, total_micro: int, per_minor: int) -> int:
    """Micro-credits to return to a customer once a period closes: what credits covered
    beyond the period's final invoice line (``covered - line_amount(total)``, never
    negative). Stripe applies the mirrored grants to that line only, so this part of the
    burn left the local grants but not Stripe's: a volume price whose total moved into a
    cheaper tier (``true_up``), as far as credits paid for it. The uncovered part of the
    excess was never invoiced (Stripe bills the line), so it needs nothing."""
    return max(0, covered_micro - line_amount(price, total_micro) * per_minor)


def is_volume(price: Price | None) -> bool:
    """A price whose line can fall as its total grows (a volume-tiered price)."""
    return price is not None and price.tiers_mode == "volume"


def to_minor(micro_credits: int, currency: str) -> int:
    """A monetary credit amount in minor units; refused unless whole minor units (Stripe's
    credit grants take integers)."""
    per = micro_per_minor(currency)
    if micro_credits % per:
        raise ValueError(f"{micro_credits} micro-credits is not a whole number of"
                         f" {currency} minor units")
    return micro_credits // per


def credit_grant_params(g: GrantState, customer: str, currency: str,
                        category: Category) -> dict[str, Any]:
    """The ``POST /v1/billing/credit_grants`` parameters that mirror a local grant: the
    amount in minor units, metered prices only, the same priority (0 applies first in both),
    effective and expiry times, and the local grant id in metadata (and as the idempotency
    key's suffix, so a retry creates one grant). The Stripe expiry is the local one plus
    ``FINALIZATION_GRACE``: the invoice of the period the grant covered is finalized after
    the period end, and Stripe applies only grants unexpired at finalization."""
    params: dict[str, Any] = {
        "customer": customer,
        "amount": {"type": "monetary",
                   "monetary": {"value": to_minor(g.amount, currency), "currency": currency}},
        "applicability_config": {"scope": {"price_type": "metered"}},
        "category": category,
        "priority": g.priority,
        "name": f"meterproxy {g.source}"[:100],
        "metadata": {"meterproxy_grant": g.id},
    }
    if g.effective_at is not None:
        params["effective_at"] = g.effective_at
    if g.expires_at is not None:
        params["expires_at"] = g.expires_at + FINALIZATION_GRACE
    return params


def summary_available(summary: Mapping[str, Any], currency: str) -> int | None:
    """Stripe's available balance in ``currency`` (minor units) from a credit balance
    summary, or None when it has no balance in that currency."""
    for b in summary.get("balances") or ():
        mon = (b.get("available_balance") or {}).get("monetary") or {}
        if mon.get("currency") == currency and isinstance(mon.get("value"), int):
            return int(mon["value"])
    return None


def stripe_available(local_balance_micro: int, open_period_burned_minor: int,
                     currency: str) -> int:
    """What Stripe's available balance should be (minor units): the local balance (whole
    minor units, rounded down: a claw-back can leave a fraction Stripe cannot hold) plus
    what credits covered in the open period (Stripe applies credits at finalization)."""
    return max(local_balance_micro, 0) // micro_per_minor(currency) + open_period_burned_minor


def balance_check(local_balance_micro: int, open_period_burned_minor: int,
                  summary: Mapping[str, Any], currency: str) -> dict[str, Any]:
    """Reconciliation of a monetary customer's credits: Stripe's available balance (from its
    credit balance summary) against what it should be (``stripe_available``). ``difference``
    is Stripe minus expected, in minor units, with the likely cause in words."""
    expected = stripe_available(local_balance_micro, open_period_burned_minor, currency)
    got = summary_available(summary, currency)
    stripe = 0 if got is None else got
    d = stripe - expected
    if d == 0:
        why = "matches"
    elif got is None:
        why = "Stripe holds no credit balance in this currency: the grants were not mirrored"
    elif d > 0:
        why = ("Stripe holds more: a grant voided, clawed back or expired here is still live"
               " at Stripe, an invoice has not applied credits there yet, or a grant was"
               " first mirrored after a period it covered here ended (that invoice charged"
               " the usage in full, so Stripe holds what it covered)")
    else:
        why = ("Stripe holds less: a grant made here is not mirrored yet, or Stripe applied"
               " credits to an invoice meterproxy did not burn")
    return {"currency": currency, "expected": expected, "stripe": stripe, "difference": d,
            "explanation": why}

