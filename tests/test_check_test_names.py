"""scripts/check_test_names.py: test modules mirror the package, with tests/layout.toml as the
allowlist (each entry with its reason, none stale)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "check_test_names.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_test_names", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ctn = _load()


def _tree(tmp: Path, files: dict[str, str], layout: str = "") -> Path:
    for name, text in {**files, "tests/layout.toml": layout}.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(text)
    return tmp


LOGIC = "def f() -> int:\n    return 1\n"


def test_the_repository_passes() -> None:
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                         check=False)
    assert (run.returncode, run.stderr) == (0, "")


def test_names_for_a_module_and_a_package() -> None:
    assert ctn.test_names(Path("proxy/units.py")) == {"test_units.py"}
    assert ctn.test_names(Path("proxy/rules/sse.py")) == {"test_sse.py", "test_rules_sse.py",
                                                          "rules/test_sse.py"}
    assert "store/test_postgres_pool.py" in ctn.test_names(Path("proxy/store/postgres/pool.py"))
    assert ctn.test_names(Path("proxy/store/__init__.py")) == {"test_store.py"}
    assert ctn.test_names(Path("proxy/__init__.py")) == set()


def test_a_mirrored_tree_passes(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"proxy/__init__.py": "", "proxy/units.py": LOGIC,
                            "proxy/rules/__init__.py": "", "proxy/rules/sse.py": LOGIC,
                            "proxy/consts.py": "X = 1\n",          # no logic: needs no test
                            "tests/test_units.py": "", "tests/test_rules_sse.py": ""})
    assert ctn.check(root, root / "tests/layout.toml") == []


def test_every_kind_of_problem_is_reported(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "proxy/__init__.py": "", "proxy/units.py": LOGIC, "proxy/alerts.py": LOGIC,
        "proxy/pricing.py": LOGIC, "proxy/gone_logic.py": "X = 1\n",
        "tests/test_units.py": "", "tests/test_chaos.py": "", "tests/test_misc.py": "",
        "tests/test_pricing.py": ""}, layout='''
[tests]
"test_chaos.py" = "acceptance"
"test_units.py" = "named for a module anyway"
"test_removed.py" = "a file that went away"
[modules]
"proxy/pricing.py" = { by = ["test_pricing.py"], why = "has its own test now" }
"proxy/moved.py" = { by = ["test_units.py"], why = "moved elsewhere" }
"proxy/gone_logic.py" = { by = ["test_units.py"], why = "no logic any more" }
''')
    assert ctn.check(root, root / "tests/layout.toml") == [
        "tests/test_misc.py is named for no module of proxy/: rename it to test_<module>.py or"
        " test_<package>_<module>.py, or list it under [tests] in tests/layout.toml with the"
        " reason",
        "tests/layout.toml [tests] lists test_removed.py, which does not exist: remove the"
        " entry",
        "tests/layout.toml [tests] lists test_units.py, which is named for a module: remove"
        " the entry",
        "proxy/alerts.py has logic but no test module (test_alerts.py) and no entry under"
        " [modules] in tests/layout.toml",
        "tests/layout.toml [modules] lists proxy/gone_logic.py, which has no logic: remove the"
        " entry",
        "tests/layout.toml [modules] lists proxy/moved.py, which does not exist: remove or"
        " rename the entry",
        "tests/layout.toml [modules] lists proxy/pricing.py, which has test_pricing.py: remove"
        " the entry",
    ]


def test_a_module_entry_needs_existing_tests_and_a_reason(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"proxy/__init__.py": "", "proxy/a.py": LOGIC, "proxy/b.py": LOGIC},
                 layout='''
[modules]
"proxy/a.py" = { by = ["test_nowhere.py"], why = "covered elsewhere" }
"proxy/b.py" = { by = [], why = "" }
''')
    assert ctn.check(root, root / "tests/layout.toml") == [
        "tests/layout.toml [modules] proxy/a.py: by names test_nowhere.py, which does not exist",
        "tests/layout.toml [modules] proxy/b.py: needs by = [test modules] and why = reason",
    ]
    run = subprocess.run([sys.executable, str(SCRIPT), "--root", str(root)],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.splitlines()[0].startswith("tests/layout.toml [modules] proxy/a.py")
