"""The fleet's local clock: integer monotonic milliseconds (never the wall clock, which can
jump). Deadlines a member computes for its leases are on this clock."""

from __future__ import annotations

import time


def monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000
