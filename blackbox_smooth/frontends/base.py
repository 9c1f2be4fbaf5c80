"""FrontEndConfig, building, LoRA wrapping (peft), and the run folder format."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import UsageError
from ..runfolder import recover, write_atomically

WEIGHTS = "frontend.safetensors"
CONFIG = "config.json"


@dataclass
class FrontEndConfig:
    """What a front end is and what it was trained for; saved as config.json."""

    kind: str  # prompt | denoiser | coordinator
    channels: int
    height: int
    width: int
    sigma: float
    prompt_width: int = 0  # prompt: 0 = full image, else a frame this many pixels wide
    lora_rank: int = 0  # 0: all weights train; R > 0: LoRA adapters of rank R through peft
    blackbox: str | None = None  # fingerprint of the black box it was trained against
    blackbox_description: dict[str, Any] = field(default_factory=dict)
    method: str | None = None
    objective: str | None = None
    queries: int = 0
    epochs_done: int = 0
    validation: list[dict[str, float]] = field(default_factory=list)
    trainable_parameters: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FrontEndConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _base_module(config: FrontEndConfig) -> nn.Module:
    from .coordinator import Coordinator
    from .denoiser import Denoiser
    from .prompt import Prompt

    if config.kind == "prompt":
        return Prompt(config.channels, config.height, config.width, config.prompt_width)
    if config.kind == "denoiser":
        return Denoiser(config.channels)
    if config.kind == "coordinator":
        return Coordinator(config.channels)
    raise UsageError(f"unknown front end {config.kind!r}: use prompt, denoiser or coordinator")


def lora_targets(module: nn.Module) -> list[str]:
    """Names of the trainable Conv2d/Linear layers LoRA adapts."""
    return [
        name
        for name, m in module.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear) and any(p.requires_grad for p in m.parameters())
    ]


def add_lora(module: nn.Module, rank: int) -> nn.Module:
    """Freeze `module` and train LoRA adapters of rank `rank` on its conv/linear layers."""
    from peft import LoraConfig, get_peft_model  # slow import: only here

    targets = lora_targets(module)
    if not targets:
        raise UsageError("--lora-rank needs a front end with conv or linear layers (not prompt)")
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0)
    return get_peft_model(module, config)


def build(
    config: FrontEndConfig, base_state: dict[str, torch.Tensor] | None = None, seed: int = 0
) -> nn.Module:
    """The front end of `config`; with `lora_rank`, `base_state` (pre-trained weights) first.
    Initial weights depend on `seed` only, never on the global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = _base_module(config)
        if config.lora_rank:
            if base_state is not None:
                module.load_state_dict(base_state)
            module = add_lora(module, config.lora_rank)
    return module


def trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def save_pretrained(
    module: nn.Module, config: FrontEndConfig, out: str | os.PathLike[str], **extra: torch.Tensor
) -> None:
    """Write weights and config as one folder swap: a crash leaves the previous checkpoint."""
    config.trainable_parameters = trainable_parameters(module)
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    tensors.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in extra.items()})

    def write(folder: Path) -> None:
        save_file(tensors, str(folder / WEIGHTS))
        (folder / CONFIG).write_text(json.dumps(asdict(config), indent=2))

    write_atomically(out, write)


def read_config(run: str | os.PathLike[str]) -> FrontEndConfig:
    recover(run)
    path = Path(run) / CONFIG
    if not path.is_file():
        raise UsageError(f"{run} is not a front-end run folder (no {CONFIG}); train one first")
    try:
        return FrontEndConfig.from_json(json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise UsageError(f"{path} is damaged ({e}); train again or restore it") from e


def from_pretrained(
    run: str | os.PathLike[str], device: torch.device | str = "cpu"
) -> tuple[nn.Module, FrontEndConfig, dict[str, torch.Tensor]]:
    """(module, config, extra tensors) from a run folder written by `save_pretrained`."""
    config = read_config(run)
    weights = Path(run) / WEIGHTS
    if not weights.is_file():
        raise UsageError(f"{run} has no {WEIGHTS}; the run did not finish an epoch")
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types
        raise UsageError(f"{weights} is not a valid safetensors file ({e})") from e
    extra = {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
    state = {k: v for k, v in tensors.items() if not k.startswith("extra.")}
    module = build(config)
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise UsageError(f"{weights} does not match its config.json ({config.kind})") from e
    return module.to(device), config, extra
