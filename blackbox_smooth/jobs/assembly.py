"""Building a smoothed classifier from the options: the black box, the front end or LoRA
adapter checked to fit the setting, the cache, the query budget. Every job builds through here;
so do the Ray workers (cluster.py) and the proxy's replicas."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from .. import memory
from ..adapters import open_blackbox
from ..adapters.local import convention_hint
from ..blackbox import BlackBox, differences
from ..cache import BlockCache, default_cache_dir
from ..data import Fit, load_image, parse_size
from ..errors import UsageError, note, warn
from ..frontends import from_pretrained
from ..lora import read_run
from ..options import ImageOptions, SmoothingOptions
from ..smooth import Smoothed, resolve_device

CANARY = 8  # cached samples asked again before a remote endpoint's cached answers are replayed
T = TypeVar("T")


def open_smoothed(
    options: SmoothingOptions, image_shape: tuple[int, ...] | None = None
) -> Smoothed:
    """The smoothed classifier of `options` for images of `image_shape` (C, H, W): a front end
    or LoRA adapter made for another σ, size or black box is refused unless `force`."""
    memory.use(options.wire.max_memory)  # the run's budget: what each step may hold
    device = resolve_device(options.device)
    adapter = None if options.adapter is None else str(options.adapter)
    blackbox = open_blackbox(options.endpoint, options.wire, device, adapter)
    if options.adapter is not None:
        run = read_run(options.adapter)
        size = (run.channels, run.height, run.width)
        check_fit(f"adapter {options.adapter}", run.sigma, size, options, image_shape)
    store = None
    if not options.no_cache and (options.cache is not None or blackbox.cache_by_default):
        store = BlockCache(options.cache if options.cache is not None else default_cache_dir())
    frontend = None
    if options.frontend is not None:
        frontend = _open_frontend(options, blackbox, image_shape, device)
    return Smoothed(
        blackbox,
        options.sigma,
        frontend=frontend,
        seed=options.seed,
        cache=store,
        concurrency=options.wire.concurrency,
        max_queries=options.max_queries,
        device=device,
        # a model behind an address may change while its cached answers stay (a file model
        # is known by its content): check a few before replaying them
        canary=CANARY if options.endpoint.remote else 0,
    )


def open_for(options: SmoothingOptions, arrays: Sequence[np.ndarray]) -> Smoothed:
    """`open_smoothed` for these images; a local model told no input convention is checked
    against the usual one on the first (adapters.local.convention_hint: one line if it differs)."""
    smoothed = open_smoothed(options, common_shape(arrays))
    convention_hint(options.endpoint, options.wire, smoothed.blackbox, arrays)
    return smoothed


def run_then_close(smoothed: Smoothed, work: Callable[[], Awaitable[T]]) -> T:
    """Run `work` to its end, then close the smoothed classifier's connections, failed or not;
    say what checking the cached answers cost, once per run that did."""

    async def main() -> T:
        try:
            return await work()
        finally:
            await smoothed.aclose()

    result = asyncio.run(main())
    spent = smoothed.votes.canary_sent
    if spent:
        note(
            f"asked the endpoint {spent} cached samples again before replaying its cached "
            f"answers ({spent} queries): they agree"
        )
    return result


def _open_frontend(
    options: SmoothingOptions,
    blackbox: BlackBox,
    shape: tuple[int, ...] | None,
    device: torch.device,
) -> torch.nn.Module:
    assert options.frontend is not None
    module, config, _ = from_pretrained(options.frontend, device)
    size = (config.channels, config.height, config.width)
    other_box = None
    if config.blackbox != blackbox.fingerprint:
        other_box = differences(config.blackbox_description, blackbox.description) or "·"
    check_fit(f"front end {options.frontend}", config.sigma, size, options, shape, other_box)
    return module


def check_fit(
    what: str,
    sigma: float,
    size: tuple[int, int, int],
    options: SmoothingOptions,
    shape: tuple[int, ...] | None,
    other_blackbox: str | None = None,
) -> None:
    """A trained part made for another σ, size or black box: its certificates would still be
    valid, its accuracy would not. Refused unless --force, then a warning."""
    problems = []
    if not math.isclose(sigma, options.sigma):
        problems.append(f"σ={sigma}, not {options.sigma}")
    if shape is None or size != tuple(shape):
        problems.append(f"images of {'×'.join(map(str, size))} (resize with --size HxW)")
    if other_blackbox:  # what differs, where the descriptions tell ("·" where they do not)
        how = "" if other_blackbox == "·" else f": {other_blackbox}"
        problems.append(f"another black box{how}")
    if not problems:
        return
    message = f"{what} was trained for {'; '.join(problems)}"
    if not options.force:
        same = (
            "; if it is the same model moved to another address, give the address it was "
            "trained at as --endpoint-id"
            if other_blackbox
            else ""
        )
        raise UsageError(f"{message}: train one for this setting, or pass --force{same}")
    warn(f"{message} (--force: certificates stay valid, accuracy may not)")


def files_read(options: SmoothingOptions, *more: Path | None) -> list[Path | str]:
    """Every file or folder a job reads, so that no output folder can swallow one."""
    wire = options.wire
    files = [
        options.endpoint.file,
        wire.labels,
        wire.protocol_config,
        wire.ca_bundle,
        options.frontend,
        options.adapter,
        *more,
    ]
    return [p for p in files if p is not None] + [options.cache or default_cache_dir()]


def load_images(paths: Sequence[Path], imaging: ImageOptions) -> list[np.ndarray]:
    """Decode every image before a query is sent: a broken file costs nothing."""
    size, fit = parse_size(imaging.size), Fit.of(imaging)
    return [load_image(p, size, imaging.grayscale, fit) for p in paths]


def common_shape(arrays: Sequence[np.ndarray]) -> tuple[int, ...] | None:
    shapes = {tuple(a.shape) for a in arrays}
    return shapes.pop() if len(shapes) == 1 else None
