"""The one way a test waits for something that happens in the background: ``wait_until``.

Every wait polls with a deadline (never a bare ``sleep`` hoping the work is done) and, on the
deadline, fails naming what it waited for and the last value it saw.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def wait_until(probe: Callable[[], T | Awaitable[T]], *,
                     ok: Callable[[T], object] = bool, timeout: float = 10.0,
                     interval: float = 0.02, what: str = "the condition") -> T:
    """Call ``probe`` (a plain or an async function) every ``interval`` seconds until
    ``ok(value)`` is true, and return that value. After ``timeout`` seconds: AssertionError
    naming ``what`` and the last value. The probe is always called at least once."""
    deadline = time.monotonic() + timeout
    while True:
        value: Any = probe()
        if inspect.isawaitable(value):
            value = await value
        if ok(value):
            return value  # type: ignore[no-any-return]
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; "
                                 f"last value: {value!r}"[:2000])
        await asyncio.sleep(interval)
