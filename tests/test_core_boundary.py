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


def declared_members() -> set[str]:
    from blackbox_smooth.blackbox import BlackBox

    return {m for m in dir(BlackBox) if not m.startswith("_")} | set(BlackBox.__annotations__)


def adapter_classes() -> list[type]:
    from blackbox_smooth.adapters.gcv import CloudVision
    from blackbox_smooth.adapters.generic import Generic
    from blackbox_smooth.adapters.huggingface import HuggingFace
    from blackbox_smooth.adapters.kserve import KServe
    from blackbox_smooth.adapters.local import PythonFunction, TorchModel
    from blackbox_smooth.adapters.onnx import OnnxModel
    from blackbox_smooth.adapters.torchserve import TorchServe

    return [CloudVision, Generic, HuggingFace, KServe, PythonFunction, TorchModel, OnnxModel,
            TorchServe]  # fmt: skip


def provides(cls: type, member: str) -> bool:
    """A class attribute, or an attribute its own (or a base's) __init__ sets."""
    import inspect
    import re

    if hasattr(cls, member):
        return True
    ours = [k for k in cls.__mro__ if k.__module__.startswith("blackbox_smooth")]
    assigned = re.compile(rf"self\.{member}\s*(:[^=\n]*)?=[^=]")
    return any(assigned.search(inspect.getsource(k)) for k in ours)


def test_the_protocol_declares_what_callers_read():
    members = declared_members()
    for read in ("wire_bytes_per_value", "transport", "labels", "annotate", "description"):
        assert read in members, read


def test_every_adapter_provides_every_declared_member():
    members = declared_members()
    for cls in adapter_classes():
        missing = sorted(m for m in members if not provides(cls, m))
        assert not missing, f"{cls.__name__} lacks {missing}"
    assert not provides(object, "transport")  # the check can fail
