"""A meterproxy server in a subprocess, for the tests that SIGKILL or SIGTERM it.

Ports: the config's ``listen`` and ``admin_listen`` should be ``127.0.0.1:0`` (what
``write_config`` writes by default). The first start binds free ports itself (no port is
picked by the test and then lost to a parallel process) and ``wait_ready`` reads them from
the proxy's "meterproxy listening on" log line (``url``, ``admin_url``); the config is then
pinned to them, so a restart comes back on the same ports, like a real deployment. A port
that must be known before the start (fixed in the config: the workers of one sidecar share
it) may be taken by a parallel process first: a start that fails with EADDRINUSE is retried
on other free ports, and ``url`` / ``admin_url`` follow: read them from this object.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from tests.conftest import free_port
from tests.ports import in_use

ROOT = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(rb"meterproxy listening on (\S+):(\d+) \(public\) and (\S+):(\d+)"
                        rb" \(admin\)")
_PORT_RETRIES = 5


def set_listen(cfg: Path, listen: str, admin_listen: str) -> None:
    """Rewrite the top-level ``listen`` / ``admin_listen`` of a config ``write_config`` made."""
    text = cfg.read_text()
    text, n = re.subn(r"(?m)^listen: .*$", f"listen: {listen}", text)
    text, m = re.subn(r"(?m)^admin_listen: .*$", f"admin_listen: {admin_listen}", text)
    assert (n, m) == (1, 1), f"{cfg}: no top-level listen/admin_listen"
    cfg.write_text(text)


class ProxyProcess:
    def __init__(self, cfg: Path, log: Path) -> None:
        self.cfg = cfg
        self.log = log
        self.url = ""            # set by wait_ready: the public port of the running process
        self.admin_url = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._log_from = 0       # where this start's lines begin in the log

    def spawn(self) -> None:
        with self.log.open("ab") as fh:
            fh.write(f"\n==== start {self.starts + 1} ====\n".encode())
            fh.flush()
            self._log_from = fh.tell()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "serve", "--config", str(self.cfg)],
                cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.starts += 1

    def _this_start(self) -> bytes:
        with self.log.open("rb") as fh:
            fh.seek(self._log_from)
            return fh.read()

    async def wait_ready(self, timeout: float = 20.0) -> None:
        """Until the process listens (its ports read from its log) and /healthz answers
        200. A start that failed because a port was taken is retried on free ports."""
        deadline = time.monotonic() + timeout
        retries = 0
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    if in_use(self._this_start()) and retries < _PORT_RETRIES:
                        # a port fixed in the config was taken meanwhile: other free ones
                        # (picked here, not 0: the workers of one sidecar share a port)
                        retries += 1
                        set_listen(self.cfg, f"127.0.0.1:{free_port()}",
                                   f"127.0.0.1:{free_port()}")
                        self.spawn()
                        continue
                    raise AssertionError(f"proxy exited during start-up; see {self.log}")
                found = _LISTENING.search(self._this_start())
                if found is not None:
                    host, port, ahost, aport = (g.decode() for g in found.groups())
                    self.url, self.admin_url = f"http://{host}:{port}", f"http://{ahost}:{aport}"
                    set_listen(self.cfg, f"{host}:{port}", f"{ahost}:{aport}")
                    try:
                        async with s.get(self.admin_url + "/healthz") as r:
                            if r.status == 200:
                                return
                    except aiohttp.ClientError:
                        pass
                await asyncio.sleep(0.05)
        raise AssertionError("proxy did not become ready")

    def kill(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, "proxy died on its own"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def ensure_dead(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
