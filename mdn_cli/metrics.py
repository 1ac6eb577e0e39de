"""Proper scores and calibration of predictive mixtures against observed targets, in target units."""

from __future__ import annotations

import torch

from . import mixture as mx

CALIBRATION_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def central_coverage(pit: torch.Tensor, levels=CALIBRATION_LEVELS) -> list[float]:
    """Observed coverage of each central interval, from PIT values: y lies inside the central
    c-interval [q((1-c)/2), q((1+c)/2)] exactly when |F(y) - 1/2| <= c/2."""
    dist = (pit - 0.5).abs()
    return [float((dist <= c / 2).double().mean()) for c in levels]


def score(m: mx.Mixture, y: torch.Tensor, interval_probs=(*mx.P68, *mx.P95)) -> dict[str, float]:
    """All metrics of N predictions against N targets y (target units). NLL in nats per sample,
    with the Jacobian of the target transform included (a density over y, not over log y).
    `interval_probs`: CDF levels of the 68% and 95% interval ends (low, high, low, high)."""
    y = y.double()
    mean, median = mx.mean(m), mx.median(m)
    lo68, hi68, lo95, hi95 = mx.quantile(m, list(interval_probs)).unbind(-1)
    pit = mx.cdf(m, y)
    observed = central_coverage(pit)
    return {
        "n": int(y.numel()),
        "nll": float(-mx.log_prob(m, y).mean()),
        "crps": float(mx.crps(m, y).mean()),
        "mae_mean": float((mean - y).abs().mean()),
        "rmse_mean": float((mean - y).pow(2).mean().sqrt()),
        "mae_median": float((median - y).abs().mean()),
        "rmse_median": float((median - y).pow(2).mean().sqrt()),
        "coverage_68": float(((y >= lo68) & (y <= hi68)).double().mean()),
        "width_68": float((hi68 - lo68).mean()),
        "coverage_95": float(((y >= lo95) & (y <= hi95)).double().mean()),
        "width_95": float((hi95 - lo95).mean()),
        "calibration_error": sum(abs(o - c) for o, c in zip(observed, CALIBRATION_LEVELS)) / len(CALIBRATION_LEVELS),
    }
