"""Post-hoc calibration on held-out data.

- scale: one factor on every component std, chosen by NLL. NLL training on a network that starts
  to overfit leaves the stds too small for unseen images; a single scale fitted on the
  validation split undoes most of that without touching the means.
- conformal (optional, after the scale): split-conformal central intervals. With PIT-distance
  scores d_i = |F(y_i) - 1/2| on n held-out images, the ceil((n+1)c)/n empirical quantile q of d
  makes [Q(1/2 - q), Q(1/2 + q)] cover at least c of new exchangeable images (MAPIE PR #453).
  Only the 68% and 95% intervals change; the density, mean and std do not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import mixture as mx

# Probabilities of the reported intervals: 68% low, 68% high, 95% low, 95% high.
NOMINAL_PROBS = (*mx.P68, *mx.P95)


def conformal_probs(m: mx.Mixture, y: torch.Tensor) -> tuple[float, float, float, float]:
    """Interval probabilities with split-conformal coverage guarantees at 68.27% and 95%."""
    d = (mx.cdf(m, y) - 0.5).abs().sort().values
    n = len(d)
    probs: list[float] = []
    for lo, hi in (mx.P68, mx.P95):
        k = math.ceil((n + 1) * (hi - lo))
        q = float(d[k - 1]) if k <= n else 0.5
        q = min(q, 0.5 - 1e-9)  # too few images for the guarantee: the widest finite interval
        probs += [0.5 - q, 0.5 + q]
    return tuple(probs)  # type: ignore[return-value]


# Std scales tried when choosing the best epoch by its calibrated val NLL (steps of ~7% in log).
SELECTION_SCALES = torch.logspace(math.log10(0.25), math.log10(4.0), 41, dtype=torch.float64).tolist()


def nll_sums(m: mx.Mixture, y: torch.Tensor, scales=SELECTION_SCALES) -> list[float]:
    """Summed NLL of y under m.scaled(s) for each s: sums, so that processes can add theirs up."""
    return [float(-mx.log_prob(m.scaled(s), y).sum()) for s in scales]


@dataclass(frozen=True)
class ScaleFit:
    scale: float
    nll_before: float
    nll_after: float


def fit_sigma_scale(m: mx.Mixture, y: torch.Tensor, low: float = 0.05, high: float = 20.0) -> ScaleFit:
    """The factor s in [low, high] minimising the mean NLL of y under m.scaled(s): a log-spaced
    grid, then golden-section refinement around the best grid point (NLL is smooth in log s)."""
    y = y.double()

    def nll(log_s: float) -> float:
        return float(-mx.log_prob(m.scaled(math.exp(log_s)), y).mean())

    grid = torch.linspace(math.log(low), math.log(high), 61).tolist()
    values = [nll(g) for g in grid]
    i = min(range(len(grid)), key=values.__getitem__)
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if nll(c) < nll(d):
            b = d
        else:
            a = c
    best = (a + b) / 2
    before = nll(0.0)
    after = nll(best)
    if after > before:  # never make it worse than no calibration
        return ScaleFit(1.0, before, before)
    return ScaleFit(math.exp(best), before, after)
