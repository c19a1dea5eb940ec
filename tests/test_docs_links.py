"""The repository's documents point only at files that are in it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTSIDE = re.compile(r"\b(SPEC\.md|stripe-contract\.md|PERF\.md|FLEET\.md|STYLE\.md)\b|/work/shared|SPEC section")
LINK = re.compile(r"\]\((?!https?://|#|mailto:)([^)#\s]+)(?:#[^)]*)?\)")
PATHLIKE = re.compile(r"`((?:docs|deploy|rules|bench|scripts|tests|proxy)/[A-Za-z0-9_./-]+\.[a-z]+)`")


def tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True)
    return [n for n in out.stdout.splitlines() if (ROOT / n).is_file()]


def test_no_file_points_outside_the_repository() -> None:
    offenders = []
    for name in tracked():
        if not name.endswith((".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".html", ".json")):
            continue
        if name == "tests/test_docs_links.py":
            continue
        for i, line in enumerate((ROOT / name).read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{name}:{i}: {line.strip()}")
    assert offenders == []


def test_every_markdown_link_and_named_file_exists() -> None:
    missing = []
    for name in tracked():
        if not name.endswith(".md"):
            continue
        here = (ROOT / name).parent
        text = (ROOT / name).read_text()
        for target in LINK.findall(text):
            if not (here / target).exists():
                missing.append(f"{name}: link {target}")
        for target in PATHLIKE.findall(text):
            if "*" in target or "<" in target:
                continue
            if not (ROOT / target).exists() and not (here / target).exists():
                missing.append(f"{name}: names {target}")
    assert missing == []
