"""The v1 meter events sink: one ``POST /v1/billing/meter_events`` per event.

Owns its :class:`~proxy.stripe.client.StripeClient`. One ``send()`` = one SDK call
per event, no retries. The event's ``identifier`` (constant across resends) is Stripe's
dedupe: a resend after a lost answer is a 400 "An event already exists with identifier",
reported DUPLICATE. The Idempotency-Key is ``{identifier}-{attempt}-{sub}``: ``attempt`` is
persisted before the call and never reused for a row, ``sub`` counts the flusher's quick
retries inside one attempt, and the two are separate parts, so no two calls for one row
share a key and a 5xx stored under one key is never replayed to another call.

Keys of earlier versions were ``{identifier}-{n}``, n = attempt, or attempt x 100 + sub for
an in-cycle retry (so attempt 1's first retry and attempt 101 shared ``-101``). A row
attempted under the old format and resent under this one never meets an old key: every key
here has a second ``-`` part, which no old key has; and the resend's new key is safe because
the event's ``identifier``, unchanged, is what dedupes it at Stripe (within its 24 h window,
which the flusher's resend horizon keeps resends inside).
"""

from __future__ import annotations

from collections.abc import Sequence

from proxy.errors import StripeCallError
from proxy.sinks.base import Kind, Outcome, OutEvent
from proxy.stripe.client import StripeClient, outcome_of


def idempotency_key(ev: OutEvent) -> str:
    """``{identifier}-{attempt}-{sub}``: one key per call of one row, never reused."""
    return f"{ev.identifier}-{ev.attempt}-{ev.sub}"


class MeterEventsSink:
    name = "meter_events"
    max_batch = 1

    def __init__(self, conn: StripeClient) -> None:
        self.conn = conn

    async def send(self, events: Sequence[OutEvent]) -> list[Outcome]:
        # max_batch is 1; more events are sent one after the other, in order
        return [await self._send_one(ev) for ev in events]

    async def _send_one(self, ev: OutEvent) -> Outcome:
        try:
            await self.conn.send_meter_event(
                event_name=ev.event_name, stripe_customer_id=ev.stripe_customer_id,
                value=ev.value, identifier=ev.identifier, timestamp=ev.timestamp,
                idempotency_key=idempotency_key(ev))
        except StripeCallError as exc:
            return outcome_of(exc)
        return Outcome(Kind.DELIVERED, status=200)

    async def close(self) -> None:
        await self.conn.close()
