"""The config file (``meterproxy.yaml``): load once, expand ``${VAR}``, validate, freeze.

Invariants: a Config that exists is valid; every problem in a bad file is reported at
once as ``file:line: message``; nothing outside this module parses the config file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from proxy import paths, yamlpos
from proxy.errors import ConfigError
from proxy.units import DURATION_PATTERN, parse_duration, to_micro

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _duration(v: object) -> float:
    return parse_duration(v)


def _size(v: object) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*", v)
        if m:
            mult = {"B": 1, None: 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3,
                    "KB": 1000, "MB": 1000**2, "GB": 1000**3}[m.group(2)]
            return int(m.group(1)) * mult
    raise ValueError(f"expected a size like 1048576 or '1MiB', got {v!r}")


# The text forms, as JSON Schema patterns (docs/schema/config.schema.json); ``x-kind`` tells
# the reference generator (proxy/configdoc.py) to print defaults as "10ms" / "1MiB".
SIZE_PATTERN = r"^\s*\d+\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$"
Duration = Annotated[float, BeforeValidator(_duration), WithJsonSchema({
    "anyOf": [{"type": "number", "minimum": 0}, {"type": "string", "pattern": DURATION_PATTERN}],
    "x-kind": "duration"})]
Size = Annotated[int, BeforeValidator(_size), WithJsonSchema({
    "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": SIZE_PATTERN}],
    "x-kind": "size"})]


AUDIT_RETENTION_DEFAULT = 400 * 86400.0
"""Audit retention default: a card dispute can be opened up to 120 days after the charge, the
charge comes up to one billing period (31 days) after the usage, the response window is up to
21 days and the network's decision can take 75 more; 400 days covers that (247 days) with
margin, and a year-over-year audit."""

FLEET_SERVING = True
"""Whether the serving path runs on ``storage.backend: postgres`` (it does: proxy.fleet.runtime).
While it did not, such a config was refused at load: serving it from per-process SQLite files
would multiply every balance by the number of replicas (docs/fleet.md)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UpstreamConfig(_Model):
    """The API meterproxy fronts: every matched, admitted request is forwarded here."""

    url: str = Field(
        default="http://127.0.0.1:9000",
        description="Base URL of the upstream API (http:// or https://). A trailing slash is "
                    "removed; the consumer's path and query are appended to it.",
        examples=["http://127.0.0.1:9000", "${UPSTREAM_URL}"])
    connect_timeout: Duration = Field(
        default=5.0,
        description="How long to wait for a TCP (and TLS) connection to the upstream; past "
                    "it the consumer gets 504 `upstream_timeout`.",
        examples=["5s"])
    read_timeout: Duration = Field(
        default=60.0,
        description="Longest silence allowed while reading the upstream's response (between "
                    "two reads, not the whole response, so long streams are fine); past it "
                    "the consumer gets 504 `upstream_timeout`.",
        examples=["120s"])
    pool_size: int = Field(
        default=256, ge=1,
        description="Keep-alive connections to the upstream, at most.",
        examples=[512])
    pool_wait: Duration = Field(
        default=5.0, gt=0,
        description="Longest a request waits for one of the pool_size upstream connections "
                    "when all are busy; then it is answered 503 upstream_busy (not forwarded, "
                    "not billed).")
    idle_timeout: Duration = Field(
        default=15.0, gt=0,
        description="An idle keep-alive connection to the upstream is closed after this "
                    "(checked about every 0.5 s). Keep it below the upstream's own keep-alive "
                    "timeout, so the proxy closes first.",
        examples=["15s"])
    max_requests_per_connection: int = Field(
        default=1000, ge=1,
        description="Requests sent on one upstream connection before it is closed and a new "
                    "one is opened.")
    max_response_head_bytes: int = Field(
        default=65536, ge=1024,
        description="Largest upstream response head (status line and headers); a larger "
                    "one is answered 502 `upstream_unavailable`.")
    max_response_field_bytes: int = Field(
        default=8190, ge=256,
        description="Largest single upstream response header (name plus value); a larger "
                    "one is answered 502 `upstream_unavailable`.")
    max_response_headers: int = Field(
        default=256, ge=1,
        description="Most header lines in an upstream response head (and trailer lines "
                    "after a chunked body); more are answered 502 `upstream_unavailable`.")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/]+", v):
            raise ValueError("upstream.url must be an http:// or https:// URL")
        return v.rstrip("/")


class StorageConfig(_Model):
    """The SQLite ledger: every usage row, customer, key, credit grant and outbox event."""

    path: str = Field(
        default="./meterproxy.db",
        description="The SQLite database file (created if missing; WAL mode, so the `-wal` and "
                    "`-shm` files beside it belong to it). A relative path is relative to the "
                    "directory of the config file.",
        examples=["/data/meterproxy.db"])
    durability: Literal["strict", "batched"] = Field(
        default="strict",
        description="`strict`: the final bytes of a metered response are released only after "
                    "its usage row is committed (group commit), so a killed process never loses "
                    "a response the consumer received. `batched`: rows commit every "
                    "`commit_interval` in the background; a crash loses at most one interval.",
        examples=["batched"])
    commit_interval: Duration = Field(
        default=0.010,
        description="Group-commit period: one SQLite transaction per interval, shared by every "
                    "request in it. Under `strict` it is also the most a metered response "
                    "waits for its commit.",
        examples=["5ms"])
    fail_mode: Literal["closed", "open"] = Field(
        default="closed",
        description="When storage cannot commit: `closed` answers 503 `metering_unavailable` "
                    "(never billed); `open` serves the request and counts the usage as lost "
                    "(`meterproxy_lost_usage_rows_total`).",
        examples=["open"])
    synchronous: Literal["normal", "full"] = Field(
        default="normal",
        description="SQLite `synchronous` pragma. `normal` (with WAL) survives a killed "
                    "process; `full` adds power-loss durability at one fsync per group commit.",
        examples=["full"])
    audit_retention: Duration = Field(
        default=AUDIT_RETENTION_DEFAULT,
        description="Per-request audit rows older than this are pruned (the per-minute "
                    "aggregates that bills are made from are kept). The default, 400 days, "
                    "outlives a card dispute's whole lifecycle (see docs/billing-semantics.md): "
                    "lower it only if you keep the evidence elsewhere.",
        examples=["180d"])
    max_pending_rows: int = Field(
        default=200_000, ge=100,
        description="Bound on usage rows held in memory while SQLite cannot commit; beyond it "
                    "`fail_mode` applies at once. Also the most settlements of one customer "
                    "that wait while its monetary credits account opens (at most 10,000; "
                    "beyond it the opening is deferred).",
        examples=[500000])
    lock_wait: Duration = Field(
        default=2.0, ge=0,
        description="While another process holds the database write lock, how long a group "
                    "commit keeps retrying (on a timer: the event loop never blocks, /healthz "
                    "and unmetered routes stay fast) before fail_mode decides for the waiting "
                    "metered requests; an admin write waits as long, then answers 503 "
                    "storage_unavailable with Retry-After (nothing written).")
    checkpoint_interval: Duration = Field(
        default=1.0, gt=0,
        description="How often the WAL is checkpointed (a PASSIVE pass in a worker thread) "
                    "and the database file's identity (deleted or replaced) is checked.")
    wal_truncate_size: Size = Field(
        default=16 * 1024 * 1024, ge=0,
        description="When the WAL holds more than this after the passive pass, a RESTART "
                    "checkpoint lets the next commit start it over from its beginning, "
                    "rewriting the file in place up to twice this size and cutting a larger "
                    "one to that (SQLite's journal_size_limit); a tick with nothing written "
                    "since the previous one truncates a WAL file over twice this size to "
                    "zero bytes. The WAL stays under about this size plus one "
                    "checkpoint_interval of writes. The WAL file's disk blocks are "
                    "allocated up to twice this size at start and after that truncate, so "
                    "commits never allocate them. Only the RESTART, that truncate and "
                    "shutdown start a new WAL generation (one fdatasync of its header that "
                    "the commits wait for): a larger size spaces them out at high write "
                    "rates, at the cost of disk.")
    wal_memory_lock: bool = Field(
        default=True,
        description="Lock the WAL file's preallocated pages (twice wal_truncate_size) in "
                    "memory, so that the kernel's proactive reclaim (DAMON pageout, "
                    "memory.reclaim, a cgroup near its limit) cannot evict them: a commit "
                    "writing into an evicted WAL page waits on the event loop for the block "
                    "to be read back first. Needs CAP_IPC_LOCK or an RLIMIT_MEMLOCK of at "
                    "least that size (the soft limit is raised to the hard one when needed); "
                    "when not permitted, one warning and the WAL is not locked "
                    "(meterproxy_wal_locked_bytes is 0).")
    integrity_check_interval: Duration = Field(
        default=300.0, ge=0,
        description="How often PRAGMA quick_check verifies the database file in a worker "
                    "thread (0 = never); a corrupt file fails /readyz and stops writes.")
    backend: Literal["sqlite", "postgres"] = Field(
        default="sqlite",
        description="`sqlite`: one process with its own file (`path`), the default. "
                    "`postgres`: fleet mode, every meterproxy pointed at `dsn` shares one "
                    "ledger, customers, keys, credit balance (through leases) and Stripe "
                    "flusher; each member journals locally and ships in batches "
                    "(docs/fleet.md).",
        examples=["postgres"])
    dsn: str = Field(
        default="",
        description="`backend: postgres` only (required there): the PostgreSQL connection "
                    "URI. Keep the password out of the file: `${METERPROXY_PG_DSN}`.",
        examples=["${METERPROXY_PG_DSN}", "postgresql://meterproxy@db:5432/meterproxy"])
    pool_size: int = Field(
        default=10, ge=1, le=1000,
        description="`backend: postgres`: most connections one member opens (plus one for "
                    "key-change notifications).",
        examples=[4])
    statement_cache_size: int = Field(
        default=100, ge=0,
        description="`backend: postgres`: prepared statements cached per connection. Set 0 "
                    "behind a transaction pooler (PgBouncer `pool_mode = transaction`), which "
                    "cannot keep prepared statements between transactions.",
        examples=[0])

    @model_validator(mode="after")
    def _postgres_needs_dsn(self) -> StorageConfig:
        if self.backend == "postgres" and not self.dsn:
            raise ValueError("storage.backend postgres needs storage.dsn")
        if self.backend == "postgres" and not FLEET_SERVING:
            raise ValueError("storage.backend postgres is not served by this release yet "
                             "(docs/fleet.md); use sqlite")
        return self


class KeySource(_Model):
    """One place an API key may be found in a request: a header (optionally with a scheme)
    or a query parameter."""

    header: str | None = Field(
        default=None,
        description="Request header carrying the key (case-insensitive).",
        examples=["Authorization"])
    scheme: str | None = Field(
        default=None,
        description="With `header`: the auth scheme before the key, e.g. `Bearer` in "
                    "`Authorization: Bearer <key>`; omit when the header holds the bare key.",
        examples=["Bearer"])
    query: str | None = Field(
        default=None,
        description="Query parameter carrying the key (instead of `header`).",
        examples=["api_key"])


class KeysConfig(_Model):
    """How consumers are identified: API keys (stored hashed, shown once at creation)."""

    sources: tuple[KeySource, ...] = Field(
        default=(KeySource(header="Authorization", scheme="Bearer"), KeySource(header="X-API-Key")),
        description="Where to look for the consumer's API key, tried in order; each item names "
                    "exactly one of `header` or `query`.",
        examples=[[{"header": "Authorization", "scheme": "Bearer"}, {"query": "api_key"}]])
    forward_to_upstream: bool = Field(
        default=False,
        description="Pass the consumer's API key on to the upstream. `false` strips it (the "
                    "upstream never sees meterproxy's keys).",
        examples=[True])
    cache_refresh: Duration = Field(
        default=1.0,
        description="How often the in-memory key cache checks the database for changes made "
                    "by another process (the CLI); changes through the admin API apply at once.",
        examples=["5s"])

    @field_validator("sources")
    @classmethod
    def _sources(cls, v: tuple[KeySource, ...]) -> tuple[KeySource, ...]:
        for s in v:
            if (s.header is None) == (s.query is None):
                raise ValueError("each key source names exactly one of 'header' or 'query'")
        if not v:
            raise ValueError("at least one key source is needed")
        return v


class StripeConfig(_Model):
    """Reporting usage to Stripe Billing (through the outbox, exactly once)."""

    api_key: str = Field(
        default="",
        description="Stripe secret or restricted key (`sk_...` / `rk_...`). Keep it out of "
                    "the file: `${STRIPE_API_KEY}`. Required by every sink but `dry_run`: "
                    "a Stripe sink without it refuses to start.",
        examples=["${STRIPE_API_KEY}"])
    sink: Literal["meter_events", "meter_event_stream", "usage_records", "dry_run"] = Field(
        default="meter_events",
        description="Where usage goes: `meter_events` (Billing Meter Events API, one call per "
                    "event), `meter_event_stream` (the high-throughput v2 stream), "
                    "`usage_records` (legacy subscription-item usage records) or `dry_run` "
                    "(logged locally, nothing sent; only when chosen here, never a fallback). "
                    "Events the dry-run sink logged keep the outbox state `dry_run` and a "
                    "Stripe sink started later on the same database sends them.",
        examples=["meter_event_stream"])
    api_base: str = Field(
        default="https://api.stripe.com",
        description="Stripe API base URL (change only for a test double).",
        examples=["https://api.stripe.com"])
    meter_events_base: str = Field(
        default="https://meter-events.stripe.com",
        description="Base URL of Stripe's meter event stream API (`meter_event_stream` sink).",
        examples=["https://meter-events.stripe.com"])
    flush_interval: Duration = Field(
        default=60.0,
        description="How often the flusher delivers staged usage to the sink.",
        examples=["30s"])
    webhook_secret: str = Field(
        default="",
        description="Signing secret (`whsec_...`) of the Stripe webhook endpoint that posts to "
                    "`/webhooks/stripe`; empty: webhooks are refused.",
        examples=["${STRIPE_WEBHOOK_SECRET}"])
    timeout: Duration = Field(
        default=10.0,
        description="Timeout of one call to Stripe.",
        examples=["20s"])
    max_rate: float = Field(
        default=0.0, ge=0,
        description="Account-wide cap on calls to Stripe per second; 0 picks the default for "
                    "the key's mode (500/s live, 20/s test).",
        examples=[50])
    usage_records_version: str = Field(
        default="2024-06-20",
        description="`Stripe-Version` pinned for the legacy usage records API "
                    "(`usage_records` sink).",
        examples=["2024-06-20"])
    subscription_items: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description="`usage_records` sink only (required there): meter name -> "
                    "{Stripe customer id: subscription item id}.",
        examples=[{"api_calls": {"cus_NffrFeUfNV2Hib": "si_NffrQWlP2xF1Jb"}}])
    flush_lag_ready_threshold: Duration = Field(
        default=3600.0,
        description="`/readyz` reports degraded when the oldest undelivered usage is older "
                    "than this.",
        examples=["30m"])
    verify_meters: bool = Field(
        default=True,
        description="With a meter-events sink, check every rules meter against Stripe's "
                    "Billing Meters at start and on rules reload: a meter that is missing, "
                    "inactive, not `sum`, reads other payload keys or is pre-aggregated "
                    "(`event_time_window`) refuses start (exit 2) or the reload. Stripe "
                    "unreachable: start anyway, retry in the background, `/readyz` degraded.",
        examples=[False])
    meter_check_retry: Duration = Field(
        default=30.0, gt=0,
        description="While Stripe could not be asked about its meters, how often the meter "
                    "check is retried.",
        examples=["2m"])
    reconcile_interval: Duration = Field(
        default=0.0,
        description="Run reconciliation (ledger vs Stripe's meter event summaries, hour by "
                    "hour) this often; 0 turns scheduled reconciliation off.",
        examples=["6h"])
    reconcile_grace: Duration = Field(
        default=7200.0,
        description="Hours younger than this are not judged by reconciliation (Stripe's "
                    "summaries lag behind).",
        examples=["3h"])
    reconcile_alert_threshold: float = Field(
        default=0.01, ge=0, le=1,
        description="Fraction of judged hours with a discrepancy above which a reconcile run "
                    "alerts (metric, log, exit code 3 on the CLI).",
        examples=[0.05])
    price_refresh: Duration = Field(
        default=3600.0,
        description="How often Stripe Prices named by a meter's `price_id` are fetched again.",
        examples=["15m"])

    @model_validator(mode="after")
    def _usage_records_need_items(self) -> StripeConfig:
        if self.sink == "usage_records" and self.api_key and not self.subscription_items:
            raise ValueError("sink usage_records needs stripe.subscription_items "
                             "(meter -> {stripe_customer_id: subscription item id})")
        return self


class AdminConfig(_Model):
    """The admin API (customers, keys, credits, exports) on `admin_listen`."""

    token: str = Field(
        description="Bearer token every admin route except `/healthz` and `/readyz` requires "
                    "(at least 8 characters). Required. Keep it out of the file: "
                    "`${METERPROXY_ADMIN_TOKEN}`.",
        examples=["${METERPROXY_ADMIN_TOKEN}"])

    @field_validator("token")
    @classmethod
    def _token(cls, v: str) -> str:
        if len(v) < 8:
            raise ValueError("admin.token must be set (at least 8 characters)")
        return v


class CreditPack(_Model):
    """A Stripe price that buys a fixed number of credits."""
    credits: str = Field(
        description="Credits one unit of this price buys (an exact decimal, as a string).",
        examples=["10000"])
    expires_in: Duration | None = Field(
        default=None,
        description="The grant expires this long after the purchase; unset: never.",
        examples=["365d"])
    priority: int = Field(
        default=50, ge=0, le=100,
        description="Grant priority: higher burns first (then the earliest expiry).",
        examples=[40])


class CreditPlan(_Model):
    """A subscription price whose every paid period grants an allowance."""
    allowance: str = Field(
        description="Credits granted for each paid period (an exact decimal, as a string).",
        examples=["5000"])
    mode: Literal["reset", "rollover"] = Field(
        default="reset",
        description="`reset`: the allowance expires at the period's end. `rollover`: the "
                    "previous period's remainder is carried into the new grant.",
        examples=["rollover"])
    cap: str | None = Field(
        default=None,
        description="`rollover` only: the most a period's grant may hold with the carried "
                    "remainder; unset: no cap beyond what `rollover_expiry` bounds.",
        examples=["15000"])
    rollover_expiry: Literal["next_period", "never"] = Field(
        default="next_period",
        description="`rollover` only. `next_period`: carried credits are carried once and "
                    "expire at the end of the period they were carried into (the carried part "
                    "is spent first), so a grant never holds more than two periods' allowance. "
                    "`never`: whatever is left is carried again, up to `cap`.",
        examples=["never"])
    priority: int = Field(
        default=60, ge=0, le=100,
        description="Grant priority, as Stripe's: 0 burns first, 100 last (then the "
                    "earliest expiry).",
        examples=[70])


class CreditsConfig(_Model):
    """Prepaid credits: enforcement and the Stripe webhook mappings that grant them."""

    mode: Literal["units", "monetary"] = Field(
        default="units",
        description="What a credit is, for every customer without a `credit_mode` of its own "
                    "(set through the admin API, which takes precedence). `units`: a usage's "
                    "`credits:` rate prices it in credits, and only the units credits do not "
                    "cover are reported to Stripe (Stripe's tiers see the uncovered count; use "
                    "flat per-unit prices). `monetary`: a credit is one major unit of the "
                    "price's currency (1 USD, 1 JPY); a request burns the marginal price of its "
                    "quantity on the customer's period total (Stripe's tiers, flat fees and "
                    "rounding), every unit is reported to Stripe, and every grant is mirrored "
                    "as a Stripe credit grant that Stripe applies to the invoice "
                    "(docs/credits.md). Every metered meter then needs a Stripe price "
                    "(`price` or `price_id` in the rules), all in one currency.",
        examples=["monetary"])
    balance_check_interval: Duration = Field(
        default=3600.0,
        description="Monetary mode with a Stripe key: how often each monetary customer's "
                    "local credit balance is compared with Stripe's credit balance summary "
                    "(`meterproxy_credit_balance_mismatch`; 0 = only on demand, "
                    "`POST /admin/credits/balance-check`).",
        examples=["15m"])
    mirror_max_attempts: int = Field(
        default=12, ge=1, le=1000,
        description="Monetary mode: failed attempts to mirror one grant to Stripe (retried "
                    "with exponential backoff, 1 s doubling up to 1 h) before it is "
                    "dead-lettered (`GET /admin/credits/mirrors?status=dead`, requeued by "
                    "`POST /admin/credits/mirrors/requeue`).",
        examples=[20])

    enforcement: Literal["enforce", "shadow"] = Field(
        default="enforce",
        description="`enforce`: a `block` customer without credits gets 402 "
                    "`insufficient_credits`. `shadow`: such requests are let through and "
                    "counted (`meterproxy_credit_shadow_rejections_total`), for a trial.",
        examples=["shadow"])
    default_estimate: str = Field(
        default="1",
        description="Units reserved at admission for a usage whose quantity is only known "
                    "after the response and whose rule has no `estimate` (an exact decimal, as "
                    "a string).",
        examples=["1000"])
    top_up_url: str = Field(
        default="",
        description="Where a consumer buys credits; shown in the 402 body (empty: not shown).",
        examples=["https://example.com/billing"])
    packs: dict[str, CreditPack] = Field(
        default_factory=dict,
        description="Stripe price id -> credit pack: a paid invoice or completed checkout for "
                    "that price grants the pack's credits.",
        examples=[{"price_1PackOf10k": {"credits": "10000", "expires_in": "365d"}}])
    plans: dict[str, CreditPlan] = Field(
        default_factory=dict,
        description="Stripe price id -> plan: every paid subscription period of that price "
                    "grants the plan's allowance.",
        examples=[{"price_1ProMonthly": {"allowance": "5000", "mode": "rollover",
                                         "cap": "15000"}}])
    on_payment_failed: Literal["none", "suspend"] = Field(
        default="none",
        description="On Stripe's `invoice.payment_failed`: `none` does nothing, `suspend` "
                    "suspends the customer (403 `customer_suspended`).",
        examples=["suspend"])


class AlertsConfig(_Model):
    """Credit-balance alerts to the operator's system."""

    thresholds: tuple[float, ...] = Field(
        default=(0.5, 0.75, 0.9),
        description="Fractions of a customer's granted credits; crossing one fires one alert "
                    "per grant period. Each in (0, 1].",
        examples=[[0.8, 0.95]])
    webhook_url: str = Field(
        default="",
        description="Alerts are POSTed here, signed with `secret`; empty: alerts are only "
                    "logged.",
        examples=["https://ops.example.com/hooks/meterproxy"])
    secret: str = Field(
        default="",
        description="HMAC key that signs every alert (at least 16 characters; required with "
                    "`webhook_url`).",
        examples=["${METERPROXY_ALERTS_SECRET}"])
    pre_renewal: Duration | None = Field(
        default=None,
        description="Send a `billing.pre_renewal` notice this long before each customer's "
                    "billing period ends (once per period), with the usage so far, the "
                    "projection at period end and the projected charge; unset: off.",
        examples=["3d"])
    spike_factor: float | None = Field(
        default=None, gt=1,
        description="Send a `usage.spike` notice (once per customer, meter and UTC day) when "
                    "the day's usage is above this many times the daily average of the 7 "
                    "days before; unset: off.",
        examples=[3.0])
    spike_min: str = Field(
        default="0",
        description="Units a day's usage must reach before it can be a spike (an exact "
                    "decimal, as a string).",
        examples=["1000"])
    digest: Literal["off", "daily", "weekly"] = Field(
        default="off",
        description="Send a `usage.digest` notice per customer with usage in the last "
                    "complete UTC day or week (weeks start on Monday).",
        examples=["weekly"])
    notice_interval: Duration = Field(
        default=60.0,
        description="How often notices are checked (a few grouped queries over the "
                    "per-minute usage).",
        examples=["5m"])

    @model_validator(mode="after")
    def _signed(self) -> AlertsConfig:
        if self.webhook_url and len(self.secret) < 16:
            raise ValueError("alerts.webhook_url needs alerts.secret (at least 16 characters) "
                             "to sign every alert")
        if any(not 0 < t <= 1 for t in self.thresholds):
            raise ValueError("alerts.thresholds are fractions in (0, 1]")
        try:
            to_micro(self.spike_min)
        except ValueError as exc:
            raise ValueError(f"alerts.spike_min: {exc}") from exc
        if self.notice_interval <= 0:
            raise ValueError("alerts.notice_interval must be positive")
        return self


class LimitsConfig(_Model):
    """Bounds on what one consumer connection or customer can hold (docs/resources.md)."""
    max_connections: int = Field(
        default=1000, ge=1,
        description="Open consumer connections on the public port. One more is accepted, "
                    "answered 503 too_many_connections and closed. At start the open-file "
                    "soft limit is raised toward the hard limit to fit it; if it still does not "
                    "fit (RLIMIT_NOFILE minus upstream.pool_size minus 64) it is lowered.")
    max_request_line: Size = Field(
        default=16 * 1024, ge=1024,
        description="Longest request line (method, target, version); longer: 414 or 400 "
                    "and the connection is closed.")
    max_header_field: Size = Field(
        default=16 * 1024, ge=1024,
        description="Longest single header line; longer: 400 (aiohttp's parser) and the connection "
                    "is closed.")
    max_headers: int = Field(
        default=100, ge=8,
        description="Most header lines in one request; more: 400 (aiohttp's parser) and the "
                    "connection is closed.")
    max_header_bytes: Size = Field(
        default=64 * 1024, ge=4096,
        description="Total bytes of one request head (request line and all headers); more: "
                    "431 and the connection is closed.")
    header_timeout: Duration = Field(
        default=10.0, gt=0,
        description="Time from the first byte of a request head to its end; slower: the "
                    "connection is closed (no response: the request was never read).")
    body_timeout: Duration = Field(
        default=30.0, gt=0,
        description="Longest pause between two reads of a request body still being sent; "
                    "longer: the connection is closed and the request is not billed.")
    write_timeout: Duration = Field(
        default=30.0, gt=0,
        description="Longest a consumer connection may stay full with the consumer reading "
                    "nothing: the proxy has response bytes (or WebSocket frames) queued for it "
                    "over the transport's high-water mark, and none of them was read since "
                    "(checked every second; a consumer that reads slowly but steadily is not "
                    "cut off). Longer: the connection is aborted, the upstream "
                    "connection serving it is closed (freed for other requests), and the "
                    "request is billed as when the consumer disconnects (for what was "
                    "delivered, flagged `abandoned`).")
    idle_timeout: Duration = Field(
        default=60.0, gt=0,
        description="A connection with no request in progress (before the first request or "
                    "between keep-alive requests) is closed after this long.")
    per_customer_concurrency: int = Field(
        default=64, ge=0, le=1_000_000,
        description="Requests one customer may have in flight at once; more: 429 "
                    "concurrency_limit_exceeded (0 = unlimited).")


class FleetConfig(_Model):
    """Fleet mode (`storage.backend: postgres`): credit leases, usage shipping, leadership."""

    member_id: str = Field(
        default="",
        description="This member's name in the fleet (unique per running process; keep it "
                    "across restarts so its journal resumes shipping). Empty: the host name "
                    "and the listen port. A second live process under the same id is refused "
                    "at start; a journal another id wrote is shipped under that id first "
                    "(docs/fleet.md).",
        examples=["${POD_NAME}"])
    lease_ttl: Duration = Field(
        default=30.0, gt=0,
        description="Lifetime of a credit lease in the database; a member renews it every "
                    "third of it and a dead member's lease returns after it (plus "
                    "`reaper_grace`).",
        examples=["20s"])
    lease_idle: Duration = Field(
        default=10.0, gt=0,
        description="A lease this member admitted nothing against for this long, with no "
                    "request admitted here still holding credit on it (a stream in progress "
                    "keeps its lease), is returned at the next renewal (every third of "
                    "`lease_ttl`): its unspent credit goes back to the balance, spendable on "
                    "every member. The next request for the customer here asks for a new "
                    "lease (one statement).",
        examples=["30s"])
    cover_period: Duration = Field(
        default=20.0, gt=0,
        description="A lease is sized to last this long at the customer's recent spend rate "
                    "on this member (T in docs/fleet.md).",
        examples=["10s"])
    lease_floor: str = Field(
        default="1",
        description="Smallest lease a member asks for, in credits (an exact decimal, as a "
                    "string); a grant is still capped by the balance left.",
        examples=["10"])
    k: int = Field(
        default=2, ge=1, le=100,
        description="Each grant takes at most 1/(k x holders) of the available balance, so "
                    "leases together hold less than 1/k of it.",
        examples=[4])
    drift_margin: float = Field(
        default=0.05, ge=0, lt=0.5,
        description="A member stops spending a lease at its request time + lease_ttl x "
                    "(1 - drift_margin), on its own clock: the clock drift tolerated.",
        examples=[0.1])
    reaper_grace: Duration = Field(
        default=5.0, ge=0,
        description="An abandoned lease returns to the balance this long after it expired "
                    "(time for the dead member's last usage to be shipped).",
        examples=["10s"])
    empty_backoff: Duration = Field(
        default=1.0, ge=0,
        description="After PostgreSQL had no credit to lease for a customer, a member answers "
                    "402 for that customer without asking again for this long (a top-up is "
                    "seen within it).",
        examples=["2s"])
    ship_interval: Duration = Field(
        default=1.0, gt=0,
        description="How often a member ships its journal to the shared usage ledger.",
        examples=["500ms"])
    ship_batch: int = Field(
        default=1000, ge=1, le=100_000,
        description="Most journal rows in one shipping transaction.",
        examples=[5000])
    leader_ttl: Duration = Field(
        default=10.0, gt=0,
        description="Lifetime of the flusher's leadership lease; another member takes over "
                    "within leader_ttl x 4/3 of the leader's last renewal.",
        examples=["15s"])
    key_poll_interval: Duration = Field(
        default=0.5, gt=0,
        description="Besides change notifications, how often a member asks for key changes; "
                    "bounds how late a revocation takes effect on every member.",
        examples=["1s"])
    offline_allowance: str = Field(
        default="0",
        description="With `storage.fail_mode: open`, credits per customer a member may admit "
                    "beyond its spent lease while PostgreSQL is unreachable (an exact "
                    "decimal, as a string); recorded and settled as debt when the database "
                    "returns. With `closed` such requests get 503.",
        examples=["5"])

    @field_validator("lease_floor", "offline_allowance")
    @classmethod
    def _credits(cls, v: str) -> str:
        if to_micro(v) < 0:
            raise ValueError("must be zero or more credits")
        return v


class Config(_Model):
    """meterproxy.yaml, the whole file."""

    listen: str = Field(
        default="0.0.0.0:8080",
        description="HOST:PORT of the public port, where consumers connect.",
        examples=["0.0.0.0:${METERPROXY_PORT:-8080}"])
    admin_listen: str = Field(
        default="127.0.0.1:9090",
        description="HOST:PORT of the admin API, `/metrics`, `/healthz` and `/readyz`; never "
                    "the public port. Keep it off the internet.",
        examples=["0.0.0.0:9090"])
    upstream: UpstreamConfig = Field(
        default=UpstreamConfig(), description=UpstreamConfig.__doc__)
    rules: Annotated[tuple[str, ...], WithJsonSchema({
        "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]})] = Field(
        default=("rules/example.yaml",),
        description="Rules files, or directories whose `*.yaml` files are all loaded (in name "
                    "order); one path or a list. Relative paths are relative to the directory "
                    "of the config file. Polled every second and re-read on SIGHUP; a broken "
                    "file keeps the old rules serving.",
        examples=["rules/", ["rules/base.yaml", "rules/llm.yaml"]])
    storage: StorageConfig = Field(default=StorageConfig(), description=StorageConfig.__doc__)
    keys: KeysConfig = Field(default=KeysConfig(), description=KeysConfig.__doc__)
    stripe: StripeConfig = Field(default=StripeConfig(), description=StripeConfig.__doc__)
    admin: AdminConfig = Field(description=AdminConfig.__doc__)
    alerts: AlertsConfig = Field(default=AlertsConfig(), description=AlertsConfig.__doc__)
    credits: CreditsConfig = Field(default=CreditsConfig(), description=CreditsConfig.__doc__)
    limits: LimitsConfig = Field(default=LimitsConfig(), description=LimitsConfig.__doc__)
    fleet: FleetConfig = Field(default=FleetConfig(), description=FleetConfig.__doc__)
    workers: int = Field(
        default=1, ge=1, le=64,
        description="Processes of this sidecar serving one port (SO_REUSEPORT), each a fleet "
                    "member (member id suffixed `-w<index>`, journal `<storage.path stem>.w"
                    "<index><suffix>`), supervised: a crashed worker is restarted, SIGTERM "
                    "drains them all. More than 1 needs `storage.backend: postgres`: with "
                    "SQLite each process would keep its own credit book and its own Stripe "
                    "flusher.",
        examples=[2])
    max_inspect_bytes: Size = Field(
        default=1024 * 1024,
        description="Cap on a JSON body buffered for a `request.json` / `response.json` rule; "
                    "beyond it the usage's `on_unreadable` applies.",
        examples=["4MiB"])
    reserved_prefix: str = Field(
        default="/_meter",
        description="Public paths under this prefix are answered by meterproxy itself (the "
                    "consumer usage API and page), never forwarded.",
        examples=["/_meter"])
    method_override: Literal["refuse", "forward"] = Field(
        default="refuse",
        description="A request that names another method than its own in an "
                    "`X-HTTP-Method-Override`, `X-HTTP-Method` or `X-Method-Override` header, or "
                    "in a `_method` query parameter (Rails, Laravel/Symfony, Express "
                    "method-override, Google APIs, ASP.NET honour them): `refuse` answers it 400 "
                    "`method_override_refused` before any rule runs (never forwarded, never "
                    "billed), since the rules matched the request's own method and the upstream "
                    "would run the other one; a value equal to the request's method (any case) "
                    "is forwarded. `forward` passes them all through unchanged: only for an "
                    "upstream that ignores them. A `_method` field in a form body is not "
                    "inspected (docs/paths.md, \"Method overrides\").",
        examples=["forward"])
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Log verbosity of the process (stderr).",
        examples=["warning"])
    # filled by load(): the config file's directory (absolute), so relative paths in the
    # file resolve against it (proxy.paths states the rule)
    base_dir: SkipJsonSchema[str] = "."
    # set by the workers supervisor in each worker process (1..workers); 0: not a worker
    worker: SkipJsonSchema[int] = 0

    @model_validator(mode="after")
    def _workers_need_a_fleet(self) -> Config:
        if self.workers > 1 and self.storage.backend != "postgres":
            raise ValueError(
                "workers > 1 needs storage.backend: postgres. With SQLite every worker process "
                "would keep its own in-memory credit book (each could spend the whole balance) "
                "and run its own Stripe flusher; fleet mode shares both through PostgreSQL")
        return self

    @model_validator(mode="after")
    def _monetary_needs_one_process(self) -> Config:
        if self.credits.mode == "monetary" and self.storage.backend == "postgres":
            raise ValueError(
                "credits.mode: monetary needs storage.backend: sqlite for now. A monetary "
                "burn is priced on the customer's period total, which fleet members do not "
                "share yet (docs/credits.md)")
        return self

    @field_validator("rules", mode="before")
    @classmethod
    def _rules(cls, v: object) -> object:
        return (v,) if isinstance(v, str) else v

    @field_validator("listen", "admin_listen")
    @classmethod
    def _hostport(cls, v: str) -> str:
        split_hostport(v)
        return v

    def rule_paths(self) -> list[Path]:
        """The rules files, absolute (relative entries resolve against the config file's
        directory; a directory means every ``*.yaml`` in it)."""
        out: list[Path] = []
        for r in self.rules:
            p = paths.absolute(r, self.base_dir)
            out.extend(sorted(p.glob("*.yaml")) if p.is_dir() else [p])
        return out

    def db_path(self) -> Path:
        """``storage.path``, absolute (relative resolves against the config file's directory);
        a worker's own journal is ``<stem>.w<index><suffix>`` beside it."""
        p = paths.absolute(self.storage.path, self.base_dir)
        return p.with_name(f"{p.stem}.w{self.worker}{p.suffix}") if self.worker else p


def split_hostport(v: str) -> tuple[str, int]:
    host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {v!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def expand_env(value: str, env: Mapping[str, str]) -> str:
    """``${VAR}`` / ``${VAR:-default}``. A missing variable with no default is an error."""

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise KeyError(name)

    return _ENV.sub(sub, value)


def load(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Load and validate; raise ConfigError with every problem as ``file:line: message``."""
    env = os.environ if env is None else env
    path = paths.absolute(path)          # a command-line path: against the current directory
    try:
        text = path.read_text()
    except IsADirectoryError as exc:
        raise ConfigError([f"cannot read config {path}: it is a directory"]) from exc
    except OSError as exc:
        raise ConfigError([f"cannot read config {path}: {paths.reason(exc)}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"cannot read config {path}: not UTF-8 text ({exc.reason})"]) from exc
    try:
        doc = yamlpos.load_yaml(text)
    except yamlpos.YamlError as exc:
        raise ConfigError([f"{path}:{exc}"]) from exc
    problems: list[str] = []
    data = _expand_tree(doc.data, env, doc, str(path), (), problems)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}:1: the config file must be a mapping of settings"])
    data["base_dir"] = str(path.parent)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(err["loc"])
            line = doc.key_pos(loc).line
            where = ".".join(str(p) for p in loc) or "(top)"
            problems.append(f"{path}:{line}: {where}: {_message(err)}")
        cfg = None
    if problems or cfg is None:
        raise ConfigError(problems)
    return cfg


def _message(err: Any) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown setting"
    if err["type"] == "missing":
        return "required setting is missing"
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ")


def _expand_tree(node: object, env: Mapping[str, str], doc: yamlpos.YamlDoc, filename: str,
                 loc: tuple[str | int, ...], problems: list[str]) -> object:
    if isinstance(node, dict):
        return {k: _expand_tree(v, env, doc, filename, (*loc, k), problems)
                for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_tree(v, env, doc, filename, (*loc, i), problems)
                for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:
        try:
            return expand_env(node, env)
        except KeyError as exc:
            line = doc.value_pos(loc).line
            problems.append(f"{filename}:{line}: {'.'.join(map(str, loc))}: "
                            f"environment variable {exc.args[0]} is not set and has no default")
            return ""
    return node
