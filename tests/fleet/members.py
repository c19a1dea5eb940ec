"""Real fleet members for acceptance tests: ``python -m proxy serve --config`` subprocesses,
each with its own journal file and ports, all on one fresh PostgreSQL database."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import ADMIN_TOKEN, free_port, write_config
from tests.proxy_process import ProxyProcess
from tests.store_pg.backend import fresh_database

AH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

# short lifetimes so expiry and failover fit a test (the defaults are 30 s and 10 s)
FAST_FLEET = {"lease_ttl": "3s", "reaper_grace": "1s", "leader_ttl": "3s",
              "ship_interval": "200ms", "key_poll_interval": "200ms"}


# health (no key) and two credit-charging rules: /v1/stream holds 1 credit and costs
# `units` from the response; everything else costs 1 credit
CREDIT_RULES = """\
version: 1
meters:
  api_calls: {stripe_event_name: api_calls}
  units: {stripe_event_name: units}
rules:
  - name: health
    match: {path: /healthz}
    auth: none
  - name: stream
    match: {path: /v1/stream}
    usage:
      - {meter: units, quantity: response.json.units, credits: 1, estimate: 1}
  - name: items
    match: {path: "/**"}
    usage:
      - {meter: api_calls, quantity: 1, credits: 1}
"""


class RunningMember:
    def __init__(self, name: str, proc: ProxyProcess) -> None:
        self.name = name
        self.proc = proc

    @property
    def url(self) -> str:
        """The public URL (once started: the ports are the process's, ``ProxyProcess``)."""
        assert self.proc.url, f"member {self.name} has not started"
        return self.proc.url

    @property
    def admin(self) -> str:
        assert self.proc.admin_url, f"member {self.name} has not started"
        return self.proc.admin_url


class FleetOfMembers:
    def __init__(self, tmp: Path, upstream: str, dsn: str, rules_text: str | None,
                 fleet: dict[str, Any], stripe: dict[str, Any] | None,
                 extra: dict[str, Any] | None = None,
                 storage: dict[str, Any] | None = None) -> None:
        self.tmp = tmp
        self.extra = extra or {}
        self.storage = storage or {}
        self.upstream = upstream
        self.dsn = dsn
        self.rules_text = rules_text
        self.fleet = fleet
        self.stripe = stripe
        self.members: list[RunningMember] = []

    def add(self, name: str, workers: int = 1, member_id: str | None = None,
            journal_of: str | None = None) -> RunningMember:
        """Spawn a member (``await m.proc.wait_ready()`` before using its URLs). It binds
        free ports itself; ``workers`` > 1 share one port, so theirs are picked here.
        ``name`` is its directory (its journal); ``member_id`` its fleet id (default:
        ``name``; another name with the same id is that member restarted on a new journal).
        ``journal_of``: the name of a stopped member whose directory (journal) it uses
        instead (its volume reused by a new process)."""
        d = self.tmp / (journal_of or name)
        d.mkdir(exist_ok=journal_of is not None)
        port, aport = (free_port(), free_port()) if workers > 1 else (0, 0)
        extra: dict[str, Any] = dict(self.extra)
        if workers > 1:
            extra["workers"] = workers
        if self.rules_text is not None:
            extra["rules_text"] = self.rules_text
        if self.stripe is not None:
            extra["stripe"] = self.stripe
        cfg = write_config(d, self.upstream, listen=f"127.0.0.1:{port}",
                           admin_listen=f"127.0.0.1:{aport}",
                           storage={"backend": "postgres", "dsn": self.dsn,
                                    "path": str(d / "journal.db"), "pool_size": 4,
                                    **self.storage},
                           fleet={**FAST_FLEET, **self.fleet, "member_id": member_id or name},
                           **extra)
        m = RunningMember(name, ProxyProcess(cfg, d / ("proxy.log" if journal_of is None
                                                       else f"proxy-{name}.log")))
        self.members.append(m)
        m.proc.spawn()
        return m

    async def start(self, names: list[str]) -> list[RunningMember]:
        ms = [self.add(n) for n in names]
        await asyncio.gather(*(m.proc.wait_ready(60) for m in ms))
        return ms

    async def stop_all(self, timeout: float = 60.0) -> None:
        """SIGTERM every running member at once, wait for them off the event loop (a relay
        the test runs on this loop keeps serving their shutdown), SIGKILL what is left."""
        running = [m.proc.proc for m in self.members
                   if m.proc.proc is not None and m.proc.proc.poll() is None]
        for p in running:
            p.send_signal(signal.SIGTERM)
        for p in running:
            try:
                await asyncio.to_thread(p.wait, timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                await asyncio.to_thread(p.wait)
        for m in self.members:
            m.proc.ensure_dead()


@asynccontextmanager
async def fleet_of(tmp: Path, upstream: str, *, rules_text: str | None = None,
                   fleet: dict[str, Any] | None = None,
                   stripe: dict[str, Any] | None = None,
                   extra: dict[str, Any] | None = None,
                   storage: dict[str, Any] | None = None) -> AsyncIterator[FleetOfMembers]:
    """``extra``: more config sections for every member (e.g. ``alerts``); ``storage``:
    more ``storage`` settings for every member (e.g. ``durability``)."""
    async with fresh_database() as dsn:
        f = FleetOfMembers(tmp, upstream, dsn, rules_text, fleet or {}, stripe, extra, storage)
        try:
            yield f
        finally:
            await f.stop_all()


async def admin_call(s: aiohttp.ClientSession, m: RunningMember, method: str, path: str,
                     json: Any = None, expect: tuple[int, ...] = (200, 201)) -> Any:
    async with s.request(method, m.admin + path, json=json, headers=AH) as r:
        body = await r.json(content_type=None)
        assert r.status in expect, (m.name, method, path, r.status, body)
        return body


async def customer_key(s: aiohttp.ClientSession, m: RunningMember, cid: str = "cust") -> str:
    """A new customer ``cid`` (billed, no credits) made on ``m``, and a new key of it."""
    await admin_call(s, m, "POST", "/admin/customers", {"id": cid})
    return str((await admin_call(s, m, "POST", f"/admin/customers/{cid}/keys"))["key"])


async def wait_status(s: aiohttp.ClientSession, url: str, key: str, status: int,
                      within: float) -> float:
    """Seconds until ``GET url`` with ``key`` answers ``status`` (polling every 20 ms);
    fails after ``within`` seconds."""
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < within:
        async with s.get(url, headers={"Authorization": f"Bearer {key}"}) as r:
            await r.read()
            last = r.status
            if r.status == status:
                return time.monotonic() - t0
        await asyncio.sleep(0.02)
    raise AssertionError(f"{url}: still {last} after {within}s, expected {status}")
