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


def test_other_and_abstain_are_apart_in_memory_and_minus_one_in_files():
    import numpy as np
    import torch

    from blackbox_smooth import stats
    from blackbox_smooth.blackbox import OTHER, labels_in, labels_out
    from blackbox_smooth.certificate import counts_out

    assert OTHER != stats.ABSTAIN == -1
    # a vote of OTHER is never an abstention, and a run all OTHER abstains with ABSTAIN
    assert stats.top_class({OTHER: 5}) == OTHER != stats.ABSTAIN
    result = stats.certify({OTHER: 10}, {OTHER: 100}, 100, 0.001, 0.5)
    assert result.abstain and result.label == stats.ABSTAIN
    assert stats.predict({OTHER: 90, 1: 10}, 0.05)[0] == stats.ABSTAIN
    # files and clients read OTHER as -1; whatever negative comes back is OTHER
    assert counts_out({3: 90, OTHER: 10}) == {"3": 90, "-1": 10}
    assert labels_out(np.array([OTHER, 0, 4])).tolist() == [-1, 0, 4]
    assert labels_out(torch.tensor([OTHER, 2])).tolist() == [-1, 2]
    assert labels_in(np.array([-1, 0, -7])).tolist() == [OTHER, 0, OTHER]
    assert labels_in(torch.tensor([-1, 3])).tolist() == [OTHER, 3]


def test_a_certificate_of_other_votes_writes_minus_one_and_abstains(tmp_path):
    import numpy as np

    from blackbox_smooth.blackbox import OTHER, Answer
    from blackbox_smooth.smooth import Smoothed

    class Unmapped:
        """Every answer outside the label map."""

        fingerprint, description, max_batch, cache_by_default = "u", {"p": "u"}, 64, False
        wire_bytes_per_value, transport, labels, annotate = 0, None, None, None

        async def classify(self, images):
            return Answer(np.full(len(images), OTHER, dtype=np.int64))

        async def aclose(self) -> None:
            pass

    s = Smoothed(Unmapped(), 0.5, device="cpu", ledger=None)
    try:
        cert = s.certify_sync(np.zeros((1, 4, 4), np.float32), n0=8, n=16, alpha=0.01)
    finally:
        s.close()
    assert cert.counts == {OTHER: 16} and cert.abstain and cert.label == -1
    written = cert.to_json()
    assert written["counts"] == {"-1": 16} and written["counts_selection"] == {"-1": 8}
    assert written["label"] == -1  # ABSTAIN, as certificates always wrote it


def test_translated_labels_keep_their_dtype():
    # run folders and caches store labels as they are: a wider dtype would change the file
    import numpy as np
    import torch

    from blackbox_smooth.blackbox import OTHER, labels_in, labels_out

    assert labels_out(torch.tensor([OTHER, 1], dtype=torch.int32)).dtype == torch.int32
    assert labels_in(np.array([-1, 1], dtype=np.int32)).dtype == np.int32
    kept = np.array([OTHER, 1])
    labels_out(kept)
    assert kept.tolist() == [OTHER, 1]  # a copy: the caller's labels stay as they were


def test_a_run_folders_targets_keep_minus_one_for_other(tmp_path):
    import torch
    from safetensors.torch import load_file

    from blackbox_smooth.blackbox import OTHER
    from blackbox_smooth.frontends import FrontEndConfig, build, from_pretrained, save_pretrained

    run = tmp_path / "run"
    c = FrontEndConfig("prompt", 1, 28, 28, 0.25)
    save_pretrained(build(c), c, run, targets=torch.tensor([2, OTHER, 0]))
    on_disk = load_file(str(run / "frontend.safetensors"))["extra.targets"]
    assert on_disk.tolist() == [2, -1, 0]  # the format as every bbsmooth wrote it
    _, _, extra = from_pretrained(run)
    assert extra["targets"].tolist() == [2, OTHER, 0]


def test_labels_of_a_class_index_box_show_other_as_minus_one(tmp_path):
    # every black box declares `annotate` (None here): `bbsmooth labels` asks `classify`
    import numpy as np
    from PIL import Image

    from blackbox_smooth import jobs

    (tmp_path / "f.py").write_text(
        "import numpy as np\ndef f(x):\n    return np.where(np.arange(len(x)) >= 0, -1, 0)\n"
    )
    image = tmp_path / "grey.png"
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(image)
    [answers] = jobs.labels(f"python:{tmp_path / 'f.py'}:f", [image], device="cpu")
    assert [(a.label, a.cls) for a in answers] == [("-1", "OTHER")]
