"""Trainable front ends that sit before the black box: f(front_end(x + δ)).

Shaped like peft: a config dataclass (what the front end is) beside a training record (what
its run did: record.py), `build` to make the module, `save_pretrained` /
`from_pretrained` for a run folder (safetensors weights + frontend.json, nothing that unpickles).
"""

from .base import (
    KINDS,
    FrontEndConfig,
    apply,
    build,
    from_pretrained,
    parts,
    read_record,
    save_pretrained,
    trainable_parameters,
)
from .record import TrainingRecord, migrate

__all__ = [
    "KINDS",
    "FrontEndConfig",
    "TrainingRecord",
    "apply",
    "build",
    "from_pretrained",
    "migrate",
    "parts",
    "read_record",
    "save_pretrained",
    "trainable_parameters",
]
