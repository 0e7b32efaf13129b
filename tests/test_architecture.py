"""The package's import structure: no module imports another in a circle, ``config`` and
``errors`` are leaves, and imports of the package sit at the top of a module.

Read from the source with ``ast`` (nothing is imported), so an import hidden inside a
function counts as much as one at the top.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

PACKAGE = "analysis"
SOURCE = Path(__file__).resolve().parents[1] / "src" / PACKAGE

#: Modules allowed to import the package inside functions: the command line loads only
#: what the chosen command needs, so that ``--help`` answers at once (not a cycle).
DEFERRED_ALLOWED = {"analysis.cli"}


def _module_name(path: Path, root: Path, package: str) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((package, *parts))


def import_edges(root: Path, package: str = PACKAGE) -> dict[str, list[tuple[str, int, bool]]]:
    """Every import of the package by each of its modules.

    Returns ``{module: [(imported module, line, at top level), ...]}``. ``from pkg import
    x`` counts as an import of ``pkg.x`` when ``x`` is a module; relative imports are
    resolved against the importing module.
    """
    modules = {_module_name(p, root, package): p for p in sorted(root.rglob("*.py"))}
    edges: dict[str, list[tuple[str, int, bool]]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        top = {id(node) for node in tree.body}
        is_package = path.name == "__init__.py"
        found = []
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    origin = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    origin = node.module or ""
                targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules
                           else origin for alias in node.names]
            for target in targets:
                if target == package or target.startswith(package + "."):
                    # ``import analysis.x.y`` imports the module that exists
                    while target not in modules and "." in target:
                        target = target.rsplit(".", 1)[0]
                    if target != name:
                        found.append((target, node.lineno, id(node) in top))
        edges[name] = found
    return edges


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_through(group, graph) for group in groups]


def _cycle_through(group: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the group's first module, staying inside the group."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph.get(v, ())):
            if w == start:
                return [*paths[v], start]
            if w in members and w not in paths:
                paths[w] = [*paths[v], w]
                queue.append(w)
    raise AssertionError("a strongly connected group always has a cycle")


def _graph(edges: dict[str, list[tuple[str, int, bool]]]) -> dict[str, set[str]]:
    return {name: {target for target, _, _ in found} for name, found in edges.items()}


@pytest.fixture(scope="module")
def edges():
    return import_edges(SOURCE)


def test_the_package_imports_nothing_in_a_circle(edges):
    cycles = find_cycles(_graph(edges))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("leaf", ["analysis.config", "analysis.errors"])
def test_leaf_modules_import_nothing_else_from_the_package(edges, leaf):
    allowed = {"analysis.errors"} if leaf == "analysis.config" else set()
    extra = sorted({target for target, _, _ in edges[leaf]} - allowed)
    assert not extra, f"{leaf} must be a leaf but imports {extra}"


def test_the_package_is_imported_at_the_top_of_modules(edges):
    deferred = sorted({f"{name}:{line} imports {target}" for name, found in edges.items()
                       if name not in DEFERRED_ALLOWED for target, line, top in found if not top})
    assert not deferred, "imports inside functions (move them to the top): " + "; ".join(
        deferred)


def test_the_graph_sees_every_kind_of_import(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from .c import x\n")
    (pkg / "c.py").write_text("import pkg.a\nfrom . import d\n")
    (pkg / "d.py").write_text("import os\nfrom pkg.c import y\n")
    edges = import_edges(pkg, "pkg")
    assert sorted(_graph(edges).items()) == [
        ("pkg", set()), ("pkg.a", {"pkg.b"}), ("pkg.b", {"pkg.c"}), ("pkg.c", {"pkg.a", "pkg.d"}),
        ("pkg.d", {"pkg.c"})]
    assert edges["pkg.b"] == [("pkg.c", 2, False)]
    assert find_cycles(_graph(edges)) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
#: The most lines of code a notebook holds outside its ``parameters`` cell: the
#: executive pages show what :mod:`analysis.narrative` builds, the others call the steps.
EXECUTIVE_LIMIT, OTHER_LIMIT = 80, 40


def code_lines(path: Path) -> int:
    """Non-blank, non-comment lines of the code cells, the parameters cell left out."""

    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return sum(1 for c in cells if c["cell_type"] == "code"
               and "parameters" not in c.get("metadata", {}).get("tags", [])
               for line in "".join(c["source"]).splitlines()
               if line.strip() and not line.strip().startswith("#"))


def test_code_lines_are_counted_without_comments_blanks_or_parameters(tmp_path):

    nb = {"cells": [
        {"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": "a = 1\nb = 2"},
        {"cell_type": "markdown", "metadata": {}, "source": "# heading\ntext"},
        {"cell_type": "code", "metadata": {}, "source": ["# comment\n", "x = 1\n", "\n",
                                                          "show(x)"]}]}
    (tmp_path / "n.ipynb").write_text(json.dumps(nb))
    assert code_lines(tmp_path / "n.ipynb") == 2


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebooks_are_thin(path):
    limit = EXECUTIVE_LIMIT if "executive" in path.stem else OTHER_LIMIT
    assert code_lines(path) <= limit, f"{path.name}: {code_lines(path)} lines of code"
