"""The package's layers only look down: no import circle between its modules,
counting imports made inside functions too (issue 11)."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "python" / "fastserial"


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(["fastserial", *parts])


def _imports(path: pathlib.Path) -> set[str]:
    """The package modules ``path`` imports, anywhere in it."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("fastserial"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if not module.startswith("fastserial"):
                continue
            found.add(module)
            for alias in node.names:  # `from . import numpy` names a module
                candidate = f"{module}.{alias.name}"
                if (PACKAGE / f"{alias.name}.py").exists() and module == "fastserial":
                    found.add(candidate)
    return {m for m in found if m != me}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        # `fastserial` (the package's __init__) re-exports; modules importing the
        # package itself are not layering edges we check.
        graph[name] = {m for m in _imports(path) if m in modules and m != "fastserial"}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_is_found():
    graph = _graph()
    assert "fastserial.serialization" in graph
    assert "fastserial._fastserial" not in graph  # the native module has no source
    assert "fastserial.allowlist" in graph["fastserial.serialization"]


def test_no_import_circles():
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_checker_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
