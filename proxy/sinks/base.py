"""The usage sink interface: where meter events go (Stripe, or the dry-run log).

A sink is the one owner of its client (HTTP session, Stripe client). The flusher hands it
events whose ``identifier`` was persisted before the call and interprets the outcomes;
a sink never retries by itself across calls and never touches the database. Stripe's
exceptions are translated once, by :mod:`proxy.stripe.client`, into
:class:`proxy.errors.StripeCallError`; the Stripe sinks (:mod:`proxy.stripe`) turn those
into outcomes with ``outcome_of``.

Outcome kinds
  DELIVERED   Stripe accepted the event.
  DUPLICATE   Stripe already has an event with this identifier: delivered earlier (a resend
              after a crash or a dropped answer). Counts as delivered.
  RETRY       transient: connection error, timeout, 5xx, 429 (incl. lock_timeout). Resend the
              same identifier later; ``retry_after`` when Stripe said when.
  DEAD        permanent: will never succeed as sent (unknown event name, no customer
              mapping, outside Stripe's timestamp window, validation error). Dead letter.
  DRY_RUN     the dry-run sink logged the event and sent nothing. NOT delivered: the row
              gets the outbox state ``dry_run`` and is sent (same identifier) as soon as
              a real sink runs on this database.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class Kind(enum.Enum):
    DELIVERED = "delivered"
    DUPLICATE = "duplicate"
    RETRY = "retry"
    DEAD = "dead"
    DRY_RUN = "dry_run"


@dataclass(frozen=True, slots=True)
class OutEvent:
    """One meter event as persisted in the outbox."""

    outbox_id: int
    identifier: str           # deterministic, minted when staged; reused on every resend
    event_name: str
    stripe_customer_id: str
    value: int                # whole units (Stripe takes integers only)
    timestamp: int            # unix seconds
    meter: str                # the rules' meter name (usage_records maps it to an item)
    attempt: int              # 1 for the first send; persisted before the call
    sub: int = 0              # the flusher's in-cycle retry of this attempt (0: its first call)


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: Kind
    reason: str = ""
    retry_after: float | None = None    # seconds, when the answer said so
    lock_timeout: bool = False          # a 429 lock (per customer+meter), not a rate limit
    status: int | None = None           # HTTP status seen, if any
    # the call may have reached Stripe and may still be running there (timeout, dropped
    # connection): the next call for this customer and meter must wait, or the two overlap
    ambiguous: bool = False


class Sink(Protocol):
    name: str
    max_batch: int            # events per call: 1 for v1 meter events, 100 for the v2 stream

    async def send(self, events: Sequence[OutEvent]) -> list[Outcome]:
        """One call for ``events`` (len <= max_batch); one outcome per event, in order."""
        ...

    async def close(self) -> None: ...
