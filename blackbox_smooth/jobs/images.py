"""Jobs on image files: certify or predict each (the smoothed classifier), or show what the
bare endpoint answers for each (to write a label map)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..adapters import open_blackbox
from ..blackbox import BlackBox, labels_out
from ..errors import warn
from ..options import (
    CertifyOptions,
    EndpointOptions,
    ImageOptions,
    SmoothingOptions,
    check_sampling,
)
from ..progress import Progress, no_progress
from ..redaction import server_text
from ..smooth import Certificate, Prediction, Smoothed, resolve_device
from .assembly import load_images, open_for, run_then_close

REUSED = (
    "this image was looked at before under this model, so this attempt may have been chosen "
    "after looking"
)
REUSED_FIX = (
    "; decide the question before looking (--target-radius R stops as soon as it is settled) "
    "and keep the first certificate"
)


def not_fresh(outcome: Certificate | Prediction) -> str:
    """Why an outcome is not fresh, in one line: its look, the first one, α under the union."""
    if outcome.alpha_effective >= 1:
        holds = (
            "its votes include samples an earlier look counted on this seed, so it makes no "
            "claim (α = 1)"
        )
    else:
        holds = (
            f"its claim holds at α = {outcome.alpha_effective:.3g} (a union bound over the "
            f"looks), not {outcome.alpha:g}"
        )
    return (
        f"not fresh: look {outcome.looks} at this image under this model (another: "
        f"{outcome.reused}); {REUSED}, and {holds}{REUSED_FIX}"
    )


@dataclass(frozen=True)
class ImageResult:
    image: Path
    outcome: Certificate | Prediction

    def to_json(self) -> dict[str, Any]:
        return {"image": str(self.image), **self.outcome.to_json()}


def worst_case_queries(images: int, plan: CertifyOptions) -> int:
    """What a --dry-run quotes: every image at the cap."""
    return images * plan.per_image


def certify(
    options: SmoothingOptions,
    images: Sequence[Path],
    plan: CertifyOptions = CertifyOptions(),
    imaging: ImageOptions = ImageOptions(),
    *,
    on_result: Callable[[ImageResult], None] | None = None,
    progress: Progress = no_progress,
) -> list[ImageResult]:
    """CERTIFY each image (adaptively with a target radius or a budget): the smoothed label
    and an l2 radius, valid with probability ≥ 1 − α. `on_result` sees each as it finishes;
    a failure keeps the results before it (given to `on_result`) and raises."""
    arrays = load_images(images, imaging)
    smoothed = open_for(options, arrays)
    run = smoothed.certify_adaptive if plan.adaptive else smoothed.certify
    return _each_image(smoothed, run, images, arrays, plan.arguments(), on_result, progress)


def predict(
    options: SmoothingOptions,
    images: Sequence[Path],
    n: int = 1_000,
    alpha: float = 0.001,
    imaging: ImageOptions = ImageOptions(),
    *,
    on_result: Callable[[ImageResult], None] | None = None,
    progress: Progress = no_progress,
) -> list[ImageResult]:
    """PREDICT each image's smoothed label, abstaining when the top two classes are too
    close to call at level α."""
    check_sampling(n0=1, n=n, alpha=alpha)
    arrays = load_images(images, imaging)
    smoothed = open_for(options, arrays)
    arguments = {"n": n, "alpha": alpha}
    return _each_image(smoothed, smoothed.predict, images, arrays, arguments, on_result, progress)


def _each_image(
    smoothed: Smoothed,
    run: Callable[..., Any],
    images: Sequence[Path],
    arrays: Sequence[np.ndarray],
    arguments: dict[str, Any],
    on_result: Callable[[ImageResult], None] | None,
    progress: Progress,
) -> list[ImageResult]:
    samples = arguments.get("n0", 0) + arguments.get("n", arguments.get("n_max", 0))
    results: list[ImageResult] = []

    async def work() -> list[ImageResult]:
        # one display for the whole run, its samples as they are answered
        with progress(f"{len(images)} image{'s' * (len(images) != 1)}",
                      samples * len(images), "q") as advance:  # fmt: skip
            counted = 0

            def step(k: int) -> None:
                nonlocal counted
                counted += k
                advance(k)

            for path, x in zip(images, arrays, strict=True):
                counted = 0
                outcome = await run(x, progress=step, **arguments)
                advance(samples - counted)  # what an adaptive run did not need
                if not outcome.fresh:
                    warn(f"{path.name}: {not_fresh(outcome)}")
                results.append(ImageResult(path, outcome))
                if on_result is not None:
                    on_result(results[-1])
        return results

    return run_then_close(smoothed, work)


@dataclass(frozen=True)
class LabelAnswer:
    label: str  # the server's words: redacted of the key, printable, a readable length
    score: float
    cls: str  # the class it maps to ("OTHER": none)


def labels(
    endpoint: str,
    images: Sequence[Path],
    wire: EndpointOptions = EndpointOptions(),
    imaging: ImageOptions = ImageOptions(),
    *,
    top: int = 5,
    device: str = "auto",
) -> list[list[LabelAnswer]]:
    """What the endpoint answers for each image (no noise), best first: to help write a
    label map."""
    arrays = load_images(images, imaging)
    box = open_blackbox(endpoint, wire, resolve_device(device))
    mapping = box.labels

    async def main() -> list[list[tuple[str, float]]]:
        try:
            return [await _answers(box, torch.from_numpy(a[None])) for a in arrays]
        finally:
            await box.aclose()

    results = []
    for pairs in asyncio.run(main()):
        ranked = sorted(pairs, key=lambda p: -p[1])[:top]
        answers = []
        for label, score in ranked:
            cls = mapping.lookup(label) if mapping is not None else _index(label)
            name = "OTHER" if cls is None else _class_name(mapping, cls)
            answers.append(LabelAnswer(server_text(label), score, name))
        results.append(answers)
    return results


async def _answers(box: BlackBox, image: torch.Tensor) -> list[tuple[str, float]]:
    """One image's (label, score) answers: vendor labels, or class indices with scores."""
    if box.annotate is not None:  # every black box declares it (None: no vendor labels)
        return list((await box.annotate(image))[0])
    answer = await box.classify(image)
    if answer.scores is None:
        return [(str(int(labels_out(answer.labels)[0])), 1.0)]
    return [(str(k), float(v)) for k, v in enumerate(answer.scores[0])]


def _index(label: str) -> int | None:
    return int(label) if label.isdigit() else None


def _class_name(mapping: Any, cls: int) -> str:
    classes = mapping.classes if mapping is not None else ()
    if cls < len(classes) and classes[cls] != str(cls):
        return f"{cls} ({classes[cls]})"
    return str(cls)
