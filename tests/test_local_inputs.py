"""The user's own files may be hostile or broken: images, label maps, vendor configs, front-end
and LoRA runs, model files, the cache. bbsmooth must never block on them (a FIFO, /dev/zero),
never exhaust memory (a config claiming a 60000×60000 prompt, a weights header claiming a huge
tensor, a class index of 10^10), never crash with a traceback (wrong types, 100,000 levels of
JSON, a CSV field over csv's limit, a damaged cache): one line, exit 2, and the user's files as
they were.

The CLI runs in a child process where the process is the point (it must finish within a timeout
and under an address-space limit); everything else is called in-process.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import sqlite3
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from blackbox_smooth.adapters.generic import VendorConfig
from blackbox_smooth.adapters.labels import LabelMap
from blackbox_smooth.adapters.local import PythonFunction, TorchModel
from blackbox_smooth.blackbox import MAX_CLASSES, OTHER, Answer
from blackbox_smooth.cache import BlockCache
from blackbox_smooth.data import load_folder, load_image, save_image
from blackbox_smooth.digests import file_digest, module_digest
from blackbox_smooth.errors import ProtocolError, UsageError
from blackbox_smooth.evaluate import load_dataset
from blackbox_smooth.frontends.base import (
    FrontEndConfig,
    build,
    check_config,
    from_pretrained,
    read_config,
    read_record,
    save_pretrained,
)
from blackbox_smooth.inputs import parse_json, read_bytes, read_json, read_text
from blackbox_smooth.lora import LoraRun, load_adapter, read_run, save_run, wrap
from blackbox_smooth.training.validation import Confirmation

from .conftest import ROOT

LIMIT_AS = 3 << 30  # a normal certify run peaks near 1.5 GiB of address space (measured)
TIMEOUT = 90  # seconds: a child that blocks on a FIFO is killed and the case fails
SECRET = "hunter2-not-for-printing"
ENDPOINT_SOURCE = "import numpy as np\n\ndef f(x):\n    return np.zeros(len(x), dtype=np.int64)\n"
# Run bbsmooth under an address-space limit. Set in the child itself rather than through
# preexec_fn, which is unsafe when the parent runs children from several threads.
LIMITED = (
    "import resource, runpy, sys; n = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_AS, (n, n)); "
    "sys.argv = ['bbsmooth', *sys.argv[2:]]; "
    "runpy.run_module('blackbox_smooth', run_name='__main__', alter_sys=True)"
)


def _can_chattr(folder: Path) -> bool:
    probe = folder / "chattr-probe"
    probe.write_text("x")
    try:
        ok = subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode == 0
    except OSError:
        return False
    if ok:
        subprocess.run(["chattr", "-i", str(probe)], check=True)
    probe.unlink()
    return ok


def _immutable(path: Path, on: bool) -> None:
    subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True, capture_output=True)


def _snapshot(folder: Path) -> dict[str, object]:
    """Every file under `folder`: content digest (size and mtime for huge sparse files), or
    its kind for a FIFO (reading one would block)."""
    out: dict[str, object] = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        if stat.S_ISFIFO(st.st_mode):
            out[str(p)] = "fifo"
        elif stat.S_ISREG(st.st_mode):
            if st.st_size > 64 << 20:
                out[str(p)] = (st.st_size, st.st_mtime_ns, st.st_blocks)
            else:
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# -- the files every case may use ----------------------------------------------------------


def _image(root: Path) -> Path:
    path = root / "img.png"
    save_image(np.random.default_rng(0).random((1, 28, 28)), path)
    return path


def _endpoint(root: Path) -> str:
    (root / "f.py").write_text(ENDPOINT_SOURCE)
    return f"python:{root / 'f.py'}:f"


def _prompt_run(root: Path, **config: object) -> Path:
    """A valid 1×28×28 prompt front end, its frontend.json then overwritten with `config`."""
    run = root / "run"
    c = FrontEndConfig("prompt", 1, 28, 28, 0.25)
    save_pretrained(build(c), c, run)
    if config:
        data = {**json.loads((run / "frontend.json").read_text()), **config}
        (run / "frontend.json").write_text(json.dumps(data))
    return run


GOOD_CONFIRMATION = {
    "draws": 32,
    "images": 3,
    "active": True,
    "start": [3, 2],
    "start_wrong": [0, 4],
    "queries": 96,
}


@pytest.mark.parametrize(
    "confirmation,message",
    [
        ("all", "must be an object with active, draws, images, queries, start"),
        ({"draws": 16, "images": 3}, "must be an object with active, draws, images, queries"),
        ({**GOOD_CONFIRMATION, "draws": -1}, "'draws' is -1, outside >= 0"),
        ({**GOOD_CONFIRMATION, "active": 1}, "'active' must be true or false"),
        ({**GOOD_CONFIRMATION, "start": [4, 2]}, "'start' counts more than its 3 images"),
        ({**GOOD_CONFIRMATION, "start": 3}, "'start' must be a list of counts, not 3"),
        ({**GOOD_CONFIRMATION, "start": ["3"]}, "'start' must be a list of counts"),
        ({**GOOD_CONFIRMATION, "start_wrong": [0, 97]}, "counts more than its 96 answers"),
        ({**GOOD_CONFIRMATION, "start_wrong": [1]}, "one count per level of 'start'"),
        ({**GOOD_CONFIRMATION, "start_wrong": 2}, "'start_wrong' must be a list of counts"),
    ],
)
def test_a_damaged_confirmation_record_is_named(tmp_path, confirmation, message):
    run = _prompt_run(
        tmp_path,
        validation=[{"epoch": 0, "noisy_accuracy": 0.5}],
        extra={"best_epoch": 0, "confirmation": confirmation},
    )
    with pytest.raises(UsageError, match=re.escape(message)):
        from_pretrained(run)
    _prompt_run(tmp_path, validation=[{"epoch": 0, "noisy_accuracy": 0.5, "confirmed": [3, 2]}],
                extra={"best_epoch": 0, "confirmation": GOOD_CONFIRMATION})  # fmt: skip
    assert read_record(run).confirmation == GOOD_CONFIRMATION
    _prompt_run(tmp_path, validation=[{"epoch": 0, "noisy_accuracy": 0.5, "confirmed": 2}])
    with pytest.raises(UsageError, match="'confirmed' must be a list of counts, not 2"):
        from_pretrained(run)
    wrong = {"epoch": 0, "noisy_accuracy": 0.5, "confirmed_wrong": [-1]}
    _prompt_run(tmp_path, validation=[wrong])
    with pytest.raises(UsageError, match="'confirmed_wrong' must be a list of counts"):
        from_pretrained(run)
    # written before the wrong answers were kept: loads, and a resume asks the start again
    older = {k: v for k, v in GOOD_CONFIRMATION.items() if k != "start_wrong"}
    _prompt_run(tmp_path, validation=[{"epoch": 0, "noisy_accuracy": 0.5}],
                extra={"best_epoch": 0, "confirmation": older})  # fmt: skip
    record = read_record(run).confirmation
    assert record is not None and record["start"] is None
    assert Confirmation.from_record(record, torch.arange(3)).start is None


def test_a_run_from_before_frontend_json_still_loads_and_is_replaced_whole(tmp_path):
    """Runs written before the settings file had its own name called it config.json."""
    run = _prompt_run(tmp_path)
    (run / "frontend.json").rename(run / "config.json")
    _, config, _ = from_pretrained(run)
    assert config.kind == "prompt" and config.sigma == 0.25
    newer = FrontEndConfig("prompt", 1, 28, 28, 0.5)
    save_pretrained(build(newer), newer, run)
    assert {p.name for p in run.iterdir()} == {
        ".bbsmooth-run",
        "frontend.json",
        "frontend.safetensors",
    }
    assert from_pretrained(run)[1].sigma == 0.5


def _huge_header_weights(run: Path) -> None:
    """frontend.safetensors whose header declares a 1×16000×16000 prompt (1 GB, a sparse
    file): a valid file, but not the 28×28 front end its frontend.json describes."""
    big, mask = 16000 * 16000 * 4, 28 * 28 * 4
    header = {
        "delta": {"dtype": "F32", "shape": [1, 16000, 16000], "data_offsets": [0, big]},
        "mask": {"dtype": "F32", "shape": [1, 28, 28], "data_offsets": [big, big + mask]},
    }
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(run / "frontend.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + big + mask)


def _cache_with_an_entry(root: Path) -> Path:
    cache = root / "cache"
    store = BlockCache(cache)
    store.put_many([("k", Answer(np.array([1, 2])))])
    store.close()
    return cache


C = ["--sigma", "0.25", "--n", "100", "--n0", "10"]
HTTP = "http://127.0.0.1:9/predictions/digits"  # never reached: every case fails before


def _labels_case(name: str, content: str | bytes | None) -> Callable[[Path], list]:
    def make(root: Path) -> list:
        path = root / name
        if content is None:
            os.mkfifo(path)
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return ["certify", _image(root), "-e", HTTP, *C, "--labels", path]

    return make


def _vendor_case(content: object) -> Callable[[Path], list]:
    def make(root: Path) -> list:
        path = root / "vendor.json"
        if content is None:
            os.mkfifo(path)
        else:
            path.write_text(content if isinstance(content, str) else json.dumps(content))
        return ["certify", _image(root), "-e", "http://127.0.0.1:9/classify", *C,
                "--protocol-config", path]  # fmt: skip

    return make


def _frontend_case(**config: object) -> Callable[[Path], list]:
    def make(root: Path) -> list:
        run = _prompt_run(root, **config)
        return ["certify", _image(root), "-e", _endpoint(root), *C, "--no-cache", "--force",
                "--frontend", run]  # fmt: skip

    return make


def _fifo_config(root: Path) -> list:
    run = _prompt_run(root)
    (run / "frontend.json").unlink()
    os.mkfifo(run / "frontend.json")
    return ["certify", _image(root), "-e", _endpoint(root), *C, "--no-cache", "--frontend", run]


def _fifo_image(root: Path) -> list:
    os.mkfifo(root / "fifo.png")
    return ["certify", root / "fifo.png", "-e", _endpoint(root), *C, "--no-cache"]


def _huge_weights(root: Path) -> list:
    run = _prompt_run(root)
    _huge_header_weights(run)
    return ["certify", _image(root), "-e", _endpoint(root), *C, "--no-cache", "--force",
            "--frontend", run]  # fmt: skip


def _damaged_cache(root: Path) -> list:
    (root / "cache").mkdir()
    (root / "cache" / "cache.db").write_bytes(np.random.default_rng(1).bytes(8192))
    return ["certify", _image(root), "-e", _endpoint(root), *C, "--cache", root / "cache"]


def _read_only_cache(root: Path) -> list:
    cache = _cache_with_an_entry(root)
    _immutable(cache, True)  # root ignores permission bits; the immutable flag stops it too
    return ["certify", _image(root), "-e", _endpoint(root), *C, "--cache", cache]


DEEP = "[" * 100_000 + "]" * 100_000
LONG_FIELD = "a" * 140_000 + ",1\n"
CASES: dict[str, tuple[Callable[[Path], list], str]] = {
    "label map with class 10000000000": (
        _labels_case("big.json", '{"cat": 10000000000}'), "class indices must be 0..99,999"),
    "--labels /dev/zero": (
        lambda root: ["certify", _image(root), "-e", HTTP, *C, "--labels", "/dev/zero"],
        "is not a regular file"),
    "FIFO as an image": (_fifo_image, "is not a regular file"),
    "FIFO as --labels": (_labels_case("labels.json", None), "is not a regular file"),
    "FIFO as --protocol-config": (_vendor_case(None), "is not a regular file"),
    "FIFO as a front end's frontend.json": (_fifo_config, "is not a regular file"),
    "front end config claiming a 60000×60000 prompt": (
        _frontend_case(height=60000, width=60000), "outside 1..8192"),
    "front end config with channels 'one'": (
        _frontend_case(channels="one"), "'channels' must be an integer"),
    "front end config with sigma 'x'": (
        _frontend_case(sigma="x"), "'sigma' must be a finite number"),
    "front end config with a validation row that is a string": (
        _frontend_case(validation=["epoch 1"]), "validation row 1 must be an object"),
    "front end config with best_epoch 'two'": (
        _frontend_case(validation=[{"epoch": 0, "noisy_accuracy": 0.5}], extra={"best_epoch": "two"}),
        "'best_epoch' must be an integer"),
    "front end config keeping an epoch it never validated": (
        _frontend_case(validation=[{"epoch": 0, "noisy_accuracy": 0.5}], extra={"best_epoch": 3}),
        "not among its validated epochs"),
    "front end weights whose header claims a 1 GB tensor": (_huge_weights, "does not match"),
    'vendor config {"labels": 3}': (_vendor_case({"labels": 3}), "'labels' must be"),
    "vendor config with headers []": (
        _vendor_case({"labels": "a", "headers": []}), "'headers' must be an object"),
    "vendor config with auth header:Host": (
        _vendor_case({"labels": "a", "auth": "header:Host"}), "Host header"),
    "vendor config with a credential header": (
        _vendor_case({"labels": "a", "headers": {"Ocp-Apim-Subscription-Key": SECRET}}),
        "no credentials"),
    "CSV label map with a 140,000-character field": (
        _labels_case("long.csv", LONG_FIELD), "field larger than field limit"),
    "label map nested 100,000 levels": (_labels_case("deep.json", DEEP), "nests deeper"),
    "vendor config nested 100,000 levels": (_vendor_case(DEEP), "nests deeper"),
    "damaged cache.db": (_damaged_cache, "is damaged"),
    "read-only cache folder": (_read_only_cache, "cannot use the cache"),
}  # fmt: skip


def _run(args: list, env: dict[str, str]) -> tuple[subprocess.CompletedProcess | None, float]:
    command = [sys.executable, "-c", LIMITED, str(LIMIT_AS), *map(str, args)]
    start = time.monotonic()
    try:
        r = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT,
                           env=env)  # fmt: skip
    except subprocess.TimeoutExpired:
        return None, time.monotonic() - start
    return r, time.monotonic() - start


@pytest.fixture(scope="module")
def cli_results(request, tmp_path_factory):
    """Every selected CLI case, run two at a time (each in its own child process and folder):
    case → (result or None if it timed out, seconds, files before, files after)."""
    wanted = [
        item.callspec.params["case"]
        for item in request.session.items
        if getattr(item, "originalname", "") == "test_hostile_local_input_one_line_exit_2"
    ]
    base = tmp_path_factory.mktemp("local-inputs")
    chattr = _can_chattr(base)
    env = {**os.environ, "BBSMOOTH_CACHE": str(base / "user-cache")}
    env.pop("BBSMOOTH_API_KEY", None)
    prepared = {}
    for number, case in enumerate(dict.fromkeys(wanted)):
        if case == "read-only cache folder" and not chattr:
            continue
        root = base / f"case{number}"
        root.mkdir()
        args = CASES[case][0](root)
        prepared[case] = (root, args, _snapshot(root))

    def one(case: str):
        root, args, before = prepared[case]
        result, seconds = _run(args, env)
        return result, seconds, before, _snapshot(root)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = dict(zip(prepared, pool.map(one, prepared), strict=True))
    yield results
    for root, _, _ in prepared.values():
        if (root / "cache").exists() and chattr:
            _immutable(root / "cache", False)


@pytest.mark.process
@pytest.mark.parametrize("case", list(CASES))
# the first case's setup runs every case (each bounded by TIMEOUT, two at a time): a timeout
# sized to that work, so a loaded machine makes it slower, not red
@pytest.mark.timeout(TIMEOUT * (len(CASES) + 1) // 2 + 60)
def test_hostile_local_input_one_line_exit_2(case, cli_results):
    if case not in cli_results:
        pytest.skip("chattr +i is not available here: the in-process tests cover the cache")
    r, seconds, before, after = cli_results[case]
    assert r is not None, f"still running after {seconds:.0f} s: it blocked"
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("bbsmooth: error:"), r.stderr[-2000:]
    assert CASES[case][1] in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and SECRET not in r.stderr + r.stdout
    assert after == before  # the user's files, byte for byte, and nothing new among them


@pytest.mark.process
def test_a_normal_run_fits_under_the_same_limits(tmp_path):
    """The control: valid inputs, the same address-space limit and timeout, exit 0."""
    run = _prompt_run(tmp_path)
    args = ["certify", _image(tmp_path), "-e", _endpoint(tmp_path), *C, "--frontend", run,
            "--force", "--cache", tmp_path / "cache", "--json"]  # fmt: skip
    r, seconds = _run(args, {**os.environ, "BBSMOOTH_CACHE": str(tmp_path / "user-cache")})
    assert r is not None and r.returncode == 0, r and r.stderr
    assert json.loads(r.stdout)["n"] == 100


# -- reading files: regular, bounded, strict ---------------------------------------------------


@pytest.mark.timeout(30)
def test_readers_refuse_what_is_not_a_regular_file_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    for path, kind in ((tmp_path / "fifo", "a FIFO"), ("/dev/zero", "a character device"),
                       (tmp_path, "a folder")):  # fmt: skip
        with pytest.raises(UsageError, match=f"is not a regular file \\({kind}\\): give"):
            read_bytes(path, "--thing", 100)
    with pytest.raises(UsageError, match="not found"):
        read_bytes(tmp_path / "missing", "--thing", 100)
    with pytest.raises(UsageError, match="is not a regular file"):
        file_digest(str(tmp_path / "fifo"))


def test_readers_bound_the_size_even_when_it_lies(tmp_path):
    (tmp_path / "big").write_bytes(b"x" * 1000)
    with pytest.raises(UsageError, match="larger than 999 bytes"):
        read_bytes(tmp_path / "big", "--thing", 999)
    assert read_bytes(tmp_path / "big", "--thing", 1000) == b"x" * 1000
    # /proc files are regular and claim 0 bytes: the limit holds on what is read
    assert os.stat("/proc/self/status").st_size == 0
    with pytest.raises(UsageError, match="larger than 10 bytes"):
        read_bytes("/proc/self/status", "--thing", 10)


def test_text_and_json_are_strict_and_bounded_in_depth(tmp_path):
    (tmp_path / "bom.json").write_bytes(b'\xef\xbb\xbf{"a": [1, 2]}')
    assert read_json(tmp_path / "bom.json", "--x") == {"a": [1, 2]}
    (tmp_path / "latin.csv").write_bytes("caf\xe9,1\n".encode("latin-1"))
    with pytest.raises(UsageError, match="is not UTF-8 text"):
        read_text(tmp_path / "latin.csv", "--x")
    deepest = "[" * 64 + "]" * 64
    assert parse_json(deepest, "x") == json.loads(deepest)
    for text in ("[" * 65 + "]" * 65, "[" * 100_000, '{"a":' * 2000 + "1" + "}" * 2000):
        with pytest.raises(UsageError, match="nests deeper than 64 levels"):
            parse_json(text, "x")
    for text in ("NaN", "[Infinity]", "1e999", "{nope"):
        with pytest.raises(UsageError, match="is not valid JSON"):
            parse_json(text, "x")


@pytest.mark.timeout(30)
def test_images_and_image_folders_refuse_fifos_and_devices(tmp_path, digit_images):
    os.mkfifo(tmp_path / "fifo.png")
    with pytest.raises(UsageError, match=r"image .*fifo.png is not a regular file \(a FIFO\)"):
        load_image(tmp_path / "fifo.png")
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    with pytest.raises(UsageError, match="a character device"):
        load_image(tmp_path / "zero.png")
    data = tmp_path / "data"
    for cls in ("0", "1"):
        (data / cls).mkdir(parents=True)
        shutil.copy(digit_images[0], data / cls / "a.png")
    os.mkfifo(data / "1" / "b.png")
    with pytest.raises(UsageError, match="b.png is not a regular file"):
        load_folder(data)
    # unchanged behaviour on broken files
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(UsageError, match="not an image Pillow can read"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(UsageError, match="image not found"):
        load_image(tmp_path / "missing.png")


@pytest.mark.timeout(30)
def test_evaluation_csv_field_too_long_fifo_and_dev_zero(tmp_path):
    (tmp_path / "long.csv").write_text("a" * 140_000 + ",1\n")
    with pytest.raises(UsageError, match="field larger than field limit"):
        load_dataset(tmp_path / "long.csv")
    os.mkfifo(tmp_path / "fifo.csv")
    for path in (tmp_path / "fifo.csv", "/dev/zero"):
        with pytest.raises(UsageError, match="--data .* is not a regular file"):
            load_dataset(path)
    (tmp_path / "digits.csv").write_text("a.png,²\n")  # a Unicode digit is a name, not an index
    with pytest.raises(UsageError, match="not among --classes"):
        load_dataset(tmp_path / "digits.csv", classes=["x"])


@pytest.mark.timeout(30)
def test_local_model_files_that_are_fifos_are_refused_before_torch_reads_them(tmp_path):
    os.mkfifo(tmp_path / "model.pt")
    with pytest.raises(UsageError, match="TorchScript file .* is not a regular file"):
        TorchModel.from_torchscript(str(tmp_path / "model.pt"), torch.device("cpu"))
    os.mkfifo(tmp_path / "model.py")
    with pytest.raises(UsageError, match="python endpoint file .* is not a regular file"):
        PythonFunction(f"{tmp_path / 'model.py'}:f")
    with pytest.raises(UsageError, match="python endpoint file .* is not a regular file"):
        TorchModel.from_function(f"{tmp_path / 'model.py'}:f", torch.device("cpu"))


# -- label maps and class indices -----------------------------------------------------------


def test_label_map_class_indices_are_bounded(tmp_path):
    for text in ('{"cat": 10000000000}', '{"cat": -1}', '{"cat": "' + "9" * 5000 + '"}'):
        (tmp_path / "m.json").write_text(text)
        start = time.perf_counter()
        with pytest.raises(UsageError, match="class indices must be 0..99,999"):
            LabelMap.load(tmp_path / "m.json")
        assert time.perf_counter() - start < 1
    (tmp_path / "m.csv").write_text("cat,100000\n")
    with pytest.raises(UsageError, match="class 100000"):
        LabelMap.load(tmp_path / "m.csv")
    (tmp_path / "ok.csv").write_text("cat,99999\n")
    assert len(LabelMap.load(tmp_path / "ok.csv").classes) == MAX_CLASSES


def test_label_map_files_that_are_not_maps_get_one_line(tmp_path):
    cases = {
        "long.csv": ("a" * 140_000 + ",1\n", "field larger than field limit"),
        "deep.json": ("[" * 100_000 + "]" * 100_000, "nests deeper than 64 levels"),
        "list.json": ("[1, 2]", "must be a JSON object"),
        "nested.json": ('{"cat": {"a": 1}}', "not a class"),
        "nan.json": ('{"cat": NaN}', "not valid JSON"),
        "names.csv": ("".join(f"label{i},class{i}\n" for i in range(MAX_CLASSES + 1)),
                      "more than 100,000"),
    }  # fmt: skip
    for name, (text, says) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(UsageError, match=says):
            LabelMap.load(tmp_path / name)


def test_a_large_label_map_is_built_in_linear_time(tmp_path):
    rows = "".join(f"vendor label {i},class {i % 50_000}\n" for i in range(300_000))
    (tmp_path / "big.csv").write_text(rows)
    start = time.perf_counter()
    m = LabelMap.load(tmp_path / "big.csv")
    assert time.perf_counter() - start < 10  # names.index in a loop: hours
    assert len(m.classes) == 50_000 and m.lookup("Vendor  label 7") == m.classes.index("class 7")


def test_identity_labels_beyond_the_class_bound_vote_other():
    identity = LabelMap.identity()
    for label in ("99999999999999999999999", "LABEL_99999999999", "1" + "0" * 5000, 10**12,
                  "100000", "٣", -1):  # fmt: skip
        assert identity.lookup(label) is None
    assert identity.lookup("LABEL_99999") == 99_999 and identity.lookup("007") == 7
    answer = identity.answer([[("LABEL_99999999999", 0.9), ("3", 0.1)], [("1" * 40, 1.0)]], "x")
    assert answer.labels.tolist() == [3, OTHER]


def test_answers_with_class_indices_out_of_range_are_protocol_errors():
    for labels in ([1, 10_000_000_000], [1e30, 2], np.array([0, 2**40]), [MAX_CLASSES, 0]):
        with pytest.raises(ProtocolError, match="class index out of range"):
            Answer.from_output(labels, 2, "the model")
    with pytest.raises(ProtocolError, match="class index out of range"):
        Answer.from_output(np.zeros((2, MAX_CLASSES + 1), np.float32), 2, "the model")
    ok = Answer.from_output([MAX_CLASSES - 1, -5, -1e30], 3, "the model")
    assert ok.labels.tolist() == [MAX_CLASSES - 1, OTHER, OTHER]


# -- vendor configs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"labels": 3}, "'labels' must be a non-empty string"),
        ({"labels": ""}, "'labels' must be a non-empty string"),
        ({"scores": "a"}, "needs a 'labels' path"),
        ({"labels": "a", "headers": []}, "'headers' must be an object"),
        ({"labels": "a", "headers": {"X-Version": 2}}, "must have a string value"),
        ({"labels": "a", "headers": {"X-Version": "2\r\nHost: evil"}}, "control characters"),
        ({"labels": "a", "headers": {"Bad Name": "1"}}, "not a valid HTTP header name"),
        ({"labels": "a", "headers": {"Host": "evil"}}, "Host header"),
        ({"labels": "a", "scores": 1}, "'scores' must be a string or null"),
        ({"labels": "a", "status": ["x"]}, "'status' must be a string or null"),
        ({"labels": "a", "body": "xml"}, "'body' must be"),
        ({"labels": "a", "auth": 3}, "'auth' must be a string"),
        ({"labels": "a", "auth": "magic"}, "is unknown: use bearer"),
        ({"labels": "a", "auth": "query:a b"}, "is unknown"),
        ({"labels": "a", "content_type": 7}, "'content_type' must be a string"),
        ({"labels": "a", "content_type": "image/png\r\nX: y"}, "'content_type' must be a media"),
        ({"labels": "a", "max_image_bytes": True}, "'max_image_bytes' must be an integer"),
        ({"labels": "a", "max_image_bytes": "1000"}, "'max_image_bytes' must be an integer"),
        ({"labels": "a", "max_image_bytes": 0}, "outside 1..100000000"),
        ({"labels": "a", "max_image_bytes": 18446744073709551615}, "outside 1..100000000"),
        ({"labels": "a", "ok": "0"}, "'ok' must be a list"),
        ({"labels": "a", "retry": [{}]}, "'retry' must hold strings or numbers"),
        ({"labels": "a", "name": ["x"]}, "'name' must be a string"),
        ({"labels": "a", "documentation": "x" * 5000}, "'documentation' must be a string"),
        ({"labels": "a", "bogus": 1}, "unknown keys 'bogus'"),
    ],
)
def test_vendor_config_types_are_checked_before_anything_is_built(config, says, tmp_path):
    (tmp_path / "v.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match=says) as info:
        VendorConfig.load(tmp_path / "v.json")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "name", ["Host", "content-length", "Content-Type", "Transfer-Encoding", "Connection",
             "Keep-Alive", "Upgrade", "TE", "Trailer", "Proxy-Authorization", "proxy-foo",
             "Cookie", "Expect", "Bad Name", "X:Y", ""],
)  # fmt: skip
def test_auth_header_names_the_transport_owns_are_refused(name, tmp_path):
    (tmp_path / "v.json").write_text(json.dumps({"labels": "a", "auth": f"header:{name}"}))
    with pytest.raises(UsageError, match="'auth'"):
        VendorConfig.load(tmp_path / "v.json")


@pytest.mark.parametrize(
    ("name", "value"),
    [("Ocp-Apim-Subscription-Key", SECRET), ("X-Goog-Api-Key", SECRET), ("Api-Key", SECRET),
     ("Proxy-Authorization", SECRET), ("X-Auth-Token", SECRET), ("Authorization", SECRET),
     ("x-api-key", SECRET), ("X-Client-Secret", SECRET), ("X-Session-Id", SECRET),
     ("Cookie", SECRET), ("X-Amz-Signature", SECRET), ("X-Password", SECRET),
     ("X-Whatever", f"Bearer {SECRET}"), ("X-Whatever", f"basic {SECRET}"),
     ("X-Whatever", f"Key {SECRET}"), ("X-Whatever", f"Token {SECRET}")],
)  # fmt: skip
def test_credentials_in_fixed_headers_are_refused_without_printing_them(name, value, tmp_path):
    (tmp_path / "v.json").write_text(json.dumps({"labels": "a", "headers": {name: value}}))
    with pytest.raises(UsageError, match="put no credentials in 'headers'") as info:
        VendorConfig.load(tmp_path / "v.json")
    assert SECRET not in str(info.value) and "--api-key-env" in str(info.value)


def test_valid_vendor_configs_still_load(tmp_path):
    for path in sorted((ROOT / "examples" / "vendors").glob("*.json")):
        assert VendorConfig.load(path).labels
    config = {"labels": "a[*].b", "headers": {"X-Version": "2", "Accept": "application/json"},
              "auth": "header:Ocp-Apim-Subscription-Key", "ok": [0, "OK", 1.5], "retry": [429],
              "status": "s", "max_image_bytes": 100_000_000, "content_type": "image/png"}  # fmt: skip
    (tmp_path / "v.json").write_text(json.dumps(config))
    assert VendorConfig.load(tmp_path / "v.json").headers == config["headers"]


# -- front-end runs --------------------------------------------------------------------------

GOOD = {"kind": "prompt", "channels": 1, "height": 28, "width": 28, "sigma": 0.25}


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"kind": "resnet"}, "'kind' must be one of"),
        ({"channels": "one"}, "'channels' must be an integer"),
        ({"channels": True}, "'channels' must be an integer"),
        ({"channels": 5}, "outside 1..4"),
        ({"height": 60000, "width": 60000}, "outside 1..8192"),
        ({"height": 8192, "width": 8192}, "over 16,777,216 pixels"),
        ({"height": 28.0}, "'height' must be an integer"),
        ({"sigma": "x"}, "'sigma' must be a finite number > 0"),
        ({"sigma": 0}, "'sigma' must be a finite number > 0"),
        ({"sigma": 1e308 * 10}, "'sigma' must be a finite number"),
        ({"prompt_width": 29}, "outside 0..28"),
        ({"lora_rank": 5000}, "outside 0..1024"),
        ({"blackbox": 3}, "'blackbox' must be a string or null"),
        ({"queries": -1}, "'queries' is -1"),
        ({"epochs_done": 1.5}, "'epochs_done' must be an integer"),
        ({"validation": {}}, "'validation' must be a list"),
        ({"extra": []}, "'extra' must be an object"),
        ({"sigma": None}, "'sigma' must be a finite number"),
    ],
)
def test_front_end_config_types_and_ranges_are_checked_first(change, says):
    data = {**GOOD, **change}
    start = time.perf_counter()
    with pytest.raises(UsageError, match=says):
        check_config(data, "frontend.json")
    assert time.perf_counter() - start < 0.5  # nothing was allocated


def test_front_end_config_that_is_not_an_object_or_lacks_keys(tmp_path):
    run = _prompt_run(tmp_path)
    for text, says in (("[1]", "must hold a JSON object"), ('{"kind": "prompt"}', "lacks"),
                       ("[" * 100_000, "nests deeper"), ("{", "not valid JSON")):  # fmt: skip
        (run / "frontend.json").write_text(text)
        with pytest.raises(UsageError, match=says):
            read_config(run)


def test_weights_header_is_checked_before_tensors_are_read(tmp_path, monkeypatch):
    run = _prompt_run(tmp_path)
    module, config, _ = from_pretrained(run)  # the valid run loads
    assert tuple(module.delta.shape) == (1, 28, 28)
    _huge_header_weights(run)

    def never(*args, **kwargs):
        raise AssertionError("load_file was called on weights that do not match")

    monkeypatch.setattr("blackbox_smooth.frontends.base.load_file", never)
    with pytest.raises(UsageError, match="does not match its frontend.json"):
        from_pretrained(run)
    (run / "frontend.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(UsageError, match="is not a valid safetensors file"):
        from_pretrained(run)


def test_damaged_training_targets_are_refused(tmp_path):
    run = tmp_path / "run"
    c = FrontEndConfig("prompt", 1, 28, 28, 0.25)
    save_pretrained(build(c), c, run, targets=torch.tensor([1, 10_000_000_000]))
    with pytest.raises(UsageError, match="targets are not class indices"):
        from_pretrained(run)


# -- LoRA runs ------------------------------------------------------------------------------


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Linear(3, 2))


def _lora_run(folder: Path) -> Path:
    model = _small_model()
    meta = LoraRun(sigma=0.25, channels=1, height=2, width=2, base_model=module_digest(model),
                   rank=2, targets=["1"], objective="classification")  # fmt: skip
    save_run(wrap(model, 2, ["1"]), meta, folder / "run")
    return folder / "run"


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"sigma": "x"}, "'sigma' must be a finite number"),
        ({"channels": 0}, "outside 1..4"),
        ({"height": 100_000}, "outside 1..8192"),
        ({"rank": 10**9}, "outside 0..1024"),
        ({"targets": "1"}, "'targets' must be a list"),
        ({"targets": [1]}, "'targets' must be a list"),
        ({"base_model": "abc"}, "'base_model' must be a sha256"),
        ({"epochs_done": -1}, "'epochs_done' is -1"),
        ({"bogus": 1}, "unknown keys 'bogus'"),
    ],
)
def test_lora_run_config_is_checked_before_use(change, says, tmp_path):
    run = _lora_run(tmp_path)
    assert read_run(run).rank == 2
    data = {**json.loads((run / "lora_run.json").read_text()), **change}
    (run / "lora_run.json").write_text(json.dumps(data))
    with pytest.raises(UsageError, match=says):
        read_run(run)


def test_lora_adapter_config_is_checked_and_peft_failures_are_one_line(tmp_path):
    run = _lora_run(tmp_path)
    adapted, _ = load_adapter(_small_model(), run)  # the valid run loads
    assert adapted(torch.zeros(1, 1, 2, 2)).shape == (1, 2)
    original = json.loads((run / "adapter_config.json").read_text())
    for change, says in (({"r": 10**9}, "outside 1..1024"), ({"r": "8"}, "'r' must be an integer"),
                         ({"target_modules": 3}, "'target_modules' must be a list"),
                         ({"peft_type": "PROMPT_TUNING"}, "not a LoRA adapter"),
                         ({"target_modules": ["nowhere"]}, "could not be loaded")):  # fmt: skip
        (run / "adapter_config.json").write_text(json.dumps({**original, **change}))
        with pytest.raises(UsageError, match=says) as info:
            load_adapter(_small_model(), run)
        assert "\n" not in str(info.value)
    (run / "adapter_config.json").write_text("[" * 100_000)
    with pytest.raises(UsageError, match="nests deeper"):
        load_adapter(_small_model(), run)


# -- the disk cache ---------------------------------------------------------------------------


def test_a_damaged_cache_is_one_line_and_left_as_it_is(tmp_path):
    (tmp_path / "cache").mkdir()
    damaged = np.random.default_rng(0).bytes(8192)
    (tmp_path / "cache" / "cache.db").write_bytes(damaged)
    with pytest.raises(UsageError, match="is damaged .*move .*cache.db aside"):
        BlockCache(tmp_path / "cache")
    assert (tmp_path / "cache" / "cache.db").read_bytes() == damaged
    # damaged past the header: opens, then the first read is one line too
    cache = _cache_with_an_entry(tmp_path / "second")
    db = cache / "cache.db"
    data = bytearray(db.read_bytes())
    data[100:] = np.random.default_rng(1).bytes(len(data) - 100)
    db.write_bytes(bytes(data))
    for shm in cache.glob("cache.db-*"):
        shm.unlink()
    with pytest.raises(UsageError, match="the cache .* is damaged"):
        store = BlockCache(cache)
        store.get("k")
        store.put_many([("j", Answer(np.array([1])))])


@pytest.mark.timeout(30)
def test_a_cache_path_that_is_a_file_or_a_fifo_database(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file, not a folder: give another --cache"):
        BlockCache(tmp_path / "file")
    (tmp_path / "cache").mkdir()
    os.mkfifo(tmp_path / "cache" / "cache.db")
    with pytest.raises(UsageError, match="is not a regular file: move it aside"):
        BlockCache(tmp_path / "cache")


def test_a_read_only_cache_is_one_line(tmp_path):
    if not _can_chattr(tmp_path):
        pytest.skip("chattr +i is not available (the mock test below covers the wrapping)")
    cache = _cache_with_an_entry(tmp_path)
    for target in (cache, cache / "cache.db"):
        _immutable(target, True)
        try:
            with pytest.raises(UsageError, match="cannot use the cache .*make it writable"):
                BlockCache(cache)
        finally:
            _immutable(target, False)


def test_sqlite_errors_while_reading_or_writing_are_one_line(tmp_path, monkeypatch):
    """A cache that becomes unusable during a run (made read-only, a full disk, damaged by
    another program): a fault the system cannot easily be made to produce mid-run, so it is
    injected in place of the SQLite connection."""
    store = BlockCache(tmp_path / "cache")
    store.put_many([("k", Answer(np.array([1])))])

    class Failing:
        def __init__(self, error):
            self.error = error

        def execute(self, *args, **kwargs):
            raise self.error

        executemany = execute

    real = store._file._db
    store._file._db = Failing(sqlite3.OperationalError("attempt to write a readonly database"))
    with pytest.raises(UsageError, match="readonly database.*make it writable"):
        store.put_many([("j", Answer(np.array([2])))])
    store._file._db = Failing(sqlite3.DatabaseError("database disk image is malformed"))
    with pytest.raises(UsageError, match="malformed.*is damaged|is damaged.*malformed"):
        store.get("k")
    store._file._db = real
    assert store.get("k").labels.tolist() == [1]  # the entry written before the faults
    # a real read-only SQLite database raises the error that is wrapped above
    ro = sqlite3.connect(f"file:{tmp_path / 'cache' / 'cache.db'}?mode=ro", uri=True)
    with pytest.raises(sqlite3.OperationalError, match="readonly database"):
        ro.execute("DELETE FROM bbsmooth_entries")
    ro.close()
