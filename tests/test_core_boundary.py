"""The core's boundaries: what it imports, what a black box declares, what its values mean."""

from __future__ import annotations

from tests.test_architecture import import_graph

CORE = ("smooth", "votes", "stats", "noise", "cache", "checks", "blackbox")


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph[node])
    return seen


def test_the_core_imports_nothing_of_the_cli():
    graph = import_graph()
    for name in CORE:
        module = f"blackbox_smooth.{name}"
        below = reachable(graph, module)
        for cli in ("blackbox_smooth.options", "blackbox_smooth.cli", "blackbox_smooth.jobs"):
            assert cli not in below, f"{module} reaches {cli}"


def test_the_walk_sees_an_import():
    # the check above must be able to fail: options.py does import checks.py
    graph = import_graph()
    assert "blackbox_smooth.checks" in reachable(graph, "blackbox_smooth.options")
