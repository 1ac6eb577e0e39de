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
from tqdm import tqdm

from . import mixture as mx
from .calibration import NOMINAL_PROBS
from .dataset import ImageRegressionDataset, make_loader, resolve_num_workers
from .errors import CheckpointError, DataError
from .images import IMAGE_SUFFIXES, is_image_file
from .inference import Predictor, run_model
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


def summarize(m: mx.Mixture, interval_probs=NOMINAL_PROBS) -> list[dict]:
    """One dict per row of `m`: summaries in target units, components in the model's target space.
    `interval_probs`: CDF levels of the 68% and 95% interval ends (low, high, low, high)."""
    mean, std, median, mode = mx.mean(m), mx.std(m), mx.median(m), mx.mode(m)
    q = mx.quantile(m, list(interval_probs))
    order = torch.argsort(m.weights, dim=-1, descending=True)
    out = []
    for i in range(len(m)):
        out.append(
            {
                "mean": float(mean[i]),
                "std": float(std[i]),
                "median": float(median[i]),
                "mode": float(mode[i]),
                "interval_68": [float(q[i, 0]), float(q[i, 1])],
                "interval_95": [float(q[i, 2]), float(q[i, 3])],
                "components": [
                    {"weight": float(m.weights[i, k]), "mean": float(m.means[i, k]), "std": float(m.stds[i, k])}
                    for k in order[i].tolist()
                ],
                "target_transform": m.transform,
            }
        )
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
) -> tuple[list[Prediction], mx.Mixture]:
    """Batched inference over `images`; unreadable ones are reported through `on_skip`."""
    runtime = select_runtime(device)
    predictor, _ = Predictor.from_checkpoint(checkpoint, runtime)
    size = predictor.model.args.image_size
    dataset = ImageRegressionDataset(images, [math.nan] * len(images), size)
    workers = 0 if len(images) <= batch_size else resolve_num_workers(num_workers)
    loader = make_loader(dataset, batch_size, workers, pin_memory=runtime.pin_memory)
    batches = tqdm(loader, desc="predicting", unit="batch", leave=False, disable=not progress or len(loader) < 2)
    outputs = run_model(predictor.model, batches, runtime, on_skip)
    m = predictor.mixture(outputs)
    kept = [images[i] for i in outputs.indices.tolist()]
    return [Prediction(str(p), s) for p, s in zip(kept, summarize(m, predictor.interval_probs))], m


# ---------------------------------------------------------------------------------------------
# Output formats


def format_predictions(predictions: list[Prediction], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([{"image": p.image, **p.summary} for p in predictions], indent=2) + "\n"
    if fmt == "csv":
        return _csv(predictions)
    return _table(predictions)


CSV_COLUMNS = (
    "image", "mean", "std", "median", "mode",
    "interval_68_low", "interval_68_high", "interval_95_low", "interval_95_high",
    "target_transform", "components",
)


def _csv(predictions: list[Prediction]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for p in predictions:
        s = p.summary
        writer.writerow(
            [p.image, *(repr(s[k]) for k in ("mean", "std", "median", "mode")), *map(repr, s["interval_68"]),
             *map(repr, s["interval_95"]), s["target_transform"], json.dumps(s["components"])]
        )
    return buffer.getvalue()


def _fmt(x: float) -> str:
    return f"{x:.4g}" if abs(x) < 1e5 else f"{x:.3e}"


def _table(predictions: list[Prediction]) -> str:
    header = ("image", "mean", "std", "median", "mode", "68% interval", "95% interval", "components (weight: mean ± std)")
    rows = []
    for p in predictions:
        s = p.summary
        space = "log " if s["target_transform"] == "log" else ""
        comps = ", ".join(f"{c['weight']:.2f}: {space}{_fmt(c['mean'])} ± {_fmt(c['std'])}" for c in s["components"] if c["weight"] >= 0.01)
        rows.append(
            (p.image, _fmt(s["mean"]), _fmt(s["std"]), _fmt(s["median"]), _fmt(s["mode"]),
             f"[{_fmt(s['interval_68'][0])}, {_fmt(s['interval_68'][1])}]",
             f"[{_fmt(s['interval_95'][0])}, {_fmt(s['interval_95'][1])}]", comps)
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
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
