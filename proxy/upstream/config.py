"""Pool settings (every resource bounded, with the default named here) and upstream origins."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """Limits and deadlines of an ``UpstreamPool``. Deadlines are checked by one sweep every
    ``sweep_interval`` seconds, so each fires between its value and its value plus one
    interval late (no timer per request)."""

    max_connections: int = 256          # open connections in total (idle, busy, connecting, upgraded)
    max_per_host: int = 256             # the same, per origin
    pool_wait: float = 5.0              # longest wait for a connection when the limits are reached
    connect_timeout: float = 5.0        # TCP connect plus TLS handshake
    read_timeout: float = 60.0          # longest silence while the upstream owes bytes (head or body)
    #                                     or does not read the request body we are writing
    idle_timeout: float = 15.0          # an idle keep-alive connection is closed after this
    max_requests: int = 1000            # requests per connection, then it is closed
    expect_timeout: float = 1.0         # wait for `100 Continue` before sending the body anyway
    sweep_interval: float = 0.5         # period of the one task that checks every deadline
    max_head_bytes: int = 65536         # response head (status line + headers), each
    max_field_bytes: int = 8190         # one header name + value (aiohttp's client limit)
    max_headers: int = 256              # header lines in a response head, and trailer lines
    max_informational: int = 16         # 1xx responses before the final one
    high_water: int = 65536             # response bytes buffered for the caller before reading pauses
    low_water: int = 16384              # ... and resumes when the caller has taken it below this
    write_high_water: int = 65536       # request bytes queued in the transport before we wait (drain)

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_per_host", "max_requests", "max_head_bytes",
                     "max_field_bytes", "max_headers", "high_water", "write_high_water"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("pool_wait", "connect_timeout", "read_timeout", "idle_timeout",
                     "expect_timeout", "sweep_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if not 0 <= self.low_water < self.high_water:
            raise ValueError("low_water must be below high_water")

    @classmethod
    def from_upstream(cls, cfg: Any, **overrides: Any) -> PoolConfig:
        """From ``proxy.config.UpstreamConfig`` (connect_timeout, read_timeout, pool_size,
        pool_wait); every other field keeps its default unless overridden."""
        values: dict[str, Any] = {
            "connect_timeout": cfg.connect_timeout, "read_timeout": cfg.read_timeout,
            "max_connections": cfg.pool_size, "max_per_host": cfg.pool_size,
            "pool_wait": cfg.pool_wait}
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True, slots=True)
class Origin:
    """Where requests go: scheme, host, port; ``prefix`` (the base URL's path, no trailing
    slash) is prepended to every target; ``host_header`` is sent when the caller sends none."""

    scheme: str
    host: str
    port: int
    prefix: str
    host_header: str

    @classmethod
    def parse(cls, url: str) -> Origin:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http:// or https:// URL: {url!r}")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError(f"an upstream URL has no query, fragment or credentials: {url!r}")
        default = 443 if parts.scheme == "https" else 80
        port = parts.port or default
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        return cls(parts.scheme, host, port, parts.path.rstrip("/"),
                   shown if port == default else f"{shown}:{port}")
