"""How long a user waits for `bbsmooth --help` and for a one-line usage error, against the bare
interpreter and against importing torch, measured in one run: the CLI must stay light (torch,
peft and numpy load only where they are used; tests/test_cli.py checks that without a clock).
Target: help_vs_torch_import ≤ 0.1.

Run: `make bench-startup` (or .venv/bin/python benchmarks/cli_startup.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def best_of(repeats: int, command: list[str]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, check=False)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    py = sys.executable
    rows = {
        "python -c pass (baseline)": best_of(7, [py, "-c", "pass"]),
        "bbsmooth --help": best_of(7, [py, "-m", "blackbox_smooth", "--help"]),
        "bbsmooth certify (usage error)": best_of(7, [py, "-m", "blackbox_smooth", "certify"]),
        "python -c 'import torch' (for scale)": best_of(3, [py, "-c", "import torch"]),
    }
    width = max(map(len, rows))
    for name, seconds in rows.items():
        print(f"{name:<{width}}  {seconds * 1000:8.0f} ms")
    base = rows["python -c pass (baseline)"]
    result = {
        "help_vs_torch_import": rows["bbsmooth --help"]
        / rows["python -c 'import torch' (for scale)"],
        "help_over_python": rows["bbsmooth --help"] / base,
        "usage_error_over_python": rows["bbsmooth certify (usage error)"] / base,
        "help_ms": rows["bbsmooth --help"] * 1000,
    }
    print("RESULT " + " ".join(f"{k}={v:.2f}" for k, v in result.items()))
    Path("benchmarks/results").mkdir(exist_ok=True)
    Path("benchmarks/results/cli_startup.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
