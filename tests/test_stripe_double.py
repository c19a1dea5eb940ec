"""The Stripe double, driven through the real stripe-python SDK (async, aiohttp)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import pytest
import stripe

from tests.stripe_double.app import parse_nested
from tests.stripe_double.faults import Faults
from tests.stripe_double.fixture import RunningDouble, run_stripe_double
from tests.stripe_double.state import DAY, StripeDoubleState

PINNED = "2026-10-28.endive"
EVENT = "api_requests"
CUS = "cus_123"


@pytest.fixture
async def double() -> AsyncIterator[RunningDouble]:
    async with run_stripe_double() as d:
        d.state.add_meter(EVENT, id="mtr_sum")
        yield d


@pytest.fixture
def client(double: RunningDouble) -> stripe.StripeClient:
    return double.client(timeout=2.0)


def ev(value: str = "1", customer: str = CUS, **extra: Any) -> Any:
    """Meter event params (typed Any: the SDK's TypedDicts are stricter than the wire)."""
    return {
        "event_name": EVENT,
        "payload": {"stripe_customer_id": customer, "value": value},
        **extra,
    }


def headers_of(obj: stripe.StripeObject | stripe.StripeError) -> Mapping[str, str]:
    """Response headers of an SDK result or error (case-insensitive)."""
    headers: Mapping[str, str] | None
    if isinstance(obj, stripe.StripeError):
        headers = obj.headers
    else:
        assert obj.last_response is not None
        headers = obj.last_response.headers
    assert headers is not None
    return headers


def now() -> int:
    return int(time.time())


def test_parse_nested_form_keys() -> None:
    assert parse_nested(
        [("event_name", "x"), ("payload[stripe_customer_id]", "c"), ("payload[value]", "3")]
    ) == {"event_name": "x", "payload": {"stripe_customer_id": "c", "value": "3"}}
    assert parse_nested([("a[0][b]", "1"), ("a[1][b]", "2"), ("e[]", "x"), ("e[]", "y")]) == {
        "a": [{"b": "1"}, {"b": "2"}],
        "e": ["x", "y"],
    }


# -- v1 meter events ------------------------------------------------------------


async def test_create_meter_event(double: RunningDouble, client: stripe.StripeClient) -> None:
    ts = now() - 60
    res = await client.v1.billing.meter_events.create_async(
        ev("5", identifier="id-1", timestamp=ts)
    )
    assert res.object == "billing.meter_event"
    assert (res.event_name, res.identifier, res.timestamp, res.livemode) == (
        EVENT,
        "id-1",
        ts,
        False,
    )
    assert res.payload.to_dict() == {"stripe_customer_id": CUS, "value": "5"}
    assert "id" not in res
    assert headers_of(res)["request-id"].startswith("req_")
    assert double.state.totals(CUS, EVENT) == 5
    assert double.state.identifier_count("id-1") == 1
    (call,) = double.state.calls("meter_events")
    assert call.stripe_version == PINNED
    assert call.idempotency_key  # the SDK always sends one on POST
    assert call.params["payload"] == {"stripe_customer_id": CUS, "value": "5"}


async def test_missing_identifier_is_generated(
    double: RunningDouble, client: stripe.StripeClient
) -> None:
    res = await client.v1.billing.meter_events.create_async(ev("-2"))
    assert res.identifier
    assert double.state.event(res.identifier) is not None
    assert double.state.totals(CUS, EVENT) == -2


async def test_duplicate_identifier(double: RunningDouble, client: stripe.StripeClient) -> None:
    await client.v1.billing.meter_events.create_async(ev("3", identifier="dup"))
    with pytest.raises(stripe.InvalidRequestError) as exc:
        await client.v1.billing.meter_events.create_async(ev("3", identifier="dup"))
    err = exc.value
    assert err.http_status == 400
    assert err.user_message == "An event already exists with identifier dup."
    assert err.error is not None and err.error.type == "invalid_request_error"
    assert headers_of(err)["stripe-should-retry"] == "false"
    assert headers_of(err)["request-id"].startswith("req_")
    assert double.state.totals(CUS, EVENT) == 3
    assert double.state.identifier_count("dup") == 2
    # the identifier window is 24 h: afterwards the identifier is free again
    double.state.advance(DAY + 1)
    await client.v1.billing.meter_events.create_async(ev("3", identifier="dup"))
    assert double.state.totals(CUS, EVENT) == 6


async def test_idempotency_replay_and_mismatch(
    double: RunningDouble, client: stripe.StripeClient
) -> None:
    opts: Any = {"idempotency_key": "ik-1"}
    first = await client.v1.billing.meter_events.create_async(ev("4", identifier="i1"), opts)
    second = await client.v1.billing.meter_events.create_async(ev("4", identifier="i1"), opts)
    assert second.to_dict() == first.to_dict()
    assert headers_of(second)["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in headers_of(first)
    assert double.state.totals(CUS, EVENT) == 4
    assert double.state.identifier_count("i1") == 1  # the replay never reached processing
    with pytest.raises(stripe.IdempotencyError) as exc:
        await client.v1.billing.meter_events.create_async(ev("5", identifier="i1"), opts)
    assert exc.value.http_status == 400
    assert "ik-1" in (exc.value.user_message or "")
    # keys are scoped per key: the same body with a new key is a new request
    with pytest.raises(stripe.InvalidRequestError):
        await client.v1.billing.meter_events.create_async(
            ev("4", identifier="i1"), {"idempotency_key": "ik-2"}
        )


async def test_idempotency_replays_first_500(
    double: RunningDouble, client: stripe.StripeClient
) -> None:
    double.state.faults.script("meter_events", ["500"])
    opts: Any = {"idempotency_key": "ik-500"}
    with pytest.raises(stripe.APIError) as first:
        await client.v1.billing.meter_events.create_async(ev("1", identifier="e500"), opts)
    assert first.value.http_status == 500
    with pytest.raises(stripe.APIError) as again:
        await client.v1.billing.meter_events.create_async(ev("1", identifier="e500"), opts)
    assert headers_of(again.value)["Idempotent-Replayed"] == "true"
    assert double.state.totals(CUS, EVENT) == 0
    res = await client.v1.billing.meter_events.create_async(
        ev("1", identifier="e500"), {"idempotency_key": "ik-fresh"}
    )
    assert res.identifier == "e500"
    assert double.state.totals(CUS, EVENT) == 1
    # 24 h later the stored 500 is forgotten (the identifier window may be longer)
    double.state.identifier_window = 2 * DAY
    double.state.advance(DAY + 1)
    with pytest.raises(stripe.InvalidRequestError, match="already exists"):
        await client.v1.billing.meter_events.create_async(ev("1", identifier="e500"), opts)


async def test_idempotency_key_in_flight_is_409(
    double: RunningDouble, client: stripe.StripeClient
) -> None:
    gate = double.state.processing_gate = asyncio.Event()
    opts: Any = {"idempotency_key": "ik-busy"}
    async with asyncio.TaskGroup() as tg:
        first = tg.create_task(client.v1.billing.meter_events.create_async(ev("1"), opts))
        await double.state.wait_for(lambda: bool(double.state.in_flight))
        with pytest.raises(stripe.APIError) as exc:
            await client.v1.billing.meter_events.create_async(ev("1"), opts)
        gate.set()
    assert exc.value.http_status == 409
    assert exc.value.error is not None and exc.value.error.type == "idempotency_error"
    assert first.result().object == "billing.meter_event"
    assert double.state.totals(CUS, EVENT) == 1


@pytest.mark.parametrize(
    ("params", "param", "message"),
    [
        (ev("1.5"), "payload[value]", "whole number"),
        (ev("2.0"), "payload[value]", "whole number"),
        (ev("abc"), "payload[value]", "whole number"),
        (ev("1234567890123456"), "payload[value]", "more than 15 significant digits"),
        (ev("-1234567890123456"), "payload[value]", "more than 15 significant digits"),
        # timestamps are offsets from when the test runs (resolved in the test), not from collection:
        # a suite that takes more than five minutes must not turn +600 s into a valid one
        (ev("1", timestamp=-36 * DAY), "timestamp", "past 35 days"),
        (ev("1", timestamp=600), "timestamp", "5 minutes in the future"),
        (
            {**ev("1"), "event_name": "nope"},
            "event_name",
            'No active meter found for event name "nope"',
        ),
        ({**ev("1"), "event_name": "x" * 101}, "event_name", "at most 100"),
        (
            {"event_name": EVENT, "payload": {"value": "1"}},
            "payload[stripe_customer_id]",
            "Missing",
        ),
        (
            {"event_name": EVENT, "payload": {"stripe_customer_id": CUS}},
            "payload[value]",
            "Missing",
        ),
        ({**ev("1"), "bogus": "1"}, "bogus", "unknown parameter"),
    ],
)
async def test_meter_event_validation(
    double: RunningDouble,
    client: stripe.StripeClient,
    params: dict[str, Any],
    param: str,
    message: str,
) -> None:
    if "timestamp" in params:       # an offset from now, resolved at run time
        params = {**params, "timestamp": now() + int(params["timestamp"])}
    with pytest.raises(stripe.InvalidRequestError) as exc:
        await client.v1.billing.meter_events.create_async(params)  # type: ignore[arg-type]
    assert exc.value.http_status == 400
    assert exc.value.param == param
    assert message in (exc.value.user_message or "")
    assert double.state.events == []


async def test_value_limits_accepted(double: RunningDouble, client: stripe.StripeClient) -> None:
    await client.v1.billing.meter_events.create_async(ev("-123456789012345"))
    await client.v1.billing.meter_events.create_async(ev("000123456789012345"))
    await client.v1.billing.meter_events.create_async(ev("0", timestamp=now() - 35 * DAY + 60))
    await client.v1.billing.meter_events.create_async(ev("0", timestamp=now() + 240))
    assert double.state.totals(CUS, EVENT) == 0
    assert double.state.event_count(CUS, EVENT) == 4


async def test_inactive_meter_rejects(double: RunningDouble, client: stripe.StripeClient) -> None:
    double.state.add_meter("old_event", status="inactive")
    with pytest.raises(
        stripe.InvalidRequestError, match='No active meter found for event name "old'
    ):
        params: Any = {**ev("1"), "event_name": "old_event"}
        await client.v1.billing.meter_events.create_async(params)


async def test_auth_and_version_and_request_id(double: RunningDouble) -> None:
    bad = double.client(api_key="sk_live_nope")
    with pytest.raises(stripe.AuthenticationError) as exc:
        await bad.v1.billing.meter_events.create_async(ev("1"))
    assert exc.value.http_status == 401
    assert exc.value.json_body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    async with aiohttp.ClientSession() as http:
        url = f"{double.url}/v1/billing/meter_events"
        auth = {"Authorization": "Bearer sk_test_x"}
        async with http.post(url, data={"event_name": EVENT}, headers=auth) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == "stripe_version_missing"
            assert resp.headers["request-id"].startswith("req_")
        async with http.post(url, data={"event_name": EVENT}) as resp:
            assert resp.status == 401
            body = await resp.json()
            assert set(body["error"]) == {"type", "code", "message", "param", "doc_url"}
        async with http.get(f"{double.url}/v1/nothing_here", headers=auth) as resp:
            assert resp.status == 404
            assert "Unrecognized request URL" in (await resp.json())["error"]["message"]
            assert resp.headers["request-id"].startswith("req_")
    assert double.state.stripe_versions("meter_events") == {None, PINNED}


# -- v2 meter event stream ---------------------------------------------------------


def rfc(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


async def test_v2_session_and_stream(double: RunningDouble, client: stripe.StripeClient) -> None:
    session = await client.v2.billing.meter_event_session.create_async()
    assert session.object == "v2.billing.meter_event_session"
    assert session.id and session.authentication_token and session.livemode is False
    assert session.created < session.expires_at  # RFC 3339 strings
    token: Any = {"api_key": session.authentication_token}
    good: list[Any] = [
        {**ev("2"), "identifier": f"s{i}", "timestamp": rfc(now() - 10)} for i in range(3)
    ]
    bad: list[Any] = [
        {**ev("1.5"), "identifier": "bad-fraction"},
        {**ev("1"), "event_name": "unknown", "identifier": "bad-name"},
        {**ev("1"), "identifier": "bad-old", "timestamp": rfc(now() - 40 * DAY)},
    ]
    dup: list[Any] = [{**ev("2"), "identifier": "s0"}]
    # answers {} (the SDK parses it; an empty body would raise)
    await client.v2.billing.meter_event_stream.create_async({"events": good + bad + dup}, token)
    (call,) = double.state.calls("meter_event_stream")
    assert call.stripe_version == PINNED
    assert double.state.totals(CUS, EVENT) == 6  # 3 good events, the duplicate ignored
    assert double.state.identifier_count("s0") == 2
    assert {e["identifier"] for e in double.state.errors} == {"bad-fraction", "bad-name", "bad-old"}
    # v1 and v2 share the identifier space
    with pytest.raises(stripe.InvalidRequestError, match="already exists with identifier s1"):
        await client.v1.billing.meter_events.create_async(ev("2", identifier="s1"))


async def test_v2_stream_session_expiry(double: RunningDouble, client: stripe.StripeClient) -> None:
    double.state.session_ttl = 60
    session = await client.v2.billing.meter_event_session.create_async()
    token: Any = {"api_key": session.authentication_token}
    await client.v2.billing.meter_event_stream.create_async({"events": [ev("1")]}, token)
    double.state.advance(61)
    with pytest.raises(stripe.TemporarySessionExpiredError) as exc:
        await client.v2.billing.meter_event_stream.create_async({"events": [ev("1")]}, token)
    assert exc.value.http_status == 401
    assert exc.value.code == "billing_meter_event_session_expired"
    fresh = await client.v2.billing.meter_event_session.create_async()
    await client.v2.billing.meter_event_stream.create_async(
        {"events": [ev("1")]}, {"api_key": fresh.authentication_token}
    )
    double.state.expire_sessions()
    with pytest.raises(stripe.TemporarySessionExpiredError):
        await client.v2.billing.meter_event_stream.create_async(
            {"events": [ev("1")]}, {"api_key": fresh.authentication_token}
        )
    assert double.state.totals(CUS, EVENT) == 2


async def test_v2_stream_limits_and_auth(
    double: RunningDouble, client: stripe.StripeClient
) -> None:
    session = await client.v2.billing.meter_event_session.create_async()
    token: Any = {"api_key": session.authentication_token}
    with pytest.raises(stripe.InvalidRequestError) as exc:
        await client.v2.billing.meter_event_stream.create_async({"events": [ev("1")] * 101}, token)
    assert exc.value.http_status == 400
    await client.v2.billing.meter_event_stream.create_async({"events": [ev("1")] * 100}, token)
    assert double.state.event_count(CUS, EVENT) == 100
    with pytest.raises(stripe.AuthenticationError):  # the API key is not a session token
        await client.v2.billing.meter_event_stream.create_async({"events": [ev("1")]})


# -- meters and summaries ---------------------------------------------------------


async def test_meters_list_pagination(double: RunningDouble, client: stripe.StripeClient) -> None:
    for i in range(4):
        double.state.add_meter(f"ev_{i}", "count", id=f"mtr_{i}")
    page = await client.v1.billing.meters.list_async({"limit": 2})
    assert [m.id for m in page.data] == ["mtr_sum", "mtr_0"]
    assert page.has_more is True
    m = page.data[0]
    assert m.default_aggregation.formula == "sum"
    assert m.customer_mapping.event_payload_key == "stripe_customer_id"
    assert m.value_settings.event_payload_key == "value"
    assert m.status == "active"
    ids = [m.id async for m in page.auto_paging_iter()]
    assert ids == ["mtr_sum", "mtr_0", "mtr_1", "mtr_2", "mtr_3"]
    with pytest.raises(stripe.InvalidRequestError, match="limit"):
        await client.v1.billing.meters.list_async({"limit": 101})


async def seed_events(client: stripe.StripeClient, base: int) -> None:
    for offset, value in [(5, "1"), (65, "2"), (3600 + 5, "10"), (7200 + 30, "100")]:
        await client.v1.billing.meter_events.create_async(
            ev(value, timestamp=base + offset, identifier=f"e{offset}")
        )


def day_start() -> int:
    t = now() - DAY
    return t - t % DAY


async def test_event_summaries(double: RunningDouble, client: stripe.StripeClient) -> None:
    base = day_start()
    await seed_events(client, base)
    summaries = client.v1.billing.meters.event_summaries
    whole = await summaries.list_async(
        "mtr_sum", {"customer": CUS, "start_time": base, "end_time": base + DAY}
    )
    (item,) = whole.data
    assert item.object == "billing.meter_event_summary"
    assert item.aggregated_value == 113.0 and isinstance(item.aggregated_value, float)
    assert (item.start_time, item.end_time, item.meter) == (base, base + DAY, "mtr_sum")
    # start inclusive, end exclusive
    part = await summaries.list_async(
        "mtr_sum", {"customer": CUS, "start_time": base + 60, "end_time": base + 3600 + 60}
    )
    assert part.data[0].aggregated_value == 12.0
    other = await summaries.list_async(
        "mtr_sum", {"customer": "cus_other", "start_time": base, "end_time": base + DAY}
    )
    assert other.data[0].aggregated_value == 0.0
    hourly = await summaries.list_async(
        "mtr_sum",
        {
            "customer": CUS,
            "start_time": base,
            "end_time": base + 3 * 3600,
            "value_grouping_window": "hour",
            "limit": 2,
        },
    )
    assert [s.aggregated_value for s in hourly.data] == [3.0, 10.0]
    assert hourly.has_more is True
    rest = [s.aggregated_value async for s in hourly.auto_paging_iter()]
    assert rest == [3.0, 10.0, 100.0]
    daily = await summaries.list_async(
        "mtr_sum",
        {
            "customer": CUS,
            "start_time": base,
            "end_time": base + DAY,
            "value_grouping_window": "day",
        },
    )
    assert [s.aggregated_value for s in daily.data] == [113.0]


@pytest.mark.parametrize(
    ("start_off", "end_off", "window", "param"),
    [
        (1, 3600, None, "start_time"),
        (0, 3601, None, "end_time"),
        (60, 3600, "hour", "start_time"),
        (0, 3660, "hour", "end_time"),
        (3600, DAY, "day", "start_time"),
        (0, 3600, None, None),  # aligned: fine
        (0, 7200, "hour", None),
    ],
)
async def test_event_summaries_alignment(
    double: RunningDouble,
    client: stripe.StripeClient,
    start_off: int,
    end_off: int,
    window: str | None,
    param: str | None,
) -> None:
    base = day_start()
    params: Any = {"customer": CUS, "start_time": base + start_off, "end_time": base + end_off}
    if window:
        params["value_grouping_window"] = window
    call = client.v1.billing.meters.event_summaries.list_async("mtr_sum", params)
    if param is None:
        await call
        return
    with pytest.raises(stripe.InvalidRequestError) as exc:
        await call
    assert exc.value.http_status == 400
    assert exc.value.param == param
    assert "aligned" in (exc.value.user_message or "")


async def test_summary_formulas_and_lag(double: RunningDouble, client: stripe.StripeClient) -> None:
    double.state.add_meter("calls", "count", id="mtr_count")
    double.state.add_meter("seats", "last", id="mtr_last")
    base = day_start()
    for ts, seats in [(base + 100, "5"), (base + 50, "9"), (base + 200, "7")]:
        await client.v1.billing.meter_events.create_async(
            {"event_name": "calls", "payload": {"stripe_customer_id": CUS}, "timestamp": ts}
        )
        await client.v1.billing.meter_events.create_async(
            {
                "event_name": "seats",
                "payload": {"stripe_customer_id": CUS, "value": seats},
                "timestamp": ts,
            }
        )
    q: Any = {"customer": CUS, "start_time": base, "end_time": base + 3600}
    summaries = client.v1.billing.meters.event_summaries
    assert (await summaries.list_async("mtr_count", q)).data[0].aggregated_value == 3.0
    assert (await summaries.list_async("mtr_last", q)).data[0].aggregated_value == 7.0
    with pytest.raises(stripe.InvalidRequestError) as exc:
        await summaries.list_async("mtr_missing", q)
    assert exc.value.http_status == 404
    double.state.summary_lag = 30
    await client.v1.billing.meter_events.create_async(
        {"event_name": "calls", "payload": {"stripe_customer_id": CUS}, "timestamp": base + 5}
    )
    assert (await summaries.list_async("mtr_count", q)).data[0].aggregated_value == 3.0
    assert double.state.event_count(CUS, "calls") == 4  # stored, just not summarized yet
    double.state.advance(31)
    assert (await summaries.list_async("mtr_count", q)).data[0].aggregated_value == 4.0


async def test_adjustment_cancel(double: RunningDouble, client: stripe.StripeClient) -> None:
    base = day_start()
    await seed_events(client, base)
    adj = await client.v1.billing.meter_event_adjustments.create_async(
        {"event_name": EVENT, "type": "cancel", "cancel": {"identifier": "e65"}}
    )
    assert adj.object == "billing.meter_event_adjustment"
    assert adj.cancel is not None and adj.cancel.identifier == "e65"
    (call,) = double.state.calls("meter_event_adjustments")
    assert call.params["cancel"] == {"identifier": "e65"}
    assert double.state.totals(CUS, EVENT) == 111
    summary = await client.v1.billing.meters.event_summaries.list_async(
        "mtr_sum", {"customer": CUS, "start_time": base, "end_time": base + DAY}
    )
    assert summary.data[0].aggregated_value == 111.0
    with pytest.raises(stripe.InvalidRequestError, match="already been cancelled"):
        await client.v1.billing.meter_event_adjustments.create_async(
            {"event_name": EVENT, "type": "cancel", "cancel": {"identifier": "e65"}}
        )
    with pytest.raises(stripe.InvalidRequestError, match="No meter event found"):
        await client.v1.billing.meter_event_adjustments.create_async(
            {"event_name": EVENT, "type": "cancel", "cancel": {"identifier": "nope"}}
        )
    double.state.advance(DAY + 1)
    with pytest.raises(stripe.InvalidRequestError, match="within 24 hours"):
        await client.v1.billing.meter_event_adjustments.create_async(
            {"event_name": EVENT, "type": "cancel", "cancel": {"identifier": "e5"}}
        )
    assert double.state.totals(CUS, EVENT) == 111


# -- legacy usage records --------------------------------------------------------


async def test_usage_records_need_old_version(
    double: RunningDouble, client: stripe.StripeClient
) -> None:
    double.state.add_subscription_item("si_1")
    url = "/v1/subscription_items/si_1/usage_records"
    with pytest.raises(stripe.InvalidRequestError) as exc:
        await client.raw_request_async("post", url, quantity=3, timestamp=now())
    assert exc.value.http_status == 404
    assert "2025-03-31.basil" in (exc.value.user_message or "")
    # raw_request takes request options as plain keyword arguments
    old = "2024-06-20"
    ts = now()
    resp = await client.raw_request_async(
        "post", url, quantity=3, timestamp=ts, action="increment", stripe_version=old
    )
    record: Any = client.deserialize(resp, api_mode="V1")
    assert (record.object, record.quantity, record.subscription_item) == ("usage_record", 3, "si_1")
    await client.raw_request_async(
        "post", url, quantity=4, timestamp=ts, action="increment", stripe_version=old
    )
    await client.raw_request_async(
        "post", url, quantity=1, timestamp=ts - 10, action="increment", stripe_version=old
    )
    await client.raw_request_async(
        "post", url, quantity=2, timestamp=ts - 10, action="set", stripe_version=old
    )
    summaries: Any = client.deserialize(
        await client.raw_request_async(
            "get", "/v1/subscription_items/si_1/usage_record_summaries", stripe_version=old
        ),
        api_mode="V1",
    )
    assert summaries.data[0].total_usage == 9
    assert {c.stripe_version for c in double.state.calls("usage_records")} == {PINNED, old}
    with pytest.raises(stripe.InvalidRequestError, match="unknown parameter: options"):
        await client.raw_request_async(  # the wrong way to pass options
            "post", url, quantity=1, options={"stripe_version": old}, stripe_version=old
        )
    with pytest.raises(stripe.InvalidRequestError, match="No such subscription item"):
        await client.raw_request_async(
            "post", "/v1/subscription_items/si_x/usage_records", quantity=1, stripe_version=old
        )


# -- faults -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "exc_type", "status", "stored"),
    [
        ("500", stripe.APIError, 500, False),
        ("429", stripe.RateLimitError, 429, False),
        ("429_no_retry", stripe.RateLimitError, 429, False),
        ("lock_timeout", stripe.RateLimitError, 429, False),
        ("hang", stripe.APIConnectionError, None, False),
        ("reset_before", stripe.APIConnectionError, None, False),
        ("commit_then_drop", stripe.APIConnectionError, None, True),
    ],
)
async def test_fault_kinds_as_seen_by_sdk(
    fault: str, exc_type: type[stripe.StripeError], status: int | None, stored: bool
) -> None:
    async with run_stripe_double(hang_seconds=5.0) as double:
        double.state.add_meter(EVENT)
        client = double.client(timeout=0.2)
        double.state.faults.script("meter_events", [fault])
        started = time.monotonic()
        with pytest.raises(exc_type) as exc:
            await client.v1.billing.meter_events.create_async(ev("7", identifier="f1"))
        assert time.monotonic() - started < 1.0
        err = exc.value
        assert err.http_status == status
        if fault == "429":
            assert headers_of(err)["Stripe-Should-Retry"] == "true"
            assert "Stripe-Rate-Limited-Reason" in headers_of(err)
        if fault == "429_no_retry":
            assert "Stripe-Should-Retry" not in headers_of(err)
        if fault == "lock_timeout":
            assert err.error is not None and err.error.code == "lock_timeout"
        if status is None:
            assert isinstance(err, stripe.APIConnectionError) and err.should_retry
        assert double.state.totals(CUS, EVENT) == (7 if stored else 0)
        (call,) = double.state.calls("meter_events")
        assert call.fault == fault
        assert double.state.faults.injected == [("meter_events", fault)]
        # the next call is clean
        if stored:
            with pytest.raises(stripe.InvalidRequestError, match="already exists"):
                await client.v1.billing.meter_events.create_async(ev("7", identifier="f1"))
        else:
            await client.v1.billing.meter_events.create_async(ev("7", identifier="f1"))
        assert double.state.totals(CUS, EVENT) == 7


async def test_commit_then_drop_then_same_key_replays(
    double: RunningDouble, client: stripe.StripeClient
) -> None:
    double.state.faults.script("meter_events", ["commit_then_drop"])
    opts: Any = {"idempotency_key": "ik-drop"}
    with pytest.raises(stripe.APIConnectionError):
        await client.v1.billing.meter_events.create_async(ev("2", identifier="d1"), opts)
    res = await client.v1.billing.meter_events.create_async(ev("2", identifier="d1"), opts)
    assert res.identifier == "d1"
    assert headers_of(res)["Idempotent-Replayed"] == "true"
    assert double.state.totals(CUS, EVENT) == 2


async def test_sdk_retries_follow_should_retry(double: RunningDouble) -> None:
    client = double.client(max_network_retries=1)
    double.state.faults.script("meter_events", ["429", "ok", "429_no_retry"])
    await client.v1.billing.meter_events.create_async(ev("1"))  # retried after the 429
    keys = [c.idempotency_key for c in double.state.calls("meter_events")]
    assert len(keys) == 2 and keys[0] == keys[1]  # SDK retries reuse the key
    with pytest.raises(stripe.RateLimitError):
        await client.v1.billing.meter_events.create_async(ev("1"))
    assert len(double.state.calls("meter_events")) == 3  # no retry without the header


async def test_fault_probabilities_are_seeded() -> None:
    def run(seed: int) -> list[str | None]:
        faults = Faults(seed=seed)
        faults.set_probabilities("*", {"500": 0.3, "reset_before": 0.2})
        return [faults.draw("meter_events") for _ in range(50)]

    assert run(3) == run(3)
    assert run(3) != run(4)
    assert {"500", "reset_before", None} == set(run(3))
    with pytest.raises(ValueError):
        Faults().script("meter_events", ["explode"])
    with pytest.raises(ValueError):
        Faults().set_probabilities("meter_events", {"500": 0.8, "429": 0.5})


async def test_fault_route_isolation(double: RunningDouble, client: stripe.StripeClient) -> None:
    double.state.faults.script("event_summaries", ["500"])
    await client.v1.billing.meter_events.create_async(ev("1"))
    q: Any = {"customer": CUS, "start_time": day_start(), "end_time": day_start() + DAY}
    with pytest.raises(stripe.APIError) as exc:
        await client.v1.billing.meters.event_summaries.list_async("mtr_sum", q)
    assert exc.value.http_status == 500
    await client.v1.billing.meters.event_summaries.list_async("mtr_sum", q)
    assert double.state.faults.injected == [("event_summaries", "500")]


# -- concurrency rule ----------------------------------------------------------------


async def test_concurrency_violation_detected(
    double: RunningDouble, client: stripe.StripeClient
) -> None:
    state = double.state
    gate = state.processing_gate = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        first = tg.create_task(client.v1.billing.meter_events.create_async(ev("1")))
        await state.wait_for(lambda: state.in_flight[(CUS, EVENT)] == 1)
        # another customer, same meter: allowed concurrently
        other = tg.create_task(client.v1.billing.meter_events.create_async(ev("1", "cus_b")))
        await state.wait_for(lambda: state.in_flight[("cus_b", EVENT)] == 1)
        with pytest.raises(stripe.RateLimitError) as exc:
            await client.v1.billing.meter_events.create_async(ev("1"))
        gate.set()
    assert exc.value.http_status == 429
    assert headers_of(exc.value)["Stripe-Rate-Limited-Reason"] == "resource-specific"
    assert first.result().object == other.result().object == "billing.meter_event"
    assert len(state.concurrency_violations) == 1
    assert state.concurrency_violations[0]["customer"] == CUS
    assert state.totals(CUS, EVENT) == 1 and state.totals("cus_b", EVENT) == 1
    assert not state.in_flight


async def test_processing_delay_serial_calls_never_violate(
    double: RunningDouble, client: stripe.StripeClient
) -> None:
    double.state.processing_delay = 0.02
    for i in range(3):
        await client.v1.billing.meter_events.create_async(ev(str(i)))
    assert double.state.concurrency_violations == []
    double.state.processing_delay = 0.3  # wide margin: the overlap must not depend on timing
    results = await asyncio.gather(
        *(client.v1.billing.meter_events.create_async(ev("1")) for _ in range(3)),
        return_exceptions=True,
    )
    assert sum(isinstance(r, stripe.RateLimitError) for r in results) == 2
    assert len(double.state.concurrency_violations) == 2


# -- control API over HTTP -----------------------------------------------------------


async def test_http_control_api(double: RunningDouble, client: stripe.StripeClient) -> None:
    async with aiohttp.ClientSession(base_url=double.url) as http:
        async with http.post(
            "/_double/meters",
            json={"meters": [{"id": "mtr_http", "event_name": "tokens", "formula": "sum"}]},
        ) as resp:
            assert resp.status == 200
        async with http.post(
            "/_double/faults", json={"route": "meter_events", "script": ["reset_before", "ok"]}
        ) as resp:
            assert (await resp.json())["routes"]["meter_events"]["script"] == ["reset_before", "ok"]
        async with http.post("/_double/faults", json={"route": "nope", "script": ["500"]}) as resp:
            assert resp.status == 400
        tokens: Any = {"event_name": "tokens", "payload": {"stripe_customer_id": CUS, "value": "9"}}
        with pytest.raises(stripe.APIConnectionError):
            await client.v1.billing.meter_events.create_async(tokens, {"idempotency_key": "h1"})
        retry: Any = dict(tokens, identifier="h1")
        await client.v1.billing.meter_events.create_async(retry)
        async with http.get("/_double/state") as resp:
            state = await resp.json()
        assert state["totals"] == [
            {"customer": CUS, "event_name": "tokens", "total": 9, "count": 1}
        ]
        assert state["identifiers"] == {"h1": 1}
        assert state["calls"] == {"meter_events": 2}
        assert state["concurrency_violations"] == []
        assert state["stripe_versions"] == [PINNED]
        async with http.post("/_double/config", json={"expire_sessions": True}) as resp:
            assert resp.status == 200
        async with http.post("/_double/reset") as resp:
            assert resp.status == 200
        assert double.state.meters == {} and double.state.events == []


def test_state_seeding_json() -> None:
    state = StripeDoubleState()
    (meter,) = state.add_meters_json(
        [{"event_name": "x", "default_aggregation": {"formula": "last"}, "id": "mtr_x"}]
    )
    assert meter.formula == "last" and state.active_meter_for("x") is meter
