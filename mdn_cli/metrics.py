"""Proper scores, interval coverage and calibration of predictive mixtures against observed
targets, in target units. Intervals are the reported ones: made by the checkpoint's calibration."""

from __future__ import annotations

import math

import torch

from . import mixture as mx
from .calibration import DEFAULT_LEVELS, Calibration, level_key

# Central-interval levels behind the calibration error and the reliability diagram.
CALIBRATION_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def observed_coverage(pit: torch.Tensor, calibration: Calibration, levels=CALIBRATION_LEVELS) -> list[float]:
    """Observed coverage of the reported central interval at each level, from PIT values: y lies in
    [Q(a), Q(b)] exactly when a <= F(y) <= b, so no quantile needs computing."""
    out = []
    for level in levels:
        lo, hi = calibration.interval_probs(level)
        out.append(float(((pit >= lo) & (pit <= hi)).double().mean()))
    return out


def winkler(lo: torch.Tensor, hi: torch.Tensor, y: torch.Tensor, level: float) -> torch.Tensor:
    """Interval (Winkler) score per image: width plus 2/alpha times the distance by which y misses
    (lower is better; rewards narrow intervals only if they still cover)."""
    alpha = 1.0 - level
    width = hi - lo
    return width + (2.0 / alpha) * ((lo - y).clamp_min(0) + (y - hi).clamp_min(0))


def interval_scores(m: mx.Mixture, y: torch.Tensor, calibration: Calibration, levels=DEFAULT_LEVELS) -> dict[str, float]:
    """Coverage, mean width and mean Winkler score of the reported central interval at each level,
    and coverage and mean total length of the reported highest-density region."""
    out: dict[str, float] = {}
    scores = mx.hdr_score(m, y)
    for level in levels:
        key = level_key(level)
        lo, hi = calibration.interval(m, level)
        out[f"coverage_{key}"] = float(((y >= lo) & (y <= hi)).double().mean())
        out[f"width_{key}"] = float((hi - lo).mean())
        out[f"winkler_{key}"] = float(winkler(lo, hi, y, level).mean())
        # y lies in the HDR of mass a exactly when its HDR score is at most a
        out[f"hdr_coverage_{key}"] = float((scores <= calibration.hdr_level(level)).double().mean())
        out[f"hdr_width_{key}"] = sum(sum(b - a for a, b in row) for row in calibration.hdr(m, level)) / max(len(m), 1)
    return out


def score(m: mx.Mixture, y: torch.Tensor, calibration: Calibration, levels=DEFAULT_LEVELS) -> dict[str, float]:
    """All metrics of N predictions (the scaled mixture `m`) against N targets y (target units).
    NLL in nats per sample, with the Jacobian of the target transform included (a density over y,
    not over log y)."""
    y = y.double()
    mean, median = mx.mean(m), mx.median(m)
    pit = mx.cdf(m, y)
    observed = observed_coverage(pit, calibration)
    return {
        "n": int(y.numel()),
        "nll": float(-mx.log_prob(m, y).mean()),
        "crps": float(mx.crps(m, y).mean()),
        "mae_mean": float((mean - y).abs().mean()),
        "rmse_mean": float((mean - y).pow(2).mean().sqrt()),
        "mae_median": float((median - y).abs().mean()),
        "rmse_median": float((median - y).pow(2).mean().sqrt()),
        **interval_scores(m, y, calibration, levels),
        "calibration_error": sum(abs(o - c) for o, c in zip(observed, CALIBRATION_LEVELS)) / len(CALIBRATION_LEVELS),
    }


def binomial_se(p: float, n: int) -> float:
    """Standard error of an observed coverage p over n images."""
    return math.sqrt(max(p * (1 - p), 1e-12) / n) if n else math.nan


def conditional_coverage(
    m: mx.Mixture, y: torch.Tensor, calibration: Calibration, by: torch.Tensor, bins: int = 10, levels=DEFAULT_LEVELS
) -> list[dict]:
    """Coverage and mean width of each reported interval within each of `bins` equal-count bins of
    `by` (the true target, or the predicted std): where average calibration can hide intervals
    that are too wide for some images and too narrow for others."""
    order = torch.argsort(by, stable=True)
    intervals = {level: calibration.interval(m, level) for level in levels}
    rows = []
    for chunk in torch.tensor_split(order, min(bins, len(order))):
        if chunk.numel() == 0:
            continue
        row: dict = {"low": float(by[chunk].min()), "high": float(by[chunk].max()), "n": int(chunk.numel())}
        for level, (lo, hi) in intervals.items():
            key = level_key(level)
            inside = (y[chunk] >= lo[chunk]) & (y[chunk] <= hi[chunk])
            row[f"coverage_{key}"] = float(inside.double().mean())
            row[f"width_{key}"] = float((hi[chunk] - lo[chunk]).mean())
        rows.append(row)
    return rows
