"""Credit-threshold alert delivery: signed webhooks, retried with backoff, dead-lettered.

The detector (request path) only INSERTs OR IGNOREs a row into ``alerts`` (UNIQUE per
customer, period and threshold, so each fires once) and calls ``AlertSender.wake()``.
This module delivers those rows.

Delivery, step by step
  1. Due rows (``status = 'pending' AND next_attempt_at <= now``) are read in id order.
  2. Each row is CLAIMED in its own small write transaction before the call: ``attempts``
     is incremented and ``next_attempt_at`` pushed past the call's timeout (a lease). The
     claim only succeeds if the row is still due, so two senders (another worker process,
     or an overlapping cycle) never send the same alert at once, and a crash mid-call
     leaves a row that is retried once the lease expires.
  3. The POST: the stored payload byte for byte, signed (``Meterproxy-Signature:
     t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>``), with ``Meterproxy-Alert-Id``
     so a receiver can drop the duplicate a crash between 3 and 4 can cause.
  4. The outcome is committed: 2xx -> ``sent``; anything else -> back to ``pending`` with
     exponential backoff and jitter, or ``dead`` (a dead letter, with ``last_error``) once
     ``max_attempts`` calls were made.
With no webhook URL configured, each alert is logged (warning, with its payload) and marked
``logged``. Every outcome is logged and counted in ``meterproxy_alerts_total{outcome}``.

Delivery is at-least-once; receivers dedupe on ``Meterproxy-Alert-Id``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import aiohttp

from proxy.backoff import backoff
from proxy.metrics import alerts_total
from proxy.store.alerts import SqliteAlerts
from proxy.store.db import Store
from proxy.store.protocols import AlertsFired
from proxy.tasks import wait_event

log = logging.getLogger("meterproxy.alerts")

SIGNATURE_HEADER = "Meterproxy-Signature"
ALERT_ID_HEADER = "Meterproxy-Alert-Id"
USER_AGENT = "meterproxy"
SIGNATURE_SCHEME = "v1"
DEFAULT_TOLERANCE = 300

_LEASE_MARGIN = 30.0        # seconds past the call timeout before a claimed row is due again
_IDLE_POLL = 60.0           # re-check even without a wake (rows from another process)
_BATCH = 100


# ---- signatures ----------------------------------------------------------------------------

def sign(secret: str, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 with ``secret`` over ``b"<timestamp>." + body``."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    return f"t={timestamp},{SIGNATURE_SCHEME}={sign(secret, timestamp, body)}"


def verify(secret: str, header: str, body: bytes, tolerance: float | None = DEFAULT_TOLERANCE,
           now: float | None = None) -> bool:
    """True when ``header`` (``t=<unix>,v1=<hex>[,v1=<hex>...]``) signs ``body`` with
    ``secret`` and its timestamp is within ``tolerance`` seconds of ``now`` (None: no check).
    Any one matching ``v1`` is enough (several may be present while secrets rotate)."""
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            continue
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                return False
        elif key == SIGNATURE_SCHEME:
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    if tolerance is not None:
        current = time.time() if now is None else now
        if abs(current - timestamp) > tolerance:
            return False
    expected = sign(secret, timestamp, body)
    ok = False
    for cand in candidates:  # no early exit: every candidate is compared
        ok |= hmac.compare_digest(expected, cand)
    return ok


# ---- the sender ---------------------------------------------------------------------------------

class AlertSender:
    """Delivers ``alerts`` rows. ``start()``, then ``run()`` as a task; ``close()`` at the end.

    Every read and write is a verb of the ``AlertsFired`` owner (``proxy.store.protocols``).
    Sends are sequential, in id order.
    """

    def __init__(self, store: Store, url: str, secret: str, *, max_attempts: int = 8,
                 timeout: float = 5.0, base_delay: float = 1.0, max_delay: float = 300.0,
                 alerts: AlertsFired | None = None) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.store = store
        self.alerts: AlertsFired = alerts if alerts is not None else SqliteAlerts(store)
        self.url = url
        self.secret = secret
        self.max_attempts = max_attempts
        self.timeout = timeout
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._session: aiohttp.ClientSession | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    # ---- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        if not self.url:
            log.warning("alerts.webhook_url is empty: credit alerts are only logged")
            return
        if not self.secret:
            log.warning("alerts.secret is empty: alert webhooks are signed with an empty key")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"User-Agent": USER_AGENT})

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def wake(self) -> None:
        """Call after inserting an alert row: the next cycle starts now."""
        self._wake.set()

    async def run(self) -> None:
        """Deliver due alerts forever: each cycle, then sleep until woken or the next due time."""
        if self.url and self._session is None:
            await self.start()
        failures = 0
        while True:
            self._wake.clear()
            try:
                await self.deliver_due()
                delay = await self._next_delay()
                failures = 0
            except Exception:
                failures += 1
                delay = min(30.0, 0.5 * 2 ** min(failures, 6))
                log.exception("alert delivery cycle failed; retrying in %.1fs", delay)
            if delay <= 0:
                await asyncio.sleep(0)
                continue
            await wait_event(self._wake, delay)

    # ---- one cycle --------------------------------------------------------------------

    async def deliver_due(self) -> int:
        """Handle every alert due now, in id order; returns how many were handled."""
        async with self._lock:
            handled = 0
            while True:
                rows = await self._due(time.time())
                if not rows:
                    return handled
                for row in rows:
                    if await self._handle(row):
                        handled += 1
                if len(rows) < _BATCH:
                    return handled

    async def _due(self, now: float) -> list[dict[str, Any]]:
        return [asdict(a) for a in await self.alerts.due(now, _BATCH)]

    async def _next_delay(self) -> float:
        nxt = await self.alerts.next_due()
        if nxt is None:
            return _IDLE_POLL
        return max(0.0, min(_IDLE_POLL, float(nxt) - time.time()))

    async def _handle(self, row: dict[str, Any]) -> bool:
        alert_id = int(row["id"])
        desc = (f"alert {alert_id} (customer {row['customer_id']}, threshold {row['threshold']},"
                f" period {row['period_key']})")
        raw = row["payload"]
        body = raw if isinstance(raw, bytes) else str(raw).encode("utf-8")
        if not self.url:
            if await self._finish(alert_id, "logged", None):
                alerts_total.labels("logged").inc()
                log.warning("%s fired; no alerts.webhook_url, logged only: %s", desc,
                            body.decode("utf-8", "replace"))
            return True
        attempt = await self._claim(alert_id, time.time())
        if attempt is None:
            return False  # another sender has it, or it changed under us
        if attempt == 1:
            log.info("%s fired: %s", desc, body.decode("utf-8", "replace"))
        error = await self._post(alert_id, body)
        if error is None:
            if await self._finish(alert_id, "sent", None):
                alerts_total.labels("sent").inc()
                log.info("%s delivered on attempt %d", desc, attempt)
            return True
        if attempt >= self.max_attempts:
            if await self._finish(alert_id, "dead", error):
                alerts_total.labels("dead").inc()
                log.error("%s dead-lettered after %d attempts: %s", desc, attempt, error)
            return True
        delay = backoff(attempt, first=self.base_delay, cap=self.max_delay,
                        jitter=self.base_delay)
        await self.alerts.retry_at(alert_id, time.time() + delay, error)
        alerts_total.labels("retry").inc()
        log.warning("%s attempt %d/%d failed (%s); retrying in %.1fs", desc, attempt,
                    self.max_attempts, error, delay)
        return True

    async def _post(self, alert_id: int, body: bytes) -> str | None:
        """One call. None on 2xx, else a short description of the failure."""
        session = self._session
        if session is None:
            return "sender not started"
        ts = int(time.time())
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature_header(self.secret, ts, body),
            ALERT_ID_HEADER: str(alert_id),
            "User-Agent": USER_AGENT,
        }
        try:
            async with session.post(self.url, data=body, headers=headers,
                                    allow_redirects=False) as resp:
                if 200 <= resp.status < 300:
                    return None
                snippet = (await resp.content.read(200)).decode("utf-8", "replace").strip()
                return f"HTTP {resp.status}" + (f": {snippet}" if snippet else "")
        except TimeoutError:
            return f"timeout after {self.timeout:g}s"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"[:300]

    # ---- writes (each one small transaction of the owner) --------------------------------------

    async def _claim(self, alert_id: int, now: float) -> int | None:
        return await self.alerts.claim(alert_id, now, now + self.timeout + _LEASE_MARGIN)

    async def _finish(self, alert_id: int, status: str, error: str | None) -> bool:
        sent_at = int(time.time()) if status == "sent" else None
        return await self.alerts.finish(alert_id, status, error, sent_at)


# ---- dead letters -------------------------------------------------------------------------------

async def list_dead(alerts: AlertsFired, limit: int = 100) -> list[dict[str, Any]]:
    return [asdict(a) for a in await alerts.list_dead(limit)]


async def requeue(alerts: AlertsFired, ids: Sequence[int]) -> int:
    """Put dead letters back to pending (attempts reset); returns how many. Then ``wake()``."""
    return await alerts.requeue(ids)
