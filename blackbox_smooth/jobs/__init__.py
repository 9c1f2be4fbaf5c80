"""What each command does, as a library call: certify, predict, evaluate, train, labels,
serve, proxy and the cache's info and clear.

Each takes the typed options of options.py, builds what it needs (assembly.py: the black box,
the front end or LoRA adapter, the cache and the query budget), runs, and returns a frozen
result. The CLI parses, calls one of these and prints; the demo and the benchmarks call them
too. Progress and per-image results reach the caller through callbacks (progress.py draws
them on stderr), so nothing here prints to stdout.

A job's module loads when the job is first named (`jobs.certify` loads images.py, and torch
with it): the CLI imports this package for `--help` too, which must stay light, and certify
need not load what proxy does (FastAPI).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .assembly import files_read, load_images, open_smoothed
    from .caches import CacheReport, cache_info, clear_cache
    from .evaluation import Evaluation, evaluate, evaluation_images
    from .images import (
        ImageResult,
        LabelAnswer,
        certify,
        labels,
        not_fresh,
        predict,
        worst_case_queries,
    )
    from .services import proxy, proxy_app, serve
    from .training import train, train_lora

MODULES = {
    "assembly": ("files_read", "load_images", "open_smoothed"),
    "caches": ("CacheReport", "cache_info", "clear_cache"),
    "evaluation": ("Evaluation", "evaluate", "evaluation_images"),
    "images": ("ImageResult", "LabelAnswer", "certify", "labels", "not_fresh", "predict",
               "worst_case_queries"),
    "services": ("proxy", "proxy_app", "serve"),
    "training": ("train", "train_lora"),
}  # fmt: skip
_WHERE = {name: module for module, names in MODULES.items() for name in names}
__all__ = [
    "CacheReport", "Evaluation", "ImageResult", "LabelAnswer", "cache_info", "certify",
    "clear_cache", "evaluate", "evaluation_images", "files_read", "labels", "load_images",
    "not_fresh", "open_smoothed", "predict", "proxy", "proxy_app", "serve", "train",
    "train_lora", "worst_case_queries",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
