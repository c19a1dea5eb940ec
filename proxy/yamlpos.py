"""YAML loading that remembers where every node came from.

Owns: turning YAML text into plain Python data (dict / list / str / int /
``Decimal`` / bool / None) plus a position index, so that any later validation
(the rules loader, the pydantic config loader) can report ``file:line:col`` for
a key path such as ``("rules", 3, "usage", 0, "meter")``.

Invariants:
- Positions are 1-based (line, col), as editors show them.
- Floats never appear: YAML floats become exact ``Decimal`` from their source
  text (``0.1`` is ``Decimal("0.1")``), so billing numbers stay exact.
- Duplicate mapping keys and syntax errors raise :class:`YamlError` carrying the
  parser's own line/col.
- ``YamlDoc.locate`` never raises: an unknown path falls back to the deepest
  known prefix, and finally to 1:1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.constructor import RoundTripConstructor
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from proxy.errors import MeterproxyError

__all__ = ["KeyPath", "Pos", "YamlDoc", "YamlError", "load_yaml", "load_yaml_file", "type_name"]

KeyPath = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Pos:
    """A 1-based source position."""

    line: int
    col: int


_ORIGIN = Pos(1, 1)


class YamlError(MeterproxyError):
    """The text is not valid YAML (or has a duplicate key). 1-based position."""

    def __init__(self, message: str, line: int, col: int) -> None:
        super().__init__(f"{line}:{col}: {message}")
        self.message = message
        self.line = line
        self.col = col


@dataclass(frozen=True, slots=True)
class YamlDoc:
    """Plain data plus where each key and value was written.

    ``keys[path]`` is the position of the mapping key that ends ``path``;
    ``values[path]`` is the position of the node at ``path`` (for a list item,
    the item itself). The root document is at ``()``.
    """

    data: object
    keys: Mapping[KeyPath, Pos] = field(default_factory=dict)
    values: Mapping[KeyPath, Pos] = field(default_factory=dict)

    def key_pos(self, path: Sequence[str | int]) -> Pos:
        """Position of the key naming ``path`` (or its value, for list items)."""
        p = tuple(path)
        return self.keys.get(p) or self.locate(p)

    def value_pos(self, path: Sequence[str | int]) -> Pos:
        """Position of the value at ``path`` (falls back to the deepest known prefix)."""
        return self.locate(path)

    def locate(self, path: Sequence[str | int]) -> Pos:
        """Best position for ``path``: the node itself, else the deepest existing prefix.

        Meant for mapping validator errors (e.g. pydantic ``loc`` tuples) to source."""
        p = tuple(path)
        while True:
            pos = self.values.get(p)
            if pos is not None:
                return pos
            if not p:
                return _ORIGIN
            p = p[:-1]


class _ExactConstructor(RoundTripConstructor):
    """Round-trip constructor whose floats are exact Decimals of their source text."""

    def construct_yaml_float(self, node: Any) -> Any:
        assert isinstance(node, ScalarNode)
        text = str(node.value).replace("_", "").strip().lower()
        special = {".inf": "Infinity", "+.inf": "Infinity", "-.inf": "-Infinity", ".nan": "NaN"}
        try:
            return Decimal(special.get(text, text))
        except InvalidOperation:
            return super().construct_yaml_float(node)


_ExactConstructor.add_constructor(
    "tag:yaml.org,2002:float", _ExactConstructor.construct_yaml_float
)


def _yaml() -> YAML:
    y = YAML(typ="rt")
    y.Constructor = _ExactConstructor
    y.allow_duplicate_keys = False
    return y


def _pos(lc: tuple[int, int] | None) -> Pos | None:
    return None if lc is None else Pos(lc[0] + 1, lc[1] + 1)


def _plain(node: object, path: KeyPath, keys: dict[KeyPath, Pos],
           values: dict[KeyPath, Pos]) -> object:
    """Convert ruamel's round-trip node to plain data, recording positions."""
    if isinstance(node, CommentedMap):
        out: dict[object, object] = {}
        for k, v in node.items():
            key: object = _plain_scalar(k)
            child = (*path, key if isinstance(key, (str, int)) else str(key))
            kp = _pos(node.lc.key(k))
            vp = _pos(node.lc.value(k))
            if kp is not None:
                keys[child] = kp
            values[child] = vp or kp or values.get(path, _ORIGIN)
            out[key] = _plain(v, child, keys, values)
        return out
    if isinstance(node, CommentedSeq):
        items: list[object] = []
        for i, v in enumerate(node):
            child = (*path, i)
            ip = _pos(node.lc.item(i))
            values[child] = ip or values.get(path, _ORIGIN)
            items.append(_plain(v, child, keys, values))
        return items
    return _plain_scalar(node)


def _plain_scalar(v: object) -> object:
    """Strip ruamel's scalar subclasses (ScalarInt, ScalarBoolean, ...) to builtins."""
    if isinstance(v, bool) or v is None or isinstance(v, Decimal):
        return v
    if isinstance(v, int):
        return bool(v) if type(v).__name__ == "ScalarBoolean" else int(v)
    if isinstance(v, float):
        return Decimal(repr(float(v)))
    if isinstance(v, str):
        return str(v)
    return v


def load_yaml(text: str) -> YamlDoc:
    """Parse one YAML document. Empty text gives ``YamlDoc(data=None)``.

    Raises :class:`YamlError` with the parser's 1-based line/col on bad syntax."""
    try:
        node = _yaml().load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        problem = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem:
            problem = f"{exc.context}: {exc.problem}"
        raise YamlError(f"YAML syntax error: {' '.join(problem.split())}", line, col) from exc
    except YAMLError as exc:
        raise YamlError(f"YAML error: {exc}", 1, 1) from exc
    except TypeError as exc:       # ruamel cannot build a mapping whose key is a map or list
        line, col = _complex_key(text)
        raise YamlError("YAML error: a mapping or a list cannot be a key", line, col) from exc
    keys: dict[KeyPath, Pos] = {}
    values: dict[KeyPath, Pos] = {(): _ORIGIN}
    if isinstance(node, (CommentedMap, CommentedSeq)):
        values[()] = Pos(node.lc.line + 1, node.lc.col + 1)
    data = _plain(node, (), keys, values)
    return YamlDoc(data=data, keys=keys, values=values)


def _complex_key(text: str) -> tuple[int, int]:
    """1-based position of the first mapping key that is itself a mapping or a list."""
    todo: list[Node] = [_yaml().compose(text)]
    while todo:
        node = todo.pop()
        if isinstance(node, MappingNode):
            for k, v in node.value:
                if isinstance(k, (MappingNode, SequenceNode)):
                    return k.start_mark.line + 1, k.start_mark.column + 1
                todo += [v, k]
        elif isinstance(node, SequenceNode):
            todo += reversed(node.value)
    return 1, 1


def load_yaml_file(path: Path) -> YamlDoc:
    """Read and parse ``path`` (UTF-8). OSError propagates to the caller."""
    return load_yaml(path.read_text(encoding="utf-8"))


def type_name(v: object) -> str:
    """The YAML/JSON name of a parsed value's type, for error messages."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, Decimal)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, (list, tuple)):
        return "list"
    if isinstance(v, Mapping):
        return "mapping"
    return type(v).__name__
