"""The one place that talks to the stripe SDK's plumbing: builds the client, closes it,
and translates every foreign failure (stripe errors, aiohttp/asyncio errors) into an
:class:`~proxy.sinks.base.Outcome`.

Invariants
  * The SDK never retries (``max_network_retries=0``): the flusher owns retries, backoff,
    the circuit breaker and the rate limit; one ``send()`` is one attempt.
  * No other module catches a stripe or aiohttp exception. Sinks wrap each SDK call in
    :func:`attempt`, which returns either the call's result or a :class:`Failed`.

Classification (documented in :func:`translate`)
  connection error / timeout / 5xx / 409 / 429 -> RETRY (429 ``lock_timeout`` flagged)
  401 / 403                                   -> RETRY (an operator problem: a revoked or
                                                 restricted key gets fixed; dead-lettering every
                                                 event would be wrong; the breaker opens)
  400 "An event already exists with identifier" -> DUPLICATE (delivered earlier)
  400 ``idempotency_error``                   -> DEAD (same key, other params: our bug)
  other 400 / 404 (unknown event name, timestamp window, validation) -> DEAD
  ``Stripe-Should-Retry: true`` turns any answer into RETRY; ``false`` never dead-letters a
  transient status (a 5xx/429 stays RETRY: dead-lettering maybe-delivered usage is worse).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import stripe

from proxy.sinks.base import Kind, Outcome

log = logging.getLogger("meterproxy.sink.stripe")

T = TypeVar("T")

DUPLICATE_MESSAGE = "An event already exists with identifier"
NO_METER_MESSAGE = "No active meter found for event name"
SESSION_EXPIRED_CODE = "billing_meter_event_session_expired"


class StripeConnection:
    """Owns a ``stripe.StripeClient`` on an aiohttp session; ``close()`` releases it."""

    def __init__(self, api_key: str, *, api_base: str = "https://api.stripe.com",
                 meter_events_base: str = "https://meter-events.stripe.com",
                 timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.http_client = stripe.AIOHTTPClient(timeout=aiohttp.ClientTimeout(total=timeout))
        self.client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base.rstrip("/"),
                            "meter_events": meter_events_base.rstrip("/")},
            http_client=self.http_client,
            max_network_retries=0,
        )
        self._closed = False

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.http_client.close_async()  # type: ignore[no-untyped-call]


@dataclass(frozen=True, slots=True)
class Failed:
    """An SDK call that did not succeed, already translated."""

    outcome: Outcome
    session_expired: bool = False   # v2 stream: the session token must be renewed


async def attempt(call: Awaitable[T]) -> T | Failed:
    """Await one SDK call; any failure comes back as a :class:`Failed`, never raised.

    Cancellation (``asyncio.CancelledError``) propagates: it is not a Stripe answer.
    """
    try:
        return await call
    except Exception as exc:
        failed = translate(exc)
        log.debug("stripe call failed: %s -> %s", exc, failed.outcome)
        return failed


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


def _error_fields(exc: stripe.StripeError) -> tuple[str | None, str | None, str]:
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


def translate(exc: BaseException) -> Failed:
    """The one mapping from a failed call to an Outcome (see the module docstring)."""
    if isinstance(exc, stripe.APIConnectionError):
        if isinstance(exc.__cause__, (asyncio.TimeoutError, TimeoutError)):
            return Failed(Outcome(Kind.RETRY, "timeout waiting for Stripe (no answer)",
                                  ambiguous=True))
        return Failed(Outcome(Kind.RETRY, f"connection error: {_short(exc.user_message)}",
                              ambiguous=True))
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return Failed(Outcome(Kind.RETRY, "timeout waiting for Stripe", ambiguous=True))
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        return Failed(Outcome(Kind.RETRY, f"connection error: {type(exc).__name__}: {exc}",
                              ambiguous=True))
    if not isinstance(exc, stripe.StripeError):
        log.error("unexpected error from the stripe call: %r", exc, exc_info=exc)
        return Failed(Outcome(Kind.RETRY, f"unexpected error: {type(exc).__name__}: {exc}"))

    status = exc.http_status
    headers = exc.headers
    etype, code, message = _error_fields(exc)
    should_retry = (_header(headers, "Stripe-Should-Retry") or "").strip().lower()
    retry_after = _retry_after(headers)
    rid = exc.request_id
    where = f" [{status}{' ' + rid if rid else ''}]"

    def retry(reason: str, lock: bool = False) -> Failed:
        return Failed(Outcome(Kind.RETRY, reason + where, retry_after=retry_after,
                              lock_timeout=lock, status=status))

    def dead(reason: str) -> Failed:
        return Failed(Outcome(Kind.DEAD, reason + where, status=status))

    # v2 stream session expiry: renew and resend (the sink handles it)
    if isinstance(exc, stripe.TemporarySessionExpiredError) or code == SESSION_EXPIRED_CODE:
        return Failed(Outcome(Kind.RETRY, f"meter event session expired: {message}{where}",
                              status=status), session_expired=True)
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
            return Failed(Outcome(Kind.RETRY, f"meter event session rejected: {message}{where}",
                                  status=status), session_expired=True)
        return retry(f"Stripe rejected the API key (fix stripe.api_key / its permissions; "
                     f"events stay pending): {message}")
    if DUPLICATE_MESSAGE in message:
        return Failed(Outcome(Kind.DUPLICATE, f"already delivered: {message}", status=status))
    if should_retry == "true":
        return retry(f"Stripe-Should-Retry: true: {message}")
    if etype == "idempotency_error" or isinstance(exc, stripe.IdempotencyError):
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
