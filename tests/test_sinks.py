"""The Stripe usage sinks, driven against the Stripe double through the REAL stripe SDK.

Each test makes single ``send()`` calls (one attempt each, as the flusher does) and checks
both the Outcome and what the double actually stored. Fixtures ``stripe_double`` and
``stripe_double_factory`` come from ``tests.stripe_double.fixture`` (registered as a plugin
by the root conftest).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import stripe

from proxy.config import StripeConfig
from proxy.errors import ConfigError, StripeCallError
from proxy.flusher import _reason_kind
from proxy.sinks.base import Kind, Outcome, OutEvent
from proxy.sinks.dry_run import DryRunSink
from proxy.stripe.client import StripeClient, outcome_of, translate
from proxy.stripe.factory import build_sink
from proxy.stripe.meter_event_stream import MeterEventStreamSink, rfc3339
from proxy.stripe.meter_events import MeterEventsSink
from proxy.stripe.usage_records import UsageRecordsSink
from tests.stripe_double.fixture import TEST_API_KEY, RunningDouble
from tests.stripe_double.state import DAY

EVENT = "api_calls"
CUS = "cus_sinks"
METER = "api_calls_meter"
SI = "si_test_sinks"
Factory = Callable[..., Awaitable[RunningDouble]]


def now() -> int:
    return int(time.time())


def out(identifier: str, value: int = 1, *, ts: int | None = None, attempt: int = 1,
        event_name: str = EVENT, customer: str = CUS, meter: str = METER) -> OutEvent:
    return OutEvent(outbox_id=abs(hash(identifier)) % 10**9, identifier=identifier,
                    event_name=event_name, stripe_customer_id=customer, value=value,
                    timestamp=now() - 60 if ts is None else ts, meter=meter, attempt=attempt)


def connect(double: RunningDouble, timeout: float = 2.0,
            api_key: str = TEST_API_KEY) -> StripeClient:
    return StripeClient(api_key, api_base=double.url, meter_events_base=double.url,
                            timeout=timeout)


@pytest.fixture
async def double(stripe_double: RunningDouble) -> RunningDouble:
    stripe_double.state.add_meter(EVENT, id="mtr_api_calls")
    stripe_double.state.add_subscription_item(SI)
    return stripe_double


@pytest.fixture
async def meter_events(double: RunningDouble) -> AsyncIterator[MeterEventsSink]:
    sink = MeterEventsSink(connect(double))
    yield sink
    await sink.close()


@pytest.fixture
async def stream(double: RunningDouble) -> AsyncIterator[MeterEventStreamSink]:
    sink = MeterEventStreamSink(connect(double))
    yield sink
    await sink.close()


@pytest.fixture
async def usage(double: RunningDouble) -> AsyncIterator[UsageRecordsSink]:
    sink = UsageRecordsSink(connect(double), {METER: {CUS: SI}})
    yield sink
    await sink.close()


async def one(sink: MeterEventsSink | UsageRecordsSink, ev: OutEvent) -> Outcome:
    [o] = await sink.send([ev])
    return o


# ---- v1 meter events ------------------------------------------------------------------


async def test_meter_event_delivered(double: RunningDouble, meter_events: MeterEventsSink
                                     ) -> None:
    ts = now() - 120
    o = await one(meter_events, out("ev-1", 7, ts=ts))
    assert o.kind is Kind.DELIVERED
    stored = double.state.event("ev-1")
    assert stored is not None and (stored.value, stored.timestamp, stored.customer) == (7, ts, CUS)
    [call] = double.state.calls("meter_events")
    assert call.idempotency_key == "ev-1-1-0"      # {identifier}-{attempt}-{retry}
    assert call.params["payload"] == {"stripe_customer_id": CUS, "value": "7"}


async def test_negative_value_is_a_correction(double: RunningDouble,
                                              meter_events: MeterEventsSink) -> None:
    assert (await one(meter_events, out("a", 5))).kind is Kind.DELIVERED
    assert (await one(meter_events, out("b", -2))).kind is Kind.DELIVERED
    assert double.state.totals(CUS, EVENT) == 3


async def test_resend_after_commit_then_drop_is_duplicate(
        double: RunningDouble, meter_events: MeterEventsSink) -> None:
    double.state.faults.script("meter_events", ["commit_then_drop"])
    first = await one(meter_events, out("ev-drop", 4, attempt=1))
    assert first.kind is Kind.RETRY and "connection" in first.reason
    # the flusher persists attempt+1 before resending: a new Idempotency-Key, same identifier
    second = await one(meter_events, out("ev-drop", 4, attempt=2))
    assert second.kind is Kind.DUPLICATE
    assert second.status == 400
    assert double.state.totals(CUS, EVENT) == 4
    assert double.state.event_count(CUS, EVENT) == 1
    assert [c.idempotency_key for c in double.state.calls("meter_events")] == \
        ["ev-drop-1-0", "ev-drop-2-0"]


@pytest.mark.parametrize(("fault", "status", "lock"), [
    ("500", 500, False),
    ("429", 429, False),
    ("429_no_retry", 429, False),
    ("lock_timeout", 429, True),
    ("reset_before", None, False),
])
async def test_transient_faults_are_retry(double: RunningDouble, meter_events: MeterEventsSink,
                                          fault: str, status: int | None, lock: bool) -> None:
    double.state.faults.script("meter_events", [fault])
    o = await one(meter_events, out("ev-t", 2, attempt=1))
    assert o.kind is Kind.RETRY, o
    assert o.status == status
    assert o.lock_timeout is lock
    assert double.state.event_count(CUS, EVENT) == 0
    # next attempt: a new Idempotency-Key, so a stored 500 is not replayed
    again = await one(meter_events, out("ev-t", 2, attempt=2))
    assert again.kind is Kind.DELIVERED
    assert double.state.totals(CUS, EVENT) == 2


async def test_rate_limit_reason_in_outcome(double: RunningDouble,
                                            meter_events: MeterEventsSink) -> None:
    double.state.faults.script("meter_events", ["429"])
    o = await one(meter_events, out("ev-rl"))
    assert "rate limited (global-rate)" in o.reason


async def test_hang_times_out_as_retry(stripe_double_factory: Factory) -> None:
    double = await stripe_double_factory(hang_seconds=5.0)
    double.state.add_meter(EVENT)
    double.state.faults.script("meter_events", ["hang"])
    sink = MeterEventsSink(connect(double, timeout=0.2))
    try:
        t0 = time.monotonic()
        o = await one(sink, out("ev-hang"))
        assert time.monotonic() - t0 < 2.0
        assert o.kind is Kind.RETRY and "timeout" in o.reason, o
        assert (await one(sink, out("ev-hang", attempt=2))).kind is Kind.DELIVERED
    finally:
        await sink.close()


async def test_unknown_event_name_is_dead(double: RunningDouble,
                                          meter_events: MeterEventsSink) -> None:
    o = await one(meter_events, out("ev-x", event_name="no_such_event"))
    assert o.kind is Kind.DEAD and o.status == 400
    assert 'No active meter found for event name "no_such_event"' in o.reason
    assert _reason_kind(o.reason) == "unknown_event_name"


@pytest.mark.parametrize("ts_offset", [-36 * DAY, +3600])
async def test_timestamp_outside_window_is_dead(double: RunningDouble,
                                                meter_events: MeterEventsSink,
                                                ts_offset: int) -> None:
    o = await one(meter_events, out("ev-old", ts=now() + ts_offset))
    assert o.kind is Kind.DEAD, o
    assert "timestamp outside Stripe's window" in o.reason
    assert _reason_kind(o.reason) == "timestamp_window"


async def test_invalid_value_is_dead(double: RunningDouble,
                                     meter_events: MeterEventsSink) -> None:
    o = await one(meter_events, out("ev-big", 10**16))
    assert o.kind is Kind.DEAD and "significant digits" in o.reason


async def test_same_idempotency_key_other_params_is_dead(
        double: RunningDouble, meter_events: MeterEventsSink) -> None:
    assert (await one(meter_events, out("ev-k", 1))).kind is Kind.DELIVERED
    o = await one(meter_events, out("ev-k", 2))  # same identifier AND attempt: same key
    assert o.kind is Kind.DEAD and "idempotency key reused" in o.reason


async def test_bad_api_key_is_retry_not_dead(double: RunningDouble) -> None:
    sink = MeterEventsSink(connect(double, api_key="sk_live_revoked_key_1234"))
    try:
        o = await one(sink, out("ev-auth"))
        assert o.kind is Kind.RETRY and o.status == 401
        assert "API key" in o.reason
    finally:
        await sink.close()


async def test_connection_refused_is_retry() -> None:
    sink = MeterEventsSink(StripeClient(TEST_API_KEY, api_base="http://127.0.0.1:9",
                                            meter_events_base="http://127.0.0.1:9", timeout=1))
    try:
        o = await one(sink, out("ev-refused"))
        assert o.kind is Kind.RETRY and o.status is None
    finally:
        await sink.close()


# ---- translate(): headers the double does not send -----------------------------------


def _err(cls: type[stripe.StripeError], status: int, headers: dict[str, str],
         error: dict[str, Any]) -> stripe.StripeError:
    body = {"error": error}
    kw: dict[str, Any] = {"http_body": "{}", "http_status": status, "json_body": body,
                          "headers": headers}
    if issubclass(cls, stripe.InvalidRequestError):
        return cls(error.get("message"), None, **kw)
    return cls(error.get("message"), **kw)


def _outcome(exc: BaseException) -> Outcome:
    """What the sinks report for ``exc``: translate() then outcome_of()."""
    err = translate(exc)
    assert isinstance(err, StripeCallError)
    return outcome_of(err)


def test_translate_retry_after_and_should_retry() -> None:
    f = _outcome(_err(stripe.RateLimitError, 429, {"retry-after": "7"},
                       {"type": "invalid_request_error", "code": "rate_limit", "message": "x"}))
    assert f.kind is Kind.RETRY and f.retry_after == 7.0
    # Stripe-Should-Retry: true turns an otherwise permanent answer into RETRY
    f = _outcome(_err(stripe.InvalidRequestError, 400, {"Stripe-Should-Retry": "true"},
                       {"type": "invalid_request_error", "message": "busy"}))
    assert f.kind is Kind.RETRY
    # 409 (idempotent request in progress) is transient
    f = _outcome(_err(stripe.APIError, 409, {"Stripe-Should-Retry": "true"},
                       {"type": "idempotency_error", "message": "in progress"}))
    assert f.kind is Kind.RETRY and f.status == 409
    # a 5xx stays RETRY even with Stripe-Should-Retry: false (never dead-letter transients)
    f = _outcome(_err(stripe.APIError, 503, {"Stripe-Should-Retry": "false"},
                       {"type": "api_error", "message": "down"}))
    assert f.kind is Kind.RETRY
    f = _outcome(_err(stripe.PermissionError, 403, {}, {"type": "invalid_request_error",
                                                          "message": "restricted key"}))
    assert f.kind is Kind.RETRY and f.status == 403
    assert _outcome(TimeoutError()).kind is Kind.RETRY


# ---- v2 meter event stream -----------------------------------------------------------


async def test_stream_delivers_a_batch_of_100(double: RunningDouble,
                                              stream: MeterEventStreamSink) -> None:
    ts = now() - 300
    evs = [out(f"s-{i}", i + 1, ts=ts) for i in range(100)]
    outcomes = await stream.send(evs)
    assert [o.kind for o in outcomes] == [Kind.DELIVERED] * 100
    [call] = double.state.calls("meter_event_stream")
    assert len(call.params["events"]) == 100
    assert call.params["events"][0]["timestamp"] == rfc3339(ts)
    assert double.state.event_count(CUS, EVENT) == 100
    assert double.state.totals(CUS, EVENT) == sum(range(1, 101))
    assert double.state.event("s-0") is not None
    assert double.state.event("s-0").timestamp == ts  # type: ignore[union-attr]


async def test_stream_splits_more_than_100(double: RunningDouble,
                                           stream: MeterEventStreamSink) -> None:
    outcomes = await stream.send([out(f"m-{i}") for i in range(250)])
    assert len(outcomes) == 250 and all(o.kind is Kind.DELIVERED for o in outcomes)
    sizes = [len(c.params["events"]) for c in double.state.calls("meter_event_stream")]
    assert sizes == [100, 100, 50]
    assert len(double.state.calls("meter_event_session")) == 1  # session reused


async def test_stream_session_expiry_mid_stream(double: RunningDouble,
                                                stream: MeterEventStreamSink) -> None:
    assert all(o.kind is Kind.DELIVERED for o in await stream.send([out("x-1"), out("x-2")]))
    double.state.expire_sessions()
    outcomes = await stream.send([out("x-3"), out("x-4")])
    assert [o.kind for o in outcomes] == [Kind.DELIVERED, Kind.DELIVERED]
    assert stream.sessions_created == 2
    statuses = [c.status for c in double.state.calls("meter_event_stream")]
    assert statuses == [200, 401, 200]
    for ident in ("x-1", "x-2", "x-3", "x-4"):
        assert double.state.identifier_count(ident) == 1
    assert double.state.event_count(CUS, EVENT) == 4


async def test_stream_renews_before_expiry(stripe_double_factory: Factory) -> None:
    double = await stripe_double_factory(session_ttl=30.0)  # inside the 60 s renew margin
    double.state.add_meter(EVENT)
    sink = MeterEventStreamSink(connect(double))
    try:
        for i in range(3):
            assert (await sink.send([out(f"r-{i}")]))[0].kind is Kind.DELIVERED
        assert len(double.state.calls("meter_event_session")) == 3
        assert {c.status for c in double.state.calls("meter_event_stream")} == {200}
    finally:
        await sink.close()


async def test_stream_expired_twice_is_retry(double: RunningDouble,
                                             stream: MeterEventStreamSink) -> None:
    double.state.session_ttl = -1.0  # every new session is born expired
    outcomes = await stream.send([out("e-1"), out("e-2")])
    assert all(o.kind is Kind.RETRY and "session expired" in o.reason for o in outcomes)
    assert len(double.state.calls("meter_event_stream")) == 2  # resent once, not more


async def test_stream_faults(double: RunningDouble, stream: MeterEventStreamSink) -> None:
    double.state.faults.script("meter_event_stream", ["500", "commit_then_drop", "lock_timeout"])
    batch = [out("f-1", 2), out("f-2", 3)]
    first = await stream.send(batch)
    assert all(o.kind is Kind.RETRY and o.status == 500 for o in first)
    second = await stream.send(batch)
    assert all(o.kind is Kind.RETRY and o.status is None for o in second)
    third = await stream.send(batch)
    assert all(o.kind is Kind.RETRY and o.lock_timeout for o in third)
    fourth = await stream.send(batch)
    assert all(o.kind is Kind.DELIVERED for o in fourth)
    # the committed-then-dropped batch and its resend are counted once (identifier dedupe)
    assert double.state.totals(CUS, EVENT) == 5
    assert double.state.event_count(CUS, EVENT) == 2


async def test_stream_session_create_failure_is_retry(double: RunningDouble,
                                                      stream: MeterEventStreamSink) -> None:
    double.state.faults.script("meter_event_session", ["500"])
    outcomes = await stream.send([out("c-1")])
    assert outcomes[0].kind is Kind.RETRY and "creating a meter event session" in outcomes[0].reason
    assert double.state.calls("meter_event_stream") == []
    assert (await stream.send([out("c-1")]))[0].kind is Kind.DELIVERED


async def test_stream_validation_is_asynchronous(double: RunningDouble,
                                                 stream: MeterEventStreamSink) -> None:
    outcomes = await stream.send([out("bad-1", event_name="no_such_event")])
    assert outcomes[0].kind is Kind.DELIVERED  # Stripe reports it later, not in the answer
    assert [e["identifier"] for e in double.state.errors] == ["bad-1"]


# ---- legacy usage records ------------------------------------------------------------


async def test_usage_records_pinned_version_and_increments(double: RunningDouble,
                                                           usage: UsageRecordsSink) -> None:
    ts = now() - 60
    assert (await one(usage, out("u-1", 3, ts=ts))).kind is Kind.DELIVERED
    assert (await one(usage, out("u-2", 4, ts=ts))).kind is Kind.DELIVERED
    assert double.state.stripe_versions("usage_records") == {"2024-06-20"}
    calls = double.state.calls("usage_records")
    assert [c.idempotency_key for c in calls] == ["u-1", "u-2"]
    assert calls[0].params == {"quantity": "3", "timestamp": str(ts), "action": "increment"}
    assert double.state.subscription_items[SI].usage == {ts: 7}


async def test_usage_records_resend_not_double_counted(double: RunningDouble,
                                                       usage: UsageRecordsSink) -> None:
    ts = now() - 60
    double.state.faults.script("usage_records", ["commit_then_drop"])
    first = await one(usage, out("u-d", 5, ts=ts, attempt=1))
    assert first.kind is Kind.RETRY
    second = await one(usage, out("u-d", 5, ts=ts, attempt=2))
    assert second.kind is Kind.DELIVERED
    assert double.state.calls("usage_records")[-1].replayed
    assert double.state.subscription_items[SI].usage == {ts: 5}


async def test_usage_records_stored_500_is_replayed_for_24h(double: RunningDouble,
                                                            usage: UsageRecordsSink) -> None:
    ts = now() - 60
    double.state.faults.script("usage_records", ["500"])
    assert (await one(usage, out("u-5", 2, ts=ts))).kind is Kind.RETRY
    replay = await one(usage, out("u-5", 2, ts=ts, attempt=2))
    assert replay.kind is Kind.RETRY and replay.status == 500   # the constant key's price
    double.state.advance(DAY + 1)
    double.state.subscription_items[SI].period_end += 2 * DAY
    assert (await one(usage, out("u-5", 2, ts=ts, attempt=3))).kind is Kind.DELIVERED
    assert double.state.subscription_items[SI].usage == {ts: 2}


async def test_usage_records_missing_mapping_is_dead(double: RunningDouble,
                                                     usage: UsageRecordsSink) -> None:
    o = await one(usage, out("u-m", customer="cus_unmapped"))
    assert o.kind is Kind.DEAD
    assert o.reason == f"no subscription item for meter {METER!r} and customer 'cus_unmapped'"
    assert _reason_kind(o.reason) == "customer_mapping"
    o = await one(usage, out("u-m2", meter="other_meter"))
    assert o.kind is Kind.DEAD
    assert double.state.calls("usage_records") == []


async def test_usage_records_errors(double: RunningDouble) -> None:
    sink = UsageRecordsSink(connect(double), {METER: {CUS: "si_missing"}})
    try:
        o = await one(sink, out("u-404"))
        assert o.kind is Kind.DEAD and o.status == 404 and "si_missing" in o.reason
        assert (await one(sink, out("u-neg", -1))).kind is Kind.DEAD
    finally:
        await sink.close()
    # the current API version has no usage records: the pin is what makes the call work
    sink = UsageRecordsSink(connect(double), {METER: {CUS: SI}},
                            stripe_version="2026-10-28.endive")
    try:
        o = await one(sink, out("u-new"))
        assert o.kind is Kind.DEAD and "removed in API version" in o.reason
    finally:
        await sink.close()


# ---- factory -------------------------------------------------------------------------


async def test_factory(double: RunningDouble) -> None:
    with pytest.raises(ConfigError, match=r"stripe\.api_key is empty but stripe\.sink is meter_events"):
        build_sink(StripeConfig(api_key="", sink="meter_events"))
    assert isinstance(build_sink(StripeConfig(api_key=TEST_API_KEY, sink="dry_run")), DryRunSink)
    base = {"api_key": TEST_API_KEY, "api_base": double.url, "meter_events_base": double.url}
    for kind, cls in (("meter_events", MeterEventsSink),
                      ("meter_event_stream", MeterEventStreamSink),
                      ("usage_records", UsageRecordsSink)):
        cfg = StripeConfig.model_validate({**base, "sink": kind,
                                           "subscription_items": {METER: {CUS: SI}}})
        sink = build_sink(cfg)
        try:
            assert isinstance(sink, cls) and sink.name == kind
            [o] = await sink.send([out(f"fac-{kind}")])
            assert o.kind is Kind.DELIVERED, o
        finally:
            await sink.close()
            await sink.close()  # idempotent
    assert double.state.stripe_versions("usage_records") == {"2024-06-20"}
    assert double.state.event_count(CUS, EVENT) == 2
