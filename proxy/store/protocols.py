"""The storage interfaces: one owner per table, exposing verbs, never SQL.

Every table of the database has exactly one owner below; only that owner's implementation
writes it (SQLite: one module per owner in ``proxy.store``; a second backend such as
PostgreSQL implements the same Protocols). Callers outside ``proxy.store`` call verbs;
``tests/store/`` holds both backends to the contracts written in these docstrings.

Words used in the contracts
- **durable**: the change is committed. SQLite: the transaction committed on the WAL
  database (``synchronous=NORMAL``), which survives ``kill -9`` of the process. A second
  backend: committed on its server. A verb that returns normally has made its change
  durable; a verb that raises has changed nothing (each verb is one transaction).
- **idempotent**: calling the verb again with the same arguments changes nothing more and
  returns an answer consistent with the first call (stated per verb).
- **atomic**: other readers of the store see all of a verb's change or none of it; two
  concurrent calls of one verb (two tasks on one loop, or two fleet members) behave as if
  run one after the other.

Sync or async: verbs are ``async`` because a networked backend must do I/O and the callers
run on the event loop. The SQLite implementation runs each verb synchronously inside the
coroutine (no ``await`` within a transaction, so nothing on the loop interleaves with it),
exactly like the group commit. The hot path is the one exception:
``UsageLedger.record`` is synchronous and never touches the disk; it returns the future the
next group commit resolves (strict durability), as it always has.

Layering: this module imports only pure modules (``proxy.credits.ledger``) and the store's
own value types; it never imports the services above it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from proxy.credits.ledger import Entry, GrantState

if TYPE_CHECKING:
    from proxy.pricing import TransformQuantity
    from proxy.store.db import UsageRow
    from proxy.store.keys import Customer, KeyEntry
    from proxy.store.outbox import StagedEvent


# ---- value types -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DueEvent:
    """An outbox row ready to send (joined with the customer's Stripe id)."""
    id: int
    identifier: str
    customer_id: str
    meter: str
    event_name: str
    value: int
    timestamp: int
    attempts: int
    stripe_customer_id: str | None
    # when the row's first call that Stripe may have applied began (None: no such call)
    first_attempt_at: float | None = None


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """An outbox row as the admin API lists it (times are unix seconds)."""
    id: int
    identifier: str
    customer_id: str
    meter: str
    event_name: str
    covered: bool
    value: int
    timestamp: int
    created_at: int
    status: str                 # pending | sent | dead | dry_run
    attempts: int
    sent_at: int | None
    sink: str | None
    outcome: str | None
    last_error: str | None
    dead_at: int | None


@dataclass(frozen=True, slots=True)
class OutboxCounts:
    pending: int
    dead: int
    dry_run: int


@dataclass(frozen=True, slots=True)
class HourTotal:
    """Outbox values of one customer, event name and hour (reconciliation)."""
    customer_id: str
    event_name: str
    hour: int
    total: int
    sent: int
    pending: int
    dead: int
    last_sent_at: int           # 0 when none was sent
    rows: int


@dataclass(frozen=True, slots=True)
class LedgerSnapshot:
    """Everything the in-memory credit book is rebuilt from at start-up."""
    grants: list[GrantState]
    entries: list[Entry]        # every entry in commit order (``grant_id`` "" for debt)
    debts: dict[str, int]       # customer -> outstanding debt (debt - repay)


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One credit entry to append, with what it belongs to."""
    customer_id: str
    entry: Entry
    request_id: str | None = None
    meter: str | None = None
    at: float | None = None     # unix seconds; None: now


@dataclass(frozen=True, slots=True)
class EntryRecord:
    seq: int
    grant_id: str | None
    kind: str
    amount: int
    request_id: str | None
    meter: str | None
    at_ms: int


@dataclass(frozen=True, slots=True)
class NewGrant:
    """A grant to create; see ``CreditLedger.create_grant``."""
    grant: GrantState
    idempotency_key: str | None = None
    period: tuple[int, int] | None = None
    payment_refs: tuple[str, ...] = ()
    paid_minor: int = 0
    carried: int = 0            # credits of ``amount`` carried over from a previous period


@dataclass(frozen=True, slots=True)
class GrantMirrorRecord:
    """One local grant's Stripe credit grant mirror (``GrantMirrors``, monetary mode).
    ``want``: the state Stripe should hold (``live``, ``void``); ``done``: the state last
    reached there (``none``: not created yet); ``status``: ``pending`` until done == want,
    then ``mirrored``; ``dead`` after too many failed attempts (an operator requeues)."""
    grant_id: str
    customer_id: str
    want: str
    done: str
    stripe_grant_id: str | None
    status: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    created_at: int
    updated_at: int


@dataclass(frozen=True, slots=True)
class TrueUpRecord:
    """One ended period's minimum-commitment decision (``TrueUps``); amounts in minor units."""
    customer_id: str
    period_start: int
    period_end: int
    commitment: int
    charged: int
    amount: int
    currency: str
    # none (no shortfall) | sending (the parameters frozen, the item not confirmed yet) |
    # sent (``invoice_item`` created)
    status: str
    invoice_item: str | None
    created_at: int
    # the Stripe customer the item is for (frozen with the rest; None on rows written
    # before schema migration 14 / PostgreSQL's 10, which were never ``sending``)
    stripe_customer_id: str | None = None


@dataclass(frozen=True, slots=True)
class GrantFacts:
    """What the ledger knows about one grant a claw-back touches (inside its transaction)."""
    grant_id: str
    paid_minor: int | None              # the largest amount recorded for the payment refs
    previous_credits: int               # already clawed back under this claw-back key
    sums: Mapping[str, int]             # kind -> total of the grant's entries
    clawed_total: int                   # everything clawed back from the grant, any key
    owed: int                           # debt entries recorded for this grant's claw-backs
    # a rollover carried part of what the grant had left into the next period's grant
    # (the receiver's ``carried``, at most the grant's ``expire`` total): a claw-back
    # follows it there (docs/credits.md, "Refunds, disputes and credit notes")
    carried_out: int = 0
    followed_out: int = 0               # of ``carried_out``, already followed by claw-backs
    # set when the claw-back follows carried credits into this grant: the new cumulative
    # amount followed under this key (``previous_credits`` is the old one)
    follow_target: int | None = None
    # what a rollover carried into this grant (its own ``carried``): not bought by the
    # grant's own payment, so that payment's refund takes its share of the rest only
    carried_in: int = 0
    # the subscription's plan grant of the next period (``next_period_grant``), carried
    # into or not: what a claw-back takes of the grant's spent layer is owed on to it (had
    # the refund come first, that grant would have repaid it when it was made)
    successor: str | None = None
    owed_on: int = 0                    # spent credits claw-backs owed on to ``successor``
    owed_into: int = 0                  # spent credits claw-backs owed into this grant
    # set when a claw-back owes spent credits on into this grant: the new cumulative amount
    # owed into it under this key (recorded as ``owe:<grant>><this grant>:<key>``) and the
    # old one
    owe_target: int | None = None
    owe_previous: int = 0


@dataclass(frozen=True, slots=True)
class ClawbackDecision:
    credits: int                        # the new cumulative claw-back under this key
    entries: list[Entry]                # to append (debt entries are booked to the grant)
    follow: int = 0                     # credits to follow into the grant the carry went to
    owe: int = 0                        # spent credits owed on to ``GrantFacts.successor``


@dataclass(frozen=True, slots=True)
class UsageTotal:
    quantity: int
    requests: int
    billable: int
    covered: int


@dataclass(frozen=True, slots=True)
class UsageDay:
    """One (meter, UTC day) group of a customer's minutes, with window membership."""
    meter: str
    day: int
    in_period: bool
    in_trailing: bool
    quantity: int
    billable: int
    covered: int
    requests: int


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One audit row (one meter of one metered request)."""
    seq: int
    at_ms: int
    request_id: str
    customer_id: str
    key_id: str
    rule: str
    rules_version: str
    status: int
    meter: str
    quantity: int
    credits: int
    billable: int
    flags: str
    method: str
    path: str


@dataclass(frozen=True, slots=True)
class KeySnapshot:
    keys: dict[str, KeyEntry]           # SHA-256 hex of the secret -> entry
    customers: dict[str, Customer]


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """A webhook event as stored (``payload`` is the raw JSON text)."""
    id: str
    type: str
    created: int | None
    status: str
    result: str | None
    received_at: int
    processed_at: int | None
    payload: str | None = None


@dataclass(frozen=True, slots=True)
class NewAlert:
    customer_id: str
    period_key: str
    threshold: str
    payload: str
    created_at: int


@dataclass(frozen=True, slots=True)
class AlertRecord:
    id: int
    customer_id: str
    period_key: str
    threshold: str
    payload: str
    attempts: int
    created_at: int = 0
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class RulesText:
    version: str
    files: str                  # JSON: [{"file": name, "text": text}, ...]
    first_loaded_at: int


# ---- owners ------------------------------------------------------------------------------


class Outbox(Protocol):
    """Owner of ``outbox`` and ``carry``. States: ``pending`` -> ``sent`` | ``dead`` |
    ``dry_run``; ``dead`` -> ``pending`` (replay); ``dry_run`` -> ``pending`` (requeue).
    An identifier, once staged, never changes and is never reused."""

    async def stage(self, event_names: Mapping[str, tuple[str, str | None]],
                    transforms: Mapping[str, TransformQuantity] | None = None,
                    now: float | None = None) -> list[StagedEvent]:
        """Atomically turn all materialized usage not yet staged into pending outbox rows
        (floor and carry, or a meter's transform; see ``proxy.store.outbox``) and mark that
        usage staged. Idempotent: a second call with no new usage stages nothing. Returns
        the events staged, in identifier order. Concurrent calls never stage one unit twice."""
        ...

    async def due(self, now: float, limit: int = 5000) -> list[DueEvent]:
        """Pending rows whose ``next_attempt_at <= now``, oldest id first, at most ``limit``.
        Read only."""
        ...

    async def begin_attempt(self, ids: Sequence[int], at: float | None = None) -> None:
        """Durably add one to ``attempts`` of each row BEFORE any call is made for it, so an
        Idempotency-Key derived from (identifier, attempts) is never reused across a crash;
        and set ``first_attempt_at`` where it is not set yet: to ``at`` (default now), or to
        the row's ``created_at`` when ``attempts`` is already above 0 (a call an earlier
        version made, which recorded no time: dated early, so its resend horizon ends early,
        never late)."""
        ...

    async def mark_sent(self, outbox_id: int, *, sink: str, outcome: str, at: int) -> None:
        """Final: status ``sent`` with when/what sent it; clears ``last_error``. Idempotent."""
        ...

    async def mark_dry_run(self, outbox_id: int, *, sink: str, outcome: str) -> None:
        """Logged by a dry-run sink, not sent: status ``dry_run``; ``attempts`` unchanged
        (it counts real calls only and is never reset, so a real sink given the row later
        never reuses an Idempotency-Key of an earlier call)."""
        ...

    async def retry_at(self, outbox_id: int, when: float, error: str,
                       not_called: float | None = None) -> None:
        """Stays pending; not due before ``when``; ``error`` (truncated to 500) recorded.
        ``not_called``: the ``at`` of the ``begin_attempt`` whose call was never made for this
        row (it waited behind a failure): where ``first_attempt_at`` equals it, that attempt
        is undone (``first_attempt_at`` cleared, ``attempts`` back down by one: its key was
        never used), so ``attempts > 0`` always means a call was made."""
        ...

    async def mark_dead(self, outbox_id: int, *, reason: str, sink: str, at: int) -> None:
        """Dead letter: status ``dead`` with the reason (truncated to 500). Never resent
        until ``replay``."""
        ...

    async def requeue_dry_run(self) -> int:
        """Every ``dry_run`` row back to pending and due now (sink/outcome cleared);
        returns how many. Idempotent (a second call returns 0)."""
        ...

    async def replay(self, outbox_id: int, restamp_at: int | None = None,
                     now: float | None = None) -> bool:
        """A dead letter back to pending and due now (``now``: the caller's clock, default
        the system's; ``restamp_at``: its event timestamp
        becomes that time). True only if the row was dead; False (nothing changed) for a
        missing or non-dead row, so a second replay returns False. A row dead-lettered as
        unconfirmed past its resend horizon (reason starting ``UNCONFIRMED``, in
        ``proxy.store.outbox``) gets ``first_attempt_at`` set to the replay's time: replaying
        it is the operator's word that Stripe does not have it, so the resend horizon starts
        over from then (not cleared: a row with attempts and no time is dated from its
        creation); any other keeps it."""
        ...

    async def make_due(self, ids: Sequence[int]) -> int:
        """Pending rows among ``ids`` become due now (reconciliation's resend); rows in any
        other state are untouched. Returns how many were pending."""
        ...

    async def rows(self, *, status: str | None = None, outbox_id: int | None = None,
                   customer_id: str | None = None, limit: int = 500) -> list[OutboxEntry]:
        """Rows, newest id first, filtered by status, id and customer, at most ``limit``."""
        ...

    async def counts(self) -> OutboxCounts:
        ...

    async def oldest_pending_created(self) -> int | None:
        """``created_at`` of the oldest pending row (the flusher's lag), None if none."""
        ...

    async def hour_totals(self, start: int, end: int) -> list[HourTotal]:
        """Per customer, event name and hour of ``timestamp`` in [start, end): totals by
        status (reconciliation's view of the ledger)."""
        ...

    async def rows_in_hour(self, customer_id: str, event_name: str,
                           hour: int) -> list[tuple[int, str, str]]:
        """(id, identifier, status) of the rows of one hour, by id."""
        ...

    async def remainders(self, customer_id: str) -> dict[str, int]:
        """``"meter:event_name"`` -> carried micro-units not yet staged."""
        ...


class CreditLedger(Protocol):
    """Owner of ``grants``, ``credit_entries``, ``grant_payments``, ``payment_links``,
    ``clawbacks`` and ``plan_invoices``. The ledger is append-only: a grant is never updated after creation (its
    state is its entries). Debits settled by requests are appended by the group commit
    (``UsageLedger.record`` carries them), in the same transaction as the usage."""

    async def load(self) -> LedgerSnapshot:
        """Everything needed to rebuild the in-memory book (entries in commit order)."""
        ...

    async def create_grant(self, new: NewGrant,
                           then: Callable[[GrantState], list[Entry]] | None = None
                           ) -> tuple[GrantState, bool]:
        """Create the grant (with its ``effective_at`` and ``carried``), idempotent per
        (customer, ``idempotency_key``): when the key is already used, returns (the existing
        grant, False) and writes nothing except the payment refs: each ref is recorded on
        that grant too, keeping the larger ``paid_minor`` (a renewal granted when its invoice
        was created, then paid). Raises LookupError when the customer does not exist. On
        creation also records the payment refs and appends the entries ``then(grant)``
        returns (e.g. debt repayment), all in one transaction."""
        ...

    async def append(self, entries: Sequence[LedgerEntry]) -> None:
        """Append entries atomically, in order. Not idempotent: callers append each change
        once (the book is updated after this returns)."""
        ...

    async def entries(self, customer_id: str, limit: int = 200) -> list[EntryRecord]:
        """A customer's entries, newest first, at most ``limit``."""
        ...

    async def undo_repay(self, customer_id: str, key: str, amount: int,
                         at: float) -> list[Entry]:
        """Give back up to ``amount`` of the customer's debt repayments (negative ``repay``
        entries, newest repayment first: ``proxy.credits.ledger.unrepay``), never more than
        the ledger's repayments exceed its debt, in one transaction, under request id
        ``key``. Idempotent on ``key``: when entries under it exist, writes nothing and
        returns them."""
        ...

    async def grant_ids(self, customer_id: str, key_prefix: str,
                        exclude_prefix: str | None = None) -> set[str]:
        """Ids of the customer's grants whose idempotency key starts with ``key_prefix`` (and
        not with ``exclude_prefix``)."""
        ...

    async def has_grant(self, customer_id: str, idempotency_key: str) -> bool:
        ...

    async def previous_period_grant(self, customer_id: str, key_prefix: str,
                                    start: int) -> str | None:
        """Plan rollover: the id of the grant of the latest period before ``start`` among
        grants whose key starts with ``key_prefix``; None when there is none OR a grant of a
        later period already exists (it carried first)."""
        ...

    async def entry_total(self, grant_id: str, kind: str) -> int:
        """Sum of a grant's entries of one kind (0 when none)."""
        ...

    async def grant_carried(self, grant_id: str) -> int:
        """The ``carried`` part of a grant (0 for an unknown grant)."""
        ...

    async def followed_out(self, grant_id: str) -> int:
        """What claw-backs followed out of a grant into the grants its credits were carried
        into (the ``carry:<grant>>`` rows of ``clawbacks``, every key): credits of the
        grant's refunded payment, taken already, that a period granted anew after a
        write-off must not carry again."""
        ...

    async def paid_for(self, ref: str) -> int:
        """The largest amount (minor units) recorded for a payment ref on any grant; 0 when
        none."""
        ...

    async def plan_grant_for(self, customer_id: str, subscription: str,
                             at: int) -> tuple[str, int, int] | None:
        """(grant id, period start, period end) of the latest plan grant of a subscription
        (idempotency key ``stripe:plan:<subscription>:``...) whose period [start, end)
        contains ``at``; None when there is none."""
        ...

    async def subscription_customer(self, subscription: str) -> str | None:
        """The customer a subscription's plan grants (``stripe:plan:<sub>:``, then
        ``stripe:planchange:<sub>:``) or plan invoices went to; None when none."""
        ...

    async def record_plan_invoice(self, invoice_id: str, grant_id: str, customer_id: str,
                                  subscription: str, state: str, at: int) -> None:
        """Owner of ``plan_invoices``: remember that a plan grant was made for a
        subscription invoice, ``state`` ``open`` (granted before payment) or ``paid``. An
        unknown invoice is inserted; an ``open`` one moves to ``state``; ``paid`` and
        ``unpaid`` are final (nothing changes). Idempotent."""
        ...

    async def plan_invoice_state(self, invoice_id: str) -> str | None:
        """``open`` | ``paid`` | ``unpaid``, None for an invoice no plan grant was made for."""
        ...

    async def open_plan_invoices(self, customer_id: str, subscription: str | None = None
                                 ) -> list[tuple[str, str]]:
        """(invoice id, grant id) of the customer's plan invoices still ``open`` (of one
        subscription when given), by invoice id."""
        ...

    async def write_off_plan_invoice(self, invoice_id: str, at: int) -> bool:
        """An ``open`` plan invoice becomes ``unpaid`` (final); True if it was open. A second
        call returns False."""
        ...

    async def payment_customer(self, refs: Sequence[str]) -> str | None:
        """The customer whose grant a payment paid (by any of its refs, or by an invoice a
        linked payment paid)."""
        ...

    async def link_payment(self, payment_refs: Sequence[str], invoice_ref: str) -> int:
        """Remember that payments paid an invoice; returns how many links are new.
        Idempotent (a repeat returns 0)."""
        ...

    async def claw_back(self, customer_id: str, refs: Sequence[str], key: str, event_id: str,
                        returned_minor: int,
                        decide: Callable[[GrantFacts], ClawbackDecision | None],
                        ) -> list[tuple[str, int, list[Entry]]]:
        """For each grant (by id) paid by ``refs`` or the invoices they paid, read its
        facts and call ``decide`` (pure) inside the one transaction; a decision appends its
        entries (a debt entry under request id ``clawback:<grant>``, others under
        ``<key>:<grant>``) and records the new cumulative claw-back for
        ``<key>:<grant>``. Returns (grant id, credits newly clawed, entries). Idempotent on
        ``key``: the facts include what this key already took, so a repeat decides nothing.
        A decision's ``follow`` (when the next period's plan grant, ``next_period_grant``,
        carried something) and its ``owe`` are decided again, together, on that grant,
        with ``follow_target`` and ``owe_target`` set, recorded as
        ``carry:<grant>><next>:<key>`` and ``owe:<grant>><next>:<key>`` (grant id: the
        next one), and so on along the chain."""
        ...


class UsageLedger(Protocol):
    """Owner of ``journal``, ``audit`` and ``usage_minute`` (and, through a recorded
    row's debits, the settled ``credit_entries``)."""

    def record(self, row: UsageRow, wait: bool) -> asyncio.Future[None] | None:
        """The hot path: never blocks, never does I/O. With ``wait`` (strict durability) the
        returned future resolves once the group commit holding the row is durable (or fails
        per ``fail_mode``). Each row is counted exactly once in audit, usage and credits,
        whatever the process dies between."""
        ...

    async def materialize(self) -> int:
        """Make every row committed so far visible to the readers below (SQLite: move the
        journal into ``audit``/``usage_minute``/``credit_entries`` in one transaction; a
        backend that writes the tables directly returns 0). Returns rows moved. Exactly
        once: a row is never counted twice, whatever crash interrupts it."""
        ...

    async def usage(self, customer_id: str, start: float | None = None,
                    end: float | None = None, now: float | None = None
                    ) -> tuple[float, float, dict[str, UsageTotal]]:
        """Per-meter totals of the minutes in [start, end) (``periods.minute_bounds``: a
        minute counts iff its start is in the range, so a period whose anchor has seconds,
        12:30:15, starts with the minute 12:30:00 excluded, as staging bills it in the
        previous period). THE default range rule: ``start`` defaults to the start of the customer's
        current billing period (the calendar month, UTC, without a billing anchor; an
        unknown customer has none), ``end`` to now + 60 s. Returns (start, end, totals)."""
        ...

    async def usage_days(self, customer_id: str, since: int, period: tuple[int, int],
                         trailing_from: int) -> list[UsageDay]:
        """The customer's minutes from ``since``, grouped by meter and UTC day and by
        membership of ``period`` [start, end) and of the trailing window (> trailing_from)."""
        ...

    async def billable(self, start: int, end: int) -> dict[tuple[str, str], int]:
        """(customer, meter) -> billable micro-units of the minutes in [start, end)."""
        ...

    async def quantities(self, start: int, end: int) -> dict[tuple[str, str], int]:
        """(customer, meter) -> metered quantity (micro-units, billable or not) of the
        minutes in [start, end)."""
        ...

    async def oldest_unstaged_minute(self) -> int | None:
        """The oldest minute with usage not yet staged to the outbox, None if none."""
        ...

    def audit_stream(self, customer_id: str | None, start: float, end: float,
                     customers: Sequence[str] | None = None,
                     batch: int = 500) -> AsyncIterator[list[AuditRecord]]:
        """Audit rows whose minute is in [start, end) (``periods.minute_bounds``: ``at`` in
        [minute_bound(start), minute_bound(end)), the rows ``usage`` sums) of one customer,
        or ``customers``, or all, in batches of at most ``batch``: for one ``customer_id`` by
        time, then commit order (an export); otherwise in commit order (a request's rows
        stay together)."""
        ...

    async def audit_for_request(self, request_id: str) -> list[AuditRecord]:
        """Every audit row of a request id, in commit order (ids may repeat)."""
        ...

    async def audit_versions(self, start: float, end: float) -> list[str]:
        """The distinct rules versions of the audit rows whose minute is in [start, end)."""
        ...

    async def prune_audit(self, cutoff_ms: int, batch: int = 5000) -> int:
        """Delete at most ``batch`` audit rows older than ``cutoff_ms``, oldest first;
        returns how many (call again while it returns ``batch``). Idempotent."""
        ...


class Customers(Protocol):
    """Owner of ``customers`` and ``api_keys``. A key's secret is never stored."""

    async def upsert(self, cid: object, stripe_customer_id: object, overage: object,
                     status: object,
                     billing: Callable[[Customer], tuple[object, object]] | None = None,
                     *, currency: object = None, credit_mode: object = ...
                     ) -> tuple[Customer, bool]:
        """Create or update from raw JSON values (InvalidInput on bad ones, nothing
        written); a None field keeps its value. An explicit status is the operator's: it
        clears any automatic suspension reason. ``billing`` (pure; it may raise to refuse
        the whole write) gets the upserted customer and returns its (billing anchor,
        minimum commitment), ``currency`` (an ISO code, as ``set_currency``) and
        ``credit_mode`` (as ``set_credit_mode``; ``keys.KEEP``, the default, keeps it) are
        set; all in the same transaction, so a customer is never created without them.
        Returns (customer, created). Idempotent."""
        ...

    async def set_billing(self, cid: str, anchor: object, minimum: object) -> None:
        ...

    async def set_currency(self, cid: str, currency: object) -> bool:
        """Set the currency the customer is charged in (a three-letter ISO code, stored
        lower case; InvalidInput otherwise). True if it changed; False when it was already
        that currency or the customer does not exist."""
        ...

    async def set_credit_mode(self, cid: str, mode: object) -> bool:
        """Set the customer's credits mode (``units``, ``monetary``, or None for the
        configured default; anything else is InvalidInput). False when unchanged or the
        customer does not exist."""
        ...

    async def follow_anchor(self, cid: str, anchor: int, event_at: int) -> bool:
        """Set the billing anchor from a Stripe subscription event created at ``event_at``
        unless an event newer than it already set it (ties: the later call wins). True if
        the anchor was set; False for an unknown customer or an older event. Atomic."""
        ...

    async def get(self, cid: str) -> Customer | None:
        ...

    async def all(self) -> list[Customer]:
        """All customers by id."""
        ...

    async def by_stripe_id(self, stripe_customer_id: str) -> list[str]:
        """Ids of the customers with this Stripe customer id, sorted."""
        ...

    async def stripe_ids(self) -> dict[str, str]:
        """customer -> Stripe customer id, for customers that have one."""
        ...

    async def change_suspension(self, cid: str,
                                decide: Callable[[str, str | None],
                                                 tuple[str, str | None] | None]) -> bool:
        """Atomic read-modify-write of (status, suspension reason): ``decide`` (pure) gets
        the current pair (("active", None) for an unknown customer, which is then created)
        and returns the new pair or None for no change. Returns whether it changed."""
        ...

    async def create_key(self, customer_id: str, name: str = "") -> dict[str, Any]:
        """Mint a key; the returned ``key`` is the only copy of the secret. LookupError
        when the customer does not exist."""
        ...

    async def revoke_key(self, key_id: str) -> bool:
        """True if this call revoked it, False if already revoked (idempotent);
        LookupError for an unknown key."""
        ...

    async def list_keys(self, customer_id: str | None = None) -> list[dict[str, Any]]:
        ...

    async def snapshot(self) -> KeySnapshot:
        """Every key (by hash) and customer: the hot path's in-memory cache is replaced by
        this whole."""
        ...

    def data_version(self) -> int:
        """Changes whenever another connection/process committed (cache invalidation)."""
        ...


class WebhookEvents(Protocol):
    """Owner of ``webhook_events``."""

    async def record(self, event_id: str, type_: str, created: int | None, payload: str,
                     received_at: int) -> bool:
        """Store a received event under its id; False (nothing changed) when that id is
        already stored: this is the dedupe. Durable before the sender is answered."""
        ...

    async def waiting(self, statuses: Sequence[str], after: int,
                      limit: int = 100) -> list[tuple[int, str]]:
        """(cursor, event id) of events in ``statuses``, in arrival order, after ``after``
        (cursor 0: from the start)."""
        ...

    async def payload(self, event_id: str) -> str | None:
        ...

    async def set_outcome(self, event_id: str, status: str, result: str,
                          processed_at: int) -> None:
        """Record the processing outcome (re-processing overwrites it)."""
        ...

    async def invoice_paid_seen(self, invoice_id: str | None) -> bool:
        """An ``invoice.paid`` event for this invoice id was received."""
        ...

    async def recent(self, status: str | None = None,
                     limit: int = 100) -> list[StoredEvent]:
        """Newest first, without payloads."""
        ...

    async def get(self, event_id: str) -> StoredEvent | None:
        """With its payload."""
        ...


class AlertsFired(Protocol):
    """Owner of ``alerts``: one row per (customer, period, threshold), then delivery state
    ``pending`` -> ``sent`` | ``logged`` | ``dead``; ``dead`` -> ``pending`` (requeue)."""

    async def fired(self) -> set[tuple[str, str, str]]:
        """(customer, period key, threshold) of every alert ever fired."""
        ...

    def fire(self, alerts: Sequence[NewAlert]) -> None:
        """Insert the alerts not fired yet. Idempotent per (customer, period, threshold): an
        alert fires once, across restarts and members. Called on the request path (the
        threshold detector), so it is synchronous and never waits for a network round trip:
        SQLite commits it inline (one small transaction, durable on return); a networked
        backend may queue it and commit it in the background (durable shortly after; the
        sender delivers only committed alerts)."""
        ...

    async def fire_new(self, alerts: Sequence[NewAlert]) -> list[NewAlert]:
        """Like ``fire`` (idempotent per (customer, period, threshold)), but awaited off the
        request path: durable on return, and returns the alerts this call inserted (a repeat
        returns [])."""
        ...

    async def due(self, now: float, limit: int = 100) -> list[AlertRecord]:
        """Pending alerts with ``next_attempt_at <= now``, by id."""
        ...

    async def next_due(self) -> float | None:
        ...

    async def claim(self, alert_id: int, now: float, lease_until: float) -> int | None:
        """Take a due pending alert for one attempt: adds one to ``attempts`` and hides it
        until ``lease_until``. Returns the attempt number, or None if it was not due (another
        sender has it): two concurrent claims never both succeed."""
        ...

    async def finish(self, alert_id: int, status: str, error: str | None,
                     sent_at: int | None) -> bool:
        """A pending alert to a final status; False if it was not pending."""
        ...

    async def retry_at(self, alert_id: int, when: float, error: str) -> None:
        ...

    async def list_dead(self, limit: int = 100) -> list[AlertRecord]:
        ...

    async def requeue(self, ids: Sequence[int]) -> int:
        """Dead alerts back to pending, attempts 0, due now; returns how many were dead."""
        ...


class RulesHistory(Protocol):
    """Owner of ``rules_versions``: the text of every rules version ever loaded."""

    async def remember(self, version: str, files: str, at: int) -> bool:
        """Keep the first text and time of a version; True if it was new. Idempotent."""
        ...

    async def get(self, version: str) -> RulesText | None:
        ...

    async def newest(self) -> str | None:
        """The version most recently loaded for the first time."""
        ...


class TrueUps(Protocol):
    """Owner of ``trueups``: each ended period's minimum-commitment true-up, decided once per
    (customer, period start)."""

    async def decided(self, customer_id: str, period_start: int) -> bool:
        """Whether the period has a row (``sending`` included: its parameters are frozen)."""
        ...

    async def record(self, t: TrueUpRecord) -> bool:
        """Record the decision unless one exists for (customer, period start); True if this
        call recorded it (the first decision stays). ``none``, ``sent``, or ``sending``
        (with its ``stripe_customer_id``): the parameters of the invoice item about to be
        created, which every later attempt sends as they are; ValueError otherwise."""
        ...

    async def sending(self) -> list[TrueUpRecord]:
        """The ``sending`` true-ups (frozen, not confirmed), oldest period first."""
        ...

    async def mark_sent(self, customer_id: str, period_start: int, invoice_item: str) -> bool:
        """A ``sending`` true-up's item was created (or found): ``sent`` with its id. True if
        this call changed it (False: already sent, or no such ``sending`` row)."""
        ...

    async def recent(self, customer_id: str | None = None,
                     limit: int = 100) -> list[TrueUpRecord]:
        """Decisions, newest period first (one customer's when given)."""
        ...


class GrantMirrors(Protocol):
    """Each local grant's Stripe credit grant mirror (monetary mode, docs/credits.md): the
    only writer of ``grant_mirrors``. A row is a durable intent: the worker
    (``proxy.credits.mirror``) retries it until Stripe holds ``want``."""

    async def want(self, rows: Sequence[tuple[str, str, str]], at: int) -> int:
        """(grant id, customer id, want) each: insert a pending row, or move an existing
        row whose ``want`` differs to the new one (pending, due now; ``void`` is final: a
        voided mirror never goes back to ``live``). Returns the rows changed."""
        ...

    async def due(self, now: float, limit: int = 100) -> list[GrantMirrorRecord]:
        """Pending rows whose next attempt is due, oldest first."""
        ...

    async def progress(self, grant_id: str, done: str, stripe_grant_id: str | None,
                       at: int) -> None:
        """Stripe now holds ``done`` (and the Stripe id when one is known): ``mirrored``
        when that is what the row wants, else still pending and due at once; attempts and
        error reset."""
        ...

    async def fail(self, grant_id: str, error: str, retry_at: float | None, at: int) -> None:
        """A failed attempt: one more attempt, the error kept; due again at ``retry_at``,
        or ``dead`` when None."""
        ...

    async def rows(self, *, status: str | None = None, customer_id: str | None = None,
                   limit: int = 500) -> list[GrantMirrorRecord]:
        """The rows, newest change first, filtered by status and customer."""
        ...

    async def known(self) -> dict[str, str]:
        """grant id -> want, for every row (the worker's discovery compares the book)."""
        ...

    async def requeue(self, grant_ids: Sequence[str] | None, at: int) -> int:
        """Dead rows (those named, or all) back to pending, due now, attempts reset."""
        ...

    async def finalize(self, customer_id: str, period_end: int, at: int) -> bool:
        """Stripe finalized an invoice of the customer for usage up to ``period_end``
        (``invoice.finalized``): kept as the customer's latest such end, never lowered.
        True when it moved."""
        ...

    async def finalized(self) -> dict[str, int]:
        """customer id -> the latest usage-period end of an invoice Stripe finalized."""
        ...


class Maintenance(Protocol):
    """Owner of the file (or server) health: checkpoints and integrity."""

    def check_file(self) -> str | None:
        """Why the store can no longer be trusted, or None. Cheap; readiness calls it."""
        ...

    async def checkpoint_once(self) -> None:
        ...

    async def integrity_check(self) -> str | None:
        ...


class Storage(Protocol):
    """One backend: every owner. Built by the backend's factory (``tests/store/conftest``)."""

    @property
    def outbox(self) -> Outbox: ...
    @property
    def ledger(self) -> CreditLedger: ...
    @property
    def usage(self) -> UsageLedger: ...
    @property
    def customers(self) -> Customers: ...
    @property
    def webhooks(self) -> WebhookEvents: ...
    @property
    def alerts(self) -> AlertsFired: ...
    @property
    def rules(self) -> RulesHistory: ...
    @property
    def trueups(self) -> TrueUps: ...
    @property
    def mirrors(self) -> GrantMirrors: ...
    @property
    def maintenance(self) -> Maintenance: ...
