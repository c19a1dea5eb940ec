"""The command line, run as a real subprocess against a running proxy: help everywhere,
``--config`` anywhere (and ``METERPROXY_CONFIG``), usage mistakes exit 2 with usage,
failures exit 1 with one clear line, ``dead-letters replay`` fails when the event is not
delivered, times in RFC 3339."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from pathlib import Path

import orjson
import pytest

from proxy.cli import build_parser
from proxy.cli import main as cli_main
from tests.conftest import ROOT, Proxy, ProxyFactory, write_config
from tests.ports import held_port
from tests.proxy_process import set_listen

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


async def cli(*args: str, env: dict[str, str] | None = None,
              cwd: Path = ROOT) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, cwd=cwd,
        env=env if env is not None else
        {k: v for k, v in os.environ.items() if k != "METERPROXY_CONFIG"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def running(make_proxy: ProxyFactory) -> tuple[Proxy, str]:
    p = await make_proxy()                   # binds free ports; the CLI reads them from the
    cfg = p.tmp / "meterproxy.yaml"          # config file, so they are written into it
    set_listen(cfg, f"127.0.0.1:{p.server.public_port}", f"127.0.0.1:{p.server.admin_port}")
    return p, str(cfg)


def _parsers(p: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    out = [(p.prog, p)]
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sp in a.choices.values():
                out.extend(_parsers(sp))
    return out


def test_every_command_and_option_has_help() -> None:
    parsers = _parsers(build_parser())
    assert len(parsers) == 28
    for prog, p in parsers:
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            assert a.help and a.help != argparse.SUPPRESS, (prog, a.dest)
    helps = {prog: " ".join(p.format_help().split()) for prog, p in parsers}
    grant = helps["meterproxy credits grant"]
    assert "--priority 0-100 0 burns first, 100 last (default: 50)" in grant
    assert "--credits N" in grant and "(default: $METERPROXY_CONFIG, else meterproxy.yaml)" in grant
    assert "--workdir DIR" in helps["meterproxy demo"]
    assert "(default: .demo)" in helps["meterproxy demo"]
    assert "--from TIME" in helps["meterproxy usage"]
    assert "FROM_" not in "".join(helps.values())


async def test_help_runs(tmp_path: Path) -> None:
    code, out, err = await cli("--help", cwd=tmp_path)
    assert code == 0 and err == ""
    assert out.startswith("usage: meterproxy [-h] [--config FILE] COMMAND ...")
    code, out, _ = await cli("dead-letters", "replay", "--help", cwd=tmp_path)
    assert code == 0 and "--restamp" in out


async def test_config_before_after_and_from_the_environment(
        running: tuple[Proxy, str], tmp_path: Path) -> None:
    p, cfg = running
    await p.admin("POST", "/admin/customers", {"id": "acme"}, expect=201)
    await p.admin("POST", "/admin/customers/acme/grants", {"credits": "7"}, expect=201)
    env = {k: v for k, v in os.environ.items() if k != "METERPROXY_CONFIG"}
    missing = str(tmp_path / "missing.yaml")
    for args, extra_env in ((("credits", "list", "acme", "--config", cfg), {}),
                            (("--config", cfg, "credits", "list", "acme"), {}),
                            (("credits", "list", "acme"), {"METERPROXY_CONFIG": cfg}),
                            # the command line beats the environment; the last --config wins
                            (("credits", "list", "acme", "--config", cfg),
                             {"METERPROXY_CONFIG": missing}),
                            (("--config", missing, "credits", "list", "--config", cfg, "acme"),
                             {})):
        code, out, err = await cli(*args, env={**env, **extra_env}, cwd=tmp_path)
        assert code == 0, (args, err)
        assert orjson.loads(out)["balance"] == "7", out
    code, _, err = await cli("credits", "list", "acme", env={**env, "METERPROXY_CONFIG": missing},
                             cwd=tmp_path)
    assert (code, err) == (2, f"cannot read config {missing}: does not exist\n")
    (tmp_path / "empty").mkdir()
    code, _, err = await cli("credits", "list", "acme", env=env, cwd=tmp_path / "empty")
    assert (code, err) == (
        2, f"cannot read config {tmp_path / 'empty' / 'meterproxy.yaml'}: does not exist\n")


@pytest.mark.parametrize(("args", "says"), [
    (("dead-letters", "replay"), "the following arguments are required: ID"),
    (("dead-letters", "replay", "abc"), "argument ID: invalid int value: 'abc'"),
    (("credits", "grant", "acme"), "the following arguments are required: --credits"),
    (("credits", "grant"), "the following arguments are required: CUSTOMER, --credits"),
    (("customers", "create"), "the following arguments are required: CUSTOMER"),
    (("keys", "create"), "the following arguments are required: --customer"),
    (("usage", "acme", "--from", "yesterday"), "argument --from: 'yesterday' is not an RFC 3339"),
    (("frobnicate",), "argument COMMAND: invalid choice: 'frobnicate'"),
    (("credits",), "the following arguments are required: ACTION"),
])
async def test_argument_mistakes_are_usage_errors(args: tuple[str, ...], says: str,
                                                  tmp_path: Path) -> None:
    code, out, err = await cli(*args, cwd=tmp_path)
    assert code == 2 and out == ""
    assert err.startswith("usage: meterproxy "), err
    assert says in err, err
    assert "Traceback" not in err


async def test_replay_fails_while_the_event_is_not_delivered(
        running: tuple[Proxy, str], tmp_path: Path) -> None:
    p, cfg = running
    key = await p.customer_with_key("nostripe")
    async with p.session.get(p.url + "/v1/items", headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200
    code, out, err = await cli("flush", "--config", cfg, cwd=tmp_path)
    assert code == 0, err
    assert orjson.loads(out)["dead"] == 1
    code, out, err = await cli("dead-letters", "list", "--config", cfg, cwd=tmp_path)
    assert code == 0, err
    [dead] = orjson.loads(out)["dead_letters"]
    assert RFC3339.match(dead["dead_at"]) and RFC3339.match(dead["timestamp"])
    # options before the positional, as people type them
    code, out, err = await cli("dead-letters", "replay", "--config", cfg, str(dead["id"]),
                               cwd=tmp_path)
    assert code == 1
    assert orjson.loads(out)["replayed"]["status"] == "dead"
    assert err == (f"meterproxy: dead letter {dead['id']} is dead again: customer 'nostripe'"
                   " has no stripe_customer_id\n")
    code, out, err = await cli("dead-letters", "replay", "--config", cfg, "99", cwd=tmp_path)
    assert (code, out) == (1, "")
    admin = p.admin_url
    assert err == f"meterproxy: POST {admin}/admin/dead-letters/99/replay answered 404" \
                  " not_found: no dead letter 99\n"
    # fixed on the database by the CLI; the running proxy's flusher sees it
    code, _, err = await cli("customers", "update", "nostripe", "--stripe-customer-id", "cus_n",
                             "--config", cfg, cwd=tmp_path)
    assert code == 0, err
    code, out, err = await cli("dead-letters", "replay", str(dead["id"]), "--config", cfg,
                               cwd=tmp_path)
    assert code == 0, err
    assert orjson.loads(out)["replayed"]["status"] == "dry_run"
    assert err == (f"meterproxy: dead letter {dead['id']} was logged by the dry-run sink, not"
                   " sent to Stripe (a real sink sends it)\n")


async def test_server_side_failures_are_one_clear_line(running: tuple[Proxy, str],
                                                       tmp_path: Path) -> None:
    p, cfg = running
    code, out, err = await cli("credits", "grant", "nobody", "--credits", "5", "--config", cfg,
                               cwd=tmp_path)
    assert (code, out) == (1, "")
    assert err.startswith(f"meterproxy: POST {p.admin_url}/admin/customers/nobody/grants"
                          " answered 404 ") and err.count("\n") == 1, err
    code, out, err = await cli("credits", "grant", "a/b c", "--credits", "x", "--config", cfg,
                               cwd=tmp_path)
    assert code == 1 and "/admin/customers/a%2Fb%20c/grants answered 4" in err, err
    # nothing listening on the config's admin port
    (tmp_path / "down").mkdir()
    with held_port() as aport:                # bound, never listening: refused
        down = write_config(tmp_path / "down", "http://127.0.0.1:9",
                            admin_listen=f"127.0.0.1:{aport}")
        code, out, err = await cli("flush", "--config", str(down), cwd=tmp_path)
    assert (code, out) == (1, "")
    assert err == (f"meterproxy: cannot reach the proxy's admin API at http://127.0.0.1:{aport}"
                   " ([Errno 111] Connection refused); is `meterproxy serve` running with"
                   f" {down}?\n")


async def test_times_are_rfc3339(running: tuple[Proxy, str], tmp_path: Path) -> None:
    p, cfg = running
    await p.customer_with_key("timed")
    code, out, err = await cli("keys", "list", "--customer", "timed", "--config", cfg,
                               cwd=tmp_path)
    assert code == 0, err
    [k] = orjson.loads(out)
    assert RFC3339.match(k["created_at"]) and k["revoked_at"] is None
    code, out, err = await cli("keys", "revoke", "--key-id", k["key_id"], "--config", cfg,
                               cwd=tmp_path)
    assert code == 0, err
    code, out, err = await cli("keys", "list", "--config", cfg, cwd=tmp_path)
    [k] = orjson.loads(out)
    assert RFC3339.match(k["revoked_at"])
    code, out, err = await cli("usage", "timed", "--from", "2026-01-01", "--to", "1767312000",
                               "--config", cfg, cwd=tmp_path)
    assert code == 0, err
    assert orjson.loads(out) == {"customer": "timed", "from": "2026-01-01T00:00:00Z",
                                 "to": "2026-01-02T00:00:00Z", "meters": {}}


async def test_demo_port_from_the_environment_must_be_a_port(tmp_path: Path) -> None:
    env = {**os.environ, "METERPROXY_DEMO_PORT": "80x"}
    code, out, err = await cli("demo", env=env, cwd=tmp_path)
    assert (code, out, err) == (2, "", "meterproxy: METERPROXY_DEMO_PORT must be a port number,"
                                       " got '80x'\n")
    assert not (tmp_path / ".demo").exists()


FLEET_RULES = """\
version: 1
meters:
  api_calls: {stripe_event_name: api_calls}
rules:
  - name: items
    match: {path: "/**"}
    usage:
      - {meter: api_calls, quantity: 1}
"""


async def test_the_cli_works_on_the_fleets_postgres_database(tmp_path: Path,
                                                             upstream: str) -> None:
    """``storage.backend: postgres``: customers, keys and usage from the command line are
    the fleet's (a key made by the CLI works on every member, its revocation is refused on
    every member, usage counts what every member served)."""
    import aiohttp

    from tests.fleet.members import fleet_of, wait_status
    from tests.helpers import wait_until

    async with fleet_of(tmp_path, upstream, rules_text=FLEET_RULES) as fleet:
        a, b = await fleet.start(["a", "b"])
        cfg_a, cfg_b = str(tmp_path / "a" / "meterproxy.yaml"), str(tmp_path / "b" / "meterproxy.yaml")
        rc, out, err = await cli("customers", "create", "acme", "--config", cfg_a)
        assert rc == 0, err
        assert orjson.loads(out)["created"] is True
        rc, out, err = await cli("keys", "create", "--customer", "acme", "--config", cfg_b)
        assert rc == 0, err
        made = orjson.loads(out)
        async with aiohttp.ClientSession() as s:
            for m in (a, b):
                await wait_status(s, m.url + "/v1/items", made["key"], 200, within=2.0)

            async def usage() -> dict[str, str]:
                rc, out, err = await cli("usage", "acme", "--config", cfg_a)
                assert rc == 0, err
                return orjson.loads(out)["meters"]  # type: ignore[no-any-return]
            await wait_until(usage, ok=lambda m: m == {"api_calls": "2"}, timeout=15,
                             interval=0.3, what="both members' requests in the CLI's usage")
            rc, out, err = await cli("keys", "revoke", "--key-id", made["key_id"],
                                     "--config", cfg_a)
            assert rc == 0, err
            for m in (a, b):
                await wait_status(s, m.url + "/v1/items", made["key"], 403, within=2.0)
        rc, out, err = await cli("customers", "show", "acme", "--config", cfg_b)
        assert rc == 0, err
        shown = orjson.loads(out)
        assert [k["key_id"] for k in shown["keys"]] == [made["key_id"]]
        assert shown["keys"][0]["revoked_at"] is not None
        rc, out, err = await cli("customers", "list", "--config", cfg_b)
        assert [c["id"] for c in orjson.loads(out)] == ["acme"]


async def test_the_cli_says_when_postgres_is_unreachable(tmp_path: Path, upstream: str) -> None:
    with held_port() as refused:              # bound, never listening: refused
        cfg = write_config(tmp_path, upstream, storage={
            "backend": "postgres", "dsn": f"postgresql://postgres@127.0.0.1:{refused}/none",
            "path": str(tmp_path / "journal.db")})
        rc, out, err = await cli("customers", "list", "--config", str(cfg))
    assert rc == 1 and out == ""
    assert err.startswith("meterproxy: PostgreSQL (storage.dsn) is unreachable"), err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [("customers", "list"), ("customers", "show", "acme"),
                                  ("keys", "list"), ("usage", "acme"),
                                  ("explain", "req_1")])
def test_a_read_on_a_missing_database_is_an_error_and_creates_nothing(
        args: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A mistyped --db (or a config naming another file) answered a read from a new, empty
    database: "no customers", zero usage. Only the commands that write create the file."""
    missing = tmp_path / "typo.db"
    assert cli_main([*args, "--db", str(missing)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"meterproxy: cannot open database {missing}: does not exist (only commands that"
        " write create it: customers create/update, keys create)")
    assert not missing.exists()


def test_the_commands_that_write_create_the_database(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "new.db"
    assert cli_main(["customers", "create", "acme", "--db", str(db)]) == 0
    assert db.exists()
    assert cli_main(["keys", "create", "--customer", "acme", "--db", str(tmp_path / "k.db")]) == 1
    assert (tmp_path / "k.db").exists()     # created; the key's customer is not in it
    capsys.readouterr()
    assert cli_main(["customers", "list", "--db", str(db)]) == 0
    assert [c["id"] for c in orjson.loads(capsys.readouterr().out)] == ["acme"]
