"""Run folders written by bbsmooth before the training record had a type of its own
(tests/data/run-0.1, written by `bbsmooth train` on 7 Dec 2026, before issue 37's changes):
they load, certify as they did then, and resume.

- `finished`: a denoiser trained by distill for 3 epochs; its head stage began after epoch 2
  and epoch 3 was kept (confirmation draws, `best_epoch`, `head_stage_from` in `extra`).
- `partway`: a denoiser's head trained by spsa with --epochs 3, killed (SIGKILL) after the
  checkpoint of epoch 1.
- `box.pt`: the black box both were trained against, a linear digits classifier (TorchScript),
  named by the same relative path it was trained under.

The expected values below are what the code of that day printed for the same commands."""

import json
import re
import shutil
from dataclasses import replace

import pytest

from blackbox_smooth.data import save_image
from blackbox_smooth.digits import digits_split
from blackbox_smooth.errors import UsageError
from blackbox_smooth.frontends import from_pretrained, migrate, read_record
from blackbox_smooth.frontends.record import RECORD_VERSION

from .conftest import ROOT, run_cli

OLD = ROOT / "tests" / "data" / "run-0.1"
BOX = "torch:tests/data/run-0.1/box.pt"  # relative, as it was trained: the fingerprint has it

# `certify IMG --n 500 --sigma 0.5 --json` on held-out digits 0, 1, 2, through each front end
CERTIFIED = {
    "finished": [
        (0, 0.7712509095120078, {"0": 485, "1": 6, "5": 3, "6": 4, "9": 2}),
        (1, 0.4887952321168423, {"1": 443, "3": 1, "4": 56}),
        (2, 0.269812477169771, {"1": 107, "2": 384, "3": 9}),
    ],
    "partway": [
        (0, 0.532949302641859, {"0": 452, "1": 34, "4": 11, "5": 3}),
        (1, 0.36670152147462404, {"1": 413, "2": 2, "3": 2, "4": 83}),
        (-1, 0.0, {"1": 192, "2": 268, "3": 40}),
    ],
}


@pytest.fixture()
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the black box is named relative to the repository


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    root = tmp_path_factory.mktemp("held_out")
    _, _, x, y = digits_split()
    paths = []
    for i in range(3):
        paths.append(root / f"{i}_true{y[i]}.png")
        save_image(x[i], paths[-1])
    return paths


@pytest.fixture(scope="module")
def train_folder(tmp_path_factory):
    """The images the runs were trained on: the first 160 training digits, by class."""
    root = tmp_path_factory.mktemp("train160")
    x, y, _, _ = digits_split()
    for i in range(160):
        (root / str(y[i])).mkdir(exist_ok=True)
        save_image(x[i], root / str(y[i]) / f"{i}.png")
    return root


def test_the_committed_runs_are_small_and_hold_what_they_say():
    total = sum(p.stat().st_size for p in OLD.rglob("*") if p.is_file())
    assert total < 300_000
    finished = json.loads((OLD / "finished" / "frontend.json").read_text())
    assert "version" not in finished and finished["extra"]["head_stage_from"] == 2
    assert json.loads((OLD / "partway" / "frontend.json").read_text())["epochs_done"] == 1


@pytest.mark.parametrize("name", ["finished", "partway"])
def test_a_run_written_before_the_change_loads_and_certifies_as_it_did(name, held_out, at_root):
    _, config, _ = from_pretrained(OLD / name)
    assert (config.kind, config.sigma, config.head) == ("denoiser", 0.5, True)
    for image, (label, radius, counts) in zip(held_out, CERTIFIED[name], strict=True):
        out = run_cli("certify", str(image), "-e", BOX, "--sigma", "0.5", "--n", "500",
                      "--frontend", str(OLD / name), "--json")  # fmt: skip
        assert out.returncode == 0, out.stderr
        cert = json.loads(out.stdout)
        assert (cert["label"], cert["counts"]) == (label, counts)
        assert cert["radius"] == pytest.approx(radius, abs=1e-12)


def test_a_run_stopped_partway_before_the_change_resumes_as_it_did(tmp_path, train_folder, at_root):
    out = tmp_path / "run"
    shutil.copytree(OLD / "partway", out)
    before = json.loads((out / "frontend.json").read_text())
    args = ["train", "-e", BOX, "--data", str(train_folder), "--sigma", "0.5", "--out", str(out),
            "--frontend", "denoiser", "--method", "spsa", "--epochs", "3", "--max-queries",
            "3000", "--pretrain-epochs", "2", "--seed", "0"]  # fmt: skip
    again = run_cli(*args)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr and "2,160 queries (880 sent now" in resumed.stdout
    final = json.loads((out / "frontend.json").read_text())
    assert final["validation"][:2] == before["validation"][:2]
    assert [r["noisy_accuracy"] for r in final["validation"]] == [0.609375, 0.84375, 0.8125]
    assert (final["queries"], final["epochs_done"]) == (2160, 2)
    assert final["extra"]["best_epoch"] == 0 and final["extra"]["stopped_early"] == 2
    assert final["extra"]["confirmation"]["start"] == [7]
    assert final["record_version"] == 2 and read_record(out).stopped_early == 2
    assert "stopped early after epoch 2" in resumed.stdout


def test_migrate_reads_the_extra_layout_and_writes_it_back_with_a_version():
    data = json.loads((OLD / "finished" / "frontend.json").read_text())
    record = migrate(data)
    assert record.version == 1 and record.epochs_done == 3 and record.queries == 2981
    assert (record.best_epoch, record.head_stage_from, record.stopped_early) == (3, 2, None)
    assert record.scored is True and record.confirmation is not None
    assert record.confirmation["start"] == [7] and record.validation_draws == 4
    written = record.to_json()
    assert written["record_version"] == RECORD_VERSION == 2
    # the layout of 0.1.0, key for key: a newer run still reads in an older bbsmooth
    assert written["extra"] == data["extra"] and written["validation"] == data["validation"]
    again = migrate({**data, **written})
    assert again.version == 2 and replace(again, version=1) == record


def test_what_older_runs_lack_is_filled_in_by_migrate_alone():
    rows = [{"epoch": 0, "noisy_accuracy": 0.5}, {"epoch": 1, "noisy_accuracy": 0.75}]
    record = migrate({"epochs_done": 1, "validation": rows})  # before kept epochs: the last
    assert record.best_epoch == record.kept_epoch == 1 and record.validation_draws is None
    confirmation = {"draws": 16, "images": 2, "active": True, "start": [2], "queries": 32}
    record = migrate({"validation": rows[:1], "extra": {"confirmation": confirmation}})
    assert record.confirmation is not None and record.confirmation["start"] is None
    assert record.best_epoch == 0
    fresh = migrate({})  # saved before its start was validated: nothing kept yet
    assert fresh.best_epoch is None and fresh.kept_epoch == 0 and fresh.validation == []


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({"record_version": 3}, "'record_version' is 3"),
        ({"extra": {"start": ["a"]}}, "'start' must be an object with method and weights"),
        ({"extra": {"start": {"weights": 1, "method": "mse"}}}, "'weights' must be"),
        ({"extra": {"seconds": "long"}}, "'seconds' must be"),
        ({"extra": {"note": 5}}, "'note' must be"),
        ({"extra": {"head_stage_from": -1}}, "'head_stage_from' is -1"),
    ],
)
def test_migrate_names_a_damaged_record(data, says):
    with pytest.raises(UsageError, match=re.escape(says)):
        migrate(data, "frontend.json")
