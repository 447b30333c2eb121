"""The package's layers, as docs/architecture.md draws them: imports only go down, and no files import each other in
a circle. Imports inside functions count as much as those at the top of a file (a lazy import is still a
dependency), so the test reads every `import` statement of every module of qwenvl_ft/."""

import ast
import sys
from pathlib import Path
from typing import Dict, List, Set

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qwenvl_ft"

# Bottom to top; a module belongs to the first entry its dotted name starts with. Within one layer any import is
# allowed (as long as it makes no circle); between layers only downwards. docs/architecture.md is this table.
LAYERS: List[List[str]] = [
    ["qwenvl_ft.errors", "qwenvl_ft.quiet", "qwenvl_ft.cache_home"],
    ["qwenvl_ft.grounding", "qwenvl_ft.families"],
    ["qwenvl_ft.rewards"],
    ["qwenvl_ft.methods"],
    ["qwenvl_ft.config"],
    ["qwenvl_ft.data", "qwenvl_ft.modeling", "qwenvl_ft.distributed", "qwenvl_ft.publish"],
    ["qwenvl_ft.estimate"],
    ["qwenvl_ft.run_folder"],
    ["qwenvl_ft.training"],
    ["qwenvl_ft.evaluation"],
    ["qwenvl_ft.trainers"],
    ["qwenvl_ft.chat"],
    ["qwenvl_ft.commands", "qwenvl_ft.__main__"],
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> Dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, modules: Dict[str, Path]) -> Set[str]:
    """The qwenvl_ft modules `path` imports anywhere in it (`from a.b import c` counts a.b.c when c is a module)."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # `import qwenvl_ft.data.collate` names the module itself
                name = name.rpartition(".")[0]
            if name.startswith("qwenvl_ft"):
                found.add(name)
    found.discard(module_name(path))
    return found


def layer_of(module: str) -> int:
    if module == "qwenvl_ft":  # the package's own __init__: a docstring and the version
        return 0
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py (and docs/architecture.md): place it")


def import_graph() -> Dict[str, Set[str]]:
    modules = all_modules()
    return {name: imported_modules(path, modules) for name, path in modules.items()}


def circles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer():
    for module in all_modules():
        layer_of(module)


def test_imports_only_go_down():
    upward = [f"{module} (layer {layer_of(module)}) imports {other} (layer {layer_of(other)})"
              for module, imports in import_graph().items() for other in sorted(imports)
              if layer_of(other) > layer_of(module)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_circles():
    found = circles(import_graph())
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(group) for group in found)


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set()}, []),
])
def test_the_circle_finder_finds_circles(graph, expected):
    assert circles(graph) == expected


def test_the_import_reader_sees_imports_inside_functions(tmp_path, monkeypatch):
    package = tmp_path / "qwenvl_ft"
    (package / "lower").mkdir(parents=True)
    for name in ("__init__.py", "lower/__init__.py", "lower/thing.py"):
        (package / name).write_text("")
    (package / "upper.py").write_text("def f():\n    from qwenvl_ft.lower import thing\n    import qwenvl_ft.lower\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    modules = all_modules()
    assert imported_modules(package / "upper.py", modules) == {"qwenvl_ft.lower.thing", "qwenvl_ft.lower"}
