"""Command line: ``meterproxy serve|demo|rules check|customers|keys|usage|flush|reconcile``.

Operator commands work directly on the database named by the config file (or ``--db``),
through the same store functions the admin API uses; a running proxy notices their
changes within ``keys.cache_refresh``.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from proxy.errors import ConfigError, StorageError
from proxy.store import keys as keystore
from proxy.store.db import connect


def _print(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


def _db(args: argparse.Namespace) -> sqlite3.Connection:
    if args.db:
        return connect(Path(args.db))
    from proxy import config

    cfg = config.load(args.config)
    return connect(cfg.db_path(), cfg.storage.synchronous)


def _tx(conn: sqlite3.Connection, fn: Any) -> Any:
    conn.execute("BEGIN IMMEDIATE")
    try:
        out = fn(conn)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return out


def cmd_serve(args: argparse.Namespace) -> int:
    from proxy import app, config

    app.serve(config.load(args.config))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy import demo

    return demo.main(args.port, args.workdir)


def cmd_rules_check(args: argparse.Namespace) -> int:
    from proxy.rules import cli_check

    return cli_check([Path(p) for p in args.files])


def cmd_customers(args: argparse.Namespace) -> int:
    conn = _db(args)
    if args.action == "list":
        _print([c.to_json() for c in keystore.list_customers(conn)])
    elif args.action == "show":
        c = keystore.get_customer(conn, args.id)
        if c is None:
            raise LookupError(f"no customer {args.id!r}")
        out = c.to_json()
        out["keys"] = keystore.list_keys(conn, args.id)
        _print(out)
    else:
        cust, created = _tx(conn, lambda c: keystore.upsert_customer(
            c, args.id, args.stripe_customer_id, args.overage, args.status))
        _print({**cust.to_json(), "created": created})
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    conn = _db(args)
    if args.action == "create":
        _print(_tx(conn, lambda c: keystore.create_key(c, args.customer, args.name)))
    elif args.action == "revoke":
        _tx(conn, lambda c: keystore.revoke_key(c, args.key_id))
        _print({"key_id": args.key_id, "revoked": True})
    else:
        _print(keystore.list_keys(conn, args.customer))
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    from proxy.timeutil import month_start, parse_time, rfc3339
    from proxy.units import fmt_micro

    conn = _db(args)
    now = time.time()
    start = parse_time(args.from_) if args.from_ else month_start(now)
    end = parse_time(args.to) if args.to else now + 60
    rows = conn.execute("SELECT meter, SUM(quantity) FROM usage_minute WHERE customer_id=? AND"
                        " minute>=? AND minute<? GROUP BY meter ORDER BY meter",
                        (args.customer, int(start // 60) * 60, int(end))).fetchall()
    _print({"customer": args.customer, "from": rfc3339(start), "to": rfc3339(end),
            "meters": {m: fmt_micro(q) for m, q in rows}})
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meterproxy", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    def with_db(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", default=os.environ.get("METERPROXY_CONFIG", "meterproxy.yaml"))
        sp.add_argument("--db", help="database file (instead of reading it from --config)")
        return sp

    s = sub.add_parser("serve", help="run the proxy")
    s.add_argument("--config", default=os.environ.get("METERPROXY_CONFIG", "meterproxy.yaml"))
    s.set_defaults(fn=cmd_serve)

    d = sub.add_parser("demo", help="start an example upstream, the proxy and a dry-run sink")
    d.add_argument("--port", type=int, default=8080)
    d.add_argument("--workdir", default=".demo")
    d.set_defaults(fn=cmd_demo)

    r = sub.add_parser("rules", help="rule files")
    rsub = r.add_subparsers(dest="rules_cmd", required=True)
    rc = rsub.add_parser("check", help="validate rule files; prints FILE:LINE:COL: message")
    rc.add_argument("files", nargs="+")
    rc.set_defaults(fn=cmd_rules_check)

    c = with_db(sub.add_parser("customers", help="create, update, list, show customers"))
    c.add_argument("action", choices=["create", "update", "list", "show"])
    c.add_argument("id", nargs="?")
    c.add_argument("--stripe-customer-id")
    c.add_argument("--overage", choices=["bill", "block"])
    c.add_argument("--status", choices=["active", "suspended"])
    c.set_defaults(fn=cmd_customers)

    k = with_db(sub.add_parser("keys", help="create, revoke, list API keys"))
    k.add_argument("action", choices=["create", "revoke", "list"])
    k.add_argument("--customer")
    k.add_argument("--name", default="")
    k.add_argument("--key-id")
    k.set_defaults(fn=cmd_keys)

    u = with_db(sub.add_parser("usage", help="a customer's usage per meter"))
    u.add_argument("customer")
    u.add_argument("--from", dest="from_")
    u.add_argument("--to")
    u.set_defaults(fn=cmd_usage)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc: int = args.fn(args)
    except ConfigError as exc:
        for problem in exc.problems:
            sys.stderr.write(problem + "\n")
        return 2
    except (LookupError, keystore.InvalidInput, StorageError, sqlite3.Error) as exc:
        msg = exc.args[0] if exc.args else str(exc)
        sys.stderr.write(f"meterproxy: {msg}\n")
        return 1
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
