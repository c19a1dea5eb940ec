"""The ``storage`` backend settings and the ``fleet`` section of meterproxy.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy import config
from proxy.errors import ConfigError


def _write(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "meterproxy.yaml"
    p.write_text("admin: {token: test-admin-token}\n" + body)
    return p


def test_defaults_keep_the_sqlite_single_process() -> None:
    cfg = config.Config.model_validate({"admin": {"token": "x" * 8}})
    assert (cfg.storage.backend, cfg.storage.dsn) == ("sqlite", "")
    assert (cfg.fleet.lease_ttl, cfg.fleet.k, cfg.fleet.lease_floor) == (30.0, 2, "1")


def test_dsn_expands_environment_variables(tmp_path: Path) -> None:
    p = _write(tmp_path, "storage: {dsn: '${PG_DSN}', statement_cache_size: 0, pool_size: 4}\n"
                         "fleet: {member_id: '${POD:-pod-a}', lease_ttl: 20s, leader_ttl: 5s}\n")
    cfg = config.load(p, env={"PG_DSN": "postgresql://u:secret@db:5432/mp"})
    assert cfg.storage.dsn == "postgresql://u:secret@db:5432/mp"
    assert (cfg.storage.pool_size, cfg.storage.statement_cache_size) == (4, 0)
    assert (cfg.fleet.member_id, cfg.fleet.lease_ttl, cfg.fleet.leader_ttl) == ("pod-a", 20.0, 5.0)


def test_postgres_needs_a_dsn(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        config.load(_write(tmp_path, "storage: {backend: postgres}\n"), env={})
    assert "storage.backend postgres needs storage.dsn" in str(exc.value)
    cfg = config.load(_write(tmp_path, "storage: {backend: postgres, dsn: 'postgresql://db/mp'}\n"
                             "workers: 2\n"), env={})
    assert (cfg.storage.backend, cfg.workers, cfg.worker) == ("postgres", 2, 0)


def test_fleet_credit_amounts_are_exact_decimals(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        config.load(_write(tmp_path, "fleet: {lease_floor: lots, k: 0}\n"), env={})
    text = str(exc.value)
    assert "fleet.lease_floor" in text and "fleet.k" in text
    cfg = config.load(_write(tmp_path, "fleet: {lease_floor: '2.5', offline_allowance: '3'}\n"), env={})
    assert (cfg.fleet.lease_floor, cfg.fleet.offline_allowance) == ("2.5", "3")


def test_settings_in_integer_units(tmp_path: Path) -> None:
    from proxy.fleet import settings

    cfg = config.load(_write(tmp_path, "listen: 127.0.0.1:8181\nstorage: {dsn: 'postgresql://db/mp'}\n"
                                       "fleet: {lease_floor: '2.5', lease_ttl: 20s, cover_period: 500ms,"
                                       " drift_margin: 0.1, empty_backoff: 2s}\n"), env={})
    p = settings.lease_policy(cfg.fleet)
    assert (p.floor, p.ttl_ms, p.cover_ms, p.drift_margin_ppm, p.k) == (2_500_000, 20_000, 500, 100_000, 2)
    assert p.empty_backoff_ms == 2000
    assert settings.pool_settings(cfg.storage).dsn == "postgresql://db/mp"
    assert settings.member_id(cfg).endswith(":8181")


def test_the_dsn_never_appears_in_a_repr() -> None:
    from proxy.store.postgres.pool import PoolSettings

    assert "secret" not in repr(PoolSettings(dsn="postgresql://u:secret@db/mp"))


def test_monetary_credits_are_refused_in_fleet_mode(tmp_path: Path) -> None:
    """A monetary burn is priced on the customer's period total, which members do not
    share: the config says so at load."""
    with pytest.raises(ConfigError) as exc:
        config.load(_write(tmp_path, "storage: {backend: postgres, dsn: 'postgresql://db/mp'}\n"
                                     "credits: {mode: monetary}\n"), env={})
    assert "credits.mode: monetary needs storage.backend: sqlite" in str(exc.value)
    cfg = config.load(_write(tmp_path, "credits: {mode: monetary, balance_check_interval: 15m,"
                                       " mirror_max_attempts: 20}\n"), env={})
    assert (cfg.credits.mode, cfg.credits.balance_check_interval,
            cfg.credits.mirror_max_attempts) == ("monetary", 900.0, 20)
    assert config.Config.model_validate({"admin": {"token": "x" * 8}}).credits.mode == "units"
