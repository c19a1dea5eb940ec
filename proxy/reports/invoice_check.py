"""Reconciliation against the invoice (issue 12): Stripe's preview of the customer's upcoming
invoice beside meterproxy's own view of the period, with every difference explained.

- ``compare`` (pure, property-tested in tests/test_reports_invoice_check.py) matches each
  priced meter to the preview line of its Stripe price and explains the difference:
  fewer units at Stripe (usage not delivered yet: the outbox sends it within
  ``stripe.flush_interval``, and Stripe's meters aggregate with a delay), more units at Stripe
  (usage reported to the meter from outside this proxy: run ``meterproxy reconcile``), or the
  same units priced differently (the price changed at Stripe since meterproxy read it). A line
  no meter accounts for (an invoice item such as a commitment true-up, a flat subscription
  fee) is listed as such. ``difference`` is always Stripe minus meterproxy, in minor units.
  A preview whose lines were not all read (``has_more``: longer than the client's bound)
  is ``complete: false`` with a ``note``, and a meter whose price is not among the lines
  read is said to be possibly on a later line, not missing from the invoice.
- ``billed_together``: what the consumer page shows instead when the customer's Stripe
  customer is shared with other local customers (docs/credits.md, "Several local customers
  on one Stripe customer"). Stripe's preview is then the combined invoice of all of them:
  its metered lines hold every account's units and amounts, its invoice items and credits
  may be another account's, and Stripe cannot split them. Compared with one account's usage
  it would show that account the others' usage and a false "more units at Stripe", so the
  page shows none of it (Stripe is not asked) and says why. Reconciliation
  (``meterproxy reconcile``) compares the group's summed usage with Stripe for the operator.
- ``PreviewCache`` bounds what untrusted consumers can make the proxy ask Stripe: one preview
  per Stripe customer per ``PREVIEW_TTL`` (60 s; a failure is remembered as long), at most one
  call in flight per customer, at most ``PREVIEW_MAX_ENTRIES`` (10,000) remembered customers
  (the oldest is forgotten first).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from proxy.errors import StripeCallError
from proxy.pricing import fmt_minor
from proxy.stripe.client import InvoicePreview, StripeClient

PREVIEW_TTL = 60.0
PREVIEW_MAX_ENTRIES = 10_000


def explain(local_units: int, stripe_units: int, local_amount: int, stripe_amount: int,
            undelivered: int = 0) -> str:
    """Why a meter's line differs between meterproxy and Stripe's preview (one sentence)."""
    d = stripe_units - local_units
    if d == 0 and local_amount == stripe_amount:
        return "matches"
    if d < 0:
        why = f"Stripe has {-d} fewer units than metered here: usage not on Stripe's invoice yet"
        if undelivered:
            why += f" ({undelivered} units still wait in meterproxy's outbox)"
        return why + "; it is sent within the flush interval and Stripe's meters aggregate" \
                     " with a short delay."
    if d > 0:
        return (f"Stripe has {d} more units than metered here: usage reported to this meter"
                " from outside this proxy (run `meterproxy reconcile`).")
    return ("The same units priced differently: the price at Stripe changed since meterproxy"
            " read it (prices are re-read periodically).")


def compare(local: Mapping[str, tuple[int, int]], price_ids: Mapping[str, str],
            preview: InvoicePreview,
            undelivered: Mapping[str, int] | None = None,
            local_credits: int | None = None) -> dict[str, Any]:
    """``local``: meter -> (whole units billed, amount in minor units) as meterproxy computes
    the period so far; ``price_ids``: meter -> its Stripe price id. Amounts are in the
    preview's currency. ``local_credits`` (monetary credits mode): what this period's
    usage took from the credits here, minor units, beside the billing credits Stripe's
    preview applies (``credits``)."""
    cur = preview.currency
    by_price: dict[str, list[int]] = {}
    other: list[dict[str, Any]] = []
    wanted = set(price_ids.values())
    for ln in preview.lines:
        if ln.price is not None and ln.price in wanted:
            q, a = by_price.get(ln.price, [0, 0])
            by_price[ln.price] = [q + (ln.quantity or 0), a + ln.amount]
        else:
            other.append({"description": ln.description, "amount": fmt_minor(ln.amount, cur),
                          "amount_minor": ln.amount,
                          "explanation": "an invoice item meterproxy does not project (e.g. a"
                                         " minimum-commitment true-up or a one-off charge)"
                          if ln.invoice_item else
                          "a line of a price no meter is mapped to (e.g. a flat fee)"})
    lines = []
    local_total = stripe_total = 0
    for meter in sorted(local):
        units, amount = local[meter]
        pid = price_ids.get(meter)
        s_units, s_amount = by_price.get(pid, [0, 0]) if pid else [0, 0]
        local_total += amount
        stripe_total += s_amount
        on_invoice = pid is not None and pid in by_price
        if on_invoice:
            why = explain(units, s_units, amount, s_amount, (undelivered or {}).get(meter, 0))
        elif preview.has_more:
            why = (f"not among the first {len(preview.lines)} lines of Stripe's preview, the"
                   " ones read: the preview has more lines than meterproxy reads, so this"
                   " meter's line may be on a later one")
        else:
            why = "not on Stripe's invoice: the subscription has no line for this meter's price"
        lines.append({
            "meter": meter, "price": pid, "local_units": units, "stripe_units": s_units,
            "local_amount": fmt_minor(amount, cur), "stripe_amount": fmt_minor(s_amount, cur),
            "difference": fmt_minor(s_amount - amount, cur),
            "difference_minor": s_amount - amount,
            "explanation": why})
    other_total = sum(int(o["amount_minor"]) for o in other)
    stripe_total += other_total
    out = {
        "currency": cur, "period": {"start": preview.period[0], "end": preview.period[1]},
        "lines": lines, "other_lines": other,
        "local_total": fmt_minor(local_total, cur), "stripe_total": fmt_minor(stripe_total, cur),
        "difference": fmt_minor(stripe_total - local_total, cur),
        "difference_minor": stripe_total - local_total,
        "complete": not preview.has_more,
    }
    if preview.has_more:
        out["note"] = (f"Stripe's preview has more lines than the {len(preview.lines)} read;"
                       " Stripe's total and the differences cover only those.")
    if local_credits is not None or preview.credits:
        mine = local_credits or 0
        d = preview.credits - mine
        out["credits"] = {
            "local": fmt_minor(mine, cur), "stripe": fmt_minor(preview.credits, cur),
            "difference": fmt_minor(d, cur), "difference_minor": d,
            "local_amount_due": fmt_minor(local_total - mine + other_total, cur),
            "stripe_amount_due": fmt_minor(stripe_total - preview.credits, cur),
            "explanation": "matches" if d == 0 else
            ("Stripe applies more credit than this period's usage took here: a grant voided or"
             " clawed back here is still live at Stripe, or usage not on Stripe's invoice yet"
             if d > 0 else
             "Stripe applies less credit than this period's usage took here: a grant not"
             " mirrored to Stripe yet, or one that expires before the invoice is finalized")}
    return out


BILLED_TOGETHER_NOTE = (
    "Your usage is billed together with other accounts on one Stripe invoice. Stripe's"
    " preview of that invoice includes their usage, so it is not shown here and is not"
    " compared with yours alone; your own usage and cost this period are above.")


def billed_together() -> dict[str, Any]:
    """The page's ``invoice_preview`` for a customer whose Stripe customer other local
    customers share: no Stripe number at all, only why."""
    return {"billed_together": True, "note": BILLED_TOGETHER_NOTE}


class PreviewCache:
    """Stripe invoice previews, bounded (see the module docstring)."""

    def __init__(self, client: StripeClient, ttl: float = PREVIEW_TTL,
                 max_entries: int = PREVIEW_MAX_ENTRIES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stripe = client
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self._done: OrderedDict[str, tuple[float, InvoicePreview | str]] = OrderedDict()
        self._flight: dict[str, asyncio.Task[InvoicePreview | str]] = {}
        self.calls = 0

    async def get(self, stripe_customer_id: str) -> InvoicePreview | str:
        """The preview, or why there is none (a sentence)."""
        hit = self._done.get(stripe_customer_id)
        if hit is not None and self.clock() < hit[0]:
            return hit[1]
        task = self._flight.get(stripe_customer_id)
        if task is None:
            task = asyncio.ensure_future(self._fetch(stripe_customer_id))
            self._flight[stripe_customer_id] = task
        return await asyncio.shield(task)

    async def _fetch(self, scid: str) -> InvoicePreview | str:
        self.calls += 1
        try:
            got: InvoicePreview | str = await self.stripe.preview_invoice(scid)
        except StripeCallError as exc:
            got = f"Stripe's invoice preview is unavailable: {exc.reason}"
        finally:
            self._flight.pop(scid, None)
        self._done[scid] = (self.clock() + self.ttl, got)
        self._done.move_to_end(scid)
        while len(self._done) > self.max_entries:
            self._done.popitem(last=False)
        return got
