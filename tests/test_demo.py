"""The README's run command: `meterproxy demo` starts everything and the printed curls work."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


async def test_demo_starts_and_its_curls_work(tmp_path: Path) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "demo", "--port", str(port), "--workdir", str(tmp_path),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    text = ""
    try:
        while "usage page" not in text:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, text
            text += line.decode()
        key = re.search(r"demo key\s+: (\S+)", text).group(1)  # type: ignore[union-attr]
        h = {"Authorization": f"Bearer {key}"}
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as s:
            async with s.get(base + "/v1/items", headers=h) as r:
                assert r.status == 200 and r.headers["X-Credits-Remaining"] == "4"
            async with s.post(base + "/v1/chat/completions", headers=h,
                              data='{"prompt_tokens": 12, "completion_tokens": 30}') as r:
                assert (await r.json())["usage"]["total_tokens"] == 42
                assert r.headers["X-Credits-Remaining"] == "3.958"
            async with s.get(base + "/v1/items") as r:
                assert r.status == 401
            async with s.get(base + "/_meter/usage", headers=h) as r:
                usage = await r.json()
                assert usage["meters"]["llm_tokens"]["quantity"] == "42"
            async with s.get(base + "/_meter/") as r:
                assert r.status == 200 and "<html" in (await r.text()).lower()
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 30)
    assert proc.returncode == 0
