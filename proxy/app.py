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
import signal
import sqlite3
import time
from collections.abc import Callable
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite
from aiohttp import web

from proxy import metrics
from proxy.admin import REFUSALS, build_admin_app
from proxy.admin_billing import FLUSHER, billing_routes
from proxy.admin_credits import CREDITS, credit_routes
from proxy.admin_reconcile import RECONCILE_GRACE, RECONCILER, reconcile_routes
from proxy.admin_webhooks import WEBHOOKS, webhook_routes
from proxy.alerts import AlertSender
from proxy.commitments import TRUEUP_INTERVAL, TrueUpTask
from proxy.config import Config, split_hostport
from proxy.consumer import ConsumerApi
from proxy.credits.ledger import Entry
from proxy.credits.service import CreditService, load_book
from proxy.credits.thresholds import ThresholdWatch
from proxy.errors import ConfigError, FileProblem
from proxy.flusher import Flusher, default_rate
from proxy.forward import Upstream
from proxy.handler import Pipeline
from proxy.limits import ConnectionGuard, effective_max_connections, guarded_runner
from proxy.meter_check import MeterCheck
from proxy.notices import NoticeWatch, notice_settings
from proxy.paths import check_database
from proxy.pricing import PriceCache, TransformQuantity
from proxy.reconcile import ReconcileMetrics, Reconciler
from proxy.rules import RulesError, RuleSet, load_rules
from proxy.runtime import Runtime
from proxy.sinks.base import Sink
from proxy.sinks.factory import build_sink
from proxy.sinks.factory import connect as stripe_connect
from proxy.store import outbox
from proxy.store.db import Store
from proxy.store.keys import KeyCache
from proxy.tasks import cancel_and_wait, spawn
from proxy.webhooks import PATH as WEBHOOK_PATH
from proxy.webhooks import WebhookReceiver

log = logging.getLogger("meterproxy")


@dataclass
class Server:
    """A running proxy: both listeners, the runtime and the background tasks."""

    rt: Runtime
    public: web.AppRunner
    admin: web.AppRunner
    reader: aiosqlite.Connection
    public_port: int = 0
    admin_port: int = 0
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    on_stop: list[Callable[[], Any]] = field(default_factory=list)
    # tasks stopped by a signal and awaited (never cancelled mid-call): (stop, task)
    graceful: list[tuple[Callable[[], None], asyncio.Task[Any]]] = field(default_factory=list)

    async def shutdown(self, timeout: float = 15.0) -> None:
        # 1. stop accepting; 2. in-flight requests finish (AppRunner.cleanup waits for them)
        await self.public.cleanup()
        await self.admin.cleanup()
        # 3. every usage row committed
        await self.rt.store.drain(timeout)
        self.rt.store.commit_pending()
        # 4. background tasks stop, then the final flush (registered by the flusher)
        for stop, task in self.graceful:
            stop()
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout)
            except TimeoutError:
                log.warning("%s did not stop within %.0fs; cancelling", task.get_name(), timeout)
        for t in self.tasks:
            await cancel_and_wait(t)
        for cb in self.on_stop:
            res = cb()
            if asyncio.iscoroutine(res):
                await res
        # 5. close resources
        await self.rt.upstream.close()
        await self.reader.close()
        self.rt.store.close()


def load_ruleset(cfg: Config) -> RuleSet:
    return load_rules(cfg.rule_paths())


def remember_rules(store: Store, rules: RuleSet) -> None:
    """Keep the text of every rules version that ever priced a request (for explain)."""
    import orjson

    files = orjson.dumps([{"file": f, "text": t} for f, t in rules.sources]).decode()
    store.execute_write(lambda c: c.execute(
        "INSERT OR IGNORE INTO rules_versions(version, first_loaded_at, files) VALUES (?,?,?)",
        (rules.version, int(time.time()), files)))


async def start(cfg: Config) -> Server:
    """Open every resource and start listening. The caller owns ``shutdown()``. A failure
    part-way (port in use, database unusable) closes what was opened, so the process exits."""
    async with AsyncExitStack() as undo:
        server = await _start(cfg, undo)
        undo.pop_all()
        return server


async def _start(cfg: Config, undo: AsyncExitStack) -> Server:
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
                           wal_truncate_size=st.wal_truncate_size)
    except sqlite3.Error as exc:
        raise FileProblem(f"cannot open database {db_path}: {exc}") from exc
    undo.callback(store.close)
    remember_rules(store, rules)
    keys = KeyCache()
    keys.reload(store.conn)
    reader = await aiosqlite.connect(str(db_path))
    undo.push_async_callback(reader.close)
    await reader.execute("PRAGMA query_only=1")
    rt = Runtime(cfg=cfg, rules=rules, store=store, keys=keys, upstream=Upstream(cfg.upstream))
    undo.push_async_callback(rt.upstream.close)
    pipeline = Pipeline(rt)
    credits = CreditService(store, load_book(store.conn))
    pipeline.book = credits.book
    store.on_withdraw = lambda row: credits.book.apply(
        Entry(e.grant_id, "refund", -e.amount) for _, e in row.debits)
    alerts = AlertSender(store, cfg.alerts.webhook_url, cfg.alerts.secret)
    pipeline.watch = ThresholdWatch(store, credits.book, cfg.alerts.thresholds,
                                    on_new=alerts.wake)
    flusher = build_flusher(rt, sink)
    meter_check = await _check_meters(rt, undo)
    _expose_billing(rt, flusher, credits)

    public_app = web.Application(client_max_size=0)
    webhooks = WebhookReceiver(store, keys, credits, cfg)
    pipeline.public_routes[WEBHOOK_PATH] = webhooks.handle   # matched on the canonical path
    # the bound coroutine method, not the instance: aiohttp wraps a non-coroutine callable
    # in a deprecated per-request shim ("Bare functions are deprecated")
    public_app.router.add_route("*", "/{tail:.*}", pipeline.__call__)
    guard = ConnectionGuard(cfg.limits, effective_max_connections(
        cfg.limits.max_connections, cfg.upstream.pool_size))
    # auto_decompress=False: request bodies are forwarded as sent (a compressed body stays
    # compressed; rules that read one answer 415, see docs/metering-bodies.md)
    public = guarded_runner(public_app, guard, handle_signals=False, access_log=None,
                            handler_cancellation=True, shutdown_timeout=10.0,
                            auto_decompress=False)
    reconciler = build_reconciler(rt)
    admin_app = build_admin_app(rt, reader,
                                billing_routes() + credit_routes() + reconcile_routes()
                                + webhook_routes())
    admin_app[WEBHOOKS] = webhooks
    admin_app[FLUSHER] = flusher
    admin_app[RECONCILE_GRACE] = cfg.stripe.reconcile_grace
    if reconciler is not None:
        admin_app[RECONCILER] = reconciler
    admin_app[CREDITS] = credits
    admin = web.AppRunner(admin_app, handle_signals=False, access_log=None)
    await public.setup()
    undo.push_async_callback(public.cleanup)
    await admin.setup()
    undo.push_async_callback(admin.cleanup)
    host, port = split_hostport(cfg.listen)
    ahost, aport = split_hostport(cfg.admin_listen)
    site = web.TCPSite(public, host, port, backlog=1024)
    await site.start()
    asite = web.TCPSite(admin, ahost, aport)
    await asite.start()
    server = Server(rt, public, admin, reader, _bound_port(site), _bound_port(asite))
    await alerts.start()
    server.tasks.append(spawn("alert-sender", alerts.run()))
    server.on_stop.append(alerts.close)
    rt.extras["alerts"] = alerts
    server.tasks.append(spawn("webhooks", webhooks.run()))
    notices = NoticeWatch(store, keys, notice_settings(cfg.alerts), prices=rt.prices,
                          on_new=alerts.wake)
    if notices.settings.enabled:
        server.tasks.append(spawn("notices", notices.run(cfg.alerts.notice_interval)))
    server.tasks.append(spawn("prices", _keep_prices(rt)))
    rt.extras["webhooks"] = webhooks
    if meter_check is not None:
        server.tasks.append(spawn("meter-check", meter_check.run()))
        server.on_stop.append(meter_check.close)
    server.tasks.append(spawn("rules-watcher", _watch_rules(rt)))
    server.tasks.append(spawn("key-refresher", _refresh_keys(rt)))
    server.tasks.append(spawn("audit-retention", _prune_audit(rt)))
    server.tasks.append(spawn("wal-checkpoint", store.checkpoint_forever(
        st.checkpoint_interval, st.integrity_check_interval)))
    server.tasks.append(spawn("connection-sweep", guard.sweep_forever()))
    rt.extras["connections"] = guard
    server.tasks.append(spawn("journal", store.materialize_forever()))
    server.graceful.append((flusher.stop, spawn("flusher", flusher.run(cfg.stripe.flush_interval))))
    server.tasks.append(spawn("credit-expiry", credits.run_expiry()))
    server.on_stop.append(lambda: _final_flush(flusher))
    for limiter in (admin_app[REFUSALS], pipeline.refusals, webhooks.refusals):
        server.on_stop.append(limiter.flush)      # "suppressed K similar messages" lines
    if cfg.stripe.api_key and cfg.stripe.sink != "dry_run":
        trueups = TrueUpTask(store.execute_write, store.conn, stripe_connect(cfg.stripe),
                             lambda: rt.rules, rt.prices)
        server.tasks.append(spawn("true-ups", trueups.run(TRUEUP_INTERVAL)))
        if trueups.stripe is not None:
            server.on_stop.append(trueups.stripe.close)
    if reconciler is not None:
        if cfg.stripe.reconcile_interval > 0:
            server.tasks.append(spawn("reconciler", reconciler.run_every(
                cfg.stripe.reconcile_interval, cfg.stripe.reconcile_grace)))
        server.on_stop.append(reconciler.stripe.close)
    rt.extras["pipeline"] = pipeline
    ConsumerApi(pipeline, reader).mount()
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
    rt.extras["meter_check"] = check
    return check


def build_reconciler(rt: Runtime) -> Reconciler | None:
    """Reconciliation needs Stripe meters: a key and a meter-events sink; else None."""
    scfg = rt.cfg.stripe
    if not scfg.api_key or scfg.sink not in ("meter_events", "meter_event_stream"):
        return None
    return Reconciler(rt.store.conn, rt.store.execute_write, stripe_connect(scfg),
                      lambda: event_names(rt), threshold=scfg.reconcile_alert_threshold,
                      metrics=ReconcileMetrics(metrics.reconcile_discrepancies,
                                               metrics.reconcile_discrepancy_rate,
                                               metrics.reconcile_alerts_total,
                                               metrics.reconcile_runs_total,
                                               metrics.reconcile_last_run))


def event_names(rt: Runtime) -> dict[str, tuple[str, str | None]]:
    """meter -> (Stripe event name, covered event name) under the rules in force."""
    return {m.name: (m.stripe_event_name, m.covered_event_name) for m in rt.rules.meters.values()}


def build_flusher(rt: Runtime, sink: Sink) -> Flusher:
    scfg = rt.cfg.stripe
    return Flusher(rt.store, sink, lambda: event_names(rt),
                   rate=scfg.max_rate or default_rate(scfg.api_key),
                   ambiguous_hold=2 * scfg.timeout, transforms=lambda: transforms(rt))


def transforms(rt: Runtime) -> dict[str, TransformQuantity]:
    """meter -> transform applied to its period total (meters with a ``transform``)."""
    return {m.name: m.transform for m in rt.rules.meters.values() if m.transform is not None}


def _expose_billing(rt: Runtime, flusher: Flusher, credits: CreditService) -> None:
    async def customer_detail(cid: str) -> dict[str, Any]:
        from proxy.units import fmt_micro

        rem = outbox.remainders(rt.store.conn, cid)
        return {"unreported_remainder": {k: fmt_micro(v) for k, v in rem.items()},
                "credits": credits.summary(cid),
                "credit_ledger": credits.entries(cid, limit=50)}

    def ready_checks() -> list[str]:
        out = []
        check = rt.extras.get("meter_check")
        if check is not None:
            out.extend(check.ready_problems())
        lag = flusher.lag()
        if lag > rt.cfg.stripe.flush_lag_ready_threshold:
            out.append(f"flush lag {lag:.0f}s exceeds "
                       f"{rt.cfg.stripe.flush_lag_ready_threshold:.0f}s")
        return out

    rt.extras["customer_detail"] = customer_detail
    rt.extras["ready_checks"] = ready_checks
    rt.extras["flusher"] = flusher
    rt.extras["credits"] = credits


async def _final_flush(flusher: Flusher, timeout: float = 20.0) -> None:
    try:
        report = await asyncio.wait_for(flusher.flush(force=True), timeout)
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


def _refuse_reload(rt: Runtime, problems: list[str]) -> bool:
    rt.rules_error = "\n".join(problems)
    metrics.rules_reloads_total.labels("error").inc()
    metrics.rules_reload_failing.set(1)
    log.error("rules reload refused; still serving version %s:\n%s", rt.rules.version,
              rt.rules_error)
    return False


async def reload_rules_checked(rt: Runtime) -> bool:
    """:func:`reload_rules`, with the new rules' meters checked against Stripe first when the
    meter check is on: a wrong meter refuses the reload (the old rules stay)."""
    check: MeterCheck | None = rt.extras.get("meter_check")
    if check is None:
        return reload_rules(rt)
    try:
        new = load_ruleset(rt.cfg)
    except RulesError as exc:
        return _refuse_reload(rt, [str(p) for p in exc.problems])
    names = {m.name: (m.stripe_event_name, m.covered_event_name) for m in new.meters.values()}
    problems = await check.check(names)
    if problems:
        return _refuse_reload(rt, [f"stripe: {p}" for p in problems])
    ok = reload_rules(rt, new)
    if ok:
        check.record(problems)
    return ok


def reload_rules(rt: Runtime, new: RuleSet | None = None) -> bool:
    """Swap in the rule files' current content (or ``new``, already loaded); a broken file
    keeps the old rules."""
    if new is None:
        try:
            new = load_ruleset(rt.cfg)
        except RulesError as exc:
            return _refuse_reload(rt, [str(p) for p in exc.problems])
    if new.version != rt.rules.version:
        metrics.rules_info.clear()
        metrics.rules_info.labels(new.version).set(1)
        log.info("rules reloaded: %s -> %s", rt.rules.version, new.version)
        remember_rules(rt.store, new)
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


async def _watch_rules(rt: Runtime, interval: float = 1.0) -> None:
    stamp = _stamp(rt.cfg.rule_paths())
    while True:
        await asyncio.sleep(interval)
        now = _stamp(rt.cfg.rule_paths())
        if now != stamp:
            stamp = now
            await reload_rules_checked(rt)


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
    version = rt.store.data_version()
    while True:
        await asyncio.sleep(rt.cfg.keys.cache_refresh)
        v = rt.store.data_version()
        if v != version:
            version = v
            rt.keys.reload(rt.store.conn)


def prune_audit(conn: sqlite3.Connection, cutoff_ms: int, batch: int = 5000) -> int:
    """Delete the oldest audit rows (by seq, which grows with time: no index on at_ms is
    needed, keeping every commit one index lighter)."""
    cur = conn.execute("DELETE FROM audit WHERE seq IN (SELECT seq FROM audit ORDER BY seq"
                       " LIMIT ?) AND at_ms < ?", (batch, cutoff_ms))
    return int(cur.rowcount)


async def _prune_audit(rt: Runtime) -> None:
    """Audit rows older than ``storage.audit_retention`` go, in small batches that never hold
    the loop for long. Minute aggregates (what billing uses) are kept."""
    while True:
        cutoff = int((time.time() - rt.cfg.storage.audit_retention) * 1000)
        def tx(c: sqlite3.Connection, cut: int = cutoff) -> int:
            return prune_audit(c, cut)

        while rt.store.execute_write(tx) == 5000:  # noqa: ASYNC110 - yield between batches
            await asyncio.sleep(0.05)
        await asyncio.sleep(3600)


async def run_until_signalled(cfg: Config, ready: Callable[[Server], None] | None = None) -> None:
    server = await start(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stopping.set)
    with suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGHUP, lambda: server.tasks.append(
            spawn("rules-reload", reload_rules_checked(server.rt))))
    if ready is not None:
        ready(server)
    gc.freeze()  # start-up objects never need collecting; keeps gen-2 pauses short
    await server.stopping.wait()
    log.info("shutting down: draining requests, committing usage, final flush")
    await server.shutdown()
    log.info("stopped")


def serve(cfg: Config) -> None:
    import uvloop

    logging.basicConfig(level=cfg.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvloop.run(run_until_signalled(cfg))
