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
    field_validator,
    model_validator,
)

from proxy import yamlpos
from proxy.errors import ConfigError
from proxy.units import parse_duration

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


Duration = Annotated[float, BeforeValidator(_duration)]
Size = Annotated[int, BeforeValidator(_size)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UpstreamConfig(_Model):
    url: str = "http://127.0.0.1:9000"
    connect_timeout: Duration = 5.0
    read_timeout: Duration = 60.0
    pool_size: int = Field(default=256, ge=1)
    pool_wait: Duration = Field(
        default=5.0, gt=0,
        description="Longest a request waits for one of the pool_size upstream connections "
                    "when all are busy; then it is answered 503 upstream_busy (not forwarded, "
                    "not billed).")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/]+", v):
            raise ValueError("upstream.url must be an http:// or https:// URL")
        return v.rstrip("/")


class StorageConfig(_Model):
    path: str = "./meterproxy.db"
    durability: Literal["strict", "batched"] = "strict"
    commit_interval: Duration = 0.010
    fail_mode: Literal["closed", "open"] = "closed"
    synchronous: Literal["normal", "full"] = "normal"
    audit_retention: Duration = 90 * 86400.0
    max_pending_rows: int = Field(default=200_000, ge=100)
    lock_wait: Duration = Field(
        default=2.0, ge=0,
        description="While another process holds the database write lock, how long a group "
                    "commit keeps retrying (on a timer: the event loop never blocks, /healthz "
                    "and unmetered routes stay fast) before fail_mode decides for the waiting "
                    "metered requests.")
    checkpoint_interval: Duration = Field(
        default=1.0, gt=0,
        description="How often the WAL is checkpointed (a PASSIVE pass in a worker thread) "
                    "and the database file's identity (deleted or replaced) is checked.")
    wal_truncate_size: Size = Field(
        default=16 * 1024 * 1024, ge=0,
        description="When the WAL is larger than this after the passive pass, a TRUNCATE "
                    "checkpoint resets it to zero bytes; also SQLite's journal_size_limit. "
                    "The WAL stays under about this size plus one checkpoint_interval of writes.")
    integrity_check_interval: Duration = Field(
        default=300.0, ge=0,
        description="How often PRAGMA quick_check verifies the database file in a worker "
                    "thread (0 = never); a corrupt file fails /readyz and stops writes.")


class KeySource(_Model):
    header: str | None = None
    scheme: str | None = None
    query: str | None = None


class KeysConfig(_Model):
    sources: tuple[KeySource, ...] = (KeySource(header="Authorization", scheme="Bearer"),
                                      KeySource(header="X-API-Key"))
    forward_to_upstream: bool = False
    cache_refresh: Duration = 1.0

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
    api_key: str = ""
    sink: Literal["meter_events", "meter_event_stream", "usage_records", "dry_run"] = "meter_events"
    api_base: str = "https://api.stripe.com"
    meter_events_base: str = "https://meter-events.stripe.com"
    flush_interval: Duration = 60.0
    webhook_secret: str = ""
    timeout: Duration = 10.0
    max_rate: float = Field(default=0.0, ge=0)   # calls/s; 0 = default by key mode
    usage_records_version: str = "2024-06-20"
    subscription_items: dict[str, dict[str, str]] = Field(default_factory=dict)
    flush_lag_ready_threshold: Duration = 3600.0
    reconcile_interval: Duration = 0.0
    reconcile_grace: Duration = 7200.0
    reconcile_alert_threshold: float = Field(default=0.01, ge=0, le=1)
    price_refresh: Duration = 3600.0


    @model_validator(mode="after")
    def _usage_records_need_items(self) -> StripeConfig:
        if self.sink == "usage_records" and self.api_key and not self.subscription_items:
            raise ValueError("sink usage_records needs stripe.subscription_items "
                             "(meter -> {stripe_customer_id: subscription item id})")
        return self


class AdminConfig(_Model):
    token: str

    @field_validator("token")
    @classmethod
    def _token(cls, v: str) -> str:
        if len(v) < 8:
            raise ValueError("admin.token must be set (at least 8 characters)")
        return v


class CreditPack(_Model):
    """A Stripe price that buys a fixed number of credits."""
    credits: str
    expires_in: Duration | None = None
    priority: int = Field(default=50, ge=0, le=100)


class CreditPlan(_Model):
    """A subscription price whose every paid period grants an allowance."""
    allowance: str
    mode: Literal["reset", "rollover"] = "reset"
    cap: str | None = None
    priority: int = Field(default=60, ge=0, le=100)


class CreditsConfig(_Model):
    enforcement: Literal["enforce", "shadow"] = "enforce"
    default_estimate: str = "1"          # units reserved for a variable-cost usage with no estimate
    top_up_url: str = ""
    packs: dict[str, CreditPack] = Field(default_factory=dict)     # Stripe price id -> pack
    plans: dict[str, CreditPlan] = Field(default_factory=dict)     # Stripe price id -> plan
    on_payment_failed: Literal["none", "suspend"] = "none"


class AlertsConfig(_Model):
    thresholds: tuple[float, ...] = (0.5, 0.75, 0.9)
    webhook_url: str = ""
    secret: str = ""

    @model_validator(mode="after")
    def _signed(self) -> AlertsConfig:
        if self.webhook_url and len(self.secret) < 16:
            raise ValueError("alerts.webhook_url needs alerts.secret (at least 16 characters) "
                             "to sign every alert")
        if any(not 0 < t <= 1 for t in self.thresholds):
            raise ValueError("alerts.thresholds are fractions in (0, 1]")
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
        description="Longest single header line; longer: 431 and the connection is closed.")
    max_headers: int = Field(
        default=100, ge=8,
        description="Most header lines in one request; more: 431 and the connection closed.")
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
    idle_timeout: Duration = Field(
        default=60.0, gt=0,
        description="A connection with no request in progress (before the first request or "
                    "between keep-alive requests) is closed after this long.")
    per_customer_concurrency: int = Field(
        default=64, ge=0,
        description="Requests one customer may have in flight at once; more: 429 "
                    "concurrency_limit_exceeded (0 = unlimited).")


class Config(_Model):
    listen: str = "0.0.0.0:8080"
    admin_listen: str = "127.0.0.1:9090"
    upstream: UpstreamConfig = UpstreamConfig()
    rules: tuple[str, ...] = ("rules/example.yaml",)
    storage: StorageConfig = StorageConfig()
    keys: KeysConfig = KeysConfig()
    stripe: StripeConfig = StripeConfig()
    admin: AdminConfig
    alerts: AlertsConfig = AlertsConfig()
    credits: CreditsConfig = CreditsConfig()
    limits: LimitsConfig = LimitsConfig()
    max_inspect_bytes: Size = 1024 * 1024
    reserved_prefix: str = "/_meter"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # filled by load(): where the file lives, so relative paths resolve against it
    base_dir: str = "."

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
        out: list[Path] = []
        for r in self.rules:
            p = Path(r) if Path(r).is_absolute() else Path(self.base_dir) / r
            out.extend(sorted(p.glob("*.yaml")) if p.is_dir() else [p])
        return out

    def db_path(self) -> Path:
        p = Path(self.storage.path)
        return p if p.is_absolute() else Path(self.base_dir) / p


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
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from exc
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
