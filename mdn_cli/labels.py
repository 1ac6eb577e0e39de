"""The labels file: read and validate a CSV of image paths and numeric targets.

Every problem of a file is reported at once, each with its line number (DataError).
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

SPLITS = ("train", "val", "calibration", "test")
SPLIT_ALIASES = {"valid": "val", "validation": "val", "cal": "calibration", "calib": "calibration", "calibrate": "calibration"}
MAX_REPORTED = 20


@dataclass(frozen=True)
class Labels:
    examples: list[Example]
    notes: list[str]
    """Non-fatal findings for the caller to print, one line each."""
    sha256: str
    """Hex digest of the file's bytes: the fingerprint a run stores."""


@dataclass(frozen=True)
class Example:
    image: str
    """The image path as written in the labels file (relative to the data root)."""
    path: Path
    """The resolved image path."""
    target: float
    """The label, in target units."""
    split: str | None
    """train/val/test from the split column, or None when the file has none."""
    line: int
    """1-based line of the labels file (header is line 1), for error messages."""


def read_labels(
    labels_path: Path,
    root: Path,
    image_column: str,
    target_column: str,
    split_column: str | None,
    target_transform: str = "none",
) -> Labels:
    """Read and validate the whole labels CSV; report every problem found at once (DataError)."""
    try:
        with open(labels_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = list(reader)
    except FileNotFoundError:
        raise DataError(f"{labels_path}: labels file not found; check data.root and data.labels") from None
    except UnicodeDecodeError:
        raise DataError(f"{labels_path}: not a UTF-8 text CSV file") from None
    except (OSError, csv.Error) as e:
        raise DataError(f"{labels_path}: cannot read labels file ({e})") from None
    if not header:
        raise DataError(f"{labels_path}: labels file is empty; expected a header line such as 'image,target'")
    reader.fieldnames = header
    for key, column in (("data.image_column", image_column), ("data.target_column", target_column)):
        if column not in header:
            guess = difflib.get_close_matches(column, header, n=1, cutoff=0.5)
            hint = f"; did you mean '{guess[0]}'? Set {key}: {guess[0]}" if guess else f"; set {key} to one of them"
            raise DataError(f"{labels_path}: no column '{column}' (columns: {', '.join(header)}){hint}")
    if not rows:
        raise DataError(f"{labels_path}: labels file has a header but no rows")
    has_split = split_column is not None and split_column in header

    root_resolved = root.resolve()
    problems: list[str] = []
    examples: list[Example] = []
    seen: dict[str, Example] = {}
    for line, row in enumerate(rows, start=2):
        where = f"{labels_path}:{line}"
        image = (row.get(image_column) or "").strip()
        if not image:
            problems.append(f"{where}: empty image path")
            continue
        path = _resolve_inside(root_resolved, image)
        if path is None:
            problems.append(f"{where}: image path '{image}' points outside data.root; use a path relative to {root}")
            continue
        text = (row.get(target_column) or "").strip()
        try:
            target = float(text)
        except ValueError:
            problems.append(f"{where}: target '{text}' in column '{target_column}' is not a number")
            continue
        if not math.isfinite(target):
            problems.append(f"{where}: target '{text}' is not a finite number")
            continue
        if target_transform == "log" and target <= 0:
            problems.append(
                f"{where}: target {text} is not positive, which data.target_transform: log requires; "
                "fix the label or use target_transform: none"
            )
            continue
        split = None
        if has_split:
            split = (row.get(split_column) or "").strip().lower()
            split = SPLIT_ALIASES.get(split, split)
            if split not in SPLITS:
                problems.append(f"{where}: split '{row.get(split_column)}' is not one of {', '.join(SPLITS)}")
                continue
        example = Example(image=image, path=path, target=target, split=split, line=line)
        previous = seen.get(str(path))
        if previous is not None:
            if (previous.target, previous.split) != (target, split):
                problems.append(f"{where}: '{image}' is listed again with a different label (first on line {previous.line})")
            continue  # an exact duplicate row is dropped
        seen[str(path)] = example
        if not path.is_file():
            problems.append(f"{where}: image file '{image}' not found under {root}")
            continue
        examples.append(example)

    if problems:
        shown = problems[:MAX_REPORTED]
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise DataError(
            f"{labels_path}: {len(problems)} problem{'s' if len(problems) > 1 else ''} in the labels file\n"
            + "\n".join(f"  {p}" for p in shown)
            + more
        )
    return Labels(examples, [], hashlib.sha256(Path(labels_path).read_bytes()).hexdigest())


def _resolve_inside(root: Path, image: str) -> Path | None:
    if os.path.isabs(image):
        return None
    path = (root / image).resolve()
    return path if path.is_relative_to(root) else None

