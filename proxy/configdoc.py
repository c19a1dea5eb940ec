"""The configuration reference and the commented example config, generated from the model.

Owns: turning :class:`proxy.config.Config` (its fields' ``description``, ``default`` and
``examples``) into ``docs/configuration.md`` and ``rules/meterproxy.example.yml``.

Invariants:
- Every text here comes from the model: a setting added to ``proxy/config.py`` appears in
  both files on the next ``meterproxy schema write``. A setting without a description (or,
  when required, without an example) is written with the :data:`UNDOCUMENTED` marker, so
  regeneration always succeeds, and ``settings(strict=True)`` (the tests) refuses it with
  :class:`UndocumentedSetting`: never a silent gap.
- Output is deterministic (same model, same bytes), so a test can compare the committed
  files with a fresh rendering.
"""

from __future__ import annotations

import io
import json
import textwrap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ruamel.yaml import YAML

from proxy.config import Config
from proxy.errors import MeterproxyError
from proxy.schema import EXAMPLE_CONFIG

REGENERATE = "meterproxy schema write"
CONFIG_SCHEMA_REL = "../docs/schema/config.schema.json"

Schema = dict[str, Any]


UNDOCUMENTED = "UNDOCUMENTED: add Field(description=..., examples=[...]) in proxy/config.py"


class UndocumentedSetting(MeterproxyError, ValueError):
    """A config field with no ``description=`` or no example/default to show."""


# ------------------------------------------------------------------ walking the model


@dataclass(frozen=True, slots=True)
class Setting:
    """One key of the config file, with everything the reference says about it."""

    path: tuple[str, ...]          # ("credits", "packs", "*", "priority"); "*" = any key, "[]" = item
    node: Schema                   # its JSON Schema (refs resolved one level)
    required: bool

    @property
    def dotted(self) -> str:
        out = ""
        for p in self.path:
            if p == "[]":
                out += "[]"
            elif p == "*":
                out += ".<name>"
            else:
                out += ("." if out else "") + p
        return out

    @property
    def description(self) -> str:
        return str(self.node.get("description") or "")

    @property
    def has_default(self) -> bool:
        return "default" in self.node

    @property
    def example(self) -> Any:
        ex = self.node.get("examples")
        if ex:
            return ex[0]
        if "properties" in self.node:    # a section: its keys' examples
            return self.node["x-example"]
        if self.has_default:
            return _humanize(self.node, self.node["default"])
        return UNDOCUMENTED


def raw_schema() -> Schema:
    """Pydantic's JSON Schema of the config file (before editor-friendly rewriting)."""
    return Config.model_json_schema()


def _deref(node: Schema, defs: Mapping[str, Schema]) -> Schema:
    if "$ref" in node:
        target = dict(defs[node["$ref"].rsplit("/", 1)[-1]])
        return {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def _model_of(node: Schema, defs: Mapping[str, Schema]) -> Schema | None:
    """The object schema a property holds (directly, in a map, or in a list), if any."""
    node = _deref(node, defs)
    if node.get("type") == "object" and "properties" in node:
        return node
    return None


def _section_example(obj: Schema, defs: Mapping[str, Schema]) -> dict[str, Any]:
    """A section's example: every key at its default (a required key: its example)."""
    out: dict[str, Any] = {}
    for name, prop in obj["properties"].items():
        node = _deref(prop, defs)
        sub = _model_of(prop, defs)
        if sub is not None:
            out[name] = _section_example(sub, defs)
        elif "default" in node:
            out[name] = _humanize(node, node["default"])
        elif node.get("examples"):
            out[name] = node["examples"][0]
    return out


def settings(schema: Schema | None = None, *, strict: bool = False) -> list[Setting]:
    """Every setting in file order (depth first), nested mappings before their keys.
    ``strict``: a setting without a description or anything to show as an example raises
    :class:`UndocumentedSetting`; otherwise it carries the :data:`UNDOCUMENTED` marker."""
    schema = schema or raw_schema()
    defs = schema.get("$defs", {})
    out: list[Setting] = []

    def walk(obj: Schema, prefix: tuple[str, ...]) -> None:
        required = set(obj.get("required", ()))
        for name, prop in obj["properties"].items():
            node = _deref(prop, defs)
            sub = _model_of(prop, defs)
            if sub is not None:
                node = {**node, "x-example": _section_example(sub, defs)}
            if not node.get("description"):
                node = {**node, "description": UNDOCUMENTED}
            s = Setting((*prefix, name), node, name in required)
            if strict and s.description == UNDOCUMENTED:
                raise UndocumentedSetting(f"config setting {s.dotted} has no description; add "
                                          f"Field(description=...) in proxy/config.py")
            if strict and s.example == UNDOCUMENTED:
                raise UndocumentedSetting(f"config setting {s.dotted} has neither a default nor "
                                          f"examples=[...]; add one in proxy/config.py")
            out.append(s)
            if sub is not None:
                walk(sub, s.path)
                continue
            add = node.get("additionalProperties")
            if isinstance(add, dict) and _model_of(add, defs) is not None:
                walk(_deref(add, defs), (*s.path, "*"))
            items = node.get("items")
            if isinstance(items, dict) and _model_of(items, defs) is not None:
                walk(_deref(items, defs), (*s.path, "[]"))

    walk(schema, ())
    return out


# ------------------------------------------------------------------ rendering values


def human_duration(seconds: float) -> str:
    """60.0 -> "60s", 0.01 -> "10ms", 7776000 -> "90d" (the largest exact unit)."""
    ms = round(seconds * 1000)
    if abs(ms - seconds * 1000) > 1e-6 or ms == 0:
        return "0s" if seconds == 0 else f"{seconds:g}s"
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def human_size(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _strip_nulls(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _strip_nulls(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_strip_nulls(x) for x in v]
    return v


def _humanize(node: Schema, value: Any) -> Any:
    kind = node.get("x-kind")
    if kind is None:
        for alt in node.get("anyOf", ()):
            kind = kind or alt.get("x-kind")
    if kind == "duration" and isinstance(value, (int, float)):
        return human_duration(float(value))
    if kind == "size" and isinstance(value, int):
        return human_size(value)
    return _strip_nulls(value)


def _yaml() -> YAML:
    y = YAML()
    y.default_flow_style = False
    y.width = 4096
    y.indent(mapping=2, sequence=4, offset=2)
    return y


def yaml_text(data: Any) -> str:
    buf = io.StringIO()
    _yaml().dump(data, buf)
    return buf.getvalue()


def inline(value: Any) -> str:
    """A value as it would be written on one YAML line."""
    if value is None:
        return "unset"
    if isinstance(value, str):
        return json.dumps(value) if value == "" or value.strip() != value else value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(inline(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {inline(v)}" for k, v in value.items()) + "}"
    return str(value)


def type_text(node: Schema, defs: Mapping[str, Schema] | None = None) -> str:
    """A reader's name for a schema: "duration", "one of `a`, `b`", "list of strings"."""
    defs = defs or raw_schema().get("$defs", {})
    if node.get("x-kind") in ("duration", "size"):
        return str(node["x-kind"])
    if "$ref" in node:
        node = _deref(node, defs)
    if "enum" in node:
        return "one of " + ", ".join(f"`{v}`" for v in node["enum"])
    if "anyOf" in node:
        alts = [a for a in node["anyOf"] if a.get("type") != "null"]
        text = " or ".join(type_text(a, defs) for a in alts)
        return text + (" (optional)" if len(alts) < len(node["anyOf"]) else "")
    t = node.get("type")
    if t == "array":
        items = node.get("items", {})
        inner = type_text(items, defs)
        return "list of " + ("mappings (keys below)" if inner == "mapping" else
                             {"string": "strings", "number": "numbers",
                              "integer": "integers"}.get(inner, inner))
    if t == "object":
        add = node.get("additionalProperties")
        if isinstance(add, dict):
            inner = type_text(add, defs)
            return "mapping of name -> " + ("mapping (keys below)" if inner == "mapping"
                                            else inner)
        return "mapping"
    if t in ("integer", "number"):
        lo, hi = node.get("minimum"), node.get("maximum")
        word = "integer" if t == "integer" else "number"
        if lo is not None and hi is not None:
            return f"{word}, {lo} to {hi}"
        if lo is not None:
            return f"{word}, at least {lo}"
        return word
    if t == "boolean":
        return "boolean"
    return str(t or "any")


def _nest(path: tuple[str, ...], value: Any, example_keys: Mapping[tuple[str, ...], str]) -> Any:
    """``value`` placed at ``path`` in an otherwise empty document."""
    out = value
    for i in range(len(path) - 1, -1, -1):
        p = path[i]
        if p == "[]":
            out = [out]
        elif p == "*":
            out = {example_keys.get(path[:i], "<key>"): out}
        else:
            out = {p: out}
    return out


def _example_keys(all_settings: list[Setting]) -> dict[tuple[str, ...], str]:
    """For each map-of-mappings setting: the first key of its example (the "<key>")."""
    out: dict[tuple[str, ...], str] = {}
    for s in all_settings:
        ex = s.node.get("examples")
        if ex and isinstance(ex[0], dict) and ex[0]:
            out[s.path] = str(next(iter(ex[0])))
    return out


# ------------------------------------------------------------------ the reference


_INTRO = """\
# Configuration reference

<!-- GENERATED from proxy/config.py by `{regen}`. Do not edit by hand:
     change the Field(description=..., examples=[...]) in the model and regenerate. -->

meterproxy reads one YAML file: `meterproxy serve --config meterproxy.yaml` (the
`METERPROXY_CONFIG` environment variable names it when `--config` is not given). The file is
read once at start and validated as a whole; a bad file is refused with every problem as
`file:line: setting: message` and exit code 2. Unknown settings are errors, not ignored.
(The rules files it names are separate and hot-reloaded; their format is in
`rules/example.yaml`, and their JSON Schema in `docs/schema/rules.schema.json`.)

A complete example with every setting, its default and a comment is
[`{example}`](../{example}).

## Values

- **Environment variables.** Any string value may contain `${{VAR}}` or `${{VAR:-default}}`;
  it is replaced by the variable's value from the environment of the process, or by
  `default` when the variable is not set (an empty variable counts as set). A `${{VAR}}`
  with no default whose variable is not set is an error naming the setting and the
  variable. Expansion happens once, at load, before validation, so a number or a choice
  may come from the environment too: `durability: ${{METERPROXY_DURABILITY:-strict}}`.
  There is no escape for a literal `${{`.
- **Relative paths** (`rules`, `storage.path`) are relative to the directory that holds the
  config file, not to the working directory.
- **Durations** are a number of seconds (`30`, `0.5`) or a number with a unit: `ms`, `s`,
  `m`, `h`, `d` (`10ms`, `1.5s`, `5m`, `2h`, `90d`). Negative or non-finite durations are errors;
  written as text, at most 9 integer digits and 6 decimals.
- **Sizes** are a number of bytes (`1048576`) or a whole number with a unit: `B`, `KB`,
  `MB`, `GB` (powers of 1000) or `KiB`, `MiB`, `GiB` (powers of 1024): `1MiB`, `500KB`.
- **HOST:PORT** addresses: `0.0.0.0:8080`, `127.0.0.1:9090`, `[::1]:8080`; port `0` picks a
  free port (tests).
- **Editor support**: start the file with
  `# yaml-language-server: $schema=<path or URL of docs/schema/config.schema.json>` and an
  editor with the YAML language server completes and checks every setting.

## Settings

"""


def _index(all_settings: list[Setting]) -> str:
    lines = []
    for s in all_settings:
        depth = sum(1 for p in s.path if p not in ("*", "[]")) - 1
        lines.append(f"{'  ' * depth}- [`{s.dotted}`](#{_anchor(s.dotted)})")
    return "\n".join(lines) + "\n"


def _anchor(dotted: str) -> str:
    return "".join(c for c in dotted.lower() if c.isalnum() or c in "-_ ").replace(" ", "-")


def _default_text(default: Any) -> str:
    return "unset" if default is None else f"`{inline(default)}`"


def config_markdown() -> str:
    schema = raw_schema()
    defs = schema.get("$defs", {})
    all_settings = settings(schema)
    keys = _example_keys(all_settings)
    out = [_INTRO.format(regen=REGENERATE, example=EXAMPLE_CONFIG), _index(all_settings)]
    for s in all_settings:
        out.append(f"\n### `{s.dotted}`\n\n")
        out.append(s.description + "\n\n")
        out.append(f"- Type: {type_text(s.node, defs)}\n")
        if s.required:
            out.append("- Default: none, **required**\n")
        elif s.has_default:
            default = _humanize(s.node, s.node["default"])
            if isinstance(default, dict) and default and _model_of(s.node, defs) is not None:
                out.append("- Default: each key's default, below\n")
            else:
                out.append(f"- Default: {_default_text(default)}\n")
        elif s.node.get("type") in ("object", "array"):
            out.append(f"- Default: `{'{}' if s.node['type'] == 'object' else '[]'}` (none)\n")
        else:
            out.append("- Default: unset\n")
        example = _nest(s.path, s.example, keys)
        out.append("\n```yaml\n" + yaml_text(example) + "```\n")
    return "".join(out)


# ------------------------------------------------------------------ the example config


_EXAMPLE_HEAD = """\
# yaml-language-server: $schema={schema}
#
# meterproxy.yaml: every setting, with its default, and what it does.
# GENERATED from proxy/config.py by `{regen}`;
# docs/configuration.md is the full reference (types, examples).
#
# Try it as it is (the upstream on 127.0.0.1:9000; the database goes next to this file):
#   METERPROXY_ADMIN_TOKEN=change-me-now meterproxy serve --config rules/meterproxy.example.yml
# Or copy it: relative paths are relative to the copy's directory, so adjust `rules`.
#
# Relative paths are relative to this file's directory. `${{VAR}}` / `${{VAR:-default}}` expand
# from the environment. Durations: 10ms, 5s, 2m, 1h, 90d (or seconds). Sizes: 1MiB, 500KB.
# (Named .yml so that a rules directory, whose *.yaml files are all loaded as rules, never
# picks it up.)
"""

# Where the example deliberately departs from the default, and why (shown in the comment).
EXAMPLE_OVERRIDES: dict[tuple[str, ...], tuple[Any, str]] = {
    ("rules",): ("example.yaml", "the rules beside this file"),
    ("admin", "token"): ("${METERPROXY_ADMIN_TOKEN}", "required; from the environment"),
    ("stripe", "api_key"): ("${STRIPE_API_KEY:-}", "from the environment"),
    ("stripe", "sink"): ("dry_run", "nothing is sent until you choose a Stripe sink "
                                    "and set api_key"),
    ("stripe", "webhook_secret"): ("${STRIPE_WEBHOOK_SECRET:-}", "from the environment"),
}


def _comment(text: str, indent: str, hang: str = "") -> list[str]:
    lines = textwrap.wrap(text, width=max(40, 90 - len(indent) - 2), break_on_hyphens=False,
                          subsequent_indent=hang)
    return [f"{indent}# {line}".rstrip() for line in lines]


def _default_of(node: Schema) -> Any:
    if "default" in node:
        return _humanize(node, node["default"])
    return {} if node.get("type") == "object" else [] if node.get("type") == "array" else None


def _example_lines(all_settings: list[Setting], defs: Mapping[str, Schema]) -> Iterator[str]:
    keys = _example_keys(all_settings)
    by_parent: dict[tuple[str, ...], list[Setting]] = {}
    for s in all_settings:
        by_parent.setdefault(s.path[:-1], []).append(s)

    def block(parent: tuple[str, ...], depth: int) -> Iterator[str]:
        indent = "  " * depth
        for i, s in enumerate(by_parent.get(parent, [])):
            name = s.path[-1]
            if i or not depth:
                yield ""
            yield from _comment(s.description, indent)
            child = _model_of(s.node, defs)
            if child is not None and (*s.path, "*") not in by_parent \
                    and (*s.path, "[]") not in by_parent:
                yield f"{indent}{name}:"
                yield from block(s.path, depth + 1)
                continue
            for sub in ("*", "[]"):
                members = by_parent.get((*s.path, sub), [])
                if members:
                    yield f"{indent}# Each {'entry' if sub == '*' else 'item'} has:"
                    for m in members:
                        req = "required" if m.required else \
                            f"default {inline(_default_of(m.node))}"
                        yield from _comment(f"- {m.path[-1]} ({req}): {m.description}",
                                            indent, hang="  ")
            value: Any
            if s.path in EXAMPLE_OVERRIDES:
                value, why = EXAMPLE_OVERRIDES[s.path]
                default = "none" if s.required else inline(_default_of(s.node))
                yield from _comment(f"Here: {why} (default: {default}).", indent)
            else:
                value = _default_of(s.node)
            if isinstance(value, dict) and not value and s.node.get("examples"):
                yield f"{indent}# For example:"
                for line in yaml_text(_nest(s.path[-1:], s.example, keys)).splitlines():
                    yield f"{indent}#   {line}"
            if isinstance(value, list) and value and all(
                    not isinstance(v, (dict, list)) for v in value):
                yield f"{indent}{name}: {inline(value)}"
            elif isinstance(value, (dict, list)) and value:
                rendered = yaml_text({name: value}).rstrip("\n").splitlines()
                yield from (indent + line for line in rendered)
            else:
                yield f"{indent}{name}: {_scalar(value)}"

    yield from block((), 0)


def _scalar(value: Any) -> str:
    if isinstance(value, dict) and not value:
        return "{}"
    if isinstance(value, list) and not value:
        return "[]"
    text = yaml_text({"v": value}).strip()
    return text.removeprefix("v:").strip()


def example_config() -> str:
    schema = raw_schema()
    lines = [_EXAMPLE_HEAD.format(schema=CONFIG_SCHEMA_REL, regen=REGENERATE).rstrip("\n")]
    lines.extend(_example_lines(settings(schema), schema.get("$defs", {})))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(config_markdown())
