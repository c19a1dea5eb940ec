"""The one module that talks to the stripe SDK: :class:`StripeClient` has a named method
for every call meterproxy makes, and :func:`translate` is the one mapping from a failed call
(stripe errors, aiohttp/asyncio errors) to meterproxy's own exceptions
(:class:`~proxy.errors.StripeCallError` and its subclasses).

Invariants
  * The SDK never retries (``max_network_retries=0``): the flusher owns retries, backoff,
    the circuit breaker and the rate limit; one method call is one attempt per HTTP call.
  * No other module imports the SDK or catches a stripe or aiohttp exception. Every SDK
    call goes through :func:`_call`, which raises what :func:`translate` returns.
  * Methods return plain values (dicts, dataclasses), never SDK objects.

Classification (documented in :func:`translate`)
  connection error / timeout / 5xx / 409 / 429 -> StripeUnavailable (429 ``lock_timeout``
                                                 flagged)
  401 / 403                                   -> StripeUnavailable (an operator problem: a
                                                 revoked or restricted key gets fixed;
                                                 dead-lettering every event would be wrong;
                                                 the breaker opens)
  v2 session expired / token refused          -> StripeSessionExpired (renew and resend)
  400 "An event already exists with identifier" -> StripeDuplicate (delivered earlier)
  400 ``idempotency_error``                   -> StripeRejected (same key, other params: our bug)
  other 400 / 404 (unknown event name, timestamp window, validation) -> StripeRejected
  ``Stripe-Should-Retry: true`` turns any answer into StripeUnavailable; ``false`` never
  rejects a transient status (a 5xx/429 stays StripeUnavailable: dead-lettering
  maybe-delivered usage is worse).
  A webhook signature that does not verify            -> WebhookSignatureInvalid
:func:`outcome_of` turns a :class:`~proxy.errors.StripeCallError` into the sink
:class:`~proxy.sinks.base.Outcome` the flusher acts on (RETRY / DEAD / DUPLICATE).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import aiohttp
import stripe as sdk
from stripe.params.v2.billing import MeterEventStreamCreateParamsEvent

from proxy.config import StripeConfig
from proxy.errors import (
    StripeCallError,
    StripeDuplicate,
    StripeRejected,
    StripeSessionExpired,
    StripeUnavailable,
    WebhookSignatureInvalid,
)
from proxy.sinks.base import Kind, Outcome

__all__ = ["PREVIEW_MAX_LINE_PAGES", "EventSummary", "InvoicePreview", "MeterEventSession", "Page",
           "PreviewLine", "StripeClient", "StripeMeterInfo", "outcome_of", "translate"]

log = logging.getLogger("meterproxy.sink.stripe")

T = TypeVar("T")

DUPLICATE_MESSAGE = "An event already exists with identifier"
NO_METER_MESSAGE = "No active meter found for event name"
SESSION_EXPIRED_CODE = "billing_meter_event_session_expired"
# further pages of an invoice preview's lines read after the 10 Stripe embeds (100 lines a
# page: up to 1,010 lines); a longer preview is reported incomplete (``has_more``)
PREVIEW_MAX_LINE_PAGES = 10


@dataclass(frozen=True, slots=True)
class StripeMeterInfo:
    """The fields of a Stripe ``billing.meter`` the start-up check and reconciliation read."""

    id: str
    event_name: str
    status: str
    formula: str
    customer_key: str
    value_key: str
    event_time_window: str | None


@dataclass(frozen=True, slots=True)
class EventSummary:
    """One ``billing.meter_event_summary`` (an hour when asked with an hourly window)."""

    id: str
    start_time: int
    aggregated_value: float


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a Stripe list; ``items[-1].id`` is the next ``starting_after``."""

    items: list[T]
    has_more: bool


@dataclass(frozen=True, slots=True)
class PreviewLine:
    """One line of an invoice preview: a price's (metered) line or an invoice item."""

    amount: int                     # minor units
    quantity: int | None
    price: str | None               # the price id of a price line
    invoice_item: str | None        # the invoice item id of an item line
    description: str


@dataclass(frozen=True, slots=True)
class InvoicePreview:
    """The customer's upcoming invoice as Stripe drafts it now."""

    currency: str
    total: int                      # minor units
    period: tuple[int, int]
    lines: list[PreviewLine]
    has_more: bool                  # lines past PREVIEW_MAX_LINE_PAGES pages were not read
    # billing credits (credit grants) the invoice applies, minor units: ``total`` is net
    # of them, each line's ``amount`` is not
    credits: int = 0


@dataclass(frozen=True, slots=True)
class MeterEventSession:
    """A v2 meter event session: the token and its ``expires_at`` as Stripe sent it."""

    authentication_token: str
    expires_at: object


def _preview_line(ln: Mapping[str, Any]) -> PreviewLine:
    """One line of an invoice preview (an ``invoiceitem`` line or a price's line)."""
    pricing = ln.get("pricing") or {}
    price = (pricing.get("price_details") or {}).get("price")
    if price is None and isinstance(ln.get("price"), dict):   # before 2025-03-31
        price = ln["price"].get("id")
    parent = ln.get("parent") or {}
    item = (parent.get("invoice_item_details") or {}).get("invoice_item")
    q = ln.get("quantity")
    return PreviewLine(int(ln.get("amount") or 0), int(q) if isinstance(q, int) else None,
                       price if isinstance(price, str) else None,
                       item if isinstance(item, str) else None,
                       str(ln.get("description") or ""))


class StripeClient:
    """Owns a ``stripe.StripeClient`` on an aiohttp session; ``close()`` releases it.

    Every method is one HTTP call (no SDK retries), except those that read a list page by
    page (``find_invoice_item``, ``find_credit_grant``, ``list_meters``, ``preview_invoice``),
    and raises a :class:`~proxy.errors.StripeCallError` subclass when it does not succeed."""

    def __init__(self, api_key: str, *, api_base: str = "https://api.stripe.com",
                 meter_events_base: str = "https://meter-events.stripe.com",
                 timeout: float = 10.0) -> None:
        self.timeout = timeout
        self._http = sdk.AIOHTTPClient(timeout=aiohttp.ClientTimeout(total=timeout))
        self._sdk = sdk.StripeClient(
            api_key,
            base_addresses={"api": api_base.rstrip("/"),
                            "meter_events": meter_events_base.rstrip("/")},
            http_client=self._http,
            max_network_retries=0,
        )
        self._closed = False

    @classmethod
    def from_config(cls, cfg: StripeConfig) -> StripeClient:
        return cls(cfg.api_key, api_base=cfg.api_base,
                   meter_events_base=cfg.meter_events_base, timeout=cfg.timeout)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._http.close_async()  # type: ignore[no-untyped-call]

    # ---- usage: v1 meter events, the v2 stream, legacy usage records ----------------------

    async def send_meter_event(self, *, event_name: str, stripe_customer_id: str, value: int,
                               identifier: str, timestamp: int, idempotency_key: str) -> None:
        """``POST /v1/billing/meter_events`` (form-encoded; ``value`` as a string)."""
        await _call(self._sdk.v1.billing.meter_events.create_async(
            params={
                "event_name": event_name,
                "payload": {"stripe_customer_id": stripe_customer_id, "value": str(value)},
                "identifier": identifier,
                "timestamp": timestamp,
            },
            options={"idempotency_key": idempotency_key},
        ))

    async def open_meter_event_session(self) -> MeterEventSession:
        """``POST /v2/billing/meter_event_session``: a token for the stream (15 minutes)."""
        session = await _call(self._sdk.v2.billing.meter_event_session.create_async())
        return MeterEventSession(session.authentication_token, session.expires_at)

    async def send_meter_event_stream(self, events: Sequence[MeterEventStreamCreateParamsEvent],
                                      *, session_token: str) -> None:
        """``POST /v2/billing/meter_event_stream`` (at most 100 events), authenticated with the
        session token as a per-request ``api_key`` (the same ``Authorization: Bearer`` a
        separate client would send), so one HTTP session serves both hosts."""
        await _call(self._sdk.v2.billing.meter_event_stream.create_async(
            {"events": list(events)}, options={"api_key": session_token}))

    async def create_usage_record(self, *, subscription_item: str, quantity: int,
                                  timestamp: int, idempotency_key: str,
                                  stripe_version: str) -> None:
        """``POST /v1/subscription_items/{si}/usage_records`` with ``action=increment``: not in
        the SDK since ``2025-03-31.basil``, so a raw request with a pinned older version."""
        call: Any = self._sdk.raw_request_async(
            "post", f"/v1/subscription_items/{subscription_item}/usage_records",
            quantity=quantity, timestamp=timestamp, action="increment",
            idempotency_key=idempotency_key, stripe_version=stripe_version)
        await _call(cast(Awaitable[object], call))

    # ---- meters and summaries (start-up check, reconciliation) ----------------------------

    async def list_meters_page(self, *, limit: int,
                               starting_after: str | None = None) -> Page[StripeMeterInfo]:
        """``GET /v1/billing/meters``: one page."""
        params: dict[str, Any] = {"limit": limit}
        if starting_after:
            params["starting_after"] = starting_after
        page = await _call(self._sdk.v1.billing.meters.list_async(params=cast(Any, params)))
        return Page([_meter(m) for m in page.data], bool(page.has_more))

    async def list_meters(self, *, page_size: int = 100) -> list[StripeMeterInfo]:
        """Every meter of the account, all pages (no retries)."""
        out: list[StripeMeterInfo] = []
        after: str | None = None
        while True:
            page = await self.list_meters_page(limit=page_size, starting_after=after)
            out.extend(page.items)
            if not page.has_more or not page.items:
                return out
            after = page.items[-1].id

    async def list_event_summaries_page(self, meter_id: str, *, customer: str, start_time: int,
                                        end_time: int, limit: int,
                                        starting_after: str | None = None,
                                        ) -> Page[EventSummary]:
        """``GET /v1/billing/meters/{id}/event_summaries`` with an hourly grouping window
        over ``[start_time, end_time)``: one page."""
        params: dict[str, Any] = {"customer": customer, "start_time": start_time,
                                  "end_time": end_time, "value_grouping_window": "hour",
                                  "limit": limit}
        if starting_after:
            params["starting_after"] = starting_after
        page = await _call(self._sdk.v1.billing.meters.event_summaries.list_async(
            meter_id, params=cast(Any, params)))
        return Page([EventSummary(s.id, int(s.start_time), float(s.aggregated_value))
                     for s in page.data], bool(page.has_more))

    # ---- billing: invoice items (commitment true-ups) --------------------------------------

    async def create_invoice_item(self, params: Mapping[str, Any], *,
                                  idempotency_key: str) -> str:
        """``POST /v1/invoiceitems`` (a pending item: Stripe adds it to the customer's next
        invoice); returns the item id."""
        item = await _call(self._sdk.v1.invoice_items.create_async(
            cast(Any, dict(params)), {"idempotency_key": idempotency_key}))
        return str(item.id)

    async def find_invoice_item(self, customer: str, metadata: Mapping[str, str],
                                period_start: int, page_size: int = 100) -> str | None:
        """The id of the customer's invoice item whose ``metadata`` holds every pair of
        ``metadata`` and whose ``period.start`` is ``period_start``, or None: ``GET
        /v1/invoiceitems?customer=`` read page by page, pending and invoiced items alike
        (``find`` before a create makes a retry after a lost answer, or after the
        idempotency key expired, a no-op)."""
        after: str | None = None
        while True:
            params: dict[str, Any] = {"customer": customer, "limit": page_size}
            if after is not None:
                params["starting_after"] = after
            page = await _call(self._sdk.v1.invoice_items.list_async(cast(Any, params)))
            raw: dict[str, Any] = page.to_dict()
            data = raw.get("data") or []
            for it in data:
                meta = it.get("metadata") or {}
                if (it.get("period") or {}).get("start") == period_start \
                        and all(meta.get(k) == v for k, v in metadata.items()):
                    return str(it["id"])
            if not raw.get("has_more") or not data:
                return None
            after = str(data[-1]["id"])

    async def preview_invoice(self, customer: str, *, page_size: int = 100,
                              max_pages: int = PREVIEW_MAX_LINE_PAGES) -> InvoicePreview:
        """``POST /v1/invoices/create_preview`` for the customer's upcoming invoice (its
        subscription's current period), and every line: Stripe embeds the first 10 lines
        (``lines.has_more`` says more exist); the rest are read with ``GET
        /v1/invoices/{id}/lines`` of the preview's own id (``upcoming_in_...``),
        ``page_size`` lines a call, at most ``max_pages`` further calls
        (``PREVIEW_MAX_LINE_PAGES``). Lines left unread past that bound make
        ``has_more`` true. Several HTTP calls; the first failure is raised."""
        inv = await _call(self._sdk.v1.invoices.create_preview_async(
            params={"customer": customer}))
        raw: dict[str, Any] = inv.to_dict()
        lines_obj = raw.get("lines") or {}
        data: list[dict[str, Any]] = list(lines_obj.get("data") or [])
        has_more = bool(lines_obj.get("has_more"))
        inv_id = raw.get("id")
        pages = 0
        while has_more and data and isinstance(inv_id, str) and pages < max_pages:
            page = await _call(self._sdk.v1.invoices.line_items.list_async(
                inv_id, cast(Any, {"limit": page_size, "starting_after": str(data[-1]["id"])})))
            got: dict[str, Any] = page.to_dict()
            pages += 1
            more = got.get("data") or []
            data.extend(more)
            has_more = bool(got.get("has_more"))
            if not more:
                break
        out = [_preview_line(ln) for ln in data]
        credits = sum(int(c.get("amount") or 0)
                      for c in raw.get("total_pretax_credit_amounts") or ()
                      if c.get("type") == "credit_balance_transaction")
        return InvoicePreview(str(raw.get("currency") or ""), int(raw.get("total") or 0),
                              (int(raw.get("period_start") or 0),
                               int(raw.get("period_end") or 0)),
                              out, has_more, credits)

    # ---- billing credits (monetary credits mirrored as Stripe credit grants) --------------

    async def create_credit_grant(self, params: Mapping[str, Any], *,
                                  idempotency_key: str) -> str:
        """``POST /v1/billing/credit_grants`` (``proxy.credits.monetary.credit_grant_params``);
        returns the grant id. The same key replays the first result."""
        got = await _call(self._sdk.v1.billing.credit_grants.create_async(
            cast(Any, dict(params)), {"idempotency_key": idempotency_key}))
        return str(got.id)

    async def find_credit_grant(self, customer: str, local_id: str,
                                page_size: int = 100) -> tuple[str, bool] | None:
        """The customer's Stripe credit grant that mirrors local grant ``local_id``
        (``metadata.meterproxy_grant``), as (id, voided), or None: ``GET
        /v1/billing/credit_grants?customer=`` read page by page (``find`` before a create
        makes a retry after a lost answer, or after the idempotency key expired, a no-op)."""
        after: str | None = None
        while True:
            params: dict[str, Any] = {"customer": customer, "limit": page_size}
            if after is not None:
                params["starting_after"] = after
            page = await _call(self._sdk.v1.billing.credit_grants.list_async(
                cast(Any, params)))
            raw: dict[str, Any] = page.to_dict()
            data = raw.get("data") or []
            for g in data:
                if (g.get("metadata") or {}).get("meterproxy_grant") == local_id:
                    return str(g["id"]), g.get("voided_at") is not None
            if not raw.get("has_more") or not data:
                return None
            after = str(data[-1]["id"])

    async def void_credit_grant(self, grant_id: str) -> None:
        """``POST /v1/billing/credit_grants/{id}/void``: the grant no longer counts (voiding
        twice is a StripeRejected)."""
        await _call(self._sdk.v1.billing.credit_grants.void_grant_async(grant_id))

    async def expire_credit_grant(self, grant_id: str) -> None:
        """``POST /v1/billing/credit_grants/{id}/expire``: expires it now."""
        await _call(self._sdk.v1.billing.credit_grants.expire_async(grant_id))

    async def credit_balance_summary(self, customer: str) -> dict[str, Any]:
        """``GET /v1/billing/credit_balance_summary`` of the customer's credits that apply to
        metered prices, as Stripe's field names (``balances[].available_balance``)."""
        got = await _call(self._sdk.v1.billing.credit_balance_summary.retrieve_async(
            cast(Any, {"customer": customer,
                       "filter": {"type": "applicability_scope",
                                  "applicability_scope": {"price_type": "metered"}}})))
        out: dict[str, Any] = got.to_dict()
        return out

    # ---- prices ---------------------------------------------------------------------------

    async def retrieve_price(self, price_id: str) -> dict[str, object]:
        """``GET /v1/prices/{id}?expand[]=tiers&expand[]=currency_options`` (neither is
        returned unless expanded), as the Price object's own field names. A tiered price
        whose options came without tiers is asked again with
        ``expand[]=currency_options.<currency>.tiers`` for each option."""
        expand = ["tiers", "currency_options"]
        got = (await _call(self._sdk.v1.prices.retrieve_async(
            price_id, params={"expand": expand}))).to_dict()
        options = got.get("currency_options")
        if got.get("billing_scheme") == "tiered" and isinstance(options, dict) and any(
                isinstance(o, dict) and not o.get("tiers") for o in options.values()):
            expand += [f"currency_options.{c}.tiers" for c in sorted(options)]
            got = (await _call(self._sdk.v1.prices.retrieve_async(
                price_id, params={"expand": expand}))).to_dict()
        return cast(dict[str, object], got)

    # ---- webhooks -------------------------------------------------------------------------

    @staticmethod
    def verify_webhook_signature(payload: bytes, header: str | None, secret: str,
                                 tolerance: int) -> None:
        """Check ``Stripe-Signature`` over the raw body (HMAC-SHA256, ``tolerance`` seconds);
        raises :class:`~proxy.errors.WebhookSignatureInvalid`. No network, no API key."""
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as exc:   # our own input check: the signature covers text
            raise WebhookSignatureInvalid(str(exc)) from exc
        try:
            sdk.WebhookSignature.verify_header(text, header, secret, tolerance)
        except sdk.SignatureVerificationError as exc:
            raise translate(exc) from exc


def _meter(m: Any) -> StripeMeterInfo:
    """A ``billing.meter`` object of the SDK as the fields the check reads."""
    window = getattr(m, "event_time_window", None)
    return StripeMeterInfo(m.id, m.event_name, str(m.status), str(m.default_aggregation.formula),
                           m.customer_mapping.event_payload_key,
                           m.value_settings.event_payload_key, str(window) if window else None)


async def _call(call: Awaitable[T]) -> T:
    """Await one SDK call; any failure is raised as what :func:`translate` makes of it.

    Cancellation (``asyncio.CancelledError``) propagates untouched: it is not a Stripe answer.
    """
    try:
        return await call
    except Exception as exc:
        err = translate(exc)
        log.debug("stripe call failed: %s -> %r", exc, err)
        raise err from exc


def outcome_of(err: StripeCallError) -> Outcome:
    """The sink outcome of a failed call: DUPLICATE, DEAD or RETRY, with what Stripe said."""
    if isinstance(err, StripeDuplicate):
        return Outcome(Kind.DUPLICATE, err.reason, status=err.status)
    if isinstance(err, StripeRejected):
        return Outcome(Kind.DEAD, err.reason, status=err.status)
    return Outcome(Kind.RETRY, err.reason, retry_after=err.retry_after,
                   lock_timeout=err.lock_timeout, status=err.status, ambiguous=err.ambiguous)


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    """Case-insensitive lookup (the SDK hands aiohttp's CIMultiDictProxy or a dict)."""
    if not headers:
        return None
    value = headers.get(name)
    if value is not None:
        return str(value)
    low = name.lower()
    for k, v in headers.items():
        if k.lower() == low:
            return str(v)
    return None


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    raw = _header(headers, "Retry-After")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_fields(exc: sdk.StripeError) -> tuple[str | None, str | None, str]:
    """(type, code, message) from the error body; ``exc.code`` is None for v1 429s."""
    body: Any = exc.json_body
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        etype = err.get("type")
        code = err.get("code")
        message = err.get("message")
        return (str(etype) if etype else None, str(code) if code else exc.code,
                str(message) if message else (exc.user_message or ""))
    return None, exc.code, exc.user_message or str(exc)


def translate(exc: BaseException) -> StripeCallError | WebhookSignatureInvalid:
    """The one mapping from a failed SDK call to meterproxy's exceptions (see the module
    docstring); never raises."""
    if isinstance(exc, sdk.SignatureVerificationError):
        return WebhookSignatureInvalid(str(exc))
    if isinstance(exc, sdk.APIConnectionError):
        if isinstance(exc.__cause__, (asyncio.TimeoutError, TimeoutError)):
            return StripeUnavailable("timeout waiting for Stripe (no answer)", ambiguous=True)
        return StripeUnavailable(f"connection error: {_short(exc.user_message)}",
                                 ambiguous=True)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return StripeUnavailable("timeout waiting for Stripe", ambiguous=True)
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        return StripeUnavailable(f"connection error: {type(exc).__name__}: {exc}",
                                 ambiguous=True)
    if not isinstance(exc, sdk.StripeError):
        log.error("unexpected error from the stripe call: %r", exc, exc_info=exc)
        return StripeUnavailable(f"unexpected error: {type(exc).__name__}: {exc}")

    status = exc.http_status
    headers = exc.headers
    etype, code, message = _error_fields(exc)
    should_retry = (_header(headers, "Stripe-Should-Retry") or "").strip().lower()
    retry_after = _retry_after(headers)
    rid = exc.request_id
    where = f" [{status}{' ' + rid if rid else ''}]"

    def retry(reason: str, lock: bool = False) -> StripeUnavailable:
        return StripeUnavailable(reason + where, retry_after=retry_after, lock_timeout=lock,
                                 status=status)

    def dead(reason: str) -> StripeRejected:
        return StripeRejected(reason + where, status=status)

    # v2 stream session expiry: renew and resend (the sink handles it)
    if isinstance(exc, sdk.TemporarySessionExpiredError) or code == SESSION_EXPIRED_CODE:
        return StripeSessionExpired(f"meter event session expired: {message}{where}",
                                    status=status)
    if status == 429:
        if code == "lock_timeout":
            return retry(f"lock_timeout (one call per customer and meter): {message}", lock=True)
        reason = _header(headers, "Stripe-Rate-Limited-Reason")
        return retry(f"rate limited{f' ({reason})' if reason else ''}: {message}")
    if status is not None and status >= 500:
        return retry(f"Stripe server error: {message}")
    if status == 409:
        return retry(f"conflict: {message}")
    if status in (401, 403):
        # an invalid token on the v2 stream is renewed like an expired one
        if code == "invalid_authentication_token":
            return StripeSessionExpired(f"meter event session rejected: {message}{where}",
                                        status=status)
        return retry(f"Stripe rejected the API key (fix stripe.api_key / its permissions; "
                     f"events stay pending): {message}")
    if DUPLICATE_MESSAGE in message:
        return StripeDuplicate(f"already delivered: {message}", status=status)
    if should_retry == "true":
        return retry(f"Stripe-Should-Retry: true: {message}")
    if etype == "idempotency_error" or isinstance(exc, sdk.IdempotencyError):
        return dead(f"idempotency key reused with different parameters (a bug): {message}")
    if NO_METER_MESSAGE in message:
        return dead(f"unknown event name: {message}")
    param = getattr(exc, "param", None)
    if param == "timestamp" or (code or "").startswith("timestamp_"):
        return dead(f"timestamp outside Stripe's window: {message}")
    if status in (400, 404):
        return dead(f"invalid request{f' ({code})' if code else ''}: {message}")
    if status is None:
        return retry(f"Stripe error without a status: {message}")
    return dead(f"Stripe answered {status}{f' ({code})' if code else ''}: {message}")


def _short(message: str | None) -> str:
    if not message:
        return "no answer"
    # the SDK wraps its network message over several lines; keep the cause
    tail = message.rsplit("(Network error:", 1)
    return ("network error:" + tail[1].rstrip(")")).strip() if len(tail) == 2 \
        else " ".join(message.split())
