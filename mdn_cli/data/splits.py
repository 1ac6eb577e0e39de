"""Which images train, which pick the epoch, which calibrate and which measure: the split.

Four disjoint splits:
    train        fits the weights
    val          picks the best epoch, stops early, fits the std scale (shapes the model)
    calibration  fits the interval levels and the unfamiliar-image threshold, and nothing else
    test         measures, and nothing else

Each image's split depends only on its own path and `data.split_seed`, never on the other rows or
their order: adding, removing or reordering rows never moves another image to another split.
With a split column, the file decides; a file whose column names no calibration images gives
half of its val images (by the same kind of path hash) to calibration.
The run records its split in splits.csv; a resumed run reads it back instead of splitting again.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from ..files import atomic_writer
from .labels import SPLITS, Example, read_labels

SPLITS_FILE = "splits.csv"


def unit_hash(key: str) -> float:
    """A uniform number in [0, 1) from a string, the same on every machine and Python version."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def _image_key(example: Example, root: Path) -> str:
    """The image's path relative to the data root, in one spelling (`./a.png` and `b/../a.png` agree)."""
    try:
        return example.path.relative_to(root.resolve()).as_posix()
    except ValueError:
        return example.path.as_posix()


@dataclass(frozen=True)
class SplitPlan:
    splits: list[str]
    """The split of each example, in labels-file order."""
    note: str | None = None
    """What the caller should tell the user about how the split was made (None: nothing to say)."""


def assign_splits(
    examples: list[Example],
    root: Path,
    val_fraction: float,
    calibration_fraction: float,
    test_fraction: float,
    seed: int,
) -> SplitPlan:
    """The split of each example: the file's split column when it has one, else a stable hash split."""
    if examples and examples[0].split is not None:
        splits = [e.split for e in examples]
        if "calibration" in splits or "val" not in splits:
            return SplitPlan(splits)  # type: ignore[arg-type]
        # A train/val/test file: half of val calibrates, chosen by path so it never moves.
        moved = 0
        for i, e in enumerate(examples):
            if splits[i] == "val" and unit_hash(f"calibration-from-val:{seed}:{_image_key(e, root)}") < 0.5:
                splits[i] = "calibration"
                moved += 1
        note = (
            f"the split column names no calibration images: {moved} of the {moved + splits.count('val')} val images "
            "(chosen by a hash of their path) calibrate the intervals instead; add 'calibration' rows to choose them yourself"
        )
        return SplitPlan(splits, note)  # type: ignore[arg-type]
    edges = (
        ("val", val_fraction),
        ("calibration", val_fraction + calibration_fraction),
        ("test", val_fraction + calibration_fraction + test_fraction),
    )
    splits = []
    for e in examples:
        u = unit_hash(f"split:{seed}:{_image_key(e, root)}")
        splits.append(next((name for name, edge in edges if u < edge), "train"))
    return SplitPlan(splits)


def check_split_sizes(splits: list[str], batch_size: int, where: Path) -> None:
    counts = {s: splits.count(s) for s in SPLITS}
    if counts["train"] == 0 or counts["val"] == 0:
        raise DataError(
            f"{where}: {counts['train']} train and {counts['val']} val images; training needs both. "
            "Add images, fix the split column, or raise data.val_fraction"
        )
    if counts["train"] < batch_size:
        raise DataError(
            f"{where}: the train split has {counts['train']} images, fewer than train.batch_size={batch_size}; "
            "lower train.batch_size or add images"
        )


def split_counts(splits: list[str]) -> str:
    """'1400 train / 300 val / 200 calibration / 300 test'."""
    return " / ".join(f"{splits.count(s)} {s}" for s in SPLITS)


def write_splits(path: Path, examples: list[Example], splits: list[str], target_column: str, group_column: str | None = None) -> None:
    """splits.csv in the run folder: the exact images, targets (under the labels file's own column
    name), splits and, with data.group_column, groups of the run."""
    with atomic_writer(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", target_column, "split", *([group_column] if group_column else [])])
        for example, split in zip(examples, splits):
            writer.writerow([example.image, repr(example.target), split, *([example.group or ""] if group_column else [])])


def read_splits(path: Path, root: Path, data: dict) -> list[Example]:
    """The examples a run recorded in its splits.csv (images under `root`); `data`: the run's
    config data section (the target column and transform, the group column)."""
    return read_labels(path, root, "image", data["target_column"], "split", data["target_transform"],
                       data.get("group_column")).examples


def describe_changes(recorded: list[Example], current: list[Example]) -> str | None:
    """What changed in the labels file since the run recorded its split (None: nothing)."""
    before = {e.path: e.target for e in recorded}
    after = {e.path: e.target for e in current}
    added = len(after.keys() - before.keys())
    removed = len(before.keys() - after.keys())
    relabelled = sum(1 for p in before.keys() & after.keys() if before[p] != after[p])
    parts = [f"{n} {what}" for n, what in ((added, "images added"), (removed, "removed"), (relabelled, "relabelled")) if n]
    return ", ".join(parts) if parts else None
