"""PEFTSmoothing's white-box method (Fu & Wang 2024): when you own the model, train a few LoRA
parameters inside it on Gaussian-noise-augmented inputs, through `peft`, instead of retraining
it; then certify the adapted model.

A run folder holds peft's own adapter (`adapter_config.json` + `adapter_model.safetensors`,
from `save_pretrained`) and our `lora_run.json` (σ, input size, the base model's state-dict digest,
trainable parameters, validation curve). `load_adapter` refuses an adapter made for another
base model.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .checks import check_sigma
from .digests import module_digest
from .errors import UsageError
from .inputs import (
    MAX_CONFIG_BYTES,
    check_file,
    memory_bytes,
    read_json,
    shown,
    want_float,
    want_int,
    want_str,
)
from .progress import Progress, progress_bar
from .runfolder import LORA, SETTINGS, recover, settings_file, write_atomically
from .training.context import split
from .training.objectives import (
    add_noise,
    batches,
    deterministic,
    epoch_seed,
    generators,
    validation_seed,
)

CONFIG = SETTINGS[LORA]  # lora_run.json


@dataclass
class LoraRun:
    sigma: float
    channels: int
    height: int
    width: int
    base_model: str  # sha256 of the base model's state dict
    rank: int  # 0: full fine-tuning (a baseline, not saved as an adapter)
    targets: list[str]
    objective: str
    trainable_parameters: int = 0
    total_parameters: int = 0
    epochs_done: int = 0
    validation: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def default_targets(model: nn.Module) -> list[str]:
    """Every Conv2d and Linear layer but the last one (the classifier head stays as it is)."""
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    return layers[:-1]


def check_module(model: Any, where: str) -> nn.Module:
    if isinstance(model, torch.jit.ScriptModule):
        raise UsageError(
            f"{where} is TorchScript, which peft cannot wrap: give torch:FILE.py:FUNC, a "
            "function that returns the torch.nn.Module with its weights loaded"
        )
    if not isinstance(model, nn.Module):
        raise UsageError(f"{where} did not return a torch.nn.Module")
    return model


def wrap(model: nn.Module, rank: int, targets: list[str], alpha: float | None = None) -> nn.Module:
    """Freeze `model` and add LoRA adapters of rank `rank` to `targets` (peft); the update is
    scaled by alpha / rank (default alpha = rank)."""
    from peft import LoraConfig, get_peft_model  # slow import: only here

    names = {n for n, _ in model.named_modules()}
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise UsageError(
            f"--lora-targets {', '.join(unknown)} not in the model; its conv/linear layers are "
            + ", ".join(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear))
        )
    # peft scales by lora_alpha / r and takes a float, though its hint says int
    scale: Any = alpha or rank
    config = LoraConfig(r=rank, lora_alpha=scale, target_modules=targets, lora_dropout=0.0)
    return get_peft_model(model, config)


MAX_RANK = 1024
MAX_TARGETS = 10_000
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def load_adapter(model: nn.Module, run: str | os.PathLike[str]) -> tuple[nn.Module, LoraRun]:
    """Apply a saved adapter to its base model; refuse any other base model. Our lora_run.json
    and peft's adapter_config.json are checked before peft reads anything, and whatever peft
    still refuses is one line."""
    from peft import PeftModel

    meta = read_run(run)
    if module_digest(model) != meta.base_model:
        raise UsageError(
            f"adapter {run} was trained for another base model (state-dict digest "
            f"{meta.base_model[:12]}…, this one {module_digest(model)[:12]}…)"
        )
    check_adapter_config(Path(run) / ADAPTER_CONFIG)
    weights = Path(run) / ADAPTER_WEIGHTS
    if not os.path.lexists(weights):
        raise UsageError(f"adapter {run} has no {ADAPTER_WEIGHTS}: train it again")
    check_file(weights, "LoRA adapter weights", memory_bytes(), f"the {ADAPTER_WEIGHTS} of a run")
    try:
        adapted = PeftModel.from_pretrained(model, str(run))
    except Exception as e:  # peft and safetensors raise many types
        lines = [line for line in str(e).splitlines() if line.strip()]
        raise UsageError(
            f"adapter {run} could not be loaded ({type(e).__name__}: "
            f"{lines[0][:300] if lines else ''}): train it again or restore it"
        ) from e
    return adapted.eval(), meta


def check_adapter_config(path: Path) -> dict[str, Any]:
    """peft's adapter_config.json, minimally: a JSON object for a LoRA adapter with a rank in
    1..MAX_RANK and its target modules (names, or one pattern)."""
    where = f"LoRA adapter config {path}"
    data = read_json(
        path, "LoRA adapter config", MAX_CONFIG_BYTES, f"the {ADAPTER_CONFIG} of a run"
    )
    if not isinstance(data, dict):
        raise UsageError(f"{where} must hold a JSON object; train the adapter again")
    if data.get("peft_type", "LORA") != "LORA":
        raise UsageError(f"{where} is for {shown(data['peft_type'])}, not a LoRA adapter")
    if "r" not in data:
        raise UsageError(f"{where} has no rank 'r'; train the adapter again")
    want_int(data, "r", where, 1, MAX_RANK)
    targets = data.get("target_modules")
    if isinstance(targets, str):
        if len(targets) > 10_000:
            raise UsageError(f"{where}: 'target_modules' is too long a pattern")
    elif not (
        isinstance(targets, list)
        and 0 < len(targets) <= MAX_TARGETS
        and all(isinstance(t, str) and len(t) <= 1000 for t in targets)
    ):
        raise UsageError(
            f"{where}: 'target_modules' must be a list of module names, not {shown(targets)}"
        )
    return data


def check_run(data: Any, where: str) -> LoraRun:
    """Our lora_run.json → LoraRun, each field's type and range checked first."""
    if not isinstance(data, dict):
        raise UsageError(f"{where} must hold a JSON object; train the adapter again")
    known = set(LoraRun.__dataclass_fields__)
    required = {
        f.name for f in fields(LoraRun) if f.default is MISSING and f.default_factory is MISSING
    }
    unknown = sorted(set(data) - known)
    missing = sorted(required - set(data))
    if unknown or missing:
        what = [f"lacks {', '.join(missing)}"] if missing else []
        what += [f"has unknown keys {', '.join(shown(k) for k in unknown[:5])}"] if unknown else []
        raise UsageError(f"{where} is damaged ({'; '.join(what)}): train the adapter again")
    want_float(data, "sigma", where)
    want_int(data, "channels", where, 1, 4)
    want_int(data, "height", where, 1, 8192)
    want_int(data, "width", where, 1, 8192)
    want_int(data, "rank", where, 0, MAX_RANK)
    base = want_str(data, "base_model", where, limit=64)
    if not (base and len(base) == 64 and all(c in "0123456789abcdef" for c in base)):
        raise UsageError(f"{where}: 'base_model' must be a sha256 digest, not {shown(base)}")
    want_str(data, "objective", where, limit=100)
    targets = data["targets"]
    if not (
        isinstance(targets, list)
        and len(targets) <= MAX_TARGETS
        and all(isinstance(t, str) and len(t) <= 1000 for t in targets)
    ):
        raise UsageError(f"{where}: 'targets' must be a list of layer names, not {shown(targets)}")
    for key in ("trainable_parameters", "total_parameters", "epochs_done"):
        if key in data:
            want_int(data, key, where, 0, None)
    if "validation" in data and not isinstance(data["validation"], list):
        raise UsageError(f"{where}: 'validation' must be a list, not {shown(data['validation'])}")
    if "seconds" in data:
        want_float(data, "seconds", where, allow_zero=True)
    return LoraRun(**data)


def read_run(run: str | os.PathLike[str]) -> LoraRun:
    recover(run)
    path = settings_file(run, LORA)
    if not os.path.lexists(path) or not os.path.lexists(Path(run) / ADAPTER_CONFIG):
        raise UsageError(f"{run} is not a LoRA adapter run (train one with --method lora)")
    data = read_json(path, "LoRA run config", MAX_CONFIG_BYTES, f"the {CONFIG} of a run")
    return check_run(data, f"LoRA run config {path}")


def noisy_accuracy(
    model: nn.Module, x: torch.Tensor, t: torch.Tensor, sigma: float, seed: int
) -> float:
    noise, _ = generators(validation_seed(seed), x.device)
    with torch.no_grad():
        out = model(add_noise(x, sigma, noise)).argmax(1)
    return float((out == t).float().mean())


def _check_request(
    sigma: float, objective: str, labelled: bool, out: str | os.PathLike[str] | None
) -> None:
    """Refuse, before any work, what train_classifier cannot do."""
    check_sigma(sigma)
    if objective not in ("classification", "stability"):
        raise UsageError("--method lora takes --objective classification or stability")
    if objective == "classification" and not labelled:
        raise UsageError("--objective classification needs one sub-folder per class in --data")
    if out is not None:
        recover(out)
    if out is not None and settings_file(out, LORA).exists():
        raise UsageError(f"{out} already holds a run: choose a new --out")


def _epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: tuple[torch.Tensor, torch.Tensor],
    train_idx: np.ndarray,
    sigma: float,
    batch_size: int,
    seed: int,
    advance: Callable[[int], None],
) -> None:
    """One pass over the training images (`data`: all images and their targets) under noise
    drawn from `seed`, in batches of shuffled order."""
    xt, t = data
    noise, order = generators(seed, xt.device)
    model.train()
    for idx in batches(len(train_idx), batch_size, order):
        rows = torch.from_numpy(train_idx)[idx].to(xt.device)
        loss = F.cross_entropy(model(add_noise(xt[rows], sigma, noise)), t[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
        advance(1)
    model.eval()


@deterministic
def train_classifier(
    model: nn.Module,
    x: np.ndarray,
    labels: np.ndarray | None,
    *,
    sigma: float,
    rank: int = 8,
    targets: list[str] | None = None,
    alpha: float | None = None,
    objective: str = "classification",
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 64,
    val_fraction: float = 0.1,
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
    device: torch.device | None = None,
    log: Callable[[str], None] = print,
    progress: Progress = progress_bar,
) -> tuple[nn.Module, LoraRun]:
    """LoRA (rank > 0) or full fine-tuning (rank 0) of `model` on x + δ, δ ~ N(0, σ²I)."""
    start = time.perf_counter()
    device = device or torch.device("cpu")
    _check_request(sigma, objective, labels is not None, out)
    model = model.to(device).eval()
    base = module_digest(model)
    xt = torch.from_numpy(x).to(device, torch.float32)
    if objective == "stability":  # the model's own clean answers: no labels needed
        with torch.no_grad():
            t = model(xt).argmax(1)
    else:
        assert labels is not None
        t = torch.from_numpy(labels).to(device)
    train_idx, val_idx = split(len(x), val_fraction, seed)
    targets = targets if targets is not None else default_targets(model)
    if rank > 0:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = wrap(model, rank, targets, alpha)
    params = [p for p in model.parameters() if p.requires_grad]
    run = LoraRun(
        sigma=sigma,
        channels=x.shape[1],
        height=x.shape[2],
        width=x.shape[3],
        base_model=base,
        rank=rank,
        targets=targets if rank > 0 else [],
        objective=objective,
        trainable_parameters=sum(p.numel() for p in params),
        total_parameters=sum(p.numel() for p in model.parameters()),
    )
    what = f"LoRA rank {rank} on {', '.join(targets)}" if rank else "full fine-tuning"
    log(f"training {run.trainable_parameters} of {run.total_parameters} parameters ({what})")
    opt = torch.optim.Adam(params, lr=lr)
    x_val, t_val = xt[val_idx], t[val_idx]
    run.validation.append(
        {"epoch": 0, "noisy_accuracy": noisy_accuracy(model, x_val, t_val, sigma, seed)}
    )
    steps = epochs * math.ceil(len(train_idx) / batch_size)
    with progress(f"train lora r={rank}", steps, "batch") as advance:
        for epoch in range(epochs):
            _epoch(model, opt, (xt, t), train_idx, sigma, batch_size, epoch_seed(seed, epoch),
                   advance)  # fmt: skip
            acc = noisy_accuracy(model, x_val, t_val, sigma, seed)
            run.epochs_done = epoch + 1
            run.validation.append({"epoch": epoch + 1, "noisy_accuracy": acc})
            log(f"epoch {epoch + 1} of {epochs}: noisy accuracy {acc:.3f} on the held-out images")
            if out is not None and rank > 0:
                run.seconds = time.perf_counter() - start
                save_run(model, run, out)
    run.seconds = time.perf_counter() - start
    if out is not None and rank > 0:
        save_run(model, run, out)
    return model, run


def save_run(model: nn.Module, run: LoraRun, out: str | os.PathLike[str]) -> None:
    """peft's adapter files plus our lora_run.json, replaced as a whole (never half-written)."""

    def write(folder: Path) -> None:
        model.save_pretrained(str(folder))  # type: ignore[operator]
        (folder / CONFIG).write_text(json.dumps(asdict(run), indent=2))

    write_atomically(out, write, LORA)
