#!/usr/bin/env python
"""How much a run's test figures owe to test photos that have a copy in its train split.

    mdn check-data LABELS.csv --output runs/check      # writes duplicates.csv
    python scripts/leak_effect.py runs/NAME/best.pt runs/check/duplicates.csv [--kind exact|near|both]

Scores the run's test split twice with the same checkpoint (mdn evaluate's code): all of it, and
without the test photos that have a copy (exact, near, or both kinds) in the train split; prints
NLL, CRPS, MAE and the coverage of the 68% and 95% intervals of each, and the difference.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from mdn_cli.data import open_source
from mdn_cli.data.splits import SPLITS_FILE
from mdn_cli.evaluate import score_examples
from mdn_cli.inference import Predictor
from mdn_cli.runtime import select_runtime

KEYS = ("n", "nll", "crps", "mae_median", "coverage_68", "coverage_95")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("duplicates", type=Path, help="duplicates.csv written by mdn check-data")
    parser.add_argument("--kind", choices=("exact", "near", "both"), default="both")
    args = parser.parse_args(argv)
    runtime = select_runtime("auto")
    predictor, ckpt = Predictor.from_checkpoint(args.checkpoint, runtime)
    source = open_source(ckpt["config"]["data"])
    examples = source.recorded(args.checkpoint.parent / SPLITS_FILE)
    split = {e.image: e.split for e in examples}
    leaked = set()
    for row in csv.DictReader(open(args.duplicates, newline="", encoding="utf-8")):
        if args.kind != "both" and row["kind"] != args.kind:
            continue
        a, b = row["image_a"], row["image_b"]  # the run's own splits, which are what matter here
        for one, other in ((a, b), (b, a)):
            if split.get(one) == "test" and split.get(other) == "train":
                leaked.add(one)
    test = [e for e in examples if e.split == "test"]
    kept = [e for e in test if e.image not in leaked]
    rows = {}
    for name, chosen in (("all test photos", test), (f"without the {len(test) - len(kept)} with a copy in train", kept)):
        rows[name] = score_examples(predictor, chosen, source, runtime, on_skip=lambda m: None).metrics
    print("| test split | " + " | ".join(KEYS) + " |")
    print("|---|" + "---|" * len(KEYS))
    for name, m in rows.items():
        print(f"| {name} | " + " | ".join(f"{m[k]:.4f}" if k != "n" else str(m[k]) for k in KEYS) + " |")
    a, b = rows.values()
    print("| difference | " + " | ".join(f"{b[k] - a[k]:+.4f}" if k != "n" else str(b[k] - a[k]) for k in KEYS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
