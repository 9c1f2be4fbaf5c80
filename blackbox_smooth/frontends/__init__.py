"""Trainable front ends that sit before the black box: f(front_end(x + δ)).

Shaped like peft: a config dataclass, `build` to make the module, `save_pretrained` /
`from_pretrained` for a run folder (safetensors weights + frontend.json, nothing that unpickles).
"""

from .base import (
    KINDS,
    FrontEndConfig,
    apply,
    build,
    from_pretrained,
    parts,
    save_pretrained,
    trainable_parameters,
)

__all__ = [
    "KINDS",
    "FrontEndConfig",
    "apply",
    "build",
    "from_pretrained",
    "parts",
    "save_pretrained",
    "trainable_parameters",
]
