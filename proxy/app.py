"""The composition root: the only place concrete classes are chosen and wired.

``serve(cfg)`` runs until SIGTERM/SIGINT. Shutdown, in order (each step finishes before
the next starts):
  1. stop accepting: close the listening sockets (public, then admin);
  2. finish in-flight requests (up to ``shutdown_timeout``);
  3. commit every pending usage row;
  4. stop background tasks (rules watcher, key refresher), then run the final flush;
  5. close the upstream session, the reader connection and the store.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import signal
import sqlite3
import time
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosqlite
from aiohttp import web

from proxy import metrics
from proxy.admin.api import FLEET_CREDITS, MONETARY, REFUSALS, build_admin_app
from proxy.admin.billing import billing_routes
from proxy.admin.credits import credit_routes
from proxy.admin.fleet import FLEET, fleet_routes
from proxy.admin.reconcile import reconcile_routes
from proxy.admin.webhooks import webhook_routes
from proxy.alerts import AlertSender
from proxy.commitments import TRUEUP_INTERVAL, TrueUpTask
from proxy.config import Config, split_hostport
from proxy.credits.mirror import MonetaryService
from proxy.credits.money import MoneyBook, in_use, rules_problems
from proxy.credits.service import CreditService, load_book
from proxy.credits.thresholds import ThresholdWatch
from proxy.errors import ConfigError, FileProblem, StorageError
from proxy.flusher import Flusher, default_rate
from proxy.limits import ConnectionGuard, effective_max_connections, guarded_runner
from proxy.meter_check import MeterCheck
from proxy.notices import NoticeWatch, notice_settings
from proxy.paths import check_database
from proxy.pricing import TransformQuantity
from proxy.reconcile import ReconcileMetrics, Reconciler
from proxy.reports.invoice_check import PreviewCache
from proxy.request.auth import Authenticator
from proxy.request.consumer import ConsumerApi
from proxy.request.forward import Upstream
from proxy.request.pipeline import Pipeline
from proxy.request.wire import write_without_joining
from proxy.rules import RulesError, RuleSet, load_rules
from proxy.runtime import Runtime
from proxy.sinks.base import Sink
from proxy.store.db import Store, UsageRow
from proxy.store.keys import Customer, KeyCache, KeyEntry
from proxy.store.protocols import KeySnapshot, LedgerSnapshot
from proxy.store.sqlite import SqliteStorage, as_storage, open_reader
from proxy.stripe.factory import build_sink
from proxy.stripe.factory import connect as stripe_connect
from proxy.stripe.prices import PriceCache
from proxy.tasks import cancel_and_wait, spawn
from proxy.units import fmt_micro
from proxy.webhooks import PATH as WEBHOOK_PATH
from proxy.webhooks import WebhookReceiver

if TYPE_CHECKING:
    from proxy.fleet.runtime import Fleet

log = logging.getLogger("meterproxy")


@dataclass
class Server:
    """A running proxy: both listeners, the runtime, the services the composition root built
    (each reachable here and, for request handlers, through one typed ``web.AppKey``) and the
    background tasks."""

    rt: Runtime
    public: web.ServerRunner
    admin: web.AppRunner
    reader: aiosqlite.Connection
    pipeline: Pipeline
    credits: CreditService
    flusher: Flusher
    webhooks: WebhookReceiver
    alerts: AlertSender
    connections: ConnectionGuard
    meter_check: MeterCheck | None
    reconciler: Reconciler | None
    public_port: int = 0
    admin_port: int = 0
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    fleet: Fleet | None = None          # fleet mode (storage.backend postgres)
    monetary: MonetaryService | None = None     # the monetary credits mode's duties
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    on_stop: list[Callable[[], Any]] = field(default_factory=list)
    # tasks stopped by a signal and awaited (never cancelled mid-call): (stop, task)
    graceful: list[tuple[Callable[[], None], asyncio.Task[Any]]] = field(default_factory=list)

    async def shutdown(self, timeout: float = 15.0) -> None:
        # A step that fails is logged and the next ones still run: the store's close (the
        # final commit, the WAL's checkpoint) is never skipped for one that failed earlier
        try:
            # 1. stop accepting; 2. in-flight requests finish (the runners' cleanup waits)
            await self.public.cleanup()
            await self.admin.cleanup()
            # 3. every usage row committed
            await self.rt.store.drain(timeout)
            self.rt.store.commit_pending()
            # 4. background tasks stop, then the final flush (registered by the flusher)
            for stop, task in self.graceful:
                stop()
                if task.done():     # ended already (cancelled, or failed: logged by spawn)
                    continue
                try:
                    async with asyncio.timeout(timeout):
                        await asyncio.shield(task)
                except TimeoutError:
                    # (a flusher cancelled mid-call holds its batch for a resend under the
                    # same identifiers: the final flush below cannot overlap it)
                    log.warning("%s did not stop within %gs; cancelling", task.get_name(),
                                timeout)
                    await _ended(task)
                except Exception:
                    log.exception("%s failed while stopping; shutdown goes on",
                                  task.get_name())
            for t in self.tasks:
                await _ended(t)
            for cb in self.on_stop:
                try:
                    res = cb()
                    if asyncio.iscoroutine(res):
                        await res
                except Exception:
                    log.exception("a shutdown step failed; shutdown goes on")
            # 5. close resources
            for close in (self.rt.upstream.close, self.reader.close):
                try:
                    await close()
                except Exception:
                    log.exception("closing failed; shutdown goes on")
        finally:
            self.rt.store.close()


def load_ruleset(cfg: Config) -> RuleSet:
    return load_rules(cfg.rule_paths())


async def remember_rules(rt: Runtime, rules: RuleSet) -> None:
    """Keep the text of every rules version that ever priced a request (for explain)."""
    import orjson

    files = orjson.dumps([{"file": f, "text": t} for f, t in rules.sources]).decode()
    await rt.owners().rules.remember(rules.version, files, int(time.time()))


async def start(cfg: Config) -> Server:
    """Open every resource and start listening. The caller owns ``shutdown()``.

    Each resource is registered on an ``AsyncExitStack`` right after it is opened, so a
    failure part-way (port in use, database unusable, a wrong Stripe meter) closes exactly
    what was opened, newest first, and the process exits. Once everything is up the stack is
    dropped and ``Server.shutdown`` closes in the documented order."""
    async with AsyncExitStack() as undo:
        server = await _start(cfg, undo)
        undo.pop_all()
        return server


async def _ended(task: asyncio.Task[Any]) -> None:
    """``cancel_and_wait``, a task that had failed logged instead of raised (shutdown)."""
    try:
        await cancel_and_wait(task)
    except Exception:
        log.exception("%s had failed; shutdown goes on", task.get_name())


def _task(undo: AsyncExitStack, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    """Spawn a background task, cancelled (and awaited) if start-up fails later."""
    task = spawn(name, coro)
    undo.push_async_callback(cancel_and_wait, task)
    return task


async def _start(cfg: Config, undo: AsyncExitStack) -> Server:
    write_without_joining()
    rules = load_ruleset(cfg)
    sink = build_sink(cfg.stripe)      # a sink that cannot run is refused before opening files
    undo.push_async_callback(sink.close)
    metrics.rules_info.labels(rules.version).set(1)
    st = cfg.storage
    db_path = cfg.db_path()
    check_database(db_path, create_dir=True)
    try:
        store = Store.open(db_path, synchronous=st.synchronous, durability=st.durability,
                           commit_interval=st.commit_interval, fail_mode=st.fail_mode,
                           max_pending_rows=st.max_pending_rows, lock_wait=st.lock_wait,
                           wal_truncate_size=st.wal_truncate_size,
                           keep_journal=st.backend == "postgres",
                           wal_memory_lock=st.wal_memory_lock)
    except sqlite3.Error as exc:
        raise FileProblem(f"cannot open database {db_path}: {exc}") from exc
    undo.callback(store.close)
    keys = KeyCache()
    reader = await open_reader(db_path)
    undo.push_async_callback(reader.close)
    upstream = Upstream(cfg.upstream)
    undo.push_async_callback(upstream.close)
    fleet: Fleet | None = None
    if st.backend == "postgres":
        from proxy.fleet.runtime import open_fleet  # the SQLite default never imports it
        fleet = await open_fleet(cfg, store)
        undo.push_async_callback(fleet.close)
        storage = fleet.owners()
    else:
        storage = as_storage(SqliteStorage.on(store, reader))
    keys.replace(*_snapshot(await storage.customers.snapshot()))
    rt = Runtime(cfg=cfg, rules=rules, store=store, keys=keys, upstream=upstream,
                 storage=storage)
    await remember_rules(rt, rules)
    # fleet mode: every customer's per-grant state from the shared ledger (grants.used),
    # reloaded as it moves (Fleet.credits_forever)
    snapshot: LedgerSnapshot | None = None
    if fleet is not None:
        book = await fleet.credit_book()
    else:
        snapshot = await storage.ledger.load()
        book = load_book(snapshot)
    credits = CreditService(store, book, storage.ledger)
    if snapshot is not None:
        # repayments of a debt that was never committed (docs/credits.md, "Settlement")
        await credits.give_back_unmatched(snapshot.debts)
    if fleet is not None:
        fleet.credits.shared = credits.book     # who holds grants, fleet-wide
        # the expiry task reads back what it wrote instead of applying it (an outcome
        # unknown is then retried safely), and repayments beyond a debt that exists are
        # given back (docs/fleet.md, "Repayments")
        credits.reload = partial(fleet.reload_credits, credits.book)
        await credits.give_back_unmatched(await fleet.overpaid())
    alerts = AlertSender(store, cfg.alerts.webhook_url, cfg.alerts.secret, alerts=storage.alerts)
    watch = await ThresholdWatch.open(storage.alerts, credits.book, cfg.alerts.thresholds,
                                      on_new=alerts.wake)
    flusher = build_flusher(rt, sink, fleet)
    meter_check = await _check_meters(rt, undo)
    money = MoneyBook()

    def withdraw(row: UsageRow) -> None:
        """A withheld row is never billed (Store invariant 8): its settlement is undone in
        the credit book and, for a monetary customer, in its money account."""
        credits.withdraw(row.customer_id, (e for _, e in row.debits),
                         f"withdraw:{row.request_id}:{secrets.token_hex(6)}")
        if money.active:
            money.withdraw(row.customer_id, row.at,
                           [(i.meter, i.quantity, i.credits) for i in row.items],
                           sum(e.amount for _, e in row.debits if e.kind == "debt"))
    store.on_withdraw = withdraw
    problems = monetary_rules_problems(rt, rules)
    if problems:
        raise ConfigError([f"credits: {p}" for p in problems])
    mirror_client = None
    if cfg.stripe.api_key and cfg.stripe.sink != "dry_run":
        mirror_client = stripe_connect(cfg.stripe)
        undo.push_async_callback(mirror_client.close)
        if fleet is None and monetary_in_use(rt):
            await _first_prices(rt)       # monetary burns need the Stripe prices at once
    monetary = MonetaryService(cfg.credits, keys, storage.usage, storage.ledger,
                               storage.mirrors, credits.book, money, rt.prices, mirror_client)
    await monetary.sync()                 # every monetary account open before listening
    credits.quantum = monetary.quantum
    credits.on_taken = monetary.taken

    async def give_back(cid: str, micro: int, key: str, expires_at: int | None) -> bool:
        return (await credits.grant(cid, fmt_micro(micro), expires_at=expires_at,
                                    source=key, idempotency_key=key))[1]
    monetary.give = give_back

    webhooks = WebhookReceiver(store, keys, credits, cfg, events=storage.webhooks,
                               customers=storage.customers)
    webhooks.on_finalized = monetary.finalized
    auth = Authenticator(rt)
    previews: PreviewCache | None = None
    if cfg.stripe.api_key and cfg.stripe.sink != "dry_run":
        preview_client = stripe_connect(cfg.stripe)
        undo.push_async_callback(preview_client.close)
        previews = PreviewCache(preview_client)
    # the routes the proxy answers itself on the public port (routed by the pipeline on the
    # canonical path): the consumer API under the reserved prefix, and the Stripe webhook
    consumer = ConsumerApi(rt, auth, credits, previews)
    consumer.money = money
    own_routes = [*consumer.routes(),
                  web.route("*", WEBHOOK_PATH, webhooks.handle)]
    if fleet is None:
        pipeline = Pipeline(rt, auth, credits.book, watch, own_routes)
    else:       # credits through the member's leases (proxy.fleet.credits)
        pipeline = Pipeline(rt, auth, fleet.credits, watch, own_routes,
                            lease_admit=fleet.credits.lease_admit)
    pipeline.admission.money = pipeline.settlement.money = money
    monetary.committed = store.committed_for    # accounts opened while serving
    monetary.grouped = store.grouped
    monetary.max_waiting = min(cfg.storage.max_pending_rows, monetary.max_waiting)
    store.alone = pipeline.admission.alone      # a lone strict request commits at once
    pipeline.admission.on_quiet = store.quiet   # nothing in flight: a short materialize
    guard = ConnectionGuard(cfg.limits, effective_max_connections(
        cfg.limits.max_connections, cfg.upstream.pool_size))
    # aiohttp's low-level web.Server on the public port: every request goes straight to the
    # pipeline (no Application, no router; it routes on the canonical path itself).
    # auto_decompress=False: request bodies are forwarded as sent (a compressed body stays
    # compressed; rules that read one answer 415, see docs/metering-bodies.md)
    public = guarded_runner(pipeline.__call__, guard, access_log=None,
                            handler_cancellation=True, shutdown_timeout=10.0,
                            auto_decompress=False)
    reconciler = build_reconciler(rt)
    if reconciler is not None:
        undo.push_async_callback(reconciler.stripe.close)
    admin_app = build_admin_app(rt, reader,
                                billing_routes() + credit_routes() + reconcile_routes()
                                + webhook_routes() + fleet_routes(),
                                credits=credits, flusher=flusher, webhooks=webhooks,
                                reconciler=reconciler, meter_check=meter_check,
                                reconcile_grace=cfg.stripe.reconcile_grace)
    if fleet is not None:
        admin_app[FLEET] = fleet
        admin_app[FLEET_CREDITS] = fleet
    admin_app[MONETARY] = monetary
    admin = web.AppRunner(admin_app, handle_signals=False, access_log=None)
    await public.setup()
    undo.push_async_callback(public.cleanup)
    await admin.setup()
    undo.push_async_callback(admin.cleanup)
    host, port = split_hostport(cfg.listen)
    ahost, aport = split_hostport(cfg.admin_listen)
    shared = cfg.workers > 1           # worker processes share both ports (SO_REUSEPORT)
    site = web.TCPSite(public, host, port, backlog=1024, reuse_port=shared or None)
    await site.start()                 # closed by public.cleanup
    asite = web.TCPSite(admin, ahost, aport, reuse_port=shared or None)
    await asite.start()                # closed by admin.cleanup
    server = Server(rt, public, admin, reader, pipeline=pipeline, credits=credits,
                    flusher=flusher, webhooks=webhooks, alerts=alerts, connections=guard,
                    meter_check=meter_check, reconciler=reconciler,
                    public_port=_bound_port(site), admin_port=_bound_port(asite),
                    fleet=fleet, monetary=monetary)
    await alerts.start()
    undo.push_async_callback(alerts.close)
    server.tasks.append(_task(undo, "alert-sender", alerts.run()))
    server.on_stop.append(alerts.close)
    if previews is not None:
        server.on_stop.append(previews.stripe.close)
    if mirror_client is not None:
        server.on_stop.append(mirror_client.close)
    server.tasks.append(_task(undo, "webhooks", webhooks.run()))
    notices = NoticeWatch(storage.usage, storage.alerts, keys, notice_settings(cfg.alerts),
                          prices=rt.prices, on_new=alerts.wake)
    if notices.settings.enabled:
        server.tasks.append(_task(undo, "notices", notices.run(cfg.alerts.notice_interval)))
    server.tasks.append(_task(undo, "prices", _keep_prices(rt)))
    if meter_check is not None:
        server.tasks.append(_task(undo, "meter-check", meter_check.run()))
        server.on_stop.append(meter_check.close)
    server.tasks.append(_task(undo, "rules-watcher", _watch_rules(rt, meter_check)))
    if fleet is None:
        server.tasks.append(_task(undo, "key-refresher", _refresh_keys(rt)))
    else:
        server.tasks.append(_task(undo, "key-refresher", _refresh_fleet_keys(rt, fleet)))
    server.tasks.append(_task(undo, "audit-retention", _prune_audit(rt)))
    server.tasks.append(_task(undo, "wal-checkpoint", store.checkpoint_forever(
        st.checkpoint_interval, st.integrity_check_interval)))
    server.tasks.append(_task(undo, "connection-sweep", guard.sweep_forever()))
    if fleet is None:
        server.tasks.append(_task(undo, "journal", store.materialize_forever()))
    else:     # its own stop event: running through the final flush, ended by fleet.close
        fleet.tasks += [spawn("fleet-ship", fleet.ship_forever()),
                        spawn("fleet-leader", fleet.lead_forever(
                            [flusher.took_over], lambda: rt.rules.version)),
                        spawn("fleet-leases", fleet.leases_forever()),
                        spawn("fleet-credits", fleet.credits_forever(
                            credits.book, _credits_moved(rt, credits, watch)))]
    server.graceful.append((flusher.stop, _task(undo, "flusher",
                                                flusher.run(cfg.stripe.flush_interval))))
    server.tasks.append(_task(undo, "credit-expiry", credits.run_expiry()))
    server.tasks.append(_task(undo, "monetary-credits", monetary.run()))
    server.on_stop.append(lambda: _final_flush(flusher))
    if fleet is not None:
        server.on_stop.append(fleet.close)     # ship, release leases, resign, close the pool
    for limiter in (admin_app[REFUSALS], auth.refusals, webhooks.refusals):
        server.on_stop.append(limiter.flush)      # "suppressed K similar messages" lines
    if cfg.stripe.api_key and cfg.stripe.sink != "dry_run":
        trueup_client = stripe_connect(cfg.stripe)
        undo.push_async_callback(trueup_client.close)
        trueups = TrueUpTask(storage.customers, storage.usage, storage.trueups, trueup_client,
                             lambda: rt.rules, rt.prices)
        server.tasks.append(_task(undo, "true-ups", trueups.run(TRUEUP_INTERVAL)))
        server.on_stop.append(trueup_client.close)
    if reconciler is not None:
        if cfg.stripe.reconcile_interval > 0:
            server.tasks.append(_task(undo, "reconciler", reconciler.run_every(
                cfg.stripe.reconcile_interval, cfg.stripe.reconcile_grace)))
        server.on_stop.append(reconciler.stripe.close)
    log.info("meterproxy listening on %s (public) and %s (admin); rules %s; durability %s",
             f"{host}:{server.public_port}", f"{ahost}:{server.admin_port}", rules.version,
             st.durability)
    return server


async def _check_meters(rt: Runtime, undo: AsyncExitStack) -> MeterCheck | None:
    """With a meter-events sink: the rules' meters against Stripe's. A wrong meter refuses
    start (ConfigError, exit 2); Stripe unreachable starts degraded (proxy.meter_check)."""
    scfg = rt.cfg.stripe
    if not scfg.verify_meters or not scfg.api_key \
            or scfg.sink not in ("meter_events", "meter_event_stream"):
        return None
    check = MeterCheck(stripe_connect(scfg), lambda: event_names(rt), scfg.meter_check_retry)
    undo.push_async_callback(check.close)
    problems = await check.check(event_names(rt))
    if problems:
        raise ConfigError([f"stripe: {p}" for p in problems])
    check.record(problems)
    if problems is None:
        log.warning("Stripe meters could not be checked at start (%s): starting degraded, "
                    "retrying every %.0fs", check.unreachable, scfg.meter_check_retry)
    return check


def build_reconciler(rt: Runtime) -> Reconciler | None:
    """Reconciliation needs Stripe meters: a key and a meter-events sink; else None."""
    scfg = rt.cfg.stripe
    if not scfg.api_key or scfg.sink not in ("meter_events", "meter_event_stream"):
        return None
    return Reconciler(rt.owners().outbox, rt.owners().customers, stripe_connect(scfg),
                      lambda: event_names(rt), threshold=scfg.reconcile_alert_threshold,
                      metrics=ReconcileMetrics(metrics.reconcile_discrepancies,
                                               metrics.reconcile_discrepancy_rate,
                                               metrics.reconcile_alerts_total,
                                               metrics.reconcile_runs_total,
                                               metrics.reconcile_last_run))


def event_names(rt: Runtime) -> dict[str, tuple[str, str | None]]:
    """meter -> (Stripe event name, covered event name) under the rules in force."""
    return {m.name: (m.stripe_event_name, m.covered_event_name) for m in rt.rules.meters.values()}


def _credits_moved(rt: Runtime, credits: CreditService,
                   watch: ThresholdWatch) -> Callable[[list[str]], None]:
    """Fleet mode: customers whose shared credit state moved (any member's spending) are
    checked against the alert thresholds (each alert fires once fleet-wide: the alerts
    table's unique key) and the expiry loop re-plans (a grant made on another member)."""
    def moved(customers: list[str]) -> None:
        for cid in customers:
            cust = rt.keys.customers.get(cid)
            watch.check(cid, anchor=cust.billing_anchor if cust else None)
        credits.wake()
    return moved


def build_flusher(rt: Runtime, sink: Sink, fleet: Fleet | None = None) -> Flusher:
    """The Stripe flusher; in fleet mode it acts only while this member leads the duty, and
    its outbox writes are fenced."""
    scfg = rt.cfg.stripe
    if fleet is None:
        return Flusher(rt.store, sink, lambda: event_names(rt), outbox=rt.owners().outbox,
                       usage=rt.owners().usage,
                       rate=scfg.max_rate or default_rate(scfg.api_key),
                       ambiguous_hold=2 * scfg.timeout, transforms=lambda: transforms(rt))
    from proxy.fleet.runtime import ERRORS
    return Flusher(rt.store, sink, lambda: event_names(rt), outbox=fleet.flusher_outbox(),
                   usage=rt.owners().usage,
                   rate=scfg.max_rate or default_rate(scfg.api_key),
                   ambiguous_hold=2 * scfg.timeout, transforms=lambda: transforms(rt),
                   leads=fleet.lead.leads, errors=(sqlite3.Error, *ERRORS),
                   shared=rt.owners().outbox)


def transforms(rt: Runtime) -> dict[str, TransformQuantity]:
    """meter -> transform applied to its period total (meters with a ``transform``)."""
    return {m.name: m.transform for m in rt.rules.meters.values() if m.transform is not None}


async def _final_flush(flusher: Flusher, timeout: float = 20.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            report = await flusher.flush(force=True)
        log.info("final flush: %s", report.to_json())
    except (TimeoutError, Exception):
        log.exception("final flush did not finish; undelivered usage stays in the outbox")
    await flusher.close()


def _bound_port(site: web.TCPSite) -> int:
    server = site._server  # aiohttp exposes no public accessor for the bound socket
    if server is None:
        return 0
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else 0


def monetary_in_use(rt: Runtime) -> bool:
    """``credits.mode: monetary``, or a customer set to it."""
    return in_use(rt.cfg.credits.mode, rt.keys.customers.values())


def monetary_rules_problems(rt: Runtime, rules: RuleSet) -> list[str]:
    """Why these rules cannot be priced in money while the monetary mode is in use."""
    return rules_problems(rt.cfg.storage.backend, rules, monetary_in_use(rt))


async def _first_prices(rt: Runtime) -> None:
    """Fetch the rules' ``price_id`` prices once (``_keep_prices`` keeps them fresh)."""
    ids = sorted({m.price_id for m in rt.rules.meters.values() if m.price_id})
    if not ids or rt.price_cache is not None:
        return
    conn = stripe_connect(rt.cfg.stripe)
    try:
        cache = PriceCache.for_stripe(conn, ids, rt.cfg.stripe.price_refresh)
        await cache.refresh()
        rt.price_cache = cache
    finally:
        await conn.close()


def _reload_failed(rt: Runtime, error: str) -> None:
    """A reload did not take effect (the old rules keep serving): what the admin API shows
    (``rules_error``) and the metrics say so until one does."""
    rt.rules_error = error
    metrics.rules_reloads_total.labels("error").inc()
    metrics.rules_reload_failing.set(1)


def _refuse_reload(rt: Runtime, problems: list[str]) -> bool:
    _reload_failed(rt, "\n".join(problems))
    log.error("rules reload refused; still serving version %s:\n%s", rt.rules.version,
              rt.rules_error)
    return False


async def reload_rules_checked(rt: Runtime, check: MeterCheck | None) -> bool:
    """:func:`reload_rules`, with the new rules' meters checked against Stripe first when the
    meter check is on (``check``): a wrong meter refuses the reload (the old rules stay)."""
    if check is None:
        return await reload_rules(rt)
    try:
        new = load_ruleset(rt.cfg)
    except RulesError as exc:
        return _refuse_reload(rt, [str(p) for p in exc.problems])
    names = {m.name: (m.stripe_event_name, m.covered_event_name) for m in new.meters.values()}
    problems = await check.check(names)
    if problems:
        return _refuse_reload(rt, [f"stripe: {p}" for p in problems])
    ok = await reload_rules(rt, new)
    if ok:
        check.record(problems)
    return ok


async def reload_rules(rt: Runtime, new: RuleSet | None = None) -> bool:
    """Swap in the rule files' current content (or ``new``, already loaded); a broken file
    keeps the old rules."""
    if new is None:
        try:
            new = load_ruleset(rt.cfg)
        except RulesError as exc:
            return _refuse_reload(rt, [str(p) for p in exc.problems])
    if problems := monetary_rules_problems(rt, new):
        return _refuse_reload(rt, [f"credits: {p}" for p in problems])
    if new.version != rt.rules.version:
        # stored first: a version that prices a request must be explainable. A storage
        # failure (locked past lock_wait, PostgreSQL unreachable) raises here with the old
        # rules still serving; the watcher tries the same change again (_watch_rules)
        await remember_rules(rt, new)
        metrics.rules_info.clear()
        metrics.rules_info.labels(new.version).set(1)
        log.info("rules reloaded: %s -> %s", rt.rules.version, new.version)
        rt.rules = new
    rt.rules_error = None
    metrics.rules_reloads_total.labels("ok").inc()
    metrics.rules_reload_failing.set(0)
    return True


def _stamp(paths: list[Path]) -> tuple[tuple[str, int, float, int], ...]:
    """What the watcher compares. stat() follows symlinks, and the inode is part of it: a
    Kubernetes ConfigMap update swaps a ``..data`` symlink to freshly written files, which may
    keep the old size and, with some writers, the old mtime."""
    out = []
    for p in paths:
        try:
            s = p.stat()
            out.append((str(p), s.st_ino, s.st_mtime, s.st_size))
        except OSError:
            out.append((str(p), -1, -1.0, -1))
    return tuple(out)


async def _watch_rules(rt: Runtime, check: MeterCheck | None, interval: float = 1.0) -> None:
    """Reload the rules when their files change. A reload that storage refused (the new
    version could not be stored: locked past ``lock_wait``, PostgreSQL unreachable) keeps
    the old rules, counts as failing (``meterproxy_rules_reload_failing``) and is tried
    again every ``interval`` until it is stored: the change is never dropped, and the
    watcher never ends on it."""
    stamp = _stamp(rt.cfg.rule_paths())
    while True:
        await asyncio.sleep(interval)
        now = _stamp(rt.cfg.rule_paths())
        if now != stamp:
            try:
                await reload_rules_checked(rt, check)
            except (StorageError, sqlite3.Error) as exc:
                _reload_failed(rt, f"the new rules could not be stored (retrying): {exc}")
                log.warning("rules changed but not applied: storing the new version failed;"
                            " still serving version %s, retrying in %.0f s: %s",
                            rt.rules.version, interval, exc)
                continue
            stamp = now


async def _keep_prices(rt: Runtime) -> None:
    """Fetch the Stripe Prices the rules name by ``price_id`` and refresh them every
    ``stripe.price_refresh``; a rules reload that names other ids gets a new cache."""
    scfg = rt.cfg.stripe
    if not scfg.api_key:
        return
    conn = stripe_connect(scfg)
    try:
        while True:
            ids = sorted({m.price_id for m in rt.rules.meters.values() if m.price_id})
            cache = rt.price_cache
            if cache is None or list(cache.price_ids) != ids:
                cache = PriceCache.for_stripe(conn, ids, scfg.price_refresh)
                await cache.refresh()
                rt.price_cache = cache
            elif cache.stale():
                await cache.refresh()
            await asyncio.sleep(5.0)
    finally:
        await conn.close()


async def _refresh_keys(rt: Runtime) -> None:
    """Pick up key/customer changes made by another process (the CLI) on the same file."""
    version = rt.owners().customers.data_version()
    while True:
        await asyncio.sleep(rt.cfg.keys.cache_refresh)
        v = rt.owners().customers.data_version()
        if v != version:
            version = v
            rt.keys.replace(*_snapshot(await rt.owners().customers.snapshot()))


async def _refresh_fleet_keys(rt: Runtime, fleet: Fleet) -> None:
    """Fleet mode: reload the key cache when any member changed a key or customer (the
    storage's LISTEN connection moves ``data_version``), checked every
    ``fleet.key_poll_interval``; a dead listener is reopened (until then every tick reloads,
    since an unwatched ``data_version`` changes on every call)."""
    from proxy.fleet.runtime import ERRORS
    customers = rt.owners().customers
    version = customers.data_version()
    # a change notified between start-up's snapshot and the line above moved the version
    # before it was read: one snapshot now covers it
    with suppress(*ERRORS):
        rt.keys.replace(*_snapshot(await customers.snapshot()))
    while True:
        await asyncio.sleep(rt.cfg.fleet.key_poll_interval)
        try:
            await fleet.keep_listening()
            v = customers.data_version()
            if v != version:
                rt.keys.replace(*_snapshot(await customers.snapshot()))
                version = v
        except ERRORS as exc:
            log.warning("key refresh paused, PostgreSQL unreachable: %s", exc)
        except Exception:
            log.exception("key refresh failed; retrying next tick")


async def _prune_audit(rt: Runtime) -> None:
    """Audit rows older than ``storage.audit_retention`` go, in small batches that never hold
    the loop for long. Minute aggregates (what billing uses) are kept."""
    while True:
        cutoff = int((time.time() - rt.cfg.storage.audit_retention) * 1000)
        try:
            while await rt.owners().usage.prune_audit(cutoff) == 5000:  # noqa: ASYNC110 - yield between batches
                await asyncio.sleep(0.05)
        except (sqlite3.Error, StorageError) as exc:     # a delete: run again next time
            log.warning("audit retention paused (storage): %s", exc)
        await asyncio.sleep(3600)


async def run_until_signalled(cfg: Config, ready: Callable[[Server], None] | None = None) -> None:
    server = await start(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stopping.set)
    with suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGHUP, lambda: server.tasks.append(
            spawn("rules-reload", reload_rules_checked(server.rt, server.meter_check))))
    if ready is not None:
        ready(server)
    gc.freeze()  # start-up objects never need collecting; keeps gen-2 pauses short
    await server.stopping.wait()
    log.info("shutting down: draining requests, committing usage, final flush")
    await server.shutdown()
    log.info("stopped")


def serve(cfg: Config) -> None:
    """Serve until SIGTERM/SIGINT: one process, or with ``workers > 1`` a supervisor of
    that many worker processes (``proxy.fleet.workers``)."""
    import uvloop

    if cfg.workers > 1 and not cfg.worker:
        from proxy.fleet.workers import WORKER_ENV, die_with_supervisor, supervise
        index = os.environ.get(WORKER_ENV)
        logging.basicConfig(level=cfg.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if index is None:
            raise SystemExit(supervise(cfg.workers))
        die_with_supervisor()
        cfg = cfg.model_copy(update={"worker": int(index)})

    logging.basicConfig(level=cfg.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvloop.run(run_until_signalled(cfg))


def _snapshot(snap: KeySnapshot) -> tuple[dict[str, KeyEntry], dict[str, Customer]]:
    return snap.keys, snap.customers
