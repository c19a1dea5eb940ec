"""Rate-limited logging for failures an unauthenticated caller can trigger at will.

Forged webhooks, bad admin tokens and unknown API keys must not let anybody write
unbounded logs. ``LogLimiter`` is a token bucket per message kind: ``burst`` lines at once,
refilled at ``burst`` per ``interval`` seconds; what does not fit is counted and reported as
one line, ``suppressed K similar messages in the last Ns: <kind>``, when the interval that
suppressed them ends (a timer on the running loop; without one, with the next message of that
kind). So a flood of any size writes at most ``burst`` lines plus one summary per interval
and kind. Counting the failures is the metrics' job (``meterproxy_auth_failures_total``),
never skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float
    suppressed: int = 0
    since: float = 0.0
    timer: asyncio.TimerHandle | None = None


class LogLimiter:
    def __init__(self, logger: logging.Logger, *, burst: int = 10, interval: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if burst < 1 or interval <= 0:
            raise ValueError("burst must be >= 1 and interval > 0")
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def log(self, level: int, kind: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless ``kind`` is over its budget; returns whether it logged."""
        now = self.clock()
        b = self._buckets.get(kind)
        if b is None:
            b = self._buckets[kind] = _Bucket(float(self.burst), now)
        else:
            b.tokens = min(float(self.burst),
                           b.tokens + (now - b.updated) * self.burst / self.interval)
            b.updated = now
            if b.suppressed and now - b.since >= self.interval:
                self._summarise(kind)
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            self.logger.log(level, msg, *args)
            return True
        if b.suppressed == 0:
            b.since = now
            self._arm(kind, b)
        b.suppressed += 1
        return False

    def _arm(self, kind: str, b: _Bucket) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return                                # no loop: summarised with the next message
        b.timer = loop.call_later(self.interval, self._summarise, kind)

    def _summarise(self, kind: str) -> None:
        b = self._buckets.get(kind)
        if b is None or not b.suppressed:
            return
        if b.timer is not None:
            b.timer.cancel()
            b.timer = None
        self.logger.warning("suppressed %d similar messages in the last %.0fs: %s",
                            b.suppressed, self.interval, kind)
        b.suppressed = 0

    def flush(self) -> None:
        """Write the pending summaries now (at shutdown, or in tests)."""
        for kind in list(self._buckets):
            self._summarise(kind)
