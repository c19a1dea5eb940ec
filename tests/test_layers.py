"""The layer order of ``proxy/``, checked on the import graph (read with ``ast``; nothing is
imported or executed).

Every module belongs to one layer, and an import may only point to the same layer or a lower
one. Every import counts: at module level, inside a function (a lazy import) and under
``if TYPE_CHECKING:`` (a type is a dependency too). The layers, lowest first, are the ones
docs/DESIGN.md draws:

0. ``base``: the exception tree and leaf helpers every layer may use (errors, metrics, tasks,
   backoff, timeutil, loglimit, yamlpos, paths);
1. ``pure``: the billing and metering math and the rules (units, periods, pricing, transform,
   target, rules/, the credit ledger, book and reservations, the lease arithmetic, the
   usage wording), and the frozen config model;
2. ``store``: storage owners (store/, store/postgres/) and the other edges to the outside
   world (stripe/, sinks/, upstream/);
3. ``services``: what the process does with them (credits service and thresholds, flusher,
   webhooks, alerts, reconciliation, meter check, reports/, fleet/ members' duties);
4. ``surfaces``: the request path (request/, the consumer routes among it), the admin API
   (admin/), the shared runtime they read, the public port's limits and the error mapping;
5. ``entry``: the composition root, the CLI and what only the CLI runs (tools/, demo/, the
   schema and config-reference generators).

An upward import is listed as ``importer -> imported (layer -> layer)``. ``ALLOWED`` may
excuse one edge, only with the reason written next to it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROXY = ROOT / "proxy"

LAYERS = ("base", "pure", "store", "services", "surfaces", "entry")

# module or package (dotted) -> layer; the longest matching prefix wins, so a package's entry
# covers every module under it unless a module is named on its own.
PLACE: dict[str, str] = {
    "proxy": "base",
    "proxy.errors": "base",
    "proxy.metrics": "base",
    "proxy.tasks": "base",
    "proxy.backoff": "base",
    "proxy.timeutil": "base",
    "proxy.loglimit": "base",
    "proxy.yamlpos": "base",
    "proxy.paths": "base",

    "proxy.units": "pure",
    "proxy.periods": "pure",
    "proxy.pricing": "pure",
    "proxy.transform": "pure",
    "proxy.target": "pure",
    "proxy.rules": "pure",
    "proxy.credits": "pure",            # the package docstring; its modules are placed below
    "proxy.credits.ledger": "pure",
    "proxy.credits.book": "pure",
    "proxy.credits.reserve": "pure",
    "proxy.credits.plans": "pure",
    "proxy.credits.monetary": "pure",
    "proxy.credits.money": "pure",
    "proxy.fleet": "services",          # the package docstring; its pure modules below
    "proxy.fleet.sizing": "pure",
    "proxy.fleet.clock": "pure",
    "proxy.usage_view": "pure",
    "proxy.config": "pure",

    "proxy.store": "store",
    "proxy.stripe": "store",
    "proxy.sinks": "store",
    "proxy.upstream": "store",

    "proxy.credits.service": "services",
    "proxy.credits.thresholds": "services",
    "proxy.credits.mirror": "services",
    "proxy.fleet.book": "services",
    "proxy.fleet.journal_shipping": "services",
    "proxy.fleet.settings": "services",
    "proxy.flusher": "services",
    "proxy.webhooks": "services",
    "proxy.alerts": "services",
    "proxy.reconcile": "services",
    "proxy.meter_check": "services",
    "proxy.reports": "services",
    "proxy.commitments": "services",
    "proxy.notices": "services",

    "proxy.request": "surfaces",
    "proxy.admin": "surfaces",
    "proxy.runtime": "surfaces",
    "proxy.limits": "surfaces",
    "proxy.http_errors": "surfaces",
    "proxy.static": "surfaces",

    "proxy.app": "entry",
    "proxy.cli": "entry",
    "proxy.__main__": "entry",
    "proxy.tools": "entry",
    "proxy.demo": "entry",
    "proxy.schema": "entry",
    "proxy.configdoc": "entry",
}

# (importer, imported) -> why this upward edge is allowed. Keep it empty unless a reason is
# written here.
ALLOWED: dict[tuple[str, str], str] = {}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted((root / "proxy").rglob("*.py"))}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        place = PLACE.get(".".join(parts[:n]))
        if place is not None:
            return place
    return None


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``module`` imports, anywhere in its source (``from proxy.x import
    y`` names ``proxy.x.y`` when that is a module, else ``proxy.x``)."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.add(sub if sub in known else target)
    return {m for m in out if m == "proxy" or m.startswith("proxy.")}


def upward_edges(root: Path = ROOT) -> list[str]:
    mods = modules(root)
    known = set(mods)
    rank = {name: i for i, name in enumerate(LAYERS)}
    bad = []
    for mod, path in mods.items():
        here = layer_of(mod)
        assert here is not None, f"{mod} has no layer: add it to PLACE in tests/test_layers.py"
        for dep in sorted(imports_of(mod, path, known)):
            there = layer_of(dep)
            assert there is not None, f"{mod} imports {dep}, which has no layer"
            if rank[there] > rank[here] and (mod, dep) not in ALLOWED:
                bad.append(f"{mod} -> {dep} ({here} -> {there})")
    return bad


def test_every_module_has_a_layer() -> None:
    assert [m for m in modules() if layer_of(m) is None] == []


def test_every_place_names_a_module_or_package() -> None:
    known = set(modules())
    assert [p for p in PLACE if p not in known] == []


def test_no_import_points_to_a_higher_layer() -> None:
    assert upward_edges() == []


def test_every_allowed_edge_exists_and_has_a_reason() -> None:
    mods = modules()
    known = set(mods)
    for (mod, dep), why in ALLOWED.items():
        assert why.strip(), f"{mod} -> {dep}: no reason written"
        assert dep in imports_of(mod, mods[mod], known), f"{mod} no longer imports {dep}"


def test_the_check_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The detector itself: a tiny tree with an upward edge of each kind is reported, edge by
    edge, and a downward import is not."""
    pkg = tmp_path / "proxy"
    (pkg / "store").mkdir(parents=True)
    (pkg / "request").mkdir()
    for init in (pkg, pkg / "store", pkg / "request"):
        (init / "__init__.py").write_text("")
    (pkg / "units.py").write_text("")
    (pkg / "app.py").write_text("")
    (pkg / "request" / "auth.py").write_text("from proxy import units\n")
    (pkg / "store" / "db.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from proxy.request.auth import x\n"
        "def f():\n    import proxy.app\n"
        "from ..request import auth\n"
        "from proxy import units\n")
    assert upward_edges(tmp_path) == [
        "proxy.store.db -> proxy.app (store -> entry)",
        "proxy.store.db -> proxy.request.auth (store -> surfaces)",
    ]
