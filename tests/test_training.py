"""Front ends and training methods end to end on a small slice of the digits."""

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from blackbox_smooth.adapters import open_blackbox
from blackbox_smooth.adapters.local import TorchModel
from blackbox_smooth.data import save_image
from blackbox_smooth.digests import module_digest
from blackbox_smooth.digits import digits_split
from blackbox_smooth.errors import UsageError
from blackbox_smooth.frontends import (
    FrontEndConfig,
    TrainingRecord,
    build,
    from_pretrained,
    read_record,
    trainable_parameters,
)
from blackbox_smooth.progress import no_progress
from blackbox_smooth.smooth import Smoothed
from blackbox_smooth.stats import paired_difference, wilson_interval
from blackbox_smooth.training import TrainSettings, train
from blackbox_smooth.training.objectives import pretrain_mse
from blackbox_smooth.training.spsa import rademacher, spsa_estimate
from blackbox_smooth.training.validation import Confirmation, ConfirmationTally, consistency, keeps

from .conftest import ROOT, messages, run_cli

SIGMA = 0.5


@pytest.fixture(scope="module")
def slice_():
    x_tr, y_tr, x_te, y_te = digits_split()
    return x_tr[:160], y_tr[:160], x_te[:120], y_te[:120]


class Counting(TorchModel):
    """The digits model, counting every image it is asked about."""

    asked = 0

    def _answer(self, images):
        self.asked += len(images)
        return super()._answer(images)


@pytest.fixture()
def box(digits_model):
    model = torch.jit.load(str(digits_model))
    return Counting(model, {"protocol": "torch", "target": "test"}, torch.device("cpu"), 256)


def run(box, x, settings, out, labels=None, **kw):
    return asyncio.run(
        train(box, x, labels, settings, out, progress=no_progress, log=lambda m: None, **kw)
    )


def noisy_accuracy(box, frontend, x, y, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        out = xt + SIGMA * torch.randn(xt.shape, generator=gen)
        if frontend is not None:
            out = frontend(out)
        return float((box.model(out.clamp(0, 1)).argmax(1).numpy() == y).mean())


CASES = [
    ("distill", "denoiser", 0),
    ("distill", "prompt", 0),
    ("distill", "coordinator", 0),
    ("spsa", "denoiser", 2),
    ("spsa", "coordinator", 0),
    ("whitebox", "denoiser", 0),
    ("whitebox", "prompt", 0),
]


@pytest.mark.parametrize("method,kind,rank", CASES)
def test_each_method_and_front_end_trains_within_budget_and_certifies(
    method, kind, rank, box, slice_, tmp_path
):
    x, _, x_te, _ = slice_
    settings = TrainSettings(
        sigma=SIGMA, frontend=kind, method=method, epochs=2, max_queries=700,
        lora_rank=rank, pretrain_epochs=2, passes=1, prompt_width=3 if kind == "prompt" else 0,
    )  # fmt: skip
    result = run(box, x, settings, tmp_path / "run")
    assert box.asked <= 700 and result.record.queries <= 700
    assert result.record.epochs_done == 2 and len(result.record.validation) == 3
    module, config, _ = from_pretrained(tmp_path / "run")
    assert config.sigma == SIGMA and config.kind == kind and config.blackbox == box.fingerprint
    with torch.no_grad():
        probe = torch.from_numpy(x_te[:4])
        assert torch.allclose(module(probe), result.frontend(probe), atol=1e-6)
    smoothed = Smoothed(box, SIGMA, frontend=module, device="cpu")
    cert = smoothed.certify_sync(x_te[0], n0=20, n=200)
    assert sum(cert.counts.values()) == 200


def test_start_from_an_mse_run_is_the_same_run_without_its_pre_training(
    box, slice_, tmp_path, slice_folder, digits_model
):
    x = slice_[0]
    start = run(box, x, TrainSettings(sigma=SIGMA, objective="mse", pretrain_epochs=2),
                tmp_path / "start")  # fmt: skip
    plan = TrainSettings(sigma=SIGMA, method="spsa", epochs=1, max_queries=500, pretrain_epochs=2)
    fresh = run(box, x, plan, tmp_path / "fresh")
    # pre-training epochs are not read with --start: 0 here, and still the same run
    started = run(box, x, replace(plan, start=tmp_path / "start", pretrain_epochs=0),
                  tmp_path / "started")  # fmt: skip
    assert started.record.validation == fresh.record.validation
    assert started.record.queries == fresh.record.queries
    ours, theirs = (
        load_file(str(tmp_path / "started" / "frontend.safetensors")),
        load_file(str(tmp_path / "fresh" / "frontend.safetensors")),
    )
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    kept = started.record.start
    assert kept is not None and kept.weights == module_digest(start.frontend)
    assert kept.method == "mse"
    assert started.record.mse_pretrain_loss == start.record.mse_pretrain_loss
    assert start.record.mse_pretrain_loss is not None

    # what cannot start this run, each refused before any query is sent
    asked = box.asked
    run(box, x, TrainSettings(sigma=0.25, objective="mse", pretrain_epochs=1), tmp_path / "s25")
    with pytest.raises(UsageError, match="σ 0.25 \\(this run: 0.5\\)"):
        run(box, x, replace(plan, start=tmp_path / "s25"), tmp_path / "a")
    with pytest.raises(UsageError, match="it has an output head"):
        run(box, x, replace(plan, start=tmp_path / "fresh"), tmp_path / "b")
    with pytest.raises(UsageError, match="front end denoiser \\(this run: coordinator\\)"):
        run(box, x, replace(plan, frontend="coordinator", start=tmp_path / "start"), tmp_path / "c")
    with pytest.raises(UsageError, match="a prompt starts at zero"):
        replace(plan, frontend="prompt", start=tmp_path / "start")
    with pytest.raises(UsageError, match="not a front-end run folder"):
        run(box, x, replace(plan, start=tmp_path / "nothing"), tmp_path / "d")
    assert box.asked == asked and not any((tmp_path / d).exists() for d in "abcd")
    # resuming with another start is refused; with the same one, or none, it goes on
    more = replace(plan, epochs=2, max_queries=900)
    with pytest.raises(UsageError, match="did not start from --start"):
        run(box, x, replace(more, start=tmp_path / "s25"), tmp_path / "started", resume=True)
    run(box, x, replace(more, start=tmp_path / "start"), tmp_path / "started", resume=True)

    # from the command line: the start folder is an input, never the output
    refused = run_cli("train", "-e", f"torch:{digits_model}", "--data", slice_folder, "--sigma",
                      "0.5", "--out", tmp_path / "start", "--start", tmp_path / "start")  # fmt: skip
    assert refused.returncode == 2 and "holds this command's input" in refused.stderr
    assert len(messages(refused.stderr)) == 1


def test_lora_trains_only_adapters(box, slice_, tmp_path):
    x = slice_[0]
    full = trainable_parameters(build(FrontEndConfig("denoiser", 1, 28, 28, SIGMA)))
    result = run(box, x, TrainSettings(sigma=SIGMA, method="spsa", lora_rank=1, epochs=1,
                                       max_queries=300, pretrain_epochs=1), tmp_path / "r")  # fmt: skip
    lora = result.config.trainable_parameters
    names = [n for n, p in result.frontend.named_parameters() if p.requires_grad]
    assert 0 < lora < full / 4 and all("lora_" in n for n in names)


def test_spsa_trains_only_the_output_head_from_the_mse_start(box, slice_, tmp_path):
    x, _, x_te, _ = slice_
    start = run(box, x, TrainSettings(sigma=SIGMA, objective="mse", pretrain_epochs=1),
                tmp_path / "start")  # fmt: skip
    result = run(box, x, TrainSettings(sigma=SIGMA, method="spsa", epochs=1, max_queries=500,
                                       pretrain_epochs=1), tmp_path / "r")  # fmt: skip
    trained = {n for n, p in result.frontend.named_parameters() if p.requires_grad}
    assert trained == {"head.mix", "head.offset", "head.detail", "head.tone"}
    assert result.config.head and result.config.trainable_parameters == 4  # 1 channel
    probe = torch.from_numpy(x_te[:4])
    module, config, _ = from_pretrained(tmp_path / "r")
    with torch.no_grad():
        # the body is the MSE start's, bit for bit; the head moved from the identity
        assert torch.equal(module.body(probe), start.frontend(probe))
        assert any(p.abs().max() > 0 for p in module.head.parameters())
        assert torch.equal(module(probe), result.frontend(probe))
        identity = build(FrontEndConfig("denoiser", 1, 28, 28, SIGMA, head=True))
        assert torch.equal(identity(probe), identity.body(probe))
    # resumed by another method, the head would train under a method not made for it: refused
    with pytest.raises(UsageError, match="method spsa \\(now distill\\)"):
        run(box, x, TrainSettings(sigma=SIGMA, epochs=2, max_queries=900), tmp_path / "r",
            resume=True)  # fmt: skip


def test_a_head_trains_alone_or_the_body_trains_what_it_trains_of_itself():
    module = build(FrontEndConfig("coordinator", 3, 32, 32, SIGMA, head=True))
    names = lambda: {n.split(".")[1] for n, p in module.named_parameters() if p.requires_grad}  # noqa: E731
    assert names() == {"mix", "offset", "detail", "tone"}
    module.train_only("body")  # distill before its head stage: the encoder stays frozen
    assert names() == {"decoder"}
    module.train_only("head")
    assert names() == {"mix", "offset", "detail", "tone"}


def test_a_head_that_is_not_a_boolean_is_refused(tmp_path):
    from blackbox_smooth.frontends.base import check_config

    data = {"kind": "denoiser", "channels": 1, "height": 28, "width": 28, "sigma": 0.5}
    assert check_config({**data, "head": True}, "f.json").head
    with pytest.raises(UsageError, match="'head' must be true or false"):
        check_config({**data, "head": "yes"}, "f.json")


@pytest.mark.slow
def test_distill_beats_no_front_end_in_noisy_accuracy(box, slice_, tmp_path):
    x, _, x_te, y_te = slice_
    # what distill learns from 1,500 queries: the confirmation draws (tested on their own)
    # would take a quarter of so small a budget
    settings = TrainSettings(sigma=SIGMA, epochs=2, max_queries=1500, pretrain_epochs=8,
                             confirm_draws=0)  # fmt: skip
    result = run(box, x, settings, tmp_path / "run")
    with_frontend = noisy_accuracy(box, result.frontend, x_te, y_te)
    without = noisy_accuracy(box, None, x_te, y_te)
    assert with_frontend > without + 0.03, (with_frontend, without)


def test_mse_objective_sends_no_queries(box, slice_, tmp_path):
    result = run(box, slice_[0], TrainSettings(sigma=SIGMA, objective="mse", pretrain_epochs=2),
                 tmp_path / "m")  # fmt: skip
    assert box.asked == 0 and result.record.queries == 0


def test_training_runs_on_deterministic_kernels_and_restores_the_callers_settings(
    box, slice_, tmp_path, monkeypatch
):
    """cuDNN's default kernels made the same seed give another front end on each CUDA run; a
    front end and a LoRA run train with deterministic kernels, and leave the flags as found."""
    from blackbox_smooth import lora
    from blackbox_smooth.digits import DigitsCNN
    from blackbox_smooth.training import start

    cudnn, seen = torch.backends.cudnn, []

    def probe(*args, **kwargs):
        seen.append((cudnn.deterministic, cudnn.benchmark))
        raise KeyboardInterrupt  # stop there: the flags must be restored on the way out too

    monkeypatch.setattr(start, "pretrain_mse", probe)
    monkeypatch.setattr(lora, "add_noise", probe)
    monkeypatch.setattr(cudnn, "deterministic", False)
    monkeypatch.setattr(cudnn, "benchmark", True)
    with pytest.raises(KeyboardInterrupt):
        run(box, slice_[0], TrainSettings(sigma=SIGMA, objective="mse"), tmp_path / "m")
    with pytest.raises(KeyboardInterrupt):
        lora.train_classifier(DigitsCNN(), slice_[0], slice_[1], sigma=SIGMA, epochs=1,
                              log=lambda m: None, progress=no_progress)  # fmt: skip
    assert seen == [(True, False), (True, False)]
    assert (cudnn.deterministic, cudnn.benchmark) == (False, True)


@pytest.mark.slow  # seconds of work in process: in make test, not test-fast
def test_classification_objective_needs_labels(box, slice_, tmp_path):
    x, y = slice_[0], slice_[1]
    with pytest.raises(UsageError, match="labelled"):
        run(box, x, TrainSettings(sigma=SIGMA, objective="classification"), tmp_path / "a")
    result = run(box, x, TrainSettings(sigma=SIGMA, objective="classification", epochs=1,
                 max_queries=200, pretrain_epochs=1), tmp_path / "b", labels=y)  # fmt: skip
    assert result.config.objective == "classification"


def test_spsa_estimate_agrees_with_the_true_gradient_of_a_quadratic():
    gen = torch.Generator().manual_seed(0)
    d = 50
    a = torch.randn(d, d, generator=gen)
    a = a @ a.T / d + torch.eye(d)
    b = torch.randn(d, generator=gen)
    theta = torch.randn(d, generator=gen)

    def loss(t):
        return float(0.5 * t @ a @ t + b @ t)

    true = a @ theta + b
    estimates = []
    for _ in range(2000):
        delta = rademacher(theta, gen)
        estimates.append(
            spsa_estimate(loss(theta + 0.01 * delta), loss(theta - 0.01 * delta), 0.01, delta)
        )
    agree = np.mean([float(g @ true) > 0 for g in estimates])
    coordinate_signs = np.mean(
        [(torch.sign(g) == torch.sign(true)).float().mean() for g in estimates]
    )
    mean = torch.stack(estimates).mean(0)
    cosine = float(mean @ true / (mean.norm() * true.norm()))
    # Per coordinate a single-direction estimate in 50 dimensions is right only a little more
    # often than not, but over 100,000 coordinates 0.52 is ~13 standard errors above chance.
    assert agree > 0.95 and coordinate_signs > 0.52 and cosine > 0.9


def test_spsa_with_a_label_only_endpoint_gets_a_clear_error(slice_, tmp_path):
    src = tmp_path / "labels.py"
    src.write_text(
        "import numpy as np\ndef f(x):\n    return (x.reshape(len(x), -1).mean(1) > 0.2).astype(int)\n"
    )
    box = open_blackbox(f"python:{src}:f")
    with pytest.raises(UsageError, match="labels only.*distill"):
        run(box, slice_[0], TrainSettings(sigma=SIGMA, method="spsa", max_queries=2000,
                                          pretrain_epochs=1, force=True), tmp_path / "s")  # fmt: skip


def test_whitebox_needs_a_local_torch_model(slice_, tmp_path):
    src = tmp_path / "f.py"
    src.write_text("import numpy as np\ndef f(x):\n    return np.zeros(len(x), dtype=int)\n")
    with pytest.raises(UsageError, match="whitebox needs a local torch model"):
        run(open_blackbox(f"python:{src}:f"), slice_[0],
            TrainSettings(sigma=SIGMA, method="whitebox", pretrain_epochs=1), tmp_path / "w")  # fmt: skip


@pytest.fixture(scope="module")
def slice_folder(tmp_path_factory, slice_):
    root = tmp_path_factory.mktemp("slice")
    x, y = slice_[0], slice_[1]
    for i in range(len(x)):
        os.makedirs(root / str(y[i]), exist_ok=True)
        save_image(x[i], root / str(y[i]) / f"{i}.png")
    return root


@pytest.mark.process
def test_cli_train_resumes_after_a_kill_and_certify_loads_it(
    digits_model, slice_folder, tmp_path, digit_images
):
    out = tmp_path / "run"
    args = ["train", "-e", f"torch:{digits_model}", "--data", slice_folder, "--sigma", "0.5",
            "--out", out, "--epochs", "4", "--max-queries", "2000", "--pretrain-epochs", "2",
            "--cache", tmp_path / "cache", "--patience", "0"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "blackbox_smooth", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    config = out / "frontend.json"
    while time.monotonic() < deadline:
        if config.exists() and json.loads(config.read_text())["epochs_done"] >= 1:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads(config.read_text())["epochs_done"]
    assert 1 <= done < 4
    again = run_cli(*args)
    assert again.returncode == 2 and "--resume" in again.stderr  # never overwrites silently
    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    final = json.loads(config.read_text())
    assert final["epochs_done"] == 4 and final["queries"] <= 2000
    assert [v["epoch"] for v in final["validation"]] == list(range(5))
    cert = run_cli("certify", digit_images[0], "-e", f"torch:{digits_model}", "--sigma", "0.5",
                   "--n", "200", "--frontend", out, "--json")  # fmt: skip
    assert cert.returncode == 0, cert.stderr
    refused = run_cli("certify", digit_images[0], "-e", f"torch:{digits_model}", "--sigma", "0.25",
                      "--n", "200", "--frontend", out)  # fmt: skip
    assert refused.returncode == 2 and "--force" in refused.stderr
    forced = run_cli("certify", digit_images[0], "-e", f"torch:{digits_model}", "--sigma", "0.25",
                     "--n", "200", "--frontend", out, "--force")  # fmt: skip
    assert forced.returncode == 0 and "warning" in forced.stderr


@pytest.mark.slow  # seconds of work in process: in make test, not test-fast
def test_distill_over_http_counts_every_query_and_asks_clean_images_once(server, slice_, tmp_path):
    from blackbox_smooth.adapters import EndpointOptions
    from blackbox_smooth.cache import BlockCache

    x = slice_[0][:100]
    box = open_blackbox(server.url, EndpointOptions(batch=50, concurrency=4))
    cache = BlockCache(tmp_path / "cache")
    settings = TrainSettings(sigma=SIGMA, epochs=2, max_queries=600, pretrain_epochs=1, passes=1)
    result = run(box, x, settings, tmp_path / "run", cache=cache)
    assert server.images == result.record.queries <= 600
    # Resuming the finished run asks nothing more.
    resumed = run(box, x, settings, tmp_path / "run", cache=cache, resume=True)
    assert server.images == resumed.record.queries == result.record.queries
    # Replayed answers count against the budget like sent ones, so a run spends the same
    # whatever the cache holds: a new run with the same settings repeats the first one exactly,
    # from the cache, sending nothing; with another seed it replays the clean images only.
    again = run(box, x, settings, tmp_path / "run2", cache=cache)
    assert again.sent == 0 and again.record.queries == result.record.queries
    assert torch.equal(again.frontend.body.net[0].weight, result.frontend.body.net[0].weight)
    other = run(box, x, replace(settings, seed=1), tmp_path / "run3", cache=cache)
    assert server.images == result.record.queries + other.sent
    assert 0 < other.sent < other.record.queries <= 600


def test_a_checkpoint_swap_interrupted_half_way_is_recovered(box, slice_, tmp_path):
    import shutil

    from blackbox_smooth.runfolder import FRONTEND, write_atomically

    out = tmp_path / "run"
    run(box, slice_[0], TrainSettings(sigma=SIGMA, epochs=1, max_queries=300, pretrain_epochs=1,
                                      passes=1), out)  # fmt: skip
    before = (out / "frontend.safetensors").read_bytes()

    def crash(folder):
        raise KeyboardInterrupt  # killed while writing the next checkpoint

    with pytest.raises(KeyboardInterrupt):
        write_atomically(out, crash, FRONTEND)
    assert (out / "frontend.safetensors").read_bytes() == before
    assert not any(p.name.startswith(".run.") for p in tmp_path.iterdir())
    # Killed between the two renames: only .run.bbsmooth-old is left; reading puts it back.
    shutil.move(out, tmp_path / ".run.bbsmooth-old")
    from_pretrained(out)
    assert read_record(out).epochs_done == 1
    assert (out / "frontend.safetensors").read_bytes() == before


@pytest.mark.slow  # seconds of work in process: in make test, not test-fast
def test_a_run_keeps_its_best_validated_state_and_stops_when_validation_stops_improving(
    box, slice_, tmp_path
):
    """A learning rate that wrecks the front end: validation falls, so the run keeps the
    zero-query start (epoch 0), stops after `patience` epochs without improvement and leaves
    the rest of the budget unspent; certify loads the start's weights."""
    common = {"sigma": SIGMA, "pretrain_epochs": 2, "passes": 1}
    start = run(box, slice_[0], TrainSettings(objective="mse", **common), tmp_path / "start")
    settings = TrainSettings(epochs=5, max_queries=4000, lr=0.5, patience=1, head_stage=False,
                             **common)  # fmt: skip
    result = run(box, slice_[0], settings, tmp_path / "wrecked")
    record = result.record
    rows = record.validation
    assert rows[1]["noisy_accuracy"] < rows[0]["noisy_accuracy"]  # the lr did wreck it
    assert record.best_epoch == 0 and record.stopped_early == 1
    assert record.epochs_done == 1 and record.queries < 4000 // 2
    # the start is confirmed only once a candidate needs the comparison: here none did
    assert record.confirmation is not None
    assert record.confirmation["active"] and record.confirmation["queries"] == 0
    kept = from_pretrained(tmp_path / "wrecked")[0].state_dict()
    for name, value in start.frontend.state_dict().items():
        assert torch.equal(kept[name], value), name
    low, high = rows[1]["interval"]
    gain, gain_low, gain_high = rows[1]["vs_start"]
    assert low <= rows[1]["noisy_accuracy"] <= high and gain_low <= gain <= gain_high < 0


class Stop(Exception):
    pass


@pytest.mark.slow  # seconds of training in process: in make test, not test-fast
def test_when_distill_stalls_its_head_stage_trains_the_head_on_the_best_body_and_resumes_exactly(
    box, slice_, tmp_path
):
    """A wrecking learning rate stalls distill after epoch 1: the head stage starts on the kept
    body (the start's), moves only the head, and stays within the budget; a run stopped after the
    first head epoch and resumed ends with the very tensors of a run never stopped."""
    common = {"sigma": SIGMA, "pretrain_epochs": 2, "passes": 1}
    start = run(box, slice_[0], TrainSettings(objective="mse", **common), tmp_path / "start")
    settings = TrainSettings(epochs=3, max_queries=2500, lr=0.5, patience=1, **common)
    result = run(box, slice_[0], settings, tmp_path / "whole")
    config, record = result.config, result.record
    assert config.head and record.head_stage_from == 1 and record.queries <= 2500
    assert record.epochs_done == 3 and record.stopped_early is None
    assert config.trainable_parameters == 4  # the head's, for 1 channel
    assert "surrogate_agreement" in record.validation[1] and "spsa_loss" in record.validation[2]
    assert record.validation[1]["noisy_accuracy"] < record.validation[0]["noisy_accuracy"]
    probe = torch.from_numpy(slice_[2][:8])
    tensors = load_file(str(tmp_path / "whole" / "frontend.safetensors"))
    current = build(config, seed=0)
    prefix = "extra.current."
    current.load_state_dict(
        {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    )
    assert not any(k.startswith("extra.surrogate.") for k in tensors)  # distill's state: spent
    with torch.no_grad():
        # the body under the head is the start's, bit for bit; the head moved
        assert torch.equal(current.body(probe), start.frontend(probe))
        assert torch.equal(result.frontend.body(probe), start.frontend(probe))
        assert any(p.abs().max() > 0 for p in current.head.parameters())

    def stop_after_epoch_2(message: str) -> None:
        if message.startswith("epoch 2 of"):
            raise Stop

    with pytest.raises(Stop):
        asyncio.run(train(box, slice_[0], None, settings, tmp_path / "cut", progress=no_progress,
                          log=stop_after_epoch_2))  # fmt: skip
    assert json.loads((tmp_path / "cut" / "frontend.json").read_text())["epochs_done"] == 2
    run(box, slice_[0], settings, tmp_path / "cut", resume=True)
    again = load_file(str(tmp_path / "cut" / "frontend.safetensors"))
    assert again.keys() == tensors.keys()
    for name, value in tensors.items():
        assert torch.equal(again[name], value), name


def test_a_run_resumed_with_other_validation_or_confirmation_draws_is_refused(
    box, slice_, tmp_path
):
    """The kept epoch was chosen under the run's own draws: other draws would compare unlike
    things (and other --val-draws would not fit the start's stored answers)."""
    from blackbox_smooth.errors import StaleRun

    settings = TrainSettings(sigma=SIGMA, frontend="prompt", epochs=1, max_queries=900,
                             passes=1, patience=0)  # fmt: skip
    run(box, slice_[0], settings, tmp_path / "r")
    for change, named in (({"val_draws": 2}, "--val-draws 4 (now 2)"),
                          ({"confirm_draws": 8}, "--confirm-draws 16 (now 8)")):  # fmt: skip
        with pytest.raises(StaleRun, match=re.escape(named)):
            run(box, slice_[0], replace(settings, epochs=2, **change), tmp_path / "r", resume=True)


@pytest.mark.slow  # seconds of training in process: in make test, not test-fast
def test_a_run_resumed_with_no_head_stage_stops_rather_than_start_one(box, slice_, tmp_path):
    settings = TrainSettings(sigma=SIGMA, epochs=1, max_queries=2500, lr=0.5, patience=1,
                             pretrain_epochs=1, passes=1)  # fmt: skip
    assert run(box, slice_[0], settings, tmp_path / "r").config.head
    later = replace(settings, epochs=3, max_queries=6000, head_stage=False)
    record = run(box, slice_[0], later, tmp_path / "r", resume=True).record
    assert record.head_stage_from is None and record.stopped_early is not None
    assert all("spsa_loss" not in row for row in record.validation)


@pytest.mark.slow  # seconds of work in process: in make test, not test-fast
def test_distill_on_a_labels_only_box_stops_with_no_head_stage(slice_, tmp_path):
    src = tmp_path / "labels.py"
    src.write_text(
        "import numpy as np\ndef f(x):\n    return (x.reshape(len(x), -1).mean(1) > 0.3).astype(int)\n"
    )
    box = open_blackbox(f"python:{src}:f")  # labels only: SPSA has no loss to estimate
    settings = TrainSettings(sigma=SIGMA, epochs=3, max_queries=2500, lr=0.5, patience=1,
                             pretrain_epochs=1, passes=1)  # fmt: skip
    record = run(box, slice_[0], settings, tmp_path / "labels").record
    assert record.scored is False and record.head_stage_from is None
    assert record.stopped_early == record.epochs_done < 3


def test_consistency_levels_count_images_right_in_at_least_k_draws():
    # 3 images × 2 draws, draw-major: image 0 right twice, image 1 once, image 2 never
    correct = torch.tensor([True, True, False, True, False, False])
    assert consistency(correct, 2) == [pytest.approx(2 / 3), pytest.approx(1 / 3)]


def test_a_state_more_accurate_on_average_but_losing_the_most_consistent_images_is_not_kept():
    """Validation's guard for the largest radii: the start answers images 0 and 1 right under
    all 4 draws; a candidate that gets images 2 and 3 right more often (higher accuracy) but
    image 0 only 3 times of 4 would certify less at the largest radii: not kept. The same gain
    without that loss is kept; a lower accuracy never is."""

    def validation(counts: list[int], draws: int = 4) -> torch.Tensor:
        return torch.stack([torch.tensor([c > d for c in counts]) for d in range(draws)]).flatten()

    start = validation([4, 4, 0, 0])
    start_levels = consistency(start, 4)
    trading = validation([3, 4, 2, 2])
    gaining = validation([4, 4, 2, 1])
    for candidate, kept in ((trading, False), (gaining, True), (validation([4, 4, 0, 0]), False)):
        row = {
            "noisy_accuracy": float(candidate.float().mean()),
            "consistency": consistency(candidate, 4),
        }
        assert keeps(row, float(start.float().mean()), start_levels) is kept
    # an old run with no validation of its start: accuracy alone decides
    row = {"noisy_accuracy": 0.9, "consistency": consistency(trading, 4)}
    assert keeps(row, 0.5, None)


class SetPromptTo:
    """A training step with a known outcome: each epoch sets the prompt to `shift` everywhere
    (the keeping rule is under test here, not a method)."""

    shift = -0.07

    def __init__(self, ctx) -> None:
        self.ctx = ctx

    async def epoch(self, epoch: int, epochs_left: int) -> dict[str, float]:
        with torch.no_grad():
            self.ctx.frontend.delta.fill_(self.shift)
        return {}

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        pass


def test_an_epoch_that_gains_on_average_but_loses_the_start_s_surest_images_is_not_kept(
    tmp_path, monkeypatch
):
    """A linear black box (is the mean pixel above 0.5?) and 4×4 images of two kinds: 20 with
    mean 0.6, which the start answers right under almost any noise (pA ≈ 1: certified at large
    radii), and 20 with mean 0.49 (pA ≈ 0.66). Shifting every pixel by −0.07 raises the
    accuracy under noise (to pA ≈ 0.89 and ≈ 1) and passes validation's 4 draws at every
    consistency level, but at pA ≈ 0.89 the first kind is no longer certified at large radii.
    The confirmation draws see it: the start is kept. Without them (--confirm-draws 0) the
    shifted prompt is kept."""
    from blackbox_smooth.training import loop

    src = tmp_path / "mean.py"
    src.write_text("def f(x):\n    return (x.reshape(len(x), -1).mean(1) > 0.5).astype(int)\n")
    box = open_blackbox(f"python:{src}:f")
    gen = np.random.default_rng(0)
    x = np.concatenate([np.full((40, 1, 4, 4), 0.6), np.full((40, 1, 4, 4), 0.49)])
    x = (x + gen.uniform(-0.005, 0.005, x.shape)).astype(np.float32)
    monkeypatch.setitem(loop.METHODS, "distill", SetPromptTo)
    settings = TrainSettings(sigma=0.1, frontend="prompt", epochs=1, val_fraction=0.5, patience=0)
    runs = {}
    for draws in (32, 0):
        runs[draws] = run(box, x, replace(settings, confirm_draws=draws), tmp_path / f"c{draws}")
    start, shifted = runs[32].record.validation
    assert shifted["noisy_accuracy"] > start["noisy_accuracy"] + 0.05
    assert keeps(shifted, start["noisy_accuracy"], start["consistency"])  # validation passes it
    confirmation = runs[32].record.confirmation
    images = confirmation["images"]
    assert confirmation["draws"] == 32 and confirmation["active"] and images >= 18
    # the start, asked once a candidate needed it, at both levels (16 and 32 draws)
    assert start["confirmed"] == confirmation["start"] and len(confirmation["start"]) == 2
    assert start["confirmed_wrong"] == confirmation["start_wrong"]
    assert confirmation["start"][1] >= 18
    # the shifted prompt lost at the first level: its second was not asked
    assert shifted["confirmed"][0] < confirmation["start"][0] and len(shifted["confirmed"]) == 1
    # it answered wrong where the start did not, on the very same draws
    assert shifted["confirmed_wrong"][0] > confirmation["start_wrong"][0]
    missed = images - confirmation["start"][0]  # each wrong at least once, at most 16 times
    assert missed <= confirmation["start_wrong"][0] <= 16 * missed
    assert runs[32].record.best_epoch == 0
    assert float(runs[32].frontend.delta.detach().abs().max()) == 0.0  # the zero prompt
    spent = runs[32].record.queries - runs[0].record.queries
    assert spent == confirmation["queries"] == (32 + 16) * images
    assert runs[0].record.best_epoch == 1
    assert not runs[0].record.confirmation["active"]


def test_a_candidate_is_confirmed_only_if_it_holds_at_every_level():
    """Kept: no fewer images right under every draw than the start and no more wrong answers
    among them, at each level. As many images right but one more wrong answer (an image's pA
    falling from about 1 to 0.95 is still right under 16 draws about half the time) is not."""
    start = ConfirmationTally(right=[3, 2], wrong=[5, 9])
    confirmation = Confirmation(torch.arange(4), draws=32, start=start)
    assert confirmation.kept(ConfirmationTally([3, 2], [5, 9]))  # the start itself, a tie
    assert confirmation.kept(ConfirmationTally([4, 3], [2, 4]))
    assert not confirmation.kept(ConfirmationTally([3, 2], [5, 10]))  # one more wrong answer
    assert not confirmation.kept(
        ConfirmationTally([3, 1], [5, 5])
    )  # one image fewer at the second level
    assert not confirmation.kept(ConfirmationTally([2], [0]))  # stopped at the first level
    assert confirmation.reserve() == 4 * 32  # the start asked: one candidate's confirmation
    assert Confirmation(torch.arange(4), draws=40).levels == [16, 16, 8]


def test_validation_intervals_are_exact_where_known():
    p, low, high = wilson_interval(torch.tensor([True] * 50 + [False] * 50))
    assert (
        p == 0.5
        and low == pytest.approx(0.4038, abs=1e-4)
        and high == pytest.approx(0.5962, abs=1e-4)
    )
    same = torch.tensor([True, False, True, True])
    assert paired_difference(same, same) == (0.0, 0.0, 0.0)
    better = torch.tensor([True] * 4)
    gain, low, high = paired_difference(better, same)
    assert gain == 0.25 and low < gain < high


def test_validation_intervals_cover_at_their_level():
    """Monte Carlo: the Wilson interval and the paired difference's interval hold the truth
    about 95% of the time."""
    gen = torch.Generator().manual_seed(0)
    covered_acc = covered_diff = 0
    trials = 2000
    for _ in range(trials):
        before = torch.rand(500, generator=gen) < 0.8
        flip = torch.rand(500, generator=gen)
        after = torch.where(flip < 0.05, ~before, before)  # P(after) = 0.8·0.95 + 0.2·0.05 = 0.77
        _, low, high = wilson_interval(before)
        covered_acc += low <= 0.8 <= high
        _, low, high = paired_difference(after, before)
        covered_diff += low <= 0.77 - 0.8 <= high
    assert 0.93 <= covered_acc / trials <= 0.97
    assert 0.93 <= covered_diff / trials <= 0.97


def distill_queries(record: TrainingRecord, images: int, held_out: int) -> int:
    """What distill asked about noisy front-end outputs: every query but the targets (one per
    clean image), the validations and the confirmation draws."""
    assert record.validation_draws is not None and record.confirmation is not None
    return (
        record.queries
        - images
        - len(record.validation) * record.validation_draws * held_out
        - record.confirmation["queries"]
    )


@pytest.mark.slow  # seconds of training in process: in make test, not test-fast
def test_a_distill_checkpoint_keeps_how_to_rebuild_its_queries_not_the_inputs(
    box, slice_, tmp_path
):
    """Per query the checkpoint holds 30 bytes (which candidate, what answer, its scores), not
    the input (28×28 float16 = 1,568 bytes); the file stays within twice the weights and optimizer
    state; a method loaded from it rebuilds exactly the inputs the run asked about."""
    from safetensors.torch import load_file

    from blackbox_smooth.training.context import Context, split
    from blackbox_smooth.training.distill import Distill
    from blackbox_smooth.votes import Votes

    common = {"sigma": SIGMA, "epochs": 2, "pretrain_epochs": 1, "passes": 1, "patience": 0}
    small = run(box, slice_[0], TrainSettings(max_queries=1500, **common), tmp_path / "small")
    large = run(box, slice_[0], TrainSettings(max_queries=6000, **common), tmp_path / "large")
    held_out = len(split(len(slice_[0]), 0.1, 0)[1])
    more = distill_queries(large.record, len(slice_[0]), held_out) - distill_queries(
        small.record, len(slice_[0]), held_out
    )
    sizes = {k: (tmp_path / k / "frontend.safetensors").stat().st_size for k in ("small", "large")}
    per_query = 4 + 4 + 2 * 11  # candidate, label, float16 scores of 10 classes and OTHER
    assert more > 3000 and sizes["large"] - sizes["small"] <= per_query * more + 1024
    tensors = load_file(str(tmp_path / "large" / "frontend.safetensors"))
    learned = sum(
        v.numel() * v.element_size()
        for k, v in tensors.items()
        if not k.startswith("extra.")
        or k.startswith(("extra.surrogate.", "extra.distill.s_opt", "extra.distill.f_opt"))
    )
    assert sizes["large"] <= 2 * learned
    # A method resumed from the checkpoint rebuilds the inputs that were asked: the
    # (deterministic) black box answers each rebuilt input as it answered the original.
    frontend, _, extra = from_pretrained(tmp_path / "large")
    frontend.load_state_dict({k[8:]: v for k, v in extra.items() if k.startswith("current.")})
    settings = TrainSettings(max_queries=6000, **common)
    train_idx, val_idx = split(len(slice_[0]), settings.val_fraction, settings.seed)
    x, targets = torch.from_numpy(slice_[0]), extra["targets"]
    ctx = Context(settings, frontend, box, Votes(box), torch.device("cpu"), x[train_idx],
                  targets[train_idx], x[val_idx], targets[val_idx], int(targets.max()) + 2)  # fmt: skip
    method = Distill(ctx)
    method.load_state(extra)
    assert len(method.inputs) - len(train_idx) == distill_queries(
        read_record(tmp_path / "large"), len(x), len(val_idx)
    )
    for r in method.rounds:  # the inputs in float32, exactly as they were sent
        parts = list(method._asked(r))
        order = torch.cat([at for at, _ in parts]).argsort()
        inputs = torch.cat([chunk for _, chunk in parts])[order]
        answers = torch.from_numpy(asyncio.run(box.classify(inputs)).labels)
        assert torch.equal(answers, r.labels.long())


def test_scores_become_the_surrogates_targets_and_survive_a_checkpoint_exactly():
    """Logits or probabilities, few classes or a thousand: a distribution over the surrogate's
    classes (the last one OTHER); with many classes the top 8 only, stored in 48 bytes."""
    from blackbox_smooth.training.distill import _probabilities, _scores

    probs = np.array([[0.7, 0.2, 0.1], [0.0, 0.0, 1.0]])
    got = _probabilities(probs, 5).float()  # 3 known of 4 classes, then OTHER
    assert torch.allclose(got, torch.tensor([[0.7, 0.2, 0.1, 0, 0], [0, 0, 1, 0, 0]]), atol=1e-3)
    logits = np.random.default_rng(0).normal(size=(6, 1000)) * 3
    many = _probabilities(logits, 1001)
    assert ((many > 0).sum(1) <= 8).all() and torch.allclose(
        many.float().sum(1), torch.ones(6), atol=1e-2
    )
    assert int(many.float().argmax(1)[0]) == int(np.argmax(logits[0]))
    top = many.float().topk(8, dim=1)
    state = {"r.top_index": top.indices.to(torch.int32), "r.top_score": top.values.half()}
    assert torch.equal(_scores(state, "r", 1001), many)


@pytest.mark.slow  # seconds of training in process: in make test, not test-fast
def test_distill_at_224_keeps_what_its_surrogate_learns_from_small(tmp_path):
    """At 224×224×3 the queried inputs are kept at 64×64 for the surrogate (20,000 queries:
    ~0.5 GB rather than ~6 GB), the front end still trains at full size and a resumed run
    rebuilds them exactly."""
    from blackbox_smooth.training import distill

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(24, 3, 224, 224, generator=gen).numpy()
    model = torch.nn.Sequential(torch.nn.AvgPool2d(56), torch.nn.Flatten(), torch.nn.Linear(48, 3))
    box = TorchModel(model, {"protocol": "torch", "target": "tiny"}, torch.device("cpu"), 64)
    settings = TrainSettings(
        sigma=SIGMA,
        frontend="prompt",
        epochs=2,
        max_queries=160,
        passes=1,
        val_draws=1,
        patience=0,
        force=True,  # 2 held-out images of random pixels: validation is not the point
    )
    seen: list[tuple[int, ...]] = []
    original = distill.Distill._remember

    def remember(self, r, inputs):
        seen.append(tuple(inputs.shape[1:]))
        original(self, r, inputs)

    distill.Distill._remember = remember
    try:
        result = run(box, x, settings, tmp_path / "run")
        resumed = run(
            box, x, replace(settings, epochs=3, max_queries=400), tmp_path / "run", resume=True
        )
    finally:
        distill.Distill._remember = original
    assert seen and all(shape == (3, 64, 64) for shape in seen)
    assert result.record.epochs_done == 2 and resumed.record.epochs_done == 3
    assert distill.shrink(torch.zeros(1, 3, 28, 28)).shape == (1, 3, 28, 28)  # small: as is


class Seen(TorchModel):
    """The digits model, keeping the range of the values it is shown."""

    low, high = float("inf"), float("-inf")

    def _answer(self, images):
        self.low, self.high = (
            min(self.low, float(images.min())),
            max(self.high, float(images.max())),
        )
        return super()._answer(images)


class Overshoot(torch.nn.Module):
    """A front end whose outputs leave [0,1] on both sides."""

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(3.0))

    def forward(self, x):
        return self.gain * (x - 0.5)


def test_the_black_box_is_shown_front_end_outputs_clipped_alike_in_training_and_certification(
    digits_model, slice_, tmp_path
):
    """A local model gets noisy values unclipped without a front end (Cohen et al.), but a
    front end's output is an image: the model must see in certification what training showed
    it, or the front end is certified on inputs it was never trained for."""
    x, _, x_te, _ = slice_
    model = torch.jit.load(str(digits_model))
    plain = Seen(model, {"protocol": "torch", "target": "seen"}, torch.device("cpu"), 256)
    Smoothed(plain, SIGMA, device="cpu").certify_sync(x_te[0], n0=10, n=50)
    assert plain.low < 0 and plain.high > 1  # no front end: unclipped, as before
    seen = Seen(model, {"protocol": "torch", "target": "seen"}, torch.device("cpu"), 256)
    smoothed = Smoothed(seen, SIGMA, frontend=Overshoot(), device="cpu")
    smoothed.certify_sync(x_te[0], n0=10, n=50)
    assert (seen.low, seen.high) == (0.0, 1.0)
    _, _, context = smoothed._prepare(x_te[0])
    assert context["frontend_output"] == "clipped to [0,1]"  # a new cache key, not old answers
    trained = Seen(model, {"protocol": "torch", "target": "seen"}, torch.device("cpu"), 256)
    settings = TrainSettings(sigma=SIGMA, method="spsa", epochs=1, max_queries=400,
                             pretrain_epochs=0, passes=1, force=True)  # fmt: skip
    run(trained, x[:40], settings, tmp_path / "run")
    assert trained.low >= 0.0 and trained.high <= 1.0 and trained.high > trained.low


def test_pre_training_says_what_it_does_and_advances_once_per_batch(box, slice_, tmp_path):
    logs: list[str] = []
    asyncio.run(train(box, slice_[0], None, TrainSettings(sigma=SIGMA, objective="mse",
                pretrain_epochs=3), tmp_path / "m", progress=no_progress, log=logs.append))  # fmt: skip
    assert any("pre-training the denoiser" in m and "no queries" in m for m in logs), logs
    steps: list[int] = []
    frontend = build(FrontEndConfig("denoiser", 1, 28, 28, SIGMA))
    x = torch.from_numpy(slice_[0][:130])
    pretrain_mse(frontend, x, SIGMA, epochs=2, seed=0, advance=steps.append)
    assert len(steps) == 2 * 3  # ceil(130 / 64) batches per epoch


def test_each_epoch_says_what_it_spends_and_what_validation_found(box, slice_, tmp_path):
    logs: list[str] = []
    settings = TrainSettings(sigma=SIGMA, epochs=1, max_queries=600, pretrain_epochs=1, passes=1)
    asyncio.run(train(box, slice_[0], None, settings, tmp_path / "r", progress=no_progress,
                      log=logs.append))  # fmt: skip
    assert any(m.startswith("epoch 1: asking ") for m in logs), logs
    assert any("the surrogate agreed with the black box on" in m for m in logs), logs
    done = [m for m in logs if m.startswith("epoch 1 of 1: noisy accuracy")]
    assert len(done) == 1 and "queries; keeping epoch" in done[0], logs


@pytest.mark.slow  # seconds of training in process: in make test, not test-fast
def test_large_images_train_a_part_at_a_time_with_the_whole_batchs_gradient():
    """At 224×224 a training batch goes through the front end 5 images at a time (one
    activation of a part ≤ 16 MiB under the default --max-memory, 10 at 2G): the gradient is
    the whole batch's up to rounding; at 28×28 the batch is one part, as before."""
    from torch.nn import functional as F

    from blackbox_smooth import memory
    from blackbox_smooth.frontends import apply, parts
    from blackbox_smooth.frontends.denoiser import Denoiser
    from blackbox_smooth.training.objectives import backward_mean

    assert [p.stop - p.start for p in parts(64, (3, 224, 224))] == [5] * 12 + [4]
    memory.use("2G")
    assert [p.stop - p.start for p in parts(64, (3, 224, 224))] == [10] * 6 + [4]
    memory.use("1G")
    assert parts(334, (1, 28, 28)) == [slice(0, 334)] and len(parts(335, (1, 28, 28))) == 2
    assert (
        parts(0, (3, 224, 224)) == []
        and apply(Denoiser(3), torch.rand(0, 3, 224, 224)).shape[0] == 0
    )
    torch.manual_seed(0)
    for shape, count in (((3, 224, 224), 24), ((1, 28, 28), 64)):
        # in float64, so that the summation order's rounding cannot hide a wrong weighting
        frontend, head = Denoiser(shape[0]).double(), torch.nn.Linear(shape[0], 4).double()
        x, t = torch.rand(count, *shape, dtype=torch.float64), torch.randint(0, 4, (count,))
        sizes = []

        def loss_of(noisy, targets, frontend=frontend, head=head, sizes=sizes):
            sizes.append(len(noisy))
            return F.cross_entropy(head(apply(frontend, noisy).mean((2, 3))), targets)

        # the reference: the whole batch through the front end at once
        loss = F.cross_entropy(head(frontend(x).clamp(0, 1).mean((2, 3))), t)
        loss.backward()
        whole, expected = float(loss.detach()), [p.grad.clone() for p in frontend.parameters()]
        frontend.zero_grad()
        total = backward_mean(x, t, loss_of)
        assert sizes == ([5, 5, 5, 5, 4] if count == 24 else [64])
        assert abs(total - whole) < 1e-12
        got = [p.grad for p in frontend.parameters()]
        for a, b in zip(got, expected, strict=True):
            assert float((a - b).norm()) <= 1e-10 * float(b.norm()), (a - b).norm()
        with torch.no_grad():
            assert torch.allclose(apply(frontend, x), frontend(x).clamp(0, 1), atol=1e-12)
