"""Operator notices (issue 12): spike alerts, the pre-renewal notice, usage digests.

Each notice is a row in ``alerts`` (the credit alerts' table), delivered by the same
``proxy.alerts.AlertSender``: signed webhooks, retried with backoff, dead-lettered, or only
logged without a webhook URL. The row's UNIQUE (customer, period key, threshold) makes each
notice fire once:

- ``usage.spike`` (threshold ``spike:<meter>``, period key: the UTC day): once per
  customer, meter and day, when the day's usage so far is above ``spike_factor`` x the
  average of the 7 days before (days without usage count as 0; a customer with no usage in
  those days is never a spike) and at least ``spike_min`` units.
- ``billing.pre_renewal`` (``pre_renewal``, the period start): once per customer and period,
  ``pre_renewal`` before the period ends, with the usage so far, the projection at period end
  (``proxy.periods.project``) and the projected charge per priced meter.
- ``usage.digest`` (``digest:daily`` / ``digest:weekly``, the day / week start, weeks from
  Monday): once per customer with usage in the last complete UTC day / week.

The check runs every ``alerts.notice_interval`` (60 s) over the per-minute aggregates
(``UsageLedger.quantities`` / ``usage``): three grouped reads per run (today, the trailing 7 days, the digest
window) and, for customers entering their pre-renewal window, one per customer. Counted in
``meterproxy_notices_total{kind}``.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any, Literal

import orjson

from proxy.config import AlertsConfig
from proxy.errors import StorageError
from proxy.metrics import notices_total
from proxy.periods import TRAILING, period_bounds, project
from proxy.pricing import Price, fmt_minor, line_amount, prices_in
from proxy.store.keys import KeyCache
from proxy.store.protocols import AlertsFired, NewAlert, UsageLedger
from proxy.timeutil import rfc3339
from proxy.units import fmt_micro, to_micro

log = logging.getLogger("meterproxy.notices")

DAY = 86400
BASELINE_DAYS = 7
Digest = Literal["off", "daily", "weekly"]


@dataclass(frozen=True, slots=True)
class NoticeSettings:
    pre_renewal: float | None = None       # seconds before the period end; None: off
    spike_factor: float | None = None      # None: off
    spike_min: int = 0                     # micro-units
    digest: Digest = "off"

    @property
    def enabled(self) -> bool:
        return self.pre_renewal is not None or self.spike_factor is not None \
            or self.digest != "off"


def notice_settings(cfg: AlertsConfig) -> NoticeSettings:
    return NoticeSettings(cfg.pre_renewal, cfg.spike_factor, to_micro(cfg.spike_min),
                          cfg.digest)


# ---- pure ------------------------------------------------------------------------------------

def day_start(now: float) -> int:
    return int(now // DAY) * DAY


def is_spike(today: int, trailing: int, days: int, factor: float, minimum: int) -> bool:
    """``today`` above ``factor`` x the daily average of ``trailing`` over ``days`` days and
    at least ``minimum``; no history (``trailing`` 0) is never a spike. Exact arithmetic."""
    if days <= 0 or trailing <= 0 or today < minimum:
        return False
    return Fraction(today) * days > Fraction(factor) * trailing


def digest_window(kind: Digest, now: float) -> tuple[int, int] | None:
    """The last complete UTC day, or week (Monday to Monday), before ``now``."""
    if kind == "off":
        return None
    today = day_start(now)
    if kind == "daily":
        return today - DAY, today
    monday = datetime.fromtimestamp(today, UTC) - timedelta(
        days=datetime.fromtimestamp(today, UTC).weekday())
    end = int(monday.timestamp())
    return end - 7 * DAY, end


def pre_renewal_due(period_end: int, now: float, lead: float) -> bool:
    return period_end - lead <= now < period_end


# ---- the watcher -----------------------------------------------------------------------------

class NoticeWatch:
    def __init__(self, usage: UsageLedger, alerts: AlertsFired, keys: KeyCache,
                 settings: NoticeSettings, *,
                 prices: Callable[[], Mapping[str, Price]] | None = None,
                 on_new: Callable[[], None] | None = None) -> None:
        self.usage = usage
        self.alerts = alerts
        self.keys = keys
        self.settings = settings
        self.prices = prices
        self.on_new = on_new

    async def _sums(self, start: int, end: int) -> dict[tuple[str, str], int]:
        return await self.usage.quantities(start, end)

    async def _customer_sums(self, cid: str, start: int, end: int) -> dict[str, int]:
        _, _, totals = await self.usage.usage(cid, start, end)
        return {m: t.quantity for m, t in totals.items() if t.quantity}

    async def check(self, now: float | None = None) -> list[dict[str, Any]]:
        """Find the notices due at ``now`` and queue the new ones; returns those."""
        now = time.time() if now is None else now
        s = self.settings
        rows: list[tuple[str, str, str, dict[str, Any]]] = []
        today = day_start(now)
        if s.spike_factor is not None:
            cur = await self._sums(today, today + DAY)
            base = await self._sums(today - BASELINE_DAYS * DAY, today)
            for (cid, meter), q in sorted(cur.items()):
                trailing = base.get((cid, meter), 0)
                if is_spike(q, trailing, BASELINE_DAYS, s.spike_factor, s.spike_min):
                    rows.append((cid, str(today), f"spike:{meter}", {
                        "type": "usage.spike", "customer_id": cid, "meter": meter,
                        "day": _iso(today), "today": fmt_micro(q),
                        "daily_average": fmt_micro(trailing // BASELINE_DAYS),
                        "factor": s.spike_factor}))
        window = digest_window(s.digest, now)
        if window is not None:
            per: dict[str, dict[str, str]] = {}
            for (cid, meter), q in sorted((await self._sums(*window)).items()):
                per.setdefault(cid, {})[meter] = fmt_micro(q)
            for cid, usage in per.items():
                rows.append((cid, str(window[0]), f"digest:{s.digest}", {
                    "type": "usage.digest", "customer_id": cid, "digest": s.digest,
                    "from": _iso(window[0]), "to": _iso(window[1]), "usage": usage}))
        if s.pre_renewal is not None:
            for cid, cust in sorted(self.keys.customers.items()):
                if cust.status != "active":
                    continue
                start, end = period_bounds(cust.billing_anchor, now)
                if pre_renewal_due(end, now, s.pre_renewal):
                    rows.append((cid, str(start), "pre_renewal",
                                 await self._pre_renewal(cid, start, end, now,
                                                         cust.currency)))
        return await self._queue(rows, now)

    async def _pre_renewal(self, cid: str, start: int, end: int, now: float,
                           currency: str | None = None) -> dict[str, Any]:
        so_far = await self._customer_sums(cid, start, int(now) + 60)
        trailing = await self._customer_sums(cid, int(now) - TRAILING, int(now) + 60)
        projected = {m: project(q, trailing.get(m, 0), now, end) for m, q in so_far.items()}
        out: dict[str, Any] = {
            "type": "billing.pre_renewal", "customer_id": cid, "period_start": _iso(start),
            "period_end": _iso(end), "usage": {m: fmt_micro(q) for m, q in so_far.items()},
            "projected": {m: fmt_micro(q) for m, q in projected.items()}}
        prices = prices_in(self.prices() if self.prices is not None else {}, currency)
        charges = {m: (line_amount(p, projected.get(m, 0)), p.currency)
                   for m, p in prices.items()}
        if charges:
            out["projected_charges"] = {m: {"amount": fmt_minor(a, c), "currency": c}
                                        for m, (a, c) in charges.items()}
        return out

    async def _queue(self, rows: list[tuple[str, str, str, dict[str, Any]]],
                     now: float) -> list[dict[str, Any]]:
        if not rows:
            return []
        payloads = {(cid, key, threshold): payload for cid, key, threshold, payload in rows}
        fired = await self.alerts.fire_new([
            NewAlert(cid, key, threshold, orjson.dumps(payload).decode(), int(now))
            for cid, key, threshold, payload in rows])
        new = [payloads[(a.customer_id, a.period_key, a.threshold)] for a in fired]
        for n in new:
            notices_total.labels(kind=str(n["type"])).inc()
            log.info("notice %s for %s", n["type"], n["customer_id"])
        if new and self.on_new is not None:
            self.on_new()
        return new

    async def run(self, interval: float) -> None:
        """Background task: ``check`` every ``interval`` seconds."""
        while True:
            try:
                await self.check()
            except (sqlite3.Error, StorageError):
                # PostgreSQL's outcome unknown included: a notice is fired once per key
                # (the alerts table is unique), so the next check is safe
                log.exception("notices paused: storage error")
            await asyncio.sleep(interval)


def _iso(ts: int) -> str:
    return rfc3339(ts)
