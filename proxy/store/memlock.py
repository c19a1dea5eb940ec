"""A file's page-cache pages kept in memory: a read-only shared mapping locked with mlock(2).

Why the store wants it for its WAL (docs/resources.md, "The WAL's pages locked in memory"):
a commit's ``pwrite`` of a WAL frame (a 24-byte header and a page: 4,120 bytes) covers the
end of a file page only partly, and when that page is no longer in the page cache the
kernel reads the block back first, synchronously, on the event loop. Page-cache pages that
are only written (never read or mapped) look unused to the kernel's reclaim, so proactive
reclaim (DAMON's ``pageout``, memory.reclaim, a cgroup near its limit) evicts the WAL's
pages even with memory free. Pages of a locked mapping are unevictable: writes through
``pwrite`` land in the same page-cache pages, so they stay.

Needs ``CAP_IPC_LOCK`` or an ``RLIMIT_MEMLOCK`` of at least the locked size; ``lock_file``
first raises the soft limit towards the hard one (allowed without privilege). Linux (and
any libc with mmap/mlock); elsewhere ``lock_file`` raises OSError(ENOSYS).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import resource
from pathlib import Path

_PROT_READ = 0x1
_MAP_SHARED = 0x01
_MAP_FAILED = ctypes.c_void_p(-1).value


def _load_libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mlock.restype = ctypes.c_int
    libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


_LIBC = _load_libc()     # once, at import


class LockedFile:
    """``size`` bytes of a file, mapped read-only and locked in memory until ``close()``."""

    def __init__(self, path: Path, addr: int, size: int) -> None:
        self.path = path
        self.size = size
        self._addr: int | None = addr

    def close(self) -> None:
        """Unlock and unmap (idempotent). The pages stay cached, now evictable."""
        addr, self._addr = self._addr, None
        if addr is not None and _LIBC is not None:
            _LIBC.munmap(addr, self.size)

    @property
    def closed(self) -> bool:
        return self._addr is None


def _allow(size: int) -> None:
    """Raise the soft RLIMIT_MEMLOCK to the hard one when it is below ``size`` (an
    unprivileged process may; root's CAP_IPC_LOCK ignores the limit anyway)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != resource.RLIM_INFINITY and soft < size and soft != hard:
        # refused (a seccomp filter's EPERM, which CPython raises as ValueError, as EINVAL):
        # mlock then says whether the lock is permitted, with its own errno
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))


def lock_file(path: Path, size: int) -> LockedFile:
    """Map the first ``size`` bytes of ``path`` (which must be at least that long) and lock
    them: every page is read into the page cache now (an allocated but unwritten block reads
    as zeros without I/O) and stays there. Raises OSError: EPERM/ENOMEM/EAGAIN when the
    process may not lock that much (``RLIMIT_MEMLOCK``), ENOSYS without a C library."""
    if _LIBC is None:
        raise OSError(errno.ENOSYS, "no C library to call mlock through")
    if size <= 0:
        raise OSError(errno.EINVAL, f"cannot lock {size} bytes")
    _allow(size)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size < size:
            raise OSError(errno.EINVAL, f"{path} is shorter than {size} bytes")
        addr = _LIBC.mmap(None, size, _PROT_READ, _MAP_SHARED, fd, 0)
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap {path}: {os.strerror(err)}")
    finally:
        os.close(fd)        # the mapping keeps the file
    if _LIBC.mlock(addr, size) != 0:
        err = ctypes.get_errno()
        _LIBC.munmap(addr, size)
        raise OSError(err, f"mlock {size} bytes of {path}: {os.strerror(err)}")
    return LockedFile(path, addr, size)
