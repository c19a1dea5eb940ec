"""Every Prometheus metric meterproxy exports, declared once (the README "Metrics" section lists them).

No metric carries a per-customer label: cardinality stays bounded by the number of
rules, meters and outcomes, which the operator controls.
"""

from __future__ import annotations

import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

_LAT = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
        5, 10, 30, 60)


class _BeforeScrape(Collector):
    """Registered first, so every scrape runs its hooks before any metric below is read:
    counts kept as plain integers on the request path (no lock, no call into
    prometheus_client per request) are added to their counters there. Hooks are weak: a
    stopped pipeline's go away with it."""

    def __init__(self) -> None:
        self.hooks: list[weakref.WeakMethod[Callable[[], None]]] = []

    def collect(self) -> Iterator[Metric]:
        for ref in list(self.hooks):
            hook = ref()
            if hook is None:
                self.hooks.remove(ref)
            else:
                hook()
        return iter(())


_BEFORE_SCRAPE = _BeforeScrape()
REGISTRY.register(_BEFORE_SCRAPE)


def before_scrape(hook: Callable[[], None]) -> None:
    """Run the bound method ``hook`` at the start of every scrape (held weakly)."""
    _BEFORE_SCRAPE.hooks.append(weakref.WeakMethod(hook))


class _LoopCount:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class LoopCounter(Collector):
    """A labelled counter incremented only from the event-loop thread: a plain float per
    child, no lock (prometheus_client's Counter takes a mutex per ``inc``; these two count
    every request). Exposed in the standard counter format at scrape time."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 registry: CollectorRegistry) -> None:
        self.name = name.removesuffix("_total")
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], _LoopCount] = {}
        registry.register(self)

    def labels(self, *values: str) -> _LoopCount:
        key = tuple(str(v) for v in values)
        if len(key) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {key}")
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = _LoopCount()
        return child

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, child in list(self._children.items()):
            family.add_metric(key, child.value)
        yield family


requests_total = LoopCounter("meterproxy_requests_total",
                             "Requests answered, by rule and status class",
                             ["rule", "code_class"], registry=REGISTRY)
metered_units_total = LoopCounter("meterproxy_metered_units_total", "Units recorded per meter",
                                  ["meter"], registry=REGISTRY)
credit_rejections_total = Counter("meterproxy_credit_rejections_total",
                                  "Requests refused (or, in shadow mode, that would have been) for lack of credits",
                                  registry=REGISTRY)
pending_usage_rows = Gauge("meterproxy_pending_usage_rows",
                           "Usage rows in memory, not yet committed to SQLite", registry=REGISTRY)
flush_lag_seconds = Gauge("meterproxy_flush_lag_seconds",
                          "Age of the oldest usage not yet delivered to the sink", registry=REGISTRY)
stripe_requests_total = Counter("meterproxy_stripe_requests_total", "Calls to the usage sink by outcome",
                                ["outcome"], registry=REGISTRY)
trueups_unsent = Gauge("meterproxy_trueups_unsent",
                       "Commitment true-ups decided (the shortfall frozen) and not yet "
                       "confirmed in Stripe as an invoice item", registry=REGISTRY)
trueup_failures_total = Counter(
    "meterproxy_trueup_failures_total",
    "True-up invoice items Stripe did not create, by outcome: unavailable (Stripe or the "
    "network failed), rejected (Stripe refused the call: fix the cause) or invalid (the "
    "frozen true-up names no Stripe customer); each is sent again at the next check, with "
    "the same parameters", ["outcome"], registry=REGISTRY)
dead_letters = Gauge("meterproxy_dead_letters", "Dead-lettered usage reports awaiting replay",
                     registry=REGISTRY)
quantity_fallback_total = Counter(
    "meterproxy_quantity_fallback_total",
    "Quantities billed at their fallback (on_unreadable, else the reservation), by reason: "
    "compressed_too_large, over_cap, stream_abandoned, no_usage_event, unreadable",
    ["rule", "meter", "reason"], registry=REGISTRY)
unreadable_quantities_total = Counter("meterproxy_unreadable_quantities_total",
                                      "Quantities that could not be read; their fallback applied",
                                      ["rule"], registry=REGISTRY)
class LoopHistogram(Collector):
    """A histogram observed only from the event-loop thread: plain integer buckets, no lock
    (prometheus_client's Histogram takes a mutex three times per observation; these two are
    observed on every request). Exposed in the standard histogram format at scrape time."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def collect(self) -> Iterator[HistogramMetricFamily]:
        cumulative, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            cumulative.append((str(bound) if bound != float("inf") else "+Inf", running))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=cumulative,
                                    sum_value=self.sum)


upstream_seconds = LoopHistogram("meterproxy_upstream_seconds",
                                 "Time spent waiting on the upstream", _LAT)
overhead_seconds = LoopHistogram("meterproxy_overhead_seconds",
                                 "Time the proxy added to a request (total minus upstream)", _LAT)
REGISTRY.register(upstream_seconds)
REGISTRY.register(overhead_seconds)


def observe_request(upstream: float, overhead: float) -> None:
    """``upstream_seconds.observe(upstream)`` and ``overhead_seconds.observe(overhead)``: one
    call per request instead of two (each request observes both)."""
    u, o = upstream_seconds, overhead_seconds
    u.counts[bisect_left(u.bounds, upstream)] += 1
    u.sum += upstream
    o.counts[bisect_left(o.bounds, overhead)] += 1
    o.sum += overhead
# counted on the event-loop thread only (the Store's group commit): lock-free
commits_total = LoopCounter("meterproxy_storage_commits_total", "Group commits by outcome",
                            ["outcome"], registry=REGISTRY)
commits_ok = commits_total.labels("ok")         # every group commit: the child looked up once
# observed by every group commit, on the event-loop thread only: lock-free
commit_rows = LoopHistogram("meterproxy_storage_commit_rows", "Usage rows per group commit",
                            (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000))
commit_seconds = LoopHistogram("meterproxy_storage_commit_seconds", "Duration of one group commit",
                               _LAT)
REGISTRY.register(commit_rows)
REGISTRY.register(commit_seconds)
lost_usage_rows_total = Counter("meterproxy_lost_usage_rows_total",
                                "Usage rows dropped because storage could not commit (fail_mode open)",
                                registry=REGISTRY)
metering_unavailable_total = Counter("meterproxy_metering_unavailable_total",
                                     "Requests answered 503 because storage could not commit",
                                     registry=REGISTRY)
rules_reloads_total = Counter("meterproxy_rules_reloads_total", "Rule reloads by outcome", ["outcome"],
                              registry=REGISTRY)
rules_info = Gauge("meterproxy_rules_version_info", "The rules version in force", ["version"],
                   registry=REGISTRY)
rules_reload_failing = Gauge("meterproxy_rules_reload_failing",
                             "1 while the rules files on disk are refused (the previous version "
                             "keeps serving), else 0", registry=REGISTRY)
client_aborts_total = Counter("meterproxy_client_aborts_total",
                              "Responses the consumer abandoned before the end (still metered)",
                              registry=REGISTRY)
upstream_errors_total = Counter("meterproxy_upstream_errors_total", "Upstream failures by kind",
                                ["kind"], registry=REGISTRY)
stripe_retries_total = Counter("meterproxy_stripe_retries_total",
                               "Sink calls retried (transient errors)", ["reason"], registry=REGISTRY)
outbox_dry_run = Gauge("meterproxy_outbox_dry_run",
                       "Meter events only logged by the dry-run sink, not delivered to Stripe"
                       " (a real sink sends them)", registry=REGISTRY)
outbox_pending = Gauge("meterproxy_outbox_pending", "Meter events staged but not yet delivered",
                       registry=REGISTRY)
last_flush_success = Gauge("meterproxy_last_flush_success_timestamp_seconds",
                           "Unix time of the last flush that delivered everything it tried",
                           registry=REGISTRY)
circuit_open = Gauge("meterproxy_stripe_circuit_open", "1 while the sink circuit breaker is open",
                     registry=REGISTRY)
dead_letters_total = Counter("meterproxy_dead_lettered_events_total", "Events dead-lettered, by reason kind",
                             ["reason"], registry=REGISTRY)
credit_shadow_rejections_total = Counter(
    "meterproxy_credit_shadow_rejections_total",
    "Requests enforcement: shadow let through that enforcement would have refused (402)",
    registry=REGISTRY)
reconcile_discrepancies = Gauge("meterproxy_reconcile_discrepancies",
                                "Last reconcile: hours by verdict (match, shortfall, excess, pending)"
                                " and follow-ups (resend, dead_letter, operator)",
                                ["kind"], registry=REGISTRY)
reconcile_discrepancy_rate = Gauge("meterproxy_reconcile_discrepancy_rate",
                                   "Last reconcile: (shortfall + excess) / judged hours",
                                   registry=REGISTRY)
reconcile_alerts_total = Counter("meterproxy_reconcile_alerts_total",
                                 "Reconciles whose discrepancy rate passed the threshold",
                                 registry=REGISTRY)
reconcile_runs_total = Counter("meterproxy_reconcile_runs_total",
                               "Reconcile runs by outcome (ok, partial, refused, error)",
                               ["outcome"], registry=REGISTRY)
reconcile_last_run = Gauge("meterproxy_reconcile_last_run_timestamp_seconds",
                           "Unix time of the last completed reconcile", registry=REGISTRY)
notices_total = Counter("meterproxy_notices_total",
                        "Operator notices queued (usage.spike, billing.pre_renewal,"
                        " usage.digest), each once", ["kind"], registry=REGISTRY)
alerts_total = Counter("meterproxy_alerts_total",
                       "Credit alerts by delivery outcome (sent, retry, dead, logged)",
                       ["outcome"], registry=REGISTRY)
auth_failures_total = Counter("meterproxy_auth_failures_total",
                              "Unauthenticated failures: forged webhooks (webhook_signature), bad admin"
                              " tokens (admin_token), unknown API keys (api_key)",
                              ["kind"], registry=REGISTRY)
AUTH_FAIL_WEBHOOK = auth_failures_total.labels("webhook_signature")
AUTH_FAIL_ADMIN = auth_failures_total.labels("admin_token")
AUTH_FAIL_API_KEY = auth_failures_total.labels("api_key")

# ---- storage health and resource bounds (docs/resources.md) ------------------------------
sqlite_wal_bytes = Gauge("meterproxy_sqlite_wal_bytes",
                         "Size of the SQLite write-ahead log file, its preallocated zeros included: never "
                         "below 2 x wal_truncate_size (sampled every checkpoint tick)",
                         registry=REGISTRY)
wal_checkpoints_total = Counter("meterproxy_wal_checkpoints_total",
                                "WAL checkpoints by mode (passive, truncate) and result"
                                " (ok, busy, error; passive also starved: a pass that waited"
                                " over one checkpoint interval for CPU)", ["mode", "result"],
                                registry=REGISTRY)
wal_start_overs_total = Counter("meterproxy_wal_start_overs_total",
                                "WAL generations begun by the maintenance thread (after a RESTART, or"
                                " after a pass that copied every frame with no WAL pin held): each one"
                                " fdatasyncs the new WAL header while group commits wait",
                                registry=REGISTRY)
wal_locked_bytes = Gauge("meterproxy_wal_locked_bytes",
                         "Bytes of the WAL file locked in memory (storage.wal_memory_lock): its"
                         " preallocated size while locked, 0 when not (off, or not permitted)",
                         registry=REGISTRY)
storage_broken = Gauge("meterproxy_storage_broken",
                       "1 once the database file was deleted, replaced or found corrupt",
                       registry=REGISTRY)
withdrawn_usage_rows_total = Counter(
    "meterproxy_withdrawn_usage_rows_total",
    "Usage rows dropped because their request was answered 503 instead (never billed)",
    registry=REGISTRY)
open_connections = Gauge("meterproxy_open_connections", "Open consumer connections (public port)",
                         registry=REGISTRY)
upstream_connections = Gauge(
    "meterproxy_upstream_connections",
    "The upstream connection pool at scrape time: open (busy, idle or connecting), idle, "
    "connecting, and requests waiting for a connection (upstream.pool_size reached)",
    ["state"], registry=REGISTRY)


def watch_upstream_pool(stats: Callable[[], Mapping[str, int]]) -> None:
    """Read the pool's counts when scraped (nothing per request): ``stats()`` returns
    open, idle, waiting and connecting."""
    for state in ("open", "idle", "waiting", "connecting"):
        upstream_connections.labels(state).set_function(
            lambda state=state: float(stats()[state]))     # type: ignore[misc]


connections_refused_total = Counter("meterproxy_connections_refused_total",
                                    "Consumer connections refused (503) at max_connections",
                                    registry=REGISTRY)
connections_closed_total = Counter("meterproxy_connections_closed_total",
                                   "Consumer connections closed by a bound, by reason"
                                   " (header_timeout, body_timeout, write_timeout, header_too_large)",
                                   ["reason"], registry=REGISTRY)
concurrency_rejections_total = Counter("meterproxy_concurrency_rejections_total",
                                       "Requests refused (429) at a customer's concurrency limit",
                                       registry=REGISTRY)
stripe_meters_verified = Gauge(
    "meterproxy_stripe_meters_verified",
    "1 when every rules meter was checked against Stripe's Billing Meters and fits delta "
    "events; 0 while unchecked (Stripe unreachable) or when a meter is wrong",
    registry=REGISTRY)
stripe_meter_checks_total = Counter(
    "meterproxy_stripe_meter_checks_total",
    "Checks of the rules' meters against Stripe, by outcome (ok, mismatch, unreachable)",
    ["outcome"], registry=REGISTRY)

# ---- fleet mode (storage.backend postgres); absent from a single-process scrape's values ----
fleet_leader = Gauge("meterproxy_fleet_leader",
                     "1 while this member leads the fleet's Stripe flusher, else 0",
                     registry=REGISTRY)
fleet_journal_pending_rows = Gauge("meterproxy_fleet_journal_pending_rows",
                                   "Journal rows of this member not yet shipped to the shared "
                                   "usage ledger", registry=REGISTRY)
fleet_ship_age_seconds = Gauge("meterproxy_fleet_ship_age_seconds",
                               "Seconds since this member last shipped its whole journal",
                               registry=REGISTRY)
fleet_leases_held = Gauge("meterproxy_fleet_leases_held",
                          "Credit leases this member holds (one per customer)", registry=REGISTRY)
fleet_lease_credits = Gauge("meterproxy_fleet_lease_credits",
                            "Credits left in this member's leases (sum over customers)",
                            registry=REGISTRY)
fleet_lease_refills_total = Gauge("meterproxy_fleet_lease_refills",
                                  "Lease grant statements this member has issued",
                                  registry=REGISTRY)
fleet_lease_idle_returns = Gauge("meterproxy_fleet_lease_idle_returns",
                                 "Leases this member returned after fleet.lease_idle without "
                                 "an admission", registry=REGISTRY)
fleet_pg_statements = Gauge("meterproxy_fleet_pg_statements",
                            "Statements this member has run on its PostgreSQL pool",
                            registry=REGISTRY)
fleet_pg_conflicts_total = Counter(
    "meterproxy_fleet_pg_conflicts_total",
    "PostgreSQL deadlocks and serialization failures (the transaction rolled back) by outcome:"
    " retried (run again) or exhausted (given up: 503 storage_unavailable or a failed step)",
    ["outcome"], registry=REGISTRY)

# the monetary credits mode (proxy.credits.mirror): grants mirrored as Stripe credit grants
# and the local balances compared with Stripe's credit balance summaries
credit_grant_mirrors_total = Counter(
    "meterproxy_credit_grant_mirrors_total",
    "Stripe credit grant mirror attempts by outcome (created, found, voided, retry, dead)",
    ["outcome"], registry=REGISTRY)
credit_grant_mirrors = Gauge(
    "meterproxy_credit_grant_mirrors_waiting",
    "Local grants of monetary customers whose Stripe credit grant is not mirrored yet"
    " (pending) or was dead-lettered (dead)", ["status"], registry=REGISTRY)
credit_balance_mismatch = Gauge(
    "meterproxy_credit_balance_mismatch",
    "Monetary customers whose Stripe credit balance differed from the local one at the last"
    " balance check", registry=REGISTRY)
credit_balance_checks_total = Counter(
    "meterproxy_credit_balance_checks_total",
    "Monetary balance checks by result (match, mismatch, error)", ["result"],
    registry=REGISTRY)
