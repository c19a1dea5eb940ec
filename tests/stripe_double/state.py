"""In-memory model of the slice of Stripe Billing that meterproxy talks to.

Everything here is synchronous and runs on the event loop of the double's
server, so there is no locking. The HTTP layer (``app.py``) translates
:class:`DoubleError` into Stripe's error JSON.

Time is ``time.time()`` shifted by :meth:`StripeDoubleState.advance`, so tests
can age events (24 h adjustment window, identifier window, session expiry,
summary lag) without sleeping.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from .faults import Faults

if TYPE_CHECKING:
    from .invoices import Subscription

Formula = Literal["sum", "count", "last"]
DAY = 86_400
MAX_EVENT_AGE = 35 * DAY
MAX_FUTURE_SKEW = 300
MAX_SIGNIFICANT_DIGITS = 15
LEGACY_USAGE_CUTOFF = "2025-03-31"  # usage records removed in 2025-03-31.basil
_WHOLE = re.compile(r"^-?[0-9]+$")
_MAX_IDENTIFIER = 100
_MAX_EVENT_NAME = 100


class DoubleError(Exception):
    """An error answered with Stripe's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"type": self.type, "message": self.message}
        err["code"] = self.code
        err["param"] = self.param
        err["doc_url"] = (
            f"https://stripe.com/docs/error-codes/{self.code.replace('_', '-')}"
            if self.code
            else None
        )
        return {"error": err}


def missing(param: str) -> DoubleError:
    return DoubleError(
        400, f"Missing required param: {param}.", code="parameter_missing", param=param
    )


def invalid(param: str, message: str, code: str = "parameter_invalid_string") -> DoubleError:
    return DoubleError(400, message, code=code, param=param)


def parse_whole_number(raw: Any, param: str) -> int:
    """Stripe's rule for meter event values: a whole number, <= 15 significant digits."""
    if not isinstance(raw, str) or not _WHOLE.match(raw.strip()):
        raise invalid(
            param,
            f"Invalid {param}: value must be a whole number (integer), got {raw!r}.",
            code="parameter_invalid_integer",
        )
    digits = raw.strip().lstrip("-").lstrip("0")
    if len(digits) > MAX_SIGNIFICANT_DIGITS:
        raise invalid(
            param,
            f"Invalid {param}: value has more than {MAX_SIGNIFICANT_DIGITS} significant "
            f"digits ({raw!r}).",
            code="parameter_invalid_integer",
        )
    return int(raw)


def parse_int(raw: Any, param: str) -> int:
    if isinstance(raw, bool):
        raise invalid(param, f"Invalid integer: {raw!r}", code="parameter_invalid_integer")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str) and re.fullmatch(r"-?[0-9]+", raw):
        return int(raw)
    raise invalid(param, f"Invalid integer: {raw}", code="parameter_invalid_integer")


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_rfc3339(raw: str) -> int:
    dt = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    if dt.tzinfo is None:
        raise ValueError("timestamp without a UTC offset")
    return int(dt.timestamp())


@dataclass
class Meter:
    id: str
    event_name: str
    formula: Formula = "sum"
    customer_key: str = "stripe_customer_id"
    value_key: str = "value"
    status: Literal["active", "inactive"] = "active"
    display_name: str = ""
    created: int = 0
    # pre-aggregated meter: Stripe uses only the most recent event (by receipt) in each
    # hourly or daily (UTC) window; a newer event in the same window overwrites the older
    event_time_window: Literal["hour", "day"] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "billing.meter",
            "created": self.created,
            "customer_mapping": {"event_payload_key": self.customer_key, "type": "by_id"},
            "default_aggregation": {"formula": self.formula},
            "display_name": self.display_name or self.event_name,
            "event_name": self.event_name,
            "event_time_window": self.event_time_window,
            "livemode": False,
            "status": self.status,
            "status_transitions": {"deactivated_at": None},
            "updated": self.created,
            "value_settings": {"event_payload_key": self.value_key},
        }


def _newest_per_window(events: list[MeterEvent], window: str) -> list[MeterEvent]:
    """A pre-aggregated meter's view: per customer and UTC hour/day of the event timestamp,
    only the most recently received event counts (a newer one overwrites the older)."""
    step = 3600 if window == "hour" else DAY
    newest: dict[tuple[str, int], MeterEvent] = {}
    for e in events:           # in receipt order: a later one replaces an earlier one
        key = (e.customer, e.timestamp // step)
        if key not in newest or e.received_at >= newest[key].received_at:
            newest[key] = e
    return list(newest.values())


@dataclass
class MeterEvent:
    identifier: str
    event_name: str
    customer: str
    value: int
    timestamp: int
    received_at: float
    payload: dict[str, str]
    source: Literal["v1", "v2"]
    visible_at: float = 0.0  # when summaries start to include it (summary_lag at receipt)
    cancelled_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "object": "billing.meter_event",
            "created": int(self.received_at),
            "event_name": self.event_name,
            "identifier": self.identifier,
            "livemode": False,
            "payload": dict(self.payload),
            "timestamp": self.timestamp,
        }


@dataclass
class PreparedEvent:
    """A validated v1 meter event, not yet committed."""

    meter: Meter
    customer: str
    value: int
    identifier: str | None
    timestamp: int
    payload: dict[str, str]


@dataclass
class CallRecord:
    route: str
    method: str
    path: str
    request_id: str
    stripe_version: str | None
    idempotency_key: str | None
    at: float
    params: dict[str, Any] = field(default_factory=dict)
    status: int | None = None  # None: connection dropped
    fault: str | None = None
    replayed: bool = False


@dataclass
class IdempotentResult:
    fingerprint: str
    status: int
    body: bytes
    headers: dict[str, str]
    created: float


@dataclass
class Session:
    id: str
    authentication_token: str
    created: float
    expires_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "v2.billing.meter_event_session",
            "authentication_token": self.authentication_token,
            "created": rfc3339(self.created),
            "expires_at": rfc3339(self.expires_at),
            "livemode": False,
        }


@dataclass
class SubscriptionItem:
    id: str
    period_start: int
    period_end: int
    # timestamp -> quantity ("set" replaces the timestamp's quantity, "increment" adds)
    usage: dict[int, int] = field(default_factory=dict)


class StripeDoubleState:
    """The double's whole memory, plus the helpers tests assert with."""

    def __init__(
        self,
        *,
        seed: int = 0,
        processing_delay: float = 0.0,
        summary_lag: float = 0.0,
        session_ttl: float = 15 * 60,
        hang_seconds: float = 2.0,
        identifier_window: float = DAY,
        idempotency_ttl: float = DAY,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.seed = seed
        #: Seconds each v1 meter event call holds its (customer, event_name) slot.
        self.processing_delay = processing_delay
        #: Seconds before an event accepted from now on shows in summaries (eventual consistency).
        self.summary_lag = summary_lag
        self.session_ttl = session_ttl
        self.identifier_window = identifier_window
        self.idempotency_ttl = idempotency_ttl
        #: Stripe replays the first result for a key "even a 500": keep True to be faithful.
        self.idempotency_replays_5xx = True
        self.log = log
        self.faults = Faults(seed=seed, hang_seconds=hang_seconds)
        #: When set (an asyncio.Event), v1 meter event calls wait on it while
        #: holding their slot: a deterministic way to make calls overlap.
        self.processing_gate: asyncio.Event | None = None
        self._clock_offset = 0.0
        self._reset_data()

    def _reset_data(self) -> None:
        self.meters: dict[str, Meter] = {}
        self.events: list[MeterEvent] = []
        self._by_identifier: dict[str, MeterEvent] = {}
        self.identifier_seen: Counter[str] = Counter()
        self.errors: list[dict[str, Any]] = []
        self.concurrency_violations: list[dict[str, Any]] = []
        self.call_log: list[CallRecord] = []
        self.in_flight: Counter[tuple[str, str]] = Counter()
        self.idempotency: dict[tuple[str, str], IdempotentResult] = {}
        self.idempotency_in_progress: set[tuple[str, str]] = set()
        self.sessions: dict[str, Session] = {}
        self.subscription_items: dict[str, SubscriptionItem] = {}
        self.adjustments: list[dict[str, Any]] = []
        from .credits import CreditGrants, InvoiceItems  # they import this module

        self.credit_grants = CreditGrants(self.now)
        self.invoice_items = InvoiceItems(self.now)
        self.prices: dict[str, dict[str, Any]] = {}
        self.subscriptions: dict[str, Subscription] = {}     # by customer (invoice previews)
        self.previews: dict[str, list[dict[str, Any]]] = {}  # preview id -> its lines

    def reset(self) -> None:
        """Forget everything (meters too), clear faults, reseed, restore the clock."""
        self._clock_offset = 0.0
        self.faults = Faults(seed=self.seed, hang_seconds=self.faults.hang_seconds)
        self._reset_data()

    # -- clock -------------------------------------------------------------
    def now(self) -> float:
        return time.time() + self._clock_offset

    def advance(self, seconds: float) -> None:
        """Move the double's clock forward (ages events, sessions, idempotency keys)."""
        self._clock_offset += seconds

    # -- seeding -----------------------------------------------------------
    def add_meter(
        self,
        event_name: str,
        formula: Formula = "sum",
        *,
        id: str | None = None,
        customer_key: str = "stripe_customer_id",
        value_key: str = "value",
        status: Literal["active", "inactive"] = "active",
        display_name: str = "",
        event_time_window: Literal["hour", "day"] | None = None,
    ) -> Meter:
        if formula not in ("sum", "count", "last"):
            raise ValueError(f"bad formula {formula!r}")
        if event_time_window not in (None, "hour", "day"):
            raise ValueError(f"bad event_time_window {event_time_window!r}")
        meter = Meter(
            id=id or f"mtr_test_{secrets.token_hex(12)}",
            event_name=event_name,
            formula=formula,
            customer_key=customer_key,
            value_key=value_key,
            status=status,
            display_name=display_name,
            created=int(self.now()),
            event_time_window=event_time_window,
        )
        self.meters[meter.id] = meter
        return meter

    def add_meters_json(self, specs: Iterable[Mapping[str, Any]]) -> list[Meter]:
        """Seed from JSON: ``{"event_name", "formula"|"default_aggregation", "id"?...}``."""
        out = []
        for spec in specs:
            formula = spec.get("formula") or (spec.get("default_aggregation") or {}).get(
                "formula", "sum"
            )
            out.append(
                self.add_meter(
                    str(spec["event_name"]),
                    formula,
                    id=spec.get("id"),
                    customer_key=spec.get("customer_key")
                    or (spec.get("customer_mapping") or {}).get(
                        "event_payload_key", "stripe_customer_id"
                    ),
                    value_key=spec.get("value_key")
                    or (spec.get("value_settings") or {}).get("event_payload_key", "value"),
                    status=spec.get("status", "active"),
                    display_name=spec.get("display_name", ""),
                    event_time_window=spec.get("event_time_window"),
                )
            )
        return out

    def add_subscription_item(
        self, id: str, period_start: int | None = None, period_end: int | None = None
    ) -> SubscriptionItem:
        now = int(self.now())
        start = period_start if period_start is not None else now - now % DAY - 15 * DAY
        end = period_end if period_end is not None else start + 30 * DAY
        item = SubscriptionItem(id=id, period_start=start, period_end=end)
        self.subscription_items[id] = item
        return item

    def add_price(self, price: Mapping[str, Any]) -> dict[str, Any]:
        """Seed a Price object (Stripe's field names; ``id`` required), served as given by
        ``GET /v1/prices/{id}`` (``tiers`` only when ``expand[]=tiers`` is asked,
        ``currency_options`` only when ``expand[]=currency_options`` is)."""
        obj = {"object": "price", "active": True, **price}
        self.prices[str(obj["id"])] = obj
        return obj

    def add_subscription(self, customer: str, prices: list[str], period: tuple[int, int],
                         sub_id: str | None = None,
                         currency: str | None = None) -> Subscription:
        """A customer's subscription as invoice previews see it (``invoices.py``);
        ``currency``: billed in it through the prices' ``currency_options``."""
        from .invoices import Subscription  # it imports this module

        sub = Subscription(sub_id or f"sub_{customer}", customer, list(prices), period,
                           currency)
        self.subscriptions[customer] = sub
        return sub

    def active_meter_for(self, event_name: str) -> Meter | None:
        for meter in self.meters.values():
            if meter.event_name == event_name and meter.status == "active":
                return meter
        return None

    # -- assertions helpers ----------------------------------------------
    def accepted_events(
        self, customer: str | None = None, event_name: str | None = None
    ) -> list[MeterEvent]:
        return [
            e
            for e in self.events
            if e.cancelled_at is None
            and (customer is None or e.customer == customer)
            and (event_name is None or e.event_name == event_name)
        ]

    def totals(self, customer: str, event_name: str) -> int:
        """Sum of values of accepted, uncancelled events (ignores summary lag)."""
        return sum(e.value for e in self.accepted_events(customer, event_name))

    def event_count(self, customer: str, event_name: str) -> int:
        return len(self.accepted_events(customer, event_name))

    def identifier_count(self, identifier: str) -> int:
        """How many times an event with this identifier reached Stripe's processing
        (accepted once + duplicates rejected/ignored). Accepted is at most 1 in 24 h."""
        return self.identifier_seen[identifier]

    def event(self, identifier: str) -> MeterEvent | None:
        return self._by_identifier.get(identifier)

    def calls(self, route: str | None = None) -> list[CallRecord]:
        return [c for c in self.call_log if route is None or c.route == route]

    def stripe_versions(self, route: str | None = None) -> set[str | None]:
        return {c.stripe_version for c in self.calls(route)}

    def max_in_flight(self) -> int:
        return max(self.in_flight.values(), default=0)

    async def wait_for(self, predicate: Callable[[], bool], within: float = 2.0) -> None:
        """Await a condition on the state (polls the loop; no fixed sleeps in tests)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not predicate():
            if loop.time() > deadline:
                raise TimeoutError("condition not met on the Stripe double's state")
            await asyncio.sleep(0.002)

    def snapshot(self) -> dict[str, Any]:
        totals: dict[tuple[str, str], dict[str, Any]] = {}
        for e in self.accepted_events():
            row = totals.setdefault(
                (e.customer, e.event_name),
                {"customer": e.customer, "event_name": e.event_name, "total": 0, "count": 0},
            )
            row["total"] += e.value
            row["count"] += 1
        return {
            "now": self.now(),
            "totals": list(totals.values()),
            "identifiers": dict(self.identifier_seen),
            "calls": dict(Counter(c.route for c in self.call_log)),
            "statuses": [[c.route, c.status, c.fault] for c in self.call_log],
            "stripe_versions": sorted({str(c.stripe_version) for c in self.call_log}),
            "concurrency_violations": list(self.concurrency_violations),
            "errors": list(self.errors),
            "meters": [m.to_json() for m in self.meters.values()],
            "faults": self.faults.snapshot(),
            "adjustments": list(self.adjustments),
            "events": [asdict(e) for e in self.events],
        }

    # -- v1 meter events ---------------------------------------------------
    def prepare_meter_event(self, params: Mapping[str, Any]) -> PreparedEvent:
        allowed = {"event_name", "payload", "identifier", "timestamp", "expand"}
        for key in params:
            if key not in allowed:
                raise DoubleError(
                    400, f"Received unknown parameter: {key}", code="parameter_unknown", param=key
                )
        event_name = params.get("event_name")
        if not event_name:
            raise missing("event_name")
        if not isinstance(event_name, str) or len(event_name) > _MAX_EVENT_NAME:
            raise invalid(
                "event_name", f"Invalid event_name: must be at most {_MAX_EVENT_NAME} characters."
            )
        payload = params.get("payload")
        if not isinstance(payload, dict) or not payload:
            raise missing("payload")
        identifier = params.get("identifier")
        if identifier is not None and (
            not isinstance(identifier, str) or not identifier or len(identifier) > _MAX_IDENTIFIER
        ):
            raise invalid(
                "identifier", f"Invalid identifier: must be 1 to {_MAX_IDENTIFIER} characters."
            )
        now = self.now()
        ts_raw = params.get("timestamp")
        timestamp = int(now) if ts_raw in (None, "") else parse_int(ts_raw, "timestamp")
        self._check_timestamp(timestamp, now)
        meter = self.active_meter_for(event_name)
        if meter is None:
            raise DoubleError(
                400,
                f'No active meter found for event name "{event_name}"',
                code="resource_missing",
                param="event_name",
            )
        customer, value, clean = self._read_payload(meter, payload)
        return PreparedEvent(meter, customer, value, identifier, timestamp, clean)

    def _check_timestamp(self, timestamp: int, now: float) -> None:
        if timestamp < now - MAX_EVENT_AGE:
            raise invalid(
                "timestamp",
                f"Timestamp {timestamp} is too far in the past: meter events must be within "
                "the past 35 days.",
                code="timestamp_too_far_in_past",
            )
        if timestamp > now + MAX_FUTURE_SKEW:
            raise invalid(
                "timestamp",
                f"Timestamp {timestamp} is too far in the future: meter events can be at most "
                "5 minutes in the future.",
                code="timestamp_in_future",
            )

    def _read_payload(
        self, meter: Meter, payload: Mapping[str, Any]
    ) -> tuple[str, int, dict[str, str]]:
        for k, v in payload.items():
            if not isinstance(v, str):
                raise invalid(f"payload[{k}]", f"Invalid payload[{k}]: values must be strings.")
        customer = payload.get(meter.customer_key)
        if not customer:
            raise missing(f"payload[{meter.customer_key}]")
        raw_value = payload.get(meter.value_key)
        if raw_value is None:
            if meter.formula != "count":
                raise missing(f"payload[{meter.value_key}]")
            value = 1
        else:
            value = parse_whole_number(raw_value, f"payload[{meter.value_key}]")
        return str(customer), value, {str(k): str(v) for k, v in payload.items()}

    def _live_duplicate(self, identifier: str, now: float) -> MeterEvent | None:
        prev = self._by_identifier.get(identifier)
        if prev is not None and now - prev.received_at < self.identifier_window:
            return prev
        return None

    def commit_meter_event(self, prepared: PreparedEvent) -> MeterEvent:
        """Store a validated v1 event; a live duplicate identifier is a 400."""
        now = self.now()
        identifier = prepared.identifier or f"evt_{uuid.uuid4().hex}"
        self.identifier_seen[identifier] += 1
        if self._live_duplicate(identifier, now) is not None:
            raise DoubleError(
                400,
                f"An event already exists with identifier {identifier}.",
                code="duplicate_meter_event",  # (unconfirmed code)
                param="identifier",
                headers={"Stripe-Should-Retry": "false"},
            )
        event = MeterEvent(
            identifier=identifier,
            event_name=prepared.meter.event_name,
            customer=prepared.customer,
            value=prepared.value,
            timestamp=prepared.timestamp,
            received_at=now,
            payload=prepared.payload,
            source="v1",
            visible_at=now + self.summary_lag,
        )
        self.events.append(event)
        self._by_identifier[identifier] = event
        return event

    # -- v2 stream -----------------------------------------------------------
    def create_session(self) -> Session:
        now = self.now()
        session = Session(
            id=f"mtrses_test_{secrets.token_hex(12)}",
            authentication_token=f"mtrses_tok_{secrets.token_urlsafe(24)}",
            created=now,
            expires_at=now + self.session_ttl,
        )
        self.sessions[session.authentication_token] = session
        return session

    def expire_sessions(self) -> None:
        """Force every session token issued so far to be expired."""
        now = self.now()
        for s in self.sessions.values():
            s.expires_at = min(s.expires_at, now - 1)

    def check_session_token(self, token: str) -> Session:
        session = self.sessions.get(token)
        if session is None:
            raise DoubleError(
                401,
                "Invalid authentication token for the meter event stream. Create a meter "
                "event session with POST /v2/billing/meter_event_session.",
                type="invalid_request_error",
                code="invalid_authentication_token",
            )
        if self.now() >= session.expires_at:
            raise DoubleError(
                401,
                "The meter event session's authentication token has expired. Create a new "
                "meter event session.",
                type="temporary_session_expired",
                code="billing_meter_event_session_expired",
            )
        return session

    def validate_stream_shape(self, body: Any) -> list[dict[str, Any]]:
        """Synchronous (schema) validation of a v2 stream body."""
        if not isinstance(body, dict):
            raise DoubleError(400, "Request body must be a JSON object.", code="invalid_body")
        events = body.get("events")
        if not isinstance(events, list) or not events:
            raise missing("events")
        if len(events) > 100:
            raise invalid(
                "events",
                f"Too many events: at most 100 events per request, got {len(events)}.",
                code="too_many_events",
            )
        for i, ev in enumerate(events):
            if not isinstance(ev, dict):
                raise invalid(f"events[{i}]", f"events[{i}] must be an object.")
            if not isinstance(ev.get("event_name"), str) or not ev["event_name"]:
                raise missing(f"events[{i}].event_name")
            payload = ev.get("payload")
            if not isinstance(payload, dict) or not payload:
                raise missing(f"events[{i}].payload")
            for k, v in payload.items():
                if not isinstance(v, str):
                    raise invalid(
                        f"events[{i}].payload.{k}", f"events[{i}].payload.{k} must be a string."
                    )
            for opt in ("identifier", "timestamp"):
                if opt in ev and not isinstance(ev[opt], str):
                    raise invalid(f"events[{i}].{opt}", f"events[{i}].{opt} must be a string.")
        return events

    def ingest_stream_events(self, events: list[dict[str, Any]]) -> None:
        """Asynchronous validation: bad events are recorded in ``errors``, duplicates ignored."""
        now = self.now()
        for ev in events:
            identifier = ev.get("identifier") or f"evt_{uuid.uuid4().hex}"
            try:
                event_name = ev["event_name"]
                if len(event_name) > _MAX_EVENT_NAME:
                    raise invalid("event_name", "event_name longer than 100 characters.")
                if len(identifier) > _MAX_IDENTIFIER:
                    raise invalid("identifier", "identifier longer than 100 characters.")
                ts_raw = ev.get("timestamp")
                try:
                    timestamp = int(now) if ts_raw is None else parse_rfc3339(ts_raw)
                except ValueError as exc:
                    raise invalid("timestamp", f"Invalid RFC 3339 timestamp {ts_raw!r}.") from exc
                self._check_timestamp(timestamp, now)
                meter = self.active_meter_for(event_name)
                if meter is None:
                    raise DoubleError(400, f'No active meter found for event name "{event_name}"')
                customer, value, clean = self._read_payload(meter, ev["payload"])
            except DoubleError as err:
                self.errors.append(
                    {
                        "source": "v2",
                        "identifier": identifier,
                        "event": ev,
                        "code": err.code,
                        "message": err.message,
                    }
                )
                continue
            self.identifier_seen[identifier] += 1
            if self._live_duplicate(identifier, now) is not None:
                continue  # ignored: counted once
            event = MeterEvent(
                identifier=identifier,
                event_name=event_name,
                customer=customer,
                value=value,
                timestamp=timestamp,
                received_at=now,
                payload=clean,
                source="v2",
                visible_at=now + self.summary_lag,
            )
            self.events.append(event)
            self._by_identifier[identifier] = event

    # -- adjustments -----------------------------------------------------------
    def cancel_event(self, params: Mapping[str, Any]) -> dict[str, Any]:
        event_name = params.get("event_name")
        if not event_name:
            raise missing("event_name")
        kind = params.get("type", "cancel")
        if kind != "cancel":
            raise invalid("type", f"Invalid type: must be one of cancel, got {kind!r}.")
        cancel = params.get("cancel")
        identifier = cancel.get("identifier") if isinstance(cancel, dict) else None
        if not identifier:
            raise missing("cancel[identifier]")
        event = self._by_identifier.get(identifier)
        if event is None or event.event_name != event_name:
            raise DoubleError(
                400,
                f'No meter event found with identifier {identifier} for event name "{event_name}".',
                code="resource_missing",
                param="cancel[identifier]",
            )
        now = self.now()
        if now - event.received_at > DAY:
            raise invalid(
                "cancel[identifier]",
                "Meter events can only be cancelled within 24 hours of being received.",
                code="meter_event_adjustment_window_expired",
            )
        if event.cancelled_at is not None:
            raise invalid(
                "cancel[identifier]",
                f"The meter event with identifier {identifier} has already been cancelled.",
            )
        event.cancelled_at = now
        adj = {
            "id": f"mtradj_test_{secrets.token_hex(12)}",
            "object": "billing.meter_event_adjustment",
            "cancel": {"identifier": identifier},
            "event_name": event_name,
            "livemode": False,
            "status": "pending",
            "type": "cancel",
        }
        self.adjustments.append(adj)
        return adj

    # -- summaries -----------------------------------------------------------
    def event_summaries(
        self,
        meter_id: str,
        customer: str | None,
        start_raw: Any,
        end_raw: Any,
        window: str | None,
    ) -> list[dict[str, Any]]:
        meter = self.meters.get(meter_id)
        if meter is None:
            raise DoubleError(
                404, f"No such billing meter: '{meter_id}'", code="resource_missing", param="id"
            )
        if not customer:
            raise missing("customer")
        if start_raw in (None, ""):
            raise missing("start_time")
        if end_raw in (None, ""):
            raise missing("end_time")
        start = parse_int(start_raw, "start_time")
        end = parse_int(end_raw, "end_time")
        if window not in (None, "", "hour", "day"):
            raise invalid(
                "value_grouping_window",
                f"Invalid value_grouping_window: must be one of hour, day, got {window!r}.",
            )
        step = {"hour": 3600, "day": DAY}.get(window or "", 0)
        align = step or 60
        unit = {3600: "hour", DAY: "day (UTC midnight)", 60: "minute"}[align]
        for name, val in (("start_time", start), ("end_time", end)):
            if val % align:
                raise invalid(
                    name, f"{name} must be aligned to the {unit}.", code="parameter_invalid"
                )
        if end <= start:
            raise invalid("end_time", "end_time must be after start_time.")
        bounds = (
            [(t, min(t + step, end)) for t in range(start, end, step)] if step else [(start, end)]
        )
        now = self.now()
        visible = [
            e
            for e in self.events
            if e.cancelled_at is None
            and e.customer == customer
            and e.event_name == meter.event_name
            and e.visible_at <= now
        ]
        if meter.event_time_window is not None:
            visible = _newest_per_window(visible, meter.event_time_window)
        out = []
        for lo, hi in bounds:
            bucket = [e for e in visible if lo <= e.timestamp < hi]
            if meter.formula == "sum":
                agg = float(sum(e.value for e in bucket))
            elif meter.formula == "count":
                agg = float(len(bucket))
            else:
                # the latest event by timestamp; ties go to the last received
                last = max(enumerate(bucket), key=lambda p: (p[1].timestamp, p[0]), default=None)
                agg = float(last[1].value) if last else 0.0
            out.append(
                {
                    "id": f"mtrusg_{meter.id}_{customer}_{lo}_{hi}",
                    "object": "billing.meter_event_summary",
                    "aggregated_value": agg,
                    "end_time": hi,
                    "livemode": False,
                    "meter": meter.id,
                    "start_time": lo,
                }
            )
        return out

    # -- legacy usage records ---------------------------------------------------
    def create_usage_record(self, item_id: str, params: Mapping[str, Any]) -> dict[str, Any]:
        item = self._item(item_id)
        for key in params:
            if key not in ("quantity", "timestamp", "action", "expand"):
                raise DoubleError(
                    400, f"Received unknown parameter: {key}", code="parameter_unknown", param=key
                )
        if params.get("quantity") in (None, ""):
            raise missing("quantity")
        quantity = parse_int(params["quantity"], "quantity")
        if quantity < 0:
            raise invalid("quantity", "quantity must be a non-negative integer.")
        ts_raw = params.get("timestamp")
        ts = int(self.now()) if ts_raw in (None, "", "now") else parse_int(ts_raw, "timestamp")
        action = params.get("action", "increment")
        if action not in ("increment", "set"):
            raise invalid(
                "action", f"Invalid action: must be one of increment, set, got {action!r}."
            )
        if not item.period_start <= ts < item.period_end + 300:
            raise invalid(
                "timestamp",
                "Cannot create the usage record with this timestamp because timestamps must "
                "be within the subscription item's current period.",
            )
        if action == "set":
            item.usage[ts] = quantity
        else:
            item.usage[ts] = item.usage.get(ts, 0) + quantity
        return {
            "id": f"mbur_test_{secrets.token_hex(12)}",
            "object": "usage_record",
            "livemode": False,
            "quantity": quantity,
            "subscription_item": item_id,
            "timestamp": ts,
        }

    def usage_record_summaries(self, item_id: str) -> list[dict[str, Any]]:
        item = self._item(item_id)
        total = sum(q for ts, q in item.usage.items() if item.period_start <= ts)
        return [
            {
                "id": f"sis_test_{item_id}_{item.period_start}",
                "object": "usage_record_summary",
                "invoice": None,
                "livemode": False,
                "period": {"start": item.period_start, "end": item.period_end},
                "subscription_item": item_id,
                "total_usage": total,
            }
        ]

    def _item(self, item_id: str) -> SubscriptionItem:
        item = self.subscription_items.get(item_id)
        if item is None:
            raise DoubleError(
                404,
                f"No such subscription item: '{item_id}'",
                code="resource_missing",
                param="subscription_item",
            )
        return item
