"""From the config file's ``storage`` and ``fleet`` sections to the fleet modules' settings
(integer units). Wave 2's composition root calls these; nothing else reads the config."""

from __future__ import annotations

import os
import socket

from proxy.config import Config, FleetConfig, StorageConfig
from proxy.fleet.sizing import LeasePolicy
from proxy.store.postgres.pool import PoolSettings
from proxy.units import to_micro


def lease_policy(f: FleetConfig) -> LeasePolicy:
    return LeasePolicy(cover_ms=round(f.cover_period * 1000), floor=to_micro(f.lease_floor),
                       k=f.k, ttl_ms=round(f.lease_ttl * 1000),
                       drift_margin_ppm=round(f.drift_margin * 1_000_000),
                       empty_backoff_ms=round(f.empty_backoff * 1000),
                       idle_ms=max(1, round(f.lease_idle * 1000)))


def pool_settings(s: StorageConfig) -> PoolSettings:
    return PoolSettings(dsn=s.dsn, size=s.pool_size, statement_cache_size=s.statement_cache_size)


def member_id(cfg: Config) -> str:
    """``fleet.member_id``, else ``<host>:<listen port>`` (unique per process on a host only
    when each process listens on its own port; ``workers: N`` appends the worker index)."""
    suffix = f"-w{cfg.worker}" if cfg.worker else ""
    if cfg.fleet.member_id:
        return cfg.fleet.member_id + suffix
    port = cfg.listen.rpartition(":")[2]
    return f"{os.environ.get('HOSTNAME') or socket.gethostname()}:{port}{suffix}"
