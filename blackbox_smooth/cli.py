"""`bbsmooth`: a thin layer that parses options, builds the objects and prints results.

Errors are one line on stderr with an exit code: 2 bad input or usage, 3 an endpoint that
fails after retries, 4 an exhausted query budget, 130 interrupted.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer

from .errors import BBSmoothError, UsageError, warn
from .redaction import printable, redact, server_text
from .runfolder import EVALUATION, FRONTEND, LORA, claim

if TYPE_CHECKING:
    from .adapters.kserve import Dtype as DtypeName
    from .adapters.kserve import Layout as LayoutName

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Certified l2 robustness for image classifiers you can only query.",
)


class Layout(StrEnum):
    nchw = "nchw"
    nhwc = "nhwc"
    flat = "flat"


class WireDtype(StrEnum):
    fp32 = "fp32"
    uint8 = "uint8"


class Protocol(StrEnum):
    kserve = "kserve"
    huggingface = "huggingface"
    torchserve = "torchserve"
    gcv = "gcv"
    generic = "generic"


class Encoding(StrEnum):
    png = "png"
    jpeg = "jpeg"


# -- options shared by the commands ------------------------------------------------------------
Images = Annotated[list[Path], typer.Argument(help="Image files (PNG, JPEG, …).")]
Endpoint = Annotated[
    str,
    typer.Option(
        "--endpoint",
        "-e",
        help="python:FILE.py:FUNC | python:pkg.mod:FUNC | torch:FILE.pt | torch:FILE.py:FUNC | "
        "http(s)://HOST/v2/models/NAME/infer",
    ),
]
Sigma = Annotated[float, typer.Option(help="Noise level σ, on the [0,1] pixel scale.")]
Alpha = Annotated[float, typer.Option(help="Failure probability of the guarantee.")]
Batch = Annotated[int | None, typer.Option(help="Images per request (1024 local, 64 HTTP).")]
Seed = Annotated[int, typer.Option(help="Noise seed: the same seed gives the same counts.")]
MaxQueries = Annotated[
    int | None, typer.Option(help="Stop before sending more than this many queries.")
]
CacheDir = Annotated[
    Path | None, typer.Option("--cache", help="Cache directory (default: the user cache).")
]
NoCache = Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the cache.")]
Json = Annotated[bool, typer.Option("--json", help="One JSON object per image per line.")]
Size = Annotated[str | None, typer.Option(help="Resize to HxW before adding noise.")]
Grayscale = Annotated[bool, typer.Option("--grayscale", help="Convert images to one channel.")]
Device = Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")]
FrontendRun = Annotated[
    Path | None, typer.Option("--frontend", help="A front end trained by `bbsmooth train`.")
]
AdapterRun = Annotated[
    Path | None,
    typer.Option("--adapter", help="A LoRA run (train --method lora) for a torch:FILE.py:FUNC."),
]
TargetRadius = Annotated[
    float | None,
    typer.Option(help="Stop as soon as certified at this radius, or never will be (n: the cap)."),
]
QueryBudget = Annotated[
    int | None, typer.Option("--budget", help="Queries per image (n0 included); stops early.")
]
Bound = Annotated[
    str,
    typer.Option(
        help="Adaptive bound: union (Clopper–Pearson at α/K per look) or cs (confidence "
        "sequence, valid at every n: fewer queries)."
    ),
]
DryRun = Annotated[
    bool, typer.Option("--dry-run", help="Print the worst-case queries and cost; send nothing.")
]
Price = Annotated[float | None, typer.Option(help="Price per 1,000 queries, for the cost.")]
Force = Annotated[
    bool, typer.Option("--force", help="Use a front end trained for another σ, size or box.")
]


@dataclass(frozen=True)
class Wire:
    """How queries travel: the options every command that talks to an endpoint shares."""

    batch: int | None = None
    concurrency: int = 16
    rps: float | None = None
    timeout: float = 60.0
    retries: int = 8
    protocol: Protocol | None = None
    protocol_config: Path | None = None
    labels: Path | None = None
    encoding: Encoding = Encoding.png
    jpeg_quality: int = 95
    auth: str | None = None
    api_key_env: str = "BBSMOOTH_API_KEY"
    ca_bundle: Path | None = None
    input_layout: Layout | None = None
    input_dtype: WireDtype | None = None
    input_scale: float | None = None
    input_name: str | None = None
    output: str | None = None
    max_response_bytes: int = 32 << 20

    def options(self) -> Any:
        from .adapters import EndpointOptions, KServeOptions, RetryPolicy
        from .adapters.encoding import Encoding as WireEncoding

        for name, value in (("--concurrency", self.concurrency), ("--retries", self.retries)):
            if value < 1:
                raise UsageError(f"{name} must be >= 1, got {value}")
        if self.rps is not None and self.rps <= 0:
            raise UsageError(f"--rps must be > 0, got {self.rps}")
        if self.timeout <= 0:
            raise UsageError(f"--timeout must be > 0, got {self.timeout}")
        return EndpointOptions(
            batch=self.batch,
            concurrency=self.concurrency,
            rps=self.rps,
            timeout=self.timeout,
            retry=RetryPolicy(attempts=self.retries),
            kserve=KServeOptions(
                input_layout=cast(
                    "LayoutName | None", self.input_layout and self.input_layout.value
                ),
                input_dtype=cast("DtypeName | None", self.input_dtype and self.input_dtype.value),
                input_scale=self.input_scale,
                input_name=self.input_name,
                output=self.output,
            ),
            protocol=self.protocol and self.protocol.value,
            protocol_config=_str(self.protocol_config),
            labels=_str(self.labels),
            encoding=WireEncoding(self.encoding.value, self.jpeg_quality),
            auth=self.auth,
            api_key_env=self.api_key_env,
            ca_bundle=_str(self.ca_bundle),
            max_response_bytes=self.max_response_bytes,
        )


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


_WIRE_HELP: dict[str, Any] = {
    "batch": (Batch, None),
    "concurrency": (Annotated[int, typer.Option(help="Requests in flight at once.")], 16),
    "rps": (Annotated[float | None, typer.Option(help="At most this many requests/s.")], None),
    "timeout": (Annotated[float, typer.Option(help="Seconds before a request times out.")], 60.0),
    "retries": (
        Annotated[int, typer.Option(help="Attempts per request, the first included.")],
        8,
    ),
    "protocol": (
        Annotated[
            Protocol | None, typer.Option(help="HTTP adapter (default: from the URL's shape).")
        ],
        None,
    ),
    "protocol_config": (
        Annotated[Path | None, typer.Option(help="JSON config of the generic adapter.")],
        None,
    ),
    "labels": (
        Annotated[Path | None, typer.Option(help="Label map: vendor label → class (JSON, CSV).")],
        None,
    ),
    "encoding": (
        Annotated[Encoding, typer.Option(help="Image file sent to file-taking APIs.")],
        Encoding.png,
    ),
    "jpeg_quality": (Annotated[int, typer.Option(help="JPEG quality (--encoding jpeg).")], 95),
    "auth": (
        Annotated[
            str | None,
            typer.Option(help="bearer | key | header:NAME | query:NAME | none (default: usual)."),
        ],
        None,
    ),
    "api_key_env": (
        Annotated[str, typer.Option(help="Environment variable holding the API key.")],
        "BBSMOOTH_API_KEY",
    ),
    "ca_bundle": (
        Annotated[Path | None, typer.Option(help="CA certificates for a private TLS endpoint.")],
        None,
    ),
    "input_layout": (
        Annotated[
            Layout | None, typer.Option(help="OIP input layout (default: metadata, else nchw).")
        ],
        None,
    ),
    "input_dtype": (
        Annotated[
            WireDtype | None, typer.Option(help="OIP input dtype (default: metadata, else fp32).")
        ],
        None,
    ),
    "input_scale": (
        Annotated[
            float | None,
            typer.Option(help="The wire value [0,1] maps to (default 1 fp32, 255 uint8)."),
        ],
        None,
    ),
    "input_name": (
        Annotated[
            str | None, typer.Option(help="OIP input name (default: metadata, else input-0).")
        ],
        None,
    ),
    "output": (
        Annotated[str | None, typer.Option(help="OIP output to read (default: the first).")],
        None,
    ),
    "max_response_bytes": (
        Annotated[int, typer.Option(help="Refuse answers larger than this, decompressed.")],
        32 << 20,
    ),
}


def with_wire(command: Callable[..., None]) -> Callable[..., None]:
    """Give a command the shared `Wire` options; it receives them as `wire=Wire(…)`."""
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name != "wire"]
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=hint)
        for name, (hint, default) in _WIRE_HELP.items()
    ]

    @functools.wraps(command)
    def wrapper(*args: Any, **kw: Any) -> None:
        wire = Wire(**{name: kw.pop(name) for name in _WIRE_HELP})
        command(*args, wire=wire, **kw)

    annotations = {k: v for k, v in command.__annotations__.items() if k != "wire"}
    wrapper.__annotations__ = {**annotations, **{p.name: p.annotation for p in extra}}
    wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*own, *extra]
    )
    return wrapper


def _build(
    endpoint: str,
    sigma: float,
    wire: Wire,
    *,
    seed: int,
    max_queries: int | None,
    cache: Path | None,
    no_cache: bool,
    device: str,
    frontend: Path | None = None,
    force: bool = False,
    image_shape: tuple[int, ...] | None = None,
    adapter: Path | None = None,
) -> Any:
    from .adapters import open_blackbox
    from .cache import BlockCache, default_cache_dir
    from .smooth import Smoothed, resolve_device
    from .stats import check_sigma

    check_sigma(sigma)
    if max_queries is not None and max_queries < 0:
        raise UsageError(f"--max-queries must be >= 0, got {max_queries}")
    if cache is not None and no_cache:
        raise UsageError("--cache and --no-cache contradict each other: pick one")
    options = wire.options()
    dev = resolve_device(device)
    blackbox = open_blackbox(endpoint, options, dev, None if adapter is None else str(adapter))
    if adapter is not None:
        from .lora import read_run, same_setting

        problems = same_setting(read_run(adapter), sigma, image_shape)
        if problems:
            _refuse_or_warn(f"adapter {adapter} was trained for {'; '.join(problems)}", force)
    store = None
    if not no_cache and (cache is not None or blackbox.cache_by_default):
        store = BlockCache(cache if cache is not None else default_cache_dir())
    module = None
    if frontend is not None:
        module = _load_frontend(frontend, blackbox, sigma, image_shape, force, dev)
    return Smoothed(
        blackbox,
        sigma,
        frontend=module,
        seed=seed,
        cache=store,
        concurrency=wire.concurrency,
        max_queries=max_queries,
        device=dev,
    )


def _load_frontend(
    run: Path, blackbox: Any, sigma: float, shape: tuple[int, ...] | None, force: bool, device: Any
) -> Any:
    """The trained front end, refused when made for another σ, size or black box (the
    certificate would still be valid, its accuracy would not) unless --force."""
    import math

    from .frontends import from_pretrained

    module, config, _ = from_pretrained(run, device)
    problems = []
    if not math.isclose(config.sigma, sigma):
        problems.append(f"σ={config.sigma}, not {sigma}")
    size = (config.channels, config.height, config.width)
    if shape is None or size != tuple(shape):
        problems.append(f"images of {'×'.join(map(str, size))} (resize with --size HxW)")
    if config.blackbox != blackbox.fingerprint:
        problems.append("another black box")
    if problems:
        _refuse_or_warn(f"front end {run} was trained for {'; '.join(problems)}", force)
    return module


def _refuse_or_warn(message: str, force: bool) -> None:
    if not force:
        raise UsageError(f"{message}: train one for this setting, or pass --force")
    print(
        f"bbsmooth: warning: {message} (--force: certificates stay valid, accuracy may not)",
        file=sys.stderr,
    )


def _load_all(images: list[Path], size: str | None, grayscale: bool) -> list[Any]:
    from .data import load_image, parse_size

    hw = parse_size(size)
    return [load_image(p, hw, grayscale) for p in images]


def _run_images(
    smoothed: Any,
    images: list[Path],
    arrays: list[Any],
    as_json: bool,
    what: str,
    price: float | None = None,
    **kw: Any,
) -> None:
    from tqdm import tqdm

    total_samples = kw.get("n0", 0) + kw.get("n", kw.get("n_max", 0))
    rows: list[dict[str, Any]] = []

    async def main() -> None:
        try:
            for path, x in zip(images, arrays, strict=True):
                with tqdm(
                    total=total_samples,
                    desc=path.name,
                    unit="q",
                    leave=False,
                    disable=None,
                    file=sys.stderr,
                ) as bar:
                    run = {
                        "certify": smoothed.certify,
                        "adaptive": smoothed.certify_adaptive,
                        "predict": smoothed.predict,
                    }[what]
                    result = await run(x, progress=bar.update, **kw)
                if not getattr(result, "fresh", True):
                    warn(f"{path.name}: {REUSED} ({result.reused}){REUSED_FIX}")
                record = {"image": str(path), **result.to_json()}
                rows.append(record)
                if as_json:
                    print(json.dumps(record), flush=True)
        finally:
            await smoothed.aclose()

    try:
        asyncio.run(main())
    finally:
        if not as_json and rows:
            _print_table(rows, what)
    if not as_json:
        sent = sum(r["queries_sent"] for r in rows)
        cached = sum(r["queries_cached"] for r in rows)
        print(f"queries: {sent} sent{_cost(sent, price)}, {cached} replayed from cache")


def _cost(queries: int, price: float | None) -> str:
    from .evaluate import cost

    return cost(queries, price)


def _print_table(rows: list[dict[str, Any]], what: str) -> None:
    if what in ("certify", "adaptive"):
        head = ["image", "label", "radius", "p_lower", "max_radius", "sent", "cached", "seconds"]
        body = [
            [
                Path(r["image"]).name,
                "abstain" if r["abstain"] else str(r["label"]),
                f"{r['radius']:.3f}",
                f"{r['p_lower']:.4f}",
                f"{r['max_radius']:.3f}",
                str(r["queries_sent"]),
                str(r["queries_cached"]),
                f"{r['seconds']:.2f}",
            ]
            for r in rows
        ]
    else:
        head = ["image", "label", "p_value", "sent", "cached", "seconds"]
        body = [
            [
                Path(r["image"]).name,
                "abstain" if r["abstain"] else str(r["label"]),
                f"{r['p_value']:.2e}",
                str(r["queries_sent"]),
                str(r["queries_cached"]),
                f"{r['seconds']:.2f}",
            ]
            for r in rows
        ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    for b in body:
        print("  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)))


@app.command()
@with_wire
def certify(
    images: Images,
    endpoint: Endpoint,
    sigma: Sigma,
    n0: Annotated[int, typer.Option(help="Selection samples.")] = 100,
    n: Annotated[
        int | None, typer.Option(help="Estimation samples (default 10,000; the cap when adaptive).")
    ] = None,
    alpha: Alpha = 0.001,
    seed: Seed = 0,
    max_queries: MaxQueries = None,
    cache: CacheDir = None,
    no_cache: NoCache = False,
    as_json: Json = False,
    size: Size = None,
    grayscale: Grayscale = False,
    device: Device = "auto",
    frontend: FrontendRun = None,
    adapter: AdapterRun = None,
    force: Force = False,
    target_radius: TargetRadius = None,
    budget: QueryBudget = None,
    bound: Bound = "union",
    dry_run: DryRun = False,
    price_per_1000: Price = None,
    wire: Wire = Wire(),
) -> None:
    """Certify each image: the smoothed label and an l2 radius, valid with probability ≥ 1 − α."""
    what, kw = _certify_kw(n0, n, alpha, target_radius, budget, bound)
    arrays = _load_all(images, size, grayscale)
    if dry_run:
        _dry_run(len(arrays), n0 + kw.get("n", kw.get("n_max", 0)), price_per_1000)
        return
    smoothed = _build(
        **_endpoint_kw(locals()),
        frontend=frontend,
        force=force,
        image_shape=_shape(arrays),
        adapter=adapter,
    )
    _run_images(smoothed, images, arrays, as_json, what, price_per_1000, **kw)


DEFAULT_N = 10_000
REUSED = (
    "the estimation samples were already used by an earlier certificate with another protocol, "
    "so this one was chosen after looking and its α does not hold"
)
REUSED_FIX = (
    "; decide the question before looking (--target-radius R stops as soon as it is settled) "
    "and keep the first certificate"
)


def _certify_kw(
    n0: int,
    n: int | None,
    alpha: float,
    target_radius: float | None,
    budget: int | None,
    bound: str = "union",
) -> tuple[str, dict[str, Any]]:
    """Fixed-n CERTIFY, or adaptive: --target-radius (n is the cap) or --budget (per image)."""
    from .stats import check_sampling

    if budget is not None and target_radius is not None:
        raise UsageError(
            "--budget and --target-radius ask two different questions (the largest radius "
            "within N queries; whether radius R is certified): pick one"
        )
    if budget is not None and n is not None:
        raise UsageError("--budget sets n (the budget less --n0): drop --n")
    n = DEFAULT_N if n is None else n
    check_sampling(n0=n0, n=n, alpha=alpha)
    if budget is not None:
        if budget <= n0:
            raise UsageError(f"--budget {budget} must exceed --n0 {n0} (queries per image)")
        n = budget - n0
    if target_radius is None and budget is None:
        if bound != "union":
            raise UsageError("--bound picks the bound of adaptive runs: add --target-radius R")
        return "certify", {"n0": n0, "n": n, "alpha": alpha}
    if target_radius is not None and target_radius < 0:
        raise UsageError(f"--target-radius must be >= 0, got {target_radius}")
    if bound not in ("union", "cs"):
        raise UsageError(f"--bound must be union or cs, got {bound!r}")
    kw = {"n0": n0, "n_max": n, "alpha": alpha, "target_radius": target_radius, "bound": bound}
    return "adaptive", kw


def _dry_run(images: int, per_image: int, price: float | None) -> None:
    total = images * per_image
    print(
        f"dry run: at most {total:,} queries ({images} images × {per_image:,}){_cost(total, price)}"
        "; nothing sent (answers already cached cost nothing)"
    )


@app.command()
@with_wire
def predict(
    images: Images,
    endpoint: Endpoint,
    sigma: Sigma,
    n: Annotated[int, typer.Option(help="Noise samples.")] = 1_000,
    alpha: Alpha = 0.001,
    seed: Seed = 0,
    max_queries: MaxQueries = None,
    cache: CacheDir = None,
    no_cache: NoCache = False,
    as_json: Json = False,
    size: Size = None,
    grayscale: Grayscale = False,
    device: Device = "auto",
    frontend: FrontendRun = None,
    adapter: AdapterRun = None,
    force: Force = False,
    wire: Wire = Wire(),
) -> None:
    """Predict each image's smoothed label, abstaining when the top two classes are too close."""
    from .stats import check_sampling

    check_sampling(n0=1, n=n, alpha=alpha)
    arrays = _load_all(images, size, grayscale)
    smoothed = _build(
        **_endpoint_kw(locals()),
        frontend=frontend,
        force=force,
        image_shape=_shape(arrays),
        adapter=adapter,
    )
    _run_images(smoothed, images, arrays, as_json, "predict", n=n, alpha=alpha)


def _inputs(endpoint: str, wire: Wire, cache: Path | None, *runs: Path | None) -> list[Any]:
    """Every file or folder a command reads, so that no --out can swallow one."""
    local = endpoint.split(":")[1] if endpoint.startswith(("torch:", "python:")) else None
    files = [wire.labels, wire.protocol_config, wire.ca_bundle, *runs]
    return [p for p in (local, *files) if p is not None] + [cache or _default_cache()]


def _default_cache() -> Path:
    from .cache import default_cache_dir

    return default_cache_dir()


def _shape(arrays: list[Any]) -> tuple[int, ...] | None:
    shapes = {tuple(a.shape) for a in arrays}
    return shapes.pop() if len(shapes) == 1 else None


def _endpoint_kw(scope: dict[str, Any]) -> dict[str, Any]:
    names = "endpoint sigma wire seed max_queries cache no_cache device".split()
    return {k: scope[k] for k in names}


@app.command()
@with_wire
def train(
    endpoint: Endpoint,
    data: Annotated[
        Path, typer.Option(help="Image folder: flat (unlabeled) or a sub-folder per class.")
    ],
    sigma: Sigma,
    out: Annotated[Path, typer.Option(help="Run folder to write (weights + config.json).")],
    frontend: Annotated[str, typer.Option(help="prompt | denoiser | coordinator")] = "denoiser",
    method: Annotated[str, typer.Option(help="distill | spsa | whitebox | lora")] = "distill",
    objective: Annotated[str, typer.Option(help="stability | classification | mse")] = "stability",
    max_queries: Annotated[
        int, typer.Option(help="Never send more than this many queries.")
    ] = 20_000,
    epochs: Annotated[int, typer.Option(help="Epochs, each validated on the real black box.")] = 5,
    lora_rank: Annotated[
        int | None, typer.Option(help="LoRA rank (peft): front end 0 = off; --method lora 8.")
    ] = None,
    lora_targets: Annotated[
        str | None, typer.Option(help="--method lora: comma-separated layer names.")
    ] = None,
    prompt_width: Annotated[int, typer.Option(help="prompt: frame width (0: full image).")] = 0,
    val_fraction: Annotated[float, typer.Option(help="Held-out share for validation.")] = 0.1,
    pretrain_epochs: Annotated[
        int, typer.Option(help="MSE pre-training epochs (no queries).")
    ] = 30,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out.")] = False,
    size: Size = None,
    grayscale: Grayscale = False,
    seed: Seed = 0,
    cache: CacheDir = None,
    no_cache: NoCache = False,
    device: Device = "auto",
    wire: Wire = Wire(),
) -> None:
    """Learn a front end before the black box from its answers alone."""
    from .data import load_folder, parse_size
    from .training import METHODS, TrainSettings
    from .training import train as run_training

    if method not in (*METHODS, "lora"):
        raise UsageError(f"unknown --method {method!r}: use {', '.join(METHODS)} or lora")
    if method == "lora":  # LoRA inside a local classifier: PEFTSmoothing's white-box method
        _train_lora(locals())
        return
    settings = TrainSettings(
        sigma=sigma,
        frontend=frontend,
        method=method,
        objective=objective,
        epochs=epochs,
        max_queries=max_queries,
        lora_rank=lora_rank or 0,
        prompt_width=prompt_width,
        val_fraction=val_fraction,
        seed=seed,
        pretrain_epochs=pretrain_epochs,
    )
    if frontend not in ("prompt", "denoiser", "coordinator"):
        raise UsageError(f"unknown --frontend {frontend!r}: use prompt, denoiser or coordinator")
    claim(out, FRONTEND, [data, *_inputs(endpoint, wire, cache)])
    x, labels, classes = load_folder(data, parse_size(size), grayscale)
    settings.check(labelled=labels is not None)
    kw = _endpoint_kw(locals())
    kw["max_queries"] = None
    smoothed = _build(**kw)  # the same black box, cache and device as certify

    async def main() -> Any:
        try:
            return await run_training(
                smoothed.blackbox,
                x,
                labels,
                settings,
                out,
                cache=smoothed.cache,
                resume=resume,
                device=smoothed.device,
                concurrency=wire.concurrency,
                log=lambda m: print(m, file=sys.stderr),
            )
        finally:
            await smoothed.aclose()

    result = asyncio.run(main())
    config = result.config
    lora = f", LoRA rank {config.lora_rank}" if config.lora_rank else ""
    print(
        f"trained {config.kind} ({config.trainable_parameters} trainable parameters{lora}) with "
        f"{config.method or 'mse'} / {config.objective}: {config.queries} queries "
        f"({result.sent} sent now, the rest answered before), {result.seconds:.0f}s"
    )
    if config.validation:
        print("epoch  noisy_accuracy  queries")
        for row in config.validation:
            print(f"{row['epoch']:<5}  {row['noisy_accuracy']:<14.3f}  {row.get('queries', '')}")
    print(
        f"saved to {out}; certify with: bbsmooth certify IMAGE --frontend {out} --sigma {sigma} …"
    )


def _train_lora(o: dict[str, Any]) -> None:
    from .adapters.local import TorchModel
    from .data import load_folder, parse_size
    from .lora import train_classifier
    from .smooth import resolve_device

    if not (o["endpoint"].startswith("torch:") and ".py:" in o["endpoint"]):
        raise UsageError(
            "--method lora trains inside a local model: give --endpoint torch:FILE.py:FUNC "
            "(a function returning the torch.nn.Module; peft cannot wrap TorchScript)"
        )
    from .stats import check_sigma

    check_sigma(o["sigma"])
    rank = 8 if o["lora_rank"] is None else o["lora_rank"]
    if rank < 1:
        raise UsageError(f"--lora-rank must be >= 1 for --method lora, got {rank}")
    claim(o["out"], LORA, [o["data"], *_inputs(o["endpoint"], o["wire"], o["cache"])])
    x, labels, _ = load_folder(o["data"], parse_size(o["size"]), o["grayscale"])
    device = resolve_device(o["device"])
    base = TorchModel.from_function(o["endpoint"].removeprefix("torch:"), device)
    targets = o["lora_targets"].split(",") if o["lora_targets"] else None
    model, run = train_classifier(
        base.model,
        x,
        labels,
        sigma=o["sigma"],
        rank=rank,
        targets=targets,
        objective=o["objective"],
        epochs=o["epochs"],
        val_fraction=o["val_fraction"],
        seed=o["seed"],
        out=o["out"],
        device=device,
        log=lambda m: print(m, file=sys.stderr),
    )
    print(
        f"trained LoRA rank {rank} on {', '.join(run.targets)}: {run.trainable_parameters} of "
        f"{run.total_parameters} parameters, {run.seconds:.0f}s"
    )
    print("epoch  noisy_accuracy")
    for row in run.validation:
        print(f"{row['epoch']:<5}  {row['noisy_accuracy']:.3f}")
    print(f"saved to {o['out']}; certify with: bbsmooth certify IMAGE --endpoint {o['endpoint']} "
          f"--adapter {o['out']} --sigma {o['sigma']} …")  # fmt: skip


@app.command()
@with_wire
def evaluate(
    data: Annotated[Path, typer.Option(help="Folder of class sub-folders, or a path,label CSV.")],
    endpoint: Endpoint,
    sigma: Sigma,
    out: Annotated[Path, typer.Option(help="Folder for certify.tsv, summary.json and the plot.")],
    n0: Annotated[int, typer.Option(help="Selection samples.")] = 100,
    n: Annotated[
        int | None, typer.Option(help="Estimation samples (default 10,000; the cap when adaptive).")
    ] = None,
    alpha: Alpha = 0.001,
    classes: Annotated[
        str | None, typer.Option(help="Comma-separated class names in index order.")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many images.")] = None,
    skip: Annotated[int, typer.Option(help="Start at this image index.")] = 0,
    every: Annotated[int, typer.Option(help="Take every K-th image (papers: 20 on CIFAR).")] = 1,
    target_radius: TargetRadius = None,
    budget: QueryBudget = None,
    bound: Bound = "union",
    dry_run: DryRun = False,
    price_per_1000: Price = None,
    seed: Seed = 0,
    max_queries: MaxQueries = None,
    cache: CacheDir = None,
    no_cache: NoCache = False,
    size: Size = None,
    grayscale: Grayscale = False,
    device: Device = "auto",
    frontend: FrontendRun = None,
    adapter: AdapterRun = None,
    force: Force = False,
    wire: Wire = Wire(),
) -> None:
    """Certify a labelled data set: per-image TSV, summary.json and a certified-accuracy plot."""
    from tqdm import tqdm

    from . import evaluate as ev
    from .data import parse_size

    what, kw = _certify_kw(n0, n, alpha, target_radius, budget, bound)
    order = [c.strip() for c in classes.split(",")] if classes else None
    if order is None and wire.labels is not None:
        from .adapters import LabelMap

        order = list(LabelMap.load(wire.labels).classes) or None
    dataset = ev.load_dataset(data, order)
    indices = ev.select(len(dataset.paths), skip, every, limit)
    if not dry_run:
        chosen = [dataset.paths[i] for i in indices]
        claim(out, EVALUATION, [data, *chosen, *_inputs(endpoint, wire, cache, frontend, adapter)])
    per_image = n0 + kw.get("n", kw.get("n_max", 0))
    if dry_run:
        _dry_run(len(indices), per_image, price_per_1000)
        return
    if not indices:
        raise UsageError("--skip/--every/--limit select no images")
    load = ev.load_for(parse_size(size), grayscale)
    shape = ev.check_images(dataset, indices, load)
    smoothed = _build(
        **_endpoint_kw(locals()), frontend=frontend, force=force, image_shape=shape,
        adapter=adapter,
    )  # fmt: skip
    certify_one = smoothed.certify if what == "certify" else smoothed.certify_adaptive
    bar = tqdm(total=len(indices), desc="evaluate", unit="image", disable=None, file=sys.stderr)
    start = time.perf_counter()

    async def main() -> list[Any]:
        try:
            return await ev.run(
                lambda x: certify_one(x, **kw), dataset, indices, load,
                images_in_flight=max(1, wire.concurrency // 4), on_row=lambda r: bar.update(),
            )  # fmt: skip
        finally:
            await smoothed.aclose()
            bar.close()

    rows = asyncio.run(main())
    reused = sum(not r.fresh for r in rows)
    if reused:
        warn(f"{reused} of {len(rows)} images: {REUSED}{REUSED_FIX} (the TSV's fresh column is 0)")
    setting = {
        "data": str(data), "endpoint": _redacted(endpoint), "sigma": sigma, "n0": n0,
        "n": kw.get("n", kw.get("n_max")), "alpha": alpha, "seed": seed,
        "mode": {"certify": "fixed"}.get(what, "budget" if budget else "target"),
        "target_radius": target_radius, "budget": budget, "bound": kw.get("bound", "cp"),
        "frontend": str(frontend) if frontend else None, "method": _method(frontend),
        "classes": dataset.classes,
        "price_per_1000": price_per_1000,
    }  # fmt: skip
    summary = ev.summarize(rows, setting, time.perf_counter() - start)
    if price_per_1000 is not None:
        summary["cost"] = summary["queries_sent"] / 1000 * price_per_1000
    ev.write_report(out, rows, summary)
    grid = [0.0, 0.25, 0.5, 0.75, 1.0]
    accuracy = ev.certified_accuracy(rows, grid)
    print("radius             " + "  ".join(f"{r:>5.2f}" for r in grid))
    print("certified accuracy " + "  ".join(f"{a:>5.3f}" for a in accuracy))
    print(
        f"{len(rows)} images: ACR {summary['average_certified_radius']:.3f}, abstained "
        f"{summary['abstain_rate']:.1%}, {summary['queries_per_image']:,.0f} queries per image"
    )
    sent = summary["queries_sent"]
    print(
        f"queries: {sent} sent{_cost(sent, price_per_1000)}, {summary['queries_cached']} "
        f"replayed from cache; wrote {out / ev.TSV}, {out / ev.SUMMARY}, {out / ev.PLOT}"
    )


def _method(frontend: Path | None) -> str | None:
    """How the front end was trained (distill, spsa, whitebox, mse), for plot legends."""
    if frontend is None:
        return None
    from .frontends.base import read_config

    config = read_config(frontend)
    return f"{config.kind} {config.method or 'mse'}"


def _redacted(endpoint: str) -> str:
    from .adapters.http import redact

    return redact(endpoint) if endpoint.startswith(("http://", "https://")) else endpoint


@app.command()
def plot(
    runs: Annotated[list[Path], typer.Argument(help="certify.tsv files (ours or Cohen et al.'s).")],
    out: Annotated[Path, typer.Option(help="PNG to write.")] = Path("certified_accuracy.png"),
) -> None:
    """Overlay certified-accuracy curves of several runs, one legend entry each."""
    from . import evaluate as ev
    from .runfolder import claim_file

    claim_file(out, runs)
    ev.plot([(ev.legend(p), ev.read_tsv(p)) for p in runs], out)
    print(f"wrote {out}")


@app.command()
@with_wire
def labels(
    images: Images,
    endpoint: Endpoint,
    top: Annotated[int, typer.Option(help="Labels to show per image.")] = 5,
    as_json: Json = False,
    size: Size = None,
    grayscale: Grayscale = False,
    device: Device = "auto",
    wire: Wire = Wire(),
) -> None:
    """Show what the endpoint answers for some images (no noise), to help write --labels."""
    from .adapters import open_blackbox
    from .smooth import resolve_device

    arrays = _load_all(images, size, grayscale)
    options = wire.options()
    box = open_blackbox(endpoint, options, resolve_device(device))
    mapping = getattr(box, "labels", None)

    async def main() -> list[Any]:
        import torch

        try:
            return [await _answers(box, torch.from_numpy(a[None])) for a in arrays]
        finally:
            await box.aclose()

    for path, pairs in zip(images, asyncio.run(main()), strict=True):
        ranked = sorted(pairs, key=lambda p: -p[1])[:top]
        rows = []
        for label, score in ranked:
            cls = mapping.lookup(label) if mapping is not None else _index(label)
            name = "OTHER" if cls is None else _class_name(mapping, cls)
            # the server's words: redacted of the key, printable, a readable length
            rows.append({"label": server_text(label), "score": score, "class": name})
        if as_json:
            print(json.dumps({"image": str(path), "answers": rows}))
            continue
        print(path.name)
        for r in rows:
            print(f"  {r['score']:>8.4f}  {r['label']:<32}  → {r['class']}")


async def _answers(box: Any, image: Any) -> list[tuple[str, float]]:
    """One image's (label, score) answers: vendor labels, or class indices with scores."""
    if hasattr(box, "annotate"):
        return list((await box.annotate(image))[0])
    answer = await box.classify(image)
    if answer.scores is None:
        return [(str(int(answer.labels[0])), 1.0)]
    return [(str(k), float(v)) for k, v in enumerate(answer.scores[0])]


def _index(label: str) -> int | None:
    return int(label) if label.isdigit() else None


def _class_name(mapping: Any, cls: int) -> str:
    classes = getattr(mapping, "classes", ())
    return (
        f"{cls} ({classes[cls]})" if cls < len(classes) and classes[cls] != str(cls) else str(cls)
    )


@app.command()
def serve(
    endpoint: Annotated[
        str, typer.Option("--endpoint", "-e", help="torch:FILE.pt or python:FILE.py:FUNC")
    ],
    name: Annotated[str, typer.Option(help="Model name in /v2/models/NAME.")] = "model",
    host: Annotated[str, typer.Option(help="Address to bind (loopback unless you mean it).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port (0: any free port).")] = 8000,
    delay: Annotated[float, typer.Option(help="Seconds of service delay per request.")] = 0.0,
    device: Device = "auto",
    max_request_bytes: Annotated[
        int, typer.Option(help="Largest request body accepted (413 beyond, unread).")
    ] = 64 * 2**20,
    client_timeout: Annotated[
        float, typer.Option(help="Seconds a client may stall a read, or take to send a request.")
    ] = 30.0,
    max_connections: Annotated[
        int, typer.Option(help="Connections served at once (503 beyond).")
    ] = 256,
    api_key_env: Annotated[
        str | None,
        typer.Option(
            help="Require Authorization: Bearer KEY, the key read from this environment "
            "variable (health probes stay open)."
        ),
    ] = None,
) -> None:
    """Serve a local classifier over the Open Inference Protocol (KServe V2)."""
    from .adapters import open_blackbox
    from .serve import InferenceServer, is_loopback
    from .smooth import resolve_device

    if not endpoint.startswith(("torch:", "python:")):
        raise UsageError("serve needs a local endpoint: torch:FILE.pt or python:FILE.py:FUNC")
    # Every check before the model loads: a typo fails at once, not after the load.
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {port}")
    for option, value in (
        ("--max-request-bytes", max_request_bytes),
        ("--max-connections", max_connections),
    ):
        if value < 1:
            raise UsageError(f"{option} must be >= 1, got {value}")
    if not client_timeout > 0:
        raise UsageError(f"--client-timeout must be > 0, got {client_timeout}")
    api_key = None
    if api_key_env is not None:
        from .adapters.auth import read_key

        api_key = read_key(api_key_env) if api_key_env else None
        if not api_key:  # name the variable, never a value
            raise UsageError(f"--api-key-env {api_key_env}: that variable is not set or is empty")
    try:
        local = is_loopback(host)
    except (OSError, UnicodeError, ValueError) as e:
        reason = getattr(e, "strerror", None) or "not a host name or address"
        raise UsageError(f"cannot use --host {host!r}: {reason}") from e
    if not local:
        need = (
            f"requests need the key in ${api_key_env}"
            if api_key
            else "use --api-key-env NAME to require a key"
        )
        warn(
            f"serving on {host or 'all interfaces'} exposes the model beyond this machine, "
            f"over plain HTTP; {need}"
        )
    model = open_blackbox(endpoint, device=resolve_device(device))
    try:
        server = InferenceServer(
            model,  # type: ignore[arg-type]
            name=name,
            host=host,
            port=port,
            delay=delay,
            max_request_bytes=max_request_bytes,
            client_timeout=client_timeout,
            max_connections=max_connections,
            api_key=api_key,
        )
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    print(f"serving {endpoint} at {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()


def main() -> None:
    """Entry point: run the app, turning every error into one line and an exit code."""
    interrupted = "interrupted; answered blocks are cached: run the same command again to resume"
    try:
        # Outside standalone mode typer answers Ctrl-C and typer.Exit with a return code.
        code = app(args=sys.argv[1:] or ["--help"], standalone_mode=False)
        if code == 130:
            _fail(interrupted, 130)
        if isinstance(code, int) and code:
            sys.exit(code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        _fail(interrupted, 130)
    except BBSmoothError as e:
        _fail(" ".join(str(e).split()), e.exit_code)
    except typer.TyperException as e:  # the command line itself: unknown option, missing value
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        _fail(" ".join(message.split()) + " (see --help)", 2)
    except OSError as e:  # the machine, not the program: a full disk, a permission, a device
        where = f" ({e.filename})" if e.filename else ""
        _fail(f"{e.strerror or type(e).__name__}{where}: free space, fix permissions or pick "
              "another path", 2)  # fmt: skip


def _fail(message: str, code: int) -> None:
    # the last line of defence: whatever a message holds, no key and no escape sequence
    print(f"bbsmooth: error: {printable(redact(message), 2000)}", file=sys.stderr)
    sys.exit(code)
