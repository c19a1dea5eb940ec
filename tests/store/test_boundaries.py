"""Where SQL may live, and which way the store's imports point.

1. No module outside ``proxy/store/`` contains SQL: no string (other than a docstring) that
   starts with an SQL statement keyword, and no ``.execute(`` / ``.executemany(`` /
   ``.executescript(`` call. Every table has one owner in ``proxy.store`` (see
   ``proxy.store.protocols``); callers call its verbs.
2. ``proxy.store`` sits below the services: it imports only itself and pure lower modules,
   never the credit service, the flusher, webhooks, the admin API or the composition root.
   The pure credit ledger (``proxy.credits.ledger``) imports nothing from ``proxy``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PROXY = Path(__file__).resolve().parents[2] / "proxy"
SQL_START = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|REPLACE|CREATE|ALTER|DROP|PRAGMA|BEGIN"
                       r"|COMMIT|ROLLBACK|WITH)\s+\S")   # a lone word ("DELETE" the HTTP method) is not SQL
EXECUTE = {"execute", "executemany", "executescript"}
# module (relative to proxy/) -> why it may hold SQL text. Keep this empty unless a reason
# is written here.
ALLOWED: dict[str, str] = {}
# what proxy.store may import from the rest of proxy: pure, lower-layer modules only
STORE_MAY_IMPORT = {"proxy.credits.ledger", "proxy.periods", "proxy.pricing", "proxy.transform",
                    "proxy.units", "proxy.metrics", "proxy.errors", "proxy.timeutil",
                    # the lease-sizing maths and the monotonic clock (pure), and the task
                    # helper the fleet owners' background loops are spawned with
                    "proxy.fleet.sizing", "proxy.fleet.clock", "proxy.tasks",
                    # the one retry-delay formula (a leaf): PgPool.retrying's pauses
                    "proxy.backoff"}


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def sql_in(source: str) -> list[str]:
    """Each SQL string or execute call in a module's source, as ``line: text``."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docs and SQL_START.match(node.value):
            found.append(f"{node.lineno}: {node.value[:60]!r}")
        elif isinstance(node, ast.JoinedStr) and node.values \
                and isinstance(node.values[0], ast.Constant) \
                and SQL_START.match(str(node.values[0].value)):
            found.append(f"{node.lineno}: f-string {str(node.values[0].value)[:60]!r}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in EXECUTE:
            found.append(f"{node.lineno}: .{node.func.attr}(...)")
    return found


def _modules(under: Path) -> list[Path]:
    return sorted(p for p in under.rglob("*.py"))


def test_the_detector_finds_sql() -> None:
    assert sql_in('x = "SELECT 1"') and sql_in('c.execute(q)') and sql_in('f"UPDATE t {x}"')
    assert sql_in('y = " INSERT INTO t VALUES (1)"')
    assert not sql_in('"""SELECT in a docstring is prose."""\nx = "Selected"')
    assert not sql_in('METHODS = ("GET", "DELETE")')


def test_no_sql_outside_the_store() -> None:
    offenders = {}
    for path in _modules(PROXY):
        rel = path.relative_to(PROXY).as_posix()
        if rel.startswith("store/") or rel in ALLOWED:
            continue
        found = sql_in(path.read_text())
        if found:
            offenders[rel] = found
    assert offenders == {}, "SQL belongs to an owner in proxy/store (proxy.store.protocols)"


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "proxy" and node.level == 0:
            out.update(f"proxy.{a.name}" for a in node.names)     # from proxy import metrics
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m == "proxy" or m.startswith("proxy.")}


def test_the_store_imports_only_itself_and_pure_lower_modules() -> None:
    bad = {}
    for path in _modules(PROXY / "store"):
        wrong = {m for m in _imports(path)
                 if not m.startswith("proxy.store") and m not in STORE_MAY_IMPORT}
        if wrong:
            bad[path.name] = sorted(wrong)
    assert bad == {}


def test_the_pure_ledger_imports_nothing_from_proxy() -> None:
    assert _imports(PROXY / "credits" / "ledger.py") == set()
