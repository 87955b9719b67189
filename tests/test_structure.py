"""The shape of the code, held where a newcomer would trip over it (issue 29's targets): no import
cycles, no function too long to read at once, public names that say why, and one owner of the
question "is this device a GPU" (:class:`sfdeploy.device.Device`).

Read from the source with ``ast`` (nothing is imported or run), so these take well under a second.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sfdeploy"
MAX_FUNCTION_LINES = 60
MIN_DOCUMENTED = 0.90


def _sources() -> dict[str, Path]:
    """Module name -> file, for every module of the package (a package is its ``__init__``)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


SOURCES = _sources()
TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in SOURCES.items()}


def _definitions(node: ast.AST, prefix: str = "", nested: bool = False
                 ) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef, bool]]:
    """``(qualified name, node, nested in a function)`` for every class and function."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield prefix + child.name, child, nested
            inner = nested or not isinstance(child, ast.ClassDef)
            yield from _definitions(child, f"{prefix}{child.name}.", inner)


def _imports(module: str) -> set[str]:
    """The package's modules ``module`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(TREES[module]):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        found.update(name for name in names if name in SOURCES and name != module)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    """The check below could fail: a loop of three modules is found, a chain is not."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycles() -> None:
    """Modules that import each other (even inside a function) cannot be read, tested or moved alone."""
    assert _cycles({module: _imports(module) for module in SOURCES}) == []


def test_no_function_is_too_long() -> None:
    """A function a reader cannot hold on one screen hides its steps; name them instead."""
    long = [f"{SOURCES[module].relative_to(ROOT)}:{name} ({node.end_lineno - node.lineno + 1} lines)"
            for module, tree in TREES.items() for name, node, _ in _definitions(tree)
            if not isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


def test_public_names_are_documented() -> None:
    """Public classes, functions and methods (not the ones nested in functions) say why they exist."""
    public = [(module, name, node) for module, tree in TREES.items() for name, node, nested in _definitions(tree)
              if not nested and not name.rpartition(".")[2].startswith("_")]
    missing = [f"{module}:{name}" for module, name, node in public if not ast.get_docstring(node)]
    share = 1 - len(missing) / len(public)
    assert share >= MIN_DOCUMENTED, f"{share:.1%} documented; without a docstring: {missing}"


@pytest.mark.parametrize("pattern", ['startswith("cuda', "startswith('cuda"])
def test_one_owner_of_gpu_devices(pattern: str) -> None:
    """Whether a device is a GPU is :class:`sfdeploy.device.Device`'s question, asked of the value."""
    owner = PACKAGE / "device.py"
    found = [f"{path.relative_to(ROOT)}:{number}" for path in SOURCES.values() if path != owner
             for number, line in enumerate(path.read_text().splitlines(), 1) if pattern in line]
    assert found == []
