#!/usr/bin/env python
"""Train a config on a real labelled photo set and report its test-split quality as a markdown row.

    python scripts/benchmark_real.py configs/utkface.yaml [--set key=value ...]

Trains on the data set's train/val splits (with `mdn train`'s own code), scores best.pt on the
test split (with `mdn evaluate`'s code) and prints one markdown table row, with the config, the
git commit and the training wall time, for the README's "Results on real photos" section. The
full metrics go to <run folder>/benchmark.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

from mdn_cli.config import load_config
from mdn_cli.errors import MdnError
from mdn_cli.metrics import binomial_se
from mdn_cli.train import train

HEADER = (
    "| config | commit | epochs | train wall | MAE mean | MAE median | NLL | CRPS | 68% cov ± s.e. (width) | 95% cov ± s.e. (width) "
    "| cal. error | flagged |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
        return out.stdout.strip() + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def row(label: str, commit: str, epochs: int, minutes: float, m: dict) -> str:
    """One markdown row; coverages with their binomial standard error over the n test images."""
    n = m["n"]
    cov = " | ".join(f"{m[f'coverage_{k}']:.3f} ± {binomial_se(m[f'coverage_{k}'], n):.3f} ({m[f'width_{k}']:.1f})" for k in ("68", "95"))
    flagged = f"{m['unfamiliar']['flagged_fraction']:.1%}" if "unfamiliar" in m else "-"
    return (
        f"| {label} | {commit} | {epochs} | {minutes:.1f} min | {m['mae_mean']:.2f} | {m['mae_median']:.2f} | "
        f"{m['nll']:.3f} | {m['crps']:.2f} | {cov} | {m['calibration_error']:.3f} | {flagged} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--resume", action="store_true", help="Continue an interrupted run of the same config instead of starting over.")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        started = time.perf_counter()
        run_dir = train(cfg, resume=args.resume, overwrite=not args.resume)
        minutes = (time.perf_counter() - started) / 60
    except MdnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    with open(run_dir / "metrics.csv", newline="") as f:
        history = list(csv.DictReader(f))
    if args.resume:  # the wall time of the epochs themselves, summed over the interrupted and resumed parts
        minutes = sum(float(r["seconds"]) for r in history) / 60
    commit = git_commit()
    label = f"`{args.config}`" + "".join(f" `{o}`" for o in args.overrides)
    lines = [HEADER, row(label, commit, len(history), minutes, metrics)]
    if "uncalibrated" in metrics:
        lines.append(row(label + " before calibration", commit, len(history), minutes, metrics["uncalibrated"]))
    report = "\n".join(lines)
    (run_dir / "benchmark.json").write_text(
        json.dumps({"config": str(args.config), "overrides": args.overrides, "commit": commit,
                    "train_wall_minutes": minutes, "epochs": len(history), "metrics": metrics}, indent=2) + "\n"
    )
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
