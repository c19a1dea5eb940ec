"""Command line: ``meterproxy serve|demo|rules check|customers|keys|usage|flush|reconcile|
explain|simulate``.

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
from typing import TYPE_CHECKING, Any

import orjson

from proxy import schema
from proxy.errors import ConfigError, StorageError
from proxy.store import keys as keystore
from proxy.store.db import connect

if TYPE_CHECKING:
    from proxy.rules import RuleSet


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


def cmd_reconcile(args: argparse.Namespace) -> int:
    """Exit 0: reconciled; 3: discrepancy rate above the threshold; 2: refused; 1: error."""
    import asyncio

    from proxy import config
    from proxy.admin_reconcile import parse_grace
    from proxy.reconcile import ReconcileError, Reconciler, ReconcileRefused
    from proxy.rules import RulesError, load_rules
    from proxy.sinks.factory import connect as stripe_connect
    from proxy.timeutil import parse_time

    cfg = config.load(args.config)
    if not cfg.stripe.api_key:
        sys.stderr.write("meterproxy: reconcile needs stripe.api_key in the config\n")
        return 2
    try:
        rules = load_rules(cfg.rule_paths())
    except RulesError as exc:
        sys.stderr.write("\n".join(str(p) for p in exc.problems) + "\n")
        return 2
    names = {m.name: (m.stripe_event_name, m.covered_event_name) for m in rules.meters.values()}
    conn = connect(Path(args.db)) if args.db else connect(cfg.db_path(), cfg.storage.synchronous)
    try:
        grace = parse_grace(args.grace) if args.grace else cfg.stripe.reconcile_grace
        start = parse_time(args.from_) if args.from_ else None
        end = parse_time(args.to) if args.to else None
    except ValueError as exc:
        sys.stderr.write(f"meterproxy: {exc}\n")
        return 2

    async def run() -> int:
        stripe = stripe_connect(cfg.stripe)
        try:
            rec = Reconciler(conn, lambda fn: _tx(conn, fn), stripe, lambda: names,
                             threshold=cfg.stripe.reconcile_alert_threshold)
            report = await rec.run(start, end, grace, customers=args.customer,
                                   dry_run=args.dry_run)
        except ReconcileRefused as exc:
            sys.stderr.write(f"meterproxy: {exc}\n")
            return 2
        except ReconcileError as exc:
            sys.stderr.write(f"meterproxy: {exc}\n")
            return 1
        finally:
            await stripe.close()
        if args.format == "table":
            sys.stdout.write(report.to_table(all_hours=args.all))
        else:
            _print(report.to_json())
        return 3 if report.alert else 0

    return asyncio.run(run())


def cmd_explain(args: argparse.Namespace) -> int:
    """Which rule and rules version priced a request, and why (exit 1: unknown id)."""
    from proxy import explain

    conn = _db(args)
    found = explain.explain(conn, args.request_id)
    if args.format == "json":
        _print(found if len(found) > 1 else found[0])
    else:
        sys.stdout.write(explain.render_text(found))
    return 0


def _configured_rules(args: argparse.Namespace,
                      conn: sqlite3.Connection) -> tuple[RuleSet, str]:
    """The "old" rules of a simulation: the rules configured in --config; with --db and no
    readable config, the newest rules version this database recorded."""
    from proxy import config
    from proxy.explain import stored_version
    from proxy.rules import load_rules

    try:
        cfg = config.load(args.config)
    except ConfigError:
        if not args.db:
            raise
    else:
        paths = cfg.rule_paths()
        return load_rules(paths), "configured: " + ", ".join(str(p) for p in paths)
    row = conn.execute("SELECT version FROM rules_versions ORDER BY first_loaded_at DESC,"
                       " rowid DESC LIMIT 1").fetchone()
    if row is None:
        raise LookupError("no --config to read the current rules from, and the database has "
                          "no recorded rules version")
    sv = stored_version(conn, row[0])
    if sv.rules is None:
        raise LookupError(f"rules version {row[0]}: {sv.problem}")
    return sv.rules, f"newest version recorded in {args.db} (no readable --config)"


def cmd_simulate(args: argparse.Namespace) -> int:
    """Exit 0: report printed; 2: a rules file does not load; 1: error."""
    from proxy import simulate
    from proxy.rules import RulesError, load_rules
    from proxy.timeutil import month_start, parse_time

    try:
        start = parse_time(args.from_) if args.from_ else month_start(time.time())
        end = parse_time(args.to) if args.to else time.time()
    except ValueError as exc:
        sys.stderr.write(f"meterproxy: --from/--to: {exc}\n")
        return 2
    conn = _db(args)
    try:
        new = load_rules([Path(p) for p in args.rules])
        old, old_label = _configured_rules(args, conn)
    except RulesError as exc:
        sys.stderr.write("\n".join(str(p) for p in exc.problems) + "\n")
        return 2
    sim = simulate.run(conn, old, new, start, end, args.customer)
    report = simulate.to_json(sim, start, end, old_label, ", ".join(args.rules))
    if args.format == "json":
        _print(report)
    else:
        sys.stdout.write(simulate.render_table(report))
    return 0


def _admin_call(args: argparse.Namespace, method: str, path: str,
                body: dict[str, Any] | None = None) -> Any:
    """Call the running proxy's admin API (address and token from the config file).
    Credits and flushes go through the running process: it owns the in-memory balance and
    the sink, and a second writer would race them."""
    import urllib.error
    import urllib.request

    from proxy import config

    cfg = config.load(args.config)
    host, port = config.split_hostport(cfg.admin_listen)
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    data = orjson.dumps(body) if body is not None else None
    req = urllib.request.Request(f"http://{host}:{port}{path}", data=data, method=method,
                                 headers={"Authorization": f"Bearer {cfg.admin.token}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = orjson.loads(exc.read() or b"{}").get("error", {})
        raise LookupError(f"{exc.code} {detail.get('type', '')}: {detail.get('message', '')}") \
            from exc
    except OSError as exc:
        raise LookupError(f"the proxy's admin API at {host}:{port} is not reachable ({exc}); "
                          "is meterproxy serve running with this config?") from exc


def cmd_credits(args: argparse.Namespace) -> int:
    if args.action == "grant":
        body: dict[str, Any] = {"credits": args.credits, "priority": args.priority}
        if args.expires_at:
            body["expires_at"] = args.expires_at
        if args.idempotency_key:
            body["idempotency_key"] = args.idempotency_key
        _print(_admin_call(args, "POST", f"/admin/customers/{args.target}/grants", body))
    elif args.action == "void":
        _print(_admin_call(args, "POST", f"/admin/grants/{args.target}/void"))
    elif args.action == "ledger":
        _print(_admin_call(args, "GET", f"/admin/customers/{args.target}/credits/ledger"))
    else:
        _print(_admin_call(args, "GET", f"/admin/customers/{args.target}/grants"))
    return 0


def cmd_flush(args: argparse.Namespace) -> int:
    _print(_admin_call(args, "POST", "/admin/flush"))
    return 0


def cmd_dead_letters(args: argparse.Namespace) -> int:
    if args.action == "replay":
        q = "?restamp=true" if args.restamp else ""
        _print(_admin_call(args, "POST", f"/admin/dead-letters/{args.id}/replay{q}"))
    else:
        _print(_admin_call(args, "GET", "/admin/dead-letters"))
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

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", default=os.environ.get("METERPROXY_CONFIG", "meterproxy.yaml"))
        return sp

    cr = with_config(sub.add_parser("credits", help="grant, list, void credits (via the admin API)"))
    cr.add_argument("action", choices=["grant", "list", "void", "ledger"])
    cr.add_argument("target", help="customer id (grant, list, ledger) or grant id (void)")
    cr.add_argument("--credits")
    cr.add_argument("--expires-at")
    cr.add_argument("--priority", type=int, default=50)
    cr.add_argument("--idempotency-key")
    cr.set_defaults(fn=cmd_credits)

    fl = with_config(sub.add_parser("flush", help="flush usage to Stripe now (via the admin API)"))
    fl.set_defaults(fn=cmd_flush)

    dl = with_config(sub.add_parser("dead-letters", help="list or replay dead letters"))
    dl.add_argument("action", choices=["list", "replay"])
    dl.add_argument("id", nargs="?")
    dl.add_argument("--restamp", action="store_true", help="re-date too-old usage to now")
    dl.set_defaults(fn=cmd_dead_letters)

    rec = with_db(sub.add_parser("reconcile", help="compare the ledger with Stripe's meter event"
                                 " summaries, hour by hour"))
    rec.add_argument("--from", dest="from_", help="RFC 3339, date or unix seconds (default: 48h ago)")
    rec.add_argument("--to", help="default: now")
    rec.add_argument("--grace", help="seconds or 90s/30m/2h (default: stripe.reconcile_grace)")
    rec.add_argument("--customer", action="append", help="only this customer (repeatable)")
    rec.add_argument("--dry-run", action="store_true", help="report only; make nothing due")
    rec.add_argument("--format", choices=["table", "json"], default="table")
    rec.add_argument("--all", action="store_true", help="table: every hour, not only discrepancies")
    rec.set_defaults(fn=cmd_reconcile)

    ex = with_db(sub.add_parser("explain", help="which rule and rules version priced a request,"
                                " and why"))
    ex.add_argument("request_id")
    ex.add_argument("--format", choices=["text", "json"], default="text")
    ex.set_defaults(fn=cmd_explain)

    si = with_db(sub.add_parser(
        "simulate", help="re-rate recorded requests through candidate rules: old vs new"
        " charges per customer",
        description="Old charges: the period's recorded billable usage priced with the rules"
        " configured in --config (with --db and no readable config: the newest rules version"
        " the database recorded). New: each recorded request re-matched (method and path) in"
        " the candidate rules, constant quantities recomputed, measured ones kept as recorded,"
        " priced with the candidate's prices. Reads the database only."))
    si.add_argument("--rules", nargs="+", required=True, metavar="NEW.yaml",
                    help="the candidate rules file(s)")
    si.add_argument("--from", dest="from_", help="RFC 3339, date or unix seconds"
                    " (default: start of this month)")
    si.add_argument("--to", help="default: now")
    si.add_argument("--customer", action="append", help="only this customer (repeatable)")
    si.add_argument("--format", choices=["table", "json"], default="table")
    si.set_defaults(fn=cmd_simulate)
    schema.add_parser(sub)
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
