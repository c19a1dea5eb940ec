"""``meterproxy demo``: the example upstream, the proxy with ``rules/example.yaml``, two demo
customers with a key each, and the dry-run Stripe sink, all in this one process. Ctrl-C
stops it.

Every curl line it prints is preceded by a comment saying what to expect, in one format
(``tests/test_readme_commands.py`` runs each line and checks it)::

    # -> STATUS[ ERROR_TYPE], billed: nothing | N meter[ + N meter...][ (free text)]
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
from pathlib import Path

from aiohttp import web
from ruamel.yaml import YAML

from proxy import config as config_mod
from proxy import paths
from proxy.errors import ConfigError, FileProblem
from proxy.store.db import connect
from proxy.store.sqlite import offline

DEMO_CUSTOMER = "demo"
PREPAID_CUSTOMER = "demo-prepaid"     # overage blocked: shows the 402
WELCOME_CREDITS = "5"
PORT_ENV = "METERPROXY_DEMO_PORT"


def _rules_path() -> Path:
    here = Path(__file__).resolve().parents[2] / "rules" / "example.yaml"
    for cand in (paths.absolute("rules/example.yaml"), here):
        if cand.is_file():
            return cand
    raise FileProblem(f"cannot find the example rules: neither {paths.absolute('rules/example.yaml')}"
                      f" nor {here} exists; run the demo from the repository root")


def write_demo_config(workdir: Path, port: int, upstream_port: int, admin_port: int,
                      token: str) -> Path:
    """``WORKDIR/meterproxy.yaml``. Paths inside it follow the config-file rule: the database
    is ``demo.db`` next to the file; the rules path is absolute."""
    paths.make_workdir(workdir)
    cfg = {
        "listen": f"127.0.0.1:{port}",
        "admin_listen": f"127.0.0.1:{admin_port}",
        "upstream": {"url": f"http://127.0.0.1:{upstream_port}"},
        "rules": str(_rules_path()),
        # a local trial: locking the WAL in memory needs privileges a desktop user lacks
        # (RLIMIT_MEMLOCK), and the first command would open with its warning
        "storage": {"path": "demo.db", "durability": "strict", "wal_memory_lock": False},
        "admin": {"token": token},
        "stripe": {"sink": "dry_run", "flush_interval": "15s"},
    }
    path = workdir / "meterproxy.yaml"
    try:
        with path.open("w") as fh:
            YAML().dump(cfg, fh)
    except OSError as exc:
        raise FileProblem(f"cannot write {path}: {paths.reason(exc)}") from exc
    return path


async def demo_keys(db: Path) -> dict[str, str]:
    """A fresh key for each demo customer (customers are created once, kept across runs)."""
    paths.check_database(db, create_dir=False)
    conn = connect(db)
    try:
        customers = offline(conn).customers
        await customers.upsert(DEMO_CUSTOMER, "cus_demo", "bill", "active")
        await customers.upsert(PREPAID_CUSTOMER, "cus_demo_prepaid", "block", "active")
        return {c: str((await customers.create_key(c, "demo"))["key"])
                for c in (DEMO_CUSTOMER, PREPAID_CUSTOMER)}
    finally:
        conn.close()


def instructions(port: int, admin_port: int, keys: dict[str, str], token: str,
                 config_path: Path) -> str:
    u = f"http://127.0.0.1:{port}"
    a = f"http://127.0.0.1:{admin_port}"
    key = keys[DEMO_CUSTOMER]
    h = f'-H "Authorization: Bearer {key}"'
    hp = f'-H "Authorization: Bearer {keys[PREPAID_CUSTOMER]}"'
    ha = f'-H "Authorization: Bearer {token}"'
    return f"""
meterproxy demo is running.
  public port : {u}      (proxying the example API)
  admin port  : {a}      (admin token: {token})
  demo key    : {key}      (customer {DEMO_CUSTOMER})
  prepaid key : {keys[PREPAID_CUSTOMER]}      (customer {PREPAID_CUSTOMER})
  usage page  : {u}/_meter/#key={key}
  config      : {config_path}

Customer {DEMO_CUSTOMER} starts with {WELCOME_CREDITS} prepaid credits (responses carry
X-Credits-Remaining); once they are spent, usage is billed as overage. Customer
{PREPAID_CUSTOMER} has {WELCOME_CREDITS} credits and overage blocked: what it cannot pay for is
refused with 402. The dry-run Stripe sink logs every 15 s the meter events it would send
and sends nothing.

Try these (rules/example.yaml prices them; each comment says what you should see):

  # -> 200, billed: 1 api_calls (1 credit; see X-Credits-Remaining)
  curl -si {h} {u}/v1/items

  # -> 200, billed: 42 llm_tokens + 1 api_calls (42 tokens = 0.042 credits; the API call costs no credits here)
  curl -si {h} {u}/v1/chat/completions -d '{{"prompt_tokens": 12, "completion_tokens": 30}}'

  # -> 200, billed: 42 llm_tokens + 1 api_calls (streamed as server-sent events; tokens from the final chunk)
  curl -siN {h} {u}/v1/chat/completions -d '{{"stream": true}}'

  # -> 200, billed: 42 llm_tokens (Anthropic-style stream: input tokens + output tokens)
  curl -siN {h} {u}/v1/messages -d '{{"stream": true}}'

  # -> 200, billed: 1 api_calls (premium model: 10 credits per call)
  curl -si {h} -X POST {u}/v1/models/premium-large/infer -d '{{}}'

  # -> 402 insufficient_credits, billed: nothing ({PREPAID_CUSTOMER} has {WELCOME_CREDITS} credits, the call costs 10)
  curl -si {hp} -X POST {u}/v1/models/premium-large/infer -d '{{}}'

  # -> 200, billed: nothing (free: no key needed)
  curl -si {u}/healthz

  # -> 401 missing_api_key, billed: nothing
  curl -si {u}/v1/items

Then look at what was recorded (admin API):

  # -> 200, billed: nothing (customer {DEMO_CUSTOMER}: credit balance, grants, ledger)
  curl -si {ha} {a}/admin/customers/{DEMO_CUSTOMER}

  # -> 200, billed: nothing (usage per meter, CSV)
  curl -si {ha} "{a}/admin/customers/{DEMO_CUSTOMER}/usage.csv"

  # -> 200, billed: nothing (flush now: the dry-run sink logs the events, which stay in the outbox as dry_run)
  curl -si {ha} -X POST {a}/admin/flush

  # -> 200, billed: nothing (the outbox: what a real Stripe sink would send)
  curl -si {ha} {a}/admin/outbox

Ctrl-C stops the demo.
"""


async def _run(port: int, workdir: Path) -> int:
    from proxy.app import start
    from proxy.demo.upstream import build_app

    up = web.AppRunner(build_app(), access_log=None)
    await up.setup()
    try:
        site = web.TCPSite(up, "127.0.0.1", 0)
        await site.start()
        upstream_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        token = os.environ.get("METERPROXY_ADMIN_TOKEN") or "demo-" + secrets.token_hex(8)
        admin_port = port + 1010 if port else 0
        path = write_demo_config(workdir, port, upstream_port, admin_port, token)
        cfg = config_mod.load(path)
        keys = await demo_keys(cfg.db_path())
        server = await start(cfg)
    except BaseException:
        await up.cleanup()
        raise
    if not port:   # ephemeral ports: the file names the real ones, so CLI commands reach them
        write_demo_config(workdir, server.public_port, upstream_port, server.admin_port, token)
    credits = server.credits
    await credits.grant(DEMO_CUSTOMER, WELCOME_CREDITS, idempotency_key="demo-welcome",
                        source="demo")
    await credits.grant(PREPAID_CUSTOMER, WELCOME_CREDITS,
                        idempotency_key="demo-welcome-prepaid", source="demo")
    print(instructions(server.public_port, server.admin_port, keys, token, path), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.shutdown()
    await up.cleanup()
    return 0


def main(port: int, workdir: str) -> int:
    """``workdir`` is a command-line path: relative resolves against the current directory."""
    import logging

    import uvloop

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return uvloop.run(_run(port, paths.absolute(workdir)))
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 2
