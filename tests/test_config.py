"""The config file: env expansion, every problem reported with file:line, defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy import config
from proxy.units import UnitError, fmt_micro, parse_duration, to_micro


def test_every_problem_reported_with_line(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(
        "listen: nope\n"                      # 1
        "upstream:\n"                          # 2
        "  url: ftp://x\n"                     # 3
        "  colour: blue\n"                     # 4
        "storage:\n"                           # 5
        "  durability: sometimes\n"            # 6
        "  commit_interval: soon\n"            # 7
        "admin:\n"                             # 8
        "  token: ${NOPE}\n")                  # 9
    with pytest.raises(config.ConfigError) as err:
        config.load(f, env={})
    text = "\n".join(err.value.problems)
    assert f"{f}:9: admin.token: environment variable NOPE is not set" in text
    with pytest.raises(config.ConfigError) as err:
        config.load(f, env={"NOPE": "a-long-admin-token"})
    probs = err.value.problems
    assert any(p.startswith(f"{f}:1: listen:") for p in probs)
    assert any(p.startswith(f"{f}:3: upstream.url:") for p in probs)
    assert f"{f}:4: upstream.colour: unknown setting" in probs
    assert any(p.startswith(f"{f}:6: storage.durability:") for p in probs)
    assert any(p.startswith(f"{f}:7: storage.commit_interval:") for p in probs)
    assert len(probs) == 5


def test_env_defaults_and_relative_paths(tmp_path: Path) -> None:
    f = tmp_path / "ok.yaml"
    f.write_text("admin: {token: '${TOKEN:-fallback-token}'}\nrules: r.yaml\n"
                 "storage: {path: data/m.db, commit_interval: 25ms}\n")
    cfg = config.load(f, env={})
    assert cfg.admin.token == "fallback-token"
    assert cfg.rule_paths() == [tmp_path / "r.yaml"]
    assert cfg.db_path() == tmp_path / "data" / "m.db"
    assert cfg.storage.commit_interval == pytest.approx(0.025)
    assert cfg.storage.durability == "strict"


def test_method_override_defaults_to_refuse_and_takes_forward_only(tmp_path: Path) -> None:
    f = tmp_path / "mo.yaml"
    f.write_text("admin: {token: a-long-admin-token}\n")
    assert config.load(f, env={}).method_override == "refuse"
    f.write_text("admin: {token: a-long-admin-token}\nmethod_override: forward\n")
    assert config.load(f, env={}).method_override == "forward"
    f.write_text("admin: {token: a-long-admin-token}\nmethod_override: ignore\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(f, env={})
    assert any(p.startswith(f"{f}:2: method_override:") for p in err.value.problems)


def test_yaml_syntax_error_has_position(tmp_path: Path) -> None:
    f = tmp_path / "syntax.yaml"
    f.write_text("admin:\n  token: [unclosed\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(f, env={})
    assert err.value.problems[0].startswith(f"{f}:")


def test_units() -> None:
    assert parse_duration("10ms") == pytest.approx(0.01)
    assert parse_duration("2m") == 120
    assert to_micro("0.4") == 400_000
    assert fmt_micro(950_500_000) == "950.5"
    assert fmt_micro(-1) == "-0.000001"
    with pytest.raises(UnitError):
        to_micro("NaN")
