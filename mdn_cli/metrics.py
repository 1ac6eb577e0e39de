"""Proper scores, interval coverage and calibration of predictive mixtures against observed
targets, in target units. Intervals are the reported ones: made by the checkpoint's calibration
(a `Calibrated`: the scaled mixtures and the calibration set of each row)."""

from __future__ import annotations

import math

import torch

from . import mixture as mx
from .calibration import DEFAULT_LEVELS, Calibrated, level_key
from .modes import hdr_score

# Central-interval levels behind the calibration error and the reliability diagram.
CALIBRATION_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def observed_coverage(pit: torch.Tensor, pred: Calibrated, levels=CALIBRATION_LEVELS) -> list[float]:
    """Observed coverage of the reported central interval at each level, from PIT values: y lies in
    [Q(a), Q(b)] exactly when a <= F(y) <= b, so no quantile needs computing."""
    out = []
    for level in levels:
        lo, hi = pred.interval_probs(level)
        out.append(float(((pit >= lo) & (pit <= hi)).double().mean()))
    return out


def winkler(lo: torch.Tensor, hi: torch.Tensor, y: torch.Tensor, level: float) -> torch.Tensor:
    """Interval (Winkler) score per image: width plus 2/alpha times the distance by which y misses
    (lower is better; rewards narrow intervals only if they still cover)."""
    alpha = 1.0 - level
    width = hi - lo
    return width + (2.0 / alpha) * ((lo - y).clamp_min(0) + (y - hi).clamp_min(0))


def interval_scores(pred: Calibrated, y: torch.Tensor, levels=DEFAULT_LEVELS) -> dict[str, float]:
    """Coverage, mean width and mean Winkler score of the reported central interval at each level,
    and coverage and mean total length of the reported highest-density region."""
    out: dict[str, float] = {}
    scores = hdr_score(pred.mixture, y)
    for level in levels:
        key = level_key(level)
        lo, hi = pred.interval(level)
        out[f"coverage_{key}"] = float(((y >= lo) & (y <= hi)).double().mean())
        out[f"width_{key}"] = float((hi - lo).mean())
        out[f"winkler_{key}"] = float(winkler(lo, hi, y, level).mean())
        # y lies in the HDR of mass a exactly when its HDR score is at most a
        out[f"hdr_coverage_{key}"] = float((scores <= pred.hdr_level(level)).double().mean())
        out[f"hdr_width_{key}"] = sum(sum(b - a for a, b in row) for row in pred.hdr(level)) / max(len(pred), 1)
    return out


def score(pred: Calibrated, y: torch.Tensor, levels=DEFAULT_LEVELS) -> dict[str, float]:
    """All metrics of N predictions against N targets y (target units). NLL in nats per sample,
    with the Jacobian of the target transform included (a density over y, not over log y)."""
    y = y.double()
    m = pred.mixture
    mean, median = mx.mean(m), mx.median(m)
    observed = observed_coverage(mx.cdf(m, y), pred)
    return {
        "n": int(y.numel()),
        "nll": float(-mx.log_prob(m, y).mean()),
        "crps": float(mx.crps(m, y).mean()),
        "mae_mean": float((mean - y).abs().mean()),
        "rmse_mean": float((mean - y).pow(2).mean().sqrt()),
        "mae_median": float((median - y).abs().mean()),
        "rmse_median": float((median - y).pow(2).mean().sqrt()),
        **interval_scores(pred, y, levels),
        "calibration_error": sum(abs(o - c) for o, c in zip(observed, CALIBRATION_LEVELS)) / len(CALIBRATION_LEVELS),
    }


def binomial_se(p: float, n: int) -> float:
    """Standard error of an observed coverage p over n images."""
    return math.sqrt(max(p * (1 - p), 1e-12) / n) if n else math.nan


def homogeneity(covered: torch.Tensor, cells: torch.Tensor) -> dict:
    """Pearson's chi-square test that coverage is the same in every cell: statistic, degrees of
    freedom and p-value (small p: the cells' coverages differ by more than chance)."""
    names = cells.unique()
    if len(names) < 2:
        return {"chi2": 0.0, "df": 0, "p_value": 1.0}
    rate = covered.double().mean()
    chi2 = 0.0
    for name in names:
        rows = cells == name
        n, hits = int(rows.sum()), float(covered[rows].double().sum())
        for observed, share in ((hits, rate), (n - hits, 1.0 - rate)):
            expected = n * float(share)
            if expected > 0:
                chi2 += (observed - expected) ** 2 / expected
    df = len(names) - 1
    p = float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), torch.tensor(chi2 / 2.0, dtype=torch.float64)))
    return {"chi2": chi2, "df": df, "p_value": p}


def equal_count_bins(by: torch.Tensor, bins: int) -> torch.Tensor:
    """(N,) bin index 0..bins-1 of each value: equal-count bins of `by` (ties kept in order)."""
    order = torch.argsort(by, stable=True)
    index = torch.empty(len(by), dtype=torch.long)
    for i, chunk in enumerate(torch.tensor_split(order, min(bins, max(len(order), 1)))):
        index[chunk] = i
    return index


def coverage_by(pred: Calibrated, y: torch.Tensor, cells: torch.Tensor, labels: list[str] | None = None,
                levels=DEFAULT_LEVELS) -> dict:
    """Coverage (with its binomial s.e.), mean width and mean interval score of each reported
    interval within each cell (`cells`: (N,) ids), the worst cell at each level (the furthest
    below its level, in standard errors) and a homogeneity test across cells."""
    intervals = {level: pred.interval(level) for level in levels}
    rows, worst, tests = [], {}, {}
    names = cells.unique().tolist()
    for i, name in enumerate(names):
        part = cells == name
        row: dict = {"cell": labels[i] if labels else str(name), "n": int(part.sum())}
        for level, (lo, hi) in intervals.items():
            key = level_key(level)
            inside = (y[part] >= lo[part]) & (y[part] <= hi[part])
            cov = float(inside.double().mean())
            row[f"coverage_{key}"], row[f"se_{key}"] = cov, binomial_se(cov, row["n"])
            row[f"width_{key}"] = float((hi[part] - lo[part]).mean())
            row[f"winkler_{key}"] = float(winkler(lo[part], hi[part], y[part], level).mean())
        rows.append(row)
    for level, (lo, hi) in intervals.items():
        key = level_key(level)
        gap = lambda r: (r[f"coverage_{key}"] - level) / max(r[f"se_{key}"], 1e-12)  # noqa: E731
        bad = min(rows, key=gap)
        worst[key] = {"cell": bad["cell"], "coverage": bad[f"coverage_{key}"], "se": bad[f"se_{key}"], "n": bad["n"]}
        tests[key] = homogeneity((y >= lo) & (y <= hi), cells)
    return {"cells": rows, "worst": worst, "homogeneity": tests}


def conditional_coverage(pred: Calibrated, y: torch.Tensor, bins: int = 5, groups: list[str | None] | None = None,
                         levels=DEFAULT_LEVELS) -> dict:
    """Coverage within quintiles (by default) of the predicted std, of the predicted value (the
    mean) and of the true value, and within each group when there are groups: where an average
    can hide intervals too narrow for some images and too wide for others."""
    m = pred.mixture
    out = {}
    for name, by in (("by_predicted_std", mx.std(m)), ("by_predicted_value", mx.mean(m)), ("by_target", y)):
        index = equal_count_bins(by, bins)
        labels = [f"{float(by[index == i].min()):.4g}–{float(by[index == i].max()):.4g}" for i in index.unique().tolist()]
        out[name] = coverage_by(pred, y, index, labels, levels)
    if groups is not None and any(g is not None for g in groups):
        names = sorted({g for g in groups if g is not None}) + (["(none)"] if None in groups else [])
        index = torch.tensor([names.index(g if g is not None else "(none)") for g in groups], dtype=torch.long)
        out["by_group"] = coverage_by(pred, y, index, [names[i] for i in index.unique().tolist()], levels)
    return out
