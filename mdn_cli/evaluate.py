"""`mdn evaluate`: score a checkpoint on labelled images (its own test split by default).

Writes metrics.json, predictions.csv and three plots (reliability diagram, PIT histogram,
predicted vs true with 95% intervals) to the output folder.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import metrics
from . import mixture as mx
from .calibration import NOMINAL_PROBS
from .dataset import ImageRegressionDataset, make_loader, resolve_num_workers
from .errors import DataError
from .inference import Predictor, run_model
from .labels import Example, read_labels
from .runtime import Runtime, select_runtime

TRUTH_FILE = "truth.csv"


@dataclass
class Evaluation:
    metrics: dict
    """Scores of the calibrated model, plus `uncalibrated` and `oracle` sub-dicts where they apply."""
    examples: list[Example]
    """The scored examples (images that decoded), in order."""
    mixture: mx.Mixture
    interval_probs: tuple[float, float, float, float] = NOMINAL_PROBS
    """CDF levels of the 68% and 95% interval ends (moved by conformal calibration)."""


def examples_for(
    checkpoint_config: dict, run_dir: Path, data: Path | None, split: str | None
) -> tuple[list[Example], Path, str]:
    """The labelled examples to score, their image root, and a description of them.

    Default: the `split` rows of the run's splits.csv, with images under the training data root.
    With `data`: every row of that labels CSV (image paths relative to its folder), filtered by
    its split column when `split` is given and the column exists."""
    d = checkpoint_config["data"]
    transform = d["target_transform"]
    if data is None:
        splits_file = run_dir / "splits.csv"
        if not splits_file.is_file():
            raise DataError(f"{splits_file}: not found; evaluate needs the run folder of the checkpoint, or pass --data LABELS.csv")
        split = split or "test"
        examples = read_labels(splits_file, Path(d["root"]), "image", "target", "split", transform).examples
        chosen = [e for e in examples if e.split == split]
        if not chosen:
            raise DataError(f"{splits_file}: the run has no '{split}' images; choose --split train|val|test or pass --data")
        return chosen, Path(d["root"]), f"{len(chosen)} {split} images of {run_dir}"
    examples = read_labels(data, data.parent, d["image_column"], d["target_column"], d["split_column"], transform).examples
    if split is not None and examples[0].split is not None:
        examples = [e for e in examples if e.split == split]
        if not examples:
            raise DataError(f"{data}: no rows with split '{split}'")
    return examples, data.parent, f"{len(examples)} images of {data}"


def score_examples(
    predictor: Predictor,
    examples: list[Example],
    root: Path,
    runtime: Runtime,
    batch_size: int = 64,
    num_workers: int | str = "auto",
    on_skip: Callable[[str], None] = print,
) -> Evaluation:
    """Predict every example and score the predictions (calibrated and, if different, uncalibrated)."""
    dataset = ImageRegressionDataset([e.path for e in examples], [e.target for e in examples], predictor.model.args.image_size)
    loader = make_loader(dataset, batch_size, resolve_num_workers(num_workers), pin_memory=runtime.pin_memory)
    outputs = run_model(predictor.model, loader, runtime, on_skip)
    if outputs.targets.numel() == 0:
        raise DataError("no image could be read, nothing to score")
    kept = [examples[i] for i in outputs.indices.tolist()]
    m = predictor.mixture(outputs)
    result = metrics.score(m, outputs.targets, predictor.interval_probs)
    if predictor.sigma_scale != 1.0 or predictor.interval_probs != NOMINAL_PROBS:
        result["uncalibrated"] = metrics.score(predictor.mixture(outputs, calibrated=False), outputs.targets)
    oracle = oracle_mixture(kept, root)
    if oracle is not None:
        result["oracle"] = {
            "nll": float(-mx.log_prob(oracle, outputs.targets).mean()),
            "crps": float(mx.crps(oracle, outputs.targets).mean()),
        }
    return Evaluation(result, kept, m, predictor.interval_probs)


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


def evaluate(
    checkpoint: Path,
    data: Path | None = None,
    split: str | None = None,
    output: Path | None = None,
    device: str = "auto",
    num_workers: int | str = "auto",
    plots: bool = True,
    on_skip: Callable[[str], None] = print,
) -> tuple[Evaluation, Path, str]:
    """Score `checkpoint`; write metrics.json, predictions.csv and plots to `output` (default: the
    run's eval/ folder). Returns the evaluation, the output folder and what was scored."""
    runtime = select_runtime(device)
    predictor, ckpt = Predictor.from_checkpoint(checkpoint, runtime)
    run_dir = Path(checkpoint).parent
    examples, root, described = examples_for(ckpt["config"], run_dir, data, split)
    evaluation = score_examples(predictor, examples, root, runtime, num_workers=num_workers, on_skip=on_skip)
    output = output or run_dir / "eval"
    try:
        output.mkdir(parents=True, exist_ok=True)
        _write_json(output / "metrics.json", {"checkpoint": str(checkpoint), "data": described, **evaluation.metrics})
        _write_predictions(output / "predictions.csv", evaluation)
        if plots:
            from .plots import evaluation_plots

            evaluation_plots(evaluation.mixture, torch.tensor([e.target for e in evaluation.examples]), output, evaluation.interval_probs[2:])
    except OSError as e:
        raise DataError(f"{output}: cannot write evaluation results ({e.strerror})") from None
    return evaluation, output, described


def format_metrics(result: dict) -> str:
    """A readable table of the metrics (calibrated, and before calibration / oracle when present)."""
    columns = [("model", result)]
    if "uncalibrated" in result:
        columns = [("calibrated", result), ("uncalibrated", result["uncalibrated"])]
    if "oracle" in result:
        columns.append(("oracle", result["oracle"]))
    rows = [
        ("NLL (nats/sample)", "nll"),
        ("CRPS", "crps"),
        ("MAE of mean", "mae_mean"),
        ("RMSE of mean", "rmse_mean"),
        ("MAE of median", "mae_median"),
        ("RMSE of median", "rmse_median"),
        ("68% coverage", "coverage_68"),
        ("68% mean width", "width_68"),
        ("95% coverage", "coverage_95"),
        ("95% mean width", "width_95"),
        ("calibration error", "calibration_error"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'metric'.ljust(width)}  " + "  ".join(f"{name:>12}" for name, _ in columns)]
    for label, key in rows:
        cells = [f"{c[key]:>12.4f}" if key in c else f"{'':>12}" for _, c in columns]
        lines.append(f"{label.ljust(width)}  " + "  ".join(cells))
    lines.append(f"{'images'.ljust(width)}  {result['n']:>12d}")
    return "\n".join(lines) + "\n"


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _write_predictions(path: Path, evaluation: Evaluation) -> None:
    m, examples = evaluation.mixture, evaluation.examples
    y = torch.tensor([e.target for e in examples], dtype=torch.float64)
    mean, std, median = mx.mean(m), mx.std(m), mx.median(m)
    q = mx.quantile(m, list(evaluation.interval_probs))
    pit = mx.cdf(m, y)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "target", "mean", "std", "median", "interval_68_low", "interval_68_high",
                         "interval_95_low", "interval_95_high", "pit"])
        for i, e in enumerate(examples):
            writer.writerow([e.image, e.target, *(f"{float(v):.6g}" for v in (mean[i], std[i], median[i], *q[i], pit[i]))])
    os.replace(tmp, path)
