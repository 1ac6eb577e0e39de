#!/usr/bin/env python
"""How often a checkpoint's unfamiliar-image warning fires: on random noise, on solid colours, on
photos from another domain, and on its own test split.

    python scripts/benchmark_ood.py CHECKPOINT [--other FOLDER_OR_LABELS_CSV ...] [--n 200]

Generates n random-noise images (uniform pixels, sizes 48-320 px) and n solid-colour squares in a
temporary folder, predicts them and every image of each --other folder (or the images of a labels
CSV) with `mdn predict`'s code, and prints one markdown row per set: images, flagged share and the
smallest and median ood_score. The checkpoint's own test split comes from its eval/metrics.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from mdn_cli.data.folder import unlabelled
from mdn_cli.images import is_image_file
from mdn_cli.predict import predict_images


def hostile_sets(folder: Path, n: int, seed: int = 0) -> dict[str, list[Path]]:
    rng = np.random.default_rng(seed)
    out: dict[str, list[Path]] = {"random noise": [], "solid colour": []}
    for i in range(n):
        w, h = (int(v) for v in rng.integers(48, 321, 2))
        out["random noise"].append(folder / f"noise_{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(out["random noise"][-1])
        out["solid colour"].append(folder / f"solid_{i}.png")
        Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 256, 3))).save(out["solid colour"][-1])
    return out


def images_of(source: Path, limit: int | None) -> list[Path]:
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if is_image_file(p))
    else:
        with open(source, newline="", encoding="utf-8") as f:
            paths = [source.parent / row["image"] for row in csv.DictReader(f) if row.get("split", "test") == "test"]
    return paths[:limit] if limit else paths


def row(name: str, records: list[dict]) -> str:
    scores = [r["ood_score"] for r in records]
    flagged = sum(not r["in_distribution"] for r in records)
    return (f"| {name} | {len(records)} | {flagged / len(records):.1%} ({flagged}) | {min(scores):.2f} | "
            f"{statistics.median(scores):.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--other", type=Path, action="append", default=[], help="a folder of images, or a labels CSV (its test rows)")
    parser.add_argument("--n", type=int, default=200, help="random-noise and solid-colour images each")
    parser.add_argument("--limit", type=int, default=None, help="at most this many images of each --other set")
    args = parser.parse_args(argv)
    lines = ["| images | n | flagged | smallest ood_score | median ood_score |", "|---|---|---|---|---|"]
    own = args.checkpoint.parent / "eval" / "metrics.json"
    if own.is_file():
        u = json.loads(own.read_text())["unfamiliar"]
        lines.append(f"| its own test split | {json.loads(own.read_text())['n']} | {u['flagged_fraction']:.1%} ({u['flagged_images']}) | | |")
    with tempfile.TemporaryDirectory() as tmp:
        sets = hostile_sets(Path(tmp), args.n)
        sets.update({str(source): images_of(source, args.limit) for source in args.other})
        for name, paths in sets.items():
            predictions, _ = predict_images(*unlabelled(paths), args.checkpoint, on_skip=lambda m: None, progress=False)
            if not predictions or "ood_score" not in predictions[0].summary:
                print(f"error: {args.checkpoint} has no unfamiliar-image warning", file=sys.stderr)
                return 2
            lines.append(row(name, [p.summary for p in predictions]))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
