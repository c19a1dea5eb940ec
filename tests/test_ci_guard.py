"""The no-silent-skips guard (tests/ci_guard.py) itself: a missing tool or any skip is a
failure under CI=true and a skip locally."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ci_guard import require_tool, skip_or_fail

ROOT = Path(__file__).resolve().parent.parent


def test_missing_tool_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception) as err:
        require_tool("no-such-tool-14", "apt-get install no-such-tool-14")
    assert str(err.value) == ("CI=true and this test cannot run: no-such-tool-14 is not "
                              "installed: apt-get install no-such-tool-14")


def test_missing_tool_skips_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception) as err:
        require_tool("no-such-tool-14", "hint")
    assert str(err.value) == "no-such-tool-14 is not installed: hint"
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        skip_or_fail("why")


def test_present_tool_is_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    assert Path(require_tool("sh", "")).name == "sh"
    assert Path(require_tool("hadolint", "")).name == "hadolint"


@pytest.mark.parametrize(("ci", "outcome"), [("true", "1 failed"), ("", "1 skipped")])
def test_any_skip_fails_the_run_under_ci(tmp_path: Path, ci: str, outcome: str) -> None:
    (tmp_path / "test_inner.py").write_text(
        "import pytest\n\ndef test_skips():\n    pytest.skip('no browser here')\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = ci
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-p", "tests.ci_guard", "--rootdir", str(tmp_path),
                          str(tmp_path / "test_inner.py")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert outcome in out.stdout, out.stdout + out.stderr
    if ci:
        assert out.returncode == 1
        assert "CI=true forbids skipped tests: Skipped: no browser here" in out.stdout
    else:
        assert out.returncode == 0
