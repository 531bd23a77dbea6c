"""segtorch's modules depend one way: no import cycle, counting imports made inside functions.

The layers, lowest first: files <- downloads <- checkpoint (read, adapt, convert) <- weights (which file to use)
<- api <- cli. Python tolerates some cycles at run time, but a cycle means a low layer knows a high one, which is
how the download code once came to build models.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "segtorch"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str, modules: set[str]) -> set[str]:
    """The ``modules`` that module ``name`` (at ``path``) imports anywhere (module level, functions, TYPE_CHECKING
    blocks)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub; `from mod import name` imports mod
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import segtorch.a.b.func`-like names: the module part
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    names = {p: module_name(p, package) for p in sorted(package.rglob("*.py"))}
    modules = set(names.values())
    return {name: imports_of(path, name, modules) for path, name in names.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_imports_inside_functions(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import low\n")
    (pkg / "low.py").write_text("import os\n\ndef f():\n    from .sub import high\n    return high\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "high.py").write_text("from ..low import f\nimport pkg.sub\n")
    graph = import_graph(pkg)
    assert graph == {"pkg": {"pkg.low"}, "pkg.low": {"pkg.sub.high"}, "pkg.sub": set(),
                     "pkg.sub.high": {"pkg.low", "pkg.sub"}}
    assert find_cycle(graph) == ["pkg.low", "pkg.sub.high", "pkg.low"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("low, high", [
    ("segtorch.files", "segtorch"),
    ("segtorch.downloads", "segtorch.checkpoint"),
    ("segtorch.downloads", "segtorch.weights"),
    ("segtorch.checkpoint", "segtorch.weights"),
    ("segtorch.weights", "segtorch.api"),
    ("segtorch.api", "segtorch.cli"),
])
def test_layers_depend_one_way(low, high):
    graph = import_graph()
    seen, todo = set(), [low]
    while todo:  # everything `low` reaches
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert high not in seen, f"{low} reaches {high}"
