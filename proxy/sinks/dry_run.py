"""The dry-run sink: logs each meter event it would send, sends nothing.

Only used when chosen explicitly (``stripe.sink: dry_run``). Usage still flows through the
outbox (identifiers, carried fractions, dead letters for customers without a Stripe id), so
an operator sees exactly what would reach Stripe before connecting it. Its outcome is
``DRY_RUN``, never delivered: those rows keep the outbox state ``dry_run`` and a real sink
started later on the same database sends them, with the same identifiers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from proxy.sinks.base import Kind, Outcome, OutEvent

log = logging.getLogger("meterproxy.sink.dry_run")


class DryRunSink:
    name = "dry_run"
    max_batch = 100

    def __init__(self) -> None:
        self.sent: list[OutEvent] = []

    async def send(self, events: Sequence[OutEvent]) -> list[Outcome]:
        for ev in events:
            log.info("dry-run: would POST /v1/billing/meter_events event_name=%s "
                     "payload[stripe_customer_id]=%s payload[value]=%d identifier=%s timestamp=%d",
                     ev.event_name, ev.stripe_customer_id, ev.value, ev.identifier, ev.timestamp)
            self.sent.append(ev)
        return [Outcome(Kind.DRY_RUN, "dry_run") for _ in events]

    async def close(self) -> None:
        return None
