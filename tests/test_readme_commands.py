"""The README's first command, run exactly as written in a copy of the repository's tracked
files (what a fresh clone has), with that copy as the working directory.

The command is read from README.md (the first ```sh block that runs ``meterproxy demo``),
never copied here. It creates its own .venv inside the copy (pip's cache keeps that quick),
so the developer's environment is not used. Each curl line the demo prints is run as
printed, and the outcome its comment promises (``# -> STATUS[ ERROR_TYPE], billed: ...``)
is checked: the HTTP status, the error type, and the usage the admin API shows before and
after the line. Then Ctrl-C (SIGINT to the process group, as a terminal sends it) must stop
the demo cleanly.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent
READY = "Ctrl-C stops the demo."
PROMISE = re.compile(r"^# -> (?P<status>\d{3})(?: (?P<error>[a-z_]+))?, billed: "
                     r"(?P<billed>nothing|\d[^(]*?)\s*(?:\(.*\))?$")
BILLED_ITEM = re.compile(r"^(?P<qty>\d+(?:\.\d+)?) (?P<meter>[a-z_]+)$")
DEMO_CUSTOMERS = ("demo", "demo-prepaid")


def readme_demo_command() -> str:
    text = (ROOT / "README.md").read_text()
    for block in re.findall(r"^```sh\n(.*?)^```", text, flags=re.S | re.M):
        if "meterproxy demo" in block:
            return str(block).strip()
    raise AssertionError("README.md has no ```sh block that runs `meterproxy demo`")


def copy_tracked_files(dest: Path) -> int:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    n = 0
    for name in filter(None, files):
        src = ROOT / name
        if not src.is_file():          # deleted in the working tree, not yet committed
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / name)
        n += 1
    return n


def clean_env() -> dict[str, str]:
    """The caller's environment without the developer's virtualenv; the demo on free ports
    (this machine runs other suites: 8080 may be taken)."""
    venv = str(ROOT / ".venv")
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "METERPROXY_CONFIG")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and not p.startswith(venv))
    env["METERPROXY_DEMO_PORT"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def parse_promises(text: str) -> list[tuple[re.Match[str], str]]:
    """(promise, curl line) for every curl line the demo printed; each must have one."""
    lines = [ln.strip() for ln in text.splitlines()]
    pairs = []
    for i, line in enumerate(lines):
        if not line.startswith("curl "):
            continue
        m = PROMISE.match(lines[i - 1])
        assert m, f"curl line without a '# -> ...' promise above it: {line}"
        pairs.append((m, line))
    return pairs


def billed(spec: str) -> dict[str, Decimal]:
    if spec == "nothing":
        return {}
    out: dict[str, Decimal] = {}
    for item in spec.split(" + "):
        m = BILLED_ITEM.match(item.strip())
        assert m, f"unparseable billed item {item!r}"
        out[m["meter"]] = out.get(m["meter"], Decimal(0)) + Decimal(m["qty"])
    return out


def usage(admin: str, token: str) -> dict[str, Decimal]:
    """Usage per meter over both demo customers, as the admin API reports it."""
    total: dict[str, Decimal] = {}
    for cid in DEMO_CUSTOMERS:
        req = urllib.request.Request(f"{admin}/admin/customers/{cid}/usage",
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            for meter, q in orjson.loads(r.read())["meters"].items():
                total[meter] = total.get(meter, Decimal(0)) + Decimal(q)
    return total


def delta(before: dict[str, Decimal], after: dict[str, Decimal]) -> dict[str, Decimal]:
    return {m: after.get(m, Decimal(0)) - before.get(m, Decimal(0))
            for m in set(before) | set(after)
            if after.get(m, Decimal(0)) != before.get(m, Decimal(0))}


def run_curl(line: str) -> tuple[int, bytes]:
    out = subprocess.run(["bash", "-c", line], capture_output=True, timeout=30)
    assert out.returncode == 0, (line, out.stderr)
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    m = re.match(rb"HTTP/[\d.]+ (\d{3})", head)
    assert m, (line, out.stdout[:300])
    return int(m.group(1)), body


async def read_until(stream: asyncio.StreamReader, marker: str, deadline: float) -> str:
    text = ""
    while marker not in text:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} in time; output so far:\n{text}"
        try:
            line = await asyncio.wait_for(stream.readline(), left)
        except TimeoutError:
            raise AssertionError(f"no {marker!r} in time; output so far:\n{text}") from None
        assert line, f"the command ended before {marker!r}; output:\n{text}"
        text += line.decode(errors="replace")
    return text


def check_printed_lines(text: str, work: Path) -> None:
    """Run every printed curl line; check its promised status, error type and billing."""
    assert "Traceback" not in text, text
    admin = re.search(r"admin port\s+: (\S+)\s+\(admin token: (\S+)\)", text)
    assert admin, text
    config = re.search(r"config\s+: (\S+)", text)
    assert config and Path(config.group(1)) == work / ".demo" / "meterproxy.yaml", text
    assert (work / ".demo" / "demo.db").is_file()
    promises = parse_promises(text)
    assert len(promises) == 12, [line for _, line in promises]
    for promise, line in promises:
        before = usage(admin.group(1), admin.group(2))
        status, body = run_curl(line)
        assert status == int(promise["status"]), (line, status, body[:300])
        if promise["error"]:
            assert orjson.loads(body)["error"]["type"] == promise["error"], (line, body)
        after = usage(admin.group(1), admin.group(2))
        assert delta(before, after) == billed(promise["billed"]), (line, before, after)


async def stop(proc: asyncio.subprocess.Process) -> int:
    """Ctrl-C as a terminal sends it (SIGINT to the process group); SIGKILL if it hangs."""
    if proc.returncode is None:
        os.killpg(proc.pid, signal.SIGINT)
    try:
        return await asyncio.wait_for(proc.wait(), 60)
    except TimeoutError:
        os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise AssertionError("the demo did not stop within 60 s of SIGINT") from None


@pytest.mark.timeout(900)
async def test_readme_demo_command_as_written(tmp_path: Path) -> None:
    assert shutil.which("curl"), "curl is needed to run the demo's printed lines"
    command = readme_demo_command()
    assert "\n" not in command, command        # one command line, run as written
    work = tmp_path / "clone"
    work.mkdir()
    assert copy_tracked_files(work) > 50
    assert not (work / ".venv").exists() and not (work / ".demo").exists()
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", command, cwd=work, env=clean_env(), start_new_session=True,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    try:
        text = await read_until(proc.stdout, READY, time.monotonic() + 600)
        await asyncio.to_thread(check_printed_lines, text, work)
    finally:
        code = await stop(proc)
    rest = (await proc.stdout.read()).decode(errors="replace")
    assert code == 0, rest
    assert "Traceback" not in rest, rest
    assert "final flush" in rest, rest     # the shutdown sequence ran to its end
