"""Threshold alerts: detect when a customer's consumption crosses a configured fraction of
the credits granted for the period (and depletion), exactly once per threshold per period.

A customer's *period* is the set of grants live right now: its key is a hash of their ids,
so a new grant (a top-up, next month's allowance) starts a new period and re-arms the
thresholds. Consumption = credits taken from those grants / their total amount.

Detection is pure (``crossed``); ``ThresholdWatch`` remembers what fired (loaded from the
``alerts`` table at start) and writes new alerts through the one writer with
``INSERT OR IGNORE`` on (customer, period, threshold), so a restart never re-fires one.
Delivery belongs to ``proxy.alerts``.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal
from typing import Any

import orjson

from proxy.credits.book import CreditBook
from proxy.credits.ledger import GrantState
from proxy.store.db import Store
from proxy.units import fmt_micro

DEPLETED = "depleted"


def period_key(grants: Iterable[GrantState]) -> str:
    ids = ",".join(sorted(g.id for g in grants))
    return hashlib.sha256(ids.encode()).hexdigest()[:16]


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
    def __init__(self, store: Store, book: CreditBook, thresholds: Iterable[float | Decimal],
                 on_new: Callable[[], None] | None = None) -> None:
        self.store = store
        self.book = book
        self.thresholds = sorted(Decimal(str(t)) for t in thresholds)
        self.on_new = on_new
        self._fired: set[tuple[str, str, str]] = {
            (c, p, t) for c, p, t in store.conn.execute(
                "SELECT customer_id, period_key, threshold FROM alerts")}

    def check(self, customer_id: str, now: float | None = None) -> list[dict[str, Any]]:
        """Call after a customer's credits changed. Returns the alerts newly fired."""
        now = time.time() if now is None else now
        live = [g for g in self.book.grants(customer_id) if g.live(now)]
        if not live:
            return []
        granted = sum(g.amount for g in live)
        remaining = sum(g.remaining for g in live)
        key = period_key(live)
        new = [t for t in crossed(granted, granted - remaining, self.thresholds)
               if (customer_id, key, t) not in self._fired]
        if not new:
            return []
        alerts = []
        for t in new:
            self._fired.add((customer_id, key, t))
            alerts.append({
                "type": "credits.depleted" if t == DEPLETED else "credits.threshold_crossed",
                "customer_id": customer_id, "threshold": t, "period": key,
                "granted": fmt_micro(granted), "remaining": fmt_micro(remaining),
                "consumed": fmt_micro(granted - remaining),
                "at": int(now)})

        def tx(c: sqlite3.Connection) -> None:
            c.executemany(
                "INSERT OR IGNORE INTO alerts(customer_id, period_key, threshold, payload,"
                " created_at) VALUES (?,?,?,?,?)",
                [(customer_id, key, a["threshold"], orjson.dumps(a).decode(), int(now))
                 for a in alerts])

        self.store.execute_write(tx)
        if self.on_new is not None:
            self.on_new()
        return alerts
