"""`bbsmooth`: parse the options, call one library job (jobs.py), print what it returns.

Every flag is derived from its declaration in options.py (type, default, help). Errors are one
line on stderr with an exit code: 2 bad input or usage, 3 an endpoint that fails after
retries, 4 an exhausted query budget, 130 interrupted, 143 terminated (SIGTERM).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import shlex
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from . import jobs
from .errors import BBSmoothError, UsageError, warn
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
    help_of,
    sigma_warning,
)
from .progress import echo, progress_bar
from .redaction import printable, redact

if TYPE_CHECKING:
    from .evaluate import Row
    from .training.loop import TrainResult

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Certified l2 robustness for image classifiers you can only query.",
)


class _Argument(typer.core.TyperArgument):
    """A positional argument shown as IMAGE... in usage and help, where typer 0.29 writes
    {images}... and IMAGE... <list[Path]>."""

    def _usage_display_name(self) -> str:
        return self.display_name_raw + ("..." if self.nargs != 1 else "")

    def _rich_display_name(self) -> str:
        return self._usage_display_name()

    def display_type(self, ctx: Any) -> str:
        return ""


class _Command(typer.core.TyperCommand):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        for param in self.params:
            if type(param) is typer.core.TyperArgument:
                param.__class__ = _Argument


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import version

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


def flag(cls: type, name: str, *declarations: str) -> Any:
    """The typer option of field `name` of `cls`, with the help declared there."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    declared = declarations or field.metadata["flags"]
    if not declared and field.type == "bool":  # a switch: --grayscale, never --no-grayscale
        declared = ("--" + name.replace("_", "-"),)
    return typer.Option(*declared, help=help_of(cls, name))


def with_options(
    cls: type, into: str, exclude: tuple[str, ...] = ()
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command every CLI field of the dataclass `cls` (and of the dataclasses inside
    it: SmoothingOptions.wire) as an option, less `exclude` (left at their defaults); the
    command receives them built and checked, as `into=cls(…)`. In --help they come after the
    required ones and before the command's own, the nested ones (the wire) last."""
    params, tail, build = _parameters(cls, exclude)

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != into]
        clash = {p.name for p in own} & {p.name for p in [*params, *tail]}
        assert not clash, f"{command.__name__}: {clash} declared twice"
        required = [p for p in own if p.default is inspect.Parameter.empty]
        rest = [p for p in own if p.default is not inspect.Parameter.empty]
        ordered = [*required, *params, *rest, *tail]

        @functools.wraps(command)
        def wrapper(*args: Any, **kw: Any) -> None:
            built = build(kw)
            warning = sigma_warning(getattr(built, "sigma", 0.0))
            if warning:
                warn(warning)
            command(*args, **{into: built}, **kw)

        annotations = {k: v for k, v in command.__annotations__.items() if k != into}
        added = {p.name: p.annotation for p in [*params, *tail]}
        wrapper.__annotations__ = {**annotations, **added}
        # typer reads options by name; keyword-only keeps Python's order rules out of the way
        wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in ordered]
        )
        return wrapper

    return decorate


def _parameters(
    cls: type, exclude: tuple[str, ...]
) -> tuple[list[inspect.Parameter], list[inspect.Parameter], Callable[[dict[str, Any]], Any]]:
    """The command-line parameters of `cls`'s own fields and of its nested dataclasses', and
    how to build `cls` from them (taking them out of a command's keyword arguments)."""
    hints = typing.get_type_hints(cls)
    params: list[inspect.Parameter] = []
    tail: list[inspect.Parameter] = []
    own: list[str] = []  # the fields of cls itself
    nested: dict[str, Callable[[dict[str, Any]], Any]] = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            inner, inner_tail, nested[f.name] = _parameters(hints[f.name], ())
            tail += [*inner, *inner_tail]
        elif f.metadata.get("cli", True):
            own.append(f.name)
            params.append(
                inspect.Parameter(
                    f.name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=inspect.Parameter.empty if f.metadata["required"] else f.default,
                    annotation=Annotated[hints[f.name], flag(cls, f.name)],
                )
            )

    def build(kw: dict[str, Any]) -> Any:
        parts = {name: make(kw) for name, make in nested.items()}
        return cls(**parts, **{name: kw.pop(name) for name in own})

    return params, tail, build


# -- the commands -----------------------------------------------------------------------------
S = SmoothingOptions
Images = Annotated[
    list[Path],
    typer.Argument(metavar="IMAGE", help="Image files (PNG, JPEG, …).", show_default=False),
]
Endpoint = Annotated[str, flag(S, "endpoint")]
Device = Annotated[str, flag(S, "device")]
Json = Annotated[bool, typer.Option("--json", help="One JSON object per image per line.")]
DryRun = Annotated[
    bool, typer.Option("--dry-run", help="Print the worst-case queries and cost; send nothing.")
]
Price = Annotated[float | None, typer.Option(help="Price per 1,000 queries, for the cost.")]


@app.command(cls=_Command)
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
        _print_dry_run(len(images), plan.per_image, price_per_1000)
        return
    _print_images(
        lambda show: jobs.certify(
            options, images, plan, imaging, on_result=show, progress=progress_bar
        ),
        as_json,
        price_per_1000,
        _Table(images, certificates=True, target=plan.target_radius),
    )


@app.command(cls=_Command)
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
    _print_images(
        lambda show: jobs.predict(
            options, images, n, alpha, imaging, on_result=show, progress=progress_bar
        ),
        as_json,
        None,
        _Table(images, certificates=False),
    )


def _print_images(
    run: Callable[[Callable[[jobs.ImageResult], None]], list[jobs.ImageResult]],
    as_json: bool,
    price: float | None,
    table: _Table,
) -> None:
    """A JSON line or a table row as each image finishes (the table's widths are set by the
    file names, known before the first), then the queries spent, also after a failure."""
    done: list[dict[str, Any]] = []

    def show(result: jobs.ImageResult) -> None:
        done.append(result.to_json())
        if as_json:
            print(json.dumps(done[-1]), flush=True)
        else:
            table.row(done[-1])

    try:
        run(show)
    finally:
        if not as_json:
            sent = sum(r["queries_sent"] for r in done)
            cached = sum(r["queries_cached"] for r in done)
            print(f"queries: {sent:,} sent{_cost(sent, price)}, {cached:,} replayed from cache")


class _Table:
    """Rows of certify's or predict's results, printed one by one as images finish. With
    --target-radius R the question is whether each image is certified at R: a column says."""

    def __init__(self, images: list[Path], certificates: bool, target: float | None = None):
        self.certificates, self.target = certificates, target
        head = ["image", "label"]
        least = {"image": max(len(p.name) for p in images), "label": 7, "sent": 7, "cached": 7}
        if target is not None:
            head.append(f"at r={target:g}")
            least[head[-1]] = len("not certified")
        head += ["radius", "p_lower", "max_radius"] if certificates else ["p_value"]
        least["p_value"] = 9
        head += ["sent", "cached", "seconds", "evidence"]
        self.widths = [max(len(h), least.get(h, 6)) for h in head]
        self.head = head
        self.started = False

    def row(self, r: dict[str, Any]) -> None:
        if not self.started:
            self._print(self.head)
            self.started = True
        cells = [Path(r["image"]).name, "abstain" if r["abstain"] else str(r["label"])]
        if self.target is not None:
            held = not r["abstain"] and r["radius"] >= self.target
            cells += ["certified" if held else "not certified"]
        if self.certificates:
            cells += [f"{r['radius']:.3f}", f"{r['p_lower']:.4f}", f"{r['max_radius']:.3f}"]
        else:
            cells += [f"{r['p_value']:.2e}"]
        cells += [f"{r['queries_sent']:,}", f"{r['queries_cached']:,}", f"{r['seconds']:.2f}"]
        # fresh, or which look this was and the α its claim holds at (ledger.py)
        claim = "no claim" if r["alpha_effective"] >= 1 else f"α {r['alpha_effective']:.2g}"
        cells += ["fresh" if r["fresh"] else f"look {r['looks']}, {claim}"]
        self._print(cells)

    def _print(self, cells: list[str]) -> None:
        echo("  ".join(c.ljust(w) for c, w in zip(cells, self.widths, strict=True)).rstrip())


def _cost(queries: int, price: float | None) -> str:
    return "" if price is None else f" (cost {queries / 1000 * price:,.2f})"


def _print_dry_run(images: int, per_image: int, price: float | None) -> None:
    total = images * per_image
    print(
        f"dry run: at most {total:,} queries ({_count(images, 'image')} × {per_image:,})"
        f"{_cost(total, price)}"
        "; nothing sent (answers already cached cost nothing)"
    )


@app.command(cls=_Command)
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
    from .evaluate import PLOT, SUMMARY, TSV

    if dry_run:
        _, indices = jobs.evaluation_images(dataset, options.wire)
        _print_dry_run(len(indices), plan.per_image, price_per_1000)
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
        f"{_count(len(result.rows), 'image')}: ACR {summary['average_certified_radius']:.3f}, "
        f"abstained {summary['abstain_rate']:.1%}, "
        f"{summary['queries_per_image']:,.0f} queries per image"
    )
    sent = summary["queries_sent"]
    print(
        f"queries: {sent} sent{_cost(sent, price_per_1000)}, {summary['queries_cached']} "
        f"replayed from cache; wrote {out / TSV}, {out / SUMMARY}, {out / PLOT}"
    )


def _accuracy(rows: list[Row], grid: list[float]) -> list[float]:
    from .evaluate import certified_accuracy

    return certified_accuracy(rows, grid)


T = TrainSettings


@app.command(cls=_Command)
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
    _print_validation(result)
    # the complete command: the endpoint with its input convention, the image size, the cache
    flags = command_flags(dataclasses.replace(options, frontend=out)) + command_flags(imaging)
    print(f"saved to {out}; certify with: bbsmooth certify IMAGE {shlex.join(flags)}")


def _print_validation(result: TrainResult) -> None:
    """What was trained and spent; validation on the black box, epoch by epoch, with 95%
    intervals; which state was kept."""
    config, record = result.config, result.record
    lora_note = f", LoRA rank {config.lora_rank}" if config.lora_rank else ""
    before = record.queries - result.sent
    spent = _count(record.queries, "query", "queries")
    if record.queries and before:
        spent += f" ({result.sent:,} sent now, {before:,} answered before: cache or earlier run)"
    print(
        f"trained {config.kind} ({config.trainable_parameters:,} trainable parameters{lora_note}) "
        f"with {config.method or 'mse'} / {config.objective}: {spent}, {result.seconds:.0f}s"
    )
    if not record.validation:
        return
    print("epoch  noisy_accuracy  95% interval   vs start (95% interval)  all draws right  queries")
    for row in record.validation:
        low, high = row.get("interval", (math.nan, math.nan))
        gain, gain_low, gain_high = row.get("vs_start", (math.nan, math.nan, math.nan))
        vs = f"{gain:+.3f} ({gain_low:+.3f}, {gain_high:+.3f})" if row["epoch"] else "·"
        steady = row.get("consistency", [math.nan])[-1]
        mark = "  ← kept" if row["epoch"] == record.best_epoch else ""
        print(
            f"{row['epoch']:<5}  {row['noisy_accuracy']:<14.3f}  {low:.3f}–{high:.3f}    "
            f"{vs:<23}  {steady:<15.3f}  {row.get('queries', '')}{mark}"
        )
    if record.stopped_early is not None:
        print(f"stopped early after epoch {record.stopped_early}: validation stopped improving")


@app.command(cls=_Command)
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
    from . import evaluate as ev
    from .runfolder import claim_file

    tsvs = [ev.tsv_of(p) for p in runs]
    claim_file(out, tsvs)
    ev.plot([(ev.legend(p), ev.read_tsv(p)) for p in tsvs], out)
    print(f"wrote {out}")


@app.command(cls=_Command)
@with_options(EndpointOptions, "wire")
@with_options(ImageOptions, "imaging")
def labels(
    images: Images,
    endpoint: Endpoint,
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


@app.command(cls=_Command)
@with_options(ServeOptions, "options")
def serve(*, options: ServeOptions) -> None:
    """Serve a local classifier over the Open Inference Protocol (KServe V2)."""
    server = jobs.serve(options)
    print(f"serving {options.endpoint} at {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()


@app.command(cls=_Command)
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
        print(f"answers   {_count(report.blocks, 'noise block')} holding "
              f"{_count(report.queries, 'query', 'queries')}")  # fmt: skip
        if report.records:
            print(f"journal   {_count(report.records, 'record')} (rows of evaluate --ray done)")
        if report.foreign:
            print(f"foreign   {_count(report.foreign, 'row')} not written by this bbsmooth "
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
    what = (f"{_count(report.queries, 'cached answer')} ({report.bytes / 2**20:,.1f} MiB) in "
            f"{report.directory}")  # fmt: skip
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"clearing would delete {what}: pass --yes to confirm")
        if not typer.confirm(f"Delete {what}? Asking again costs queries", default=False):
            print("nothing cleared")
            return
    cleared, after = jobs.clear_cache(report.directory)
    print(f"cleared {_count(cleared, 'cached answer')}; the cache now takes "
          f"{after.bytes / 2**20:,.1f} MiB (the evidence ledger, kept apart, stays)")  # fmt: skip


def _count(k: int, one: str, many: str | None = None) -> str:
    """'1 image', '2 images': numbers with the noun they count."""
    return f"{k:,} {one if k == 1 else many or one + 's'}"


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
