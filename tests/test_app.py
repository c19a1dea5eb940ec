"""proxy.app, the composition root: a start-up that fails part-way closes exactly what it
opened (sockets, the database and its reader thread, the Stripe connections, background
tasks), so the port is free again, the database file is not held and nothing leaks.

Every case is a real failure with real resources: a listening socket on the port, a
directory where the database file should be, the Stripe double reporting a wrong meter.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import sqlite3
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy import config as config_mod
from proxy.app import start
from proxy.errors import ConfigError, FileProblem, StorageError
from proxy.tasks import spawn
from tests.conftest import write_config
from tests.stripe_double.fixture import TEST_API_KEY, RunningDouble

RULES = """\
version: 1
meters:
  api_calls: {stripe_event_name: api_calls}
rules:
  - name: all
    match: {path: "/**"}
    usage: [{meter: api_calls, quantity: 1}]
"""


def _fds() -> dict[int, str]:
    """This process's open file descriptors and what each points at."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:          # the directory's own descriptor, closed by now
            continue
    return out


@dataclass
class Snapshot:
    fds: dict[int, str]
    tasks: set[asyncio.Task[Any]]
    threads: set[threading.Thread]

    @classmethod
    def take(cls) -> Snapshot:
        gc.collect()
        return cls(_fds(), asyncio.all_tasks(), set(threading.enumerate()))


@contextmanager
def _listening() -> Iterator[int]:
    """Another process's listener on the port yielded (the proxy cannot bind it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def _in_use(port: int) -> str:
    """The bind failure on ``port``, not on another one."""
    return rf"\('127\.0\.0\.1', {port}\).*address already in use"


def _assert_port_free(port: int) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))      # EADDRINUSE if the proxy's listener were still open
        s.listen()


def _assert_database_free(db: Path) -> None:
    held = [t for t in _fds().values() if t.startswith(str(db))]
    assert held == [], f"still open: {held}"
    if db.is_file() and db.read_bytes().startswith(b"SQLite format 3\0"):
        c = sqlite3.connect(str(db), timeout=0)
        try:
            c.execute("BEGIN EXCLUSIVE")        # nobody else holds a lock on the file
            c.rollback()
        finally:
            c.close()


async def _assert_start_fails_cleanly(cfg_path: Path, error: type[Exception], match: str,
                                      ports: tuple[int, ...], db: Path) -> None:
    await asyncio.sleep(0)
    before = Snapshot.take()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # the exception is held while checking (as the CLI holds it to report it): its
        # traceback keeps the failed frames' locals alive, so nothing is closed by chance
        with pytest.raises(error, match=match) as failure:
            await start(config_mod.load(cfg_path))
        await asyncio.sleep(0)       # callbacks scheduled by the closes run
        after = Snapshot.take()
    leaked = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaked == [], [str(w.message) for w in leaked]
    assert after.tasks - before.tasks == set()
    assert after.threads - before.threads == set()     # aiosqlite's reader thread ended
    opened = {fd: t for fd, t in after.fds.items() if before.fds.get(fd) != t}
    assert opened == {}, f"left open: {opened}"
    for port in ports:
        _assert_port_free(port)
    _assert_database_free(db)
    assert failure.value.__traceback__ is not None


def _stripe(double: RunningDouble) -> dict[str, Any]:
    """A meter-events sink with the start-up meter check, against the Stripe double: the
    sink, the meter check and the reconciler each own a Stripe connection."""
    return {"sink": "meter_events", "api_key": TEST_API_KEY, "api_base": double.url,
            "meter_events_base": double.url, "flush_interval": "1h", "timeout": "2s"}


def _config(tmp: Path, upstream: str, double: RunningDouble, port: int, admin_port: int,
            **overrides: Any) -> Path:
    return write_config(tmp, upstream, rules_text=RULES, listen=f"127.0.0.1:{port}",
                        admin_listen=f"127.0.0.1:{admin_port}", stripe=_stripe(double),
                        **overrides)


async def test_a_database_path_that_is_a_directory_closes_the_sink(
        tmp_path: Path, upstream: str, stripe_double: RunningDouble) -> None:
    stripe_double.state.add_meter("api_calls")
    db = tmp_path / "meter.db"
    db.mkdir()
    path = _config(tmp_path, upstream, stripe_double, 0, 0)
    await _assert_start_fails_cleanly(path, FileProblem, "it is a directory", (), db)


async def test_a_file_that_is_not_a_database_closes_the_sink(
        tmp_path: Path, upstream: str, stripe_double: RunningDouble) -> None:
    stripe_double.state.add_meter("api_calls")
    db = tmp_path / "meter.db"
    db.write_bytes(b"this is not a SQLite database, " * 100)
    path = _config(tmp_path, upstream, stripe_double, 0, 0)
    await _assert_start_fails_cleanly(path, StorageError, "file is not a database", (), db)
    assert db.read_bytes() == b"this is not a SQLite database, " * 100   # left as it was


async def test_a_wrong_stripe_meter_closes_the_store_reader_upstream_and_connections(
        tmp_path: Path, upstream: str, stripe_double: RunningDouble) -> None:
    stripe_double.state.add_meter("api_calls", "count", id="mtr_count")
    path = _config(tmp_path, upstream, stripe_double, 0, 0)   # (never bound: checked first)
    await _assert_start_fails_cleanly(path, ConfigError, "mtr_count", (),
                                      tmp_path / "meter.db")
    assert len(stripe_double.state.calls("meters_list")) == 1      # the check really ran


async def test_the_public_port_in_use_closes_everything_opened_before_it(
        tmp_path: Path, upstream: str, stripe_double: RunningDouble) -> None:
    stripe_double.state.add_meter("api_calls")
    with _listening() as port:
        path = _config(tmp_path, upstream, stripe_double, port, 0)
        await _assert_start_fails_cleanly(path, OSError, _in_use(port), (),
                                          tmp_path / "meter.db")
    _assert_port_free(port)


async def test_the_admin_port_in_use_closes_the_public_listener(
        tmp_path: Path, upstream: str, stripe_double: RunningDouble) -> None:
    """The public site is already listening when the admin site fails to bind (on a port
    of its own choosing: no open socket is left, ``_assert_start_fails_cleanly``)."""
    stripe_double.state.add_meter("api_calls")
    with _listening() as admin_port:
        path = _config(tmp_path, upstream, stripe_double, 0, admin_port)
        await _assert_start_fails_cleanly(path, OSError, _in_use(admin_port), (),
                                          tmp_path / "meter.db")


async def test_after_a_failed_start_the_same_config_starts_and_serves(
        tmp_path: Path, upstream: str, stripe_double: RunningDouble) -> None:
    """Nothing a failed start left behind stands in the way of the next start."""
    stripe_double.state.add_meter("api_calls")
    with _listening() as admin_port:
        path = _config(tmp_path, upstream, stripe_double, 0, admin_port)
        with pytest.raises(OSError, match=_in_use(admin_port)):
            await start(config_mod.load(path))
    server = await start(config_mod.load(path))
    port = server.public_port
    try:
        assert port != 0 and server.admin_port == admin_port
        assert server.reconciler is not None and server.meter_check is not None
    finally:
        await server.shutdown()
    _assert_port_free(port)
    _assert_database_free(tmp_path / "meter.db")


async def test_start_hands_one_piece_bodies_to_the_transport_unjoined(
        tmp_path: Path, upstream: str, stripe_double: RunningDouble) -> None:
    """``start`` applies ``proxy.request.wire.write_without_joining`` (the 64 KiB response's
    extra copy: docs/PERFORMANCE.md), on this Python or loop where it applies."""
    import sys

    from aiohttp import http_writer

    from proxy.request.wire import WRITEV_MIN
    saved = (http_writer.SKIP_WRITELINES, http_writer.MIN_PAYLOAD_FOR_WRITELINES)
    http_writer.SKIP_WRITELINES, http_writer.MIN_PAYLOAD_FOR_WRITELINES = True, 2048
    try:
        stripe_double.state.add_meter("api_calls")
        server = await start(config_mod.load(_config(tmp_path, upstream, stripe_double, 0, 0)))
        await server.shutdown()
        applies = sys.version_info < (3, 12) or \
            type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        got = (http_writer.SKIP_WRITELINES, http_writer.MIN_PAYLOAD_FOR_WRITELINES)
        assert got == ((False, WRITEV_MIN) if applies else (True, 2048))
    finally:
        http_writer.SKIP_WRITELINES, http_writer.MIN_PAYLOAD_FOR_WRITELINES = saved


async def test_shutdown_goes_on_past_a_task_that_failed_and_one_that_does_not_stop(
        tmp_path: Path, upstream: str, stripe_double: RunningDouble,
        caplog: pytest.LogCaptureFixture) -> None:
    """A graceful task that died (its exception re-raised through the wait) aborted the
    shutdown before the final flush and the store's close; one that did not stop in time was
    said to be cancelled and was left running. Now: both logged, the final flush runs, the
    store closes and the database is free, the stuck task is cancelled."""
    stripe_double.state.add_meter("api_calls")
    server = await start(config_mod.load(_config(tmp_path, upstream, stripe_double, 0, 0)))

    async def failed() -> None:
        raise RuntimeError("died before shutdown")

    async def stuck() -> None:
        await asyncio.sleep(3600)

    dead = spawn("test-dead", failed())
    hung = spawn("test-hung", stuck())
    gone = spawn("test-gone", stuck())
    await asyncio.sleep(0)
    gone.cancel()                   # ended already: its CancelledError is not shutdown's
    await asyncio.sleep(0)
    server.graceful[:0] = [(lambda: None, dead), (lambda: None, gone), (lambda: None, hung)]
    caplog.set_level("INFO")
    async with asyncio.timeout(30):
        await server.shutdown(timeout=0.5)
    assert hung.cancelled()
    messages = [r.getMessage() for r in caplog.records]
    assert "task test-dead failed" in messages          # logged when it failed (spawn)
    assert "test-hung did not stop within 0.5s; cancelling" in messages
    assert any(m.startswith("final flush: ") for m in messages), messages
    _assert_database_free(tmp_path / "meter.db")
    server.rt.store.close()         # a second close is a no-op
