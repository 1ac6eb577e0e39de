"""Post-hoc calibration: what it stores and the maths of its guarantee.

Two steps, on two disjoint splits (see splits.py):
1. scale (val split): one factor on every component std, chosen by NLL. NLL training on a network
   that starts to overfit leaves the stds too small for unseen images; one scale fitted on val
   undoes most of that without touching the means. It shapes the density, mean and std.
2. conformal (calibration split, touched by nothing else): every interval and region is made
   from the sorted calibration scores so that, for new images exchangeable with the calibration
   images, it covers at least its nominal level:
   - central interval at level c: [Q(u_(j)), Q(u_(k))], Q the mixture's quantile function and
     u_(i) the i-th smallest calibration PIT value F(y_i), with m = ceil(c (n+1)) and
     j = floor((n+1-m)/2), k = j + m. Its coverage is exactly m/(n+1): at least c and below
     c + 1/(n+1) (Vovk's conformal predictive distributions with the PIT as conformity score;
     Lei et al. 2018). u_(0) and u_(n+1) stand for an unbounded end: too few images for a level.
   - highest-density region at level c: the mixture's HDR at mass s_(m), s_(m) the m-th smallest
     calibration HDR score (the mass of the region denser than the observed value); coverage m/(n+1).
The levels are probabilities of the model's own mixture, reported with every prediction, so
anyone can rebuild the intervals from the components.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from . import mixture as mx

# The reported intervals: 68.27% (mean +/- 1 sigma of a Gaussian) and 95%.
DEFAULT_LEVELS = (0.6827, 0.95)
METHODS = ("none", "scale", "conformal")


def level_key(level: float) -> str:
    """How a level names its interval in outputs: 0.6827 -> '68', 0.95 -> '95', 0.999 -> '99.9'."""
    return "68" if abs(level - 0.6827) < 5e-5 else f"{round(level * 100, 4):g}"


def nominal_probs(level: float) -> tuple[float, float]:
    """CDF levels of the central interval holding `level` of a distribution."""
    return (1.0 - level) / 2.0, (1.0 + level) / 2.0


def conformal_ranks(n: int, level: float) -> tuple[int, int]:
    """Ranks (j, k) of the sorted calibration PITs (1-based) that bound the central interval at
    `level` from n calibration images. j = 0 means no lower bound, k = n + 1 no upper bound.
    Exact in rational arithmetic, so (n+1)*level landing on an integer is never rounded up."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}")
    m = math.ceil(Fraction(level).limit_denominator(10**12) * (n + 1))
    j = (n + 1 - m) // 2
    return j, j + m


def images_needed(level: float) -> int:
    """The fewest calibration images that give a two-sided finite interval at `level`."""
    n = 1
    while True:
        j, k = conformal_ranks(n, level)
        if j >= 1 and k <= n:
            return n
        n += 1


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


# Std scales tried when choosing the best epoch by its calibrated val NLL (steps of ~7% in log).
SELECTION_SCALES = torch.logspace(math.log10(0.25), math.log10(4.0), 41, dtype=torch.float64).tolist()


def nll_sums(m: mx.Mixture, y: torch.Tensor, scales=SELECTION_SCALES) -> list[float]:
    """Summed NLL of y under m.scaled(s) for each s: sums, so that processes can add theirs up."""
    return [float(-mx.log_prob(m.scaled(s), y).sum()) for s in scales]


@dataclass(frozen=True)
class Calibration:
    """A checkpoint's post-hoc calibration (stored as `state()` under "calibration")."""

    method: str = "none"
    """none | scale | conformal."""
    sigma_scale: float = 1.0
    """Factor on every component std, fitted on the val split (1.0: none)."""
    val_images: int = 0
    """Val images the scale was fitted on."""
    pit: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.float64))
    """Sorted PIT values F(y) of the calibration images under the scaled mixture (conformal)."""
    hdr_score: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.float64))
    """Sorted HDR scores of the calibration images (conformal)."""

    @property
    def n_images(self) -> int:
        """Calibration images behind the conformal levels (0 without them)."""
        return int(self.pit.numel())

    def interval_probs(self, level: float) -> tuple[float, float]:
        """CDF levels of the mixture at the ends of the central interval at `level`; 0.0 and 1.0
        mean an unbounded end (too few calibration images for that level)."""
        if self.method != "conformal":
            return nominal_probs(level)
        j, k = conformal_ranks(self.n_images, level)
        low = float(self.pit[j - 1]) if j >= 1 else 0.0
        high = float(self.pit[k - 1]) if k <= self.n_images else 1.0
        return low, high

    def interval(self, m: mx.Mixture, level: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The reported central interval at `level` for every row of `m` (the scaled mixture), in
        target units: (low (N,), high (N,)); an unbounded end is -inf / +inf (0 under log)."""
        lo, hi = self.interval_probs(level)
        inner = sorted({p for p in (lo, hi) if 0.0 < p < 1.0})
        quantiles = dict(zip(inner, mx.quantile(m, inner).unbind(1))) if inner else {}
        floor = 0.0 if m.transform == "log" else -math.inf

        def end(p: float) -> torch.Tensor:  # each end on its own: calibration PITs can be exactly 0 or 1
            if 0.0 < p < 1.0:
                return quantiles[p]
            return torch.full((len(m),), floor if p <= 0.0 else math.inf, dtype=torch.float64)

        return end(lo), end(hi)

    def too_few_images(self, level: float) -> bool:
        """Whether `level` needs more calibration images than there are for finite ends."""
        if self.method != "conformal":
            return False
        j, k = conformal_ranks(self.n_images, level)
        return j < 1 or k > self.n_images

    def hdr_level(self, level: float) -> float:
        """Mass of the mixture's highest-density region reported at `level` (1.0: the whole support)."""
        if self.method != "conformal" or self.hdr_score.numel() == 0:
            return level
        n = self.hdr_score.numel()
        m = math.ceil(Fraction(level).limit_denominator(10**12) * (n + 1))
        return float(self.hdr_score[m - 1]) if m <= n else 1.0

    def hdr(self, m: mx.Mixture, level: float) -> list[list[tuple[float, float]]]:
        """The reported highest-density region at `level` for every row of `m`: the smallest set
        holding the calibrated mass, as a list of (low, high) pieces in target units."""
        mass = self.hdr_level(level)
        if mass >= 1.0:  # too few calibration images for this level: the whole support
            return [[(0.0 if m.transform == "log" else -math.inf, math.inf)] for _ in range(len(m))]
        return mx.hdr(m, min(max(mass, 1e-12), 1.0 - 1e-15))

    def describe(self, levels: tuple[float, ...] = DEFAULT_LEVELS) -> dict:
        """What every prediction says about how its intervals were made (JSON-ready)."""
        probs = [p for level in levels for p in self.interval_probs(level)]
        out: dict = {"method": self.method, "n_images": self.n_images, "interval_probs": probs,
                     "sigma_scale": self.sigma_scale, "levels": list(levels)}
        if self.method == "conformal":
            out["guarantee"] = (f"split conformal on {self.n_images} calibration images: each interval covers at least its "
                                "level of new images like them (on average over images, not for each one)")
            short = [lvl for lvl in levels if self.too_few_images(lvl)]
            if short:
                out["warning"] = "; ".join(
                    f"{lvl:.4g} needs at least {images_needed(lvl)} calibration images for finite ends" for lvl in short
                )
        elif self.method == "scale":
            out["guarantee"] = "none: component stds scaled by a factor fitted on the val split"
        else:
            out["guarantee"] = "none: the model's own distribution, uncalibrated"
        return out

    def state(self) -> dict:
        return {"method": self.method, "sigma_scale": self.sigma_scale, "val_images": self.val_images,
                "pit": self.pit, "hdr_score": self.hdr_score}

    @classmethod
    def from_state(cls, state: dict) -> Calibration:
        method = str(state.get("method", "none"))
        if method not in METHODS:
            raise ValueError(f"unknown calibration method {method!r}")
        pit = torch.as_tensor(state.get("pit", torch.empty(0)), dtype=torch.float64).reshape(-1)
        hdr = torch.as_tensor(state.get("hdr_score", torch.empty(0)), dtype=torch.float64).reshape(-1)
        scale = float(state.get("sigma_scale", 1.0))
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"sigma_scale must be a positive number, got {scale}")
        for name, values in (("pit", pit), ("hdr_score", hdr)):
            if values.numel() and not (bool(((values >= 0) & (values <= 1)).all()) and bool((values.diff() >= 0).all())):
                raise ValueError(f"{name} must be sorted probabilities")
        if method == "conformal" and pit.numel() == 0:
            raise ValueError("a conformal calibration without calibration scores")
        return cls(method, scale, int(state.get("val_images", 0)), pit, hdr)
