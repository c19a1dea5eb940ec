"""Dispute tools: the events export against the ledger, ``meterproxy explain`` and
``meterproxy simulate`` (what-if re-rating), on real traffic through a real proxy, plus unit
tests of the pure re-rating core."""

from __future__ import annotations

import csv
import io
import time
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from ruamel.yaml import YAML

from proxy import cli
from proxy.rules import RuleSet
from proxy.tools.explain import load_rules_text
from proxy.tools.simulate import AuditRow, rerate
from proxy.units import to_micro
from tests.conftest import ROOT, Proxy, ProxyFactory

EXAMPLE = (ROOT / "rules" / "example.yaml").read_text()

# per customer: (JSON chats, SSE chats, GET /v1/items). Each chat is one api_call and each
# item call one: 20 and 40 api_calls, multiples of 20, so 0.05 cents a call is whole cents
TRAFFIC = {"acme": (2, 2, 16), "globex": (3, 1, 36)}


def period() -> tuple[int, int]:
    start = int(time.time() // 60) * 60 - 3600
    return start, start + 7200


async def drive(p: Proxy) -> dict[str, str]:
    keys = {}
    for cid, (plain, sse, items) in TRAFFIC.items():
        key = keys[cid] = await p.customer_with_key(cid, overage="bill")
        h = {"Authorization": f"Bearer {key}"}
        for i in range(plain + sse):
            body = {"prompt_tokens": 10 + i, "completion_tokens": 20, "stream": i >= plain}
            async with p.session.post(p.url + "/v1/chat/completions", json=body, headers=h) as r:
                assert r.status == 200
                await r.read()
        for _ in range(items):
            async with p.session.get(p.url + "/v1/items", headers=h) as r:
                assert r.status == 200
                await r.read()
    return keys


async def export_csv(p: Proxy, cid: str, start: int, end: int) -> list[dict[str, str]]:
    async with p.session.get(f"{p.admin_url}/admin/customers/{cid}/events",
                             params={"format": "csv", "from": str(start), "to": str(end)},
                             headers=p.admin_headers) as r:
        assert r.status == 200
        return list(csv.DictReader(io.StringIO(await r.text())))


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def doubled(text: str) -> str:
    """The same rules with every price amount doubled."""
    yaml = YAML()
    data = yaml.load(text)
    for meter in data["meters"].values():
        price = meter.get("price")
        if price is None:
            continue
        for obj in [price, *price.get("tiers", [])]:
            for k in ("unit_amount", "flat_amount"):
                if k in obj:
                    obj[k] = int(obj[k]) * 2
            for k in ("unit_amount_decimal", "flat_amount_decimal"):
                if k in obj:
                    obj[k] = str(Decimal(str(obj[k])) * 2)
    buf = io.StringIO()
    yaml.dump(data, buf)
    return buf.getvalue()


# ------------------------------------------------------------------ end to end


async def test_export_explain_and_simulate(make_proxy: ProxyFactory, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    p = await make_proxy(rules_text=EXAMPLE)
    await drive(p)
    start, end = period()
    db = p.db()    # materializes the journal into the audit and usage_minute tables
    version = p.server.rt.rules.version
    dbfile = str(tmp_path / "meter.db")
    cfg = str(tmp_path / "meterproxy.yaml")

    # (1) the CSV export's per-meter totals equal the ledger's for the same period
    for cid in TRAFFIC:
        rows = await export_csv(p, cid, start, end)
        csv_q: dict[str, int] = defaultdict(int)
        csv_b: dict[str, int] = defaultdict(int)
        for r in rows:
            csv_q[r["meter"]] += to_micro(r["quantity"])
            csv_b[r["meter"]] += to_micro(r["billable"])
        ledger = {m: (q, b) for m, q, b in db.execute(
            "SELECT meter, SUM(quantity), SUM(billable) FROM usage_minute WHERE customer_id=?"
            " AND minute>=? AND minute<? GROUP BY meter", (cid, start, end))}
        assert {m: (csv_q[m], csv_b[m]) for m in csv_q} == ledger
        plain, sse, items = TRAFFIC[cid]
        assert ledger["api_calls"][0] == (plain + sse + items) * 1_000_000

    # (2) explain on request ids from that CSV names the rule and the version
    rows = await export_csv(p, "acme", start, end)
    chat = next(r for r in rows if r["rule"] == "chat")
    item = next(r for r in rows if r["rule"] == "everything-else")
    rc, out, _ = run_cli(capsys, "explain", chat["request_id"], "--db", dbfile)
    assert rc == 0
    assert f"rule      chat   (rules version {version}, {tmp_path / 'rules.yaml'}:" in out
    assert "POST /v1/chat/completions   status 200" in out
    assert "-> chat" in out and "first rule that matches by method and path" in out
    assert "quantity preset openai_chat" in out and "credits/unit 0.001" in out
    assert "customer  acme" in out
    rc, out, _ = run_cli(capsys, "explain", item["request_id"], "--db", dbfile, "--format", "json")
    ex = orjson.loads(out)
    assert (ex["rule"], ex["rules_version"], ex["status"]) == ("everything-else", version, 200)
    assert ex["match"] == {"methods": "any", "path": "/**"}
    assert ex["why"]["same_rule"] and ex["count_when"]["billable"]
    assert ex["usage"][0]["meter"] == "api_calls" and ex["usage"][0]["recorded"]["quantity"] == "1"
    line = next(i for i, t in enumerate(EXAMPLE.splitlines(), 1) if "name: everything-else" in t)
    assert ex["defined_at"] == f"{tmp_path / 'rules.yaml'}:{line}"
    rc, out, err = run_cli(capsys, "explain", "no-such-request", "--db", dbfile)
    assert rc == 1 and out == "" and "no metered request with id 'no-such-request'" in err

    # (3) simulate with every price doubled: exactly double, customer by customer, line by line
    new = tmp_path / "doubled.yaml"
    new.write_text(doubled(EXAMPLE))
    rc, out, _ = run_cli(capsys, "simulate", "--config", cfg, "--db", dbfile, "--rules", str(new),
                         "--from", str(start), "--to", str(end), "--format", "json")
    assert rc == 0
    report = orjson.loads(out)
    assert report["old"]["version"] == version and report["ledger_mismatch"] == []
    assert [c["customer"] for c in report["customers"]] == sorted(TRAFFIC)
    for c in report["customers"]:
        assert (c["rerouted"], c["unmetered"], c["uncertain"], c["missing"]) == (0, 0, 0, 0)
        lines = {ln["meter"]: ln for ln in c["lines"]}
        assert set(lines) == {"api_calls", "llm_tokens", "gb_processed"}
        assert lines["api_calls"]["old_minor"] > 0 and lines["llm_tokens"]["old_minor"] == 500
        for ln in c["lines"]:
            assert ln["new_billable"] == ln["old_billable"]
            assert ln["new_minor"] == 2 * ln["old_minor"]
            assert Decimal(ln["new_exact_minor"]) == 2 * Decimal(ln["old_exact_minor"])
        t = c["totals"]["usd"]
        assert t["new_minor"] == 2 * t["old_minor"] and t["delta_minor"] == t["old_minor"]
    acme = next(c for c in report["customers"] if c["customer"] == "acme")
    assert acme["totals"]["usd"] == {"old_minor": 501, "new_minor": 1002, "old": "5.01",
                                     "new": "10.02", "delta_minor": 501, "delta": "+5.01"}
    rc, out, _ = run_cli(capsys, "simulate", "--config", cfg, "--rules", str(new),
                         "--from", str(start), "--to", str(end), "--customer", "acme")
    assert rc == 0
    assert "acme      TOTAL" in out and "globex" not in out
    assert [ln.split()[-2:] for ln in out.splitlines() if "TOTAL" in ln] == [["+5.01", "usd"]]

    # (4) rerouting: chat moves to a renamed rule (its tokens kept as recorded, api_calls
    # recomputed from the new constant), items get a rule of their own at 3 calls each
    reroute = tmp_path / "reroute.yaml"
    reroute.write_text(EXAMPLE.replace("  - name: chat\n", "  - name: chat-v2\n").replace(
        "      - meter: api_calls\n        quantity: 1\n",
        "      - meter: api_calls\n        quantity: 2\n").replace(
        "  # Everything else", "  - name: items\n    match: {methods: [GET], path: /v1/items}\n"
                            "    usage:\n      - {meter: api_calls, quantity: 3}\n\n"
                            "  # Everything else"))
    rc, out, _ = run_cli(capsys, "simulate", "--config", cfg, "--rules", str(reroute),
                         "--from", str(start), "--to", str(end), "--format", "json")
    assert rc == 0
    report = orjson.loads(out)
    for c in report["customers"]:
        plain, sse, items = TRAFFIC[c["customer"]]
        assert c["rerouted"] == plain + sse + items and c["unmetered"] == 0
        assert (c["recomputed"], c["kept"]) == (plain + sse + items, plain + sse)
        lines = {ln["meter"]: ln for ln in c["lines"]}
        calls = 2 * (plain + sse) + 3 * items
        assert lines["api_calls"]["new_billable"] == str(calls)
        assert lines["api_calls"]["new_minor"] == int(Decimal(calls) * Decimal("0.05") + Decimal("0.5"))
        assert lines["llm_tokens"]["new_billable"] == lines["llm_tokens"]["old_billable"]
    assert {(r["from_rule"], r["to_rule"]) for r in report["reroutes"]} == \
        {("chat", "chat-v2"), ("everything-else", "items")}
    db.close()


async def test_explain_flags_and_missing_version(make_proxy: ProxyFactory, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    p = await make_proxy()     # the shared test rules: /v1/echo reads request.json.n
    key = await p.customer_with_key("flaggy")
    async with p.session.post(p.url + "/v1/echo", data=b"not json",
                              headers={"Authorization": f"Bearer {key}",
                                       "Content-Type": "application/json",
                                       "X-Request-Id": "req-unreadable-1"}) as r:
        assert r.status == 200
        await r.read()
    dbfile = str(tmp_path / "meter.db")
    p.db().close()
    rc, out, _ = run_cli(capsys, "explain", "req-unreadable-1", "--db", dbfile)
    assert rc == 0
    assert "rule      echo" in out
    assert "quantity request.json.n" in out and "on_unreadable 7" in out
    assert "flag unreadable:" in out and "was recorded instead (7)" in out
    # a database from before rules versions were kept: say so, show what the audit has
    db = p.db()
    with db:
        db.execute("DELETE FROM rules_versions")
    db.close()
    rc, out, _ = run_cli(capsys, "explain", "req-unreadable-1", "--db", dbfile)
    assert rc == 0
    assert "text of this rules version was not recorded" in out
    assert "recorded quantity 7" in out and "match " not in out


# ------------------------------------------------------------------ the pure re-rating core

PRICED = """\
version: 1
meters:
  calls: {stripe_event_name: calls, price: {currency: usd, unit_amount: 10}}
  tokens: {stripe_event_name: tokens, price: {currency: usd, unit_amount: 1}}
rules:
  - name: premium
    match: {path: /v1/items, headers: {x-tier: premium}}
    usage:
      - {meter: calls, quantity: 5}
  - name: chat
    match: {methods: [POST], path: /v1/chat}
    count_when: [2xx, 4xx]
    usage:
      - {meter: tokens, preset: openai_chat}
      - {meter: calls, quantity: 1}
  - name: everything-else
    match: {path: "/**"}
    usage:
      - {meter: calls, quantity: 1}
"""


def rules(text: str) -> RuleSet:
    return load_rules_text([("rules.yaml", text)])[0]


def row(rid: str, rule: str, meter: str, q: int, *, billable: int | None = None,
        method: str = "GET", path: str = "/v1/items", status: int = 200,
        version: str = "v-old", customer: str = "c1") -> AuditRow:
    return AuditRow(rid, 1000, customer, rule, version, status, meter, q * 10**6,
                    (q * 10**6) if billable is None else billable, method, path)


def test_rerate_same_rules_is_identity() -> None:
    old = rules(PRICED)
    data = [row("a", "premium", "calls", 5), row("b", "everything-else", "calls", 1),
            row("c", "chat", "tokens", 42, method="POST", path="/v1/chat"),
            row("c", "chat", "calls", 1, method="POST", path="/v1/chat")]
    sim = rerate(data, old, old, {"v-old": old})
    c = sim.customers["c1"]
    assert (c.requests, c.rerouted, c.unmetered, c.uncertain) == (3, 0, 0, 0)
    assert c.old_billable == c.new_billable == {"calls": 7 * 10**6, "tokens": 42 * 10**6}
    assert c.old_charges == c.new_charges == {"calls": 70, "tokens": 42}


def test_rerate_header_conditions_are_inferred_not_guessed() -> None:
    old = rules(PRICED)
    # "premium" was chosen: its header condition held. "everything-else" on the same path:
    # premium's condition did not hold, so a new rule with that condition cannot match.
    data = [row("a", "premium", "calls", 5), row("b", "everything-else", "calls", 1)]
    moved = rules(PRICED.replace("x-tier: premium", "x-tier: gold"))
    sim = rerate(data, old, moved, {"v-old": old})
    c = sim.customers["c1"]
    # "premium" now needs another header value: not known for either request, so not
    # matched, and both are counted uncertain
    assert (c.rerouted, c.uncertain) == (1, 2)
    assert c.new_billable == {"calls": 2 * 10**6}
    assert sim.reroutes == {("premium", "everything-else"): 1}
    # the version that priced the rows is unknown: the old rules stand in for it
    same = rerate(data, old, old, {})
    assert (same.customers["c1"].rerouted, same.customers["c1"].uncertain) == (0, 0)


def test_rerate_recomputes_constants_keeps_measured_and_keeps_credit_coverage() -> None:
    old = rules(PRICED)
    new = rules(PRICED.replace("- {meter: calls, quantity: 1}\n  - name: everything-else",
                               "- {meter: calls, quantity: 4}\n  - name: everything-else"))
    # 1 call, 0.6 of it covered by credits; 42 tokens, 2 covered
    data = [row("c", "chat", "tokens", 42, billable=40 * 10**6, method="POST", path="/v1/chat"),
            row("c", "chat", "calls", 1, billable=400_000, method="POST", path="/v1/chat")]
    c = rerate(data, old, new).customers["c1"]
    assert (c.recomputed, c.kept, c.missing, c.rerouted) == (1, 1, 0, 0)
    assert c.new_billable == {"tokens": 40 * 10**6, "calls": 4 * 10**6 - 600_000}
    assert c.new_charges == {"calls": 30, "tokens": 40}     # 3.4 whole calls -> 3 x 10


def test_rerate_rerouted_dropped_unmetered_and_unrecorded_path() -> None:
    old = rules(PRICED)
    new = rules("""\
version: 1
meters:
  calls: {stripe_event_name: calls, price: {currency: usd, unit_amount: 20}}
rules:
  - name: chat2
    match: {methods: [POST], path: /v1/chat}
    usage:
      - {meter: calls, quantity: 2}
  - name: premium
    match: {path: /v1/items}
    usage:
      - {meter: calls, quantity: 5}
""")
    data = [row("c", "chat", "tokens", 42, method="POST", path="/v1/chat"),
            row("c", "chat", "calls", 1, method="POST", path="/v1/chat"),
            # a 404 chat: billed by the old count_when [2xx, 4xx], not by the new default [2xx]
            row("d", "chat", "tokens", 0, method="POST", path="/v1/chat", status=404),
            row("d", "chat", "calls", 1, method="POST", path="/v1/chat", status=404),
            # no rule of the new file matches this path
            row("e", "everything-else", "calls", 1, path="/other"),
            # method and path not recorded (old audit rows): the rule of the same name
            row("f", "premium", "calls", 5, method="", path="")]
    sim = rerate(data, old, new, {"v-old": old})
    c = sim.customers["c1"]
    assert (c.requests, c.rerouted, c.unmetered, c.uncertain) == (4, 2, 2, 1)
    assert c.dropped == {"tokens": 42 * 10**6}
    assert c.new_billable == {"calls": 7 * 10**6}
    assert c.new_charges == {"calls": 140}
    assert c.old_charges == {"calls": 80, "tokens": 42}
    assert sim.reroutes == {("chat", "chat2"): 2, ("everything-else", "(no rule)"): 1}
