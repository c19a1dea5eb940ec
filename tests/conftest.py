"""Shared fixtures: a real example upstream and a real proxy on loopback ephemeral ports,

with real SQLite files under tmp_path. Nothing of our own is mocked."""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import settings
from ruamel.yaml import YAML

from proxy import config as config_mod
from proxy.app import Server, start
from proxy.demo.upstream import build_app
from tests.ci_guard import in_ci, pytest_runtest_makereport  # noqa: F401  (the hook: no skips in CI)
from tests.fleet.tcp_cut import CuttableRelay
from tests.servers import serve

pytest_plugins = ["tests.stripe_double.fixture"]


# Hypothesis profiles (docs/testing.md). ``dev`` is the local default; ``ci`` (the default
# under CI=true) runs more examples and is derandomized, so a fresh clone without a
# .hypothesis database explores the same examples on every run; ``deep`` is for long local
# runs. Fuzz tests through a running proxy scale their own counts with fuzz_examples().
PROFILES = {"dev": 50, "ci": 100, "deep": 2000}
settings.register_profile("dev", max_examples=PROFILES["dev"], deadline=None)
settings.register_profile("ci", max_examples=PROFILES["ci"], deadline=None, derandomize=True,
                          print_blob=True)
settings.register_profile("deep", max_examples=PROFILES["deep"], deadline=None)
# scripts/mutation: the dev example count, derandomized, so a mutant's verdict is repeatable
settings.register_profile("mutation", max_examples=PROFILES["dev"], deadline=None,
                          derandomize=True, database=None)
settings.register_profile("fast", parent=settings.get_profile("dev"))   # former name
HYPOTHESIS_PROFILE = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if in_ci() else "dev")
settings.load_profile(HYPOTHESIS_PROFILE)


FUZZ_COUNTS: dict[str, int] = {}   # examples tried per fuzz target in this run

# the soak profile (docs/testing.md): the long acceptance runs at their full size
SOAK = bool(os.environ.get("METERPROXY_SOAK"))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """An xdist worker hands its fuzz counts to the controller (``pytest_testnodedown``)."""
    if (out := getattr(session.config, "workeroutput", None)) is not None:
        out["fuzz_counts"] = dict(FUZZ_COUNTS)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """The controller sums the workers' fuzz counts (each test ran in one worker)."""
    for name, n in getattr(node, "workeroutput", {}).get("fuzz_counts", {}).items():
        FUZZ_COUNTS[name] = FUZZ_COUNTS.get(name, 0) + n


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FUZZ_COUNTS:
        terminalreporter.section("fuzz examples")
        terminalreporter.write_line(f"hypothesis profile: {HYPOTHESIS_PROFILE}")
        for name, n in sorted(FUZZ_COUNTS.items()):
            terminalreporter.write_line(f"{name}: {n}")


def fuzz_examples(dev: int) -> int:
    """Examples for a fuzz test that is slower than a pure property (it talks to a running
    proxy): ``dev`` locally, scaled up like the profile's max_examples under ci / deep."""
    return max(dev, dev * settings.default.max_examples // PROFILES["dev"])


ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "test-admin-token"

TEST_RULES = """\
version: 1
meters:
  api_calls: {stripe_event_name: api_calls}
  llm_tokens: {stripe_event_name: llm_tokens}
  bytes_in: {stripe_event_name: bytes_in}
  units: {stripe_event_name: units}
rules:
  - name: health
    match: {path: /healthz}
    auth: none
  - name: chat
    match: {methods: [POST], path: /v1/chat/completions}
    usage:
      - {meter: llm_tokens, preset: openai_chat}
      - {meter: api_calls, quantity: 1}
  - name: messages
    match: {methods: [POST], path: /v1/messages}
    usage:
      - {meter: llm_tokens, preset: anthropic_messages}
  - name: responses
    match: {methods: [POST], path: /v1/responses}
    usage:
      - {meter: llm_tokens, preset: openai_responses}
  - name: stream
    match: {path: /v1/stream}
    usage:
      - {meter: units, quantity: response.json.units}
  - name: echo
    match: {methods: [POST], path: /v1/echo}
    usage:
      - {meter: units, quantity: request.json.n, on_unreadable: 7}
      - {meter: bytes_in, quantity: request.bytes}
  - name: upload
    match: {methods: [POST], path: /v1/upload}
    usage:
      - {meter: bytes_in, quantity: request.bytes}
  - name: items-errors-too
    match: {path: /v1/items, query: {count_all: "*"}}
    count_when: [2xx, 4xx]
    usage:
      - {meter: api_calls, quantity: 1}
  - name: infer
    match: {methods: [POST], path: "/v1/models/{model}/infer", params: {model: "premium-*"}}
    usage:
      - {meter: api_calls, quantity: 10}
  - name: everything-else
    match: {path: "/**"}
    usage:
      - {meter: api_calls, quantity: 1}
"""


def free_port() -> int:
    """A port that was free a moment ago: another process may take it before it is bound.
    Prefer what tests/ports.py says (port 0, ``held_port``, ``with_free_ports``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp: Path, upstream_url: str, rules_text: str = TEST_RULES,
                 **overrides: Any) -> Path:
    rules = tmp / "rules.yaml"
    if not rules.exists():
        rules.write_text(rules_text)
    cfg: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "upstream": {"url": upstream_url, "connect_timeout": "2s", "read_timeout": "5s"},
        "rules": str(rules),
        "storage": {"path": str(tmp / "meter.db"), "durability": "strict",
                    "commit_interval": "10ms", "fail_mode": "closed"},
        "admin": {"token": ADMIN_TOKEN},
        "stripe": {"sink": "dry_run", "flush_interval": "1h"},
    }
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    path = tmp / "meterproxy.yaml"
    with path.open("w") as fh:
        YAML().dump(cfg, fh)
    return path


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    async with serve(build_app()) as url:
        yield url


class Proxy:
    """A running in-process proxy plus helpers to talk to it."""

    def __init__(self, server: Server, session: aiohttp.ClientSession, tmp: Path) -> None:
        self.server = server
        self.session = session
        self.tmp = tmp
        self.url = f"http://127.0.0.1:{server.public_port}"
        self.admin_url = f"http://127.0.0.1:{server.admin_port}"
        self.admin_headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    async def admin(self, method: str, path: str, json: Any = None,
                    expect: int | None = None) -> Any:
        async with self.session.request(method, self.admin_url + path, json=json,
                                        headers=self.admin_headers) as r:
            body = await r.json(content_type=None) if r.content_type == "application/json" \
                else await r.text()
            if expect is not None:
                assert r.status == expect, (r.status, body)
            return body

    async def customer_with_key(self, cid: str, **fields: Any) -> str:
        await self.admin("POST", "/admin/customers", {"id": cid, **fields})
        created = await self.admin("POST", f"/admin/customers/{cid}/keys", {"name": "t"},
                                   expect=201)
        return str(created["key"])

    def db(self) -> sqlite3.Connection:
        self.server.rt.store.materialize()   # strict mode journals rows first
        return sqlite3.connect(str(self.tmp / "meter.db"))

    def ledger_totals(self) -> dict[tuple[str, str], int]:
        with self.db() as c:
            return {(cust, m): q for cust, m, q in c.execute(
                "SELECT customer_id, meter, SUM(quantity) FROM usage_minute GROUP BY 1, 2")}


ProxyFactory = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def make_proxy(tmp_path: Path, upstream: str) -> AsyncIterator[ProxyFactory]:
    started: list[Proxy] = []
    session = aiohttp.ClientSession()

    async def factory(upstream_url: str | None = None, rules_text: str = TEST_RULES,
                      **overrides: Any) -> Proxy:
        path = write_config(tmp_path, upstream_url or upstream, rules_text, **overrides)
        server = await start(config_mod.load(path))
        p = Proxy(server, session, tmp_path)
        started.append(p)
        return p

    yield factory
    for p in started:
        await p.server.shutdown()
    await session.close()
    await asyncio.sleep(0)


@pytest.fixture
async def proxy(make_proxy: ProxyFactory) -> Proxy:
    return await make_proxy()


@pytest.fixture
async def relay() -> AsyncIterator[CuttableRelay]:
    """A TCP relay to PostgreSQL whose connections a test can cut (tests/fleet/tcp_cut.py)."""
    r = CuttableRelay()
    await r.start()
    yield r
    await r.stop()
