"""The v2 meter event stream sink: up to 100 events per ``POST /v2/billing/meter_event_stream``.

Owns its :class:`~proxy.stripe.client.StripeClient` and the current meter event
session (``POST /v2/billing/meter_event_session`` on the api host; the token lasts 15 min).
The token is renewed shortly before ``expires_at``, and on a 401
``billing_meter_event_session_expired`` (or an unknown token) the batch is resent ONCE with a
fresh session inside the same ``send()``: that is the documented protocol, not a retry of a
failure. The stream call authenticates with the session token as a per-request ``api_key``
(see :meth:`~proxy.stripe.client.StripeClient.send_meter_event_stream`), so one HTTP session
serves both hosts.

Validation on the stream is asynchronous: a 2xx means every event of the batch is
DELIVERED; bad events surface later in Stripe's error reports. Identifiers dedupe resends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime

from stripe.params.v2.billing import MeterEventStreamCreateParamsEvent

from proxy.errors import StripeCallError, StripeSessionExpired
from proxy.sinks.base import Kind, Outcome, OutEvent
from proxy.stripe.client import StripeClient, outcome_of

log = logging.getLogger("meterproxy.sink.meter_event_stream")

MAX_EVENTS_PER_CALL = 100
RENEW_MARGIN = 60.0          # seconds before expires_at at which a session is replaced
SESSION_FALLBACK_TTL = 14 * 60.0


def rfc3339(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_expiry(raw: object) -> float:
    """``expires_at`` as unix seconds (the v2 API sends RFC 3339; tolerate numbers)."""
    if isinstance(raw, datetime):
        return raw.timestamp()
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    if isinstance(raw, str):
        try:
            return datetime.fromisoformat(raw.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    return time.time() + SESSION_FALLBACK_TTL


class MeterEventStreamSink:
    name = "meter_event_stream"
    max_batch = MAX_EVENTS_PER_CALL

    def __init__(self, conn: StripeClient, *, renew_margin: float = RENEW_MARGIN) -> None:
        self.conn = conn
        self.renew_margin = renew_margin
        self._token: str | None = None
        self._expires_at = 0.0
        self._session_lock = asyncio.Lock()
        self.sessions_created = 0

    async def send(self, events: Sequence[OutEvent]) -> list[Outcome]:
        out: list[Outcome] = []
        for i in range(0, len(events), MAX_EVENTS_PER_CALL):
            out.extend(await self._send_batch(events[i:i + MAX_EVENTS_PER_CALL]))
        return out

    async def _send_batch(self, batch: Sequence[OutEvent]) -> list[Outcome]:
        if not batch:
            return []
        wire: list[MeterEventStreamCreateParamsEvent] = [
            {"event_name": ev.event_name,
             "payload": {"stripe_customer_id": ev.stripe_customer_id, "value": str(ev.value)},
             "identifier": ev.identifier,
             "timestamp": rfc3339(ev.timestamp)}
            for ev in batch]
        for resend in (False, True):
            token = await self._session_token()
            if isinstance(token, Outcome):
                return [token] * len(batch)
            try:
                await self.conn.send_meter_event_stream(wire, session_token=token)
            except StripeSessionExpired as exc:
                if resend:
                    return [outcome_of(exc)] * len(batch)
                log.info("meter event session expired; renewing and resending %d events",
                         len(batch))
                self._forget(token)
                continue
            except StripeCallError as exc:
                return [outcome_of(exc)] * len(batch)
            return [Outcome(Kind.DELIVERED, status=200)] * len(batch)
        raise AssertionError("unreachable")

    async def _session_token(self) -> str | Outcome:
        async with self._session_lock:
            if self._token is not None and time.time() < self._expires_at - self.renew_margin:
                return self._token
            try:
                session = await self.conn.open_meter_event_session()
            except StripeCallError as exc:
                # never the events' fault: even a 4xx here is an account/operator problem
                failed = outcome_of(exc)
                return Outcome(Kind.RETRY, f"creating a meter event session: {failed.reason}",
                               retry_after=failed.retry_after,
                               lock_timeout=failed.lock_timeout, status=failed.status)
            self._token = session.authentication_token
            self._expires_at = _parse_expiry(session.expires_at)
            self.sessions_created += 1
            return self._token

    def _forget(self, token: str) -> None:
        if self._token == token:
            self._token = None
            self._expires_at = 0.0

    async def close(self) -> None:
        await self.conn.close()
