"""`mdn evaluate`: score a checkpoint on labelled images (its own test split by default).

Writes metrics.json, predictions.csv and four plots (reliability of the reported intervals, PIT
histogram, predicted vs true, coverage by decile of the true value and of the predicted std).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import interrupts, metrics, phases
from . import mixture as mx
from .calibration import DEFAULT_LEVELS, Calibrated, Calibration, level_key
from .errors import CheckpointError, DataError
from .export import OnnxPredictor, is_onnx
from .files import atomic_writer, write_text_atomic
from .inference import Predictor
from .data import Source, open_source
from .data.folder import FolderSource
from .data.labels import Example
from .runtime import Runtime, select_runtime
from .data.splits import SPLITS_FILE

TRUTH_FILE = "truth.csv"


@dataclass
class Evaluation:
    metrics: dict
    """Scores as reported (calibrated), plus `uncalibrated`, `oracle` and `conditional` where they apply."""
    examples: list[Example]
    """The scored examples (images that decoded), in order."""
    pred: Calibrated
    """The predictions as reported: the scaled mixtures, each with its calibration set."""
    raw: mx.Mixture
    """The same mixtures without any calibration."""
    levels: tuple[float, ...] = DEFAULT_LEVELS
    target: dict = field(default_factory=lambda: {"name": "target", "unit": ""})
    """{"name", "unit"} of what is predicted."""
    ood_scores: torch.Tensor | None = None
    """Each image's unfamiliar-image score (above 1: flagged); None without the warning."""

    @property
    def targets(self) -> torch.Tensor:
        return torch.tensor([e.target for e in self.examples], dtype=torch.float64)

    @property
    def mixture(self) -> mx.Mixture:
        return self.pred.mixture

    @property
    def calibration(self) -> Calibration:
        return self.pred.calibration


def examples_for(
    checkpoint_config: dict, run_dir: Path, data: Path | None, split: str | None
) -> tuple[list[Example], Source, str]:
    """The labelled examples to score, the source of their images, and a description of them.

    Default: the `split` rows of the run's splits.csv, from the run's own source (its folder or
    shard set). With `data`: every row of that labels CSV (image paths relative to its folder),
    filtered by its split column when `split` is given."""
    d = checkpoint_config["data"]
    if data is None:
        splits_file = run_dir / SPLITS_FILE
        if not splits_file.is_file():
            raise DataError(f"{splits_file}: not found; evaluate needs the run folder of the checkpoint, or pass --data LABELS.csv")
        split = split or "test"
        source = open_source(d)
        chosen = [e for e in source.recorded(splits_file) if e.split == split]
        if not chosen:
            raise DataError(f"{splits_file}: the run has no '{split}' images; choose another --split or pass --data")
        return chosen, source, f"the {len(chosen)} {split} images of {run_dir}"
    source = FolderSource({**d, "labels": data.name, "shards": None}, data.parent)
    examples = source.read().examples
    if split is not None:
        if examples[0].split is None:
            raise DataError(f"{data}: --split {split} asks for a split column ('{d['split_column']}'), which this file does not have; "
                            "leave --split out to score every row")
        examples = [e for e in examples if e.split == split]
        if not examples:
            raise DataError(f"{data}: no rows with split '{split}'")
        return examples, source, f"the {len(examples)} {split} images of {data}"
    return examples, source, f"the {len(examples)} images of {data}"


def score_examples(
    predictor: Predictor,
    examples: list[Example],
    source: Source,
    runtime: Runtime,
    num_workers: int | str = "auto",
    on_skip: Callable[[str], None] = print,
    levels: tuple[float, ...] = DEFAULT_LEVELS,
) -> Evaluation:
    """Predict every example and score the predictions: as reported (calibrated), and before any
    calibration, and against the true distribution when the data has one (toy data)."""
    loader = predictor.loader(source, examples, num_workers, name="evaluation", pin_memory=runtime.pin_memory)
    outputs = predictor.run(loader, runtime, on_skip=on_skip, progress=True, moment="evaluation-batch")
    if outputs.targets.numel() == 0:
        raise DataError("no image could be read, nothing to score")
    kept = [examples[i] for i in outputs.indices.tolist()]
    y = outputs.targets
    groups = [e.group for e in kept]
    pred, raw = predictor.calibrated(outputs, groups), predictor.mixture(outputs, calibrated=False)
    calibration = predictor.calibration
    result = metrics.score(pred, y, levels)
    result["calibration"] = calibration.summary(levels)
    if calibration.calibrated:
        result["uncalibrated"] = metrics.score(Calibration().attach(raw), y, levels)
    result["conditional"] = metrics.conditional_coverage(pred, y, groups=groups, levels=levels)
    ood = predictor.ood_scores(outputs)
    if ood is not None:
        flagged = ood > 1.0
        result["unfamiliar"] = {"flagged_fraction": float(flagged.double().mean()), "flagged_images": int(flagged.sum()),
                                **predictor.unfamiliar.describe()}  # type: ignore[union-attr]
        for name, rows in (("flagged", flagged), ("not_flagged", ~flagged)):
            if rows.any():
                result["unfamiliar"][name] = metrics.score(pred[rows], y[rows], levels)
    oracle = oracle_mixture(kept, source.root) if source.root is not None else None  # the toy data's truth.csv, beside its images
    if oracle is not None:
        result["oracle"] = {
            "nll": float(-mx.log_prob(oracle, y).mean()),
            "crps": float(mx.crps(oracle, y).mean()),
        }
    result["target"] = predictor.target
    return Evaluation(result, kept, pred, raw, levels, predictor.target or {"name": "target", "unit": ""}, ood)


def oracle_mixture(examples: list[Example], root: Path) -> mx.Mixture | None:
    """The true conditional mixtures from the toy data's truth.csv in `root`, when it covers every
    example (columns weight_k, mean_k, std_k in target units); None otherwise."""
    truth_file = root / TRUTH_FILE
    if not truth_file.is_file():
        return None
    root = root.resolve()
    with open(truth_file, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        k = sum(1 for c in reader.fieldnames or [] if c.startswith("weight_"))
        table = {(root / row["image"]).resolve(): row for row in reader}
    rows = [table.get(e.path) for e in examples]
    if k == 0 or any(r is None for r in rows):
        return None
    cols = lambda name: torch.tensor([[float(r[f"{name}_{j + 1}"]) for j in range(k)] for r in rows], dtype=torch.float64)  # noqa: E731
    return mx.Mixture(cols("weight"), cols("mean"), cols("std"), "none")


def default_output(run_dir: Path, data: Path | None, split: str | None) -> Path:
    """eval/ for the run's test split (what training writes), eval-SPLIT/ for its other splits,
    eval-NAME/ for another labels file."""
    if data is None:
        return run_dir / ("eval" if split in (None, "test") else f"eval-{split}")
    return run_dir / f"eval-{data.stem}{f'-{split}' if split else ''}"


def evaluate(
    checkpoint: Path,
    data: Path | None = None,
    split: str | None = None,
    output: Path | None = None,
    device: str = "auto",
    num_workers: int | str = "auto",
    plots: bool = True,
    on_skip: Callable[[str], None] = print,
    overwrite: bool = False,
    levels: tuple[float, ...] = DEFAULT_LEVELS,
    precision: str = "fp32",
    runtime: Runtime | None = None,
) -> tuple[Evaluation, Path, str]:
    """Score `checkpoint`; write metrics.json, predictions.csv and plots to `output` (default: see
    `default_output`). Results of other inputs already there are never replaced unless `overwrite`.
    `runtime`: the device and precision chosen already (training, ensembles); else from `device`
    and `precision`. Returns the evaluation, the output folder and what was scored."""
    if is_onnx(checkpoint):
        OnnxPredictor(checkpoint)  # a damaged file is said to be one
        raise CheckpointError(f"{checkpoint}: an exported model; mdn evaluate scores the checkpoint it was exported from (a .pt, "
                              "whose run folder knows the splits and the calibration's raw scores)")
    runtime = runtime or select_runtime(device, precision, what="--precision")
    predictor, ckpt = Predictor.from_checkpoint(checkpoint, runtime)
    run_dir = Path(checkpoint).parent
    examples, source, described = examples_for(ckpt["config"], run_dir, data, split)
    output = output or default_output(run_dir, data, split)
    header = {"checkpoint": str(Path(checkpoint).resolve()), "data": described}
    _check_output(output, header, overwrite)
    evaluation = score_examples(predictor, examples, source, runtime, num_workers=num_workers, on_skip=on_skip, levels=levels)
    interrupts.reached("results-write")
    interrupts.check()
    try:
        output.mkdir(parents=True, exist_ok=True)
        with interrupts.interrupts_held():  # the scores and the per-image file belong together
            write_text_atomic(output / "metrics.json", json.dumps({**header, **evaluation.metrics}, indent=2) + "\n")
            _write_predictions(output / "predictions.csv", evaluation)
        if plots:
            from .config import target_label
            from .plots import evaluation_plots

            with phases.timed("plots"):
                evaluation_plots(evaluation, output, target_label(ckpt["config"]["data"]))
    except OSError as e:
        raise DataError(f"{output}: cannot write evaluation results ({e.strerror})") from None
    return evaluation, output, described


def _check_output(output: Path, header: dict, overwrite: bool) -> None:
    """Refuse to replace the results of another checkpoint or other data without --overwrite."""
    if output.exists() and not output.is_dir():
        raise DataError(f"{output}: exists and is not a folder; choose another --output")
    existing = output / "metrics.json"
    if overwrite or not existing.is_file():
        return
    try:
        previous = json.loads(existing.read_text(encoding="utf-8"))
        same = {k: previous.get(k) for k in header} == header
    except (OSError, ValueError, AttributeError):
        same = False
    if not same:
        raise DataError(
            f"{output} already holds results for other inputs ({existing}); pass --output to write elsewhere, "
            "or --overwrite to replace them"
        )


def format_metrics(result: dict) -> str:
    """A readable table of the metrics (as reported, before calibration, oracle), with the binomial
    standard error of each coverage, then coverage by decile of the predicted std."""
    columns = [("model", result)]
    if "uncalibrated" in result:
        columns = [("calibrated", result), ("uncalibrated", result["uncalibrated"])]
    if "oracle" in result:
        columns.append(("oracle", result["oracle"]))
    keys = [k.removeprefix("coverage_") for k in result if k.startswith("coverage_")]
    rows = [("NLL (nats/image)", "nll"), ("CRPS", "crps"), ("MAE of mean", "mae_mean"), ("RMSE of mean", "rmse_mean"),
            ("MAE of median", "mae_median"), ("RMSE of median", "rmse_median")]
    for k in keys:
        rows += [(f"{k}% coverage", f"coverage_{k}"), (f"{k}% mean width", f"width_{k}"), (f"{k}% interval score", f"winkler_{k}"),
                 (f"{k}% HDR coverage", f"hdr_coverage_{k}"), (f"{k}% HDR mean length", f"hdr_width_{k}")]
    rows.append(("calibration error", "calibration_error"))
    width = max(len(r[0]) for r in rows)
    n = result["n"]

    def cell(c: dict, key: str) -> str:
        if key not in c:
            return f"{'':>18}"
        if key.startswith(("coverage_", "hdr_coverage_")):
            return f"{c[key]:>9.4f} ± {metrics.binomial_se(c[key], n):.4f}"
        return f"{c[key]:>18.4f}"

    target = result.get("target") or {}
    unit = f" (errors and widths in {target['unit']})" if target.get("unit") else ""
    lines = [f"{target.get('name', 'target')}{unit}"] if target else []
    lines.append(f"{'metric'.ljust(width)}  " + "  ".join(f"{name:>18}" for name, _ in columns))
    lines += [f"{label.ljust(width)}  " + "  ".join(cell(c, key) for _, c in columns) for label, key in rows]
    lines.append(f"{'images'.ljust(width)}  {n:>18d}")
    if "calibration" in result:
        lines.append(f"intervals: {result['calibration']['guarantee']}")
    if "unfamiliar" in result:
        u = result["unfamiliar"]
        line = f"unfamiliar-image warning: {u['flagged_images']} of {n} images flagged ({u['flagged_fraction']:.1%})"
        if "flagged" in u and "not_flagged" in u:
            line += (f"; MAE {u['flagged']['mae_mean']:.4g} flagged vs {u['not_flagged']['mae_mean']:.4g} not, "
                     f"NLL {u['flagged']['nll']:.4g} vs {u['not_flagged']['nll']:.4g}")
        lines.append(line)
    for name, table in result.get("conditional", {}).items():
        what = name.removeprefix("by_").replace("_", " ")
        cells = table["cells"]
        lines.append(f"coverage by {what} ({len(cells)} {'groups' if name == 'by_group' else 'equal-count bins'}, "
                     f"{min(c['n'] for c in cells)}-{max(c['n'] for c in cells)} images each):")
        for k in keys:
            values = "  ".join(f"{c[f'coverage_{k}']:.2f}±{c[f'se_{k}']:.2f}" for c in cells)
            worst, test = table["worst"][k], table["homogeneity"][k]
            lines.append(f"  {k}%: {values}; worst {worst['cell']} {worst['coverage']:.3f}; "
                         f"same in every cell? p = {test['p_value']:.2g}")
    return "\n".join(lines) + "\n"


def _write_predictions(path: Path, evaluation: Evaluation) -> None:
    m, examples, y = evaluation.mixture, evaluation.examples, evaluation.targets
    mean, std, median = mx.mean(m), mx.std(m), mx.median(m)
    intervals = {level: evaluation.pred.interval(level) for level in evaluation.levels}
    pit = mx.cdf(m, y)
    keys = [level_key(level) for level in evaluation.levels]
    ood = evaluation.ood_scores
    with atomic_writer(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", evaluation.target["name"], "mean", "std", "median",
                         *(f"interval_{k}_{end}" for k in keys for end in ("low", "high")), "pit",
                         *(["ood_score"] if ood is not None else [])])
        for i, e in enumerate(examples):
            ends = [v for lo, hi in intervals.values() for v in (lo[i], hi[i])]
            values = (mean[i], std[i], median[i], *ends, pit[i], *([ood[i]] if ood is not None else []))
            writer.writerow([e.image, e.target, *(f"{float(v):.6g}" for v in values)])
