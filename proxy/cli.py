"""Command line: ``meterproxy serve|demo|rules check|customers|keys|usage|credits|flush|
dead-letters|reconcile|explain|simulate``.

Operator commands work directly on the database named by the config file (or ``--db``),
through the same store functions the admin API uses; a running proxy notices their
changes within ``keys.cache_refresh``. With ``storage.backend: postgres`` (and no ``--db``)
``customers``, ``keys``, ``usage``, ``reconcile``, ``explain`` and ``simulate`` work on the
fleet's shared database (every member sees a key change within
``fleet.key_poll_interval``). ``credits``, ``flush`` and ``dead-letters`` go through the
running proxy's admin API (it holds that state in memory).

The config file: ``--config`` anywhere on the command line (before or after the
subcommand; the last one given wins), else ``$METERPROXY_CONFIG``, else ``meterproxy.yaml``
in the current directory. Exit codes: 0 ok; 1 error (one line on stderr: what and why);
2 usage or config error; 3 (reconcile) discrepancy above the threshold.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from proxy import paths, schema
from proxy.errors import (
    ConfigError,
    FileProblem,
    InvalidInput,
    MeterproxyError,
    StorageError,
    StorageOutcomeUnknown,
)
from proxy.store.db import connect
from proxy.store.protocols import Storage
from proxy.store.sqlite import SqliteStorage, as_storage, offline

if TYPE_CHECKING:
    from proxy.rules import RuleSet


CONFIG_ENV = "METERPROXY_CONFIG"
_TIME_KEYS = frozenset({"created_at", "revoked_at", "updated_at", "expires_at", "sent_at",
                        "dead_at", "timestamp"})


def _rfc3339_times(data: Any) -> Any:
    """Unix-second values of the time fields, as RFC 3339 (what the CLI prints)."""
    from proxy.timeutil import rfc3339

    if isinstance(data, dict):
        return {k: rfc3339(v) if k in _TIME_KEYS and isinstance(v, int | float)
                and not isinstance(v, bool) else _rfc3339_times(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_rfc3339_times(v) for v in data]
    return data


def _print(data: Any) -> None:
    sys.stdout.write(orjson.dumps(_rfc3339_times(data), option=orjson.OPT_INDENT_2).decode()
                     + "\n")


def _open_db(path: Path, synchronous: str = "normal", *,
             create: bool = False) -> sqlite3.Connection:
    """The database at ``path``. Only a command that writes (``creates_db``) may create a
    missing file: a read (``customers list``, ``usage``, ...) on a mistyped ``--db`` or a
    config naming another file answered from a new empty database ("no customers", zero
    usage); now it is an error naming the path."""
    paths.check_database(path, create_dir=False)
    if not create and not path.exists():
        raise FileProblem(f"cannot open database {path}: does not exist (only commands that"
                          " write create it: customers create/update, keys create)")
    try:
        return connect(path, synchronous)
    except sqlite3.Error as exc:
        raise FileProblem(f"cannot open database {path}: {exc}") from exc


def _db(args: argparse.Namespace) -> sqlite3.Connection:
    create = bool(getattr(args, "creates_db", False))
    if args.db:
        return _open_db(paths.absolute(args.db), create=create)
    from proxy import config

    cfg = config.load(args.config)
    return _open_db(cfg.db_path(), cfg.storage.synchronous, create=create)


T = TypeVar("T")


def _owners(args: argparse.Namespace) -> SqliteStorage:
    """The table owners on a connection of this process's own (writes may wait for locks)."""
    return offline(_db(args))


@asynccontextmanager
async def _storage(args: argparse.Namespace) -> AsyncIterator[Storage]:
    """The owners of the configured store: ``--db`` or ``storage.backend: sqlite`` opens
    the SQLite file; ``storage.backend: postgres`` a small pool on ``storage.dsn`` (the
    fleet's shared database: what any member would answer), closed afterwards."""
    if not args.db:
        from proxy import config

        cfg = config.load(args.config)
        if cfg.storage.backend == "postgres":
            from proxy.fleet.settings import pool_settings
            from proxy.store.postgres.errors import PgUnavailable
            from proxy.store.postgres.storage import PostgresStorage
            from proxy.store.postgres.storage import as_storage as pg_storage

            settings = dataclasses.replace(pool_settings(cfg.storage), size=2)
            try:
                pg = await PostgresStorage.open(settings)
            except PgUnavailable as exc:
                raise StorageError(f"PostgreSQL (storage.dsn) is unreachable: {exc}") from exc
            try:
                yield pg_storage(pg)
            except StorageOutcomeUnknown as exc:
                raise StorageError(f"PostgreSQL (storage.dsn) did not answer (a write in "
                                   f"flight may or may not have been applied): {exc}") from exc
            finally:
                await pg.close()
            return
    yield as_storage(_owners(args))


def _with_owners(args: argparse.Namespace, use: Callable[[Storage], Awaitable[T]]) -> T:
    """Run ``use`` on the configured store's owners (``_storage``), in one event loop."""
    async def go() -> T:
        async with _storage(args) as owners:
            return await use(owners)
    return _run(go())


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one storage verb to completion. The CLI normally has no event loop; when it is
    called from inside one (embedded, tests), the verb runs on a loop in a worker thread."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def cmd_serve(args: argparse.Namespace) -> int:
    from proxy import app, config

    app.serve(config.load(args.config))
    return 0


def _time_arg(value: str) -> float:
    """argparse type for --from/--to: a bad time is a usage error (exit 2)."""
    from proxy.timeutil import parse_time

    try:
        return parse_time(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an RFC 3339 time (2026-11-01T00:00:00Z), a date (2026-11-01)"
            " or unix seconds") from None


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.demo import runner as demo

    port = args.port
    if port is None:
        env = os.environ.get(demo.PORT_ENV, "8080")
        if not env.isdigit() or int(env) > 65535:
            sys.stderr.write(f"meterproxy: {demo.PORT_ENV} must be a port number, got {env!r}\n")
            return 2
        port = int(env)
    return demo.main(port, args.workdir)


def cmd_rules_check(args: argparse.Namespace) -> int:
    from proxy.rules import cli_check

    return cli_check([paths.absolute(p) for p in args.files])


def cmd_customers(args: argparse.Namespace) -> int:
    async def use(owners: Storage) -> Any:
        customers = owners.customers
        if args.action == "list":
            return [c.to_json() for c in await customers.all()]
        if args.action == "show":
            c = await customers.get(args.id)
            if c is None:
                raise LookupError(f"no customer {args.id!r}")
            return {**c.to_json(), "keys": await customers.list_keys(args.id)}
        cust, created = await customers.upsert(args.id, args.stripe_customer_id, args.overage,
                                               args.status)
        return {**cust.to_json(), "created": created}

    _print(_with_owners(args, use))
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    async def use(owners: Storage) -> Any:
        customers = owners.customers
        if args.action == "create":
            return await customers.create_key(args.customer, args.name)
        if args.action == "revoke":
            await customers.revoke_key(args.key_id)
            return {"key_id": args.key_id, "revoked": True}
        return await customers.list_keys(args.customer)

    _print(_with_owners(args, use))
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    """Per-meter usage; the default range is ``periods.default_usage_range`` (the customer's
    current billing period, as in the admin API)."""
    from proxy.timeutil import rfc3339
    from proxy.units import fmt_micro

    start, end, totals = _with_owners(
        args, lambda owners: owners.usage.usage(args.customer, args.from_, args.to))
    _print({"customer": args.customer, "from": rfc3339(start), "to": rfc3339(end),
            "meters": {m: fmt_micro(t.quantity) for m, t in totals.items()}})
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    """Exit 0: reconciled; 3: discrepancy rate above the threshold; 2: refused; 1: error."""

    from proxy import config
    from proxy.reconcile import ReconcileError, Reconciler, ReconcileRefused
    from proxy.rules import RulesError, load_rules
    from proxy.stripe.factory import connect as stripe_connect
    from proxy.units import MAX_GRACE, parse_duration

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
    start, end = args.from_, args.to
    try:
        grace = parse_duration(args.grace.lower(), maximum=MAX_GRACE) if args.grace \
            else cfg.stripe.reconcile_grace
    except ValueError as exc:
        sys.stderr.write(f"meterproxy: --grace: {exc}\n")
        return 2

    async def run(owners: Storage) -> int:
        stripe = stripe_connect(cfg.stripe)
        try:
            rec = Reconciler(owners.outbox, owners.customers, stripe, lambda: names,
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

    return _with_owners(args, run)


def cmd_explain(args: argparse.Namespace) -> int:
    """Which rule and rules version priced a request, and why (exit 1: unknown id)."""
    from proxy.tools import explain

    found = _with_owners(args, lambda owners: explain.explain(owners, args.request_id))
    if args.format == "json":
        _print(found if len(found) > 1 else found[0])
    else:
        sys.stdout.write(explain.render_text(found))
    return 0


def _configured_rules(args: argparse.Namespace) -> tuple[RuleSet, str]:
    """The "old" rules of a simulation: the rules configured in --config; with --db and no
    readable config, the newest rules version this database recorded."""
    from proxy import config
    from proxy.rules import load_rules
    from proxy.tools.explain import stored_version

    try:
        cfg = config.load(args.config)
    except ConfigError:
        if not args.db:
            raise
    else:
        files = cfg.rule_paths()
        return load_rules(files), "configured: " + ", ".join(str(p) for p in files)
    owners = _owners(args)
    newest = _run(owners.rules.newest())
    if newest is None:
        raise LookupError("no --config to read the current rules from, and the database has "
                          "no recorded rules version")
    sv = _run(stored_version(owners.rules, newest))
    if sv.rules is None:
        raise LookupError(f"rules version {newest}: {sv.problem}")
    return sv.rules, f"newest version recorded in {paths.absolute(args.db)} (no readable --config)"


def cmd_simulate(args: argparse.Namespace) -> int:
    """Exit 0: report printed; 2: a rules file does not load; 1: error."""
    from proxy.rules import RulesError, load_rules
    from proxy.timeutil import month_start
    from proxy.tools import simulate

    start = args.from_ if args.from_ is not None else month_start(time.time())
    end = args.to if args.to is not None else time.time()
    try:
        new = load_rules([paths.absolute(p) for p in args.rules])
        old, old_label = _configured_rules(args)
    except RulesError as exc:
        sys.stderr.write("\n".join(str(p) for p in exc.problems) + "\n")
        return 2
    sim = _with_owners(args, lambda owners: simulate.run(owners, old, new, start, end,
                                                         args.customer))
    report = simulate.to_json(sim, start, end, old_label, ", ".join(args.rules))
    if args.format == "json":
        _print(report)
    else:
        sys.stdout.write(simulate.render_table(report))
    return 0


class AdminCallFailed(MeterproxyError):
    """The admin API answered with an error, or could not be reached (one-line message)."""


def _q(segment: str) -> str:
    """One URL path segment (an id a user typed), percent-encoded."""
    from urllib.parse import quote

    return quote(segment, safe="")


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
    base = f"http://{host}:{port}"
    data = orjson.dumps(body) if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Authorization": f"Bearer {cfg.admin.token}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        raw = exc.read() or b""
        try:
            detail = orjson.loads(raw).get("error", {})
            why = f"{detail.get('type', '')}: {detail.get('message', '')}"
        except (orjson.JSONDecodeError, AttributeError):
            why = raw[:200].decode("utf-8", "replace").strip() or exc.reason
        raise AdminCallFailed(f"{method} {base}{path} answered {exc.code} {why}") from exc
    except OSError as exc:
        cause: object = getattr(exc, "reason", None) or exc
        raise AdminCallFailed(f"cannot reach the proxy's admin API at {base} ({cause}); is"
                              f" `meterproxy serve` running with {paths.absolute(args.config)}?") \
            from exc
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise AdminCallFailed(f"{method} {base}{path} answered something that is not JSON") \
            from exc


def cmd_credits(args: argparse.Namespace) -> int:
    if args.action == "grant":
        body: dict[str, Any] = {"credits": args.credits, "priority": args.priority}
        if args.expires_at:
            body["expires_at"] = args.expires_at
        if args.idempotency_key:
            body["idempotency_key"] = args.idempotency_key
        _print(_admin_call(args, "POST", f"/admin/customers/{_q(args.target)}/grants", body))
    elif args.action == "void":
        _print(_admin_call(args, "POST", f"/admin/grants/{_q(args.target)}/void"))
    elif args.action == "ledger":
        _print(_admin_call(args, "GET", f"/admin/customers/{_q(args.target)}/credits/ledger"))
    else:
        _print(_admin_call(args, "GET", f"/admin/customers/{_q(args.target)}/grants"))
    return 0


def cmd_flush(args: argparse.Namespace) -> int:
    _print(_admin_call(args, "POST", "/admin/flush"))
    return 0


def cmd_dead_letters(args: argparse.Namespace) -> int:
    """replay: exit 0 when the event was delivered (or, under the dry-run sink, logged),
    1 when it is dead again or still waiting for a retry."""
    if args.action != "replay":
        _print(_admin_call(args, "GET", "/admin/dead-letters"))
        return 0
    q = "?restamp=true" if args.restamp else ""
    out = _admin_call(args, "POST", f"/admin/dead-letters/{args.id}/replay{q}")
    _print(out)
    row = out.get("replayed") or {}
    status = row.get("status")
    if status == "sent":
        return 0
    if status == "dry_run":
        sys.stderr.write(f"meterproxy: dead letter {args.id} was logged by the dry-run sink, "
                         "not sent to Stripe (a real sink sends it)\n")
        return 0
    why = row.get("reason") or "no reason recorded"
    if status == "dead":
        sys.stderr.write(f"meterproxy: dead letter {args.id} is dead again: {why}\n")
    else:
        sys.stderr.write(f"meterproxy: dead letter {args.id} is not delivered yet (status "
                         f"{status}): {why}; it is retried with the next flushes\n")
    return 1


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" for every option with a meaningful default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS) \
                or (action.option_strings == [] and action.nargs not in ("?", "*")):
            return text
        return text + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


def _config_help(default: str | None) -> str:
    where = f"${CONFIG_ENV}, else meterproxy.yaml" if default is None else default
    return (f"the config file; accepted before or after the subcommand; relative paths inside"
            f" it resolve against its directory (default: {where})")


def build_parser() -> argparse.ArgumentParser:
    env_default = os.environ.get(CONFIG_ENV) or "meterproxy.yaml"
    p = _Parser(prog="meterproxy", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    # the top-level --config holds the default; every subcommand's own --config (SUPPRESS
    # default) overrides it only when given, so it is accepted before or after the command
    p.add_argument("--config", default=env_default, metavar="FILE",
                   help=_config_help(f"${CONFIG_ENV}, else meterproxy.yaml; now {env_default}"))
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=_Parser,
                           help="what to do; `meterproxy COMMAND --help` shows its options")

    def cmd(parent: Any, name: str, help_: str, fn: Any, *, config: bool = True,
            db: bool = False, creates_db: bool = False, **kw: Any) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(name, help=help_, description=kw.pop(
            "description", help_[:1].upper() + help_[1:] + "."), **kw)
        if config:
            sp.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                            help=_config_help(None))
        if db:
            sp.add_argument("--db", metavar="FILE", help="the database file, instead of the"
                            " one --config names (relative: against the current directory)")
        sp.set_defaults(fn=fn, creates_db=creates_db)
        return sp

    def group(name: str, help_: str) -> Any:
        g = sub.add_parser(name, help=help_, description=help_[:1].upper() + help_[1:] + ".")
        return g.add_subparsers(dest="action", required=True, metavar="ACTION",
                                parser_class=_Parser, help=f"`meterproxy {name} ACTION --help`"
                                " shows an action's options")

    def time_opts(sp: argparse.ArgumentParser, from_default: str, to_default: str) -> None:
        sp.add_argument("--from", dest="from_", metavar="TIME", type=_time_arg,
                        help=f"start: RFC 3339, a date or unix seconds (default: {from_default})")
        sp.add_argument("--to", metavar="TIME", type=_time_arg,
                        help=f"end: RFC 3339, a date or unix seconds (default: {to_default})")

    cmd(sub, "serve", "run the proxy until SIGTERM/SIGINT", cmd_serve)

    d = cmd(sub, "demo", "start an example upstream, the proxy with rules/example.yaml, demo "
            "customers with keys and a dry-run Stripe sink, and print curl lines to try",
            cmd_demo, config=False)
    d.add_argument("--port", type=int, metavar="PORT", help="public port; the admin port is"
                   " PORT+1010; 0 picks free ports (default: $METERPROXY_DEMO_PORT, else 8080)")
    d.add_argument("--workdir", default=".demo", metavar="DIR",
                   help="where the demo writes meterproxy.yaml and demo.db (relative: against"
                   " the current directory)")

    rules = group("rules", "rule files")
    rc = cmd(rules, "check", "validate rule files; prints FILE:LINE:COL: message per problem,"
             " exit 1 when there is one", cmd_rules_check, config=False)
    rc.add_argument("files", nargs="+", metavar="FILE", help="rules file(s) (relative: against"
                    " the current directory)")

    cust = group("customers", "create, update, list, show customers (on the database)")
    for action in ("create", "update"):
        c = cmd(cust, action, f"{action} a customer", cmd_customers, db=True, creates_db=True)
        c.add_argument("id", metavar="CUSTOMER", help="customer id")
        c.add_argument("--stripe-customer-id", metavar="CUS", help="Stripe customer (cus_...)"
                       " usage is reported for")
        c.add_argument("--overage", choices=["bill", "block"], help="past the prepaid credits:"
                       " bill the overage or refuse with 402 (new customers: bill)")
        c.add_argument("--status", choices=["active", "suspended"],
                       help="suspended customers are refused (new customers: active)")
    cmd(cust, "list", "list every customer", cmd_customers, db=True)
    c = cmd(cust, "show", "one customer and its keys", cmd_customers, db=True)
    c.add_argument("id", metavar="CUSTOMER", help="customer id")

    keys = group("keys", "create, revoke, list API keys (on the database)")
    k = cmd(keys, "create", "mint a key (printed once, stored hashed)", cmd_keys, db=True,
            creates_db=True)
    k.add_argument("--customer", required=True, metavar="CUSTOMER", help="owner of the key")
    k.add_argument("--name", default="", metavar="NAME", help="a label for the key")
    k = cmd(keys, "revoke", "revoke a key (refused from the next request)", cmd_keys, db=True)
    k.add_argument("--key-id", required=True, metavar="KEY_ID", help="the key's id (not the"
                   " secret)")
    k = cmd(keys, "list", "list keys (never the secrets)", cmd_keys, db=True)
    k.add_argument("--customer", metavar="CUSTOMER", help="only this customer's keys")

    u = cmd(sub, "usage", "a customer's usage per meter (on the database)", cmd_usage, db=True)
    u.add_argument("customer", metavar="CUSTOMER", help="customer id")
    time_opts(u, "start of the customer's current billing period (this month, UTC, without a"
              " billing anchor), as in the admin API", "now + 60s")

    cr = group("credits", "grant, list, void prepaid credits (via the admin API)")
    g = cmd(cr, "grant", "grant credits to a customer", cmd_credits)
    g.add_argument("target", metavar="CUSTOMER", help="customer id")
    g.add_argument("--credits", required=True, metavar="N", help="credits, a decimal (\"1000\","
                   " \"2.5\")")
    g.add_argument("--expires-at", metavar="TIME", help="RFC 3339 time or unix seconds when the"
                   " grant expires (default: never)")
    g.add_argument("--priority", type=int, default=50, metavar="0-100",
                   help="0 burns first, 100 last")
    g.add_argument("--idempotency-key", metavar="KEY", help="a retried grant with the same key"
                   " is not granted twice")
    for action, what in (("list", "a customer's balance and grants"),
                         ("ledger", "the ledger entries behind a customer's balance")):
        g = cmd(cr, action, what, cmd_credits)
        g.add_argument("target", metavar="CUSTOMER", help="customer id")
    g = cmd(cr, "void", "void what is left of a grant", cmd_credits)
    g.add_argument("target", metavar="GRANT_ID", help="grant id")

    cmd(sub, "flush", "stage and send usage to the sink now (via the admin API)", cmd_flush)

    dl = group("dead-letters", "list or replay meter events Stripe refused (via the admin API)")
    cmd(dl, "list", "list dead letters", cmd_dead_letters)
    r = cmd(dl, "replay", "send a dead letter again; exit 1 when it is not delivered (dead"
            " again, or waiting for a retry)", cmd_dead_letters)
    r.add_argument("id", type=int, metavar="ID", help="the dead letter's id (dead-letters list)")
    r.add_argument("--restamp", action="store_true", help="re-date too-old usage to now")

    rec = cmd(sub, "reconcile", "compare the ledger with Stripe's meter event summaries, hour"
              " by hour; exit 3 when the discrepancy rate is above the threshold", cmd_reconcile,
              db=True)
    time_opts(rec, "48h ago", "now")
    rec.add_argument("--grace", metavar="DURATION", help="seconds or 90s/30m/2h; hours younger"
                     " than this are not compared (default: stripe.reconcile_grace)")
    rec.add_argument("--customer", action="append", metavar="CUSTOMER",
                     help="only this customer (repeatable; default: every customer)")
    rec.add_argument("--dry-run", action="store_true", help="report only; make nothing due")
    rec.add_argument("--format", choices=["table", "json"], default="table",
                     help="output format")
    rec.add_argument("--all", action="store_true",
                     help="table: every hour, not only discrepancies")

    ex = cmd(sub, "explain", "which rule and rules version priced a request, and why",
             cmd_explain, db=True)
    ex.add_argument("request_id", metavar="REQUEST_ID", help="the X-Request-Id of the request")
    ex.add_argument("--format", choices=["text", "json"], default="text", help="output format")

    si = cmd(sub, "simulate", "re-rate recorded requests through candidate rules: old vs new"
             " charges per customer", cmd_simulate, db=True,
             description="Old charges: the period's recorded billable usage priced with the"
             " rules configured in --config (with --db and no readable config: the newest rules"
             " version the database recorded). New: each recorded request re-matched (method"
             " and path) in the candidate rules, constant quantities recomputed, measured ones"
             " kept as recorded, priced with the candidate's prices. Reads the database only.")
    si.add_argument("--rules", nargs="+", required=True, metavar="NEW.yaml",
                    help="the candidate rules file(s)")
    time_opts(si, "start of this month, UTC", "now")
    si.add_argument("--customer", action="append", metavar="CUSTOMER",
                    help="only this customer (repeatable; default: every customer)")
    si.add_argument("--format", choices=["table", "json"], default="table", help="output format")
    schema.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Usage mistakes: usage on stderr, exit 2 (argparse). Failures: ``meterproxy: what
    and why`` on one line, exit 1; config problems: one per line, exit 2."""
    from proxy.rules import RulesError

    args = build_parser().parse_args(argv)
    try:
        rc: int = args.fn(args)
    except ConfigError as exc:
        for problem in exc.problems:
            sys.stderr.write(problem + "\n")
        return 2
    except RulesError as exc:
        sys.stderr.write("\n".join(str(p) for p in exc.problems) + "\n")
        return 2
    except (LookupError, InvalidInput, StorageError, FileProblem,
            AdminCallFailed) as exc:
        msg = exc.args[0] if exc.args else str(exc)
        sys.stderr.write(f"meterproxy: {msg}\n")
        return 1
    except sqlite3.Error as exc:
        sys.stderr.write(f"meterproxy: database error: {exc}\n")
        return 1
    except OSError as exc:     # e.g. a port already in use
        where = f": {exc.filename}" if exc.filename else ""
        sys.stderr.write(f"meterproxy: {exc.strerror or exc}{where}\n")
        return 1
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
