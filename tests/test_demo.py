"""``meterproxy demo`` as users run it (the default and a relative ``--workdir``, the current
directory a fresh one), the one rule for relative paths, and file errors that name the
absolute path and the reason, with a clean exit code and no traceback."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from ruamel.yaml import YAML

from proxy import config as config_mod
from proxy.app import start
from tests.conftest import ADMIN_TOKEN, TEST_RULES, write_config

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "METERPROXY_DEMO_PORT": "0"}


def meterproxy(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=60)


async def run_demo(cwd: Path, *args: str, prefix: tuple[str, ...] = ()) -> str:
    """Start the demo in ``cwd`` (under the ``prefix`` command), check its first curls, stop
    it with SIGINT (exit 0)."""
    proc = await asyncio.create_subprocess_exec(
        *prefix, sys.executable, "-m", "proxy", "demo", *args, cwd=cwd, env=ENV,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    text = ""
    try:
        while "Ctrl-C stops the demo." not in text:
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            assert line, text
            text += line.decode()
        key = re.search(r"demo key\s+: (\S+)", text).group(1)  # type: ignore[union-attr]
        base = re.search(r"public port : (\S+)", text).group(1)  # type: ignore[union-attr]
        h = {"Authorization": f"Bearer {key}"}
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
                assert (await r.json())["meters"]["llm_tokens"]["quantity"] == "42"
    finally:
        proc.send_signal(signal.SIGINT)
        rest = await asyncio.wait_for(proc.stdout.read(), 60)
        await asyncio.wait_for(proc.wait(), 60)
    text += rest.decode()
    assert proc.returncode == 0, text
    assert "Traceback" not in text, text
    return text


async def test_demo_default_workdir_in_a_fresh_directory(tmp_path: Path) -> None:
    text = await run_demo(tmp_path)
    workdir = tmp_path / ".demo"
    assert f"config      : {workdir / 'meterproxy.yaml'}" in text
    assert sorted(p.name for p in workdir.iterdir() if not p.name.startswith("demo.db-")) == \
        ["demo.db", "meterproxy.yaml"]
    written = YAML(typ="safe").load((workdir / "meterproxy.yaml").read_text())
    assert written["storage"]["path"] == "demo.db"     # relative to the config file
    assert written["stripe"]["sink"] == "dry_run"       # chosen explicitly
    # the file names the ports the demo really bound, so CLI commands reach it
    assert written["listen"] == "127.0.0.1:" + re.search(r"public port : \S+:(\d+)", text)[1]  # type: ignore[index]


async def test_demo_as_an_unprivileged_user_says_nothing_about_memory_locks(tmp_path: Path) -> None:
    # a desktop user: no CAP_IPC_LOCK, an RLIMIT_MEMLOCK of 64 KiB; the demo does not try to
    # lock the WAL (storage.wal_memory_lock: false), so its first screen has no warning
    text = await run_demo(tmp_path, prefix=(
        "prlimit", "--memlock=65536:65536", "setpriv", "--inh-caps", "-ipc_lock",
        "--bounding-set", "-ipc_lock", "--"))
    assert "could not lock" not in text, text
    written = YAML(typ="safe").load((tmp_path / ".demo" / "meterproxy.yaml").read_text())
    assert written["storage"]["wal_memory_lock"] is False


async def test_demo_relative_workdir(tmp_path: Path) -> None:
    (tmp_path / "here").mkdir()
    await run_demo(tmp_path / "here", "--workdir", "../there/demo")
    assert (tmp_path / "there" / "demo" / "demo.db").is_file()
    assert not (tmp_path / "here" / "there").exists()
    assert not (tmp_path / "there" / "demo" / "there").exists()


async def test_relative_paths_in_a_config_file_resolve_against_its_directory(
        tmp_path: Path, upstream: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """storage.path and rules in conf/meterproxy.yaml, used from another directory."""
    conf = tmp_path / "conf"
    (conf / "rules").mkdir(parents=True)
    (conf / "rules" / "r.yaml").write_text(TEST_RULES)
    cfg_file = write_config(conf, upstream, rules="rules/r.yaml",
                            storage={"path": "data/m.db"})
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = config_mod.load("../conf/meterproxy.yaml")
    assert cfg.db_path() == conf / "data" / "m.db"
    assert cfg.rule_paths() == [conf / "rules" / "r.yaml"]
    server = await start(cfg)
    try:
        url = f"http://127.0.0.1:{server.admin_port}/admin/customers"
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with aiohttp.ClientSession() as s, \
                s.post(url, json={"id": "rel"}, headers=headers) as r:
            assert r.status == 201
    finally:
        await server.shutdown()
    assert (conf / "data" / "m.db").is_file()
    assert not (tmp_path / "elsewhere" / "data").exists()
    assert not (tmp_path / "data").exists()
    # the CLI run from yet another directory opens the same database
    out = meterproxy("customers", "list", "--config", str(cfg_file.relative_to(tmp_path)),
                     cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert '"id": "rel"' in out.stdout
    # a path given on the command line resolves against the current directory
    out = meterproxy("customers", "show", "rel", "--db", "conf/data/m.db", cwd=tmp_path)
    assert out.returncode == 0, out.stderr


def test_file_errors_name_the_absolute_path_and_the_reason(tmp_path: Path) -> None:
    def fails(code: int, *args: str, cwd: Path = tmp_path) -> str:
        out = meterproxy(*args, cwd=cwd)
        assert out.returncode == code, (args, out)
        assert "Traceback" not in out.stderr, out.stderr
        assert out.stdout == ""
        return out.stderr.strip().splitlines()[-1]

    assert fails(2, "serve", "--config", "nope.yaml") == \
        f"cannot read config {tmp_path / 'nope.yaml'}: does not exist"
    (tmp_path / "adir.yaml").mkdir()
    assert fails(2, "serve", "--config", "adir.yaml") == \
        f"cannot read config {tmp_path / 'adir.yaml'}: it is a directory"

    cfg = tmp_path / "c" / "meterproxy.yaml"
    cfg.parent.mkdir()
    cfg.write_text("admin: {token: a-long-admin-token}\nrules: missing.yaml\n"
                   "storage: {path: nodir/m.db}\nstripe: {sink: dry_run}\n")
    assert fails(1, "customers", "list", "--config", "c/meterproxy.yaml") == (
        f"meterproxy: cannot open database {tmp_path / 'c' / 'nodir' / 'm.db'}:"
        f" directory {tmp_path / 'c' / 'nodir'} does not exist")
    assert fails(2, "serve", "--config", str(cfg)) == \
        f"{tmp_path / 'c' / 'missing.yaml'}:1:1: cannot read rules file: No such file or directory"
    (tmp_path / "c" / "missing.yaml").write_text(TEST_RULES)
    (tmp_path / "c" / "nodir").write_text("a file where a directory should be")
    assert fails(1, "serve", "--config", str(cfg)) == (
        f"meterproxy: cannot open database {tmp_path / 'c' / 'nodir' / 'm.db'}:"
        f" {tmp_path / 'c' / 'nodir'} is not a directory")
    assert fails(1, "customers", "list", "--db", "c/missing.yaml") == (
        f"meterproxy: cannot open database {tmp_path / 'c' / 'missing.yaml'}:"
        " file is not a database")
    assert fails(1, "demo", "--workdir", "c/nodir") == \
        f"meterproxy: cannot use workdir {tmp_path / 'c' / 'nodir'}: it exists and is not a directory"
    assert fails(1, "demo", "--workdir", "c/nodir/sub") == \
        f"meterproxy: cannot create workdir {tmp_path / 'c' / 'nodir' / 'sub'}: a parent is not a directory"
