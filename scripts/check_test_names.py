#!/usr/bin/env python3
"""Tests mirror the package: every test module is named for a source module, and every source
module with logic has a test module named for it, or tests/layout.toml says why not.

Names: ``tests/test_<module>.py``, ``tests/test_<package>_<module>.py`` or
``tests/<package>/test_<module>.py`` tests ``proxy/[<package>/]<module>.py``; a package's
name stands for its ``__init__.py``. A module "has logic" when it defines a function or a
class. The check also fails on an allowlist entry that is no longer needed or names a file
that does not exist, so the list follows the code.

Usage: scripts/check_test_names.py [--root DIR] [--layout FILE]   (exit 0: ok, 1: problems)
"""

from __future__ import annotations

import argparse
import ast
import sys
import tomllib
from pathlib import Path
from typing import Any


def has_logic(path: Path) -> bool:
    tree = ast.parse(path.read_text("utf-8"), str(path))
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
               for n in ast.walk(tree))


def test_names(rel: Path) -> set[str]:
    """The test module names that test ``rel`` (a path under the package root)."""
    parts = list(rel.with_suffix("").parts[1:])       # without the top package
    if parts and parts[-1] == "__init__":
        parts.pop()
    if not parts:
        return set()
    names = {parts[-1], "_".join(parts)}
    if len(parts) >= 2:
        names.add("_".join(parts[-2:]))
    out = {f"test_{n}.py" for n in names}
    if len(parts) >= 2:       # a test package named for the source package: tests/fleet/test_x.py
        out |= {f"{parts[0]}/test_{parts[-1]}.py", f"{parts[0]}/test_{'_'.join(parts[1:])}.py"}
    return out


def package_tests(rel: Path, packages: dict[str, list[str]]) -> set[str]:
    """Test modules named for ``rel`` inside the test packages ``[packages]`` maps to its
    source directory (e.g. tests/store_pg/ tests proxy/store/postgres/)."""
    parent = rel.parent.as_posix()
    return {f"{d}/test_{rel.stem}.py" for d, dirs in packages.items() if parent in dirs}


def check(root: Path, layout: Path, package: str = "proxy") -> list[str]:
    data: dict[str, Any] = tomllib.loads(layout.read_text("utf-8"))
    packages: dict[str, list[str]] = data.get("packages", {})
    listed_tests: dict[str, str] = data.get("tests", {})
    listed_modules: dict[str, Any] = data.get("modules", {})
    tests = {p.relative_to(root / "tests").as_posix()
             for p in (root / "tests").rglob("test_*.py")
             if "vendor" not in p.parts and (p.parent == root / "tests"
                                             or (p.parent / "__init__.py").is_file())}
    modules = {p.relative_to(root).as_posix(): p for p in sorted((root / package).rglob("*.py"))}
    named_for: dict[str, set[str]] = {
        m: (test_names(Path(m)) | package_tests(Path(m), packages)) & tests for m in modules}
    mapped = set().union(*named_for.values()) if named_for else set()
    problems: list[str] = []
    where = layout.relative_to(root) if layout.is_relative_to(root) else layout

    for t in sorted(tests - mapped - set(listed_tests)):
        problems.append(f"tests/{t} is named for no module of {package}/: rename it to "
                        f"test_<module>.py or test_<package>_<module>.py, or list it under "
                        f"[tests] in {where} with the reason")
    for t in sorted(listed_tests):
        if t not in tests:
            problems.append(f"{where} [tests] lists {t}, which does not exist: remove the entry")
        elif t in mapped:
            problems.append(f"{where} [tests] lists {t}, which is named for a module: remove "
                            "the entry")
        elif not str(listed_tests[t]).strip():
            problems.append(f"{where} [tests] {t}: the reason is empty")

    for m, path in modules.items():
        if has_logic(path) and not named_for[m] and m not in listed_modules:
            problems.append(f"{m} has logic but no test module ({' or '.join(sorted(test_names(Path(m))))}) "
                            f"and no entry under [modules] in {where}")
    for m, entry in sorted(listed_modules.items()):
        if m not in modules:
            problems.append(f"{where} [modules] lists {m}, which does not exist: remove or "
                            "rename the entry")
            continue
        if named_for[m]:
            problems.append(f"{where} [modules] lists {m}, which has "
                            f"{', '.join(sorted(named_for[m]))}: remove the entry")
        elif not has_logic(modules[m]):
            problems.append(f"{where} [modules] lists {m}, which has no logic: remove the entry")
        if not isinstance(entry, dict) or not str(entry.get("why", "")).strip() \
                or not entry.get("by"):
            problems.append(f"{where} [modules] {m}: needs by = [test modules] and why = reason")
            continue
        for t in entry["by"]:
            # a top-level test module, or one in a test package (e.g. store/test_x.py)
            if t not in tests:
                problems.append(f"{where} [modules] {m}: by names {t}, which does not exist")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--layout", type=Path, help="default: ROOT/tests/layout.toml")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    problems = check(root, (args.layout or root / "tests" / "layout.toml").resolve())
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        return 1
    print("test names: every test module maps to a source module or a stated reason, and "
          "every source module with logic to a test module or a stated reason")
    return 0


if __name__ == "__main__":
    sys.exit(main())
