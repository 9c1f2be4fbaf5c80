"""PEFTSmoothing's white-box method: LoRA inside a local classifier through peft."""

import pytest
import torch

from blackbox_smooth.adapters import open_blackbox
from blackbox_smooth.digits import DigitsCNN, digits_split
from blackbox_smooth.errors import UsageError
from blackbox_smooth.lora import default_targets, train_classifier
from blackbox_smooth.progress import no_progress
from blackbox_smooth.smooth import Smoothed

from .conftest import run_cli

MODEL_SOURCE = """
import torch
from blackbox_smooth.digits import DigitsCNN

def build():
    model = DigitsCNN()
    model.load_state_dict(torch.jit.load({path!r}).state_dict())
    return model

def other():
    torch.manual_seed(1)
    return DigitsCNN()
"""


@pytest.fixture()
def module_file(tmp_path, digits_model):
    path = tmp_path / "model.py"
    path.write_text(MODEL_SOURCE.format(path=str(digits_model)))
    return path


def base_model(digits_model):
    model = DigitsCNN()
    model.load_state_dict(torch.jit.load(str(digits_model)).state_dict())
    return model


def test_only_lora_parameters_train_and_the_base_stays_bit_identical(digits_model, tmp_path):
    model = base_model(digits_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = digits_split()[0][:200], digits_split()[1][:200]
    adapted, run = train_classifier(model, x, y, sigma=0.5, rank=4, epochs=2,
                                    out=tmp_path / "run", progress=no_progress, log=lambda m: None)  # fmt: skip
    trainable = {n: p.numel() for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(trainable.values()) == run.trainable_parameters < run.total_parameters / 10
    assert (
        run.targets
        == default_targets(base_model(digits_model))
        == ["features.0", "features.3", "head.1"]
    )
    base_after = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in adapted.state_dict().items() if "lora_" not in k
    }  # fmt: skip
    assert base_after.keys() == before.keys()
    assert all(torch.equal(before[k], base_after[k]) for k in before)
    # LoRA did train: the adapted model differs from the base one.
    probe = torch.from_numpy(x[:8]) + 0.5 * torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert not torch.allclose(adapted(probe), base_model(digits_model)(probe))


def test_save_load_certify_gives_the_same_counts(digits_model, module_file, tmp_path):
    x, y, x_te, _ = digits_split()
    adapted, _ = train_classifier(base_model(digits_model), x[:200], y[:200], sigma=0.5, rank=2,
                                  epochs=1, out=tmp_path / "run", progress=no_progress, log=lambda m: None)  # fmt: skip
    from blackbox_smooth.adapters.local import TorchModel

    in_memory = TorchModel(adapted, {"target": "memory"}, torch.device("cpu"))
    loaded = open_blackbox(f"torch:{module_file}:build", adapter=str(tmp_path / "run"))
    counts = []
    for box in (in_memory, loaded):
        s = Smoothed(box, 0.5, seed=3, device="cpu")
        counts.append(s.certify_sync(x_te[0], n0=50, n=2000).counts)
        s.close()
    assert counts[0] == counts[1]
    assert loaded.fingerprint != open_blackbox(f"torch:{module_file}:build").fingerprint


def test_wrong_base_model_and_torchscript_are_refused(
    digits_model, module_file, tmp_path, digit_images
):
    x, y = digits_split()[0][:100], digits_split()[1][:100]
    train_classifier(base_model(digits_model), x, y, sigma=0.5, rank=1, epochs=1,
                     out=tmp_path / "run", progress=no_progress, log=lambda m: None)  # fmt: skip
    with pytest.raises(UsageError, match="another base model"):
        open_blackbox(f"torch:{module_file}:other", adapter=str(tmp_path / "run"))
    r = run_cli("certify", digit_images[0], "-e", f"torch:{module_file}:other", "--adapter",
                tmp_path / "run", "--sigma", "0.5", "--n", "100")  # fmt: skip
    assert r.returncode == 2 and "another base model" in r.stderr
    r = run_cli("train", "--method", "lora", "-e", f"torch:{digits_model}", "--data", tmp_path,
                "--sigma", "0.5", "--out", tmp_path / "x")  # fmt: skip
    assert r.returncode == 2 and "TorchScript" in r.stderr


def test_cli_train_lora_then_certify_with_the_adapter(module_file, tmp_path, digit_images):
    from blackbox_smooth.data import save_image

    x, y = digits_split()[0][:80], digits_split()[1][:80]
    for i in range(len(x)):
        (tmp_path / "data" / str(y[i])).mkdir(parents=True, exist_ok=True)
        save_image(x[i], tmp_path / "data" / str(y[i]) / f"{i}.png")
    r = run_cli("train", "--method", "lora", "-e", f"torch:{module_file}:build", "--data",
                tmp_path / "data", "--sigma", "0.5", "--out", tmp_path / "run", "--epochs", "1",
                "--lora-rank", "2", "--lora-targets", "features.3,head.1",
                "--objective", "classification")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "features.3, head.1" in r.stdout
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()
    c = run_cli("certify", digit_images[0], "-e", f"torch:{module_file}:build", "--adapter",
                tmp_path / "run", "--sigma", "0.5", "--n", "300", "--json", "--no-cache")  # fmt: skip
    assert c.returncode == 0, c.stderr
    assert sum(__import__("json").loads(c.stdout)["counts"].values()) == 300
    e = run_cli("evaluate", "--data", tmp_path / "data", "-e", f"torch:{module_file}:build",
                "--adapter", tmp_path / "run", "--sigma", "0.5", "--n", "200", "--n0", "20",
                "--limit", "6", "--out", tmp_path / "eval", "--no-cache")  # fmt: skip
    assert e.returncode == 0, e.stderr
    assert len((tmp_path / "eval" / "certify.tsv").read_text().splitlines()) == 1 + 6
    bad = run_cli("train", "--method", "lora", "-e", f"torch:{module_file}:build", "--data",
                  tmp_path / "data", "--sigma", "0.5", "--out", tmp_path / "run2",
                  "--lora-targets", "nope")  # fmt: skip
    assert bad.returncode == 2 and "not in the model" in bad.stderr
