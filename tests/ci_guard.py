"""No silent skips under CI (a pytest plugin, loaded by tests/conftest.py).

``require_tool(name, hint)`` returns the path of an external tool a test needs; when it is
missing the test is skipped locally but FAILS under ``CI=true``, with a message naming the
tool and how to install it. ``skip_or_fail(reason)`` does the same for any other reason a
test cannot run. As a safety net, every skip that still happens under ``CI=true`` (however
it was raised) is reported as a failure, so CI can never be green with a test not run.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.browser import find_chromium


def in_ci() -> bool:
    """True under CI (``CI=true``, as GitHub Actions, GitLab and .ci/run set it)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> NoReturn:
    """Skip locally; fail under CI=true (a skipped test is a test that did not run)."""
    if in_ci():
        pytest.fail(f"CI=true and this test cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def require_tool(name: str, hint: str) -> str:
    """The path of an external tool a test needs (chromium, hadolint, or any executable)."""
    if name == "chromium":
        path = find_chromium()
    elif name == "hadolint":
        local = Path(sys.executable).parent / "hadolint"
        path = str(local) if local.exists() else shutil.which("hadolint")
    else:
        path = shutil.which(name)
    if path is None:
        skip_or_fail(f"{name} is not installed: {hint}")
    return str(path)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Under CI=true any skip, however it was raised, is reported as a failure."""
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and in_ci() and not hasattr(rep, "wasxfail"):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"CI=true forbids skipped tests: {reason}"
