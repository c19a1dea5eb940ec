"""``workers: N``: one sidecar as N worker processes on one port, supervised.

The supervisor (the process ``meterproxy serve`` started) serves nothing itself: it starts
N copies of its own command line with ``METERPROXY_WORKER=<1..N>`` in the environment. Each
worker binds the public and admin ports with ``SO_REUSEPORT`` (the kernel spreads
connections over them) and is a fleet member of its own: member id ``<member_id>-w<i>``,
journal ``<storage.path stem>.w<i><suffix>`` (config ``workers`` needs
``storage.backend: postgres``, so leases, the usage ledger and the flusher's leadership are
shared through PostgreSQL exactly as between sidecars).

Supervision:
- a worker that exits while the supervisor is not stopping is restarted (at most once per
  ``RESTART_BACKOFF`` seconds per worker; its journal resumes shipping under the same
  member id, so nothing it journaled is lost or counted twice);
- SIGTERM or SIGINT to the supervisor is passed to every worker, which drains as a single
  process does (stop accepting, finish requests, commit, ship, final flush, release
  leases; a worker still starting up simply ends); the supervisor waits up to
  ``DRAIN_TIMEOUT`` for them, then SIGKILLs what is left, and exits 0 when every worker
  exited 0.
- a supervisor that dies without passing anything on (SIGKILL, OOM killer) takes its
  workers with it: each worker asks the kernel at start for SIGTERM when its parent dies
  (Linux ``PR_SET_PDEATHSIG``, ``die_with_supervisor``) and so drains as above; a worker
  whose supervisor was already gone before it asked exits at once. No orphan keeps serving
  the port. (Elsewhere than Linux the call is not available: the worker logs that it will
  outlive a killed supervisor.)
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from types import FrameType

log = logging.getLogger("meterproxy.workers")

WORKER_ENV = "METERPROXY_WORKER"
SUPERVISOR_ENV = "METERPROXY_SUPERVISOR_PID"
PR_SET_PDEATHSIG = 1          # linux/prctl.h
RESTART_BACKOFF = 1.0
DRAIN_TIMEOUT = 90.0
POLL = 0.2


def _command() -> list[str]:
    """This process's own command line (``python -m proxy serve ...`` or the console
    script), to run as a worker."""
    return [sys.executable, *sys.orig_argv[1:]]


def supervise(workers: int) -> int:
    cmd = _command()
    stopping = threading.Event()

    def stop(signum: int, _frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def start(i: int) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(cmd, env={**os.environ, WORKER_ENV: str(i),
                                       SUPERVISOR_ENV: str(os.getpid())})
        log.info("worker %d started (pid %d)", i, p.pid)
        return p

    procs = {i: start(i) for i in range(1, workers + 1)}
    started = {i: time.monotonic() for i in procs}
    while not stopping.wait(POLL):
        for i, p in list(procs.items()):
            if stopping.is_set():
                break
            if p.poll() is None:
                continue
            log.error("worker %d (pid %d) exited with %s; restarting", i, p.pid, p.returncode)
            time.sleep(max(0.0, started[i] + RESTART_BACKOFF - time.monotonic()))
            procs[i], started[i] = start(i), time.monotonic()
    log.info("stopping %d workers", len(procs))
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + DRAIN_TIMEOUT
    codes = []
    for i, p in procs.items():
        try:
            codes.append(p.wait(max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            log.error("worker %d did not stop within %.0fs; killing it", i, DRAIN_TIMEOUT)
            p.kill()
            codes.append(p.wait())
    # -SIGTERM: a worker still starting up (no handler yet: nothing served, nothing to drain)
    return 0 if all(c in (0, -signal.SIGTERM) for c in codes) else 1


def die_with_supervisor() -> None:
    """In a worker, before it serves: SIGTERM this process when the supervisor dies (it then
    drains like any stopped worker). The supervisor is this process's parent; if it is
    already gone (it died before the request took effect), exit now."""
    expected = os.environ.get(SUPERVISOR_ENV)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            log.warning("prctl(PR_SET_PDEATHSIG) failed (%s): this worker will outlive a "
                        "killed supervisor", os.strerror(err))
    else:
        log.warning("not Linux: this worker will outlive a killed supervisor")
    if expected is not None and os.getppid() != int(expected):
        log.error("the supervisor (pid %s) is gone; worker exiting", expected)
        raise SystemExit(0)
