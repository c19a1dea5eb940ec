"""The README's five-minute quickstart, run as written.

The block is read from README.md (the ```sh block under "Five-minute quickstart"), never copied
here, and run with ``bash -e`` in a copy of the repository's tracked files, exactly as a reader
pastes it after the README's first command. The reader's API is a real example upstream on a
free port (the block reads ``UPSTREAM_URL``, ``PORT`` and ``ADMIN_PORT`` from the environment,
as it documents); ``.venv`` in the copy is the suite's own environment, standing in for the one
the README's first command creates (``test_readme_commands.py`` runs that command itself).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import orjson

from tests.conftest import free_port
from tests.test_readme_commands import ROOT, clean_env, copy_tracked_files


def quickstart_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Five-minute quickstart", 1)
    assert len(section) == 2, "README.md has no 'Five-minute quickstart' section"
    m = re.search(r"^```sh\n(.*?)^```", section[1], flags=re.S | re.M)
    assert m, "the quickstart section has no ```sh block"
    return m.group(1)


def test_quickstart_block_runs_as_written(tmp_path: Path) -> None:
    copy_tracked_files(tmp_path)
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    upstream_port, port, admin_port = free_port(), free_port(), free_port()
    env = clean_env()
    env.update(UPSTREAM_URL=f"http://127.0.0.1:{upstream_port}", PORT=str(port),
               ADMIN_PORT=str(admin_port))
    upstream = subprocess.Popen([str(ROOT / ".venv/bin/python"), "-m", "proxy.demo.upstream",
                                 str(upstream_port)], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        done = subprocess.run(["bash", "-e", "-c", quickstart_block()], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
    finally:
        upstream.terminate()
        upstream.wait(10)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert out.startswith("ok: ")                               # rules check
    assert '{"items":[{"id":1,"name":"widget"},{"id":2,"name":"gadget"}]}' in out
    usage = orjson.loads(out[out.rindex('{"customer"'):].strip())
    assert usage["customer"] == "acme"
    assert usage["meters"] == {"api_calls": "1"}                # the one call, billed once
    assert (tmp_path / "mymeter" / "meterproxy.db").is_file()   # relative to the config file
    assert f"listening on 127.0.0.1:{port}" in done.stderr
