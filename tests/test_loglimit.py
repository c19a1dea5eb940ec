"""Logs of unauthenticated failures are rate-limited (proxy/loglimit.py): forged webhooks, bad
admin tokens and unknown API keys write a bounded number of lines, and every failure is still
counted in meterproxy_auth_failures_total."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import aiohttp
import pytest
import stripe

from proxy import config as config_mod
from proxy import metrics
from proxy.app import start
from proxy.loglimit import LogLimiter
from proxy.webhooks import PATH as WEBHOOK_PATH
from tests.conftest import Proxy, ProxyFactory, write_config
from tests.helpers import wait_until

LOG = logging.getLogger("meterproxy.test_loglimit")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _messages(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger]


def test_first_n_per_interval_then_one_summary(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOG.name)
    clock = Clock()
    lim = LogLimiter(LOG, burst=3, interval=10.0, clock=clock)
    logged = [lim.log(logging.WARNING, "forged", "refused %d", i) for i in range(10)]
    assert logged == [True] * 3 + [False] * 7
    clock.t += 9.9                                   # still the same window
    assert lim.log(logging.WARNING, "forged", "refused %d", 10) is False
    assert lim.log(logging.WARNING, "other", "other kind") is True   # kinds are separate
    clock.t += 0.1                                   # the window ends: summary, then a new window
    assert lim.log(logging.WARNING, "forged", "refused %d", 11) is True
    assert _messages(caplog, LOG.name) == [
        "refused 0", "refused 1", "refused 2", "other kind",
        "suppressed 8 similar messages in the last 10s: forged", "refused 11"]
    lim.flush()                                      # nothing suppressed since: no line
    assert len(_messages(caplog, LOG.name)) == 6


async def test_the_summary_comes_when_the_window_ends_without_more_messages(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOG.name)
    lim = LogLimiter(LOG, burst=1, interval=0.05)
    for i in range(5):
        lim.log(logging.WARNING, "bad token", "refused %d", i)
    await wait_until(lambda: _messages(caplog, LOG.name), ok=lambda m: len(m) >= 2,
                     interval=0.01, what="the suppression summary")
    assert _messages(caplog, LOG.name) == [
        "refused 0", "suppressed 4 similar messages in the last 0.05s: bad token"]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        LogLimiter(LOG, burst=0)
    with pytest.raises(ValueError):
        LogLimiter(LOG, interval=0)


def _failures(kind: str) -> float:
    value = metrics.REGISTRY.get_sample_value("meterproxy_auth_failures_total", {"kind": kind})
    return value or 0.0


async def _flood(proxy: Proxy, n: int, method: str, url: str, **kw: object) -> list[int]:
    async def one() -> int:
        async with proxy.session.request(method, url, **kw) as r:   # type: ignore[arg-type]
            await r.read()
            return r.status
    statuses: list[int] = []
    for _ in range(n // 50):
        statuses += await asyncio.gather(*(one() for _ in range(50)))
    return statuses


@pytest.mark.timeout(120)
async def test_a_thousand_forged_webhooks_write_a_bounded_log(
        make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "meterproxy")
    proxy = await make_proxy(stripe={"webhook_secret": "whsec_real"})
    before = _failures("webhook_signature")
    body = b'{"id": "evt_forged", "type": "invoice.paid"}'
    forged = stripe.WebhookSignature.generate_signature_header(  # type: ignore[attr-defined]
        body.decode(), "whsec_forged", timestamp=int(time.time()))
    statuses = await _flood(proxy, 1000, "POST", proxy.url + WEBHOOK_PATH, data=body,
                            headers={"Stripe-Signature": forged})
    assert statuses == [400] * 1000
    assert _failures("webhook_signature") - before == 1000
    lines = _messages(caplog, "meterproxy.webhooks")
    assert len(lines) == 10 and all(x.startswith("webhook refused: ") for x in lines)
    proxy.server.webhooks.refusals.flush()
    assert _messages(caplog, "meterproxy.webhooks")[10:] == [
        "suppressed 990 similar messages in the last 60s: webhook signature refused"]


@pytest.mark.timeout(120)
async def test_bad_admin_tokens_and_unknown_keys_write_a_bounded_log(
        proxy: Proxy, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "meterproxy")
    admin_before, key_before = _failures("admin_token"), _failures("api_key")
    statuses = await _flood(proxy, 200, "GET", proxy.admin_url + "/admin/customers",
                            headers={"Authorization": "Bearer wrong"})
    assert statuses == [401] * 200
    statuses = await _flood(proxy, 200, "GET", proxy.url + "/v1/items",
                            headers={"Authorization": "Bearer mp_unknown"})
    assert statuses == [401] * 200
    assert _failures("admin_token") - admin_before == 200
    assert _failures("api_key") - key_before == 200
    admin_lines = _messages(caplog, "meterproxy.admin")
    assert len(admin_lines) == 10
    assert admin_lines[0].startswith("admin request refused (bad token) from 127.0.0.1: GET")
    key_lines = _messages(caplog, "meterproxy.handler")
    assert key_lines == ["unknown API key from 127.0.0.1"] * 10


async def test_shutdown_writes_the_pending_summaries(tmp_path: Path, upstream: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "meterproxy")
    server = await start(config_mod.load(write_config(tmp_path, upstream)))
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(25):
                async with s.get(f"http://127.0.0.1:{server.admin_port}/admin/rules",
                                 headers={"Authorization": "Bearer wrong"}) as r:
                    assert r.status == 401
                async with s.get(f"http://127.0.0.1:{server.public_port}/v1/items",
                                 headers={"Authorization": "Bearer mp_unknown"}) as r:
                    assert r.status == 401
    finally:
        await server.shutdown()
    assert _messages(caplog, "meterproxy.admin")[10:] == [
        "suppressed 15 similar messages in the last 60s: bad admin token"]
    assert _messages(caplog, "meterproxy.handler")[10:] == [
        "suppressed 15 similar messages in the last 60s: unknown API key"]
