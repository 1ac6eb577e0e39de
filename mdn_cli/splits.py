"""Train/val/test assignment of the labelled images, and the run's record of it (splits.csv)."""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

from .errors import DataError
from .labels import SPLITS, Example


def assign_splits(examples: list[Example], val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """The split of each example: the file's own split column, else a seeded random split."""
    if examples and examples[0].split is not None:
        return [e.split for e in examples]  # type: ignore[misc]
    n = len(examples)
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    order = list(range(n))
    random.Random(seed).shuffle(order)
    splits = ["train"] * n
    for rank, i in enumerate(order):
        if rank < n_val:
            splits[i] = "val"
        elif rank < n_val + n_test:
            splits[i] = "test"
    return splits


def check_split_sizes(splits: list[str], batch_size: int, labels_path: Path) -> None:
    counts = {s: splits.count(s) for s in SPLITS}
    if counts["train"] == 0 or counts["val"] == 0:
        raise DataError(
            f"{labels_path}: {counts['train']} train and {counts['val']} val images; training needs both. "
            "Add images, fix the split column, or change data.val_fraction / data.test_fraction"
        )
    if counts["train"] < batch_size:
        raise DataError(
            f"{labels_path}: the train split has {counts['train']} images, fewer than train.batch_size={batch_size}; "
            "lower train.batch_size or add images"
        )


def write_splits(path: Path, examples: list[Example], splits: list[str]) -> None:
    """splits.csv in the run folder: the exact split used, so evaluation scores the same test set."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "target", "split"])
        for example, split in zip(examples, splits):
            writer.writerow([example.image, repr(example.target), split])
    os.replace(tmp, path)

