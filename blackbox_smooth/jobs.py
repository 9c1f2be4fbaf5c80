"""What each command does, as a library call: certify, predict, evaluate, train, labels, serve.

Each takes the typed options of options.py, builds what it needs (`open_smoothed`: the black
box, the front end or LoRA adapter, the cache and the query budget), checks that a trained
front end fits the setting, runs, and returns a frozen result. The CLI parses, calls one of
these and prints; the demo and the benchmarks call them too. Progress and per-image results
reach the caller through callbacks (progress.py draws them on stderr), so nothing here prints
to stdout.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import memory
from .errors import UsageError, note, warn
from .options import (
    CertifyOptions,
    ClusterOptions,
    DatasetOptions,
    EndpointOptions,
    ImageOptions,
    LoraSettings,
    ProxyOptions,
    ServeOptions,
    SmoothingOptions,
    TrainSettings,
)
from .progress import Progress, no_progress
from .runfolder import EVALUATION, FRONTEND, LORA, claim

if TYPE_CHECKING:  # the heavy modules load when a job runs, not when the CLI parses
    import numpy as np
    import torch

    from .blackbox import BlackBox
    from .evaluate import Row
    from .httpserver import HttpServer
    from .lora import LoraRun
    from .proxy.replicas import RayProxy
    from .serve import InferenceServer
    from .smooth import Certificate, Prediction, Smoothed
    from .training.loop import TrainResult


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


# -- building the smoothed classifier ---------------------------------------------------------

CANARY = 8  # cached samples asked again before a remote endpoint's cached answers are replayed


def open_smoothed(
    options: SmoothingOptions, image_shape: tuple[int, ...] | None = None
) -> Smoothed:
    """The smoothed classifier of `options` for images of `image_shape` (C, H, W): a front end
    or LoRA adapter made for another σ, size or black box is refused unless `force`."""
    from .adapters import open_blackbox
    from .cache import BlockCache, default_cache_dir
    from .smooth import Smoothed, resolve_device

    memory.use(options.wire.max_memory)  # the run's budget: what each step may hold
    device = resolve_device(options.device)
    adapter = None if options.adapter is None else str(options.adapter)
    blackbox = open_blackbox(options.endpoint, options.wire, device, adapter)
    if options.adapter is not None:
        from .lora import read_run

        run = read_run(options.adapter)
        size = (run.channels, run.height, run.width)
        _check_fit(f"adapter {options.adapter}", run.sigma, size, options, image_shape)
    store = None
    if not options.no_cache and (options.cache is not None or blackbox.cache_by_default):
        store = BlockCache(options.cache if options.cache is not None else default_cache_dir())
    frontend = None
    if options.frontend is not None:
        frontend = _open_frontend(options, blackbox, image_shape, device)
    # a model behind an address may change while its cached answers stay (a file model is
    # known by its content): check a few before replaying them
    remote = options.endpoint.startswith(("http://", "https://"))
    return Smoothed(
        blackbox,
        options.sigma,
        frontend=frontend,
        seed=options.seed,
        cache=store,
        concurrency=options.wire.concurrency,
        max_queries=options.max_queries,
        device=device,
        canary=CANARY if remote else 0,
    )


def _tell_canary(smoothed: Smoothed) -> None:
    """What checking the cached answers cost, once per run that did."""
    spent = smoothed.votes.canary_sent
    if spent:
        note(
            f"asked the endpoint {spent} cached samples again before replaying its cached "
            f"answers ({spent} queries): they agree"
        )


def _open_frontend(
    options: SmoothingOptions,
    blackbox: BlackBox,
    shape: tuple[int, ...] | None,
    device: torch.device,
) -> torch.nn.Module:
    from .frontends import from_pretrained

    assert options.frontend is not None
    module, config, _ = from_pretrained(options.frontend, device)
    size = (config.channels, config.height, config.width)
    other_box = None
    if config.blackbox != blackbox.fingerprint:
        from .blackbox import differences

        other_box = differences(config.blackbox_description, blackbox.description) or "·"
    _check_fit(f"front end {options.frontend}", config.sigma, size, options, shape, other_box)
    return module


def _check_fit(
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
        options.local_model,
        wire.labels,
        wire.protocol_config,
        wire.ca_bundle,
        options.frontend,
        options.adapter,
        *more,
    ]
    return [p for p in files if p is not None] + [options.cache or _default_cache()]


def _default_cache() -> Path:
    from .cache import default_cache_dir

    return default_cache_dir()


def load_images(paths: Sequence[Path], imaging: ImageOptions) -> list[np.ndarray]:
    """Decode every image before a query is sent: a broken file costs nothing."""
    from .data import Fit, load_image, parse_size

    size, fit = parse_size(imaging.size), Fit.of(imaging)
    return [load_image(p, size, imaging.grayscale, fit) for p in paths]


def _common_shape(arrays: Sequence[np.ndarray]) -> tuple[int, ...] | None:
    shapes = {tuple(a.shape) for a in arrays}
    return shapes.pop() if len(shapes) == 1 else None


# -- certify and predict image files -----------------------------------------------------------


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
    smoothed = _open_for(options, arrays)
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
    from .options import check_sampling

    check_sampling(n0=1, n=n, alpha=alpha)
    arrays = load_images(images, imaging)
    smoothed = _open_for(options, arrays)
    arguments = {"n": n, "alpha": alpha}
    return _each_image(smoothed, smoothed.predict, images, arrays, arguments, on_result, progress)


def _open_for(options: SmoothingOptions, arrays: Sequence[np.ndarray]) -> Smoothed:
    """`open_smoothed` for these images; a local model told no input convention is checked
    against the usual one on the first (adapters.local.convention_hint: one line if it differs)."""
    from .adapters.local import convention_hint

    smoothed = open_smoothed(options, _common_shape(arrays))
    convention_hint(options.endpoint, options.wire, smoothed.blackbox, arrays)
    return smoothed


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

    async def main() -> None:
        # one display for the whole run, its samples as they are answered
        with progress(f"{len(images)} image{'s' * (len(images) != 1)}",
                      samples * len(images), "q") as advance:  # fmt: skip
            counted = 0

            def step(k: int) -> None:
                nonlocal counted
                counted += k
                advance(k)

            try:
                for path, x in zip(images, arrays, strict=True):
                    counted = 0
                    outcome = await run(x, progress=step, **arguments)
                    advance(samples - counted)  # what an adaptive run did not need
                    if not outcome.fresh:
                        warn(f"{path.name}: {not_fresh(outcome)}")
                    results.append(ImageResult(path, outcome))
                    if on_result is not None:
                        on_result(results[-1])
            finally:
                await smoothed.aclose()
        _tell_canary(smoothed)

    asyncio.run(main())
    return results


# -- evaluate a labelled data set --------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    rows: list[Row]
    summary: dict[str, Any]
    out: Path


def evaluation_images(dataset: DatasetOptions, wire: EndpointOptions) -> tuple[Any, list[int]]:
    """The data set (class order from --classes, else the label map's, else sorted names)
    and the indices of the images chosen."""
    from . import evaluate as ev

    order = dataset.class_order
    if order is None and wire.labels is not None:
        from .adapters import LabelMap

        order = list(LabelMap.load(str(wire.labels)).classes) or None
    data = ev.load_dataset(dataset.data, order)
    return data, ev.select(len(data.paths), dataset.skip, dataset.every, dataset.limit)


def evaluate(
    options: SmoothingOptions,
    dataset: DatasetOptions,
    out: Path,
    plan: CertifyOptions = CertifyOptions(),
    imaging: ImageOptions = ImageOptions(),
    *,
    price_per_1000: float | None = None,
    progress: Progress = no_progress,
    cluster: ClusterOptions = ClusterOptions(),
) -> Evaluation:
    """Certify a labelled data set; write certify.tsv, summary.json and the plot to `out`
    (replaced whole at the end: a failed run leaves the previous report as it was)."""
    from . import evaluate as ev
    from .data import Fit, parse_size

    data, indices = evaluation_images(dataset, options.wire)
    chosen = [Path(data.paths[i]) for i in indices]
    claim(out, EVALUATION, [dataset.data, *chosen, *files_read(options)])
    if not indices:
        raise UsageError("--skip/--every/--limit select no images")
    size = parse_size(imaging.size)
    load = ev.load_for(size, imaging.grayscale, Fit.of(imaging))
    shape = ev.check_images(data, indices, load)
    start = time.perf_counter()
    if cluster.ray is not None:
        rows = _evaluate_on_ray(options, cluster, data, indices, plan, imaging, size, shape,
                                progress)  # fmt: skip
    else:
        smoothed = open_smoothed(options, shape)
        run = smoothed.certify_adaptive if plan.adaptive else smoothed.certify
        arguments = plan.arguments()

        async def main() -> list[Row]:
            try:
                with progress("evaluate", len(indices), "image") as advance:
                    return await ev.run(
                        lambda x: run(x, **arguments),
                        data,
                        indices,
                        load,
                        images_in_flight=max(1, options.wire.concurrency // 4),
                        on_row=lambda _: advance(1),
                    )
            finally:
                await smoothed.aclose()

        rows = asyncio.run(main())
        _tell_canary(smoothed)
    reused = sum(not r.fresh for r in rows)
    if reused:
        worst = max(r.alpha_effective for r in rows)
        warn(
            f"{reused} of {len(rows)} images are not fresh: {REUSED}; their claims hold at α up "
            f"to {worst:.3g} (the TSV's fresh, looks and alpha_effective columns){REUSED_FIX}"
        )
    setting = {
        "data": str(dataset.data),
        "endpoint": _shown(options.endpoint),
        "sigma": options.sigma,
        "n0": plan.n0,
        "n": plan.n_estimation,
        "alpha": plan.alpha,
        "seed": options.seed,
        "mode": plan.mode,
        "target_radius": plan.target_radius,
        "budget": plan.budget,
        "bound": plan.bound.value if plan.adaptive else "cp",
        "frontend": str(options.frontend) if options.frontend else None,
        "method": _method(options.frontend),
        "classes": data.classes,
        "price_per_1000": price_per_1000,
    }
    summary = ev.summarize(rows, setting, time.perf_counter() - start)
    if price_per_1000 is not None:
        summary["cost"] = summary["queries_sent"] / 1000 * price_per_1000
    ev.write_report(out, rows, summary)
    return Evaluation(rows, summary, out)


def _evaluate_on_ray(
    options: SmoothingOptions,
    cluster: ClusterOptions,
    data: Any,
    indices: list[int],
    plan: CertifyOptions,
    imaging: ImageOptions,
    size: tuple[int, int] | None,
    shape: tuple[int, ...],
    progress: Progress,
) -> list[Row]:
    """The rows of `evaluate` from Ray workers (cluster.py), each opening the black box,
    front end and cache as `open_smoothed` does here; the journal of rows done lives in this
    machine's cache."""
    from .cache import BlockCache
    from .cluster import certify_rows, ray_module
    from .data import Fit

    ray_module()  # a missing Ray is one line, before anything starts
    journal = None if options.no_cache else BlockCache(options.cache or _default_cache())
    try:
        with progress("evaluate", len(indices), "image") as advance:
            return certify_rows(
                cluster,
                options,
                functools.partial(open_smoothed, options, shape),
                data,
                indices,
                plan,
                size,
                imaging.grayscale,
                journal,
                on_row=lambda _: advance(1),
                fit=Fit.of(imaging),
            )
    finally:
        if journal is not None:
            journal.close()


def _method(frontend: Path | None) -> str | None:
    """How the front end was trained (distill, spsa, whitebox, mse), for plot legends."""
    if frontend is None:
        return None
    from .frontends.base import read_config

    config = read_config(frontend)
    return f"{config.kind} {config.method or 'mse'}"


def _shown(endpoint: str) -> str:
    """The endpoint as a report may show it: a URL without its secrets."""
    from .adapters.http import redact

    return redact(endpoint) if endpoint.startswith(("http://", "https://")) else endpoint


# -- train a front end, or a LoRA adapter inside a local model ----------------------------------


def train(
    options: SmoothingOptions,
    settings: TrainSettings,
    data: Path,
    out: Path,
    imaging: ImageOptions = ImageOptions(),
    *,
    resume: bool = False,
    log: Callable[[str], None] = print,
    progress: Progress = no_progress,
) -> TrainResult:
    """Learn a front end before the black box from its answers alone; write the run `out`.
    The black box, cache and device are those certify uses; `settings.max_queries` is the
    budget (`options.max_queries` is not used)."""
    from .data import Fit, load_folder, parse_size

    if not math.isclose(settings.sigma, options.sigma):
        raise UsageError(f"σ differs: {settings.sigma} to train, {options.sigma} to smooth")
    claim(out, FRONTEND, [data, settings.start, *files_read(options)])
    # after the checks above: a wrong --out is told at once, not after torch's import
    from .training import train as train_frontend

    x, labels, _ = load_folder(data, parse_size(imaging.size), imaging.grayscale, Fit.of(imaging))
    settings.check(labelled=labels is not None)
    smoothed = open_smoothed(replace(options, max_queries=None))

    async def main() -> TrainResult:
        try:
            return await train_frontend(
                smoothed.blackbox,
                x,
                labels,
                settings,
                out,
                cache=smoothed.cache,
                resume=resume,
                device=smoothed.device,  # type: ignore[arg-type]
                concurrency=options.wire.concurrency,
                log=log,
                progress=progress,
            )
        finally:
            await smoothed.aclose()

    return asyncio.run(main())


def train_lora(
    options: SmoothingOptions,
    settings: LoraSettings,
    data: Path,
    out: Path,
    imaging: ImageOptions = ImageOptions(),
    *,
    log: Callable[[str], None] = print,
) -> LoraRun:
    """LoRA inside a local classifier (PEFTSmoothing's white-box method); write the run `out`."""
    if not (options.endpoint.startswith("torch:") and ".py:" in options.endpoint):
        raise UsageError(
            "--method lora trains inside a local model: give --endpoint torch:FILE.py:FUNC "
            "(a function returning the torch.nn.Module; peft cannot wrap TorchScript)"
        )
    from .adapters.local import TorchModel
    from .data import Fit, load_folder, parse_size
    from .lora import train_classifier
    from .smooth import resolve_device

    claim(out, LORA, [data, *files_read(options)])
    x, labels, _ = load_folder(data, parse_size(imaging.size), imaging.grayscale, Fit.of(imaging))
    device = resolve_device(options.device)
    base = TorchModel.from_function(options.endpoint.removeprefix("torch:"), device)
    _, run = train_classifier(
        base.model,
        x,
        labels,
        sigma=settings.sigma,
        rank=settings.rank,
        targets=settings.target_list,
        objective=settings.objective,
        epochs=settings.epochs,
        val_fraction=settings.val_fraction,
        seed=settings.seed,
        out=out,
        device=device,
        log=log,
    )
    return run


# -- what an endpoint answers, and serving a local model ---------------------------------------


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
    import torch

    from .adapters import open_blackbox
    from .redaction import server_text
    from .smooth import resolve_device

    arrays = load_images(images, imaging)
    box = open_blackbox(endpoint, wire, resolve_device(device))
    mapping = getattr(box, "labels", None)

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


async def _answers(box: Any, image: torch.Tensor) -> list[tuple[str, float]]:
    """One image's (label, score) answers: vendor labels, or class indices with scores."""
    from .blackbox import labels_out

    if box.annotate is not None:  # every black box declares it (None: no vendor labels)
        return list((await box.annotate(image))[0])
    answer = await box.classify(image)
    if answer.scores is None:
        return [(str(int(labels_out(answer.labels)[0])), 1.0)]
    return [(str(k), float(v)) for k, v in enumerate(answer.scores[0])]


def _index(label: str) -> int | None:
    return int(label) if label.isdigit() else None


def _class_name(mapping: Any, cls: int) -> str:
    classes = getattr(mapping, "classes", ())
    if cls < len(classes) and classes[cls] != str(cls):
        return f"{cls} ({classes[cls]})"
    return str(cls)


def serve(options: ServeOptions) -> InferenceServer:
    """A server for the local model, listening (not yet serving: `serve_forever`)."""
    from .adapters import open_blackbox
    from .serve import InferenceServer
    from .smooth import resolve_device

    api_key = None
    if options.api_key_env is not None:
        from .adapters.auth import read_key

        api_key = read_key(options.api_key_env) if options.api_key_env else None
        if not api_key:  # name the variable, never a value
            raise UsageError(
                f"--api-key-env {options.api_key_env}: that variable is not set or is empty"
            )
    needs = f"the key in ${options.api_key_env}" if api_key else None
    _warn_if_exposed(options.host, "the model", needs, "--api-key-env NAME")
    model = open_blackbox(options.endpoint, device=resolve_device(options.device))
    try:
        return InferenceServer(
            model,  # type: ignore[arg-type]
            name=options.name,
            host=options.host,
            port=options.port,
            delay=options.delay,
            max_request_bytes=options.max_request_bytes,
            client_timeout=options.client_timeout,
            max_connections=options.max_connections,
            max_bodies=options.max_bodies,
            api_key=api_key,
        )
    except OSError as e:
        raise UsageError(
            f"cannot listen on {options.host}:{options.port}: {e.strerror or e}"
        ) from e


# -- certified predictions online -------------------------------------------------------------


def proxy(
    options: SmoothingOptions,
    plan: CertifyOptions = CertifyOptions(),
    imaging: ImageOptions = ImageOptions(),
    settings: ProxyOptions = ProxyOptions(),
) -> HttpServer | RayProxy:
    """`bbsmooth proxy`: the smoothed classifier of `options` as an HTTP service answering
    with `plan`'s certificates: bound to its socket (not yet serving: `run`), or with
    --ray, deployed on Ray Serve (serving until `run` returns)."""
    keys = _client_keys(settings)
    needs = "a client key" if keys else None
    _warn_if_exposed(settings.host, "the certified model", needs, "--client-keys-file")
    shape = _proxy_shape(options, imaging)
    if settings.ray is not None:
        # opened once here first: a wrong endpoint or front end is one line now, not a
        # replica's traceback in Ray's logs
        import asyncio
        import functools

        from .proxy.replicas import RayProxy

        asyncio.run(open_smoothed(options, shape).aclose())
        build = functools.partial(proxy_app, options, plan, imaging, settings, keys, shape)
        return RayProxy(build, settings, (options.max_queries, options.wire.rps))
    from .proxy import serve_proxy

    return serve_proxy(proxy_app(options, plan, imaging, settings, keys, shape), settings)


def proxy_app(
    options: SmoothingOptions,
    plan: CertifyOptions,
    imaging: ImageOptions,
    settings: ProxyOptions,
    keys: list[str],
    shape: tuple[int, int, int],
    coordinator: str | None = None,
) -> Any:
    """The proxy's ASGI app, its smoothed classifier opened; with `coordinator` (a Ray Serve
    replica), the budget, rate and quotas are that actor's, shared by every replica."""
    from importlib.metadata import version

    from .proxy.app import create_app
    from .proxy.service import Quotas, Service

    smoothed = open_smoothed(options, shape)
    quotas: Any = Quotas(settings.quota, settings.quota_period)
    if coordinator is not None:
        from .cluster import ray_module, shared
        from .proxy.replicas import SharedQuotas

        smoothed = shared(smoothed, coordinator, options.wire.rps is not None)
        quotas = SharedQuotas(ray_module().get_actor(coordinator))
    classes = None
    if options.wire.labels is not None:
        from .adapters import LabelMap

        classes = list(LabelMap.load(str(options.wire.labels)).classes) or None
    service = Service(smoothed, plan, quotas, settings.deadline, classes)
    info = {"endpoint": _shown(options.endpoint), "version": version("blackbox_smooth")}
    return create_app(service, settings, imaging, shape, keys, info)


def _proxy_shape(options: SmoothingOptions, imaging: ImageOptions) -> tuple[int, int, int]:
    """The (C, H, W) every image of the proxy becomes: the front end's, else --size with one
    channel (--grayscale) or three. Fixed, so that what a request can cost is bounded."""
    from .data import parse_size

    size = parse_size(imaging.size)
    if options.frontend is not None:
        from .frontends.base import read_config

        config = read_config(options.frontend)
        return (config.channels, config.height, config.width)
    if size is None:
        raise UsageError(
            "bbsmooth proxy needs --size HxW, the model's input size (every image is resized "
            "to it, which bounds what a request costs), or a --frontend"
        )
    return (1 if imaging.grayscale else 3, *size)


def _client_keys(settings: ProxyOptions) -> list[str]:
    """The client API keys, from the file (one per line, # comments) and the variable
    (comma-separated); each registered for redaction, never printed."""
    import re

    from .inputs import read_text
    from .redaction import remember

    keys: list[str] = []
    if settings.client_keys_file is not None:
        text = read_text(settings.client_keys_file, "--client-keys-file", 2**20)
        keys += [line.strip() for line in text.splitlines()]
    if settings.client_keys_env is not None:
        import os

        value = os.environ.get(settings.client_keys_env)
        if not value:
            raise UsageError(
                f"--client-keys-env {settings.client_keys_env}: that variable is not set or empty"
            )
        keys += [k.strip() for k in value.split(",")]
    keys = [k for k in keys if k and not k.startswith("#")]
    for k in keys:
        remember(k)
        if not re.fullmatch(r"[\x21-\x7e]+", k):
            raise UsageError("a client key holds whitespace, control or non-ASCII characters")
    if (settings.client_keys_file or settings.client_keys_env) and not keys:
        raise UsageError("no client keys given: the file or variable holds none")
    return keys


def _warn_if_exposed(host: str, what: str, needs: str | None, option: str) -> None:
    """A server beyond loopback: say so, and what key its requests need (`needs`), if any."""
    from .httpserver import resolves_to_loopback

    try:
        local = resolves_to_loopback(host)
    except (OSError, UnicodeError, ValueError) as e:
        reason = getattr(e, "strerror", None) or "not a host name or address"
        raise UsageError(f"cannot use --host {host!r}: {reason}") from e
    if not local:
        need = f"requests need {needs}" if needs else f"use {option} to require a key"
        warn(f"serving on {host or 'all interfaces'} exposes {what} beyond this machine; {need}")


# -- the cache ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheReport:
    """What a cache folder holds: answered noise blocks (and the queries in them), records
    (the journal of `evaluate --ray`), rows it did not write (never read), bytes on disk.
    `exists` is False where no cache has been written yet."""

    directory: Path
    exists: bool
    blocks: int = 0
    queries: int = 0
    records: int = 0
    foreign: int = 0
    bytes: int = 0


def cache_info(directory: Path | None = None) -> CacheReport:
    """The cache at `directory` (default: $BBSMOOTH_CACHE, else the user cache), read only:
    looking never creates or changes one."""
    from .cache import BlockCache, check_folder, disk_bytes, is_cache

    directory = directory or _default_cache()
    check_folder(directory)
    if not is_cache(directory):
        return CacheReport(directory, exists=False)
    store = BlockCache(directory, readonly=True)
    try:
        c = store.contents()
    finally:
        store.close()
    return CacheReport(
        directory, True, c.blocks, c.queries, c.records, c.foreign, disk_bytes(directory)
    )


def clear_cache(directory: Path) -> tuple[int, CacheReport]:
    """Delete every answered block in the cache at `directory` (they cost queries to get
    again) and give the space back: the queries deleted, and the cache after. Rows are
    deleted, never files: nothing but the cache's own entries is touched. The evidence ledger
    lives elsewhere (ledger.py) and is never cleared."""
    from .cache import BlockCache

    store = BlockCache(directory)
    try:
        queries = store.clear()
        store.compact()
    finally:
        store.close()
    return queries, cache_info(directory)
