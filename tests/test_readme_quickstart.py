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

from tests.ports import PortInUse, in_use, with_free_ports
from tests.test_readme_commands import ROOT, clean_env, copy_tracked_files


def quickstart_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Five-minute quickstart", 1)
    assert len(section) == 2, "README.md has no 'Five-minute quickstart' section"
    m = re.search(r"^```sh\n(.*?)^```", section[1], flags=re.S | re.M)
    assert m, "the quickstart section has no ```sh block"
    return m.group(1)


def test_quickstart_block_runs_as_written(tmp_path: Path) -> None:
    attempts = iter(range(100))

    def run(ports: list[int]) -> tuple[Path, int, subprocess.CompletedProcess[str]]:
        """The block in a fresh copy of the repository, on ports given in advance (it reads
        them from the environment); again on new ones if one was taken meanwhile."""
        upstream_port, port, admin_port = ports
        work = tmp_path / f"try{next(attempts)}"
        work.mkdir()
        copy_tracked_files(work)
        (work / ".venv").symlink_to(ROOT / ".venv")
        env = clean_env()
        env.update(UPSTREAM_URL=f"http://127.0.0.1:{upstream_port}", PORT=str(port),
                   ADMIN_PORT=str(admin_port))
        with (tmp_path / f"{work.name}-upstream.log").open("w+b") as log:
            upstream = subprocess.Popen([str(ROOT / ".venv/bin/python"), "-m",
                                         "proxy.demo.upstream", str(upstream_port)], cwd=work,
                                        env=env, stdout=subprocess.DEVNULL, stderr=log)
            try:
                done = subprocess.run(["bash", "-e", "-c", quickstart_block()], cwd=work,
                                      env=env, capture_output=True, text=True, timeout=120)
            finally:
                upstream.terminate()
                upstream.wait(10)
            log.seek(0)
            upstream_err = log.read()
        if done.returncode != 0 and in_use(done.stdout + done.stderr + upstream_err.decode()):
            raise PortInUse
        return work, port, done

    work, port, done = with_free_ports(3, run)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert out.startswith("ok: ")                               # rules check
    assert '{"items":[{"id":1,"name":"widget"},{"id":2,"name":"gadget"}]}' in out
    usage = orjson.loads(out[out.rindex('{"customer"'):].strip())
    assert usage["customer"] == "acme"
    assert usage["meters"] == {"api_calls": "1"}                # the one call, billed once
    assert (work / "mymeter" / "meterproxy.db").is_file()   # relative to the config file
    assert f"listening on 127.0.0.1:{port}" in done.stderr
