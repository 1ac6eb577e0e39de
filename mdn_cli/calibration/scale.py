"""Std scales fitted on the val split: what shapes the predicted density before any conformal step.

NLL training on a network that starts to overfit leaves its stds too small for unseen images, and
not by the same factor everywhere: the narrowest predictions (babies' ages, say) and the two ends
of the target's range come out the most overconfident. A scale fitted on val images undoes that
without touching the means:
- constant:   one factor on every component std (s = e^theta);
- covariates: a factor that depends on the prediction itself, log s = theta . phi(c, v), with c the
              mixture's centre and v its log spread in the model's space (closed forms of the
              model's own output, computable anywhere, an exported graph included), standardised
              on val, clamped to the range seen there, phi = (1, v, c, v^2, c^2, v c).
Both are chosen by the val NLL (a small ridge keeps the covariate terms modest). Val images also
pick the epoch: they shape the model; the calibration split, which fixes the coverage, is not used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import mixture as mx

FEATURES = ("1", "v", "c", "v^2", "c^2", "v c")
RIDGE = 1e-3


def covariates(m: mx.Mixture) -> tuple[Tensor, Tensor]:
    """(centre, log spread), each (N,): the mixture's mean and log std in the model's space z."""
    return components_covariates(m.weights, m.means, m.stds)


def components_covariates(weights: Tensor, means: Tensor, stds: Tensor) -> tuple[Tensor, Tensor]:
    """`covariates` from the (N, K) components (plain tensor operations: an exported graph runs them)."""
    centre = (weights * means).sum(-1)
    var = (weights * (stds**2 + (means - centre.unsqueeze(-1)) ** 2)).sum(-1)
    return centre, 0.5 * torch.log(var)


@dataclass(frozen=True)
class StdScale:
    """log factor = coef . phi(c, v); one coefficient: a constant factor."""

    coef: tuple[float, ...] = (0.0,)
    centre: tuple[float, float, float, float] = (0.0, 1.0, -math.inf, math.inf)
    """Standardisation of c on val: (mean, sd, lowest, highest standardised value seen)."""
    spread: tuple[float, float, float, float] = (0.0, 1.0, -math.inf, math.inf)
    images: int = 0
    """Val images it was fitted on (0: not fitted)."""

    @property
    def constant(self) -> bool:
        return len(self.coef) == 1

    def features(self, m: mx.Mixture) -> Tensor:
        """phi (N, F) of each row (F = len(coef))."""
        return self.components_features(m.weights, m.means, m.stds)

    def components_features(self, weights: Tensor, means: Tensor, stds: Tensor) -> Tensor:
        """`features` from the (N, K) float64 components (plain tensor operations, for export too)."""
        if self.constant:
            return torch.ones_like(weights[:, :1])
        c, v = components_covariates(weights, means, stds)
        c = ((c - self.centre[0]) / self.centre[1]).clamp(self.centre[2], self.centre[3])
        v = ((v - self.spread[0]) / self.spread[1]).clamp(self.spread[2], self.spread[3])
        return torch.stack([torch.ones_like(c), v, c, v * v, c * c, v * c], -1)

    def components_factors(self, weights: Tensor, means: Tensor, stds: Tensor) -> Tensor:
        """(N,) factor on each row's component stds, from its (N, K) float64 components."""
        coef = torch.tensor(self.coef, dtype=torch.float64, device=weights.device)
        return torch.exp(self.components_features(weights, means, stds) @ coef)

    def factors(self, m: mx.Mixture) -> Tensor:
        """(N,) factor on each row's component stds."""
        return self.components_factors(m.weights, m.means, m.stds)

    def apply(self, m: mx.Mixture) -> mx.Mixture:
        if self.constant:
            return m.scaled(math.exp(self.coef[0])) if self.coef[0] else m
        return mx.Mixture(m.weights, m.means, m.stds * self.factors(m).unsqueeze(-1), m.transform)

    def describe(self) -> dict:
        if self.constant:
            return {"sigma_scale": math.exp(self.coef[0])}
        return {"sigma_scale": "per image", "sigma_scale_model": {"log_factor": dict(zip(FEATURES, self.coef)),
                                                                  "centre": list(self.centre), "log_spread": list(self.spread)}}

    def state(self) -> dict:
        if self.constant:
            return {"coef": list(self.coef), "images": self.images}
        return {"coef": list(self.coef), "centre": list(self.centre), "spread": list(self.spread), "images": self.images}

    @classmethod
    def from_state(cls, state: dict) -> StdScale:
        coef = tuple(float(x) for x in state["coef"])
        centre = tuple(float(x) for x in state.get("centre", (0.0, 1.0, -math.inf, math.inf)))
        spread = tuple(float(x) for x in state.get("spread", (0.0, 1.0, -math.inf, math.inf)))
        if len(coef) not in (1, len(FEATURES)) or not all(math.isfinite(x) for x in coef):
            raise ValueError(f"impossible std-scale coefficients {coef}")
        if len(centre) != 4 or len(spread) != 4 or not (centre[1] > 0 and spread[1] > 0):
            raise ValueError("impossible std-scale standardisation")
        return cls(coef, centre, spread, int(state.get("images", 0)))  # type: ignore[arg-type]

    @classmethod
    def constant_factor(cls, factor: float, images: int = 0) -> StdScale:
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"sigma_scale must be a positive number, got {factor}")
        return cls((math.log(factor),), images=images)


def _nll(m: mx.Mixture, y: Tensor) -> float:
    return float(-mx.log_prob(m, y).mean())


def fit_constant(m: mx.Mixture, y: Tensor, low: float = 0.05, high: float = 20.0) -> StdScale:
    """The factor s in [low, high] minimising the mean NLL of y under m.scaled(s): a log-spaced
    grid, then golden-section refinement around the best grid point (NLL is smooth in log s).
    Never worse than no scale."""
    y = y.double()

    def nll(log_s: float) -> float:
        return _nll(m.scaled(math.exp(log_s)), y)

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
    if nll(best) > nll(0.0):
        best = 0.0
    return StdScale((best,), images=len(y))


def fit_covariates(m: mx.Mixture, y: Tensor) -> StdScale:
    """The covariate scale if it predicts held-out val images better than a constant one, else the
    constant one. Chosen by 2-fold cross-validation on val (each half fits, the other scores), then
    refitted on all of val: six coefficients can overfit a few hundred images, where the model was
    already calibrated alike everywhere (the toy data), and must earn their place."""
    y = y.double()
    if len(y) < 8 * len(FEATURES):
        return fit_constant(m, y)
    halves = [torch.arange(i, len(y), 2) for i in (0, 1)]
    held_out = {"constant": 0.0, "covariates": 0.0}
    for fit_rows, score_rows in (halves, halves[::-1]):
        part, rest = m[fit_rows], m[score_rows]
        for name, fitter in (("constant", fit_constant), ("covariates", _fit_covariates)):
            held_out[name] += _nll(fitter(part, y[fit_rows]).apply(rest), y[score_rows]) / 2
    return _fit_covariates(m, y) if held_out["covariates"] < held_out["constant"] else fit_constant(m, y)


def _fit_covariates(m: mx.Mixture, y: Tensor) -> StdScale:
    """The covariate scale minimising the mean NLL (+ RIDGE on the non-constant terms), from the
    constant fit (LBFGS in float64); the constant fit if that is no better."""
    base = fit_constant(m, y)
    c, v = covariates(m)
    centre = (float(c.mean()), float(c.std()) or 1.0)
    spread = (float(v.mean()), float(v.std()) or 1.0)
    cs, vs = (c - centre[0]) / centre[1], (v - spread[0]) / spread[1]
    shape = StdScale(tuple([0.0] * len(FEATURES)), (*centre, float(cs.min()), float(cs.max())),
                     (*spread, float(vs.min()), float(vs.max())), len(y))
    phi = shape.features(m)
    theta = torch.zeros(len(FEATURES), dtype=torch.float64)
    theta[0] = base.coef[0]
    theta.requires_grad_(True)
    ridge = torch.tensor([0.0] + [RIDGE] * (len(FEATURES) - 1), dtype=torch.float64)
    optimizer = torch.optim.LBFGS([theta], lr=1.0, max_iter=200, tolerance_grad=1e-10, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        stds = m.stds * torch.exp(phi @ theta).unsqueeze(-1)
        z = (mx._to_z(m, mx._target(m, y)).unsqueeze(-1) - m.means) / stds
        logp = torch.logsumexp(torch.log(m.weights) - 0.5 * z * z - torch.log(stds), -1)
        loss = -logp.mean() + (ridge * theta * theta).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    fitted = StdScale(tuple(theta.detach().tolist()), shape.centre, shape.spread, len(y))
    if not all(math.isfinite(x) for x in fitted.coef) or _nll(fitted.apply(m), y) >= _nll(base.apply(m), y):
        return base
    return fitted


# Std scales tried when choosing the best epoch by its calibrated val NLL (steps of ~7% in log).
SELECTION_SCALES = torch.logspace(math.log10(0.25), math.log10(4.0), 41, dtype=torch.float64).tolist()


def nll_sums(m: mx.Mixture, y: Tensor, scales=SELECTION_SCALES) -> list[float]:
    """Summed NLL of y under m.scaled(s) for each s: sums, so that processes can add theirs up."""
    return [float(-mx.log_prob(m.scaled(s), y).sum()) for s in scales]
