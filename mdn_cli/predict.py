"""`mdn predict`: images in, one exact predictive distribution per image out (table, JSON or CSV)."""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from . import interrupts
from . import mixture as mx
from . import modes as md
from .calibration import DEFAULT_LEVELS, Calibrated, Calibration, level_key
from .data import Source
from .data.dataset import resolve_num_workers
from .data.labels import Example
from .errors import CheckpointError, ConfigError, DataError
from .files import atomic_writer
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


CHUNK = 1024
"""Images summarised at a time by `predict_chunks`: memory stays flat over any number of images."""


def predict_chunks(
    source: Source,
    examples: list[Example],
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
    chunk: int | None = None,
) -> Iterator[tuple[list[Prediction], mx.Mixture]]:
    """Batched inference over `examples` from `source` (image files: `data.folder.unlabelled`)
    with a checkpoint (.pt) or an exported model (.onnx), yielding the predictions of about
    `chunk` images at a time and their mixtures (target space, as reported): nothing grows with
    the number of images. Unreadable images are reported through `on_skip`; each example's group
    (`Example.group`) picks its calibration when the model was calibrated by group. `backend`:
    torch, onnxruntime, or auto: onnxruntime for fp32 on a CPU when it is installed (faster there
    than PyTorch), PyTorch otherwise. `chunk`: default CHUNK."""
    chunk = chunk or CHUNK
    model = onnx_predictor_for(checkpoint, backend, device, precision, log)
    workers = resolve_num_workers(num_workers)
    if model is not None:
        loader = source.loader(examples, model.image_size, batch_size, workers, name="predict")
        try:
            for i, (m, ood, indices) in enumerate(model.stream(loader, on_skip, chunk)):
                if i == 0:
                    _note_uncalibrated(model.calibration, checkpoint, log)
                kept = [examples[j] for j in indices.tolist()]
                summaries = summarize(model.calibration.attach(m, [e.group for e in kept]), levels, model.member_sizes, ood)
                yield [Prediction(e.image, s, model.target) for e, s in zip(kept, summaries)], m
        finally:
            loader.close()
        return
    runtime = select_runtime(device, precision, what="--precision")
    predictor, _ = Predictor.from_checkpoint(checkpoint, runtime)
    loader = predictor.loader(source, examples, workers, batch_size, pin_memory=runtime.pin_memory)
    for i, predictions in enumerate(predictor.stream(loader, runtime, on_skip=on_skip, progress=progress, chunk=chunk)):
        if i == 0:
            _note_uncalibrated(predictor.calibration, checkpoint, log)
        kept = [examples[j] for j in predictions.indices.tolist()]
        summaries = records(predictor, predictions, levels, [e.group for e in kept])
        yield [Prediction(e.image, s, predictor.target) for e, s in zip(kept, summaries)], predictor.mixture(predictions)


def predict_images(source: Source, examples: list[Example], checkpoint: Path, **options) -> tuple[list[Prediction], mx.Mixture | None]:
    """Every prediction of `predict_chunks` (same options) at once, and their mixtures (None when
    no image could be read)."""
    predictions, mixtures = [], []
    for part, m in predict_chunks(source, examples, checkpoint, **options):
        predictions += part
        mixtures.append(m)
    if not mixtures:
        return [], None
    return predictions, mx.cat_mixtures(mixtures)


def _note_uncalibrated(calibration: Calibration, checkpoint: Path, log: Callable[[str], None]) -> None:
    if not calibration.calibrated:
        log(f"note: {checkpoint} is not calibrated (last.pt is written every epoch; training calibrates best.pt at "
            "its end): its intervals are the model's own, with no coverage guarantee")


# ---------------------------------------------------------------------------------------------
# Output formats


def format_predictions(predictions: list[Prediction], fmt: str) -> str:
    """All of `predictions` in one format (what PredictionWriter writes piece by piece)."""
    buffer = io.StringIO()
    writer = PredictionWriter(fmt, lambda: buffer)
    writer.add(predictions)
    writer.finish()
    return buffer.getvalue()


class PredictionWriter:
    """Predictions written as they come, in a format: CSV rows and JSON records straight to `out`,
    a table's rows kept as text (aligned at the end). Nothing else is held, so memory stays flat
    over any number of images."""

    def __init__(self, fmt: str, out: Callable[[], IO[str]]):
        """`out`: opens the text stream to write to, when the first prediction comes (none: nothing
        is written, not even an empty file)."""
        self.fmt, self.open, self.count = fmt, out, 0
        self.csv: Any = None
        self.table = _Table() if fmt == "table" else None

    def add(self, predictions: list[Prediction]) -> None:
        if predictions and self.count == 0:
            self.out = self.open()
            self.csv = csv.writer(self.out, lineterminator="\n") if self.fmt == "csv" else None
        for p in predictions:
            if self.fmt == "json":
                text = json.dumps({"image": p.image, **p.summary}, indent=2).replace("\n", "\n  ")
                self.out.write(("[\n  " if self.count == 0 else ",\n  ") + text)
            elif self.csv is not None:
                if self.count == 0:
                    self.columns = _csv_columns(p.summary)
                    self.csv.writerow(self.columns[0])
                self.csv.writerow(_csv_row(p, self.columns[1]))
            else:
                self.table.add(p)
            self.count += 1

    def finish(self) -> None:
        if self.count and self.fmt == "json":
            self.out.write("\n]\n")
        elif self.count and self.table is not None:
            self.out.write(self.table.text())


def _interval_keys(summary: dict) -> list[str]:
    return [k for k in summary if k.startswith("interval_")]


def likely_answers(summary: dict) -> list[dict]:
    """The modes worth naming: at least md.LIKELY_MASS of the probability each."""
    return [mode for mode in summary.get("modes", []) if mode["mass"] >= md.LIKELY_MASS]


def _region(pieces: list) -> str:
    return " ∪ ".join(f"[{_fmt(a, True)}, {_fmt(b)}]" for a, b in pieces)


SCALARS = ("mean", "std", "std_aleatoric", "std_epistemic", "median", "mode")


def _csv_columns(first: dict) -> tuple[list[str], tuple]:
    """The CSV header for records like `first`, and what each row needs to follow it."""
    keys = _interval_keys(first)
    ood = ["ood_score", "in_distribution"] if "ood_score" in first else []
    regions = [k for k in first if k.startswith("hdr_")]
    header = ["image", *SCALARS, *(f"{k}_{end}" for k in keys for end in ("low", "high")), *regions, "modes", *ood,
              "target_transform", "calibration", "calibrated_with", "components"]
    return header, (keys, regions, ood)


def _csv_row(p: Prediction, columns: tuple) -> list:
    keys, regions, ood = columns
    s = p.summary
    ends = [repr(v) if v is not None else "" for k in keys for v in s[k]]
    return [p.image, *(repr(s[k]) for k in SCALARS), *ends, *(json.dumps(s[k]) for k in regions), json.dumps(s["modes"]),
            *(s[k] for k in ood), s["target_transform"], s["calibration"]["method"],
            json.dumps(s["calibration"].get("calibrated_with", {})), json.dumps(s["components"])]


def _fmt(x: float | None, low_end: bool = False) -> str:
    if x is None:
        return "-inf" if low_end else "inf"
    return f"{x:.4g}" if abs(x) < 1e5 else f"{x:.3e}"


class _Table:
    """The table format: one row per image, then the notes (several likely answers, unfamiliar
    images, the intervals' guarantee, calibration warnings); kept as text until `text`."""

    def __init__(self):
        self.rows: list[tuple[str, ...]] = []
        self.notes: list[str] = []
        self.flags: list[str] = []
        self.keys: list[str] | None = None
        self.target: dict | None = None
        self.ensemble = False
        self.guarantees: dict[str, None] = {}
        self.warnings: dict[str, list[str]] = {}

    def add(self, p: Prediction) -> None:
        s = p.summary
        if self.keys is None:
            self.keys, self.target = _interval_keys(s), p.target
        self.ensemble = self.ensemble or s["std_epistemic"] > 0
        space = "log " if s["target_transform"] == "log" else ""
        comps = ", ".join(f"{c['weight']:.2f}: {space}{_fmt(c['mean'])} ± {_fmt(c['std'])}" for c in s["components"] if c["weight"] >= 0.01)
        flag = "  ⚠" if s.get("in_distribution") is False else ""
        self.rows.append((p.image + flag, _fmt(s["mean"]), _fmt(s["std"]), _fmt(s["std_aleatoric"]), _fmt(s["std_epistemic"]),
                          _fmt(s["median"]), _fmt(s["mode"]), *(f"[{_fmt(s[k][0], True)}, {_fmt(s[k][1])}]" for k in self.keys), comps))
        answers = likely_answers(s)
        if len(answers) > 1:
            words = {2: "two", 3: "three", 4: "four"}.get(len(answers), str(len(answers)))
            said = " and ".join(f"~{_fmt(a['location'])} ({a['mass']:.0%})" for a in answers)
            regions = "; ".join(f"{k.removeprefix('hdr_')}% most likely in {_region(s[k])}" for k in s if k.startswith("hdr_"))
            self.notes.append(f"{p.image}: {words} likely answers: {said}; {regions}")
        if s.get("in_distribution") is False:
            self.flags.append(f"⚠ {p.image}: unlike the images the model was trained on (ood score {s['ood_score']:.2f}, "
                              "above 1 flags): its numbers may be confidently wrong")
        self.guarantees[s["calibration"]["guarantee"]] = None
        warning = s["calibration"].get("warning")
        if warning is not None:
            self.warnings.setdefault(warning, []).append(p.image)

    def text(self) -> str:
        keep = [i for i in range(len(self.rows[0]) if self.rows else 0) if self.ensemble or i not in (3, 4)]
        header = ("image", "mean", "std", "aleatoric", "epistemic", "median", "mode",
                  *(f"{k.removeprefix('interval_')}% interval" for k in self.keys or []), "components (share: mean ± std)")
        table = [tuple(row[i] for i in keep) for row in [header, *self.rows]]
        widths = [max(len(r[i]) for r in table) for i in range(len(keep))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
        if self.target:
            unit = f" ({self.target['unit']})" if self.target["unit"] else ""
            lines.insert(0, f"predicted {self.target['name']}{unit}:")
        lines += self.notes + self.flags + [f"intervals: {g}" for g in self.guarantees]
        for warning, names in self.warnings.items():
            lines.append(f"warning: {warning} ({_images(names)})" if len(self.rows) > 1 else f"warning: {warning}")
        return "\n".join(lines) + "\n"


def _images(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 3 else f"{', '.join(names[:3])} and {len(names) - 3} more"


@contextmanager
def prediction_output(fmt: str, output: Path | None) -> Iterator[PredictionWriter]:
    """A PredictionWriter to stdout, or to `output`: written to a temp file beside it as the
    predictions come, and put in place whole at the end (a stop or an error before then leaves
    no partial file; a stop asked for while it is put in place waits for it)."""
    if output is None:
        writer = PredictionWriter(fmt, lambda: sys.stdout)
        yield writer
        interrupts.reached("output-write")
        writer.finish()
        return
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{output}: cannot write output ({e.strerror})") from None
    with ExitStack() as stack:
        writer = PredictionWriter(fmt, lambda: stack.enter_context(atomic_writer(output)))
        yield writer
        interrupts.reached("output-write")
        stack.enter_context(interrupts.interrupts_held())  # leaves after the file is in place (last in, first out)
        writer.finish()
