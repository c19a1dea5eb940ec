"""The legacy usage records sink: ``POST /v1/subscription_items/{si}/usage_records``.

Owns its :class:`~proxy.stripe.client.StripeClient` and the mapping
``(meter, stripe_customer_id) -> subscription item``. Usage records left the SDK (and the
current API version) in ``2025-03-31.basil``, so each call goes through
the SDK's ``raw_request_async`` with ``stripe_version`` pinned to an older version
(config ``stripe.usage_records_version``, default ``2024-06-20``), ``action=increment``.

Dedupe: usage records have no ``identifier``. The Idempotency-Key IS the dedupe, so it is
the event's identifier, constant across every attempt (unlike the meter events sink).
Consequences of Stripe keeping an idempotent result for 24 hours:
  * a resend within 24 h after a lost answer replays the first result: counted once;
  * a 5xx stored under the key is replayed too, so an event whose first attempt got a 500
    keeps getting that 500 (RETRY) until the key expires; the flusher parks it as an
    ``unconfirmed`` dead letter 20 h after that first call (``proxy.flusher.RESEND_HORIZON``)
    rather than let it go through after the key expired;
  * a resend MORE than 24 h after a lost answer is executed again: double counted. The
    flusher's resend horizon (20 h) keeps resends inside the window; never replay dead
    letters of this sink that may have been delivered without checking the usage record
    summaries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from proxy.errors import StripeCallError
from proxy.sinks.base import Kind, Outcome, OutEvent
from proxy.stripe.client import StripeClient, outcome_of

DEFAULT_VERSION = "2024-06-20"


class UsageRecordsSink:
    name = "usage_records"
    max_batch = 1

    def __init__(self, conn: StripeClient,
                 subscription_items: Mapping[str, Mapping[str, str]], *,
                 stripe_version: str = DEFAULT_VERSION) -> None:
        """``subscription_items``: rules meter name -> {stripe_customer_id: si_...}."""
        self.conn = conn
        self.items = {meter: dict(by_customer)
                      for meter, by_customer in subscription_items.items()}
        self.stripe_version = stripe_version or DEFAULT_VERSION

    def item_for(self, meter: str, customer: str) -> str | None:
        return self.items.get(meter, {}).get(customer)

    async def send(self, events: Sequence[OutEvent]) -> list[Outcome]:
        return [await self._send_one(ev) for ev in events]

    async def _send_one(self, ev: OutEvent) -> Outcome:
        item = self.item_for(ev.meter, ev.stripe_customer_id)
        if item is None:
            return Outcome(Kind.DEAD, f"no subscription item for meter {ev.meter!r} and "
                                      f"customer {ev.stripe_customer_id!r}")
        if ev.value < 0:
            return Outcome(Kind.DEAD, f"usage records take no negative quantity ({ev.value}); "
                                      "a correction needs the meter events sink")
        try:
            await self.conn.create_usage_record(
                subscription_item=item, quantity=ev.value, timestamp=ev.timestamp,
                idempotency_key=ev.identifier, stripe_version=self.stripe_version)
        except StripeCallError as exc:
            return outcome_of(exc)
        return Outcome(Kind.DELIVERED, status=200)

    async def close(self) -> None:
        await self.conn.close()
