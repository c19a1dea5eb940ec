"""JSON Schemas of the config file and of rules files, and ``meterproxy schema``.

Owns: ``meterproxy schema config|rules`` (print a JSON Schema), ``meterproxy schema config
--markdown`` (the configuration reference) and ``meterproxy schema write`` (regenerate every
generated document in the repository: the reference, both schemas, the example config).

Invariants:
- The config schema is the pydantic model's own schema (:mod:`proxy.config`), rewritten only
  so that every non-string value may also be a ``${VAR}`` reference (expanded at load).
- The rules schema is built from the loader's key lists (:mod:`proxy.rules.loader`), so a key
  the loader accepts and this schema does not know fails the drift test. It checks
  structure (keys, types, enums, number ranges, the shapes of quantities and count_when);
  what needs more than one value (meter references, duplicate names, path templates,
  unreachable rules, tier order) is ``meterproxy rules check``'s job.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from types import ModuleType

# Imported lazily (the CLI builds its parser on every command; these pull in pydantic and
# the rules loader only when a schema is asked for).

Schema = dict[str, Any]
EXAMPLE_CONFIG = "rules/meterproxy.example.yml"

DRAFT = "https://json-schema.org/draft/2020-12/schema"
# A string holding a ${VAR} reference: any value may come from the environment.
ENV_REF: Schema = {"type": "string", "pattern": r"\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}",
                   "description": "${VAR} or ${VAR:-default}, expanded from the environment"}

_DATA = ("default", "examples", "const", "enum")   # values, not schemas

# (path inside the repository, what it holds)
GENERATED = {
    "docs/configuration.md": "the configuration reference",
    "docs/schema/config.schema.json": "JSON Schema of the config file",
    "docs/schema/rules.schema.json": "JSON Schema of rules files",
    EXAMPLE_CONFIG: "the commented example config",
}


# ------------------------------------------------------------------ config


def _untitled(node: Any) -> Any:
    if isinstance(node, list):
        return [_untitled(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: v if k in _DATA else _untitled(v) for k, v in node.items() if k != "title"}
    for key in ("properties", "$defs"):      # maps of names: a setting may be called "title"
        if key in node:
            out[key] = {k: _untitled(v) for k, v in node[key].items()}
    return out


def _env_ok(node: Any) -> Any:
    """Rewrite a schema so that every non-string scalar may also be a ``${VAR}`` string
    (once per value: a duration's own alternatives are not wrapped again)."""
    if isinstance(node, list):
        return [_env_ok(n) for n in node]
    if not isinstance(node, dict):
        return node
    if node.get("type") in ("integer", "number", "boolean") or "enum" in node or \
            node.get("x-kind") in ("duration", "size"):
        out = _untitled(node)
        keep = {k: out.pop(k) for k in ("description", "default", "examples", "x-kind")
                if k in out}
        return {"anyOf": [out, ENV_REF], **keep}
    out = {k: v if k in _DATA else _env_ok(v) for k, v in node.items() if k != "title"}
    for key in ("properties", "$defs"):      # maps of names: a setting may be called "title"
        if key in node:
            out[key] = {k: _env_ok(v) for k, v in node[key].items()}
    return out


def _loader() -> ModuleType:
    from proxy.rules import loader

    return loader


def config_schema() -> Schema:
    from proxy import configdoc

    raw = configdoc.raw_schema()
    body = _env_ok(raw)
    return {"$schema": DRAFT,
            "title": "meterproxy config file (meterproxy.yaml)",
            "description": "Generated from proxy/config.py; see docs/configuration.md.", **body}


# ------------------------------------------------------------------ rules


_NONEMPTY: Schema = {"type": "string", "pattern": r"\S"}
_NUMBER: Schema = {"type": "number", "minimum": 0}    # int or exact decimal, >= 0, finite
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_NUMERIC = r"\+?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_SOURCE = (r"^\s*(?:" + _NUMERIC +
           r"|request\.bytes|response\.bytes|duration_ms"
           r"|(?:request|response)\.header\." + _TOKEN +
           r"|request\.query\." + _TOKEN +
           r"|path\..+"
           r"|(?:request|response)\.json\.[^.]+(?:\.[^.]+)*)\s*$")
_DECIMAL: Schema = {"anyOf": [
    {"type": "number", "minimum": 0},
    {"type": "string", "pattern": r"^\s*\+?(?:\d+(?:\.\d{0,12})?|\.\d{1,12})\s*$"}]}
_STATUS_ITEM: Schema = {"anyOf": [
    {"type": "integer", "minimum": 100, "maximum": 599},
    {"type": "string", "pattern": r"^\s*(?:[1-5][xX][xX]|[aA][nN][yY]|0*[1-5]\d\d)\s*$"}]}


def _obj(props: dict[str, Schema], allowed: Sequence[str], what: str, **extra: Any) -> Schema:
    """An object whose keys are exactly the loader's ``allowed`` list (in its order)."""
    # a key the loader accepts and this module does not describe yet: accepted as anything,
    # marked, and refused by the drift test (so regeneration after a merge never fails)
    undescribed: Schema = {"description": f"UNDOCUMENTED {what} key: describe it in "
                                          f"proxy/schema.py"}
    return {"type": "object", "additionalProperties": False,
            "properties": {k: props.get(k, undescribed) for k in allowed}, **extra}


def _meter() -> Schema:
    loader = _loader()
    label_max: dict[str, int] = getattr(loader, "LABEL_MAX", {})

    def label(what: str, text: str) -> Schema:
        s: Schema = {"type": "string", "pattern": r"\S", "description": text}
        if what in label_max:
            s["maxLength"] = label_max[what]
        return s

    props: dict[str, Schema] = {
        "stripe_event_name": {**_NONEMPTY, "description":
                              "The Stripe Billing meter's event_name this meter reports to."},
        "covered_event_name": {"anyOf": [_NONEMPTY, {"type": "null"}], "description":
                               "Optional second Stripe meter (priced at zero) that receives "
                               "the units prepaid credits covered."},
        "description": {"type": ["string", "null"], "description": "What one unit is."},
        "display_name": label("display_name", "Name shown to customers (usage page)."),
        "unit_label": label("unit_label", "Unit shown to customers, e.g. tokens."),
        "price": {"$ref": "#/$defs/price"},
        "price_id": {**_NONEMPTY, "description":
                     "A Stripe Price id; the price is fetched from Stripe and wins."},
    }
    return _obj(props, loader.METER_KEYS, "meter", required=["stripe_event_name"])


def _price() -> Schema:
    from proxy.pricing import OPTION_FIELDS, PRICE_FIELDS, TIER_FIELDS, TRANSFORM_FIELDS

    amount_int: Schema = {"type": "integer", "minimum": 0}
    transform = _obj({"divide_by": {"type": "integer", "minimum": 1},
                      "round": {"enum": ["up", "down"]}},
                     TRANSFORM_FIELDS, "price transform_quantity",
                     required=["divide_by", "round"])
    tier = _obj({"up_to": {"anyOf": [{"type": "integer", "minimum": 1}, {"const": "inf"}]},
                 "unit_amount": amount_int, "unit_amount_decimal": _DECIMAL,
                 "flat_amount": amount_int, "flat_amount_decimal": _DECIMAL},
                TIER_FIELDS, "price tier", required=["up_to"],
                anyOf=[{"required": ["unit_amount"]}, {"required": ["unit_amount_decimal"]},
                       {"required": ["flat_amount"]}, {"required": ["flat_amount_decimal"]}],
                allOf=[{"not": {"required": ["unit_amount", "unit_amount_decimal"]}},
                       {"not": {"required": ["flat_amount", "flat_amount_decimal"]}}])
    per_unit: Schema = {
        "properties": {"billing_scheme": {"const": "per_unit"}},
        "oneOf": [{"required": ["unit_amount"]}, {"required": ["unit_amount_decimal"]}],
        "not": {"anyOf": [{"required": ["tiers"]}, {"required": ["tiers_mode"]}]}}
    tiered: Schema = {
        "properties": {"billing_scheme": {"const": "tiered"}},
        "required": ["billing_scheme", "tiers_mode", "tiers"],
        "not": {"anyOf": [{"required": ["unit_amount"]}, {"required": ["unit_amount_decimal"]},
                          {"required": ["transform_quantity"]}]}}
    return _obj({
        "currency": {"type": "string", "pattern": r"^\s*[A-Za-z]{3}\s*$",
                     "description": "Three-letter ISO currency code, e.g. usd."},
        "billing_scheme": {"enum": ["per_unit", "tiered"], "default": "per_unit"},
        "unit_amount": {**amount_int, "description": "Per-unit price in minor units (cents)."},
        "unit_amount_decimal": {**_DECIMAL, "description":
                                "Per-unit price in minor units, up to 12 decimals."},
        "tiers_mode": {"enum": ["graduated", "volume"]},
        "tiers": {"type": "array", "minItems": 1, "items": tier},
        "transform_quantity": transform,
        "currency_options": {
            "type": "object", "propertyNames": {"pattern": r"^\s*[A-Za-z]{3}\s*$"},
            "additionalProperties": _obj({
                "unit_amount": amount_int, "unit_amount_decimal": _DECIMAL,
                "tiers": {"type": "array", "minItems": 1, "items": tier}},
                OPTION_FIELDS, "price currency option",
                oneOf=[{"required": ["unit_amount"]}, {"required": ["unit_amount_decimal"]},
                       {"required": ["tiers"]}]),
            "description": "The same price in other currencies (Stripe's currency_options): "
                           "currency -> its unit_amount(_decimal), or tiers for a tiered "
                           "price. A customer charged in that currency (its subscription's, "
                           "or set by the admin API) is shown these amounts."},
    }, PRICE_FIELDS, "price", required=["currency"], oneOf=[per_unit, tiered],
        description="Stripe Price fields (amounts in minor units of the currency).")


def _match() -> Schema:
    loader = _loader()
    method = {"type": "string", "pattern": r"^[A-Za-z]+$"}
    glob: Schema = {"anyOf": [{"type": "string"}, {"type": "integer"}]}
    cond: Schema = {"type": "object", "additionalProperties": {
        "anyOf": [{"const": True}, {"type": "string"}, {"type": "integer"}]}}
    return {"anyOf": [{"type": "null"}, _obj({
        "methods": {"anyOf": [method, {"type": "array", "minItems": 1, "items": method}],
                    "description": "HTTP methods; omit to match any."},
        "path": {**_NONEMPTY, "description":
                 "Path template: {param} is one segment, * within a segment, ** any segments."},
        "params": {"type": "object", "additionalProperties": glob,
                   "description": "Globs on the path's {params}."},
        "headers": {**cond, "description": "Header globs (true: present)."},
        "query": {**cond, "description": "Query parameter globs (true: present)."},
    }, loader.MATCH_KEYS, "match")]}


def _usage() -> Schema:
    from proxy.rules.model import PRESETS

    loader = _loader()
    transform = _obj({"divide_by": {"type": "integer", "minimum": 1},
                      "round": {"enum": ["up", "down"]}},
                     loader.TRANSFORM_KEYS, "transform", required=["divide_by", "round"])
    return _obj({
        "meter": {**_NONEMPTY, "description": "A meter defined under meters:."},
        "quantity": {"anyOf": [_NUMBER, {"type": "string", "pattern": _SOURCE}],
                     "description": "A number, or a source: request.header.<name>, "
                                    "response.header.<name>, request.query.<name>, "
                                    "path.<param>, request.json.<path>, response.json.<path>, "
                                    "request.bytes, response.bytes, duration_ms."},
        "preset": {"enum": list(PRESETS), "description": "A named LLM usage shape."},
        "credits": {**_NUMBER, "description": "Credits per unit."},
        "estimate": {**_NUMBER, "description":
                     "Units reserved at admission when the quantity is read afterwards."},
        "transform": transform,
        "on_unreadable": {**_NUMBER, "description":
                          "Quantity billed when the source cannot be read; unset: the "
                          "reservation (estimate, else credits.default_estimate)."},
        "reserve_from": {"type": "string",
                         "pattern": r"^request\.(json\.[^.]+(\.[^.]+)*|header\.[^.]+|query\.[^.]+)$",
                         "description": "A request value bounding a quantity read after the "
                                        "response (e.g. request.json.max_tokens): credits "
                                        "reserved at admission are never below it "
                                        "(docs/credits.md)."},
    }, loader.USAGE_KEYS, "usage", required=["meter"],
        oneOf=[{"required": ["quantity"]}, {"required": ["preset"]}])


def _rule() -> Schema:
    loader = _loader()
    return _obj({
        "name": {**_NONEMPTY, "description": "Unique rule name (metrics, audit, explain)."},
        "match": {"$ref": "#/$defs/match"},
        "auth": {"enum": ["required", "none"], "default": "required"},
        "usage": {"anyOf": [{"type": "null"},
                            {"type": "array", "items": {"$ref": "#/$defs/usage"}}]},
        "count_when": {"$ref": "#/$defs/count_when"},
        "description": {"type": ["string", "null"]},
    }, loader.RULE_KEYS, "rule", required=["name"],
        # auth: none has no customer to bill: no usage
        **{"if": {"properties": {"auth": {"const": "none"}}, "required": ["auth"]},
           "then": {"properties": {"usage": {"anyOf": [{"type": "null"}, {"maxItems": 0}]}}}})


def rules_schema() -> Schema:
    loader = _loader()
    top = _obj({
        "version": {"const": 1, "description": "The rules format version: 1."},
        "meters": {"type": "object", "additionalProperties": {"$ref": "#/$defs/meter"}},
        "rules": {"anyOf": [{"type": "null"}, {
            "type": "array", "items": {"$ref": "#/$defs/rule"},
            "description": "First match wins."}]},
        "count_when": {"$ref": "#/$defs/count_when"},
        "routing": _obj({
            "case": {"enum": list(loader.ROUTING_VALUES["case"]), "default": "sensitive",
                     "description": "insensitive: path templates match without case, as "
                                    "Express (by default), ASP.NET and other "
                                    "case-insensitive upstream routers route "
                                    "(docs/paths.md)."},
            "trailing_slash": {"enum": list(loader.ROUTING_VALUES["trailing_slash"]),
                               "default": "strict",
                               "description": "ignore: a request path's trailing slash is "
                                              "taken off before matching, as Express's "
                                              "default routing does (docs/paths.md)."},
        }, loader.ROUTING_KEYS, "routing",
            description="How the upstream routes paths; the rules match the same way. One "
                        "value per key across all rules files."),
    }, loader.TOP_KEYS, "the rules file", required=["version"])
    return {"$schema": DRAFT,
            "title": "meterproxy rules file",
            "description": "Generated from proxy/rules/loader.py by proxy/schema.py. "
                           "Structure only: `meterproxy rules check` also checks meter "
                           "references, path templates, duplicates and unreachable rules.",
            **top,
            "$defs": {
                "meter": _meter(), "price": _price(), "match": _match(), "usage": _usage(),
                "rule": _rule(),
                "count_when": {"type": "array", "minItems": 1, "items": _STATUS_ITEM,
                               "description": "Statuses that make a request billable: "
                                              "2xx, 404, any."},
            }}


# ------------------------------------------------------------------ files and the command


def dumps(schema: Schema) -> str:
    return orjson.dumps(schema, option=orjson.OPT_INDENT_2).decode() + "\n"


def render(rel: str) -> str:
    """The current text of one generated file (a key of :data:`GENERATED`)."""
    from proxy import configdoc

    if rel == "docs/configuration.md":
        return configdoc.config_markdown()
    if rel == "docs/schema/config.schema.json":
        return dumps(config_schema())
    if rel == "docs/schema/rules.schema.json":
        return dumps(rules_schema())
    if rel == EXAMPLE_CONFIG:
        return configdoc.example_config()
    raise KeyError(rel)


def write_all(root: Path) -> list[Path]:
    """Regenerate every generated file under ``root``; return those that changed."""
    changed = []
    for rel in GENERATED:
        path = root / rel
        text = render(rel)
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            changed.append(path)
    return changed


def _default_root() -> Path:
    """The repository this package lives in (editable install), else the working directory."""
    repo = Path(__file__).resolve().parent.parent
    return repo if (repo / "pyproject.toml").exists() and (repo / "docs").is_dir() else Path()


def cmd_schema(args: argparse.Namespace) -> int:
    if args.what == "write":
        root = Path(args.root) if args.root else _default_root()
        for path in write_all(root):
            print(f"wrote {path}")
        return 0
    if args.markdown:
        if args.what != "config":
            sys.stderr.write("meterproxy: --markdown is only for: schema config\n")
            return 2
        from proxy import configdoc

        sys.stdout.write(configdoc.config_markdown())
        return 0
    sys.stdout.write(dumps(config_schema() if args.what == "config" else rules_schema()))
    return 0


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``meterproxy schema`` on the CLI's subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "schema", help="print the JSON Schema of the config file or of rules files; "
                       "regenerate the docs",
        description="config: JSON Schema of meterproxy.yaml (--markdown: the configuration "
                    "reference instead). rules: JSON Schema of rules files. write: regenerate "
                    + ", ".join(GENERATED) + " (run after changing proxy/config.py or the "
                    "rules format).")
    p.add_argument("what", choices=["config", "rules", "write"], help="what to print or write")
    p.add_argument("--markdown", action="store_true",
                   help="config: print the configuration reference (docs/configuration.md) "
                        "instead of the JSON Schema")
    p.add_argument("--root", default=None,
                   help="write: the repository to write into (default: the repository this "
                        "package is installed from, else the working directory)")
    p.set_defaults(fn=cmd_schema)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.schema")
    add_parser(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["schema", *(sys.argv[1:] if argv is None else argv)])
    rc: int = args.fn(args)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
