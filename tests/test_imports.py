"""selfmask's modules import each other one way: no import circles.

The graph is built by parsing every module under ``src/selfmask`` with :mod:`ast` (nothing is
imported). An edge ``a -> b`` is any ``import`` / ``from ... import`` in ``a`` that names module
``b`` (``from p import x`` names ``p.x`` when that is a module, else the package ``p``), at module
level or inside a function: an import moved into a function to dodge a circle is still the same
circle (``storage/container.py`` <-> ``storage/maskfile.py`` was one). Imports under
``if TYPE_CHECKING:`` are left out (they never run). A circle is a strongly connected component
of the graph with more than one module; the failure names one cycle in it, with file and line of
each import.
"""

from __future__ import annotations

import ast
from collections import defaultdict, deque
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: Circles that exist today and are being removed elsewhere: {modules: why}. A circle not listed
#: fails the test; a listed one that is gone fails ``test_allowed_circles_still_exist``, so the
#: entry is deleted once its fix lands.
ALLOWED: dict[frozenset[str], str] = {
}

Edge = tuple[str, str, int]  # (target module, file, line)


def _modules(src: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``)."""
    out = {}
    for f in sorted(src.rglob("*.py")):
        parts = list(f.relative_to(src).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run, in any scope, except under ``if TYPE_CHECKING:``."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
            continue
        if isinstance(node, ast.If) and _is_type_checking(node):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return found


def import_graph(src: Path = SRC, root: str = "selfmask") -> dict[str, list[Edge]]:
    """``module -> [(imported module, file, line), ...]`` over the package ``root`` under ``src``."""
    mods = _modules(src)
    graph: dict[str, list[Edge]] = defaultdict(list)
    for name, (path, is_pkg) in mods.items():
        if not (name == root or name.startswith(root + ".")):
            continue
        package = name if is_pkg else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from . import x, from ..a import b
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for target in targets:
                if target in mods and target != name:
                    graph[name].append((target, str(path.relative_to(src)), node.lineno))
    return {name: sorted(edges, key=lambda e: e[2]) for name, edges in graph.items()}


def circles(graph: dict[str, list[Edge]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    succ = {v: sorted({t for t, _f, _l in edges}) for v, edges in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for start in sorted(succ):
        if start in index:
            continue
        work = [(start, iter(succ.get(start, [])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(succ.get(w, []))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(frozenset(comp))
    return found


def describe(graph: dict[str, list[Edge]], comp: frozenset[str]) -> str:
    """One cycle through ``comp``, shortest from its first module: ``a (a.py:3) -> b (b.py:9) -> a``."""
    start = min(comp)
    prev: dict[str, tuple[str, str, int]] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for t, f, line in graph.get(v, []):
            if t not in comp or t in prev:
                continue
            prev[t] = (v, f, line)
            if t == start:
                queue.clear()
                break
            queue.append(t)
    path, v = [], start
    while True:
        u, f, line = prev[v]
        path.append(f"{u} ({f}:{line})")
        v = u
        if v == start:
            break
    return " -> ".join(reversed(path)) + f" -> {start}"


def test_no_import_circles() -> None:
    graph = import_graph()
    assert len(graph) > 50  # the package was found and parsed
    new = [describe(graph, c) for c in circles(graph) if c not in ALLOWED]
    assert not new, "import circles:\n  " + "\n  ".join(new)


@pytest.mark.parametrize("comp", sorted(ALLOWED, key=sorted), ids=lambda c: "<->".join(m.split(".")[-1] for m in sorted(c)))
def test_allowed_circles_still_exist(comp: frozenset[str]) -> None:
    assert comp in circles(import_graph()), f"the circle {sorted(comp)} is gone: delete its entry from ALLOWED"


def test_the_checker_finds_a_circle_hidden_in_a_function(tmp_path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    (pkg / "d.py").write_text("import pkg.c\n")
    graph = import_graph(tmp_path, "pkg")
    assert circles(graph) == [frozenset({"pkg.a", "pkg.sub.b"})]  # c's import never runs; d -> c is one way
    assert describe(graph, circles(graph)[0]) == "pkg.a (pkg/a.py:1) -> pkg.sub.b (pkg/sub/b.py:2) -> pkg.a"
