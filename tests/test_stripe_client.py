"""proxy.stripe.client.StripeClient against the Stripe double, through the REAL stripe SDK.

Every named method is called for real (loopback HTTP to ``tests/stripe_double``), and every
failure path goes through the one translation (``proxy.stripe.client.translate``) into
``proxy.errors`` types: faults are injected with the double's fault scripts. The last tests
hold the import boundary: no module outside ``proxy/stripe/`` imports the SDK or reaches a
client's SDK attribute, and ``proxy/pricing.py`` is pure math with no lazy imports.
"""

from __future__ import annotations

import ast
import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import stripe

from proxy.errors import (
    MeterproxyError,
    StripeCallError,
    StripeDuplicate,
    StripeRejected,
    StripeSessionExpired,
    StripeUnavailable,
    WebhookSignatureInvalid,
)
from proxy.sinks.base import Kind
from proxy.stripe.client import StripeClient, StripeMeterInfo, outcome_of, translate
from proxy.stripe.meter_event_stream import rfc3339
from proxy.tasks import spawn
from tests.stripe_double.fixture import TEST_API_KEY, RunningDouble

EVENT = "api_calls"
CUS = "cus_client"
SI = "si_client"
HOUR = 3600
PROXY = Path(__file__).resolve().parent.parent / "proxy"


@pytest.fixture
async def double(stripe_double: RunningDouble) -> RunningDouble:
    stripe_double.state.add_meter(EVENT, id="mtr_api_calls")
    stripe_double.state.add_subscription_item(SI)
    return stripe_double


@pytest.fixture
async def client(double: RunningDouble) -> AsyncIterator[StripeClient]:
    c = StripeClient(TEST_API_KEY, api_base=double.url, meter_events_base=double.url,
                     timeout=1.0)
    yield c
    await c.close()


async def send(client: StripeClient, identifier: str, value: int = 1, *,
               ts: int | None = None, key: str | None = None,
               event_name: str = EVENT) -> None:
    await client.send_meter_event(
        event_name=event_name, stripe_customer_id=CUS, value=value, identifier=identifier,
        timestamp=int(time.time()) - 60 if ts is None else ts,
        idempotency_key=key or f"{identifier}-1")


# ---- v1 meter events ------------------------------------------------------------------


async def test_send_meter_event_reaches_stripe(double: RunningDouble,
                                               client: StripeClient) -> None:
    await send(client, "ev-1", 7)
    ev = double.state.event("ev-1")
    assert ev is not None and ev.value == 7 and ev.customer == CUS
    call = double.state.calls("meter_events")[-1]
    assert call.idempotency_key == "ev-1-1"
    assert call.params["payload"] == {"stripe_customer_id": CUS, "value": "7"}


async def test_a_resent_identifier_is_a_duplicate(double: RunningDouble,
                                                  client: StripeClient) -> None:
    await send(client, "ev-dup", 3)
    with pytest.raises(StripeDuplicate) as caught:
        await send(client, "ev-dup", 3, key="ev-dup-2")
    assert "already delivered" in caught.value.reason and caught.value.status == 400
    assert outcome_of(caught.value).kind is Kind.DUPLICATE
    assert double.state.totals(CUS, EVENT) == 3


async def test_permanent_answers_are_rejected(double: RunningDouble,
                                              client: StripeClient) -> None:
    with pytest.raises(StripeRejected, match="unknown event name"):
        await send(client, "ev-x", event_name="no_such_event")
    with pytest.raises(StripeRejected, match="timestamp outside Stripe's window"):
        await send(client, "ev-old", ts=int(time.time()) - 40 * 86400)
    await send(client, "ev-k", 1, key="same-key")
    with pytest.raises(StripeRejected, match="idempotency key reused") as caught:
        await send(client, "ev-k2", 2, key="same-key")
    assert outcome_of(caught.value).kind is Kind.DEAD
    assert double.state.totals(CUS, EVENT) == 1


@pytest.mark.parametrize(("fault", "status", "reason", "lock", "ambiguous"), [
    ("500", 500, "Stripe server error", False, False),
    ("429", 429, "rate limited (global-rate)", False, False),
    ("lock_timeout", 429, "lock_timeout", True, False),
    ("reset_before", None, "connection error", False, True),
    ("commit_then_drop", None, "connection error", False, True),
    ("hang", None, "timeout waiting for Stripe", False, True),
])
async def test_transient_faults_are_unavailable(double: RunningDouble, client: StripeClient,
                                                fault: str, status: int | None, reason: str,
                                                lock: bool, ambiguous: bool) -> None:
    double.state.faults.script("meter_events", [fault])
    with pytest.raises(StripeUnavailable) as caught:
        await send(client, f"ev-{fault}")
    err = caught.value
    assert not isinstance(err, StripeSessionExpired)
    assert reason in err.reason and str(err) == err.reason
    assert (err.status, err.lock_timeout, err.ambiguous) == (status, lock, ambiguous)
    assert isinstance(err.__cause__, stripe.StripeError)      # the SDK's error is kept
    out = outcome_of(err)
    assert (out.kind, out.status, out.lock_timeout, out.ambiguous) == \
        (Kind.RETRY, status, lock, ambiguous)
    # once the fault has passed the event is there exactly once (a dropped answer hid a
    # delivery: the resend is a duplicate)
    if fault == "commit_then_drop":
        with pytest.raises(StripeDuplicate):
            await send(client, f"ev-{fault}", key=f"ev-{fault}-2")
    else:
        await send(client, f"ev-{fault}", key=f"ev-{fault}-2")
    assert double.state.event_count(CUS, EVENT) == 1


async def test_a_refused_api_key_is_unavailable_not_rejected(double: RunningDouble) -> None:
    c = StripeClient("sk_live_revoked", api_base=double.url, meter_events_base=double.url,
                     timeout=2.0)
    try:
        with pytest.raises(StripeUnavailable, match="Stripe rejected the API key") as caught:
            await send(c, "ev-key")
        assert caught.value.status == 401
    finally:
        await c.close()
    assert double.state.event_count(CUS, EVENT) == 0


async def test_cancellation_is_not_translated(double: RunningDouble,
                                              client: StripeClient) -> None:
    double.state.faults.script("meter_events", ["hang"])
    task = spawn("test-cancel", send(client, "ev-cancel"))
    await double.state.wait_for(lambda: bool(double.state.calls("meter_events")))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_nothing_answers_is_unavailable() -> None:
    c = StripeClient(TEST_API_KEY, api_base="http://127.0.0.1:9",
                     meter_events_base="http://127.0.0.1:9", timeout=2.0)
    try:
        with pytest.raises(StripeUnavailable, match="connection error") as caught:
            await send(c, "ev-nobody")
        assert caught.value.ambiguous and caught.value.status is None
    finally:
        await c.close()
        await c.close()     # closing twice is harmless


def test_translate_maps_every_foreign_error_to_a_meterproxy_error() -> None:
    for exc in (TimeoutError(), OSError("refused"), RuntimeError("bug")):
        err = translate(exc)
        assert isinstance(err, StripeUnavailable) and isinstance(err, MeterproxyError)
    assert "unexpected error: RuntimeError: bug" in translate(RuntimeError("bug")).args[0]
    sig = translate(stripe.SignatureVerificationError("No signatures found", "t=1"))
    assert isinstance(sig, WebhookSignatureInvalid)


# ---- v2 meter event stream ------------------------------------------------------------


async def test_stream_session_and_send(double: RunningDouble, client: StripeClient) -> None:
    session = await client.open_meter_event_session()
    assert session.authentication_token.startswith("mtrses_tok_")
    ts = int(time.time()) - 120
    await client.send_meter_event_stream(
        [{"event_name": EVENT, "identifier": f"st-{i}", "timestamp": rfc3339(ts),
          "payload": {"stripe_customer_id": CUS, "value": str(i + 1)}} for i in range(3)],
        session_token=session.authentication_token)
    assert double.state.totals(CUS, EVENT) == 6


async def test_stream_with_an_expired_or_unknown_session(double: RunningDouble,
                                                         client: StripeClient) -> None:
    session = await client.open_meter_event_session()
    double.state.expire_sessions()
    wire = [{"event_name": EVENT, "identifier": "st-x", "timestamp": rfc3339(int(time.time())),
             "payload": {"stripe_customer_id": CUS, "value": "1"}}]
    with pytest.raises(StripeSessionExpired, match="session expired") as caught:
        await client.send_meter_event_stream(wire, session_token=session.authentication_token)
    assert caught.value.status == 401 and outcome_of(caught.value).kind is Kind.RETRY
    with pytest.raises(StripeSessionExpired, match="session rejected"):
        await client.send_meter_event_stream(wire, session_token="mtrses_tok_forged")
    assert double.state.event_count(CUS, EVENT) == 0


async def test_session_faults(double: RunningDouble, client: StripeClient) -> None:
    double.state.faults.script("meter_event_session", ["500"])
    with pytest.raises(StripeUnavailable, match="Stripe server error"):
        await client.open_meter_event_session()
    assert (await client.open_meter_event_session()).authentication_token


# ---- legacy usage records -------------------------------------------------------------


async def test_usage_record_with_the_pinned_version(double: RunningDouble,
                                                    client: StripeClient) -> None:
    ts = int(time.time()) - 60
    await client.create_usage_record(subscription_item=SI, quantity=4, timestamp=ts,
                                     idempotency_key="ur-1", stripe_version="2024-06-20")
    assert double.state.stripe_versions("usage_records") == {"2024-06-20"}
    assert sum(double.state.subscription_items[SI].usage.values()) == 4
    # the current API version has no usage records: a permanent 404
    with pytest.raises(StripeRejected) as caught:
        await client.create_usage_record(subscription_item=SI, quantity=1, timestamp=ts,
                                         idempotency_key="ur-2", stripe_version="2025-03-31.basil")
    assert caught.value.status == 404
    double.state.faults.script("usage_records", ["500"])
    with pytest.raises(StripeUnavailable):
        await client.create_usage_record(subscription_item=SI, quantity=1, timestamp=ts,
                                         idempotency_key="ur-3", stripe_version="2024-06-20")


# ---- meters and summaries -------------------------------------------------------------


async def test_list_meters_reads_every_page(double: RunningDouble,
                                            client: StripeClient) -> None:
    double.state.add_meter("tokens", "last", id="mtr_tokens", event_time_window="hour")
    double.state.add_meter("calls_old", id="mtr_old", status="inactive", customer_key="cus")
    for i in range(3):
        double.state.add_meter(f"extra_{i}", id=f"mtr_extra_{i}")
    first = await client.list_meters_page(limit=2)
    assert len(first.items) == 2 and first.has_more
    meters = await client.list_meters(page_size=2)
    assert len(meters) == 6 and len(double.state.calls("meters_list")) == 1 + 3
    by_id = {m.id: m for m in meters}
    assert by_id["mtr_api_calls"] == StripeMeterInfo("mtr_api_calls", EVENT, "active", "sum",
                                                     "stripe_customer_id", "value", None)
    assert by_id["mtr_tokens"].formula == "last" and by_id["mtr_tokens"].event_time_window == "hour"
    assert by_id["mtr_old"].status == "inactive" and by_id["mtr_old"].customer_key == "cus"


async def test_list_meters_faults(double: RunningDouble, client: StripeClient) -> None:
    double.state.faults.script("meters_list", ["ok", "429_no_retry"])
    for i in range(3):
        double.state.add_meter(f"extra_{i}", id=f"mtr_extra_{i}")
    with pytest.raises(StripeUnavailable, match="rate limited") as caught:
        await client.list_meters(page_size=2)      # the second page fails
    assert caught.value.status == 429


async def test_event_summaries_by_hour_across_pages(double: RunningDouble,
                                                    client: StripeClient) -> None:
    now = int(time.time())
    h0 = now - now % HOUR - 3 * HOUR
    await send(client, "sum-1", 2, ts=h0 + 10)
    await send(client, "sum-2", 5, ts=h0 + 20)
    await send(client, "sum-3", 4, ts=h0 + HOUR + 10)
    page = await client.list_event_summaries_page("mtr_api_calls", customer=CUS,
                                                  start_time=h0, end_time=h0 + 3 * HOUR, limit=2)
    assert page.has_more and [(s.start_time, s.aggregated_value) for s in page.items] == \
        [(h0, 7.0), (h0 + HOUR, 4.0)]
    rest = await client.list_event_summaries_page(
        "mtr_api_calls", customer=CUS, start_time=h0, end_time=h0 + 3 * HOUR, limit=2,
        starting_after=page.items[-1].id)
    assert not rest.has_more and [(s.start_time, s.aggregated_value) for s in rest.items] == \
        [(h0 + 2 * HOUR, 0.0)]
    with pytest.raises(StripeRejected, match="No such billing meter"):
        await client.list_event_summaries_page("mtr_nope", customer=CUS, start_time=h0,
                                               end_time=h0 + HOUR, limit=10)
    double.state.faults.script("event_summaries", ["500"])
    with pytest.raises(StripeUnavailable, match="Stripe server error"):
        await client.list_event_summaries_page("mtr_api_calls", customer=CUS, start_time=h0,
                                               end_time=h0 + HOUR, limit=10)


# ---- prices ---------------------------------------------------------------------------

TIERED = {"id": "price_tiered", "currency": "usd", "billing_scheme": "tiered",
          "tiers_mode": "graduated", "unit_amount": None, "unit_amount_decimal": None,
          "tiers": [{"up_to": 10, "unit_amount": 5, "unit_amount_decimal": "5",
                     "flat_amount": None, "flat_amount_decimal": None},
                    {"up_to": None, "unit_amount": None, "unit_amount_decimal": "2.5",
                     "flat_amount": 100, "flat_amount_decimal": "100"}]}


async def test_retrieve_price_expands_tiers(double: RunningDouble,
                                            client: StripeClient) -> None:
    double.state.add_price(TIERED)
    got = await client.retrieve_price("price_tiered")
    assert got["id"] == "price_tiered" and got["currency"] == "usd"
    tiers = got["tiers"]                    # the double sends tiers only when expanded
    assert isinstance(tiers, list) and [(t["up_to"], str(t["unit_amount_decimal"]),
                                         t["flat_amount"]) for t in tiers] == \
        [(10, "5", None), (None, "2.5", 100)]
    call = double.state.calls("price_retrieve")[-1]
    assert call.params.get("expand") == ["tiers", "currency_options"]
    with pytest.raises(StripeRejected, match="No such price") as caught:
        await client.retrieve_price("price_nope")
    assert caught.value.status == 404
    double.state.faults.script("price_retrieve", ["500"])
    with pytest.raises(StripeUnavailable):
        await client.retrieve_price("price_tiered")


# ---- webhook signatures ---------------------------------------------------------------

SECRET = "whsec_client_test"


def _signed(body: bytes, secret: str = SECRET, ts: int | None = None) -> str:
    header: str = stripe.WebhookSignature.generate_signature_header(  # type: ignore[attr-defined]
        body.decode(), secret, timestamp=int(time.time()) if ts is None else ts)
    return header


def test_webhook_signature_verifies_or_is_invalid() -> None:
    body = b'{"id": "evt_1", "type": "customer.created"}'
    StripeClient.verify_webhook_signature(body, _signed(body), SECRET, 300)
    cases: list[tuple[bytes, str | None, str]] = [
        (body, _signed(body, "whsec_other"), "No signatures found matching"),
        (body, _signed(body, ts=int(time.time()) - 600), "Timestamp outside the tolerance"),
        (body, None, "No Stripe-Signature header"),
        (body + b" ", _signed(body), "No signatures found matching"),
        (b"\xff\xfe", "t=1,v1=00", "can't decode byte"),
    ]
    for payload, header, message in cases:
        with pytest.raises(WebhookSignatureInvalid, match=message):
            StripeClient.verify_webhook_signature(payload, header, SECRET, 300)


# ---- the boundary ---------------------------------------------------------------------


def _modules_outside_stripe() -> list[Path]:
    return sorted(p for p in PROXY.rglob("*.py") if (PROXY / "stripe") not in p.parents)


def test_no_module_outside_proxy_stripe_imports_the_sdk() -> None:
    offenders = []
    for path in _modules_outside_stripe():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(PROXY.parent)}:{node.lineno} imports {n}"
                          for n in names if n == "stripe" or n.startswith("stripe.")]
            if isinstance(node, ast.Attribute) and node.attr in ("client", "_sdk", "_http"):
                offenders.append(f"{path.relative_to(PROXY.parent)}:{node.lineno} "
                                 f"reaches .{node.attr}")
    assert offenders == []
    assert len(_modules_outside_stripe()) > 30     # the walk really saw the package


def test_pricing_is_pure_math_without_lazy_imports() -> None:
    tree = ast.parse((PROXY / "pricing.py").read_text())
    top = {id(n) for n in tree.body}
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert imports and all(id(n) in top for n in imports), "an import inside a function"
    modules = {a.name for n in imports if isinstance(n, ast.Import) for a in n.names} | \
        {n.module for n in imports if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in modules if m.split(".")[0] in ("stripe", "aiohttp", "asyncio")}
    assert not {m for m in modules if m.startswith(("proxy.stripe", "proxy.sinks"))}


def test_every_stripe_error_is_a_meterproxy_error() -> None:
    for cls in (StripeCallError, StripeUnavailable, StripeSessionExpired, StripeRejected,
                StripeDuplicate, WebhookSignatureInvalid):
        assert issubclass(cls, MeterproxyError)
