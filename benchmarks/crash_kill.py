"""Reliability at length: what tests/test_faults.py and tests/test_crash.py check a few times,
repeated many times with other seeds.

Faults: certify, evaluate and train against a loopback server that injects every fault kind at
random (25% of requests: 429 with and without Retry-After, 500/502/503, dropped and reset
connections, stalls past the timeout, truncated and malformed bodies, wrong result counts), each
compared with a fault-free run. Kills: each command killed with SIGKILL at random moments, then
run again to the end, compared with an uninterrupted run; requests answered twice (only those in
flight at a kill may be) and damaged cache entries counted.

Run: `make bench-crash` (or, from the repository root,
.venv/bin/python -m benchmarks.crash_kill [--kills K] [--seeds S]).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from blackbox_smooth.adapters import TorchModel
from blackbox_smooth.data import save_image
from blackbox_smooth.demo import DEMO_DIR
from blackbox_smooth.digits import digits_split, train_digits_model
from tests.faults import random_faults
from tests.harness import (
    certify_case,
    crash_and_compare,
    evaluate_case,
    faults_and_compare,
    train_case,
    write_digits_folder,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=10, help="kills per command")
    parser.add_argument("--seeds", type=int, default=3, help="fault seeds per command")
    args = parser.parse_args()
    model = TorchModel.from_torchscript(str(train_digits_model(DEMO_DIR)), torch.device("cpu"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = write_digits_folder(root / "data", 60)
        image = root / "digit.png"
        save_image(digits_split()[2][7], image)
        cases = [certify_case(image), evaluate_case(folder), train_case(folder)]
        jobs = [("faults", c, s) for c in cases for s in range(args.seeds)]
        jobs += [("kills", c, 100 + i) for i, c in enumerate(cases)]
        for kind, case, seed in tqdm(jobs, desc="reliability", leave=False):
            work = root / f"{kind}-{case.name}-{seed}"
            if kind == "faults":
                f = faults_and_compare(model, case, work, random_faults(0.25, seed))
                events, same, resent, damaged = f.injected, f.same, 0, 0
            else:
                c = crash_and_compare(model, case, work, args.kills, seed)
                events, same, resent, damaged = c.kills, c.same, c.resent, c.damaged
            rows.append({"test": kind, "command": case.name, "seed": seed, "events": events,
                         "same": same, "resent": resent, "damaged": damaged})  # fmt: skip
    table: dict[tuple[str, str], dict] = {}
    for r in rows:
        t = table.setdefault((r["test"], r["command"]), {"runs": 0, "events": 0, "same": 0,
                                                         "resent": 0, "damaged": 0})  # fmt: skip
        t["runs"] += 1
        for k in ("events", "resent", "damaged"):
            t[k] += r[k]
        t["same"] += int(r["same"])
    print(f"{'test':<7} {'command':<9} {'runs':>4} {'injected/kills':>14} {'same result':>11} "
          f"{'resent':>6} {'damaged':>7}")  # fmt: skip
    for (test, command), t in table.items():
        same = f"{t['same']}/{t['runs']}"
        print(f"{test:<7} {command:<9} {t['runs']:>4} {t['events']:>14} {same:>11} "
              f"{t['resent']:>6} {t['damaged']:>7}")  # fmt: skip
    result = {
        "faults_survived": sum(r["events"] for r in rows if r["test"] == "faults" and r["same"]),
        "kills_survived": sum(r["events"] for r in rows if r["test"] == "kills" and r["same"]),
        "runs_differing": sum(not r["same"] for r in rows),
        "requests_resent": sum(r["resent"] for r in rows),
        "damaged_entries": sum(r["damaged"] for r in rows),
    }
    out = Path(__file__).resolve().parent / "results" / "crash_kill.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, **result}, indent=2) + "\n")
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
