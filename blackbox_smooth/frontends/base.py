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
    is_int,
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

WEIGHTS = "frontend.safetensors"
CONFIG = SETTINGS[FRONTEND]  # frontend.json


@dataclass
class FrontEndConfig:
    """What a front end is and what it was trained for; saved as frontend.json."""

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
    queries: int = 0
    epochs_done: int = 0
    validation: list[dict[str, Any]] = field(default_factory=list)
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
    module: nn.Module, config: FrontEndConfig, out: str | os.PathLike[str], **extra: torch.Tensor
) -> None:
    """Write weights and config as one folder swap: a crash leaves the previous checkpoint."""
    config.trainable_parameters = trainable_parameters(module)
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    tensors.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in extra.items()})
    if "extra.targets" in tensors:  # the black box's answers: OTHER as -1 on disk
        tensors["extra.targets"] = labels_out(tensors["extra.targets"])

    def write(folder: Path) -> None:
        save_file(tensors, str(folder / WEIGHTS))
        (folder / CONFIG).write_text(json.dumps(asdict(config), indent=2, allow_nan=False))

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
    for key in ("queries", "epochs_done", "trainable_parameters"):
        if key in data:
            want_int(data, key, where, 0, None)
    if "validation" in data and not isinstance(data["validation"], list):
        raise UsageError(f"{where}: 'validation' must be a list, not {shown(data['validation'])}")
    for key in ("blackbox_description", "extra"):
        if key in data and not isinstance(data[key], dict):
            raise UsageError(f"{where}: {key!r} must be an object, not {shown(data[key])}")
    _check_training_record(
        data.get("validation", []), data.get("extra", {}), data.get("epochs_done", 0), where
    )
    return FrontEndConfig.from_json(data)


def _check_training_record(
    rows: list[Any], extra: dict[str, Any], epochs_done: int, where: str
) -> None:
    """The validation rows and run counters that resuming and printing a run compute with:
    a hand-edited or damaged value is named here rather than met as a traceback later."""
    epochs: list[int] = []
    for i, row in enumerate(rows):
        at = f"{where}: validation row {i + 1}"
        if not isinstance(row, dict) or "epoch" not in row or "noisy_accuracy" not in row:
            raise UsageError(f"{at} must be an object with 'epoch' and 'noisy_accuracy'")
        epochs.append(want_int(row, "epoch", at, 0, None))
        if not 0 <= want_float(row, "noisy_accuracy", at, allow_zero=True) <= 1:
            raise UsageError(f"{at}: 'noisy_accuracy' must lie in [0, 1]")
        for key, length in (("interval", 2), ("vs_start", 3), ("consistency", None)):
            if key not in row:
                continue
            value = row[key]
            numbers = isinstance(value, list) and all(
                (is_int(v) or isinstance(v, float)) for v in value
            )
            if not numbers or not value or (length is not None and len(value) != length):
                raise UsageError(f"{at}: {key!r} must be a list of numbers, not {shown(value)}")
        if "queries" in row:
            want_int(row, "queries", at, 0, None)
        for key in ("confirmed", "confirmed_wrong"):
            if key in row:
                _want_counts(row[key], f"{at}: {key!r}")
    for key in ("best_epoch", "head_stage_from", "stopped_early"):
        if key in extra:
            want_int(extra, key, f"{where}: extra", 0, None)
    if "scored" in extra and not isinstance(extra["scored"], bool):
        raise UsageError(
            f"{where}: extra 'scored' must be true or false, not {shown(extra['scored'])}"
        )
    confirmation = extra.get("confirmation")
    if confirmation is not None:
        at = f"{where}: extra 'confirmation'"
        keys = {"draws", "images", "active", "start", "queries"}
        if not isinstance(confirmation, dict) or keys - confirmation.keys():
            raise UsageError(f"{at} must be an object with {', '.join(sorted(keys))}")
        for key in ("draws", "images", "queries"):
            want_int(confirmation, key, at, 0, None)
        if not isinstance(confirmation["active"], bool):
            raise UsageError(f"{at}: 'active' must be true or false")
        if confirmation["start"] is not None:
            _want_counts(confirmation["start"], f"{at}: 'start'", confirmation["images"])
            wrong = confirmation.get("start_wrong")  # absent from older runs: asked again
            if wrong is not None:
                most = confirmation["images"] * confirmation["draws"]
                _want_counts(wrong, f"{at}: 'start_wrong'", most, "answers")
                if len(wrong) != len(confirmation["start"]):
                    raise UsageError(
                        f"{at}: 'start_wrong' must have one count per level of 'start'"
                    )
    kept = extra.get("best_epoch", epochs_done)  # a run without one keeps its last epoch
    if epochs and kept not in epochs:
        raise UsageError(
            f"{where}: extra 'best_epoch' {kept} is not among its validated epochs; "
            "train again or restore it"
        )


def _want_counts(value: Any, where: str, high: int | None = None, of: str = "images") -> None:
    """Confirmation counts: a list of integers, one per level."""
    if not isinstance(value, list) or not all(is_int(v) and v >= 0 for v in value):
        raise UsageError(f"{where} must be a list of counts, not {shown(value)}")
    if high is not None and any(v > high for v in value):
        raise UsageError(f"{where} counts more than its {high} {of}")


def read_config(run: str | os.PathLike[str]) -> FrontEndConfig:
    recover(run)
    path = settings_file(run, FRONTEND)
    if not os.path.lexists(path):
        raise UsageError(f"{run} is not a front-end run folder (no {CONFIG}); train one first")
    data = read_json(path, "front-end config", MAX_CONFIG_BYTES, f"the {CONFIG} of a run")
    return check_config(data, f"{path}")


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
