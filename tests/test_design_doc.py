"""docs/DESIGN.md's module list follows the code: every module of ``proxy/`` is named in the
"Modules by layer" section, every module it names exists, and each sits in the layer
``tests/test_layers.py`` gives it."""

from __future__ import annotations

import re
from pathlib import Path

from tests.test_layers import LAYERS, layer_of, module_name

ROOT = Path(__file__).resolve().parent.parent
PROXY = ROOT / "proxy"
DESIGN = ROOT / "docs" / "DESIGN.md"
HEADER = re.compile(r"^layer (\d) (\w+):$")
ENTRY = re.compile(r"^  (\S+(?:\.py|/))(?:\s|$)")


def listed(text: str) -> dict[str, str]:
    """The section's code block: path (relative to proxy/) -> the layer it is listed under."""
    section = text.split("\n## Modules by layer\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```\n", 1)[1].split("```", 1)[0]
    out: dict[str, str] = {}
    layer = ""
    for line in block.splitlines():
        if m := HEADER.match(line):
            assert LAYERS[int(m[1])] == m[2], f"DESIGN.md: {line!r} (tests/test_layers.py: {LAYERS})"
            layer = m[2]
        elif m := ENTRY.match(line):
            assert layer, f"DESIGN.md: {line!r} is under no layer"
            assert m[1] not in out, f"DESIGN.md names {m[1]} twice"
            out[m[1]] = layer
    return out


def doc_name(path: Path) -> str:
    """How DESIGN.md names a module: its path under proxy/, a package as ``name/``."""
    rel = path.relative_to(PROXY).as_posix()
    if rel.endswith("/__init__.py"):
        return rel.removesuffix("__init__.py")
    return rel


def source() -> dict[str, Path]:
    return {doc_name(p): p for p in sorted(PROXY.rglob("*.py"))}


def test_every_module_is_named() -> None:
    assert sorted(set(source()) - set(listed(DESIGN.read_text()))) == []


def test_every_named_module_exists() -> None:
    assert sorted(set(listed(DESIGN.read_text())) - set(source())) == []


def test_each_module_is_listed_under_its_layer() -> None:
    named = listed(DESIGN.read_text())
    wrong = {name: (layer, layer_of(module_name(path)))
             for name, path in source().items()
             if (layer := named.get(name)) is not None and layer != layer_of(module_name(path))}
    assert wrong == {}, "DESIGN.md layer != tests/test_layers.py layer"


def test_the_parser_reads_the_section() -> None:
    text = ("# x\n\n## Modules by layer\n\n```\nlayer 0 base:\n  errors.py    the tree\n"
            "               errors.py continued prose is not an entry\n"
            "layer 2 store:\n  store/       marker\n  store/db.py  Store\n```\n\n## Next\n"
            "  other.py  not in the section\n")
    assert listed(text) == {"errors.py": "base", "store/": "store", "store/db.py": "store"}
