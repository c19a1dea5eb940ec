"""``meterproxy demo``: the example upstream, the proxy with ``rules/example.yaml``, a demo
customer with a key, and the dry-run Stripe sink, all in this one process. Ctrl-C stops it.
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
from proxy.store import keys as keystore
from proxy.store.db import connect

DEMO_CUSTOMER = "demo"


def _rules_path() -> Path:
    for cand in (Path.cwd() / "rules" / "example.yaml",
                 Path(__file__).resolve().parent.parent / "rules" / "example.yaml"):
        if cand.exists():
            return cand
    raise SystemExit("rules/example.yaml not found: run the demo from the repository root")


def write_demo_config(workdir: Path, port: int, upstream_port: int, admin_port: int,
                      token: str) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = {
        "listen": f"127.0.0.1:{port}",
        "admin_listen": f"127.0.0.1:{admin_port}",
        "upstream": {"url": f"http://127.0.0.1:{upstream_port}"},
        "rules": str(_rules_path()),
        "storage": {"path": str(workdir / "demo.db"), "durability": "strict"},
        "admin": {"token": token},
        "stripe": {"sink": "dry_run", "flush_interval": "15s"},
    }
    path = workdir / "meterproxy.yaml"
    with path.open("w") as fh:
        YAML().dump(cfg, fh)
    return path


def demo_key(db: Path) -> str:
    conn = connect(db)
    try:
        conn.execute("BEGIN IMMEDIATE")
        keystore.upsert_customer(conn, DEMO_CUSTOMER, "cus_demo", "bill", "active")
        key = keystore.create_key(conn, DEMO_CUSTOMER, "demo")["key"]
        conn.execute("COMMIT")
    finally:
        conn.close()
    return str(key)


def instructions(port: int, admin_port: int, key: str, token: str) -> str:
    u = f"http://127.0.0.1:{port}"
    a = f"http://127.0.0.1:{admin_port}"
    h = f'-H "Authorization: Bearer {key}"'
    return f"""
meterproxy demo is running.
  public port : {u}      (proxying the example API)
  admin port  : {a}      (admin token: {token})
  demo key    : {key}
  usage page  : {u}/_meter/#key={key}

The demo customer starts with 5 prepaid credits; responses carry X-Credits-Remaining.
Once the credits are spent, usage is billed as overage: the dry-run Stripe sink logs the
meter events it would send every 15 s.

Try these (each line says what it costs under rules/example.yaml):

  # 1 api_calls unit, 1 credit (-i shows X-Credits-Remaining)
  curl -si {h} {u}/v1/items

  # 42 llm_tokens (12 prompt + 30 completion) = 0.042 credits, plus 1 api_calls unit
  curl -s {h} {u}/v1/chat/completions -d '{{"prompt_tokens": 12, "completion_tokens": 30}}'

  # the same, streamed as server-sent events; tokens read from the final chunk
  curl -sN {h} {u}/v1/chat/completions -d '{{"stream": true}}'

  # Anthropic-style stream: input tokens + output tokens = 42 llm_tokens
  curl -sN {h} {u}/v1/messages -d '{{"stream": true}}'

  # premium model: 1 api_calls unit at 10 credits
  curl -s {h} -X POST {u}/v1/models/premium-large/infer -d '{{}}'

  # free: no key needed, nothing metered
  curl -s {u}/healthz

  # 401 missing_api_key
  curl -s {u}/v1/items

Then look at what was recorded:
  curl -s -H "Authorization: Bearer {token}" {a}/admin/customers/{DEMO_CUSTOMER}
  curl -s -H "Authorization: Bearer {token}" "{a}/admin/customers/{DEMO_CUSTOMER}/usage.csv"
  curl -s -H "Authorization: Bearer {token}" {a}/metrics | grep meterproxy_
  curl -s -H "Authorization: Bearer {token}" -X POST {a}/admin/flush     # send now (dry run)
"""


async def _run(port: int, workdir: Path) -> int:
    from proxy.app import start
    from proxy.errors import ConfigError
    from proxy.example_upstream import build_app

    up = web.AppRunner(build_app(), access_log=None)
    await up.setup()
    site = web.TCPSite(up, "127.0.0.1", 0)
    await site.start()
    upstream_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    token = os.environ.get("METERPROXY_ADMIN_TOKEN") or "demo-" + secrets.token_hex(8)
    admin_port = port + 1010
    path = write_demo_config(workdir, port, upstream_port, admin_port, token)
    try:
        cfg = config_mod.load(path)
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 2
    key = demo_key(cfg.db_path())
    server = await start(cfg)
    server.rt.extras["credits"].grant(DEMO_CUSTOMER, "5", idempotency_key="demo-welcome",
                                      source="demo")
    print(instructions(server.public_port, server.admin_port, key, token), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.shutdown()
    await up.cleanup()
    return 0


def main(port: int, workdir: str) -> int:
    import logging

    import uvloop

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return uvloop.run(_run(port, Path(workdir)))
