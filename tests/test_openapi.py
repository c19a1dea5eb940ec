"""The OpenAPI document (proxy/static/openapi.yaml) against the real server:

(a) every route the real aiohttp apps register is documented, and every documented operation
    has a route;
(b) the document is a valid OpenAPI 3.1 document, and the admin port serves exactly it;
(c) real responses of a real proxy process (real SQLite, the Stripe double, a real upstream)
    validate against the documented schemas, for every operation, success and error shapes;
(d) schemathesis fuzzes the admin and consumer APIs from the document against the live
    process: never a 500, every response documented and valid, and every request the
    document forbids refused.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import orjson
import pytest
import stripe
from aiohttp import web
from openapi_spec_validator import validate as validate_spec

from proxy.admin.api import load_openapi
from proxy.webhooks import PATH as WEBHOOK_PATH
from tests.conftest import ADMIN_TOKEN, TEST_RULES, Proxy, ProxyFactory, write_config
from tests.proxy_process import ProxyProcess
from tests.stripe_double.fixture import RunningDouble

DOC: dict[str, Any] = orjson.loads(load_openapi())
METHODS = ("get", "post", "put", "patch", "delete")
WEBHOOK_SECRET = "whsec_openapi_test"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def documented_operations() -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, item in DOC["paths"].items() for m in METHODS if m in item}


# ---- (a) routes <-> operations ----------------------------------------------------------------

async def test_every_route_is_documented_and_every_operation_has_a_route(
        make_proxy: ProxyFactory) -> None:
    p = await make_proxy()
    routes: set[tuple[str, str]] = set()
    for r in p.server.admin.app.router.routes():
        if r.method != "HEAD":                    # aiohttp adds HEAD beside every GET
            routes.add((r.method, r.resource.canonical))      # type: ignore[union-attr]
    # the public port has no Application and no router of its own: every request goes to
    # the pipeline, which routes the proxy's own paths with its router, on the canonical
    # path (proxy.target); everything else is the proxied API, the upstream's, not ours
    assert isinstance(p.server.public, web.ServerRunner)
    pipeline = p.server.pipeline
    assert pipeline.own_paths == {WEBHOOK_PATH}   # answers POST only (405 otherwise)
    routes.add(("POST", WEBHOOK_PATH))
    prefix = p.server.rt.cfg.reserved_prefix.rstrip("/")
    for r in pipeline.router.routes():
        path = r.resource.canonical
        assert r.method == "*"                    # each answers 405 itself (GET/HEAD or POST)
        if path.startswith(prefix):               # the consumer API: GET (and HEAD)
            routes.add(("GET", path))
    assert routes == documented_operations()
    assert len(routes) == 36


# ---- (b) the document is valid and served ------------------------------------------------------

async def test_the_document_is_valid_openapi_3_1_and_served_by_the_admin_port(proxy: Proxy) -> None:
    validate_spec(DOC)
    assert DOC["openapi"] == "3.1.0"
    ops = [op["operationId"] for item in DOC["paths"].values() for m, op in item.items()
           if m in METHODS]
    assert len(ops) == len(set(ops)) == 36
    async with proxy.session.get(proxy.admin_url + "/admin/openapi.json",
                                 headers=proxy.admin_headers) as r:
        assert r.status == 200 and r.content_type == "application/json"
        assert orjson.loads(await r.read()) == DOC
    async with proxy.session.get(proxy.admin_url + "/admin/openapi.json") as r:
        assert r.status == 401


# ---- a live proxy process --------------------------------------------------------------------

@dataclass
class Live:
    public: str
    admin: str
    double: RunningDouble
    proc: ProxyProcess
    db: Path


@pytest.fixture
async def live(tmp_path: Path, upstream: str,
               stripe_double_factory: Callable[..., Any]) -> AsyncIterator[Live]:
    double = await stripe_double_factory()
    for name in ("api_calls", "llm_tokens", "bytes_in", "units"):
        double.state.add_meter(name)
    cfg = write_config(tmp_path, upstream, TEST_RULES,
                       stripe={"api_key": "sk_test_openapi", "sink": "meter_events",
                               "api_base": double.url, "meter_events_base": double.url,
                               "webhook_secret": WEBHOOK_SECRET, "timeout": "5s"},
                       storage={"lock_wait": "200ms"})
    proc = ProxyProcess(cfg, tmp_path / "proxy.log")          # on free ports it binds
    proc.spawn()
    try:
        await proc.wait_ready()
        yield Live(proc.url, proc.admin_url, double, proc, tmp_path / "meter.db")
    finally:
        if proc.proc is not None and proc.proc.poll() is None:
            assert proc.terminate() == 0, (tmp_path / "proxy.log").read_text()[-3000:]
        proc.ensure_dead()


# ---- (c) real responses against the documented schemas ----------------------------------------

def _operation(method: str, template: str) -> dict[str, Any]:
    return dict(DOC["paths"][template][method.lower()])


def _response_spec(method: str, template: str, status: int) -> dict[str, Any]:
    responses = _operation(method, template)["responses"]
    assert str(status) in responses, f"{method} {template}: status {status} is not documented"
    spec = responses[str(status)]
    if "$ref" in spec:
        spec = DOC["components"]["responses"][spec["$ref"].rsplit("/", 1)[1]]
    return dict(spec)


def validate_response(method: str, template: str, status: int, content_type: str,
                      body: bytes) -> None:
    spec = _response_spec(method, template, status)
    content = spec.get("content", {})
    assert content_type in content, \
        f"{method} {template} {status}: {content_type} is not documented ({sorted(content)})"
    schema = content[content_type]["schema"]
    instance: Any = orjson.loads(body) if content_type == "application/json" else body.decode()
    jsonschema.Draft202012Validator({**schema, "components": DOC["components"]},
                                    format_checker=jsonschema.FormatChecker()).validate(instance)


@dataclass
class Checker:
    session: aiohttp.ClientSession
    live: Live
    seen: set[tuple[str, str, int]] = field(default_factory=set)

    async def call(self, method: str, template: str, status: int, *,
                   params: dict[str, str] | None = None, query: dict[str, str] | None = None,
                   json: Any = None, data: bytes | None = None,
                   headers: dict[str, str] | None = None, auth: bool = True) -> Any:
        path = template.format(**(params or {}))
        base = self.live.admin if template.startswith(("/admin", "/metrics", "/healthz",
                                                       "/readyz")) else self.live.public
        hdrs = {**(AUTH if auth else {}), **(headers or {})}
        async with self.session.request(method, base + path, params=query, json=json, data=data,
                                        headers=hdrs) as r:
            body = await r.read()
            assert r.status == status, (method, path, r.status, body[:500])
            if status == 405:                     # documented on the operation that exists
                (method,) = (m.upper() for m in METHODS if m in DOC["paths"][template])
                if template.startswith("/_meter"):
                    assert r.headers["Allow"] == "GET, HEAD"
            validate_response(method, template, r.status, r.content_type, body)
        self.seen.add((method, template, status))
        return orjson.loads(body) if r.content_type == "application/json" else body.decode()


# statuses documented but not produced here, each with the reason
NOT_EXERCISED = {
    ("GET", "/readyz", 503): "storage failure: tests/test_store.py and the readiness tests",
    ("POST", "/admin/reconcile", 409): "needs a proxy without Stripe: test_reconcile.py",
    ("POST", WEBHOOK_PATH, 413): "a body over the cap: test_webhooks.py",
    ("POST", WEBHOOK_PATH, 503): "webhook secret unset: test_webhooks.py",
    ("GET", "/admin/fleet", 200): "fleet mode: tests/fleet/test_members_flusher.py validates it",
    ("POST", "/admin/credits/balance-check", 409):
        "needs a proxy without Stripe: tests/test_credits_mirror.py",
}


def _sign(payload: bytes, secret: str = WEBHOOK_SECRET) -> str:
    header: str = stripe.WebhookSignature.generate_signature_header(  # type: ignore[attr-defined]
        payload.decode(), secret, timestamp=int(time.time()))
    return header


async def test_real_responses_match_the_documented_schemas(live: Live) -> None:
    async with aiohttp.ClientSession() as session:
        c = Checker(session, live)
        await exercise_every_operation(c, live)
    documented = {(m.upper(), t, int(s)) for t, item in DOC["paths"].items()
                  for m, op in item.items() if m in METHODS for s in op["responses"]}
    assert documented - c.seen == set(NOT_EXERCISED)
    assert c.seen <= documented


async def exercise_every_operation(c: Checker, live: Live) -> None:
    call = c.call
    await call("GET", "/healthz", 200, auth=False)
    await call("GET", "/readyz", 200, auth=False)
    await call("GET", "/admin/openapi.json", 200)
    await call("GET", "/admin/openapi.json", 401, auth=False)
    await call("GET", "/metrics", 200)
    await call("GET", "/metrics", 401, auth=False)
    await call("GET", "/admin/rules", 200)
    await call("GET", "/admin/fleet", 404)          # a single process is not a fleet
    await call("GET", "/admin/fleet", 401, auth=False)
    await call("GET", "/admin/rules", 401, auth=False)

    # customers
    await call("POST", "/admin/customers", 201, json={"id": "acme", "stripe_customer_id": "cus_a"})
    cust = await call("POST", "/admin/customers", 200,
                      json={"id": "acme", "billing_anchor": "2026-01-15T00:00:00Z",
                            "minimum_commitment": 500})
    assert cust["billing_anchor"] == "2026-01-15T00:00:00Z" and cust["minimum_commitment"] == 500
    err = await call("POST", "/admin/customers", 400, json={"id": "acme", "minimum_commitment": -1})
    assert err["error"]["param"] == "minimum_commitment"
    await call("POST", "/admin/customers", 401, auth=False, json={"id": "x"})
    err = await call("POST", "/admin/customers", 409, json={"id": "acme",
                                                          "credit_mode": "monetary"})
    assert err["error"]["type"] == "monetary_unavailable"     # the test rules have no prices
    await call("POST", "/admin/customers", 201, json={"id": "nostripe"})   # dead-letters below
    assert [x["id"] for x in await call("GET", "/admin/customers", 200)] == ["acme", "nostripe"]
    await call("GET", "/admin/customers", 401, auth=False)

    # keys
    acme = {"id": "acme"}
    key = await call("POST", "/admin/customers/{id}/keys", 201, params=acme, json={"name": "ci"})
    await call("POST", "/admin/customers/{id}/keys", 400, params=acme, json={"name": "x" * 201})
    await call("POST", "/admin/customers/{id}/keys", 404, params={"id": "ghost"})
    await call("POST", "/admin/customers/{id}/keys", 401, params=acme, auth=False)
    other = await call("POST", "/admin/customers/{id}/keys", 201, params={"id": "nostripe"})
    keys = await call("GET", "/admin/customers/{id}/keys", 200, params=acme)
    assert [k["key_id"] for k in keys] == [key["key_id"]] and keys[0]["revoked_at"] is None
    await call("GET", "/admin/customers/{id}/keys", 404, params={"id": "ghost"})
    await call("GET", "/admin/customers/{id}/keys", 401, params=acme, auth=False)

    # credits
    grant = await call("POST", "/admin/customers/{id}/grants", 201, params=acme,
                       json={"credits": "1000", "idempotency_key": "inv_1",
                             "expires_at": "2099-01-01"})
    again = await call("POST", "/admin/customers/{id}/grants", 200, params=acme,
                       json={"credits": "1000", "idempotency_key": "inv_1"})
    assert again["grant_id"] == grant["grant_id"] and grant["expires_at"] == "2099-01-01T00:00:00Z"
    err = await call("POST", "/admin/customers/{id}/grants", 400, params=acme,
                     json={"credits": "1e13"})
    assert err["error"]["param"] == "credits"
    await call("POST", "/admin/customers/{id}/grants", 404, params={"id": "ghost"},
               json={"credits": "1"})
    await call("POST", "/admin/customers/{id}/grants", 401, params=acme, auth=False)
    small = await call("POST", "/admin/customers/{id}/grants", 201, params=acme,
                       json={"credits": "0.5", "priority": 0})

    # traffic through the proxy: audit rows, ledger entries, outbox events
    for i in range(3):
        async with c.session.get(live.public + "/v1/items",
                                 headers={"Authorization": f"Bearer {key['key']}",
                                          "X-Request-Id": f"req-{i}"}) as r:
            assert r.status == 200
    async with c.session.get(live.public + "/v1/items",
                             headers={"Authorization": f"Bearer {other['key']}"}) as r:
        assert r.status == 200

    detail = await call("GET", "/admin/customers/{id}", 200, params=acme)
    assert detail["usage"] == {"api_calls": "3"} and detail["keys"][0]["key_id"] == key["key_id"]
    await call("GET", "/admin/customers/{id}", 404, params={"id": "ghost"})
    await call("GET", "/admin/customers/{id}", 401, params=acme, auth=False)

    await call("POST", "/admin/grants/{grant_id}/void", 200, params={"grant_id": small["grant_id"]})
    await call("POST", "/admin/grants/{grant_id}/void", 404, params={"grant_id": "grt_ghost"})
    await call("POST", "/admin/grants/{grant_id}/void", 401, params={"grant_id": "x"}, auth=False)
    summary = await call("GET", "/admin/customers/{id}/grants", 200, params=acme)
    assert summary["balance"] == "1000"            # the test rules price nothing in credits
    await call("GET", "/admin/customers/{id}/grants", 401, params=acme, auth=False)
    ledger = await call("GET", "/admin/customers/{id}/credits/ledger", 200, params=acme)
    assert [(e["kind"], e["credits"]) for e in ledger["entries"]] == [("void", "0.5")]
    await call("GET", "/admin/customers/{id}/credits/ledger", 401, params=acme, auth=False)

    # the monetary credits mode (no monetary customer here: tests/test_credits_mirror.py)
    assert await call("GET", "/admin/credits/mirrors", 200) == {"mirrors": []}
    await call("GET", "/admin/credits/mirrors", 400, query={"status": "lost"})
    await call("GET", "/admin/credits/mirrors", 401, auth=False)
    assert await call("POST", "/admin/credits/mirrors/requeue", 200) == {"requeued": 0}
    await call("POST", "/admin/credits/mirrors/requeue", 400, json={"grant_ids": "x"})
    await call("POST", "/admin/credits/mirrors/requeue", 401, auth=False)
    assert await call("POST", "/admin/credits/balance-check", 200) == {"checks": []}
    await call("POST", "/admin/credits/balance-check", 404, json={"customer_id": "acme"})
    await call("POST", "/admin/credits/balance-check", 400, json={"customer": "acme"})
    await call("POST", "/admin/credits/balance-check", 401, auth=False)

    # usage and exports
    usage = await call("GET", "/admin/customers/{id}/usage", 200, params=acme)
    assert usage["meters"] == {"api_calls": "3"}
    err = await call("GET", "/admin/customers/{id}/usage", 400, params=acme,
                     query={"to": "99999999999999999999"})
    assert err["error"]["param"] == "to"
    await call("GET", "/admin/customers/{id}/usage", 401, params=acme, auth=False)
    csv = await call("GET", "/admin/customers/{id}/usage.csv", 200, params=acme)
    assert len(csv.splitlines()) == 4
    await call("GET", "/admin/customers/{id}/usage.csv", 400, params=acme, query={"from": "soon"})
    await call("GET", "/admin/customers/{id}/usage.csv", 401, params=acme, auth=False)
    events = await call("GET", "/admin/customers/{id}/events", 200, params=acme)
    assert [e["request_id"] for e in events["requests"]] == ["req-0", "req-1", "req-2"]
    csv = await call("GET", "/admin/customers/{id}/events", 200, params=acme,
                     query={"format": "csv"})
    assert len(csv.splitlines()) == 4
    await call("GET", "/admin/customers/{id}/events", 400, params=acme, query={"format": "xml"})
    await call("GET", "/admin/customers/{id}/events", 401, params=acme, auth=False)

    # the outbox, dead letters, reconcile
    flushed = await call("POST", "/admin/flush", 200)
    assert flushed["delivered"] == 1 and flushed["dead"] == 1     # nostripe has no Stripe id
    await call("POST", "/admin/flush", 401, auth=False)
    sent = await call("GET", "/admin/outbox", 200, query={"status": "sent"})
    assert [(e["customer_id"], e["value"]) for e in sent["events"]] == [("acme", 3)]
    await call("GET", "/admin/outbox", 400, query={"status": "lost"})
    await call("GET", "/admin/outbox", 401, auth=False)
    dead = (await call("GET", "/admin/dead-letters", 200))["dead_letters"]
    assert [e["customer_id"] for e in dead] == ["nostripe"]
    await call("GET", "/admin/dead-letters", 401, auth=False)
    dl = {"id": str(dead[0]["id"])}
    replay = await call("POST", "/admin/dead-letters/{id}/replay", 200, params=dl)
    assert replay["replayed"]["status"] == "dead"                   # still no Stripe id
    await call("POST", "/admin/dead-letters/{id}/replay", 400, params={"id": "x"})
    await call("POST", "/admin/dead-letters/{id}/replay", 400, params=dl,
               query={"restamp": "maybe"})
    await call("POST", "/admin/dead-letters/{id}/replay", 404, params={"id": "999999"})
    await call("POST", "/admin/dead-letters/{id}/replay", 401, params=dl, auth=False)
    report = await call("POST", "/admin/reconcile", 200, query={"grace": "0"})
    assert report["counts"]["shortfall"] == 0
    await call("POST", "/admin/reconcile", 200, query={"format": "table"})
    err = await call("POST", "/admin/reconcile", 400, query={"grace": "soon"})
    assert err["error"]["param"] == "grace"
    live.double.state.faults.script("meters_list", ["reset_before"] * 20)   # Stripe unreachable
    err = await call("POST", "/admin/reconcile", 502)
    assert err["error"]["type"] == "stripe_unavailable"
    live.double.state.faults.clear()
    await call("POST", "/admin/reconcile", 401, auth=False)

    # Stripe webhooks: the public endpoint, then the admin view
    event = orjson.dumps({"id": "evt_1", "type": "customer.created", "created": 1_700_000_000,
                          "data": {"object": {"id": "cus_x"}}})
    signed = {"Stripe-Signature": _sign(event), "Content-Type": "application/json"}
    assert await call("POST", WEBHOOK_PATH, 200, data=event, headers=signed, auth=False) \
        == {"received": True}
    assert await call("POST", WEBHOOK_PATH, 200, data=event, headers=signed, auth=False) \
        == {"received": True, "duplicate": True}
    await call("POST", WEBHOOK_PATH, 400, data=event, auth=False,
               headers={"Stripe-Signature": _sign(event, "whsec_forged")})
    await call("GET", WEBHOOK_PATH, 405, auth=False)
    listed = await call("GET", "/admin/webhooks", 200)
    assert [e["id"] for e in listed["events"]] == ["evt_1"]
    await call("GET", "/admin/webhooks", 400, query={"limit": "0"})
    await call("GET", "/admin/webhooks", 401, auth=False)
    one = await call("GET", "/admin/webhooks/{id}", 200, params={"id": "evt_1"})
    assert one["payload"]["data"]["object"]["id"] == "cus_x"
    await call("GET", "/admin/webhooks/{id}", 404, params={"id": "evt_ghost"})
    await call("GET", "/admin/webhooks/{id}", 401, params={"id": "evt_1"}, auth=False)
    await call("POST", "/admin/webhooks/{id}/replay", 200, params={"id": "evt_1"})
    await call("POST", "/admin/webhooks/{id}/replay", 404, params={"id": "evt_ghost"})
    await call("POST", "/admin/webhooks/{id}/replay", 401, params={"id": "evt_1"}, auth=False)

    # the consumer API, with the customer's own key
    mine = {"Authorization": f"Bearer {key['key']}"}
    await call("GET", "/_meter", 200, auth=False)
    await call("POST", "/_meter", 405, auth=False)
    await call("GET", "/_meter/", 200, auth=False)
    await call("POST", "/_meter/", 405, auth=False)
    report = await call("GET", "/_meter/usage", 200, auth=False, headers=mine)
    assert report["meters"]["api_calls"]["quantity"] == "3"
    await call("GET", "/_meter/usage", 401, auth=False)
    await call("POST", "/_meter/usage", 405, auth=False, headers=mine)
    exported = await call("GET", "/_meter/events.json", 200, auth=False, headers=mine)
    assert len(exported["requests"]) == 3
    await call("GET", "/_meter/events.json", 400, auth=False, headers=mine, query={"to": "-1"})
    await call("GET", "/_meter/events.json", 401, auth=False,
               headers={"Authorization": "Bearer mp_nope"})
    await call("POST", "/_meter/events.json", 405, auth=False, headers=mine)
    csv = await call("GET", "/_meter/events.csv", 200, auth=False, headers=mine)
    assert len(csv.splitlines()) == 4
    await call("GET", "/_meter/events.csv", 400, auth=False, headers=mine,
               query={"from": "2026-13-01"})
    await call("GET", "/_meter/events.csv", 401, auth=False)
    await call("POST", "/_meter/events.csv", 405, auth=False, headers=mine)

    # another process holds the database's write lock: admin writes answer 503 (after
    # storage.lock_wait) and write nothing (tests/test_errors_and_admin.py checks that)
    blocker = sqlite3.connect(live.db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        for method, template, params, body in [
                ("POST", "/admin/customers", {}, {"id": "late"}),
                ("POST", "/admin/customers/{id}/keys", acme, None),
                ("DELETE", "/admin/keys/{key_id}", {"key_id": key["key_id"]}, None),
                ("POST", "/admin/customers/{id}/grants", acme, {"credits": "1"}),
                ("POST", "/admin/grants/{grant_id}/void", {"grant_id": grant["grant_id"]}, None),
                ("POST", "/admin/credits/mirrors/requeue", {}, None),
                ("POST", "/admin/dead-letters/{id}/replay", dl, None)]:
            err = await call(method, template, 503, params=params, json=body)
            assert err["error"]["type"] == "storage_unavailable", (template, err)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()

    # revoke: the key is refused from then on; suspended customers are refused too
    revoked = await call("DELETE", "/admin/keys/{key_id}", 200, params={"key_id": key["key_id"]})
    assert revoked == {"key_id": key["key_id"], "revoked": True, "changed": True}
    await call("DELETE", "/admin/keys/{key_id}", 404, params={"key_id": "key_ghost"})
    await call("DELETE", "/admin/keys/{key_id}", 401, params={"key_id": "x"}, auth=False)
    for template in ("/_meter/usage", "/_meter/events.json", "/_meter/events.csv"):
        await call("GET", template, 403, auth=False, headers=mine)


# ---- (d) fuzzing the admin API from the document ---------------------------------------------

FUZZ_EXAMPLES = int(os.environ.get("OPENAPI_FUZZ_EXAMPLES", "12"))


def _query_value(v: Any) -> Any:
    if isinstance(v, list):
        return [_query_value(x) for x in v] or ""
    if v is None or isinstance(v, dict):
        return "" if v is None else orjson.dumps(v).decode()
    return v


def fuzz_api(live: Live, key: str, examples: int) -> tuple[int, list[str]]:
    """Run schemathesis on every admin and consumer operation, positive and negative data;
    returns the number of calls made and the failures (check, operation, what was sent)."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import (
        content_type_conformance,
        negative_data_rejection,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    # negative_data_rejection: what the document forbids (a wrong type, an unknown query
    # parameter or body field, a value out of range) must be refused with a 4xx
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance, negative_data_rejection]
    schema = schemathesis.openapi.from_dict(DOC)
    failures: list[str] = []
    calls = [0]

    def fuzz_one(strategy: Any, base: str, token: str) -> None:
        @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        @given(case=strategy)
        def run(case: Any) -> None:
            calls[0] += 1
            # a generated "Bearer <anything>" becomes the real credential; a missing or
            # malformed Authorization header (a negative case) is sent as generated
            headers = {}
            if str((case.headers or {}).get("Authorization", "")).startswith("Bearer "):
                headers["Authorization"] = f"Bearer {token}"
            if case.query:                        # requests drops None and {} values: keep them
                case.query = {k: _query_value(v) for k, v in case.query.items()}
            response = case.call(base_url=base, headers=headers, timeout=30)
            case.validate_response(response, checks=checks)

        run()

    for result in schema.get_all_operations():
        op = result.ok()
        if op.path == WEBHOOK_PATH:
            continue                              # signed by Stripe: tests/test_webhooks.py
        consumer = op.path.startswith("/_meter")
        item = DOC["paths"][op.path]
        takes_input = bool(item.get("parameters") or item[op.method].get("parameters")
                           or item[op.method].get("requestBody"))
        # negative data needs an input to break; operations without any get positive only
        modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if takes_input \
            else (GenerationMode.POSITIVE,)
        for mode in modes:
            try:
                fuzz_one(op.as_strategy(generation_mode=mode),
                         live.public if consumer else live.admin,
                         key if consumer else ADMIN_TOKEN)
            except Exception as exc:                  # collected, reported all at once
                failures.append(f"{op.method.upper()} {op.path} ({mode.value}):"
                                f" {type(exc).__name__}: {str(exc)[:1500]}")
    return calls[0], failures


@pytest.mark.timeout(280)
async def test_fuzz_the_admin_and_consumer_apis_from_the_document(live: Live) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(live.admin + "/admin/customers", json={"id": "acme"},
                          headers=AUTH) as r:
            assert r.status == 201                # a real customer for the fuzzer to hit
        async with s.post(live.admin + "/admin/customers/acme/keys", headers=AUTH) as r:
            assert r.status == 201
            key = (await r.json())["key"]
    calls, failures = await asyncio.to_thread(fuzz_api, live, key, FUZZ_EXAMPLES)
    log = live.proc.log.read_text(errors="replace")
    tracebacks = [x for x in log.split("\n20") if "Traceback" in x]     # one per log record
    assert failures == [], "\n".join(failures + tracebacks[:5])
    assert tracebacks == []
    print(f"fuzz: {calls} calls")
    assert calls >= 30 + 20                       # every operation ran, with inputs twice
    assert live.proc.proc is not None and live.proc.proc.poll() is None
