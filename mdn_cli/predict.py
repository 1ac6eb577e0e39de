"""`mdn predict`: images in, one exact predictive distribution per image out (table, JSON or CSV)."""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import interrupts
from . import mixture as mx
from . import modes as md
from .calibration import DEFAULT_LEVELS, Calibrated, Calibration, level_key
from .dataset import ImageRegressionDataset, close_loader, make_loader, resolve_num_workers
from .errors import CheckpointError, ConfigError, DataError
from .files import write_text_atomic
from .export import (
    ONNX_HELP,
    OnnxPredictor,
    cached_onnx,
    is_onnx,
    onnxruntime_available,
)
from .images import IMAGE_SUFFIXES, is_image_file
from .inference import Predictions, Predictor
from .runtime import select_device, select_runtime

FORMATS = ("table", "json", "csv")
BACKENDS = ("auto", "torch", "onnxruntime")


def onnx_predictor_for(checkpoint: Path, backend: str, device: str, precision: str,
                       log: Callable[[str], None]) -> OnnxPredictor | None:
    """How to run a model file: an .onnx on onnxruntime; a .pt checkpoint on onnxruntime (its
    cached export, `export.cached_onnx`) for backend onnxruntime, or for auto in fp32 on a CPU
    where onnxruntime is installed (faster there than PyTorch); None: PyTorch."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
    if is_onnx(checkpoint):
        return OnnxPredictor(checkpoint)
    if backend == "onnxruntime":
        if not onnxruntime_available():
            raise ConfigError(f"--backend onnxruntime: {ONNX_HELP}")
        if device not in ("auto", "cpu") or precision != "fp32":
            raise ConfigError(f"--backend onnxruntime runs fp32 on the CPU (got --device {device}, --precision {precision}); "
                              "use --backend torch for another device or precision")
    cpu = select_device(device, "--device").type == "cpu" and precision == "fp32"
    if backend == "onnxruntime" or (backend == "auto" and cpu and onnxruntime_available()):
        return cached_onnx(checkpoint, log)
    return None


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


def read_groups(path: Path) -> dict[Path, str]:
    """`--groups FILE.csv`: columns `image` (a path relative to the file's folder) and `group`;
    returns {resolved image path: group}."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"image", "group"} <= {n.strip() for n in reader.fieldnames}:
                raise DataError(f"{path}: expected the columns image and group (found {', '.join(reader.fieldnames or []) or 'none'})")
            out: dict[Path, str] = {}
            for row in reader:
                image, group = (row.get("image") or "").strip(), (row.get("group") or "").strip()
                if not image:
                    raise DataError(f"{path}:{reader.line_num}: no image in this row; write image,group")
                if group:
                    out[(path.parent / image).resolve()] = group
    except FileNotFoundError:
        raise DataError(f"{path}: --groups file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read the --groups file ({e})") from None
    return out


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no infinity: an unbounded end is null


def member_moments(m: mx.Mixture, member_sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Aleatoric and epistemic std (N,) in target units, by the law of total variance over
    members: Var = mean_m Var_m (aleatoric) + mean_m (E_m - E)^2 (epistemic). Members have equal
    weight; within a member, its own mixture weights."""
    means, variances = [], []
    start = 0
    for k in member_sizes:
        part = m.weights[:, start : start + k]
        member = mx.Mixture(part / part.sum(-1, keepdim=True), m.means[:, start : start + k], m.stds[:, start : start + k], m.transform)
        means.append(mx.mean(member))
        variances.append(mx.std(member) ** 2)
        start += k
    e, v = torch.stack(means), torch.stack(variances)  # (M, N)
    return v.mean(0).sqrt(), (e - e.mean(0)).pow(2).mean(0).sqrt()


def summarize(
    pred: Calibrated,
    levels: tuple[float, ...] = DEFAULT_LEVELS,
    member_sizes: list[int] | None = None,
    ood_scores: torch.Tensor | None = None,
) -> list[dict]:
    """One dict per prediction: summaries in target units of the scaled mixture (mean, std, median
    and mode of the model's own distribution with the std scale applied; central intervals and
    highest-density regions, as lists of [low, high] pieces, at the calibrated levels; every mode
    with its probability mass), components in the model's target space, how the intervals were
    made (which calibration images, how many, the levels to rebuild them) and, with `ood_scores`,
    whether the image looks like the training images."""
    m = pred.mixture
    mean, std, median, mode = mx.mean(m), mx.std(m), mx.median(m), md.mode(m)
    aleatoric, epistemic = member_moments(m, member_sizes or [m.weights.shape[1]])
    intervals = {level: pred.interval(level) for level in levels}
    regions = {level: pred.hdr(level) for level in levels}
    modes = md.modes(m, md.MODE_MIN_MASS)
    described = pred.describe(levels)
    member_of = [i for i, k in enumerate(member_sizes or [m.weights.shape[1]]) for _ in range(k)]
    order = torch.argsort(m.weights, dim=-1, descending=True)
    out = []
    for i in range(len(m)):
        record = {"mean": float(mean[i]), "std": float(std[i]), "std_aleatoric": float(aleatoric[i]),
                  "std_epistemic": float(epistemic[i]), "median": float(median[i]), "mode": float(mode[i])}
        for level, (lo, hi) in intervals.items():
            record[f"interval_{level_key(level)}"] = [_finite_or_none(float(lo[i])), _finite_or_none(float(hi[i]))]
        for level, pieces in regions.items():
            record[f"hdr_{level_key(level)}"] = [[_finite_or_none(a), _finite_or_none(b)] for a, b in pieces[i]]
        record["modes"] = [{"location": x, "mass": p} for x, p in modes[i]]
        record["components"] = [
            {"weight": float(m.weights[i, k]), "mean": float(m.means[i, k]), "std": float(m.stds[i, k]),
             **({"member": member_of[k]} if member_sizes and len(member_sizes) > 1 else {})}
            for k in order[i].tolist()
        ]
        record["target_transform"] = m.transform
        record["calibration"] = described[i]
        if ood_scores is not None:
            record["ood_score"] = float(ood_scores[i])
            record["in_distribution"] = bool(ood_scores[i] <= 1.0)
        out.append(record)
    return out


def records(predictor: Predictor, predictions: Predictions, levels: tuple[float, ...] = DEFAULT_LEVELS,
            groups: list[str | None] | None = None) -> list[dict]:
    """The prediction records of a predictor's outputs (what `mdn predict --format json` prints)."""
    return summarize(predictor.calibrated(predictions, groups), levels, predictor.member_sizes, predictor.ood_scores(predictions))


@dataclass
class Prediction:
    image: str
    summary: dict
    target: dict | None = None
    """{"name", "unit"} of what is predicted."""


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
    backend: str = "auto",
    log: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
    groups: list[str | None] | None = None,
) -> tuple[list[Prediction], mx.Mixture | None]:
    """Batched inference over `images` with a checkpoint (.pt) or an exported model (.onnx);
    unreadable images are reported through `on_skip`. `backend`: torch, onnxruntime, or auto:
    onnxruntime for fp32 on a CPU when it is installed (faster there than PyTorch), PyTorch
    otherwise. `groups`: each image's group, for a model calibrated by group."""
    model = onnx_predictor_for(checkpoint, backend, device, precision, log)
    if model is not None:
        dataset = ImageRegressionDataset(images, [math.nan] * len(images), model.image_size)
        loader = make_loader(dataset, batch_size, 0 if len(images) <= batch_size else resolve_num_workers(num_workers), name="predict")
        try:
            m, ood, indices = model.run(loader, on_skip)
        finally:
            close_loader(loader)
        if m is None:
            return [], None
        _note_uncalibrated(model.calibration, checkpoint, log)
        kept = indices.tolist()
        pred = model.calibration.attach(m, [groups[i] for i in kept] if groups else None)
        summaries = summarize(pred, levels, model.member_sizes, ood)
        return [Prediction(str(images[i]), s, model.target) for i, s in zip(kept, summaries)], m
    runtime = select_runtime(device, precision, what="--precision")
    predictor, _ = Predictor.from_checkpoint(checkpoint, runtime)
    predictions = predictor.run(images, runtime, batch_size=batch_size, num_workers=num_workers, on_skip=on_skip, progress=progress)
    if len(predictions.indices) == 0:
        return [], None
    _note_uncalibrated(predictor.calibration, checkpoint, log)
    order = predictions.indices.tolist()
    summaries = records(predictor, predictions, levels, [groups[i] for i in order] if groups else None)
    return [Prediction(str(images[i]), s, predictor.target) for i, s in zip(order, summaries)], predictor.mixture(predictions)


def _note_uncalibrated(calibration: Calibration, checkpoint: Path, log: Callable[[str], None]) -> None:
    if not calibration.calibrated:
        log(f"note: {checkpoint} is not calibrated (last.pt is written every epoch; training calibrates best.pt at "
            "its end): its intervals are the model's own, with no coverage guarantee")


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


def likely_answers(summary: dict) -> list[dict]:
    """The modes worth naming: at least md.LIKELY_MASS of the probability each."""
    return [mode for mode in summary.get("modes", []) if mode["mass"] >= md.LIKELY_MASS]


def _region(pieces: list) -> str:
    return " ∪ ".join(f"[{_fmt(a, True)}, {_fmt(b)}]" for a, b in pieces)


SCALARS = ("mean", "std", "std_aleatoric", "std_epistemic", "median", "mode")


def _csv(predictions: list[Prediction]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    first = predictions[0].summary if predictions else {}
    keys = _interval_keys(first)
    ood = ["ood_score", "in_distribution"] if "ood_score" in first else []
    regions = [k for k in first if k.startswith("hdr_")]
    writer.writerow(["image", *SCALARS, *(f"{k}_{end}" for k in keys for end in ("low", "high")), *regions, "modes", *ood,
                     "target_transform", "calibration", "calibrated_with", "components"])
    for p in predictions:
        s = p.summary
        ends = [repr(v) if v is not None else "" for k in keys for v in s[k]]
        writer.writerow([p.image, *(repr(s[k]) for k in SCALARS), *ends, *(json.dumps(s[k]) for k in regions),
                         json.dumps(s["modes"]), *(s[k] for k in ood), s["target_transform"], s["calibration"]["method"],
                         json.dumps(s["calibration"].get("calibrated_with", {})), json.dumps(s["components"])])
    return buffer.getvalue()


def _fmt(x: float | None, low_end: bool = False) -> str:
    if x is None:
        return "-inf" if low_end else "inf"
    return f"{x:.4g}" if abs(x) < 1e5 else f"{x:.3e}"


def _table(predictions: list[Prediction]) -> str:
    keys = _interval_keys(predictions[0].summary) if predictions else []
    ensemble = any(p.summary["std_epistemic"] > 0 for p in predictions)
    header = ("image", "mean", "std", *(("aleatoric", "epistemic") if ensemble else ()), "median", "mode",
              *(f"{k.removeprefix('interval_')}% interval" for k in keys), "components (share: mean ± std)")
    rows = []
    for p in predictions:
        s = p.summary
        space = "log " if s["target_transform"] == "log" else ""
        comps = ", ".join(f"{c['weight']:.2f}: {space}{_fmt(c['mean'])} ± {_fmt(c['std'])}" for c in s["components"] if c["weight"] >= 0.01)
        flag = "  ⚠" if s.get("in_distribution") is False else ""
        rows.append(
            (p.image + flag, _fmt(s["mean"]), _fmt(s["std"]), *((_fmt(s["std_aleatoric"]), _fmt(s["std_epistemic"])) if ensemble else ()),
             _fmt(s["median"]), _fmt(s["mode"]), *(f"[{_fmt(s[k][0], True)}, {_fmt(s[k][1])}]" for k in keys), comps)
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    target = predictions[0].target if predictions else None
    if target:
        unit = f" ({target['unit']})" if target["unit"] else ""
        lines.insert(0, f"predicted {target['name']}{unit}:")
    for p in predictions:
        answers = likely_answers(p.summary)
        if len(answers) > 1:
            words = {2: "two", 3: "three", 4: "four"}.get(len(answers), str(len(answers)))
            said = " and ".join(f"~{_fmt(a['location'])} ({a['mass']:.0%})" for a in answers)
            regions = "; ".join(f"{k.removeprefix('hdr_')}% most likely in {_region(p.summary[k])}" for k in p.summary if k.startswith("hdr_"))
            lines.append(f"{p.image}: {words} likely answers: {said}; {regions}")
    for p in predictions:
        if p.summary.get("in_distribution") is False:
            lines.append(f"⚠ {p.image}: unlike the images the model was trained on (ood score {p.summary['ood_score']:.2f}, "
                         "above 1 flags): its numbers may be confidently wrong")
    if predictions:
        for guarantee in dict.fromkeys(p.summary["calibration"]["guarantee"] for p in predictions):
            lines.append(f"intervals: {guarantee}")
        for warning, names in _grouped((p.summary["calibration"].get("warning"), p.image) for p in predictions).items():
            lines.append(f"warning: {warning} ({_images(names)})" if len(predictions) > 1 else f"warning: {warning}")
    return "\n".join(lines) + "\n"


def _grouped(pairs) -> dict:
    """{key: [values]} for the pairs whose key is not None, keys in first-seen order."""
    out: dict = {}
    for key, value in pairs:
        if key is not None:
            out.setdefault(key, []).append(value)
    return out


def _images(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 3 else f"{', '.join(names[:3])} and {len(names) - 3} more"


def write_output(text: str, output: Path | None) -> None:
    interrupts.reached("output-write")
    if output is None:
        print(text, end="")
        return
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{output}: cannot write output ({e.strerror})") from None
    write_text_atomic(output, text)
