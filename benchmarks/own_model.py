"""A user's own model at its own size: an ONNX classifier at 3×320×320 that expects ImageNet
normalisation (tests/pagemodel.py: the digits CNN behind a full-size layer, digits scaled up),
run as a user runs it, each command in a process of its own with its output read from a pipe.

Per command: peak RSS (wait4), the longest silence between two output lines, wall time; at
the default --max-memory (1G) and, as the baseline in the same run for certify and evaluate,
at --max-memory 4G (local forward passes of 1 GiB: about the 54-image passes of before the
budget, when 1,024 images at 16 bytes a value were capped at 256 MiB). Goal: peak ≤ 1.5 GB
for certify, evaluate and train at the default; no silence over 10 s. One table, then `RESULT …`.

Run: `make bench-ownmodel` (or .venv/bin/python -m benchmarks.own_model [--size 320]).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tests.harness import Heard, listen
from tests.pagemodel import make_page_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320, help="image side")
    parser.add_argument("--train-images", type=int, default=100)
    parser.add_argument("--max-queries", type=int, default=1_000, help="train's budget")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print(f"exporting the {args.size}×{args.size} model and its images …", flush=True)
        make_page_model(folder, args.size, train=args.train_images, test=8)
        box = ["-e", f"onnx:{folder / 'model.onnx'}", "--preset", "imagenet", "--sigma", "0.25"]
        image = next((folder / "test").rglob("*.png"))
        commands = {
            "certify (n=2,000)": ["certify", image, *box, "--n", "2000", "--no-cache"],
            "evaluate (8 images, n=500)": ["evaluate", "--data", folder / "test", *box,
                                           "--n", "500", "--no-cache", "--out", folder / "ev"],
            "train (distill)": ["train", "--data", folder / "train", "--out", folder / "run",
                                *box, "--pretrain-epochs", "2", "--epochs", "2",
                                "--max-queries", str(args.max_queries), "--no-cache", "--force"],
            "evaluate with the front end": ["evaluate", "--data", folder / "test", *box,
                                            "--frontend", folder / "run", "--n", "500",
                                            "--no-cache", "--out", folder / "ev-frontend"],
        }  # fmt: skip
        rows: list[tuple[str, str, Heard]] = []
        for budget in ("1G", "4G"):  # the baseline: certify and evaluate only (train is long)
            for name, command in commands.items():
                if budget == "4G" and name not in (
                    "certify (n=2,000)",
                    "evaluate (8 images, n=500)",
                ):
                    continue
                print(f"{name}, --max-memory {budget} …", flush=True)
                heard = listen([*command, "--max-memory", budget])
                if heard.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{heard.output[-3000:]}")
                rows.append((name, budget, heard))
    head = ("command", "--max-memory", "peak RSS", "longest silence", "wall", "after")
    table = [head] + [
        (name, budget, f"{h.peak_rss_mib:,.0f} MiB", f"{h.longest_silence:.1f} s",
         f"{h.seconds:.0f} s", h.after[:60])
        for name, budget, h in rows
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    print(f"\n{args.size}×{args.size} ONNX model, ImageNet preset")
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    default = [h for _, budget, h in rows if budget == "1G"]
    keys = ("certify", "evaluate", "train", "evaluate_frontend")
    peaks = " ".join(
        f"peak_rss_{k}_mib={h.peak_rss_mib:.0f}" for k, h in zip(keys, default, strict=True)
    )
    print(
        f"RESULT size={args.size} {peaks} "
        f"max_peak_rss_mib={max(h.peak_rss_mib for h in default):.0f} "
        f"max_peak_rss_4g_mib={max(h.peak_rss_mib for _, b, h in rows if b == '4G'):.0f} "
        f"max_silence_seconds={max(h.longest_silence for _, _, h in rows):.1f}"
    )


if __name__ == "__main__":
    main()
