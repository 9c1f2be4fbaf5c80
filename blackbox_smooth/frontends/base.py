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

from ..blackbox import MAX_CLASSES, labels_in, labels_out
from ..errors import UsageError
from ..inputs import (
    MAX_CONFIG_BYTES,
    check_file,
    memory_bytes,
    read_json,
    shown,
    want_float,
    want_int,
    want_str,
)
from ..kinds import KINDS
from ..memory import release, scaled
from ..runfolder import FRONTEND, SETTINGS, recover, settings_file, write_atomically
from .record import TrainingRecord, migrate

WEIGHTS = "frontend.safetensors"
CONFIG = SETTINGS[FRONTEND]  # frontend.json


@dataclass
class FrontEndConfig:
    """What a front end is and what it was trained for; saved as frontend.json, beside its
    training record (record.py)."""

    kind: str  # prompt | denoiser | coordinator
    channels: int
    height: int
    width: int
    sigma: float
    prompt_width: int = 0  # prompt: 0 = full image, else a frame this many pixels wide
    lora_rank: int = 0  # 0: all weights train; R > 0: LoRA adapters of rank R through peft
    head: bool = False  # an output head after the body (head.py); only the head trains
    blackbox: str | None = None  # fingerprint of the black box it was trained against
    blackbox_description: dict[str, Any] = field(default_factory=dict)
    method: str | None = None
    objective: str | None = None
    trainable_parameters: int = 0

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
    """The front end of `config`; with `lora_rank` or `head`, `base_state` (pre-trained
    weights) first. Initial weights depend on `seed` only, never on the global random state."""
    from .head import WithHead

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = _base_module(config)
        if base_state is not None and (config.lora_rank or config.head):
            module.load_state_dict(base_state)
        if config.lora_rank:
            module = add_lora(module, config.lora_rank)
        if config.head:
            module = WithHead(module, config.channels)
    return module


# One hidden activation of one part of a batch, under the default --max-memory (scaled to the
# run's): a backward pass holds a dozen and more of them, and their workspace.
PART_BYTES = 16 * 2**20


def parts(n: int, shape: tuple[int, ...] | torch.Size) -> list[slice]:
    """A batch of `n` images of `shape` (…×H×W) in parts small enough that one activation of
    16 float32 channels (the denoiser's) stays under PART_BYTES: memory bounded at any image
    size. At 28×28 a batch of up to 334 images is one part; at 224×224 parts are 5 images."""
    size = max(1, scaled(PART_BYTES) // (16 * 4 * shape[-2] * shape[-1]))
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def apply(frontend: nn.Module, noisy: torch.Tensor) -> torch.Tensor:
    """What the black box is shown: the front end's output clipped to [0,1], the range of an
    image. Training, validation and certification all call this, so that a local model is
    certified on the very inputs the front end was trained for (an encoded image could not
    carry values outside [0,1] anyway). Large batches go through a part at a time."""
    pieces = parts(len(noisy), noisy.shape)
    if len(pieces) <= 1:
        return frontend(noisy).clamp(0.0, 1.0)
    if torch.is_grad_enabled():  # training: each part's graph is kept, so is each output
        return torch.cat([frontend(noisy[p]).clamp(0.0, 1.0) for p in pieces])
    out = torch.empty_like(noisy)  # each part written in place: no second copy to concatenate
    for p in pieces:
        out[p] = frontend(noisy[p]).clamp_(0.0, 1.0)
    release()  # large images: the parts' activations go back to the system, not to the heap
    return out


def trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def save_pretrained(
    module: nn.Module,
    config: FrontEndConfig,
    out: str | os.PathLike[str],
    record: TrainingRecord | None = None,
    **extra: torch.Tensor,
) -> None:
    """Write weights, config and training record as one folder swap: a crash leaves the
    previous checkpoint."""
    config.trainable_parameters = trainable_parameters(module)
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    tensors.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in extra.items()})
    if "extra.targets" in tensors:  # the black box's answers: OTHER as -1 on disk
        tensors["extra.targets"] = labels_out(tensors["extra.targets"])
    settings = {**asdict(config), **(record or TrainingRecord()).to_json()}

    def write(folder: Path) -> None:
        save_file(tensors, str(folder / WEIGHTS))
        (folder / CONFIG).write_text(json.dumps(settings, indent=2, allow_nan=False))

    write_atomically(out, write, FRONTEND)


MAX_SIDE = 8192  # pixels, as --size allows
MAX_PIXELS = 4096 * 4096  # height × width of a front end's input
MAX_CHANNELS = 4
MAX_LORA_RANK = 1024


def check_config(data: Any, where: str) -> FrontEndConfig:
    """frontend.json → FrontEndConfig, every field's type and range checked first, so that
    `build` allocates only what a real run could ask for (a 60000×60000 prompt is refused
    here, in one line). Unknown keys are ignored, as newer versions may add some."""
    if not isinstance(data, dict):
        raise UsageError(f"{where} must hold a JSON object; train again or restore it")
    missing = [k for k in ("kind", "channels", "height", "width", "sigma") if k not in data]
    if missing:
        raise UsageError(f"{where} lacks {', '.join(missing)}; train again or restore it")
    if data["kind"] not in KINDS:
        raise UsageError(
            f"{where}: 'kind' must be one of {', '.join(KINDS)}, not {shown(data['kind'])}"
        )
    want_int(data, "channels", where, 1, MAX_CHANNELS)
    height = want_int(data, "height", where, 1, MAX_SIDE)
    width = want_int(data, "width", where, 1, MAX_SIDE)
    if height * width > MAX_PIXELS:
        raise UsageError(
            f"{where}: {height}×{width} is over {MAX_PIXELS:,} pixels, more than a front end "
            "takes: train one for a smaller --size"
        )
    want_float(data, "sigma", where)
    if "prompt_width" in data:
        want_int(data, "prompt_width", where, 0, min(height, width))
    if "lora_rank" in data:
        want_int(data, "lora_rank", where, 0, MAX_LORA_RANK)
    if "head" in data and not isinstance(data["head"], bool):
        raise UsageError(f"{where}: 'head' must be true or false, not {shown(data['head'])}")
    for key in ("blackbox", "method", "objective"):
        if key in data:
            want_str(data, key, where, null=True, limit=200)
    if "trainable_parameters" in data:
        want_int(data, "trainable_parameters", where, 0, None)
    if "blackbox_description" in data and not isinstance(data["blackbox_description"], dict):
        raise UsageError(
            f"{where}: 'blackbox_description' must be an object, "
            f"not {shown(data['blackbox_description'])}"
        )
    migrate(data, where)  # the training record beside it, checked alike
    return FrontEndConfig.from_json(data)


def _read_settings(run: str | os.PathLike[str]) -> tuple[Any, str]:
    recover(run)
    path = settings_file(run, FRONTEND)
    if not os.path.lexists(path):
        raise UsageError(f"{run} is not a front-end run folder (no {CONFIG}); train one first")
    data = read_json(path, "front-end config", MAX_CONFIG_BYTES, f"the {CONFIG} of a run")
    return data, f"{path}"


def read_config(run: str | os.PathLike[str]) -> FrontEndConfig:
    """What the run's front end is (its training record checked too)."""
    return check_config(*_read_settings(run))


def read_record(run: str | os.PathLike[str]) -> TrainingRecord:
    """The run's training record, in the current layout whatever version wrote it."""
    data, where = _read_settings(run)
    check_config(data, where)
    return migrate(data, where)


def _check_header(weights: Path, module: nn.Module, config: FrontEndConfig) -> None:
    """Compare the tensors the file's header declares with the module's state dict, before any
    tensor is read: a header claiming huge tensors is refused without allocating them."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            names = list(f.keys())  # noqa: SIM118 (a safe_open is not a dict)
            declared = {name: tuple(f.get_slice(name).get_shape()) for name in names}
    except Exception as e:  # safetensors raises its own error types
        raise UsageError(f"{weights} is not a valid safetensors file ({e})") from e
    state = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    weights_only = {k: v for k, v in declared.items() if not k.startswith("extra.")}
    if weights_only != state:
        raise UsageError(f"{weights} does not match its {CONFIG} ({config.kind})")
    targets = declared.get("extra.targets")
    if targets is not None and len(targets) != 1:
        raise UsageError(f"{weights} is damaged (its targets are not a list of classes)")


def from_pretrained(
    run: str | os.PathLike[str], device: torch.device | str = "cpu"
) -> tuple[nn.Module, FrontEndConfig, dict[str, torch.Tensor]]:
    """(module, config, extra tensors) from a run folder written by `save_pretrained`.

    frontend.json is checked before anything is built; the weights' header before any tensor is
    read (safetensors itself checks that the declared tensors fit the file)."""
    config = read_config(run)
    weights = Path(run) / WEIGHTS
    if not os.path.lexists(weights):
        raise UsageError(f"{run} has no {WEIGHTS}; the run did not finish an epoch")
    check_file(weights, "front-end weights", memory_bytes(), f"the {WEIGHTS} of a run")
    module = build(config)
    _check_header(weights, module, config)
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types
        raise UsageError(f"{weights} is not a valid safetensors file ({e})") from e
    extra = {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
    state = {k: v for k, v in tensors.items() if not k.startswith("extra.")}
    targets = extra.get("targets")
    if targets is not None and (
        targets.dtype.is_floating_point
        or targets.dtype.is_complex
        or targets.dtype == torch.bool
        or (targets.numel() and not (-1 <= int(targets.min()) <= int(targets.max()) < MAX_CLASSES))
    ):
        raise UsageError(f"{weights} is damaged (its targets are not class indices); train again")
    if targets is not None:
        extra["targets"] = labels_in(targets)
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise UsageError(f"{weights} does not match its {CONFIG} ({config.kind})") from e
    return module.to(device), config, extra
