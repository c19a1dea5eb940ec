"""A meterproxy server in a subprocess, for the tests that SIGKILL or SIGTERM it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent


class ProxyProcess:
    def __init__(self, cfg: Path, log: Path, admin_url: str) -> None:
        self.cfg = cfg
        self.log = log
        self.admin_url = admin_url
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def spawn(self) -> None:
        with self.log.open("ab") as fh:
            fh.write(f"\n==== start {self.starts + 1} ====\n".encode())
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "serve", "--config", str(self.cfg)],
                cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.starts += 1

    async def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                assert self.proc is not None and self.proc.poll() is None, \
                    f"proxy exited during start-up; see {self.log}"
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
