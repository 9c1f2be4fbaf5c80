"""The layers import one way: no import cycle in the package, counting imports made inside
functions (they hide a cycle from Python, not from a reader) and the package `__init__`s that
an import runs on its way (importing a.b.c runs a/__init__ and a/b/__init__ first)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "blackbox_smooth"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    files = {module_name(f): f for f in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [target, *(f"{target}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in files and t != name}
    for name, imported in graph.items():
        mine = set(_packages(name))  # already running when `name` runs: not its imports
        graph[name] = imported | {p for t in imported for p in _packages(t) if p not in mine}
        graph[name].discard(name)
    return graph


def _packages(module: str) -> list[str]:
    """The packages whose `__init__` runs before `module` (blackbox_smooth.jobs for
    blackbox_smooth.jobs.images; the top package included)."""
    parts = module.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 30 and "blackbox_smooth.smooth" in graph  # the walk found the package
    found = cycle(graph)
    assert found is None, " → ".join(found or [])


def test_an_import_runs_the_packages_on_its_way():
    graph = import_graph()
    # assembly names adapters.local, and so runs adapters/__init__ too
    assert "blackbox_smooth.jobs" in graph["blackbox_smooth.cli"]
    assert "blackbox_smooth.adapters" in graph["blackbox_smooth.jobs.assembly"]
    assert _packages("a.b.c") == ["a", "a.b"]


def test_the_cycle_check_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_core_types_sit_below_the_adapters_and_the_vote_counting():
    graph = import_graph()
    for low in ("blackbox_smooth.blackbox", "blackbox_smooth.digests", "blackbox_smooth.stats"):
        assert not any(g.startswith("blackbox_smooth.adapters") for g in graph[low]), low
    assert "blackbox_smooth.blackbox" in graph["blackbox_smooth.votes"]
