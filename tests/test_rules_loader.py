"""Rules loader: valid files compile; every broken file reports exact FILE:LINE:COL problems."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from proxy.rules import (
    Problem,
    ResponseNeed,
    RulesError,
    RuleSet,
    SourceKind,
    check_rules,
    cli_check,
    load_rules,
)
from proxy.units import CreditRate
from proxy.yamlpos import Pos, YamlError, load_yaml

HERE = Path(__file__).parent
BROKEN = HERE / "rules_broken"
EXAMPLE = HERE.parent / "rules" / "example.yaml"

# (file, ["LINE:COL: message", ...]) -- "{file}" stands for the file's own path.
BROKEN_CASES: list[tuple[str, list[str]]] = [
    ('auth_none_usage.yaml', [
        "6:38: params: 'id' is not a parameter of the path (path parameters: none)",
        '8:5: a rule with auth: none cannot meter usage (there is no customer to bill)',
    ]),
    ('bad_labels.yaml', [
        '3:59: display_name must be a non-empty string, got an empty string',
        '3:75: unit_label must be a non-empty string, got number',
        "6:19: display_name must be one line of printable text, got 'Tokens\\nand more'",
        '7:17: unit_label must be at most 30 characters, got 34',
        '8:51: display_name must be a non-empty string, got list',
        "8:56: unknown key 'unit_lable' in meter; did you mean 'unit_label'?",
    ]),
    ('bad_count_when.yaml', [
        "4:19: bad count_when item '6xx' (use a class like 2xx, a status like 404, or any)",
        "8:23: bad count_when item 'ok' (use a class like 2xx, a status like 404, or any)",
        '8:27: bad count_when item 99 (use a class like 2xx, a status like 404, or any)',
    ]),
    ('bad_credits.yaml', [
        '8:50: credits must not be negative, got -1',
        "9:50: credits must be a number, got string 'lots'",
        '10:38: quantity must not be negative, got -2',
        '10:57: on_unreadable must not be negative, got -1',
    ]),
    ('bad_paths.yaml', [
        "6:19: bad path template '/v1/{model/infer': unbalanced '{' (missing '}')",
        "8:19: bad path template '/v1/{}/infer': empty path parameter '{}'",
        "10:19: bad path template '/v1/{id}/items/{id}': duplicate path parameter {id}",
        "12:19: bad path template 'v1/chat': path must start with '/'",
        "14:19: bad path template '/v1/model}': unbalanced '}' (no matching '{')",
    ]),
    ('bad_presets.yaml', [
        "8:37: unknown preset 'openai_chats'; did you mean 'openai_chat'?",
        '9:29: usage has both quantity and preset; use one',
        '10:9: usage item needs quantity (a number or a source like '
            'response.json.usage.total_tokens) or preset',
    ]),
    ('bad_sources.yaml', [
        "8:39: bad quantity source 'response.jsn.usage.total_tokens'; did you mean "
            "'response.json.usage.total_tokens'?",
        "9:39: bad quantity source 'request.header.': missing or invalid name after "
            "'request.header.'",
        "10:39: bad quantity source 'path.modle': the rule's path has no parameter "
            '{modle} (path parameters: {model})',
        "11:39: bad quantity source 'response.json.usage..total': empty segment in JSON path",
        "12:39: bad quantity source 'tokens' (expected a number or "
            'request.header.<name>, response.header.<name>, request.query.<name>, '
            'path.<param>, request.json.<path>, response.json.<path>, request.bytes, '
            'response.bytes, duration_ms)',
    ]),
    ('bad_transform.yaml', [
        '10:32: transform divide_by must be a positive integer, got 0',
        "10:42: transform round must be up or down, got 'sideways'",
        '13:20: transform needs round (up or down)',
        '16:20: transform must be a mapping, got number',
    ]),
    ('duplicate_key.yaml', [
        '6:5: YAML syntax error: while constructing a mapping: found duplicate key '
            '"name" with value "b" (original value: "a")',
    ]),
    ('duplicate_rule.yaml', [
        "8:11: duplicate rule name 'chat' (first defined at {file}:5:5)",
    ]),
    ('empty.yaml', [
        '1:1: file is empty (expected version: 1, meters and rules)',
    ]),
    ('syntax_error.yaml', [
        "4:6: YAML syntax error: while parsing a flow mapping: expected ',' or '}', but got ':'",
    ]),
    ('unknown_keys.yaml', [
        "3:45: unknown key 'descripton' in meter; did you mean 'description'?",
        "4:1: unknown key 'rule' in the rules file; did you mean 'rules'?",
        "8:5: unknown key 'mach' in rule; did you mean 'match'?",
        "9:29: unknown key 'method' in match; did you mean 'methods'?",
        "11:41: unknown key 'credit' in usage; did you mean 'credits'?",
    ]),
    ('unknown_meter.yaml', [
        "8:16: unknown meter 'api_call'; did you mean 'api_calls'?",
        "10:16: unknown meter 'tokens' (define it under meters:)",
    ]),
    ('unreachable.yaml', [
        "8:11: rule 'chat' is unreachable: the earlier rule 'everything' ({file}:5:5) "
            'matches every request',
        "11:11: rule 'later' is unreachable: the earlier rule 'everything' ({file}:5:5) "
            'matches every request',
    ]),
    ('version_missing.yaml', [
        "1:1: missing 'version: 1' at the top of the file",
    ]),
    ('version_wrong.yaml', [
        '1:10: version must be 1, got 2',
    ]),
    ('wrong_types.yaml', [
        "3:14: meter 'api_calls' must be a mapping, got string",
        "4:11: meter 'tokens' needs stripe_event_name",
        '6:11: rule name must be a non-empty string, got list',
        '7:34: path must be a non-empty string, got number',
        "7:56: headers condition 'x-tier' must be a glob string or true (= present), got list",
        "8:11: auth must be required or none, got 'maybe'",
        '9:12: usage must be a list of {meter, quantity} items, got mapping',
        '10:5: rule must be a mapping, got string',
    ]),
]


@pytest.mark.parametrize(("name", "expected"), BROKEN_CASES, ids=[c[0] for c in BROKEN_CASES])
def test_broken_file_reports_exact_positions(name: str, expected: list[str]) -> None:
    path = BROKEN / name
    got = [str(p) for p in check_rules([path])]
    assert got == [f"{path}:" + e.replace("{file}", str(path)) for e in expected]
    with pytest.raises(RulesError) as info:
        load_rules([path])
    assert [str(p) for p in info.value.problems] == got


def test_every_broken_file_is_covered() -> None:
    on_disk = {p.name for p in BROKEN.glob("*.yaml")}
    assert on_disk == {c[0] for c in BROKEN_CASES}
    assert len(on_disk) >= 12


def test_cli_check_prints_problems_and_returns_1(capsys: pytest.CaptureFixture[str]) -> None:
    path = BROKEN / "unknown_meter.yaml"
    assert cli_check([path]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"{path}:8:16: unknown meter 'api_call'; did you mean 'api_calls'?"


def test_cli_check_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_check([str(EXAMPLE)]) == 0
    assert capsys.readouterr().err == ""


def test_missing_file_is_a_problem(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    [p] = check_rules([missing])
    assert (p.file, p.line, p.col) == (str(missing), 1, 1)
    assert "cannot read" in p.message


def test_problem_str() -> None:
    assert str(Problem("r.yaml", 3, 7, "bad")) == "r.yaml:3:7: bad"


def test_example_loads() -> None:
    rs = load_rules([EXAMPLE])
    assert [r.name for r in rs.rules] == [
        "health", "chat", "messages", "responses", "premium-inference", "upload",
        "everything-else"]
    assert set(rs.meters) == {"api_calls", "llm_tokens", "gb_processed"}
    assert len(rs.version) == 16
    by = {r.name: r for r in rs.rules}
    assert by["health"].auth == "none" and by["health"].usage == ()
    chat = by["chat"]
    assert chat.auth == "required"
    assert chat.response_body is ResponseNeed.SSE_OR_JSON
    assert chat.usage[0].credits_per_unit == CreditRate(1, 1000)
    assert str(chat.usage[0].credits_per_unit) == "0.001"
    assert chat.usage[0].estimate_micro == 1000 * 1_000_000
    assert chat.usage[1].source.kind is SourceKind.CONSTANT
    upload = by["upload"]
    assert upload.response_body is ResponseNeed.NONE
    assert upload.usage[0].transform is not None
    assert upload.usage[0].transform.divide_by == 1_000_000_000
    assert by["everything-else"].new_inspector("application/json", 1024) is None
    assert chat.count_when.matches(200) and not chat.count_when.matches(404)


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


METERS = "version: 1\nmeters:\n  api_calls: {stripe_event_name: api_calls}\n"


def test_multiple_files_merge_meters_and_keep_rule_order(tmp_path: Path) -> None:
    a = _write(tmp_path, "a.yaml", METERS + "rules:\n  - name: one\n    match: {path: /one}\n")
    b = _write(tmp_path, "b.yaml",
               "version: 1\nmeters:\n  tokens: {stripe_event_name: tok}\nrules:\n"
               "  - name: two\n    match: {path: /two}\n"
               "    usage: [{meter: api_calls, quantity: 1}, {meter: tokens, quantity: 2}]\n")
    rs = load_rules([a, b])
    assert [r.name for r in rs.rules] == ["one", "two"]
    assert set(rs.meters) == {"api_calls", "tokens"}
    assert rs.meters["tokens"].stripe_event_name == "tok"
    assert rs.version != load_rules([b, a]).version


def test_duplicate_meter_across_files(tmp_path: Path) -> None:
    a = _write(tmp_path, "a.yaml", METERS)
    b = _write(tmp_path, "b.yaml", METERS)
    assert [str(p) for p in check_rules([a, b])] == [
        f"{b}:3:3: meter 'api_calls' is already defined at {a}:3:3"]


def test_catch_all_in_first_file_shadows_second(tmp_path: Path) -> None:
    a = _write(tmp_path, "a.yaml", METERS + "rules:\n  - name: all\n")
    b = _write(tmp_path, "b.yaml", "version: 1\nrules:\n  - name: x\n    match: {path: /x}\n")
    [p] = check_rules([a, b])
    assert str(p) == (f"{b}:3:11: rule 'x' is unreachable: the earlier rule 'all' "
                      f"({a}:5:5) matches every request")


def test_conditional_catch_all_does_not_shadow(tmp_path: Path) -> None:
    a = _write(tmp_path, "a.yaml", METERS + (
        "rules:\n"
        "  - {name: beta, match: {path: '/**', headers: {x-beta: true}}}\n"
        "  - {name: gets, match: {path: '/**', methods: [GET]}}\n"
        "  - {name: rest, match: {path: '/**'}}\n"))
    assert [r.name for r in load_rules([a]).rules] == ["beta", "gets", "rest"]


def test_count_when_items(tmp_path: Path) -> None:
    a = _write(tmp_path, "a.yaml", METERS + (
        "count_when: [2xx, 404]\n"
        "rules:\n"
        "  - {name: a, match: {path: /a}}\n"
        "  - {name: b, match: {path: /b}, count_when: [any]}\n"
        "  - {name: c, match: {path: /c}, count_when: ['5XX', '201']}\n"))
    a_, b_, c_ = load_rules([a]).rules
    assert [s for s in (200, 299, 404, 300, 500) if a_.count_when.matches(s)] == [200, 299, 404]
    assert b_.count_when.matches(0) and b_.count_when.matches(599)
    assert [s for s in (201, 200, 500, 599, 404) if c_.count_when.matches(s)] == [201, 500, 599]


def test_sources_compile(tmp_path: Path) -> None:
    a = _write(tmp_path, "a.yaml", METERS + (
        "rules:\n"
        "  - name: a\n"
        "    match: {path: '/v1/{model}'}\n"
        "    usage:\n"
        "      - {meter: api_calls, quantity: request.header.X-Units}\n"
        "      - {meter: api_calls, quantity: response.header.x-cost}\n"
        "      - {meter: api_calls, quantity: request.query.n}\n"
        "      - {meter: api_calls, quantity: path.model}\n"
        "      - {meter: api_calls, quantity: request.json.input.0.len}\n"
        "      - {meter: api_calls, quantity: response.json.choices.0.n}\n"
        "      - {meter: api_calls, quantity: response.bytes}\n"
        "      - {meter: api_calls, quantity: duration_ms, on_unreadable: 1.5}\n"
        "      - {meter: api_calls, quantity: '2.5'}\n"))
    [rule] = load_rules([a]).rules
    kinds = [u.source.kind for u in rule.usage]
    assert kinds == [SourceKind.REQUEST_HEADER, SourceKind.RESPONSE_HEADER,
                     SourceKind.REQUEST_QUERY, SourceKind.PATH_PARAM, SourceKind.REQUEST_JSON,
                     SourceKind.RESPONSE_JSON, SourceKind.RESPONSE_BYTES,
                     SourceKind.DURATION_MS, SourceKind.CONSTANT]
    assert rule.usage[0].source.name == "X-Units"
    assert rule.usage[4].source.path == ("input", "0", "len")
    assert rule.usage[7].on_unreadable_micro == 1_500_000
    assert rule.usage[8].source.constant == Decimal("2.5")
    assert rule.request_json is True
    assert rule.response_body is ResponseNeed.JSON
    assert [u.line for u in rule.usage] == list(range(8, 17))


def test_no_paths_is_a_problem() -> None:
    [p] = check_rules([])
    assert "no rules files" in p.message


# ------------------------------------------------------------------ yamlpos


def test_yamlpos_positions_and_exact_decimals() -> None:
    doc = load_yaml("a:\n  b: [1, 0.1]\n  c: {d: x}\n")
    assert doc.data == {"a": {"b": [1, Decimal("0.1")], "c": {"d": "x"}}}
    assert doc.key_pos(("a", "c")) == Pos(3, 3)
    assert doc.value_pos(("a", "b", 1)) == Pos(2, 10)
    assert doc.value_pos(("a", "c", "d")) == Pos(3, 10)
    assert doc.locate(("a", "c", "nope", 3)) == Pos(3, 6)
    assert doc.locate(("zzz",)) == Pos(1, 1)


def test_yamlpos_syntax_error() -> None:
    with pytest.raises(YamlError) as info:
        load_yaml("a: [1\n")
    assert (info.value.line, info.value.col) == (2, 1)


def test_meter_display_name_and_unit_label(tmp_path: Path) -> None:
    p = _write(tmp_path, "labels.yaml",
               "version: 1\nmeters:\n"
               "  llm_tokens: {stripe_event_name: tok, display_name: '  GPT tokens ',"
               " unit_label: tokens}\n"
               "  api_calls: {stripe_event_name: api_calls}\n"
               "rules:\n  - name: all\n    match: {path: /x}\n")
    rs = load_rules([p])
    tok, calls = rs.meters["llm_tokens"], rs.meters["api_calls"]
    assert (tok.display_name, tok.unit_label) == ("GPT tokens", "tokens")
    assert (tok.label, tok.units) == ("GPT tokens", "tokens")
    assert (calls.display_name, calls.unit_label) == (None, None)
    assert (calls.label, calls.units) == ("api_calls", "units")


ROUTED = METERS + """rules:
  - name: chat
    match: {methods: [POST], path: /v1/chat/completions}
    usage: [{meter: api_calls, quantity: 100}]
  - name: model
    match: {path: "/v1/Models/{id}"}
    usage: [{meter: api_calls, quantity: 10}]
  - name: rest
    match: {path: "/**"}
    usage: [{meter: api_calls, quantity: 1}]
"""


def test_routing_matches_paths_the_way_the_upstream_routes_them(tmp_path: Path) -> None:
    """An upstream that routes without case and ignores a trailing slash (Express's default)
    serves /V1/CHAT/completions/ from its /v1/chat/completions handler: with ``routing``
    saying so, the rules match it to that rule too (not the 1-call catch-all); path
    parameters keep the request's own text; the default stays strict."""
    strict = load_rules([_write(tmp_path, "s.yaml", ROUTED)])
    loose = load_rules([_write(tmp_path, "l.yaml", ROUTED.replace(
        "rules:\n", "routing: {case: insensitive, trailing_slash: ignore}\nrules:\n", 1))])
    assert (strict.case_insensitive, strict.ignore_trailing_slash) == (False, False)
    assert (loose.case_insensitive, loose.ignore_trailing_slash) == (True, True)

    def rule(rs: RuleSet, method: str, path: str) -> tuple[str, dict[str, str]]:
        m = rs.match(method, path, {}, {})
        assert m is not None
        return m.rule.name, dict(m.path_params)

    for path in ("/V1/CHAT/completions", "/v1/chat/completions/", "/v1/Chat/Completions/"):
        assert rule(strict, "POST", path)[0] == "rest", path
        assert rule(loose, "POST", path) == ("chat", {}), path
    assert rule(loose, "GET", "/V1/models/GPT-4o/") == ("model", {"id": "GPT-4o"})
    assert rule(strict, "GET", "/v1/Models/GPT-4o") == ("model", {"id": "GPT-4o"})
    assert rule(strict, "GET", "/v1/models/GPT-4o") == ("rest", {})
    assert rule(loose, "GET", "/") == ("rest", {})


def test_routing_folds_ascii_letters_only_and_keeps_what_the_slash_matched(
        tmp_path: Path) -> None:
    """The review's cases. Express matches the still percent-encoded path, so only ASCII
    letters fold: a dotless i, long s or Kelvin sign is not the ASCII letter (bucketing by
    str.lower() and re's Unicode folding disagreed on them). A trailing slash is optional,
    not stripped: /v1/files/ still matches /v1/files/* (its last segment may be empty), as
    in strict mode and in Express."""
    text = METERS + """routing: {case: insensitive, trailing_slash: ignore}
rules:
  - name: images
    match: {path: "/images/**"}
    usage: [{meter: api_calls, quantity: 50}]
  - name: keys
    match: {path: /keys}
    usage: [{meter: api_calls, quantity: 20}]
  - name: files
    match: {path: "/v1/files/*"}
    usage: [{meter: api_calls, quantity: 10}]
  - name: rest
    match: {path: "/**"}
    usage: [{meter: api_calls, quantity: 1}]
"""
    rs = load_rules([_write(tmp_path, "r.yaml", text)])

    def name(path: str) -> str:
        m = rs.match("GET", path, {}, {})
        assert m is not None
        return m.rule.name

    assert [name(p) for p in ("/IMAGES/x", "/Images/x/", "/KEYS", "/keys/", "/v1/files/",
                              "/V1/FILES/a/", "/v1/files/a")] == [
        "images", "images", "keys", "keys", "files", "files", "files"]
    assert [name(p) for p in ("/\u0131mages/x", "/\u0130mages/x", "/key\u017f",
                              "/\u212aeys")] == ["rest"] * 4
    # the tools re-check a recorded request the same way
    images = next(r for r in rs.rules if r.name == "images")
    assert rs.fits(images.matcher, "GET", "/IMAGES/x/") == {}


def test_routing_values_are_checked_and_agree_across_files(tmp_path: Path) -> None:
    a = _write(tmp_path, "a.yaml", METERS + "routing: {case: insensitive}\nrules: []\n")
    b = _write(tmp_path, "b.yaml", "version: 1\nrouting: {case: sensitive, trailing_slash: "
               "sideways}\nrules:\n  - name: x\n    match: {path: /x/}\n")
    c = _write(tmp_path, "c.yaml", "version: 1\nrouting: {trailing_slash: ignore, cases: 1}"
               "\nrules:\n  - name: y\n    match: {path: /y/}\n")
    got = [str(p) for p in check_rules([a, b, c])]
    assert any("routing.case is 'sensitive' here but 'insensitive' at" in g for g in got), got
    assert any("routing.trailing_slash must be strict or ignore, got 'sideways'" in g
               for g in got), got
    assert any("cases" in g for g in got), got
    # one setting for all files: b's template is checked against c's trailing_slash too
    assert any(g.startswith(f"{c}:") and "path '/y/' ends with '/'" in g for g in got), got
    assert any(g.startswith(f"{b}:") and "path '/x/' ends with '/'" in g for g in got), got


def test_templates_equal_but_for_case_are_unreachable_under_insensitive_routing(
        tmp_path: Path) -> None:
    text = METERS + """routing: {case: insensitive}
rules:
  - name: upper
    match: {path: /V1/Chat}
    usage: [{meter: api_calls, quantity: 5}]
  - name: lower
    match: {path: /v1/chat}
    usage: [{meter: api_calls, quantity: 500}]
  - name: post-only
    match: {methods: [POST], path: /v1/CHAT}
  - name: with-header
    match: {path: /v1/chat, headers: {X-Tier: premium}}
"""
    got = [str(p) for p in check_rules([_write(tmp_path, "r.yaml", text)])]
    assert len(got) == 1 and "the earlier rule 'upper'" in got[0] and ":10:19:" in got[0], got
    strict = text.replace("routing: {case: insensitive}\n", "")
    assert check_rules([_write(tmp_path, "s.yaml", strict)]) == []
