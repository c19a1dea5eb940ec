"""proxy/store/memlock.py and the store's use of it (storage.wal_memory_lock): the WAL's
preallocated pages stay in the page cache whatever the kernel is asked to drop, the lock
follows the WAL through its truncates, and a process not permitted to lock runs on unlocked
with one warning.

Eviction is asked for with ``posix_fadvise(DONTNEED)`` (what reclaim does to a clean page)
and read with util-linux's ``fincore``; both need a disk-backed file (tmpfs pages are not
page cache in that sense), hence ``disk_dir``.
"""

from __future__ import annotations

import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy import metrics
from proxy.store import db as dbmod
from proxy.store.db import Store
from proxy.store.memlock import lock_file
from tests.test_store import _commit_each
from tests.test_store_wal import wal_due_for_idle_truncate

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


@pytest.fixture
def disk_dir(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path``, or a directory on a disk file system when that is tmpfs (TMPDIR=/dev/shm)."""
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True,
                        text=True, check=True).stdout.strip()
    if fs != "tmpfs":
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir=ROOT) as d:
        yield Path(d)


def _resident(path: Path) -> int:
    """Bytes of ``path`` in the page cache now."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip())


def _evict(path: Path) -> None:
    """Ask the kernel to drop the file's cached pages (written back first: clean pages go)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _locked_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1])
    raise AssertionError("no VmLck in /proc/self/status")


def test_locked_pages_stay_cached_when_the_kernel_drops_the_rest(disk_dir: Path) -> None:
    locked, other = disk_dir / "locked", disk_dir / "other"
    for f in (locked, other):
        f.write_bytes(os.urandom(MiB))
    before = _locked_kib()
    lock = lock_file(locked, MiB)
    try:
        assert _locked_kib() - before == MiB // 1024
        for f in (locked, other):
            _evict(f)
        assert (_resident(locked), _resident(other)) == (MiB, 0)
    finally:
        lock.close()
    assert lock.closed and _locked_kib() == before
    _evict(locked)
    assert _resident(locked) == 0                   # unlocked: evictable again
    lock.close()                                    # idempotent


def test_lock_file_refuses_a_range_past_the_end_and_nothing(disk_dir: Path) -> None:
    f = disk_dir / "short"
    f.write_bytes(b"x" * 4096)
    with pytest.raises(OSError, match="shorter"):
        lock_file(f, 8192)
    with pytest.raises(OSError):
        lock_file(f, 0)


async def test_the_store_locks_its_preallocated_wal_and_relocks_it_after_the_idle_truncate(
        disk_dir: Path) -> None:
    limit = 64 * 1024
    db = disk_dir / "s.db"
    wal = disk_dir / "s.db-wal"
    size = dbmod.WAL_FILE_FACTOR * limit
    before = _locked_kib()
    store = await wal_due_for_idle_truncate(db, limit, wal_memory_lock=True)
    try:
        assert store.wal_locked_bytes == size == metrics.wal_locked_bytes._value.get()
        _evict(wal)
        assert _resident(wal) >= size               # the preallocated part stays cached
        await store.checkpoint_once()               # nothing written: the idle TRUNCATE
        assert wal.stat().st_size == size           # cut, then allocated again ...
        assert store.wal_locked_bytes == size       # ... and locked again
        assert _locked_kib() - before == size // 1024   # the old mapping is gone
        _evict(wal)
        assert _resident(wal) == size
        _commit_each(store, range(1000, 1010))      # commits write into the locked pages
        _evict(wal)
        assert _resident(wal) >= size
    finally:
        store.close()
    assert store.wal_locked_bytes == 0 == metrics.wal_locked_bytes._value.get()
    assert _locked_kib() == before


async def test_a_store_without_the_lock_leaves_its_wal_evictable(disk_dir: Path) -> None:
    store = Store.open(disk_dir / "s.db", wal_truncate_size=64 * 1024, wal_memory_lock=False)
    try:
        _commit_each(store, range(10))
        assert store.wal_locked_bytes == 0
        _evict(disk_dir / "s.db-wal")
        assert _resident(disk_dir / "s.db-wal") == 0
    finally:
        store.close()


_CHILD = """
import asyncio, logging, resource, sqlite3, sys
from pathlib import Path
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
soft, hard = int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_MEMLOCK, (soft, hard))
from proxy.store.db import Store
from tests.test_store import _commit_each

async def main() -> None:
    store = Store.open(Path(sys.argv[1]), wal_truncate_size=1024 * 1024, wal_memory_lock=True)
    _commit_each(store, range(5))
    print("locked", store.wal_locked_bytes, "soft", resource.getrlimit(resource.RLIMIT_MEMLOCK)[0])
    store.close()

asyncio.run(main())
print("rows", sqlite3.connect(sys.argv[1]).execute("SELECT count(*) FROM audit").fetchone()[0])
"""


def _child(db: Path, soft: int, hard: int) -> subprocess.CompletedProcess[str]:
    """A store opened in a process without CAP_IPC_LOCK (dropped from the inheritable and
    bounding sets: root's exec then lacks it), with RLIMIT_MEMLOCK (soft, hard)."""
    return subprocess.run(
        ["setpriv", "--inh-caps", "-ipc_lock", "--bounding-set", "-ipc_lock", "--",
         sys.executable, "-c", _CHILD, str(db), str(soft), str(hard)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)


def test_a_process_not_permitted_to_lock_runs_on_unlocked_with_one_warning(disk_dir: Path) -> None:
    run = _child(disk_dir / "s.db", 64 * 1024, 64 * 1024)
    assert "locked 0 soft 65536" in run.stdout
    assert "rows 5" in run.stdout                   # nothing lost for it
    assert run.stderr.count("could not lock the WAL's 2097152 bytes in memory") == 1, run.stderr
    assert "CAP_IPC_LOCK" in run.stderr


def test_a_soft_memlock_limit_below_the_hard_one_is_raised_to_lock(disk_dir: Path) -> None:
    run = _child(disk_dir / "s.db", 64 * 1024, 8 * MiB)
    assert f"locked {2 * MiB} soft {8 * MiB}" in run.stdout, run.stdout + run.stderr
    assert "rows 5" in run.stdout
    assert "could not lock" not in run.stderr


async def test_a_refused_setrlimit_is_not_fatal(disk_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    # setrlimit refused (a seccomp filter's EPERM: CPython raises ValueError): the store
    # opens; mlock decides (here the limit is not raised, so a permitted lock still locks)
    def refuse(_res: int, _lim: tuple[int, int]) -> None:
        raise ValueError("not allowed to raise maximum limit")

    monkeypatch.setattr(resource, "getrlimit", lambda _res: (64 * 1024, 64 * MiB))
    monkeypatch.setattr(resource, "setrlimit", refuse)
    store = Store.open(disk_dir / "s.db", wal_truncate_size=64 * 1024, wal_memory_lock=True)
    try:
        _commit_each(store, range(5))
    finally:
        store.close()


async def test_the_wal_is_locked_again_after_a_busy_preallocate(
        disk_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    limit = 64 * 1024
    size = dbmod.WAL_FILE_FACTOR * limit
    store = await wal_due_for_idle_truncate(disk_dir / "s.db", limit, wal_memory_lock=True)
    real, calls = dbmod.preallocate_wal, []

    def busy_once(conn: sqlite3.Connection, wal: Path, n: int) -> bool:
        # a commit took the write lock between the TRUNCATE and preallocate's BEGIN IMMEDIATE
        calls.append(n)
        return False if len(calls) == 1 else real(conn, wal, n)

    monkeypatch.setattr(dbmod, "preallocate_wal", busy_once)
    wal = disk_dir / "s.db-wal"
    try:
        await store.checkpoint_once()               # the idle TRUNCATE; its preallocate busy
        assert store.wal_locked_bytes == 0 and wal.stat().st_size < size
        _commit_each(store, range(1000, 1010))      # traffic well under the limit
        await store.checkpoint_once()               # the next tick pays what is owed
        assert len(calls) == 2
        assert wal.stat().st_size == size and store.wal_locked_bytes == size
        _evict(wal)
        assert _resident(wal) == size
        await store.checkpoint_once()               # owed no more: not tried again
        assert len(calls) == 2
    finally:
        store.close()


async def test_the_locked_bytes_metric_counts_every_open_store(disk_dir: Path) -> None:
    size = dbmod.WAL_FILE_FACTOR * 64 * 1024
    base = metrics.wal_locked_bytes._value.get()
    a = Store.open(disk_dir / "a.db", wal_truncate_size=64 * 1024, wal_memory_lock=True)
    b = Store.open(disk_dir / "b.db", wal_truncate_size=64 * 1024, wal_memory_lock=True)
    try:
        try:
            assert metrics.wal_locked_bytes._value.get() - base == 2 * size
        finally:
            a.close()
        assert metrics.wal_locked_bytes._value.get() - base == size    # b's lock still counts
    finally:
        b.close()
    assert metrics.wal_locked_bytes._value.get() == base
