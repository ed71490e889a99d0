"""The package's layout rules, read from the source: no import cycles, vLLM imported in one place.

The import graph counts every import statement of exporter/, those inside functions too: a
function-level import that closes a cycle works only as long as nobody calls it at import time,
and it hides which module depends on which.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "exporter"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imported(module: str, is_package: bool, node: ast.AST) -> list[str]:
    """The exporter modules one import statement names (`from a import b`: a.b if that is a
    module, else a)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        target = f"{base}.{node.module}" if node.module else base
    else:
        target = node.module or ""
    return [f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target
            for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        is_package = path.name == "__init__.py"
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names.update(_imported(module, is_package, node))
        graph[module] = {name for name in names if name in MODULES and name != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once explored
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for dependency in sorted(graph[module]):
            if state.get(dependency) == "open":
                return path[path.index(dependency):] + [dependency]
            if dependency not in state:
                cycle = visit(dependency)
                if cycle:
                    return cycle
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_imports_inside_functions_and_relative_imports():
    graph = import_graph()
    assert "exporter.metrics_process" in graph["exporter.daemon"]  # module level
    assert "exporter.plugin" in graph["exporter.daemon"]  # inside a function
    assert "exporter.alerts.service" in graph["exporter.alerts"]  # `from .service import`


def test_no_import_cycles_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_only_vllm_compat_imports_vllm():
    importers = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(name == "vllm" or name.startswith("vllm.") for name in names):
                importers.append(module)
    assert set(importers) <= {"exporter.vllm_compat"}, importers
