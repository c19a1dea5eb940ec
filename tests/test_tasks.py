"""proxy/tasks.py: a background loop stops when it is cancelled, whatever it was waiting on.

The case that hung CI for 300 s: a loop waiting on an event with ``asyncio.wait_for`` was
cancelled in the loop pass where the event fired; Python 3.11's ``wait_for`` returned
normally, the loop went on, and ``cancel_and_wait`` never returned.
"""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest

from proxy import tasks


async def _loop_on(event: asyncio.Event, passes: list[int]) -> None:
    """A background loop shaped like the watchers: wait for a wake-up, clear it, work."""
    while True:
        await tasks.wait_event(event, 10.0)
        event.clear()
        passes.append(1)


async def _stopped(task: asyncio.Task[None], cancelled: bool = True) -> None:
    """``task`` ends within 2 s, cancelled (or not); waiting does not cancel it again."""
    done, _ = await asyncio.wait([task], timeout=2)
    if not done:
        task.cancel()   # a second cancellation gets through; the test fails all the same
        await asyncio.wait([task], timeout=2)
    assert done, "the task ran on after its cancellation"
    assert task.cancelled() is cancelled


@pytest.mark.parametrize("yields", range(6))
async def test_a_loop_cancelled_as_its_event_fires_stops(yields: int) -> None:
    # the event fires, then the cancellation comes 0..5 loop passes later: every interleaving
    # of the waiter's wake-up with the cancel, one of which Python 3.11's wait_for swallows
    event = asyncio.Event()
    passes: list[int] = []
    task = tasks.spawn("test-loop", _loop_on(event, passes))
    await asyncio.sleep(0)
    event.set()
    for _ in range(yields):
        await asyncio.sleep(0)
    task.cancel()
    await _stopped(task)


async def test_wait_event_says_whether_the_event_was_set() -> None:
    event = asyncio.Event()
    assert await tasks.wait_event(event, 0.01) is False
    event.set()
    assert await tasks.wait_event(event, 0.01) is True
    later = asyncio.Event()
    asyncio.get_running_loop().call_later(0.01, later.set)
    assert await tasks.wait_event(later, 5.0) is True


async def test_cancel_and_wait_stops_a_loop_and_returns() -> None:
    event = asyncio.Event()
    task = tasks.spawn("test-loop", _loop_on(event, []))
    await asyncio.sleep(0)
    event.set()
    await asyncio.sleep(0)
    stopper = tasks.spawn("test-stopper", tasks.cancel_and_wait(task))
    await _stopped(stopper, cancelled=False)
    assert task.cancelled()


async def test_cancel_and_wait_passes_on_its_callers_own_cancellation() -> None:
    # the caller is cancelled while it waits for a task that is slow to stop: the caller's
    # cancellation is not swallowed with the task's
    release = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await release.wait()
            raise

    inner = tasks.spawn("test-slow", slow_to_stop())
    await asyncio.sleep(0)
    outer = tasks.spawn("test-stopper", tasks.cancel_and_wait(inner))
    await asyncio.sleep(0)
    outer.cancel()
    await asyncio.sleep(0)
    release.set()
    await _stopped(outer)
    assert inner.cancelled()


def test_the_package_does_not_use_wait_for() -> None:
    # the guard for the above: every wait with a timeout in proxy/ goes through wait_event or
    # asyncio.timeout (tests may still use wait_for: nothing cancels a test mid-wait)
    root = Path(__file__).resolve().parent.parent / "proxy"
    used = [f"{p.relative_to(root.parent)}:{node.lineno}"
            for p in sorted(root.rglob("*.py"))
            for node in ast.walk(ast.parse(p.read_text(), str(p)))
            if isinstance(node, ast.Attribute) and node.attr == "wait_for"
            and isinstance(node.value, ast.Name) and node.value.id == "asyncio"]
    assert used == []


async def test_cancel_and_wait_in_a_cleanup_after_the_callers_cancellation_goes_on() -> None:
    # the caller's cancellation was delivered already (its cancelling() stays 1 in a
    # finally, an exit stack unwinding): each cancel_and_wait there stops its task and
    # returns, so the cleanup after it runs (e.g. UpstreamPool.close, PostgresAlerts.close)
    first, second = (tasks.spawn("test-loop", _loop_on(asyncio.Event(), [])) for _ in range(2))
    reached: list[str] = []

    async def owner() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            await tasks.cancel_and_wait(first)
            reached.append("first")
            await tasks.cancel_and_wait(second)
            reached.append("second")

    task = tasks.spawn("test-owner", owner())
    await asyncio.sleep(0)
    task.cancel()
    await _stopped(task)
    second.cancel()         # (left running when the test fails)
    assert reached == ["first", "second"]
    assert first.cancelled() and second.cancelled()


@pytest.mark.parametrize("yields", range(1, 5))    # (0: both cancellations are one)
async def test_a_cleanup_cancelled_again_while_it_waits_is_cancelled(yields: int) -> None:
    # ... but a cancellation arriving while it waits (in any loop pass, including the one
    # where the task ends) is the caller's own and passes on
    inner = tasks.spawn("test-loop", _loop_on(asyncio.Event(), []))

    async def owner() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            await tasks.cancel_and_wait(inner)
            await asyncio.sleep(10)

    task = tasks.spawn("test-owner", owner())
    await asyncio.sleep(0)
    task.cancel()
    for _ in range(yields):
        await asyncio.sleep(0)
    task.cancel()
    await _stopped(task)
    assert inner.cancelled()
