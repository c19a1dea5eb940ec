"""Fuzzing (hypothesis) of two untrusted inputs: rules files and Stripe webhook payloads.

- Rules loader: arbitrary YAML text, arbitrary structures dumped to YAML, and a valid file
  with one line replaced, deleted or duplicated. The result is a valid rule set or a
  ``RulesError`` whose every problem reads ``FILE:LINE:COL: message`` with a position inside
  the file -- never another exception.
- Webhooks: arbitrary JSON and Stripe-shaped events, with and without valid signatures,
  posted to the real webhook endpoint of a proxy running in its own process. Never a 500;
  without a valid signature always 400 ``invalid_signature``, nothing stored and no credit
  changed; with one, 200 for an event and 400 ``invalid_payload`` for anything else, and
  every stored event is processed to a final status.

How many examples each test tries depends on the hypothesis profile (tests/conftest.py);
the counts of the last run are printed in pytest's terminal summary ("fuzz examples").
"""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import re
import string
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import stripe
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from proxy.rules import RulesError, RuleSet, check_rules, load_rules
from proxy.webhooks import PATH
from tests.conftest import ADMIN_TOKEN, FUZZ_COUNTS, TEST_RULES, fuzz_examples, write_config
from tests.proxy_process import ProxyProcess

# ------------------------------------------------------------------------------ rules loader

VOCAB = ["version", "meters", "rules", "name", "match", "path", "methods", "headers", "query",
         "params", "auth", "usage", "meter", "quantity", "preset", "credits", "estimate",
         "transform", "divide_by", "round", "on_unreadable", "count_when", "stripe_event_name",
         "covered_event_name", "description", "price", "price_id", "currency", "unit_amount",
         "unit_amount_decimal", "billing_scheme", "tiers", "tiers_mode", "up_to",
         "flat_amount", "defaults", "api_calls", "x"]
VALUES = ["/v1/chat/completions", "/**", "/v1/{id}", "/{a}/{a}", "POST", "GET", "none",
          "required", "openai_chat", "anthropic_messages", "response.json.usage.total_tokens",
          "request.header.x-units", "path.id", "request.bytes", "2xx", "4xx", "any", "up",
          "down", "inf", "usd", "tiered", "graduated", "volume", "1e400", "NaN", "-1", "",
          "*", "premium-*", "{", "}", "~", "0.001"]

scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                   st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(VALUES),
                   st.text(max_size=12))
structure = st.recursive(
    scalar,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
        st.one_of(st.sampled_from(VOCAB), st.text(max_size=6)), kids, max_size=5),
    max_leaves=30)
rules_like = st.fixed_dictionaries(
    {"version": st.one_of(st.just(1), scalar)},
    optional={"meters": st.dictionaries(st.sampled_from(["api_calls", "tokens", "m"]),
                                        structure, max_size=3),
              "rules": st.lists(st.dictionaries(st.sampled_from(VOCAB), structure, max_size=6),
                                max_size=4),
              "defaults": structure})

PROBLEM = re.compile(r"^(?P<file>.+):(?P<line>\d+):(?P<col>\d+): (?P<msg>\S.*)$", re.S)


def check_outcome(path: Path, text: str) -> None:
    """A valid rule set, or FILE:LINE:COL problems inside the file; check_rules agrees."""
    counted = FUZZ_COUNTS.setdefault("rules loader", 0)
    FUZZ_COUNTS["rules loader"] = counted + 1
    path.write_text(text, encoding="utf-8")
    lines = max(1, text.count("\n") + 1)
    try:
        rs = load_rules([path])
    except RulesError as err:
        problems = list(err.problems)
        assert problems, "RulesError without a problem"
        for p in problems:
            m = PROBLEM.match(str(p))
            assert m is not None, str(p)
            assert m["file"] == str(path)
            assert 1 <= int(m["line"]) <= lines + 1, (str(p), lines)
            assert int(m["col"]) >= 1
        assert [str(p) for p in check_rules([path])] == [str(p) for p in problems]
    else:
        assert isinstance(rs, RuleSet)
        assert re.fullmatch(r"[0-9a-f]{16}", rs.version)
        assert check_rules([path]) == []


def dump(doc: object) -> str:
    buf = io.StringIO()
    YAML().dump(doc, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def rules_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "rules.yaml"


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=300))
@example("")
@example("version: 1\nrules: [")
@example("\t- a")
@example("version: 1\nmeters: {a: &x {stripe_event_name: a}, b: *x}\nrules: []\n")
@example("version: 1\nmeters: {a: {stripe_event_name: a}}\nrules:\n  - name: r\n"
         "    match: {path: /**}\n    usage: [{meter: a, quantity: 1}]\n    name: r\n")
@example("\ufeffversion: 1\n")
@example("!!python/object:os.system x\n")
@example("a: " + "[" * 200)
def test_rules_loader_on_arbitrary_text(rules_file: Path, text: str) -> None:
    check_outcome(rules_file, text)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.one_of(structure, rules_like))
def test_rules_loader_on_arbitrary_structures(rules_file: Path, doc: object) -> None:
    check_outcome(rules_file, dump(doc))


TEST_LINES = TEST_RULES.splitlines(keepends=True)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, len(TEST_LINES) - 1), st.sampled_from(["delete", "duplicate", "replace"]),
       st.text(alphabet=string.printable, max_size=40))
@example(1, "replace", "?")          # a complex key whose value is a map: found by `deep`
@example(6, "replace", "?")
def test_rules_loader_on_a_valid_file_with_one_line_broken(rules_file: Path, i: int, how: str,
                                                           junk: str) -> None:
    lines = list(TEST_LINES)
    if how == "delete":
        del lines[i]
    elif how == "duplicate":
        lines.insert(i, lines[i])
    else:
        indent = len(lines[i]) - len(lines[i].lstrip(" "))
        lines[i] = " " * indent + junk.replace("\n", " ") + "\n"
    check_outcome(rules_file, "".join(lines))


def test_a_mapping_as_a_key_is_a_positioned_problem(rules_file: Path) -> None:
    lines = list(TEST_LINES)
    lines[1] = "?\n"                     # "meters:" becomes a complex key over the map below
    rules_file.write_text("".join(lines))
    with pytest.raises(RulesError) as err:
        load_rules([rules_file])
    assert [str(p) for p in err.value.problems] == [
        f"{rules_file}:3:3: YAML error: a mapping or a list cannot be a key"]


def test_the_unbroken_file_loads(rules_file: Path) -> None:
    check_outcome(rules_file, TEST_RULES)
    assert len(load_rules([rules_file]).rules) == 10


# ------------------------------------------------------------------------------ webhooks

SECRET = "whsec_fuzz"
RULES = """\
version: 1
meters:
  api_calls: {stripe_event_name: api_calls}
rules:
  - name: all
    match: {path: "/**"}
    usage:
      - {meter: api_calls, quantity: 1, credits: 1}
"""
CREDITS: dict[str, Any] = {
    "packs": {"price_pack": {"credits": "100"}, "price_small": {"credits": "2.5"}},
    "plans": {"price_reset": {"allowance": "50", "mode": "reset"},
              "price_roll": {"allowance": "50", "mode": "rollover", "cap": "80"}},
}
FINAL = {"processed", "ignored", "failed", "waiting_customer"}


class Running:
    """A proxy in its own process, talked to with blocking http.client (hypothesis drives
    these tests synchronously)."""

    def __init__(self, public: int, admin: int) -> None:
        self.public, self.admin_port = public, admin

    def request(self, port: int, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            data = r.read()
        finally:
            conn.close()
        try:
            return r.status, json.loads(data)
        except ValueError:
            return r.status, data

    def admin(self, method: str, path: str, doc: object = None) -> tuple[int, Any]:
        body = None if doc is None else orjson.dumps(doc)
        return self.request(self.admin_port, method, path, body,
                            {"Authorization": f"Bearer {ADMIN_TOKEN}",
                             "Content-Type": "application/json"})

    def post_hook(self, body: bytes, signature: str | None) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if signature is not None:
            headers["Stripe-Signature"] = signature
        return self.request(self.public, "POST", PATH, body, headers)

    def settled(self) -> tuple[Any, Any]:
        """``state()`` once no stored event is waiting to be processed (processing is
        asynchronous: a forged request must be compared with a state that cannot move)."""
        deadline = time.monotonic() + 60
        while True:
            code, pending = self.admin("GET", "/admin/webhooks?status=pending")
            assert code == 200
            if not pending["events"]:
                return self.state()
            assert time.monotonic() < deadline, pending["events"][:3]
            time.sleep(0.05)

    def state(self) -> tuple[Any, Any]:
        code, grants = self.admin("GET", "/admin/customers/acme/grants")
        assert code == 200
        code, events = self.admin("GET", "/admin/webhooks?limit=1000")
        assert code == 200
        return grants, events["events"]


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("hooks")
    cfg = write_config(tmp, "http://127.0.0.1:9", RULES, credits=CREDITS,
                       stripe={"webhook_secret": SECRET})
    proc = ProxyProcess(cfg, tmp / "proxy.log")               # on free ports it binds
    proc.spawn()
    try:
        asyncio.run(proc.wait_ready(30))
        run = Running(int(proc.url.rsplit(":", 1)[1]), int(proc.admin_url.rsplit(":", 1)[1]))
        assert run.admin("POST", "/admin/customers",
                         {"id": "acme", "stripe_customer_id": "cus_acme"})[0] in (200, 201)
        assert run.admin("POST", "/admin/customers/acme/grants", {"credits": "7"})[0] == 201
        yield run
        assert proc.proc is not None and proc.proc.poll() is None, "the proxy died"
    finally:
        proc.ensure_dead()


json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-10**18, 10**18) | st.text(max_size=10)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
        st.one_of(st.sampled_from(["id", "type", "customer", "price", "quantity", "lines",
                                   "data", "object", "metadata", "proration", "period"]),
                  st.text(max_size=5)), kids, max_size=4),
    max_leaves=20)
line = st.fixed_dictionaries(
    {"price": st.one_of(st.sampled_from(["price_pack", "price_small", "price_reset",
                                         "price_roll", "price_other"]),
                        st.fixed_dictionaries({"id": st.sampled_from(["price_pack", "x"])}),
                        json_value)},
    optional={"quantity": st.one_of(st.integers(-3, 10**6), json_value),
              "proration": st.booleans(),
              "period": st.one_of(st.fixed_dictionaries({"start": st.integers(0, 2**40),
                                                         "end": st.integers(0, 2**40)}),
                                  json_value),
              "subscription": st.sampled_from(["sub_1", "sub_2"]),
              "parent": json_value})
stripe_object = st.fixed_dictionaries(
    {"customer": st.one_of(st.just("cus_acme"), st.just("cus_acme"),
                           st.sampled_from(["cus_nobody", "cus_acme"]), json_value),
     "id": st.one_of(st.text(max_size=8).map(lambda s: "in_" + s),
                     st.text(max_size=8).map(lambda s: "cs_" + s), json_value)},
    optional={
              "billing_reason": st.sampled_from(["subscription_create", "subscription_cycle",
                                                 "manual", "subscription_update"]),
              "lines": st.fixed_dictionaries({"data": st.lists(line, max_size=3)},
                                             optional={"has_more": st.booleans()}),
              "line_items": st.fixed_dictionaries({"data": st.lists(line, max_size=3)}),
              "mode": st.sampled_from(["payment", "subscription", None]),
              "payment_status": st.sampled_from(["paid", "unpaid", "no_payment_required"]),
              "invoice": st.one_of(st.none(), st.text(max_size=6)),
              "metadata": st.dictionaries(st.sampled_from(["meterproxy_price",
                                                           "meterproxy_quantity"]),
                                          st.one_of(st.sampled_from(["price_pack", "3", "0"]),
                                                    json_value), max_size=2),
              "subscription": st.sampled_from(["sub_1", None])})
stripe_event = st.fixed_dictionaries(
    {"id": st.text(min_size=1, max_size=12).map(lambda s: "evt_" + s),
     "type": st.one_of(st.sampled_from(["invoice.paid", "checkout.session.completed"]),
                       st.sampled_from(
         ["invoice.paid", "checkout.session.completed", "checkout.session.async_payment_succeeded",
          "customer.subscription.deleted", "invoice.payment_failed", "customer.created"]),
         st.text(max_size=10)),
     "data": st.one_of(st.fixed_dictionaries({"object": stripe_object}),
                       st.fixed_dictionaries({"object": stripe_object}), json_value)},
    optional={"created": st.one_of(st.integers(0, 2**40), json_value),
              "object": st.just("event")})
payload = st.one_of(stripe_event, stripe_event, stripe_event, json_value)


def is_event(doc: object) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("id"), str) \
        and isinstance(doc.get("type"), str)


SEEN: set[str] = set()


# The fixed events (explicit examples of the fuzz test below), with the status each must
# reach: granted, granted, waiting for a customer, failed, ignored (and one not checked).
FIXED: list[tuple[dict[str, Any], str | None]] = [
    ({"id": "evt_pack", "type": "invoice.paid", "data": {"object": {
        "id": "in_1", "customer": "cus_acme",
        "lines": {"data": [{"price": {"id": "price_pack"}, "quantity": 2}]}}}}, "processed"),
    ({"id": "evt_cs", "type": "checkout.session.completed", "data": {"object": {
        "id": "cs_1", "customer": "cus_acme", "mode": "payment", "payment_status": "paid",
        "metadata": {"meterproxy_price": "price_small", "meterproxy_quantity": "3"}}}},
     "processed"),
    ({"id": "evt_nobody", "type": "invoice.paid", "data": {"object": {
        "id": "in_2", "customer": "cus_nobody", "lines": {"data": [{"price": "price_pack"}]}}}},
     "waiting_customer"),
    ({"id": "evt_noobj", "type": "invoice.paid", "data": []}, "failed"),
    ({"id": "evt_future", "type": "customer.created", "created": 2**40}, "ignored"),  # year 36812
    ({"id": "evt_past", "type": "customer.created", "created": -2**40}, None),
]
FIXED_IDS = tuple(str(doc["id"]) for doc, _ in FIXED)


def post_signed(running: Running, doc: object) -> None:
    """POST ``doc`` with a valid signature: an event is acknowledged (a duplicate when its id
    was posted before: ``SEEN``), anything else is a 400 invalid_payload."""
    body = orjson.dumps(doc)
    sig = stripe.WebhookSignature.generate_signature_header(body.decode(), SECRET)
    code, answer = running.post_hook(body, sig)
    if is_event(doc):
        assert isinstance(doc, dict)
        dup = doc["id"] in SEEN
        SEEN.add(doc["id"])
        assert (code, answer) == (200, {"received": True, "duplicate": True} if dup
                                  else {"received": True})
    else:
        assert code == 400 and answer["error"]["type"] == "invalid_payload", (code, answer)


def with_fixed_examples(test: Any) -> Any:
    for doc, _ in reversed(FIXED):           # @example order: the first listed runs first
        test = example(doc)(test)
    return test


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
          max_examples=fuzz_examples(60), deadline=None)
@given(payload)
@with_fixed_examples
@example({"id": 5, "type": "invoice.paid"})
@example([])
def test_signed_webhook_payloads(running: Running, doc: object) -> None:
    n = FUZZ_COUNTS["webhooks, valid signature"] = \
        FUZZ_COUNTS.get("webhooks, valid signature", 0) + 1
    if is_event(doc) and isinstance(doc, dict) and not str(doc["id"]).startswith(FIXED_IDS):
        doc["id"] = f"{doc['id']}#{n}"          # one event per example (shrinking repeats)
    post_signed(running, doc)


def test_signed_webhooks_are_all_processed_and_the_ledger_adds_up(running: Running) -> None:
    """Runs after the fuzzing above: whatever was delivered, every event reaches a final
    status and each grant's remaining amount is consistent with the balance. The fixed
    events are posted again (duplicates after the fuzzing; the only events when this test
    runs on its own, e.g. ``-k signed_webhooks``)."""
    for doc, _ in FIXED:
        post_signed(running, doc)
    grants, events = running.settled()
    # the admin list shows the newest 1000 (the deep profile stores more)
    assert {e["id"] for e in events} <= SEEN and len(events) == min(len(SEEN), 1000)
    assert all(e["status"] in FINAL for e in events)
    for st_ in FINAL:
        FUZZ_COUNTS[f"webhooks, stored events {st_} (newest 1000)"] = \
            sum(e["status"] == st_ for e in events)
    # the fixed examples reached the mapping: granted, waiting, failed
    for doc, status in FIXED:
        if status is not None:
            code, ev = running.admin("GET", f"/admin/webhooks/{doc['id']}")
            assert code == 200 and ev["status"] == status, (doc["id"], code, ev)
    code, future = running.admin("GET", "/admin/webhooks/evt_future")
    assert future["created"] is None                     # beyond year 9999: not kept
    assert {g["source"] for g in grants["grants"]} >= {"admin"}
    assert len(grants["grants"]) >= 3        # the admin grant, the pack, the checkout
    live = [g for g in grants["grants"] if not g["expired"] and not g["voided"]]
    assert grants["balance"] == _sum([g["remaining"] for g in live])
    assert grants["requests_in_flight"] == 0 and grants["reserved"] == "0"


def _sum(values: list[str]) -> str:
    from decimal import Decimal
    total = sum((Decimal(v) for v in values), Decimal(0))
    return format(total.normalize(), "f") if total else "0"


bad_header = st.one_of(
    st.none(),
    st.text(alphabet=string.printable.replace("\r", "").replace("\n", ""), max_size=120),
    st.builds(lambda t, v: f"t={t},v1={v}", st.integers(0, 2**40),
              st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)),
)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
          max_examples=fuzz_examples(60), deadline=None)
@given(payload, st.one_of(
    bad_header.map(lambda h: ("header", h)),
    st.just(("wrong secret", None)),
    st.just(("stale", None)),
    payload.map(lambda other: ("other body", other))))
def test_unsigned_or_forged_webhooks_change_nothing(running: Running, doc: object,
                                                     forged: tuple[str, object]) -> None:
    FUZZ_COUNTS["webhooks, forged"] = FUZZ_COUNTS.get("webhooks, forged", 0) + 1
    body = orjson.dumps(doc)
    how, extra = forged
    if how == "header":
        sig = extra if extra is None or isinstance(extra, str) else None
    elif how == "wrong secret":
        sig = stripe.WebhookSignature.generate_signature_header(body.decode(), "whsec_other")
    elif how == "stale":
        sig = stripe.WebhookSignature.generate_signature_header(
            body.decode(), SECRET, timestamp=int(time.time()) - 3600)
    else:
        other = orjson.dumps(extra)
        if other == body:
            other += b" "
        sig = stripe.WebhookSignature.generate_signature_header(other.decode(), SECRET)
    before = running.settled()
    code, answer = running.post_hook(body, sig)
    assert code == 400, (code, answer)
    if isinstance(answer, bytes):       # a control character: refused by the HTTP parser
        assert how == "header" and isinstance(extra, str) and \
            any(c in extra for c in "\t\x0b\x0c"), answer
    else:
        assert answer["error"]["type"] == "invalid_signature", answer
    assert running.state() == before        # nothing stored, no credit changed
