"""`bbsmooth`: parse the options, call one library job (jobs/), print what it returns.

Every flag is derived from its declaration in options/ (type, default, help). Errors are one
line on stderr with an exit code: 2 bad input or usage, 3 an endpoint that fails after
retries, 4 an exhausted query budget, 130 interrupted, 143 terminated (SIGTERM).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from . import jobs
from .console import Table, cost, count, print_dry_run, print_images, print_training
from .errors import BBSmoothError, UsageError
from .flags import Command, flag, with_options
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
    command_flags,
    default_of,
)
from .progress import progress_bar
from .redaction import printable, redact
from .runfolder import claim_file

if TYPE_CHECKING:
    from .evaluate import Row

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Certified l2 robustness for image classifiers you can only query.",
)


def _version(show: bool) -> None:
    if show:
        print(f"bbsmooth {version('blackbox_smooth')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Certified l2 robustness for image classifiers you can only query."""


# -- the commands -----------------------------------------------------------------------------
S = SmoothingOptions
Images = Annotated[
    list[Path],
    typer.Argument(metavar="IMAGE", help="Image files (PNG, JPEG, …).", show_default=False),
]
EndpointFlag = Annotated[str, flag(S, "endpoint")]
Device = Annotated[str, flag(S, "device")]
Json = Annotated[bool, typer.Option("--json", help="One JSON object per image per line.")]
DryRun = Annotated[
    bool, typer.Option("--dry-run", help="Print the worst-case queries and cost; send nothing.")
]
Price = Annotated[float | None, typer.Option(help="Price per 1,000 queries, for the cost.")]


@app.command(cls=Command)
@with_options(SmoothingOptions, "options")
@with_options(ImageOptions, "imaging")
@with_options(CertifyOptions, "plan")
def certify(
    images: Images,
    as_json: Json = False,
    dry_run: DryRun = False,
    price_per_1000: Price = None,
    *,
    options: SmoothingOptions,
    plan: CertifyOptions,
    imaging: ImageOptions,
) -> None:
    """Certify each image: the smoothed label and an l2 radius, valid with probability ≥ 1 − α."""
    if dry_run:
        jobs.load_images(images, imaging)  # a broken file is an error, even in a dry run
        print_dry_run(len(images), plan.per_image, price_per_1000)
        return
    print_images(
        lambda show: jobs.certify(
            options, images, plan, imaging, on_result=show, progress=progress_bar
        ),
        as_json,
        price_per_1000,
        Table(images, certificates=True, target=plan.target_radius),
    )


@app.command(cls=Command)
@with_options(SmoothingOptions, "options")
@with_options(ImageOptions, "imaging")
def predict(
    images: Images,
    n: Annotated[int, typer.Option(help="Noise samples.")] = 1_000,
    alpha: Annotated[float, flag(CertifyOptions, "alpha")] = default_of(CertifyOptions, "alpha"),
    as_json: Json = False,
    *,
    options: SmoothingOptions,
    imaging: ImageOptions,
) -> None:
    """Predict each image's smoothed label, abstaining when the top two classes are too close."""
    print_images(
        lambda show: jobs.predict(
            options, images, n, alpha, imaging, on_result=show, progress=progress_bar
        ),
        as_json,
        None,
        Table(images, certificates=False),
    )


@app.command(cls=Command)
@with_options(DatasetOptions, "dataset")
@with_options(SmoothingOptions, "options")
@with_options(ImageOptions, "imaging")
@with_options(CertifyOptions, "plan")
@with_options(ClusterOptions, "cluster")
def evaluate(
    out: Annotated[Path, typer.Option(help="Folder for certify.tsv, summary.json and the plot.")],
    dry_run: DryRun = False,
    price_per_1000: Price = None,
    *,
    dataset: DatasetOptions,
    options: SmoothingOptions,
    plan: CertifyOptions,
    imaging: ImageOptions,
    cluster: ClusterOptions,
) -> None:
    """Certify a labelled data set: per-image TSV, summary.json and a certified-accuracy plot."""
    from .evaluate import PLOT, SUMMARY, TSV  # numpy: loaded when the command runs

    if dry_run:
        _, indices = jobs.evaluation_images(dataset, options.wire)
        print_dry_run(len(indices), plan.per_image, price_per_1000)
        return
    result = jobs.evaluate(
        options,
        dataset,
        out,
        plan,
        imaging,
        price_per_1000=price_per_1000,
        progress=progress_bar,
        cluster=cluster,
    )
    summary = result.summary
    grid = [0.0, 0.25, 0.5, 0.75, 1.0]
    print("radius             " + "  ".join(f"{r:>5.2f}" for r in grid))
    print("certified accuracy " + "  ".join(f"{a:>5.3f}" for a in _accuracy(result.rows, grid)))
    print(
        f"{count(len(result.rows), 'image')}: ACR {summary['average_certified_radius']:.3f}, "
        f"abstained {summary['abstain_rate']:.1%}, "
        f"{summary['queries_per_image']:,.0f} queries per image"
    )
    sent = summary["queries_sent"]
    print(
        f"queries: {sent:,} sent{cost(sent, price_per_1000)}, {summary['queries_cached']:,} "
        f"replayed from cache; wrote {out / TSV}, {out / SUMMARY}, {out / PLOT}"
    )


def _accuracy(rows: list[Row], grid: list[float]) -> list[float]:
    from .evaluate import certified_accuracy  # numpy: loaded when the command runs

    return certified_accuracy(rows, grid)


T = TrainSettings


@app.command(cls=Command)
@with_options(SmoothingOptions, "options", exclude=("frontend", "adapter", "force", "max_queries"))
@with_options(ImageOptions, "imaging")
def train(
    data: Annotated[
        Path, typer.Option(help="Image folder: flat (unlabeled) or a sub-folder per class.")
    ],
    out: Annotated[Path, typer.Option(help="Run folder to write (weights + frontend.json).")],
    frontend: Annotated[str, flag(T, "frontend")] = default_of(T, "frontend"),
    method: Annotated[str, flag(T, "method")] = default_of(T, "method"),
    objective: Annotated[str, flag(T, "objective")] = default_of(T, "objective"),
    max_queries: Annotated[int, flag(T, "max_queries")] = default_of(T, "max_queries"),
    epochs: Annotated[int, flag(T, "epochs")] = default_of(T, "epochs"),
    lora_rank: Annotated[int | None, flag(T, "lora_rank")] = None,
    lora_targets: Annotated[str | None, flag(LoraSettings, "targets")] = None,
    prompt_width: Annotated[int, flag(T, "prompt_width")] = default_of(T, "prompt_width"),
    val_fraction: Annotated[float, flag(T, "val_fraction")] = default_of(T, "val_fraction"),
    val_draws: Annotated[int, flag(T, "val_draws")] = default_of(T, "val_draws"),
    confirm_draws: Annotated[int, flag(T, "confirm_draws")] = default_of(T, "confirm_draws"),
    patience: Annotated[int, flag(T, "patience")] = default_of(T, "patience"),
    head_stage: Annotated[bool, flag(T, "head_stage")] = default_of(T, "head_stage"),
    pretrain_epochs: Annotated[int, flag(T, "pretrain_epochs")] = default_of(T, "pretrain_epochs"),
    start: Annotated[Path | None, flag(T, "start")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out.")] = False,
    force: Annotated[bool, flag(T, "force")] = False,
    *,
    options: SmoothingOptions,
    imaging: ImageOptions,
) -> None:
    """Learn a front end before the black box from its answers alone."""
    sigma, seed = options.sigma, options.seed

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    if method == "lora":  # LoRA inside a local classifier: PEFTSmoothing's white-box method
        rank = default_of(LoraSettings, "rank") if lora_rank is None else lora_rank
        lora = LoraSettings(sigma, rank, lora_targets, objective, epochs, val_fraction, seed)
        run = jobs.train_lora(options, lora, data, out, imaging, log=log)
        print(
            f"trained LoRA rank {rank} on {', '.join(run.targets)}: {run.trainable_parameters} "
            f"of {run.total_parameters} parameters, {run.seconds:.0f}s"
        )
        print("epoch  noisy_accuracy")
        for row in run.validation:
            print(f"{row['epoch']:<5}  {row['noisy_accuracy']:.3f}")
        print(f"saved to {out}; certify with: bbsmooth certify IMAGE --endpoint {options.endpoint} "
              f"--adapter {out} --sigma {sigma} …")  # fmt: skip
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
        val_draws=val_draws,
        confirm_draws=confirm_draws,
        patience=patience,
        head_stage=head_stage,
        seed=seed,
        pretrain_epochs=pretrain_epochs,
        start=start,
        force=force,
    )
    result = jobs.train(
        options, settings, data, out, imaging, resume=resume, log=log, progress=progress_bar
    )
    print_training(result)
    # the complete command: the endpoint with its input convention, the image size, the cache
    flags = command_flags(dataclasses.replace(options, frontend=out)) + command_flags(imaging)
    print(f"saved to {out}; certify with: bbsmooth certify IMAGE {shlex.join(flags)}")


@app.command(cls=Command)
def plot(
    runs: Annotated[
        list[Path],
        typer.Argument(
            metavar="RUN",
            help="evaluate --out folders, or certify.tsv files (ours or Cohen et al.'s).",
        ),
    ],
    out: Annotated[Path, typer.Option(help="PNG to write.")] = Path("certified_accuracy.png"),
) -> None:
    """Overlay certified-accuracy curves of several runs, one legend entry each."""
    from . import evaluate as ev  # numpy and matplotlib: loaded when the command runs

    tsvs = [ev.tsv_of(p) for p in runs]
    claim_file(out, tsvs)
    ev.plot([(ev.legend(p), ev.read_tsv(p)) for p in tsvs], out)
    print(f"wrote {out}")


@app.command(cls=Command)
@with_options(EndpointOptions, "wire")
@with_options(ImageOptions, "imaging")
def labels(
    images: Images,
    endpoint: EndpointFlag,
    top: Annotated[int, typer.Option(help="Labels to show per image.")] = 5,
    as_json: Json = False,
    device: Device = default_of(S, "device"),
    *,
    imaging: ImageOptions,
    wire: EndpointOptions,
) -> None:
    """Show what the endpoint answers for some images (no noise), to help write --labels."""
    answers = jobs.labels(endpoint, images, wire, imaging, top=top, device=device)
    for path, ranked in zip(images, answers, strict=True):
        if as_json:
            rows = [{"label": a.label, "score": a.score, "class": a.cls} for a in ranked]
            print(json.dumps({"image": str(path), "answers": rows}))
            continue
        print(path.name)
        for a in ranked:
            print(f"  {a.score:>8.4f}  {a.label:<32}  → {a.cls}")


@app.command(cls=Command)
@with_options(ServeOptions, "options")
def serve(*, options: ServeOptions) -> None:
    """Serve a local classifier over the Open Inference Protocol (KServe V2)."""
    server = jobs.serve(options)
    print(f"serving {options.endpoint} at {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()


@app.command(cls=Command)
@with_options(SmoothingOptions, "options")
@with_options(ImageOptions, "imaging")
@with_options(CertifyOptions, "plan")
@with_options(ProxyOptions, "settings")
def proxy(
    *,
    options: SmoothingOptions,
    plan: CertifyOptions,
    imaging: ImageOptions,
    settings: ProxyOptions,
) -> None:
    """Serve certified predictions over HTTP: each answer a label and its certificate."""
    server = jobs.proxy(options, plan, imaging, settings)
    replicas = f" on {settings.replicas} Ray Serve replicas" if settings.ray is not None else ""
    print(f"certifying at {server.url}/v1/certify{replicas} (metrics at /metrics; SIGTERM or "
          "Ctrl-C stops after the requests in flight)", flush=True)  # fmt: skip
    server.run()


cache_app = typer.Typer(
    no_args_is_help=True,
    help="See or clear the cache of answered queries ($BBSMOOTH_CACHE, else the user cache).",
)
app.add_typer(cache_app, name="cache")
CacheDir = Annotated[
    Path | None,
    typer.Option("--cache", help="Cache directory (default: $BBSMOOTH_CACHE, else user cache)."),
]


@cache_app.command("info")
def cache_info(cache: CacheDir = None, as_json: Json = False) -> None:
    """Where the cache is, what it holds and its size on disk."""
    report = jobs.cache_info(cache)
    if as_json:
        print(json.dumps({**dataclasses.asdict(report), "directory": str(report.directory)}))
    elif not report.exists:
        print(f"{report.directory}: no cache yet (nothing has been answered there)")
    else:
        print(f"location  {report.directory}")
        print(f"answers   {count(report.blocks, 'noise block')} holding "
              f"{count(report.queries, 'query', 'queries')}")  # fmt: skip
        if report.records:
            print(f"journal   {count(report.records, 'record')} (rows of evaluate --ray done)")
        if report.foreign:
            print(f"foreign   {count(report.foreign, 'row')} not written by this bbsmooth "
                  "(never read)")  # fmt: skip
        print(f"size      {report.bytes / 2**20:,.1f} MiB on disk")


@cache_app.command("clear")
def cache_clear(
    cache: CacheDir = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Clear without asking.")] = False,
) -> None:
    """Delete the cached answers (asking again costs queries); the evidence ledger stays."""
    report = jobs.cache_info(cache)
    if not report.exists or not report.blocks:
        print(f"{report.directory}: no cached answers, nothing to clear")
        return
    what = (f"{count(report.queries, 'cached answer')} ({report.bytes / 2**20:,.1f} MiB) in "
            f"{report.directory}")  # fmt: skip
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"clearing would delete {what}: pass --yes to confirm")
        if not typer.confirm(f"Delete {what}? Asking again costs queries", default=False):
            print("nothing cleared")
            return
    cleared, after = jobs.clear_cache(report.directory)
    print(f"cleared {count(cleared, 'cached answer')}; the cache now takes "
          f"{after.bytes / 2**20:,.1f} MiB (the evidence ledger, kept apart, stays)")  # fmt: skip


def main() -> None:
    """Entry point: run the app, turning every error into one line and an exit code."""
    interrupted = "interrupted; answered blocks are cached: run the same command again to resume"
    try:
        # Outside standalone mode typer answers Ctrl-C and typer.Exit with a return code.
        code = app(args=sys.argv[1:] or ["--help"], prog_name="bbsmooth", standalone_mode=False)
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
