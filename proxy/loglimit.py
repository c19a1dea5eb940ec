"""Rate-limited logging for failures an unauthenticated caller can trigger at will.

Forged webhooks, bad admin tokens and unknown API keys must not let anybody write
unbounded logs. ``LogLimiter`` is a token bucket per message kind holding ``burst`` tokens,
refilled whole every ``interval`` seconds (counted from the first message of a window): the
first ``burst`` messages of a window are logged, the rest are counted and reported as one
line, ``suppressed K similar messages in the last Ns: <kind>``, when the window ends (a timer
on the running loop; without a loop, with the next message of that kind). A flood of any
size therefore writes at most ``burst`` lines plus one summary per interval and kind.
Counting the failures is the metrics' job (``meterproxy_auth_failures_total``), never skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class _Window:
    start: float
    logged: int = 0
    suppressed: int = 0
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
        self._windows: dict[str, _Window] = {}

    def log(self, level: int, kind: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless ``kind`` is over its budget; returns whether it logged.
        ``kind`` must come from the code, never from the request (it keys the buckets)."""
        now = self.clock()
        w = self._windows.get(kind)
        if w is None or now - w.start >= self.interval:
            if w is not None:
                self._summarise(kind)
            w = self._windows[kind] = _Window(now)
        if w.logged < self.burst:
            w.logged += 1
            self.logger.log(level, msg, *args)
            return True
        if w.suppressed == 0:
            self._arm(kind, w, now)
        w.suppressed += 1
        return False

    def _arm(self, kind: str, w: _Window, now: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return                                # no loop: summarised with the next message
        w.timer = loop.call_later(max(0.0, w.start + self.interval - now), self._summarise, kind)

    def _summarise(self, kind: str) -> None:
        w = self._windows.get(kind)
        if w is None or not w.suppressed:
            return
        if w.timer is not None:
            w.timer.cancel()
            w.timer = None
        self.logger.warning("suppressed %d similar messages in the last %gs: %s",
                            w.suppressed, self.interval, kind)
        w.suppressed = 0

    def flush(self) -> None:
        """Write the pending summaries now (at shutdown, or in tests)."""
        for kind in list(self._windows):
            self._summarise(kind)
