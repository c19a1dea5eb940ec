"""Inbound Stripe webhooks: verify, store, acknowledge, then process in the background.

``POST /webhooks/stripe`` on the public port (no API key; the signature is the credential).

Delivery (Stripe delivers at least once, in no particular order, retrying for 3 days):
1. The ``Stripe-Signature`` header is checked with the SDK (HMAC-SHA256, any ``v1`` passes,
   timestamps older than 300 s refused) before anything is stored. Refused: 400, nothing kept.
2. The raw payload is stored under its event id (``INSERT OR IGNORE``): a redelivery is
   answered 200 ``duplicate`` and never processed twice. No secret configured: 503.
3. 200 is sent once that row is committed and before any processing. A crash after it leaves
   a ``pending`` row that the processor takes at the next start.
4. The processor takes events in arrival order, one at a time, but nothing relies on that
   order: each event is handled by its type alone and every effect is idempotent (grants on
   their idempotency key, suspension is a state), so a crash mid-event, a replay or any
   arrival order gives the same ledger. A ``customer.subscription.deleted`` that arrives
   before an older ``invoice.paid`` still lets that invoice grant; a stale
   ``customer.subscription.created|updated`` never moves the anchor back (its ``created`` is
   compared) and a plan change is keyed on its event id.

Mapping (``credits.packs`` / ``credits.plans`` are keyed by Stripe price id):
- ``invoice.paid``: each pack line grants ``pack.credits x quantity`` (lines of one price are
  summed), key ``stripe:<invoice id>:<price id>``, source ``stripe:<invoice id>``, expiring
  ``expires_in`` after the event's ``created``. A plan line (not a proration) on a
  subscription invoice (``billing_reason`` subscription_create / subscription_cycle /
  subscription_update) grants that line's period: key
  ``stripe:plan:<subscription>:<period start>``, effective from the period start and expiring
  at the period end (docs/credits.md, "Plan periods"). ``reset``: ``allowance x quantity``.
  ``rollover``: what is left of the same subscription's previous period grant is expired and carried into the new grant
  (``rollover_grant``, capped at ``cap x quantity``), so the ledger still sums. A period
  that arrives after a later period was already granted carries nothing (that later grant
  already carried what it could).
- ``checkout.session.completed`` / ``.async_payment_succeeded`` (mode ``payment``, paid):
  packs from ``line_items`` when the payload has them (Stripe's webhook payloads omit them
  unless expanded) or from ``metadata.meterproxy_price`` (+ ``meterproxy_quantity``). Keyed
  on the session's invoice id when it has one, else on the session id: a purchase seen both
  as a session and as its invoice grants once. Sessions without either are ignored: let the
  invoice's ``invoice.paid`` grant (enable ``invoice_creation``).
- ``invoice.created`` / ``invoice.finalized`` of a renewal (subscription_cycle): the plan
  grant is made before payment (``plan_invoices`` state ``open``); ``invoice.voided`` /
  ``invoice.marked_uncollectible`` (or the subscription deleted while open) claw it back.
  A rollover period paid before it starts waits (``waiting_period``) until it starts.
- ``customer.subscription.created`` / ``.updated``: the billing anchor follows the
  subscription (monthly ones); a plan change within a period grants the prorated difference
  (``proxy.credits.plans.prorate_allowance``).
- ``customer.subscription.deleted``: the customer is suspended (403 ``customer_suspended``
  from the next request) unless it still holds live, unspent credits from paid packs: those
  were paid for and stay usable (docs/credits.md). ``invoice.payment_failed``:
  ``credits.on_payment_failed`` (none: ignored; suspend: suspended unless that invoice's
  ``invoice.paid`` was already received); the suspension records the unpaid invoice
  (``customers.suspended_for``) and that invoice's ``invoice.paid`` lifts it once no
  other failed invoice is outstanding and the subscription was not deleted: both reasons
  are kept together (``subscription_deleted;payment_failed:<invoice>,...``), so the three
  events end the same in any order. A deletion's suspension is lifted by an operator only;
  a suspension by an operator (any status set through ``POST /admin/customers``) is never
  lifted by a webhook.
- ``charge.refunded`` / ``charge.dispute.created`` / ``credit_note.created``: claw back
  the refunded / disputed / credited share of the credits the payment granted
  (``proxy.credits.service.CreditService.claw_back``). ``invoice_payment.paid`` (and an
  invoice's ``payments``) link a payment intent / charge to the invoice it paid, which API
  versions from 2025-03-31 no longer name on the Invoice or the Charge.

Our customer is found by ``stripe_customer_id``. None yet: ``waiting_customer``, retried
whenever the customer cache reloads (an admin/CLI change) and every ``retry_interval``: the
customer may be created after Stripe's first events. Statuses: pending -> processed |
ignored | waiting_customer | waiting_period | failed (``result`` says why; any stored event can
be replayed).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from proxy import metrics
from proxy.config import Config
from proxy.credits.book import DEFERRED_EXPIRY_RETRY
from proxy.credits.ledger import Entry, carry, rollover_grant
from proxy.credits.plans import (
    monthly_anchor,
    new_cycle,
    prorate_allowance,
    subscription_items,
    subscription_period,
)
from proxy.credits.service import CreditService
from proxy.errors import (
    HttpError,
    InvalidInput,
    StorageOutcomeUnknown,
    StorageUnavailable,
    WebhookSignatureInvalid,
)
from proxy.loglimit import LogLimiter
from proxy.store.db import Store
from proxy.store.keys import KeyCache, SqliteCustomers
from proxy.store.protocols import Customers, LedgerEntry, StoredEvent, WebhookEvents
from proxy.store.webhooks import SqliteWebhookEvents
from proxy.stripe.client import StripeClient
from proxy.tasks import wait_event
from proxy.timeutil import rfc3339
from proxy.units import fmt_micro, to_micro

# the store could not be reached (SQLite or the fleet's PostgreSQL): an event is left as it
# was (pending) and retried, never recorded as failed; intake answers 503 so Stripe resends
# a locked SQLite past storage.lock_wait (StorageUnavailable), PostgreSQL unreachable
# (PgUnavailable, a StorageOutcomeUnknown): the event stays pending and is processed again
STORE_DOWN: tuple[type[Exception], ...] = (sqlite3.Error, StorageUnavailable,
                                           StorageOutcomeUnknown)

log = logging.getLogger("meterproxy.webhooks")

PATH = "/webhooks/stripe"
MAX_BODY = 1024 * 1024
TOLERANCE = 300
# how long after its period starts a rollover renewal waits at most for the requests
# admitted on the previous period's grant (seconds): a WebSocket session holds its admission
# for its whole life, and the paid period's allowance must not wait for it
ROLLOVER_SETTLE_WAIT = 60
# why a rollover renewal waits while the previous period's grant is still in use
_IN_USE = ("a request admitted on the previous period's grant before it expired is in flight:"
           " what that grant leaves to carry is known once the request settles")
STATUSES = ("pending", "processed", "ignored", "waiting_customer", "waiting_period", "failed")
# subscription_update: a plan line that is not a proration is a whole new period (a plan
# change that reset the billing cycle anchor)
_PLAN_REASONS = frozenset({"subscription_create", "subscription_cycle", "subscription",
                           "subscription_update"})
_OPEN = frozenset({"invoice.created", "invoice.finalized"})
_UNPAID = frozenset({"invoice.voided", "invoice.marked_uncollectible"})
_SUB_CHANGED = frozenset({"customer.subscription.created", "customer.subscription.updated"})
_CHECKOUT = frozenset({"checkout.session.completed", "checkout.session.async_payment_succeeded"})
_COLS = "id, type, created, status, result, received_at, processed_at"
_MAX_CREATED = 253_402_300_799   # 9999-12-31T23:59:59Z
# ``customers.suspended_for`` of a webhook's suspension: ``subscription_deleted``,
# ``payment_failed:<invoice>[,<invoice>...]`` or both, the deletion first
# (``subscription_deleted;payment_failed:<invoice>,...``); the first two are what earlier
# versions wrote, and an earlier version reading the third sees a reason that is not a
# failed payment and never lifts it
_FAILED = "payment_failed:"
_DELETED = "subscription_deleted"
_REASON_SEP = ";"
_META_CUSTOMER = "meterproxy_customer"     # names the local customer on a shared Stripe customer


def _invoice_payment_refs(inv: dict[str, Any]) -> list[str]:
    """Payment ids in ``invoice.payments`` (when the payload includes them)."""
    data = _get(inv, "payments", "data")
    out: list[str] = []
    for p in data if isinstance(data, list) else ():
        for k in ("payment_intent", "charge"):
            r = _id(_get(p, "payment", k))
            if r:
                out.append(r)
    return out


def _dispute_refs(dp: dict[str, Any]) -> list[str]:
    return [r for r in (_id(dp.get("charge")), _id(dp.get("payment_intent"))) if r]


def _minor(v: Any) -> int:
    """An amount in minor units from a payload (absent or malformed: 0)."""
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


def _parse_reason(why: str | None) -> tuple[bool, frozenset[str]] | None:
    """(subscription deleted, unpaid invoices) of a webhook's suspension reason; None for no
    reason (an operator's suspension) or one that is not a webhook's."""
    if not why:
        return None
    deleted, unpaid = False, frozenset[str]()
    for part in why.split(_REASON_SEP):
        if part == _DELETED and not deleted and not unpaid:
            deleted = True
        elif part.startswith(_FAILED) and not unpaid and len(part) > len(_FAILED):
            unpaid = frozenset(part[len(_FAILED):].split(","))
        else:
            return None
    return deleted, unpaid


def _reason(deleted: bool, unpaid: frozenset[str]) -> str | None:
    """The stored form of (subscription deleted, unpaid invoices): ``_parse_reason``'s inverse."""
    parts = ([_DELETED] if deleted else []) + ([_FAILED + ",".join(sorted(unpaid))] if unpaid else [])
    return _REASON_SEP.join(parts) or None




# ---- reading Stripe objects (pure; both the pre- and post-2025 API shapes) ------------------

def _id(v: Any) -> str | None:
    """An id field that may be a string or an expanded object."""
    if isinstance(v, dict):
        v = v.get("id")
    return v if isinstance(v, str) and v else None


def _get(d: Any, *path: str) -> Any:
    for k in path:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


@dataclass(frozen=True, slots=True)
class Line:
    price: str
    quantity: int
    period: tuple[int, int] | None = None
    proration: bool = False
    subscription: str | None = None


def line_price(li: dict[str, Any]) -> str | None:
    """``price`` (object or id) before API 2025-03-31; ``pricing.price_details.price`` after."""
    return _id(li.get("price")) or _id(_get(li, "pricing", "price_details", "price"))


def _quantity(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 1


def parse_line(li: Any) -> Line | None:
    if not isinstance(li, dict):
        return None
    price = line_price(li)
    if price is None:
        return None
    start, end = _get(li, "period", "start"), _get(li, "period", "end")
    period = (start, end) if isinstance(start, int) and isinstance(end, int) else None
    sub_item = _get(li, "parent", "subscription_item_details") or {}
    proration = bool(li.get("proration") or _get(sub_item, "proration")
                     or _get(li, "parent", "invoice_item_details", "proration"))
    sub = _id(li.get("subscription")) or _id(_get(sub_item, "subscription"))
    return Line(price, _quantity(li.get("quantity")), period, proration, sub)


def invoice_lines(inv: dict[str, Any]) -> list[Line]:
    return [ln for li in (_get(inv, "lines", "data") or []) if (ln := parse_line(li))]


def invoice_subscription(inv: dict[str, Any]) -> str | None:
    return _id(inv.get("subscription")) or _id(_get(inv, "parent", "subscription_details",
                                                    "subscription"))


def session_lines(s: dict[str, Any]) -> list[Line]:
    lines = [ln for li in (_get(s, "line_items", "data") or []) if (ln := parse_line(li))]
    if lines:
        return lines
    price = _get(s, "metadata", "meterproxy_price")
    if not isinstance(price, str) or not price:
        return []
    q = _get(s, "metadata", "meterproxy_quantity")
    return [Line(price, int(q) if isinstance(q, str) and q.isdigit() and int(q) > 0 else 1)]


# ---- the receiver ------------------------------------------------------------------------------

@dataclass(slots=True)
class Outcome:
    status: str
    result: dict[str, Any]


class WebhookReceiver:
    def __init__(self, store: Store, keys: KeyCache, credits: CreditService, cfg: Config,
                 *, retry_interval: float = 60.0, clock: Callable[[], float] = time.time,
                 events: WebhookEvents | None = None, customers: Customers | None = None,
                 ) -> None:
        self.store = store
        self.events: WebhookEvents = events if events is not None else SqliteWebhookEvents(store)
        self.customers: Customers = customers if customers is not None \
            else SqliteCustomers(store)
        self.keys = keys
        self.credits = credits
        self.cfg = cfg
        self.retry_interval = retry_interval
        self.clock = clock
        self._wake = asyncio.Event()
        self._seen_customers: object = None
        self._next_retry = 0.0
        self._period_due = 0.0      # when a waiting_period event is processed again
        self.refusals = LogLimiter(log)   # forged webhooks: anybody can POST to the public port
        # monetary credits: an invoice finalized (customer, its usage period's end), so the
        # Stripe grants of local grants that expired by then can go (MonetaryService)
        self.on_finalized: Callable[[str, int], Awaitable[None]] | None = None

    # ---- the endpoint ---------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.Response:
        """``POST /webhooks/stripe`` on the public port (routed by the pipeline); a refusal is
        raised as ``HttpError`` and answered by ``proxy.http_errors``."""
        if request.method != "POST":
            raise HttpError(f"Only POST is accepted on {PATH}.",
                            status=405, type_="method_not_allowed")
        secret = self.cfg.stripe.webhook_secret
        if not secret:
            raise HttpError("stripe.webhook_secret is not configured.",
                            status=503, type_="webhooks_disabled")
        body = await _read_capped(request, MAX_BODY)
        if body is None:
            raise HttpError(f"Webhook bodies are limited to {MAX_BODY} bytes.",
                            status=413, type_="payload_too_large")
        try:
            StripeClient.verify_webhook_signature(body, request.headers.get("Stripe-Signature"),
                                                  secret, TOLERANCE)
        except WebhookSignatureInvalid as exc:
            metrics.AUTH_FAIL_WEBHOOK.inc()
            self.refusals.log(logging.WARNING, "webhook signature refused", "webhook refused: %s",
                          str(exc).split("\n")[0][:200])
            raise HttpError(str(exc).split("\n")[0], status=400,
                            type_="invalid_signature") from exc
        try:
            event = orjson.loads(body)
        except orjson.JSONDecodeError:
            event = None
        if not (isinstance(event, dict) and isinstance(event.get("id"), str)
                and isinstance(event.get("type"), str)):
            raise HttpError("The body is not a Stripe event.", status=400, type_="invalid_payload")
        created = event.get("created")
        if isinstance(created, bool) or not isinstance(created, int) \
                or not 0 <= created <= _MAX_CREATED:
            created = None      # not a time we can show (RFC 3339 ends at year 9999)
        try:
            inserted = await self.events.record(event["id"], event["type"], created,
                                                body.decode(), int(self.clock()))
        except STORE_DOWN as exc:
            log.error("cannot store webhook %s: %s", event["id"], exc)
            raise HttpError("The event could not be stored; retry.",
                            status=503, type_="storage_unavailable") from exc
        if not inserted:
            return web.json_response({"received": True, "duplicate": True})
        self._wake.set()
        return web.json_response({"received": True})

    # ---- the processor ----------------------------------------------------------------------

    async def run(self, poll: float = 1.0) -> None:
        """Background task: process pending events (and waiting ones when customers change)."""
        while True:
            self._wake.clear()
            try:
                await self.drain()
            except STORE_DOWN:
                log.exception("webhook processing paused: storage error")
            await wait_event(self._wake, poll)

    async def drain(self) -> int:
        """Process every pending event in arrival order; returns how many were processed."""
        statuses: tuple[str, ...] = ("pending", "waiting_customer") if self._retry_waiting() \
            else ("pending",)
        if self.clock() >= self._period_due:
            self._period_due = float("inf")
            statuses = (*statuses, "waiting_period")
        cursor, n = 0, 0
        while True:
            rows = await self.events.waiting(statuses, cursor, 100)
            if not rows:
                return n
            for rowid, event_id in rows:
                cursor = rowid
                await self.process(event_id)
                n += 1
                await asyncio.sleep(0)   # let requests through between events

    def _retry_waiting(self) -> bool:
        customers, now = self.keys.customers, time.monotonic()
        if customers is self._seen_customers and now < self._next_retry:
            return False
        self._seen_customers, self._next_retry = customers, now + self.retry_interval
        return True

    async def process(self, event_id: str) -> Outcome:
        """Process (or re-process) one stored event and record its outcome."""
        payload = await self.events.payload(event_id)
        if payload is None:
            raise LookupError(f"no webhook event {event_id!r}")
        try:
            out = await self._dispatch(orjson.loads(payload))
        except STORE_DOWN:        # the store, not the event: stays pending, retried later
            raise
        except Exception as exc:   # any bad event must not stop the others
            log.warning("webhook %s failed: %s", event_id, exc)
            out = Outcome("failed", {"reason": f"{type(exc).__name__}: {exc}"})
        done = int(self.clock())
        await self.events.set_outcome(event_id, out.status, orjson.dumps(out.result).decode(),
                                      done)
        log.info("webhook %s: %s %s", event_id, out.status, out.result)
        return out

    async def _dispatch(self, event: dict[str, Any]) -> Outcome:
        etype, obj = event.get("type"), _get(event, "data", "object")
        handlers: dict[str, Callable[[str, dict[str, Any], dict[str, Any]],
                                     Awaitable[Outcome]]] = {
            "invoice.paid": self._invoice_paid,
            "customer.subscription.deleted": self._subscription_deleted,
            "invoice.payment_failed": self._payment_failed,
            "charge.refunded": self._refunded,
            "charge.dispute.created": self._disputed,
            "credit_note.created": self._credit_note,
            "invoice_payment.paid": self._invoice_payment,
        } | dict.fromkeys(_CHECKOUT, self._checkout) | dict.fromkeys(_OPEN, self._invoice_open) \
            | dict.fromkeys(_UNPAID, self._invoice_unpaid) \
            | dict.fromkeys(_SUB_CHANGED, self._subscription_changed)
        handler = handlers.get(etype) if isinstance(etype, str) else None
        if handler is None:
            return Outcome("ignored", {"reason": f"event type {etype!r} is not mapped"})
        if not isinstance(obj, dict):
            raise ValueError("the event has no data.object")
        scid = _id(obj.get("customer"))
        if etype == "invoice_payment.paid":
            return await self._invoice_payment("", event, obj)     # links ids; names no customer
        if scid is None and etype == "charge.dispute.created":
            # a dispute names its charge, not the customer: the grant it paid for does
            cid = await self.credits.payment_customer(_dispute_refs(obj))
            if cid is None:
                return Outcome("ignored", {"reason": "no grant was paid by the disputed charge"})
            return await handler(cid, event, obj)
        if scid is None:
            return Outcome("ignored", {"reason": "the object names no customer"})
        found = await self.customers.by_stripe_id(scid)
        if not found:
            return Outcome("waiting_customer", {"reason": f"no customer has stripe_customer_id"
                                                          f" {scid!r} yet; retried when one does"})
        if len(found) > 1:
            cid = await self._shared_target(found, str(etype), obj)
            if cid is None:
                raise ValueError(f"customers {found} share stripe_customer_id {scid!r} and the"
                                 f" event names none of them: set metadata.{_META_CUSTOMER} on"
                                 " the subscription, checkout session or invoice")
            return await handler(cid, event, obj)
        return await handler(found[0], event, obj)

    async def _shared_target(self, found: list[str], etype: str, obj: dict[str, Any]) -> str | None:
        """Which of several local customers on one Stripe customer an event is for: the one
        named by ``metadata.meterproxy_customer`` (on the object, or on the subscription an
        invoice copies it from), else the one whose grant the payment bought (refunds,
        disputes, credit notes), else the one a subscription already granted to."""
        for meta in (obj.get("metadata"),
                     _get(obj, "parent", "subscription_details", "metadata"),
                     _get(obj, "subscription_details", "metadata")):
            named = meta.get(_META_CUSTOMER) if isinstance(meta, dict) else None
            if isinstance(named, str) and named in found:
                return named
        refs: list[str] = []
        if etype == "charge.refunded":
            refs = [r for r in (_id(obj.get("id")), _id(obj.get("payment_intent")),
                                _id(obj.get("invoice"))) if r]
        elif etype == "credit_note.created":
            refs = [r for r in (_id(obj.get("invoice")),) if r]
        else:
            refs = [r for r in (_id(obj.get("id")),) if r and r.startswith(("in_", "cs_"))]
        owner = await self.credits.payment_customer(refs) if refs else None
        if owner in found:
            return owner
        sub = _id(obj.get("id")) if etype.startswith("customer.subscription.") \
            else invoice_subscription(obj)
        if sub is None and etype.startswith("invoice."):
            subs = {ln.subscription for ln in invoice_lines(obj)} - {None}
            sub = subs.pop() if len(subs) == 1 else None
        owner = await self.credits.ledger.subscription_customer(sub) if sub else None
        return owner if owner in found else None

    # ---- event types --------------------------------------------------------------------------

    async def _invoice_paid(self, cid: str, event: dict[str, Any], inv: dict[str, Any]) -> Outcome:
        inv_id = _id(inv.get("id"))
        if inv_id is None:
            raise ValueError("the invoice has no id")
        lines = invoice_lines(inv)
        paid_by = _invoice_payment_refs(inv)
        if paid_by:
            await self.credits.link_payment(paid_by, inv_id)
        payment = (tuple(r for r in (inv_id, _id(inv.get("charge")),
                                     _id(inv.get("payment_intent"))) if r),
                   _minor(inv.get("amount_paid")))
        granted = await self._grant_packs(cid, inv_id, lines, event, payment)
        notes: list[str] = []
        plan_lines = [ln for ln in lines if ln.price in self.cfg.credits.plans and not ln.proration]
        if any(ln.proration and ln.price in self.cfg.credits.plans for ln in lines):
            notes.append("proration lines grant nothing here: a plan change's allowance is"
                         " granted at customer.subscription.updated")
        sub = invoice_subscription(inv)
        waiting: int | None = None
        wait_reason = ""
        if plan_lines:
            reason = inv.get("billing_reason")
            line = plan_lines[0]
            sub = line.subscription or sub
            if reason not in _PLAN_REASONS:
                notes.append(f"plan line not granted: billing_reason {reason!r}")
            elif sub is None or line.period is None:
                notes.append("plan line not granted: no subscription or period")
            elif self._rollover_early(line):
                waiting = line.period[0]
                wait_reason = f"a rollover period starting {rfc3339(waiting)}: what the" \
                              " previous period leaves is known then; processed again at" \
                              " that time"
            elif await self._previous_in_use(cid, sub, line):
                waiting = int(self.clock() + DEFERRED_EXPIRY_RETRY)
                wait_reason = _IN_USE + f"; processed again at {rfc3339(waiting)}"
            else:
                granted.append(await self._grant_plan(cid, inv_id, sub, line, payment, "paid"))
            if len(plan_lines) > 1:
                notes.append("only the first plan line of an invoice grants")
        if _get(inv, "lines", "has_more"):
            notes.append("invoice lines truncated (has_more): only the included lines were mapped")
        reactivated = await self._cure(cid, inv_id)
        if waiting is not None:
            self._period_due = min(self._period_due, float(waiting))
            return Outcome("waiting_period", {
                "customer": cid, "grants": granted, "notes": notes, "reason": wait_reason})
        if not granted and not reactivated:
            return Outcome("ignored", {"customer": cid, "reason": "no configured price",
                                       "notes": notes})
        out: dict[str, Any] = {"customer": cid, "grants": granted, "notes": notes}
        if reactivated:
            out["reactivated"] = True
        return Outcome("processed", out)

    async def _checkout(self, cid: str, event: dict[str, Any], s: dict[str, Any]) -> Outcome:
        if s.get("mode") not in (None, "payment"):
            return Outcome("ignored", {"customer": cid,
                                       "reason": f"mode {s.get('mode')!r}: plans grant from invoice.paid"})
        if event.get("type") == "checkout.session.completed" and \
                s.get("payment_status") not in ("paid", "no_payment_required"):
            return Outcome("ignored", {"customer": cid, "reason": "not paid yet (async payment)"})
        base = _id(s.get("invoice")) or _id(s.get("id"))
        lines = session_lines(s)
        if base is None or not lines:
            return Outcome("ignored", {"customer": cid, "reason": "no line items or metadata"
                                       " on the session; the invoice's invoice.paid grants"})
        payment = (tuple(r for r in (_id(s.get("id")), _id(s.get("invoice")),
                                     _id(s.get("payment_intent"))) if r),
                   _minor(s.get("amount_total")))
        granted = await self._grant_packs(cid, base, lines, event, payment)
        if not granted:
            return Outcome("ignored", {"customer": cid, "reason": "no configured price"})
        return Outcome("processed", {"customer": cid, "grants": granted})

    async def _invoice_open(self, cid: str, event: dict[str, Any],
                            inv: dict[str, Any]) -> Outcome:
        """``invoice.created`` / ``invoice.finalized`` of a renewal (``subscription_cycle``):
        the new period's allowance is granted now, effective from the period start, before
        the payment (Stripe finalizes about an hour later and may retry payment for days).
        If the invoice is never paid (voided, uncollectible, or the subscription deleted),
        the grant is clawed back (docs/credits.md). Only renewals: a first invoice
        (``subscription_create``) grants when it is paid."""
        inv_id = _id(inv.get("id"))
        if inv_id is None:
            raise ValueError("the invoice has no id")
        if event.get("type") == "invoice.finalized" and self.on_finalized is not None \
                and isinstance(inv.get("period_end"), int):
            await self.on_finalized(cid, int(inv["period_end"]))
        if inv.get("billing_reason") != "subscription_cycle":
            return Outcome("ignored", {"customer": cid, "reason": "not a renewal invoice"})
        if inv.get("status") in ("void", "uncollectible"):
            return Outcome("ignored", {"customer": cid, "reason": f"invoice {inv.get('status')}"})
        lines = [ln for ln in invoice_lines(inv)
                 if ln.price in self.cfg.credits.plans and not ln.proration]
        sub = (lines[0].subscription if lines else None) or invoice_subscription(inv)
        if not lines or sub is None or lines[0].period is None:
            return Outcome("ignored", {"customer": cid, "reason": "no plan line with a"
                                                                  " subscription and period"})
        if self._rollover_early(lines[0]):
            return Outcome("ignored", {"customer": cid, "reason": "a rollover period that has"
                                                                  " not started: granted when"
                                                                  " paid"})
        state = await self.credits.ledger.plan_invoice_state(inv_id)
        if state is not None and state != "open":
            return Outcome("ignored", {"customer": cid, "reason": f"invoice already {state}"})
        if await self._previous_in_use(cid, sub, lines[0]):
            retry = int(self.clock() + DEFERRED_EXPIRY_RETRY)
            self._period_due = min(self._period_due, float(retry))
            return Outcome("waiting_period", {
                "customer": cid, "reason": _IN_USE + f"; processed again at {rfc3339(retry)}"})
        payment = ((inv_id,), _minor(inv.get("amount_due")))
        info = await self._grant_plan(cid, inv_id, sub, lines[0], payment, "open")
        return Outcome("processed", {"customer": cid, "grants": [info],
                                     "pending_payment": inv_id})

    async def _invoice_unpaid(self, cid: str, event: dict[str, Any],
                              inv: dict[str, Any]) -> Outcome:
        """``invoice.voided`` / ``invoice.marked_uncollectible``: a renewal granted before
        payment is clawed back (unused credit removed, spent credit becomes debt)."""
        inv_id = _id(inv.get("id"))
        if inv_id is None:
            raise ValueError("the invoice has no id")
        if await self.credits.ledger.plan_invoice_state(inv_id) != "open":
            return Outcome("ignored", {"customer": cid,
                                       "reason": "no allowance granted ahead of this invoice's"
                                                 " payment"})
        return self._clawed(cid, await self._write_off(cid, inv_id, str(event.get("id"))),
                            "unpaid invoice")

    async def _write_off(self, cid: str, inv_id: str, event_id: str) -> list[dict[str, Any]]:
        paid = await self.credits.ledger.paid_for(inv_id)
        # the whole grant, carried credits included: paid later, the allowance is granted
        # anew and carries them again
        out = await self.credits.claw_back(cid, [inv_id], max(paid, 1), f"unpaid:{inv_id}",
                                           event_id, fallback_paid=max(paid, 1),
                                           whole_grant=True)
        await self.credits.ledger.write_off_plan_invoice(inv_id, int(self.clock()))
        return out

    async def _subscription_changed(self, cid: str, event: dict[str, Any],
                              sub: dict[str, Any]) -> Outcome:
        """``customer.subscription.created|updated``: the billing anchor follows the
        subscription (finding 9); a plan change within a period grants the prorated
        difference of the allowances (finding 8)."""
        sid = _id(sub.get("id"))
        if sid is None:
            raise ValueError("the subscription has no id")
        created = event.get("created")
        at = created if isinstance(created, int) and not isinstance(created, bool) \
            else int(self.clock())
        out: dict[str, Any] = {"customer": cid, "subscription": sid}
        anchor, why = monthly_anchor(sub)
        if sub.get("status") in ("canceled", "incomplete_expired"):
            why = f"subscription {sub.get('status')}"
        if anchor is not None and why is None:
            if await self.customers.follow_anchor(cid, anchor, at):
                await self._reload_keys()
                out["billing_anchor"] = rfc3339(anchor)
            else:
                out["anchor_note"] = "a newer subscription event set the anchor"
        else:
            out["anchor_note"] = why
        cur = sub.get("currency")
        if isinstance(cur, str) and len(cur) == 3 and cur.isalpha() \
                and await self.customers.set_currency(cid, cur):
            # the subscription's currency is the customer's (Stripe fixes it at the first
            # subscription): prices with currency_options are shown in it
            await self._reload_keys()
            out["currency"] = cur.lower()
        prev_attrs = _get(event, "data", "previous_attributes")
        prev = _get(prev_attrs, "items")
        if prev is not None:
            change = await self._plan_change(cid, sid, sub, prev, at, str(event.get("id")),
                                       new_cycle(prev_attrs, sub))
            if change is not None:
                out["plan_change"] = change
        return Outcome("processed", out)

    def _allowance(self, items: list[Any]) -> int:
        plans = self.cfg.credits.plans
        return sum(_micro(plans[i.price].allowance) * i.quantity for i in items
                   if i.price in plans)

    async def _plan_change(self, cid: str, sid: str, sub: dict[str, Any], prev: Any, at: int,
                           event_id: str, cycle_reset: bool) -> dict[str, Any] | None:
        new_items, old_items = subscription_items(sub.get("items")), subscription_items(prev)
        new, old = self._allowance(new_items), self._allowance(old_items)
        if new == old:
            return None
        plan_items = [i for i in new_items if i.price in self.cfg.credits.plans]
        period = subscription_period(sub, plan_items[0] if plan_items else None)
        current = await self.credits.ledger.plan_grant_for(cid, sid, at)
        if period is None and current is not None:
            period = current[1], current[2]
        info: dict[str, Any] = {"old_allowance": fmt_micro(old), "new_allowance": fmt_micro(new)}
        if period is None:
            info["note"] = "no current period known: nothing prorated"
            return info
        start, end = period
        if cycle_reset or start >= at:
            info["note"] = "the change started a new period: its invoice grants the allowance"
            return info
        extra = prorate_allowance(old, new, start, end, at)
        if extra <= 0:
            info["note"] = "a downgrade keeps this period's allowance; the next renewal" \
                           " grants the new one"
            return info
        plan = self.cfg.credits.plans[plan_items[0].price]
        g, created = await self.credits.grant(
            cid, fmt_micro(extra), expires_at=end, priority=plan.priority,
            source=f"stripe:{event_id}",
            idempotency_key=f"stripe:planchange:{sid}:{start}:{event_id}",
            period=(start, end), effective_at=at)
        info.update(grant_id=g.id, credits=fmt_micro(g.amount), created=created,
                    prorated_from=rfc3339(at), period_end=rfc3339(end))
        return info

    async def _subscription_deleted(self, cid: str, event: dict[str, Any],
                                    sub: dict[str, Any]) -> Outcome:
        sid = _id(sub.get("id"))
        if sid is not None:      # renewals granted before payment that was never made
            for inv_id, _ in await self.credits.ledger.open_plan_invoices(cid, sid):
                await self._write_off(cid, inv_id, str(event.get("id")))
        kept = await self._paid_pack_credits(cid)
        if kept > 0:
            return Outcome("processed", {"customer": cid, "suspended": False,
                                         "subscription": _id(sub.get("id")),
                                         "kept_active": f"holds {fmt_micro(kept)} paid pack "
                                                        "credits"})
        return Outcome("processed", {"customer": cid,
                                     "suspended": await self._suspend(cid, deleted=True),
                                     "subscription": _id(sub.get("id"))})

    async def _payment_failed(self, cid: str, event: dict[str, Any], inv: dict[str, Any]) -> Outcome:
        if self.cfg.credits.on_payment_failed == "none":
            return Outcome("ignored", {"customer": cid, "reason": "on_payment_failed: none"})
        if await self.events.invoice_paid_seen(_id(inv.get("id"))):   # paid is final
            return Outcome("ignored", {"customer": cid, "reason": "the invoice was paid since"})
        inv_id = _id(inv.get("id"))
        if inv_id is None:
            raise ValueError("the invoice has no id")
        return Outcome("processed", {"customer": cid,
                                     "suspended": await self._suspend(cid, invoice=inv_id)})

    async def _invoice_payment(self, cid: str, event: dict[str, Any], ip: dict[str, Any]) -> Outcome:
        """``invoice_payment.paid`` (API 2025-03-31 on): which payment paid which invoice, so
        a later refund or dispute of that payment finds the invoice's grants."""
        inv = _id(ip.get("invoice"))
        refs = [r for r in (_id(_get(ip, "payment", "payment_intent")),
                            _id(_get(ip, "payment", "charge"))) if r]
        if inv is None or not refs:
            return Outcome("ignored", {"reason": "no invoice or payment named"})
        await self.credits.link_payment(refs, inv)
        return Outcome("processed", {"invoice": inv, "payments": refs})

    def _clawed(self, cid: str, out: list[dict[str, Any]], what: str) -> Outcome:
        if not out:
            return Outcome("ignored", {"customer": cid, "reason": f"no credits to take back for"
                                                                  f" this {what} (no grant from"
                                                                  " the payment, or already"
                                                                  " taken)"})
        return Outcome("processed", {"customer": cid, "clawed_back": out})

    async def _refunded(self, cid: str, event: dict[str, Any], ch: dict[str, Any]) -> Outcome:
        """``amount_refunded`` is cumulative: one key per charge, the difference is taken."""
        ch_id = _id(ch.get("id"))
        if ch_id is None:
            raise ValueError("the charge has no id")
        refs = [ch_id, _id(ch.get("payment_intent")) or "", _id(ch.get("invoice")) or ""]
        out = await self.credits.claw_back(cid, refs, _minor(ch.get("amount_refunded")),
                                           f"refund:{ch_id}", str(event.get("id")),
                                           fallback_paid=_minor(ch.get("amount")))
        return self._clawed(cid, out, "refund")

    async def _disputed(self, cid: str, event: dict[str, Any], dp: dict[str, Any]) -> Outcome:
        dp_id = _id(dp.get("id"))
        if dp_id is None:
            raise ValueError("the dispute has no id")
        out = await self.credits.claw_back(cid, _dispute_refs(dp), _minor(dp.get("amount")),
                                           f"dispute:{dp_id}", str(event.get("id")))
        return self._clawed(cid, out, "dispute")

    async def _credit_note(self, cid: str, event: dict[str, Any], cn: dict[str, Any]) -> Outcome:
        """The part of a credit note that is not a refund (customer balance, out of band):
        its refunds arrive as ``charge.refunded`` and are taken back there."""
        cn_id, inv = _id(cn.get("id")), _id(cn.get("invoice"))
        if cn_id is None or inv is None:
            raise ValueError("the credit note has no id or invoice")
        total = cn.get("post_payment_amount")
        total = _minor(total) if isinstance(total, int) else _minor(cn.get("amount"))
        refunds = cn.get("refunds")
        refunded = sum(_minor(r.get("amount_refunded")) for r in refunds
                       if isinstance(r, dict)) if isinstance(refunds, list) else 0
        out = await self.credits.claw_back(cid, [inv], max(total - refunded, 0),
                                           f"credit_note:{cn_id}", str(event.get("id")))
        return self._clawed(cid, out, "credit note")

    # ---- effects (each idempotent) -------------------------------------------------------------

    async def _suspend(self, cid: str, *, deleted: bool = False,
                       invoice: str | None = None) -> bool:
        """Suspend for the subscription's deletion and/or an unpaid invoice; returns whether
        the status changed. The reasons accumulate in ``suspended_for`` (``_reason``): a
        deletion is never dropped because the customer is already suspended for a failed
        payment, nor the reverse. An operator's suspension (no reason) or a reason that is
        not ours keeps its owner. The cache reload makes the very next request see it."""
        before = self.keys.customers.get(cid)
        add = frozenset((invoice,)) if invoice is not None else frozenset()

        def decide(status: str, why: str | None) -> tuple[str, str | None] | None:
            if status != "suspended":
                return "suspended", _reason(deleted, add)
            held = _parse_reason(why)
            if held is None:
                return None                 # the operator's, or a reason that is not ours
            return "suspended", _reason(held[0] or deleted, held[1] | add)

        await self.customers.change_suspension(cid, decide)
        await self._reload_keys()
        return before is None or before.status != "suspended"

    async def _cure(self, cid: str, inv_id: str) -> bool:
        """``invoice.paid`` for an invoice a suspension waits on: drop it from the reason and
        reactivate once neither a failed invoice nor the subscription's deletion is left.
        Returns whether reactivated."""
        cured = False

        def decide(status: str, why: str | None) -> tuple[str, str | None] | None:
            nonlocal cured
            held = _parse_reason(why) if status == "suspended" else None
            if held is None or inv_id not in held[1]:
                return None
            deleted, unpaid = held[0], held[1] - {inv_id}
            if deleted or unpaid:
                return "suspended", _reason(deleted, unpaid)
            cured = True
            return "active", None

        await self.customers.change_suspension(cid, decide)
        if cured:
            await self._reload_keys()
            log.info("customer %s reactivated: invoice %s paid", cid, inv_id)
        return cured

    async def _reload_keys(self) -> None:
        """The cache reload that makes the very next request see a status change."""
        snap = await self.customers.snapshot()
        self.keys.replace(snap.keys, snap.customers)

    async def _paid_pack_credits(self, cid: str) -> int:
        """Live credits left on grants bought as packs through Stripe (not plan allowances,
        not operator grants)."""
        # stripe:plan:... (allowances) and stripe:planchange:... (prorated upgrades)
        ids = await self.credits.ledger.grant_ids(cid, "stripe:", exclude_prefix="stripe:plan")
        now = self.clock()
        return sum(g.remaining for g in self.credits.book.grants(cid)
                   if g.id in ids and g.live(now))

    async def _grant_packs(self, cid: str, base: str, lines: list[Line], event: dict[str, Any],
                     payment: tuple[tuple[str, ...], int] | None = None
                     ) -> list[dict[str, Any]]:
        qty: dict[str, int] = {}
        for ln in lines:
            if ln.price in self.cfg.credits.packs:
                qty[ln.price] = qty.get(ln.price, 0) + ln.quantity
        ts = event.get("created")
        created = ts if isinstance(ts, int) else int(self.clock())
        out = []
        for price, q in qty.items():
            pack = self.cfg.credits.packs[price]
            expires = None if pack.expires_in is None else created + int(pack.expires_in)
            g, new = await self.credits.grant(cid, fmt_micro(_micro(pack.credits) * q),
                                              expires_at=expires, priority=pack.priority,
                                              source=f"stripe:{base}",
                                              idempotency_key=f"stripe:{base}:{price}",
                                              payment=payment)
            out.append({"grant_id": g.id, "price": price, "credits": fmt_micro(g.amount),
                        "created": new})
        return out

    def _rollover_early(self, line: Line) -> bool:
        """A rollover period that has not started: the carry is unknown until it does."""
        plan = self.cfg.credits.plans[line.price]
        return plan.mode == "rollover" and line.period is not None \
            and line.period[0] > self.clock()

    async def _previous_in_use(self, cid: str, sub: str, line: Line) -> bool:
        """A rollover renewal whose previous period grant a request admitted before that
        grant expired still settles on (docs/credits.md, "Settlement"): closing it
        now would expire credits the request is covered by, turning its cost into debt (or
        billed overage) while the same credits are carried. The renewal waits for it, up to
        ``ROLLOVER_SETTLE_WAIT`` after the period's start (the new period's allowance is not
        granted meanwhile: a long-lived request must not withhold it)."""
        plan = self.cfg.credits.plans[line.price]
        if plan.mode != "rollover" or line.period is None \
                or self.clock() >= line.period[0] + ROLLOVER_SETTLE_WAIT:
            return False    # (a request still in flight then, a WebSocket, settles as debt)
        prev = await self.credits.ledger.previous_period_grant(cid, f"stripe:plan:{sub}:",
                                                               line.period[0])
        return prev is not None and self.credits.book.expiry_deferred(prev)

    async def _grant_plan(self, cid: str, inv_id: str, sub: str, line: Line,
                          payment: tuple[tuple[str, ...], int] | None,
                          state: str) -> dict[str, Any]:
        """The allowance of the line's period, effective from the period's start whenever
        the invoice is created or paid (finding 1). ``state``: ``open`` when granted at the
        renewal invoice's creation (clawed back if it is never paid), ``paid``."""
        assert line.period is not None
        plan = self.cfg.credits.plans[line.price]
        start, end = line.period
        key = f"stripe:plan:{sub}:{start}"
        if await self.credits.ledger.plan_invoice_state(inv_id) == "unpaid":
            key += f":paid:{inv_id}"     # paid after it was written off: granted anew
        allowance = _micro(plan.allowance) * line.quantity
        amount, carried = allowance, 0
        info: dict[str, Any] = {"price": line.price, "period_start": rfc3339(start),
                                "period_end": rfc3339(end)}
        if plan.mode == "rollover" and not await self.credits.ledger.has_grant(cid, key):
            carried, prev = await self._close_previous(cid, sub, start,
                                                       plan.rollover_expiry == "next_period")
            cap = None if plan.cap is None else _micro(plan.cap) * line.quantity
            amount = rollover_grant(allowance, carried, cap)
            # a period granted anew after a write-off (``:paid:``) carries the previous
            # grant's credits again; what a refund of the previous payment followed out of
            # it into the written-off grant was taken already (had the refund come first,
            # nothing of it would have been carried): that much less is carried
            if prev is not None and (gone := await self.credits.ledger.followed_out(prev)):
                amount -= min(gone, amount - allowance)
        g, new = await self.credits.grant(cid, fmt_micro(amount), expires_at=end,
                                          priority=plan.priority, source=f"stripe:{inv_id}",
                                          idempotency_key=key, period=(start, end),
                                          payment=payment, effective_at=start,
                                          carried=amount - allowance)
        await self.credits.ledger.record_plan_invoice(inv_id, g.id, cid, sub, state,
                                                      int(self.clock()))
        info.update(grant_id=g.id, credits=fmt_micro(g.amount), created=new)
        if plan.mode == "rollover" and new:
            info["carried"] = fmt_micro(carried)
        return info

    async def _close_previous(self, cid: str, sub: str, start: int,
                              once: bool) -> tuple[int, str | None]:
        """Expire what is left of the subscription's previous period grant and return the
        amount to carry (and the grant closed): what it had left at the boundary (remaining + already expired), and
        with ``once`` no more than its own allowance (``proxy.credits.ledger.carry``). Stable
        under re-processing: a second run finds it expired and returns the same amount."""
        prefix = f"stripe:plan:{sub}:"
        # None also when a later period was granted first and already carried
        prev_id = await self.credits.ledger.previous_period_grant(cid, prefix, start)
        prev = self.credits.book.grant(prev_id) if prev_id else None
        if prev is None:
            return 0, None
        expired = await self.credits.ledger.entry_total(prev.id, "expire")
        left = prev.remaining if not prev.voided else 0
        if left > 0:
            entry = Entry(prev.id, "expire", left)
            at = min(self.clock(), float(prev.expires_at or self.clock()))
            await self.credits.ledger.append([LedgerEntry(cid, entry, at=at)])
            self.credits.book.apply([entry])
            # what the ledger expired: ``left`` in a single process; in fleet mode the
            # expiry is capped by what the shared ledger says the grant holds (a member's
            # book may not have seen another member's spending yet), and only that is left
            # to carry
            expired, left = await self.credits.ledger.entry_total(prev.id, "expire"), 0
        return carry(int(expired) + left, prev.amount,
                     await self.credits.ledger.grant_carried(prev.id), once), prev.id

    # ---- views (admin) ------------------------------------------------------------------------

    async def list_events(self, status: str | None = None,
                          limit: int = 100) -> list[dict[str, Any]]:
        if status is not None and status not in STATUSES:
            raise InvalidInput(f"status must be one of {', '.join(STATUSES)}")
        return [_event_json(e) for e in await self.events.recent(status, limit)]

    async def get_event(self, event_id: str) -> dict[str, Any]:
        e = await self.events.get(event_id)
        if e is None:
            raise LookupError(f"no webhook event {event_id!r}")
        out = _event_json(e)
        out["payload"] = orjson.loads(e.payload or "null")
        return out


def _micro(value: str) -> int:
    try:
        return to_micro(value)
    except ValueError as exc:
        raise InvalidInput(f"configured credits {value!r}: {exc}") from exc


def _event_json(e: StoredEvent) -> dict[str, Any]:
    eid, etype, created, status, result = e.id, e.type, e.created, e.status, e.result
    received, processed = e.received_at, e.processed_at
    return {"id": eid, "type": etype, "created": rfc3339(created) if created else None,
            "status": status, "result": orjson.loads(result) if result else None,
            "received_at": rfc3339(received),
            "processed_at": rfc3339(processed) if processed else None}


async def _read_capped(request: web.BaseRequest, cap: int) -> bytes | None:
    if request.content_length is not None and request.content_length > cap:
        return None
    buf = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        buf += chunk
        if len(buf) > cap:
            return None
    return bytes(buf)
