"""``workers: N``: N processes of one sidecar on one port, each a fleet member, supervised
(a crashed worker restarts; SIGTERM drains all); refused on SQLite."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import pytest

from proxy import config
from proxy.errors import ConfigError
from tests.conftest import write_config
from tests.fleet.members import admin_call, customer_key, fleet_of
from tests.helpers import wait_until


def _children(pid: int) -> set[int]:
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                out.add(int(d))
    return out


def _alive(pids: set[int]) -> set[int]:
    out = set()
    for k in pids:
        try:
            if "zombie" not in Path(f"/proc/{k}/status").read_text():
                out.add(k)
        except OSError:
            pass
    return out


def test_workers_on_sqlite_are_refused_with_the_reason(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "http://127.0.0.1:1", workers=2)
    with pytest.raises(ConfigError) as exc:
        config.load(cfg)
    assert "workers > 1 needs storage.backend: postgres" in str(exc.value)
    assert "credit book" in str(exc.value) and "Stripe flusher" in str(exc.value)


async def test_two_workers_share_a_port_restart_when_killed_and_drain_on_sigterm(
        tmp_path: Path, upstream: str) -> None:
    async with fleet_of(tmp_path, upstream) as fleet:
        m = fleet.add("sc", workers=2)
        await m.proc.wait_ready(60)
        sup = m.proc.proc
        assert sup is not None
        workers = await wait_until(lambda: _children(sup.pid), ok=lambda c: len(c) == 2,
                                   timeout=20, what="two worker processes")
        async with aiohttp.ClientSession() as s:
            key = await customer_key(s, m)
            await asyncio.sleep(1.0)                  # the key reaches both workers

            async def burst(n: int) -> list[int]:
                async def one() -> int:
                    async with aiohttp.ClientSession() as c, c.get(   # a new connection each
                            m.url + "/v1/items",
                            headers={"Authorization": f"Bearer {key}"}) as r:
                        await r.read()
                        return r.status
                return list(await asyncio.gather(*(one() for _ in range(n))))
            assert await burst(40) == [200] * 40
            view = await wait_until(lambda: admin_call(s, m, "GET", "/admin/fleet"),
                                    ok=lambda v: {x["id"]: x["shipped_seq"] > 0
                                                  for x in v["members"]}
                                    == {"sc-w1": True, "sc-w2": True}, timeout=10,
                                    what="both workers served and shipped usage")
            assert view["member_id"] in ("sc-w1", "sc-w2")
            # a crashed worker is replaced
            victim = min(workers)
            os.kill(victim, signal.SIGKILL)
            await wait_until(lambda: _children(sup.pid),
                             ok=lambda c: len(c) == 2 and victim not in c, timeout=20,
                             what="the killed worker restarted")
            log = m.proc.log
            await wait_until(lambda: log.read_text().count("meterproxy listening on"),
                             ok=lambda n: n == 3, timeout=30, what="the new worker listening")
            assert await burst(20) == [200] * 20
        # SIGTERM drains every worker; the supervisor exits 0 and leaves no process behind
        kids = _children(sup.pid)
        assert m.proc.terminate(60) == 0
        assert not _alive(kids)


async def _refused(url: str) -> bool:
    """True when nothing accepts connections on ``url``'s port any more."""
    try:
        async with aiohttp.ClientSession() as s, s.get(url + "/healthz") as r:
            await r.read()
            return False
    except aiohttp.ClientConnectionError:
        return True


async def test_a_sigkilled_supervisor_takes_its_workers_with_it(tmp_path: Path,
                                                               upstream: str) -> None:
    async with fleet_of(tmp_path, upstream) as fleet:
        m = fleet.add("sk", workers=2)
        await m.proc.wait_ready(60)
        sup = m.proc.proc
        assert sup is not None
        workers = await wait_until(lambda: _children(sup.pid), ok=lambda c: len(c) == 2,
                                   timeout=20, what="two worker processes")
        log = m.proc.log
        await wait_until(lambda: log.read_text().count("meterproxy listening on"),
                         ok=lambda n: n == 2, timeout=30, what="both workers serving")
        assert not await _refused(m.url)
        sup.kill()                    # no signal is passed on: the kernel must do it
        sup.wait()
        await wait_until(lambda: _alive(workers), ok=lambda alive: not alive, timeout=60,
                         what="both workers exited after their supervisor was killed")
        assert await _refused(m.url)
        assert await _refused(m.admin)
        # they drained (SIGTERM from the kernel), they were not killed
        assert log.read_text().count("shutting down: draining requests") == 2
