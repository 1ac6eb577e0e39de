"""`mdn predict`: images in, one exact predictive distribution per image out (table, JSON or CSV)."""

from __future__ import annotations

import csv
import glob
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import mixture as mx
from .calibration import DEFAULT_LEVELS, Calibration, level_key
from .errors import CheckpointError, DataError
from .images import IMAGE_SUFFIXES, is_image_file
from .inference import Predictor
from .runtime import select_runtime

FORMATS = ("table", "json", "csv")


def find_latest_checkpoint(runs: Path = Path("runs")) -> Path:
    """The newest best.pt under `runs` (by modification time)."""
    candidates = sorted(runs.glob("**/best.pt"), key=lambda p: p.stat().st_mtime) if runs.is_dir() else []
    if not candidates:
        raise CheckpointError(f"no best.pt found under ./{runs}; train a model first or pass --checkpoint PATH")
    return candidates[-1]


def collect_images(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Expand files, folders (every image inside, recursively) and glob patterns, in order and
    without duplicates. Returns (image paths, problems: inputs that name no readable image)."""
    found: dict[Path, None] = {}
    problems: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if is_image_file(p))
            if not images:
                problems.append(f"{item}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        elif path.exists():
            images = [path]
        elif glob.has_magic(item):
            images = sorted(p for p in map(Path, glob.glob(item, recursive=True)) if is_image_file(p))
            if not images:
                problems.append(f"{item}: pattern matches no images")
        else:
            problems.append(f"{item}: no such file or folder")
            images = []
        found.update(dict.fromkeys(images))
    return list(found), problems


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no infinity: an unbounded end is null


def summarize(m: mx.Mixture, calibration: Calibration, levels: tuple[float, ...] = DEFAULT_LEVELS) -> list[dict]:
    """One dict per row of `m` (the scaled mixture): summaries in target units, components in the
    model's target space, and how the intervals were made."""
    mean, std, median, mode = mx.mean(m), mx.std(m), mx.median(m), mx.mode(m)
    intervals = {level: calibration.interval(m, level) for level in levels}
    described = calibration.describe(levels)
    order = torch.argsort(m.weights, dim=-1, descending=True)
    out = []
    for i in range(len(m)):
        record = {"mean": float(mean[i]), "std": float(std[i]), "median": float(median[i]), "mode": float(mode[i])}
        for level, (lo, hi) in intervals.items():
            record[f"interval_{level_key(level)}"] = [_finite_or_none(float(lo[i])), _finite_or_none(float(hi[i]))]
        record["components"] = [
            {"weight": float(m.weights[i, k]), "mean": float(m.means[i, k]), "std": float(m.stds[i, k])} for k in order[i].tolist()
        ]
        record["target_transform"] = m.transform
        record["calibration"] = described
        out.append(record)
    return out


@dataclass
class Prediction:
    image: str
    summary: dict


def predict_images(
    images: list[Path],
    checkpoint: Path,
    device: str = "auto",
    batch_size: int = 32,
    num_workers: int | str = "auto",
    on_skip: Callable[[str], None] = print,
    progress: bool = True,
    levels: tuple[float, ...] = DEFAULT_LEVELS,
    precision: str = "fp32",
) -> tuple[list[Prediction], mx.Mixture]:
    """Batched inference over `images`; unreadable ones are reported through `on_skip`."""
    runtime = select_runtime(device, precision, what="--precision")
    predictor, _ = Predictor.from_checkpoint(checkpoint, runtime)
    outputs = predictor.run(images, runtime, batch_size=batch_size, num_workers=num_workers, on_skip=on_skip, progress=progress)
    m = predictor.mixture(outputs)
    kept = [images[i] for i in outputs.indices.tolist()]
    return [Prediction(str(p), s) for p, s in zip(kept, summarize(m, predictor.calibration, levels))], m


# ---------------------------------------------------------------------------------------------
# Output formats


def format_predictions(predictions: list[Prediction], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([{"image": p.image, **p.summary} for p in predictions], indent=2) + "\n"
    if fmt == "csv":
        return _csv(predictions)
    return _table(predictions)


def _interval_keys(summary: dict) -> list[str]:
    return [k for k in summary if k.startswith("interval_")]


def _csv(predictions: list[Prediction]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    keys = _interval_keys(predictions[0].summary) if predictions else []
    writer.writerow(["image", "mean", "std", "median", "mode", *(f"{k}_{end}" for k in keys for end in ("low", "high")),
                     "target_transform", "calibration", "components"])
    for p in predictions:
        s = p.summary
        ends = [repr(v) if v is not None else "" for k in keys for v in s[k]]
        writer.writerow([p.image, *(repr(s[k]) for k in ("mean", "std", "median", "mode")), *ends, s["target_transform"],
                         s["calibration"]["method"], json.dumps(s["components"])])
    return buffer.getvalue()


def _fmt(x: float | None, low_end: bool = False) -> str:
    if x is None:
        return "-inf" if low_end else "inf"
    return f"{x:.4g}" if abs(x) < 1e5 else f"{x:.3e}"


def _table(predictions: list[Prediction]) -> str:
    keys = _interval_keys(predictions[0].summary) if predictions else []
    header = ("image", "mean", "std", "median", "mode", *(f"{k.removeprefix('interval_')}% interval" for k in keys),
              "components (weight: mean ± std)")
    rows = []
    for p in predictions:
        s = p.summary
        space = "log " if s["target_transform"] == "log" else ""
        comps = ", ".join(f"{c['weight']:.2f}: {space}{_fmt(c['mean'])} ± {_fmt(c['std'])}" for c in s["components"] if c["weight"] >= 0.01)
        rows.append(
            (p.image, _fmt(s["mean"]), _fmt(s["std"]), _fmt(s["median"]), _fmt(s["mode"]),
             *(f"[{_fmt(s[k][0], True)}, {_fmt(s[k][1])}]" for k in keys), comps)
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    if predictions:
        c = predictions[0].summary["calibration"]
        lines.append(f"intervals: {c['guarantee']}")
        if "warning" in c:
            lines.append(f"warning: {c['warning']}")
    return "\n".join(lines) + "\n"


def write_output(text: str, output: Path | None) -> None:
    if output is None:
        print(text, end="")
        return
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
    except OSError as e:
        raise DataError(f"{output}: cannot write output ({e.strerror})") from None
