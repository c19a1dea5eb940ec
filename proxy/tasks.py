"""Background tasks: every task is created here, named, and referenced until it ends.

A bare ``asyncio.create_task`` can be garbage-collected mid-flight and hides its name
in tracebacks; ruff bans it elsewhere in the package.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("meterproxy.tasks")
_live: set[asyncio.Task[Any]] = set()


def spawn(name: str, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    task = asyncio.create_task(coro, name=name)  # noqa: TID251 - the one sanctioned place
    _live.add(task)
    task.add_done_callback(_done)
    return task


def _done(task: asyncio.Task[Any]) -> None:
    _live.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("task %s failed", task.get_name(), exc_info=task.exception())


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set or ``timeout`` seconds pass; True when it is set.

    Not ``asyncio.wait_for``: on Python 3.11 it returns normally when a cancellation arrives
    in the same loop pass as the event it waits for (CPython gh-86296, fixed in 3.12), so a
    background loop that should stop runs on and ``cancel_and_wait`` never returns.
    ``asyncio.timeout`` counts cancellations and lets the outside one through.
    """
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` and wait until it has ended; its CancelledError is swallowed, the
    caller's own is not: one that arrives while waiting (its ``cancelling()`` count rose
    since the call, as ``asyncio.timeout`` compares) is raised. A count already above zero
    on entry (a cleanup running after the caller's cancellation was delivered: a
    ``finally``, an exit stack unwinding) is not a new one: that cleanup goes on."""
    if task is None or task.done():
        return
    me = asyncio.current_task()
    before = 0 if me is None else me.cancelling()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        if me is not None and me.cancelling() > before:
            raise       # the caller itself is being cancelled: not ours to swallow
