"""Options declared once (options.py): the CLI's flags come from the declarations, each
options object checks its values when built, and the library jobs give what the CLI prints."""

import dataclasses
import json
import math

import numpy as np
import pytest
import typer

from blackbox_smooth import jobs
from blackbox_smooth.cli import app
from blackbox_smooth.errors import UsageError
from blackbox_smooth.options import (
    CertifyOptions,
    DatasetOptions,
    EndpointOptions,
    ImageOptions,
    ServeOptions,
    SmoothingOptions,
    TrainSettings,
    cli_fields,
    help_of,
)

from .conftest import run_cli, write_linear

GROUPS = {  # command → the option groups it takes whole
    "certify": (SmoothingOptions, EndpointOptions, ImageOptions, CertifyOptions),
    "evaluate": (SmoothingOptions, EndpointOptions, ImageOptions, CertifyOptions, DatasetOptions),
    "predict": (SmoothingOptions, EndpointOptions, ImageOptions),
    "train": (EndpointOptions, ImageOptions),
    "labels": (EndpointOptions, ImageOptions),
    "serve": (ServeOptions,),
}


def _params(command: str) -> dict:
    group = typer.main.get_command(app)  # typer's own click
    return {p.name: p for p in group.commands[command].params if p.name}


@pytest.mark.parametrize("command", sorted(GROUPS))
def test_every_flag_of_a_group_has_its_declared_default_and_help(command):
    params = _params(command)
    for cls in GROUPS[command]:
        for field in cli_fields(cls):
            if field.name == "wire":  # nested: its own fields are checked as EndpointOptions
                continue
            param = params[field.name]
            assert param.help == field.metadata["help"], (command, field.name)
            if field.metadata["required"]:
                assert param.required, (command, field.name)
            else:
                assert param.default == field.default, (command, field.name)


def test_train_takes_the_smoothing_flags_but_those_of_certification():
    params = _params("train")
    shared = {f.name: f for f in dataclasses.fields(SmoothingOptions)}
    for name in ("endpoint", "sigma", "seed", "cache", "no_cache", "device"):
        assert params[name].help == shared[name].metadata["help"], name
    assert "adapter" not in params  # certify's --force (another σ or box) is not train's:
    assert params["force"].help == help_of(TrainSettings, "force")
    assert params["frontend"].help == "prompt | denoiser | coordinator"  # TrainSettings' kind
    assert params["max_queries"].default == 20_000


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: EndpointOptions(concurrency=0), "--concurrency must be >= 1"),
        (lambda: EndpointOptions(batch=0), "--batch must be >= 1"),
        (lambda: EndpointOptions(rps=0.0), "--rps must be > 0"),
        (lambda: EndpointOptions(timeout=math.nan), "--timeout must be > 0"),
        (lambda: EndpointOptions(protocol="soap"), "--protocol 'soap' is unknown"),
        (lambda: EndpointOptions(jpeg_quality=101), "--jpeg-quality must be 1..100"),
        (lambda: SmoothingOptions("python:m.py:f", math.inf), "--sigma must be a finite"),
        (lambda: SmoothingOptions("python:m.py:f", 0.5, max_queries=-1), "--max-queries"),
        (
            lambda: SmoothingOptions("python:m.py:f", 0.5, cache=".", no_cache=True),
            "contradict",
        ),
        (lambda: CertifyOptions(n0=0), "--n0 must be >= 1"),
        (lambda: CertifyOptions(budget=50), "must exceed --n0"),
        (lambda: CertifyOptions(budget=500, target_radius=0.5), "pick one"),
        (lambda: CertifyOptions(bound="cs"), "add --target-radius"),
        (
            lambda: CertifyOptions(target_radius=-1.0),
            "--target-radius must be a finite number >= 0",
        ),
        (lambda: DatasetOptions(every=0), "--every >= 1"),
        (lambda: TrainSettings(0.5, frontend="unet"), "unknown --frontend"),
        (lambda: TrainSettings(0.5, epochs=0), "--epochs must be >= 1"),
        (lambda: ServeOptions("http://x/v2/models/m/infer"), "needs a local endpoint"),
        (lambda: ServeOptions("torch:m.pt", port=70000), "--port must be in 0..65535"),
    ],
)
def test_options_refuse_bad_values_when_built(build, message):
    with pytest.raises(UsageError, match=message):
        build()


def test_a_certify_plan_says_what_it_will_ask():
    assert CertifyOptions().arguments() == {"n0": 100, "n": 10_000, "alpha": 0.001}
    budget = CertifyOptions(n0=16, budget=1016, bound="cs")
    assert budget.adaptive and budget.mode == "budget" and budget.per_image == 1016
    assert budget.arguments()["n_max"] == 1000 and budget.arguments()["bound"] == "cs"
    assert CertifyOptions(target_radius=0.5).mode == "target"


def test_the_library_job_gives_what_the_cli_prints(tmp_path):
    """jobs.certify is what `bbsmooth certify` runs: the same certificates, field for field."""
    import numpy as np

    from blackbox_smooth.data import save_image

    spec = write_linear(tmp_path / "lin.py", np.full(4, 0.5, np.float32), -0.9)
    images = []
    for k, level in enumerate((0.2, 0.6, 0.9)):
        images.append(tmp_path / f"x{k}.png")
        save_image(np.full((1, 2, 2), level, np.float32), images[-1])
    cli = run_cli("certify", *images, "-e", spec, "--sigma", "0.5", "--n", "400", "--json",
                  "--no-cache")  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    printed = [json.loads(line) for line in cli.stdout.splitlines()]
    seen = []
    options = SmoothingOptions(spec, 0.5, no_cache=True)
    results = jobs.certify(options, images, CertifyOptions(n=400), on_result=seen.append)
    assert seen == results and len(results) == 3
    for record, result in zip(printed, results, strict=True):
        mine = result.to_json()
        for timing in ("seconds",):
            record.pop(timing), mine.pop(timing)
        assert record == mine


def test_max_memory_takes_sizes_and_refuses_what_is_not_one(tmp_path):
    from blackbox_smooth.memory import parse_bytes

    assert parse_bytes("1.5G") == 3 * 2**29 and parse_bytes("800MiB") == 800 * 2**20
    assert parse_bytes("1073741824") == 2**30
    for bad in ("lots", "-1G", "1M"):
        with pytest.raises(UsageError, match="--max-memory"):
            parse_bytes(bad)
    model = write_linear(tmp_path / "m.py", np.ones(784), -300.0)
    r = run_cli("predict", tmp_path / "none.png", "-e", model, "--sigma", "0.5",
                "--max-memory", "lots")  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "give e.g. 1G" in r.stderr


def test_command_flags_rebuild_the_options_and_leave_out_what_a_preset_filled():
    from blackbox_smooth.options import command_flags

    wire = EndpointOptions(preset="caffe", input_std="2,2,2", batch=8)
    url = "http://127.0.0.1:9/v2/models/m/infer"
    options = SmoothingOptions(url, 0.25, cache="my cache", wire=wire)
    flags = command_flags(options)
    assert flags == ["--endpoint", url, "--sigma", "0.25", "--cache", "my cache",
                     "--batch", "8", "--preset", "caffe", "--input-std", "2,2,2"]  # fmt: skip
    assert command_flags(ImageOptions(size="320x320", resize="letterbox", fill=0.25)) == [
        "--size", "320x320", "--resize", "letterbox", "--fill", "0.25"]  # fmt: skip
    assert command_flags(TrainSettings(sigma=0.5, head_stage=False)) == [
        "--sigma", "0.5", "--no-head-stage"]  # fmt: skip
