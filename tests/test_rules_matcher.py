"""Matcher: path templates, conditions, first-match order and the bucketed index."""

from __future__ import annotations

import re
import timeit
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.rules import load_rules
from proxy.rules.matcher import Matcher, MatchIndex, TemplateError, compile_template

SEGMENT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.~%", min_size=1,
                  max_size=8)


@pytest.mark.parametrize(("template", "path", "params"), [
    ("/healthz", "/healthz", {}),
    ("/v1/{model}/infer", "/v1/gpt-4/infer", {"model": "gpt-4"}),
    ("/v1/{a}/{b}", "/v1/x/y", {"a": "x", "b": "y"}),
    ("/files/*.csv", "/files/report.csv", {}),
    ("/files/*.csv", "/files/.csv", {}),
    ("/**", "/", {}),
    ("/**", "/a/b/c", {}),
    ("/v1/**", "/v1", {}),
    ("/v1/**", "/v1/", {}),
    ("/v1/**", "/v1/a/b", {}),
    ("/a/**/z", "/a/z", {}),
    ("/a/**/z", "/a/b/c/z", {}),
    ("/", "/", {}),
    ("/v1/{id}.json", "/v1/42.json", {"id": "42"}),
])
def test_template_matches(template: str, path: str, params: dict[str, str]) -> None:
    assert compile_template(template).match(path) == params


@pytest.mark.parametrize(("template", "path"), [
    ("/healthz", "/healthz/"),
    ("/healthz", "/health"),
    ("/v1/{model}/infer", "/v1//infer"),
    ("/v1/{model}/infer", "/v1/a/b/infer"),
    ("/files/*.csv", "/files/a/b.csv"),
    ("/v1/**", "/v10"),
    ("/a/**/z", "/a/zz"),
    ("/", "/a"),
    ("/a.b", "/aXb"),
])
def test_template_rejects(template: str, path: str) -> None:
    assert compile_template(template).match(path) is None


@pytest.mark.parametrize(("template", "reason"), [
    ("v1", "must start with '/'"),
    ("/{a", "unbalanced '{'"),
    ("/a}", "unbalanced '}'"),
    ("/{}", "empty path parameter"),
    ("/{a}/{a}", "duplicate path parameter"),
    ("/{a-b}", "bad path parameter name"),
    ("/a**", "'**' must be a whole path segment"),
    ("/{a{b}}", "unbalanced '{'"),
])
def test_template_errors(template: str, reason: str) -> None:
    with pytest.raises(TemplateError, match=re.escape(reason)):
        compile_template(template)


@given(st.lists(SEGMENT, min_size=0, max_size=6))
def test_literal_template_matches_exactly_that_path(segments: list[str]) -> None:
    path = "/" + "/".join(segments)
    t = compile_template(path)
    assert t.match(path) == {}
    assert t.match(path + "x") is None
    assert t.match(path + "/x") is None
    # the regex form agrees with the literal fast path
    assert t.regex.fullmatch(path) is not None


@given(st.lists(SEGMENT, min_size=1, max_size=5), st.lists(SEGMENT, max_size=4))
def test_double_star_matches_any_suffix(prefix: list[str], rest: list[str]) -> None:
    t = compile_template("/" + "/".join(prefix) + "/**")
    assert t.match("/" + "/".join(prefix + rest)) == {}


RULES = """\
version: 1
meters:
  api_calls: {stripe_event_name: api_calls}
rules:
  - {name: health, match: {path: /healthz}, auth: none}
  - name: premium
    match: {methods: [post], path: "/v1/models/{model}/infer", params: {model: "premium-*"}}
  - name: beta
    match: {path: "/v1/models/{model}/infer", headers: {X-Beta: "y*"}}
  - name: keyed
    match: {path: "/v1/models/{model}/infer", query: {key: true}}
  - name: models
    match: {path: "/v1/models/**"}
  - name: star-first
    match: {path: "/*/status"}
  - {name: everything, match: {path: "/**"}}
"""


@pytest.fixture
def ruleset_path(tmp_path: Path) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(RULES)
    return p


@pytest.mark.parametrize(("method", "path", "headers", "query", "expected", "params"), [
    ("GET", "/healthz", {}, {}, "health", {}),
    ("POST", "/v1/models/premium-x/infer", {}, {}, "premium", {"model": "premium-x"}),
    ("GET", "/v1/models/premium-x/infer", {}, {}, "models", {}),
    ("GET", "/v1/models/m/infer", {"X-Beta": "yes"}, {}, "beta", {"model": "m"}),
    ("GET", "/v1/models/m/infer", {"X-Beta": "no"}, {}, "models", {}),
    ("GET", "/v1/models/m/infer", {}, {"key": ""}, "keyed", {"model": "m"}),
    ("GET", "/v1/models", {}, {}, "models", {}),
    ("GET", "/healthz/status", {}, {}, "star-first", {}),
    ("GET", "/v1/status", {}, {}, "star-first", {}),
    ("DELETE", "/anything/else", {}, {}, "everything", {}),
    ("GET", "/", {}, {}, "everything", {}),
])
def test_ruleset_first_match(ruleset_path: Path, method: str, path: str,
                             headers: dict[str, str], query: dict[str, str],
                             expected: str, params: dict[str, str]) -> None:
    rs = load_rules([ruleset_path])
    m = rs.match(method, path, headers, query)
    assert m is not None
    assert (m.rule.name, dict(m.path_params)) == (expected, params)


def test_a_memoised_match_answers_like_a_fresh_one(ruleset_path: Path, tmp_path: Path) -> None:
    """RuleSet.match memoises by (method, path) only when no rule reads headers or the
    query: the rule set above reads both, so the same path answers by its headers each
    time; a path-only rule set answers every repeat (and every method) like the first."""
    rs = load_rules([ruleset_path])
    for _ in range(2):
        for beta, want in (("yes", "beta"), ("no", "models")):
            m = rs.match("GET", "/v1/models/m/infer", {"X-Beta": beta}, {})
            assert m is not None and m.rule.name == want
    p = tmp_path / "plain.yaml"
    p.write_text("version: 1\nmeters: {a: {stripe_event_name: a}}\nrules:\n"
                 "  - {name: post, match: {methods: [POST], path: '/v1/{id}'}}\n"
                 "  - {name: rest, match: {path: '/**'}}\n")
    plain = load_rules([p])
    assert not plain.reads_query
    for _ in range(3):
        for method, want, params in (("POST", "post", {"id": "x"}), ("GET", "rest", {})):
            m = plain.match(method, "/v1/x", {}, {})
            assert m is not None and (m.rule.name, dict(m.path_params)) == (want, params)
    assert plain.match("GET", "/", {}, {}) is plain.match("GET", "/", {}, {})   # memoised


def test_no_match_returns_none() -> None:
    idx = MatchIndex([(Matcher(template=compile_template("/a")), "a")])
    assert idx.match("GET", "/b", {}, {}) is None
    assert idx.match("GET", "/a", {}, {}) == ("a", {})


def test_index_preserves_order_across_buckets() -> None:
    entries = [
        (Matcher(template=compile_template("/{x}/one")), "wild"),
        (Matcher(template=compile_template("/a/one")), "literal"),
        (Matcher(template=compile_template("/a/two")), "literal2"),
    ]
    idx = MatchIndex(entries)
    assert idx.match("GET", "/a/one", {}, {}) == ("wild", {"x": "a"})
    assert idx.match("GET", "/a/two", {}, {}) == ("literal2", {})


def test_match_is_cheap_on_20_rules(tmp_path: Path) -> None:
    rules = ["version: 1", "meters:", "  api_calls: {stripe_event_name: api_calls}", "rules:"]
    for i in range(18):
        rules.append(f"  - {{name: r{i}, match: {{methods: [POST], path: '/v{i}/items/{{id}}'}},"
                     " usage: [{meter: api_calls, quantity: 1}]}")
    rules.append("  - {name: wild, match: {path: '/*/special'}}")
    rules.append("  - {name: all, match: {path: '/**'}}")
    p = tmp_path / "r.yaml"
    p.write_text("\n".join(rules) + "\n")
    rs = load_rules([p])
    assert len(rs.rules) == 20
    n = 20_000
    for path in ("/v17/items/9", "/zzz/nothing", "/v3/special"):
        per_call = min(timeit.repeat(lambda p=path: rs.match("POST", p, {}, {}),  # type: ignore[misc]
                                     number=n, repeat=3)) / n
        assert per_call < 50e-6, (path, per_call)  # a few µs in practice; generous for CI
