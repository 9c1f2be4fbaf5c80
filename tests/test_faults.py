"""Faults on the wire, end to end through the CLI: a real loopback server injects every fault
kind (on a schedule, and at random with a seed); certify, evaluate and train finish with results
identical to a fault-free run, or stop with one clear line when the faults persist, having kept
every answered block. The caches a faulty run leaves behind replay exactly (nothing poisoned)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blackbox_smooth.data import save_image
from blackbox_smooth.evaluate import read_tsv

from .conftest import run_cli
from .faults import FAULTS, FaultyServer, random_faults
from .harness import FAULT_TOLERANT

WIRE = [*FAULT_TOLERANT, "--batch", "50", "--concurrency", "8"]
# For counting what the server answered against what the client kept: no timeout so short that
# a loaded machine could make one (an answer the server counts and the client drops).
PATIENT = ["--retries", "3", "--batch", "50", "--concurrency", "8"]


def serve(digits_torch, faults=None, port: int = 0) -> FaultyServer:
    return FaultyServer(digits_torch, name="digits", faults=faults, stall=1.5, port=port)


def certify_json(url: str, image: Path, cache: Path) -> dict:
    r = run_cli("certify", image, "-e", url, "--sigma", "0.25", "--n0", "50", "--n", "1000",
                "--json", "--cache", cache, *WIRE)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_every_fault_kind_costs_a_retry_never_a_vote(digits_torch, digit_images, tmp_path):
    schedule = {2 * i + 1: kind for i, kind in enumerate(FAULTS)}  # every kind, once
    with serve(digits_torch) as clean:
        expected = certify_json(clean.url, digit_images[1], tmp_path / "c1")
    with serve(digits_torch, schedule.get) as faulty:
        got = certify_json(faulty.url, digit_images[1], tmp_path / "c2")
        assert faulty.faults_injected == len(FAULTS)
        port = faulty.port
    for key in ("label", "radius", "p_lower", "counts", "n"):
        assert got[key] == expected[key], key
    assert got["queries_sent"] == expected["queries_sent"] == 1050  # retries are not votes
    with serve(
        digits_torch, port=port
    ) as healthy:  # the faulty run's cache replays: nothing damaged was stored
        replay = certify_json(healthy.url, digit_images[1], tmp_path / "c2")
        assert healthy.requests == 1  # the canary: 8 cached samples asked again, in one request
    assert replay["counts"] == expected["counts"] and replay["queries_cached"] == 1050
    assert replay["queries_sent"] == 8


def _evaluate(url: str, digits_60: Path, out: Path, cache: Path):
    return run_cli("evaluate", "--data", digits_60, "-e", url, "--sigma", "0.25", "--n0", "50",
                   "--n", "500", "--every", "10", "--out", out, "--cache", cache, *WIRE)  # fmt: skip


def _rows(out: Path) -> list[tuple]:
    return [(r.idx, r.label, r.predict, r.radius, r.correct, r.queries) for r in read_tsv(out)]


def clean_then_faulty(digits_torch, command, faults, tmp_path) -> int:
    """Run `command(url, out, cache)` against a healthy server, then against a faulty one,
    each with its own output and cache; returns the faults injected."""
    for name, plan in (("clean", None), ("faulty", faults)):
        with serve(digits_torch, plan) as server:
            r = command(server.url, tmp_path / name, tmp_path / f"cache-{name}")
            assert r.returncode == 0, r.stderr
    return server.faults_injected


@pytest.mark.slow  # evaluate and train, each run twice or more, in process
def test_evaluate_under_random_faults_matches_a_fault_free_run(digits_torch, digits_60, tmp_path):
    evaluate = lambda url, out, cache: _evaluate(url, digits_60, out, cache)  # noqa: E731
    assert clean_then_faulty(digits_torch, evaluate, random_faults(0.2, seed=11), tmp_path) >= 5
    assert _rows(tmp_path / "faulty" / "certify.tsv") == _rows(tmp_path / "clean" / "certify.tsv")
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("clean", "faulty"))
    assert (
        a["certified_accuracy"] == b["certified_accuracy"]
        and a["queries_used"] == b["queries_used"]
    )


def _train(url: str, digits_60: Path, out: Path, cache: Path, wire: list = WIRE):
    return run_cli("train", "-e", url, "--data", digits_60, "--sigma", "0.5", "--out", out,
                   "--epochs", "2", "--max-queries", "1500", "--pretrain-epochs", "1",
                   "--cache", cache, "--resume", *wire)  # fmt: skip


def _checkpoint(run: Path) -> tuple[bytes, list]:
    config = json.loads((run / "frontend.json").read_text())
    curve = [{k: v for k, v in e.items() if k != "seconds"} for e in config["validation"]]
    return (run / "frontend.safetensors").read_bytes(), curve


def test_persistent_faults_stop_with_one_line_and_keep_every_answered_block(
    digits_torch, digits_60, tmp_path
):
    out, cache = tmp_path / "out", tmp_path / "cache"
    with serve(digits_torch, lambda i: "503" if i >= 40 else None) as failing:
        bad = run_cli("evaluate", "--data", digits_60, "-e", failing.url, "--sigma", "0.25",
                      "--n0", "50", "--n", "500", "--every", "10", "--out", out, "--cache", cache,
                      *PATIENT)  # fmt: skip
        answered, port = failing.images, failing.port
    assert bad.returncode == 3
    assert bad.stderr.count("\n") == 1 and "HTTP 503" in bad.stderr and "gave up" in bad.stderr
    assert "Traceback" not in bad.stderr
    # a failed evaluation writes nothing (no half report, nothing beside it); the answers it got
    # are in the cache: the recovered endpoint is asked only for the rest
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    assert 0 < answered < 6 * 550
    with serve(digits_torch, port=port) as healthy:  # the same endpoint, back up
        good = _evaluate(healthy.url, digits_60, out, cache)
        assert good.returncode == 0, good.stderr
        summary = json.loads((out / "summary.json").read_text())
        assert healthy.images == summary["queries_sent"] == 6 * 550 - summary["queries_cached"]
    # Every answer the client read is cached. A batch the failing server sent while the client
    # was giving up may never be read: at most the requests in flight (8 of 50 images).
    assert 0 < summary["queries_cached"] <= answered <= summary["queries_cached"] + 8 * 50


@pytest.mark.slow  # evaluate and train, each run twice or more, in process
def test_train_under_random_then_persistent_faults_ends_as_a_fault_free_run(
    digits_torch, digits_60, tmp_path
):
    with serve(digits_torch) as clean:
        ok = _train(clean.url, digits_60, tmp_path / "clean", tmp_path / "c1", PATIENT)
        assert ok.returncode == 0, ok.stderr
        total = clean.images
    expected = _checkpoint(tmp_path / "clean")
    with serve(digits_torch, random_faults(0.2, seed=5)) as faulty:
        got = _train(faulty.url, digits_60, tmp_path / "faulty", tmp_path / "c2")
        assert got.returncode == 0, got.stderr
        assert faulty.faults_injected >= 3
    assert _checkpoint(tmp_path / "faulty") == expected
    # Then an outage: one line, exit 3; the same command once the endpoint is back resumes,
    # sends only what was not answered before, and ends with the same checkpoint.
    run, cache = tmp_path / "run", tmp_path / "c3"
    with serve(digits_torch, lambda i: "502" if i >= 20 else None) as failing:
        bad = _train(failing.url, digits_60, run, cache, PATIENT)
        answered, port = failing.images, failing.port
    *progress, error = bad.stderr.splitlines()  # progress lines (the validation plan), then
    assert bad.returncode == 3 and error.startswith("bbsmooth: error:") and "HTTP 502" in error
    assert not any(line.startswith("bbsmooth: error") for line in progress)
    with serve(digits_torch, port=port) as healthy:
        good = _train(healthy.url, digits_60, run, cache, PATIENT)
        assert good.returncode == 0, good.stderr
        assert healthy.images == total - answered  # every request answered before was kept
    assert _checkpoint(run) == expected


def test_labels_outside_the_map_vote_other_and_never_for_a_class(tmp_path):
    """A vendor that sometimes answers only words outside the label map: those images vote
    OTHER, no class gains a vote, and the radius can only shrink."""
    from .test_vendors import KEY, digit, label_map
    from .vendors import VendorServer

    image = tmp_path / "x.png"
    save_image(digit(5)[0], image)
    env = {"BBSMOOTH_API_KEY": KEY}
    args = ["--labels", label_map(tmp_path, "gcv"), "--sigma", "0.25", "--n0", "16", "--n", "160",
            "--json", "--no-cache", "--seed", "3", "--retries", "2"]  # fmt: skip
    with VendorServer("gcv", key=KEY) as clean:
        a = run_cli("certify", image, "-e", clean.url, *args, env=env)
    # GCV takes 16 images a request: request 0 is the selection block, 1…10 the estimation ones
    with VendorServer("gcv", key=KEY, faults={1: "foreign", 4: "foreign", 7: "foreign"}) as odd:
        b = run_cli("certify", image, "-e", odd.url, *args, env=env)
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    ra, rb = json.loads(a.stdout), json.loads(b.stdout)
    ca, cb = ra["counts"], rb["counts"]
    lost = {k: ca[k] - cb.get(k, 0) for k in ca if k != "-1"}
    assert all(v >= 0 for v in lost.values()) and set(cb) <= set(ca) | {"-1"}
    gained = cb.get("-1", 0) - ca.get("-1", 0)
    assert gained == sum(lost.values()) and 16 * 3 - ca.get("-1", 0) <= gained <= 16 * 3
    assert rb["label"] == ra["label"] and rb["radius"] < ra["radius"]
