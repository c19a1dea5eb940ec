"""Threshold alerts: detect when a customer's consumption crosses a configured fraction of
its live credits (and depletion), exactly once per threshold per *billing period*.

Period (docs/credits.md, issue 12 finding 5): the customer's billing period
(``proxy.periods.period_bounds`` on its ``billing_anchor``; none = calendar month, UTC).
Each fraction threshold fires at most once per billing period: a top-up or an old grant's
expiry changes the ratio but never re-fires a threshold already sent this period.
``depleted`` fires once per billing period *and grant count*: a top-up (a new grant)
re-arms it, so a customer who tops up and runs dry again is told again; an expiry does not
(the grant count does not change).
Consumption = (granted - remaining) over the live grants / their total amount.

Detection is pure (``crossed``, ``alert_period``); ``ThresholdWatch`` remembers what fired
(loaded from the ``AlertsFired`` owner at start, ``ThresholdWatch.open``) and fires new
alerts through it, idempotent on (customer, period, threshold), so a restart never
re-fires one.
Delivery belongs to ``proxy.alerts``.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal
from typing import Any

import orjson

from proxy.credits.book import CreditBook
from proxy.credits.ledger import GrantState
from proxy.errors import StorageError
from proxy.periods import period_bounds
from proxy.store.protocols import AlertsFired, NewAlert
from proxy.units import fmt_micro

log = logging.getLogger("meterproxy.credits")

DEPLETED = "depleted"


def period_key(grants: Iterable[GrantState]) -> str:
    ids = ",".join(sorted(g.id for g in grants))
    return hashlib.sha256(ids.encode()).hexdigest()[:16]


def alert_period(threshold: str, period_start: int, grant_count: int) -> str:
    """The ``alerts.period_key`` a threshold fires under: the billing period's start, plus
    the customer's grant count for ``depleted``."""
    if threshold == DEPLETED:
        return f"{period_start}:g{grant_count}"
    return str(period_start)


def crossed(granted: int, consumed: int, thresholds: Sequence[Decimal]) -> list[str]:
    """Every threshold (as its decimal string) that ``consumed / granted`` has reached,
    plus ``depleted`` when nothing is left. Exact integer comparison, no floats."""
    if granted <= 0:
        return []
    out = [str(t) for t in thresholds if consumed * t.as_integer_ratio()[1]
           >= granted * t.as_integer_ratio()[0]]
    if consumed >= granted:
        out.append(DEPLETED)
    return out


class ThresholdWatch:
    def __init__(self, alerts: AlertsFired, book: CreditBook,
                 thresholds: Iterable[float | Decimal], on_new: Callable[[], None] | None = None,
                 fired: set[tuple[str, str, str]] | None = None) -> None:
        self.alerts = alerts
        self.book = book
        self.thresholds = sorted(Decimal(str(t)) for t in thresholds)
        self.on_new = on_new
        self._fired: set[tuple[str, str, str]] = fired if fired is not None else set()

    @classmethod
    async def open(cls, alerts: AlertsFired, book: CreditBook,
                   thresholds: Iterable[float | Decimal],
                   on_new: Callable[[], None] | None = None) -> ThresholdWatch:
        """A watch that knows every alert already fired (so none fires twice)."""
        return cls(alerts, book, thresholds, on_new, await alerts.fired())

    def check(self, customer_id: str, now: float | None = None,
              anchor: int | None = None) -> list[dict[str, Any]]:
        """Call after a customer's credits changed (``anchor``: its billing anchor). Returns
        the alerts newly fired."""
        now = time.time() if now is None else now
        grants = self.book.grants(customer_id)
        live = [g for g in grants if g.live(now)]
        if not live:
            return []
        granted = sum(g.amount for g in live)
        remaining = sum(g.remaining for g in live)
        start = period_bounds(anchor, now)[0]
        new = [(t, alert_period(t, start, len(grants)))
               for t in crossed(granted, granted - remaining, self.thresholds)]
        new = [(t, k) for t, k in new if (customer_id, k, t) not in self._fired]
        if not new:
            return []
        alerts = []
        keys = []
        for t, key in new:
            self._fired.add((customer_id, key, t))
            keys.append(key)
            alerts.append({
                "type": "credits.depleted" if t == DEPLETED else "credits.threshold_crossed",
                "customer_id": customer_id, "threshold": t, "period": key,
                "granted": fmt_micro(granted), "remaining": fmt_micro(remaining),
                "consumed": fmt_micro(granted - remaining),
                "at": int(now)})

        try:
            self.alerts.fire([NewAlert(customer_id, key, str(a["threshold"]),
                                       orjson.dumps(a).decode(), int(now))
                              for key, a in zip(keys, alerts, strict=True)])
        except (sqlite3.Error, StorageError) as exc:
            # called inside settlement, after the book was debited and before the usage
            # row is queued: a failed alert write must not fail the request (its row would
            # be lost with its debits kept). Not marked fired: the next check retries.
            for t, key in new:
                self._fired.discard((customer_id, key, t))
            log.warning("credit alert for %s not written (retried at the next change): %s",
                        customer_id, exc)
            return []
        if self.on_new is not None:
            self.on_new()
        return alerts
