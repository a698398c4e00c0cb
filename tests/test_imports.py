"""The package's modules import one another without a circle, counting imports inside
functions too (a function-level import closes a loop at run time all the same); imports
under ``if TYPE_CHECKING:`` never run and are left out."""

from __future__ import annotations

import ast
from pathlib import Path

import dreampool_gpu

PACKAGE = Path(dreampool_gpu.__file__).parent

# Circles that remain, each as the set of modules it runs through. Every entry must still
# be a circle (the test fails once one is gone: delete it here); any other circle fails.
ALLOWED_CYCLES: list[set[str]] = []  # none: DreamPool is built from its parts, nothing imports back


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module, modules: set[str]) -> set[str]:
    """Modules named by the module's import statements, at any depth (``if TYPE_CHECKING:`` skipped).

    ``from pkg import sub`` counts as importing ``pkg.sub`` when that is a module, else ``pkg``.
    """
    out: set[str] = set()
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in modules else node.module)
        todo.extend(ast.iter_child_nodes(node))
    return out


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = _imports(ast.parse(path.read_text()), set(modules))
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Every import circle, as the set of modules that reach one another (components of 2 or more)."""
    reach = {node: _reachable(graph, node) for node in graph}
    seen: set[str] = set()
    cycles = []
    for node in sorted(graph):
        if node in seen or node not in reach[node]:
            continue
        component = {other for other in reach[node] if node in reach[other]}
        seen |= component
        cycles.append(component)
    return cycles


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    found: set[str] = set()
    todo = list(graph[start])
    while todo:
        node = todo.pop()
        if node not in found:
            found.add(node)
            todo.extend(graph.get(node, ()))
    return found


def test_finder_sees_circles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [{"a", "b", "c"}]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    two = {"a": {"b"}, "b": {"a", "c"}, "c": {"d"}, "d": {"c"}, "e": {"a"}}
    assert find_cycles(two) == [{"a", "b"}, {"c", "d"}]


def test_function_level_imports_count():
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\ndef f():\n    import b\n"
    assert _imports(ast.parse(source), {"a", "b"}) == {"typing", "b"}


def test_no_import_circles_but_the_allowed_ones():
    graph = import_graph()
    assert "dreampool_gpu.pool" in graph and "dreampool_gpu.retrieval.walk" in graph["dreampool_gpu.pool"]
    found = find_cycles(graph)
    new = [sorted(c) for c in found if c not in ALLOWED_CYCLES]
    gone = [sorted(c) for c in ALLOWED_CYCLES if c not in found]
    assert not new, f"import circles: {new}"
    assert not gone, f"no longer circles, delete them from ALLOWED_CYCLES: {gone}"


def test_persist_never_imports_the_pool():
    graph = import_graph()
    persist = [name for name in graph if name == "dreampool_gpu.persist" or name.startswith("dreampool_gpu.persist.")]
    assert len(persist) > 1  # the package and its modules
    for name in persist:
        assert "dreampool_gpu.pool" not in graph[name], name
