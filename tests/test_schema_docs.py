"""The configuration reference, the JSON Schemas and the example config: generated from the
model and the loader, committed, and never allowed to drift from them."""

from __future__ import annotations

import functools
import io
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from pydantic import BaseModel
from ruamel.yaml import YAML

from proxy import config as config_mod
from proxy import configdoc, schema
from proxy.config import Config
from proxy.errors import ConfigError
from proxy.rules import check_rules, load_rules
from tests.conftest import TEST_RULES, write_config

ROOT = Path(__file__).resolve().parent.parent
REGEN = "run: .venv/bin/meterproxy schema write   (then commit the result)"


def _safe(text: str) -> Any:
    return YAML(typ="safe", pure=True).load(text)


@functools.cache
def _validator(name: str) -> Draft202012Validator:
    doc = json.loads((ROOT / "docs" / "schema" / f"{name}.schema.json").read_text())
    Draft202012Validator.check_schema(doc)
    return Draft202012Validator(doc)


def _errors(v: Draft202012Validator, data: Any) -> list[str]:
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(data))


# ------------------------------------------------------------------ drift


@pytest.mark.parametrize("rel", list(schema.GENERATED))
def test_generated_file_matches_the_model(rel: str) -> None:
    committed = (ROOT / rel).read_text() if (ROOT / rel).exists() else "(missing)"
    assert committed == schema.render(rel), f"{rel} differs from the model; {REGEN}"


def _model_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every setting of the config model, walked from the pydantic fields themselves."""
    out: list[str] = []
    for name, field in model.model_fields.items():
        if name in ("base_dir", "worker"):  # filled by load() / the supervisor: not settings
            continue
        path = f"{prefix}.{name}" if prefix else name
        out.append(path)
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _model_paths(ann, path)
        else:
            inner = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            if inner:
                sep = "[]" if getattr(ann, "__origin__", None) is tuple else ".<name>"
                out += _model_paths(inner[0], path + sep)
    return out


def test_reference_covers_every_setting_with_type_default_meaning_and_example() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    paths = _model_paths(Config)
    strict = configdoc.settings(strict=True)      # raises naming an undocumented setting
    assert [s.dotted for s in strict] == paths
    assert configdoc.UNDOCUMENTED not in doc
    for path in paths:
        m = re.search(rf"^### `{re.escape(path)}`\n\n(.+?)\n\n- Type: (.+?)\n- Default: (.+?)\n\n"
                      r"```yaml\n(.+?)```", doc, re.S | re.M)
        assert m is not None, f"docs/configuration.md has no complete entry for {path}"
        meaning, _type, _default, example = m.groups()
        assert len(meaning) >= 20, path
        # the example is YAML that reaches the setting
        node: Any = _safe(example)
        for part in re.split(r"\.|(?=\[\])", path):
            if part == "[]":
                node = node[0]
            elif part == "<name>":
                node = next(iter(node.values()))
            else:
                node = node[part]


def test_reference_states_the_expansion_and_unit_rules() -> None:
    doc = " ".join((ROOT / "docs" / "configuration.md").read_text().split())
    for needle in ("`${VAR}` or `${VAR:-default}`", "`ms`, `s`, `m`, `h`, `d`",
                   "`KiB`, `MiB`, `GiB`", "relative to the directory that holds the config file"):
        assert needle in doc, needle


def test_a_setting_without_a_description_or_example_fails_the_generator() -> None:
    undocumented = {"properties": {"ok": {"type": "integer", "default": 1}}}
    with pytest.raises(configdoc.UndocumentedSetting, match="ok has no description"):
        configdoc.settings(undocumented, strict=True)
    # regeneration still works, and marks the gap where a reader (and the test below) sees it
    assert configdoc.settings(undocumented)[0].description == configdoc.UNDOCUMENTED
    no_example = {"properties": {"tok": {"type": "string", "description": "a token"}},
                  "required": ["tok"]}
    with pytest.raises(configdoc.UndocumentedSetting, match="tok has neither a default"):
        configdoc.settings(no_example, strict=True)


def test_durations_and_sizes_print_as_written() -> None:
    assert [configdoc.human_duration(s) for s in (0.01, 60, 3600, 7776000, 0, 1.5)] == \
        ["10ms", "60s", "1h", "90d", "0s", "1500ms"]
    assert [configdoc.human_size(n) for n in (1048576, 4096, 1000, 0)] == \
        ["1MiB", "4KiB", "1000", "0"]


# ------------------------------------------------------------------ the example config


def test_example_config_loads_and_shows_every_default() -> None:
    path = ROOT / schema.EXAMPLE_CONFIG
    cfg = config_mod.load(path, env={"METERPROXY_ADMIN_TOKEN": "example-token"})
    assert load_rules(cfg.rule_paths()).rules          # the rules beside it load too
    assert cfg.rule_paths() == [ROOT / "rules" / "example.yaml"]
    got = cfg.model_dump()
    want = Config(admin={"token": "example-token"}).model_dump()   # type: ignore[arg-type]
    # the deliberate departures, each one stated in the file
    assert (got.pop("rules"), want.pop("rules")) == (("example.yaml",), ("rules/example.yaml",))
    assert (got["stripe"].pop("sink"), want["stripe"].pop("sink")) == ("dry_run", "meter_events")
    got.pop("base_dir"), want.pop("base_dir")
    got.pop("worker"), want.pop("worker")
    assert got == want
    text = path.read_text()
    assert text.count("# Here:") == len(configdoc.EXAMPLE_OVERRIDES)


def test_example_config_names_every_setting() -> None:
    data = _safe((ROOT / schema.EXAMPLE_CONFIG).read_text())
    shown: list[str] = []

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            path = f"{prefix}.{k}" if prefix else k
            shown.append(path)
            if isinstance(v, dict) and v:
                walk(v, path)
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                for sub in sorted({kk for item in v for kk in item}):
                    shown.append(f"{path}[].{sub}")

    walk(data, "")
    text = (ROOT / schema.EXAMPLE_CONFIG).read_text()
    for p in _model_paths(Config):
        if "<name>" in p or "[]" in p:    # members of maps and lists: listed in comments
            assert f"# - {p.rsplit('.', 1)[-1]} (" in text, p
        else:
            assert p in shown, f"{p} is not in {schema.EXAMPLE_CONFIG}; {REGEN}"


# ------------------------------------------------------------------ the config schema


def test_config_files_in_the_repository_validate(tmp_path: Path) -> None:
    v = _validator("config")
    files = [ROOT / schema.EXAMPLE_CONFIG, ROOT / "deploy" / "meterproxy.yaml",
             write_config(tmp_path, "http://127.0.0.1:1", storage={"durability": "batched"})]
    texts = {str(f): f.read_text() for f in files}
    cm = _safe((ROOT / "deploy" / "kubernetes" / "configmap-config.yaml").read_text())
    texts["configmap-config.yaml"] = cm["data"]["meterproxy.yaml"]
    for name, text in texts.items():
        assert _errors(v, _safe(text)) == [], name


@pytest.mark.parametrize(("text", "problem"), [
    ("admin: {token: 12345678}\nlisten: 1\nupstrem: {}\n", "unknown setting"),
    ("admin: {token: 12345678}\nstorage: {durability: fast}\n", "durability"),
    ("admin: {token: 12345678}\nstorage: {commit_interval: 5 minutes}\n", "commit_interval"),
    ("admin: {token: 12345678}\nupstream: {pool_size: 0}\n", "pool_size"),
    ("admin: {token: 12345678}\nmax_inspect_bytes: 1 MiBs\n", "max_inspect_bytes"),
    ("listen: 0.0.0.0:8080\n", "admin: required"),
    ("admin: {token: 12345678}\nkeys: {forward_to_upstream: maybe}\n", "forward_to_upstream"),
    ("admin: {token: 12345678}\ncredits: {packs: {price_1: {priority: 5}}}\n", "credits"),
])
def test_config_schema_rejects_what_the_loader_rejects(tmp_path: Path, text: str,
                                                       problem: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError):
        config_mod.load(f, env={})
    assert _errors(_validator("config"), _safe(text)) != [], problem


def test_config_schema_accepts_environment_references_anywhere_a_value_goes(
        tmp_path: Path) -> None:
    text = ("admin: {token: '${TOKEN}'}\nupstream: {pool_size: '${POOL:-16}', read_timeout: "
            "'${RT:-30s}'}\nstorage: {durability: '${DUR:-batched}'}\nkeys: "
            "{forward_to_upstream: '${FWD:-true}'}\nmax_inspect_bytes: '${CAP:-2MiB}'\n")
    f = tmp_path / "c.yaml"
    f.write_text(text)
    cfg = config_mod.load(f, env={"TOKEN": "env-token-123"})
    assert (cfg.upstream.pool_size, cfg.upstream.read_timeout, cfg.storage.durability,
            cfg.keys.forward_to_upstream, cfg.max_inspect_bytes) == (16, 30.0, "batched", True,
                                                                     2 * 1024 * 1024)
    assert _errors(_validator("config"), _safe(text)) == []


# ------------------------------------------------------------------ the rules schema


def _rules_files() -> list[Path]:
    files = sorted((ROOT / "rules").glob("*.yaml")) + sorted(
        p for p in (ROOT / "tests").rglob("*.yaml") if "rules_broken" not in p.parts)
    assert ROOT / "rules" / "example.yaml" in files
    return files


def test_the_rules_schema_describes_every_key_the_loader_accepts() -> None:
    from proxy.rules import loader

    text = json.dumps(schema.rules_schema())
    assert "UNDOCUMENTED" not in text, "a rules key is not described in proxy/schema.py"
    doc = schema.rules_schema()
    defs = doc["$defs"]
    assert list(doc["properties"]) == list(loader.TOP_KEYS)
    assert list(defs["meter"]["properties"]) == list(loader.METER_KEYS)
    assert list(defs["rule"]["properties"]) == list(loader.RULE_KEYS)
    assert list(defs["usage"]["properties"]) == list(loader.USAGE_KEYS)
    assert list(defs["match"]["anyOf"][1]["properties"]) == list(loader.MATCH_KEYS)


def test_every_rules_file_in_the_repository_validates(tmp_path: Path) -> None:
    v = _validator("rules")
    inline = tmp_path / "test_rules.yaml"
    inline.write_text(TEST_RULES)
    for f in [*_rules_files(), inline]:
        assert check_rules([f]) == [], f
        assert _errors(v, _safe(f.read_text())) == [], f


# Broken files whose problems are structure (keys, types, values), which the schema must see;
# the others are about more than one value (unknown meter, duplicate or unreachable rules,
# path templates) or are not YAML at all, which is `meterproxy rules check`'s job.
STRUCTURAL = ["auth_none_usage", "bad_count_when", "bad_credits", "bad_presets", "bad_sources",
              "bad_transform", "empty", "unknown_keys", "version_missing", "version_wrong",
              "wrong_types"]


@pytest.mark.parametrize("name", STRUCTURAL)
def test_structurally_broken_rules_are_rejected_by_the_schema(name: str) -> None:
    f = ROOT / "tests" / "rules_broken" / f"{name}.yaml"
    assert check_rules([f]) != []
    assert _errors(_validator("rules"), _safe(f.read_text())) != []


def test_every_structural_problem_is_caught_item_by_item() -> None:
    """Each usage item of bad_sources / bad_transform / bad_credits on its own: the loader's
    verdict and the schema's agree, item by item (not only somewhere in the file). A
    ``path.<param>`` source needs the rule's template, which is not structure."""
    v = _validator("rules")
    for name in ("bad_sources", "bad_transform", "bad_credits", "bad_presets"):
        doc = _safe((ROOT / "tests" / "rules_broken" / f"{name}.yaml").read_text())
        for i, rule in enumerate(doc["rules"]):
            for j, item in enumerate(rule.get("usage") or []):
                if str(item.get("quantity", "")).startswith("path."):
                    continue
                one = {**doc, "rules": [{**rule, "usage": [item]}]}
                assert (_loader_ok(one) == (_errors(v, one) == [])), (name, i, j, item)


def _loader_ok(data: Any) -> bool:
    buf = io.StringIO()
    YAML().dump(data, buf)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rules.yaml"
        path.write_text(buf.getvalue())
        return check_rules([path]) == []


# A generator of rules documents in which only structure can be wrong: meter names are
# "m" or not strings at all, rule names are unique or not strings, paths are distinct and
# never catch-alls (the first rule's match is never empty). On these, the loader and the
# schema must give the same verdict.
_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-3, 700),
                  st.sampled_from([0.5, -1.5, "", " ", "x", "2xx", "4XX", "any", "6xx", "99",
                                   "200", "up", "down", "inf", "1.5", "-1", "usd", "dollars",
                                   "request.bytes", "request.bytes.x", "response.json.a.b",
                                   "response.json.a..b", "request.header.X-N",
                                   "request.header.", "request.query.q", "duration_ms",
                                   "openai_chat", "openai", "GET", "G3T",
                                   "per_unit", "tiered", "volume", "required", "none"]),
                  st.just([]), st.just({}))


def _maybe(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the valid value, sometimes junk: documents with a single fault are common."""
    return st.integers(0, 15).flatmap(lambda n: _JUNK if n == 0 else valid)


def _usage_item() -> st.SearchStrategy[Any]:
    quantity = _maybe(st.sampled_from([1, 0, "response.json.usage.total_tokens",
                                       "request.bytes", "request.query.n"]))
    preset = _maybe(st.sampled_from(["openai_chat", "anthropic_messages"]))
    rest = {
        "credits": _maybe(st.sampled_from([1, 0, 0.25])),
        "estimate": _maybe(st.just(100)),
        "on_unreadable": _maybe(st.just(0)),
        "transform": _maybe(st.fixed_dictionaries({}, optional={
            "divide_by": _maybe(st.sampled_from([1, 1000])),
            "round": _maybe(st.sampled_from(["up", "down"])),
            "roundup": st.just("up")})),
        "meters": st.just(1),
    }
    meter = _maybe(st.just("m"))
    return st.one_of(
        st.fixed_dictionaries({"meter": meter, "quantity": quantity}, optional=rest),
        st.fixed_dictionaries({"meter": meter, "preset": preset}, optional=rest),
        st.fixed_dictionaries({}, optional={"meter": meter, "quantity": quantity,
                                            "preset": preset, **rest}),
        _JUNK)


def _rule(i: int) -> st.SearchStrategy[Any]:
    match_junk = _JUNK.filter(lambda v: v is not None and v != {})
    return st.fixed_dictionaries(
        {"name": _maybe(st.just(f"r{i}")),
         "match": st.one_of(match_junk, st.fixed_dictionaries({"path": st.just(f"/a{i}/{{id}}")}, optional={
                "methods": _maybe(st.sampled_from(["GET", ["GET", "post"]])),
                "params": _maybe(st.just({"id": "p-*"})),
                "headers": _maybe(st.just({"X-Tier": True, "X-N": 3})),
                "query": _maybe(st.just({"beta": "1"})),
                "method": st.just("GET")}))},
        optional={
            "auth": _maybe(st.sampled_from(["required", "none"])),
            "usage": _maybe(st.lists(_usage_item(), max_size=2)),
            "count_when": _maybe(st.lists(st.sampled_from(["2xx", 404, "any", "5XX", "201"]),
                                          min_size=1, max_size=2)),
            "description": _maybe(st.just("text")),
        })


_PRICE = st.fixed_dictionaries({}, optional={
    "currency": _maybe(st.just("usd")),
    "billing_scheme": _maybe(st.sampled_from(["per_unit", "tiered"])),
    "unit_amount": _maybe(st.just(5)),
    "unit_amount_decimal": _maybe(st.sampled_from(["0.05", "1.1234567890123"])),
    "tiers_mode": _maybe(st.sampled_from(["graduated", "volume"])),
    "tiers": _maybe(st.lists(st.fixed_dictionaries({}, optional={
        "up_to": _maybe(st.sampled_from([1000, "inf"])),
        "unit_amount_decimal": _maybe(st.just("0.2")),
        "flat_amount": _maybe(st.just(500)),
        "unit_amount": _maybe(st.just(1))}), min_size=1, max_size=1)),
    "transform_quantity": _maybe(st.just({"divide_by": 1000, "round": "up"})),
})

_DOC = st.fixed_dictionaries({}, optional={
    "version": _maybe(st.just(1)),
    "meters": _maybe(st.fixed_dictionaries({"m": _maybe(st.fixed_dictionaries(
        {"stripe_event_name": _maybe(st.just("m"))},
        optional={"covered_event_name": _maybe(st.just("m_covered")),
                  "description": _maybe(st.just("one call")),
                  "price_id": _maybe(st.just("price_1")),
                  "price": _PRICE,
                  "event_name": st.just("m")}))})),
    "count_when": _maybe(st.just(["2xx"])),
    "rules": _maybe(st.tuples(_rule(0), _rule(1)).map(list)),
})


@settings(max_examples=600, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(doc=_DOC)
def test_schema_and_loader_agree_on_structure(doc: dict[str, Any]) -> None:
    ok = _loader_ok(doc)
    assert ok == (_errors(_validator("rules"), doc) == []), doc
    VERDICTS.append(ok)


VERDICTS: list[bool] = []


def test_the_generator_makes_both_valid_and_invalid_documents() -> None:
    """Guards the test above: it must see plenty of both verdicts to mean anything."""
    if not VERDICTS:
        test_schema_and_loader_agree_on_structure()
    assert VERDICTS.count(True) >= 30 and VERDICTS.count(False) >= 300, (
        VERDICTS.count(True), VERDICTS.count(False))


# ------------------------------------------------------------------ command and editors


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, check=False)


def test_schema_command_prints_the_committed_documents() -> None:
    for what in ("config", "rules"):
        out = _cli("schema", what)
        assert out.returncode == 0, out.stderr
        assert out.stdout == (ROOT / "docs" / "schema" / f"{what}.schema.json").read_text()
    md = _cli("schema", "config", "--markdown")
    assert md.stdout == (ROOT / "docs" / "configuration.md").read_text()
    bad = _cli("schema", "rules", "--markdown")
    assert (bad.returncode, bad.stderr) == (2, "meterproxy: --markdown is only for: schema config\n")
    assert _cli("schema", "nonsense").returncode == 2


def test_schema_write_regenerates_every_file(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "configuration.md").write_text("stale\n")
    out = _cli("schema", "write", "--root", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.splitlines()) == sorted(
        f"wrote {tmp_path / rel}" for rel in schema.GENERATED)
    for rel in schema.GENERATED:
        assert (tmp_path / rel).read_text() == (ROOT / rel).read_text()
    again = _cli("schema", "write", "--root", str(tmp_path))
    assert again.stdout == ""      # nothing changed, nothing rewritten


@pytest.mark.parametrize(("rel", "target"), [
    ("rules/example.yaml", "docs/schema/rules.schema.json"),
    (schema.EXAMPLE_CONFIG, "docs/schema/config.schema.json"),
    ("deploy/meterproxy.yaml", "docs/schema/config.schema.json"),
])
def test_example_files_carry_the_schema_comment(rel: str, target: str) -> None:
    first = (ROOT / rel).read_text().splitlines()[0]
    m = re.fullmatch(r"# yaml-language-server: \$schema=(\S+)", first)
    assert m is not None, first
    assert ((ROOT / rel).parent / m.group(1)).resolve() == (ROOT / target).resolve()


@pytest.mark.parametrize("doc", ["docs/configuration.md", "docs/deployment.md"])
def test_documents_point_only_at_files_in_the_repository(doc: str) -> None:
    text = (ROOT / doc).read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert links or doc == "docs/configuration.md"
    for link in links:
        assert not link.startswith(("http://", "https://")), link
        assert ((ROOT / doc).parent / link).exists(), f"{doc} links to missing {link}"
    # paths named in backticks that look like repository files exist too
    for path in re.findall(r"`((?:deploy|docs|rules|proxy|tests)/[\w./-]+\.\w+)`", text):
        assert (ROOT / path).exists(), f"{doc} names missing {path}"


def test_the_value_rules_the_reference_states_hold() -> None:
    """Each sentence of the reference's "Values" section, checked against the loader."""
    expand = config_mod.expand_env
    assert expand("${A:-d}", {"A": ""}) == ""          # an empty variable counts as set
    assert expand("${A:-d}", {}) == "d"
    assert expand("x${A}y", {"A": "1"}) == "x1y"
    with pytest.raises(KeyError):
        expand("${A}", {})
    parse = config_mod.parse_duration
    assert [parse(v) for v in (30, 0.5, "10ms", "1.5s", "5m", "2h", "90d")] == \
        [30.0, 0.5, 0.01, 1.5, 300.0, 7200.0, 7776000.0]
    for bad in (-1, "-5s", "5 minutes", "1w"):
        with pytest.raises(ValueError):
            parse(bad)
    size = config_mod._size
    assert [size(v) for v in (1048576, "1MiB", "500KB", "2GB", "3B")] == \
        [1048576, 1048576, 500_000, 2_000_000_000, 3]
    with pytest.raises(ValueError):
        size("1.5MiB")
    assert [config_mod.split_hostport(v) for v in ("0.0.0.0:8080", "[::1]:8080", ":0")] == \
        [("0.0.0.0", 8080), ("::1", 8080), ("0.0.0.0", 0)]
