"""The repository's documents point only at files that are in it, and so do the docstrings
and comments of ``proxy/``: every document and section they cite exists."""

from __future__ import annotations

import ast
import io
import re
import subprocess
import tokenize
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


# ---- what the code's docstrings and comments cite -----------------------------------------

CITED_FILE = re.compile(r"(?<![\w./-])((?:docs|deploy|rules|bench|scripts|tests|proxy)/[A-Za-z0-9_./-]*"
                        r"[A-Za-z0-9_-]\.(?:md|json|ya?ml|py|html|toml|sh))\b")
# a section of a document: README "Metrics", docs/api.md "Errors", docs/x.md, "Y", docs/x.md ("Y")
CITED_SECTION = re.compile(r"\b(README|docs/[A-Za-z0-9_./-]+\.md),? \(?[\"“]([^\"”]+)[\"”]")
README_MENTION = re.compile(r"\bREADME\b(?!\.md)")


def prose_of(source: str) -> list[tuple[int, str]]:
    """The docstrings (module, class, function) and comments of a module: (line, text)."""
    out: list[tuple[int, str]] = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                out.append((body[0].lineno, body[0].value.value))
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out.append((tok.start[0], tok.string))
    return out


def headings(path: Path) -> list[str]:
    return [line.lstrip("#").strip().lower() for line in path.read_text().splitlines()
            if line.startswith("#")]


def citation_problems(where: str, text: str) -> list[str]:
    """Every file ``text`` cites must exist; every section it cites (README "Metrics",
    docs/api.md "Errors") must be a heading of that document (case-insensitive, part of the
    heading); the README is only cited by section (never "see the README")."""
    flat = " ".join(text.split())
    problems = []
    for target in CITED_FILE.findall(flat):
        if "*" not in target and "<" not in target and not (ROOT / target).exists():
            problems.append(f"{where}: cites {target}, which is not in the repository")
    for doc, section in CITED_SECTION.findall(flat):
        path = ROOT / ("README.md" if doc == "README" else doc)
        if not path.is_file():
            problems.append(f"{where}: cites {doc}, which is not in the repository")
        elif not any(section.lower() in h for h in headings(path)):
            problems.append(f"{where}: cites {doc} \"{section}\", which is no heading of it")
    cited = {m.start() for m in re.finditer(r"\bREADME,? \(?[\"“]", flat)}
    for m in README_MENTION.finditer(flat):
        if m.start() not in cited:
            problems.append(f"{where}: mentions the README without the section (README \"Heading\")")
    return problems


def test_every_document_a_docstring_or_comment_cites_exists() -> None:
    problems = []
    for path in sorted((ROOT / "proxy").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for line, text in prose_of(path.read_text()):
            problems += citation_problems(f"{rel}:{line}", text)
    assert problems == []


def test_the_citation_check_finds_what_is_missing() -> None:
    assert citation_problems("x", 'see README "Metrics" and docs/api.md "Errors"') == []
    assert citation_problems("x", 'rules (docs/stripe-notes.md, "Meters and\n   summaries")') == []
    assert citation_problems("x", "see docs/PERFORMANCE.md and proxy/store/db.py") == []
    assert citation_problems("x", "docs/schema/*.json") == []
    assert citation_problems("x", "see docs/nothing.md") == [
        "x: cites docs/nothing.md, which is not in the repository"]
    assert citation_problems("x", 'the README "No such heading"') == [
        'x: cites README "No such heading", which is no heading of it']
    assert citation_problems("x", "documented in the README") == [
        'x: mentions the README without the section (README "Heading")']
    assert citation_problems("x", 'docs/api.md ("Nope")') == [
        'x: cites docs/api.md "Nope", which is no heading of it']
    assert prose_of('"""doc docs/a.md"""\nx = "docs/b.md"  # c docs/c.md\n') == [
        (1, "doc docs/a.md"), (2, "# c docs/c.md")]
