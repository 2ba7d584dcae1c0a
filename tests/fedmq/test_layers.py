"""The layering, read from the code's own import statements: imports run one way.

- ``fedmq/`` (the library) imports no application (``coordinator``, ``edge_client``,
  ``broker``, ``fleet``, ``benchmarks``);
- ``coordinator/``, ``edge_client/`` and ``broker/`` import no other application (``fleet``
  is the one package that composes them all);
- module-level imports (``TYPE_CHECKING`` blocks included) form no cycle among the modules of
  ``fedmq/``, ``coordinator/``, ``edge_client/`` and ``broker/``. An import inside a function
  body is not counted: it runs after every module is loaded.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fedmq", "coordinator", "edge_client", "broker")
APPS = ("coordinator", "edge_client", "broker", "fleet", "benchmarks")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _top_level_imports(tree: ast.Module) -> list[str]:
    """Modules imported at module level, in ``if`` blocks (``TYPE_CHECKING``) and ``try`` too."""
    found: list[str] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                found.extend(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.append(node.module)
                found.extend(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.If):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)

    visit(tree.body)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in _top_level_imports(ast.parse(path.read_text(encoding="utf-8"))):
            # "from fedmq.wire import topics" names the module fedmq.wire.topics.
            if imported in modules and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
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


def test_the_library_imports_no_application() -> None:
    graph = _graph()
    offending = {m: sorted(t for t in targets if t.split(".")[0] in APPS)
                 for m, targets in graph.items() if m.split(".")[0] == "fedmq"}
    assert not {m: t for m, t in offending.items() if t}


def test_an_application_imports_no_other_application() -> None:
    graph = _graph()
    offending = {}
    for module, targets in graph.items():
        app = module.split(".")[0]
        if app == "fedmq":
            continue
        other = sorted(t for t in targets if t.split(".")[0] in APPS and t.split(".")[0] != app)
        if other:
            offending[module] = other
    assert not offending


def test_module_level_imports_form_no_cycle() -> None:
    graph = _graph()
    assert len(graph) > 100, "the import graph was not read"
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph) or [])}"


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
