"""The finite-sample maths of split conformal prediction, shared by every method.

With n calibration scores, the ceil(c (n+1))-th smallest makes a region that covers a new
exchangeable image with probability at least c and below c + 1/(n+1) (Lei et al. 2018; Vovk's
conformal predictive distributions with the PIT as conformity score). A central interval takes
its two ends from the sorted PIT values u_(j) and u_(k), with m = ceil(c (n+1)),
j = floor((n+1-m)/2) and k = j + m; u_(0) and u_(n+1) stand for an unbounded end. Ranks are
computed in rational arithmetic, so (n+1) c landing on an integer is never rounded up.
"""

from __future__ import annotations

import math
from fractions import Fraction

# The reported intervals: 68.27% (mean +/- 1 sigma of a Gaussian) and 95%.
DEFAULT_LEVELS = (0.6827, 0.95)


def level_key(level: float) -> str:
    """How a level names its interval in outputs: 0.6827 -> '68', 0.95 -> '95', 0.999 -> '99.9'."""
    return "68" if abs(level - 0.6827) < 5e-5 else f"{round(level * 100, 4):g}"


def nominal_probs(level: float) -> tuple[float, float]:
    """CDF levels of the central interval holding `level` of a distribution."""
    return (1.0 - level) / 2.0, (1.0 + level) / 2.0


def rank(n: int, level: float) -> int:
    """m = ceil(level (n + 1)): the rank of the calibration score that a one-sided region (an HDR,
    a threshold) at `level` is made from; above n, no finite region has the guarantee."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}")
    return math.ceil(Fraction(level).limit_denominator(10**12) * (n + 1))


def central_ranks(n: int, level: float) -> tuple[int, int]:
    """Ranks (j, k) of the sorted calibration PITs (1-based) that bound the central interval at
    `level` from n calibration images. j = 0 means no lower bound, k = n + 1 no upper bound."""
    m = rank(n, level)
    j = (n + 1 - m) // 2
    return j, j + m


def images_needed(level: float, central: bool = True) -> int:
    """The fewest calibration images that give finite ends at `level` (both ends of a central
    interval, or one for a region or threshold)."""
    n = 1
    while True:
        j, k = central_ranks(n, level) if central else (1, rank(n, level))
        if j >= 1 and k <= n:
            return n
        n += 1


def beta_cdf(x: float, a: int, b: int) -> float:
    """P(Beta(a, b) <= x) for whole a, b >= 1, exactly: P(Binomial(a+b-1, x) >= a)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    n, lx, l1x = a + b - 1, math.log(x), math.log1p(-x)
    terms = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * lx + (n - k) * l1x for k in range(a, n + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def beta_quantile(p: float, a: int, b: int) -> float:
    """The p-quantile of Beta(a, b) (whole a, b), by bisection on `beta_cdf`."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if beta_cdf(mid, a, b) < p else (lo, mid)
    return 0.5 * (lo + hi)


def realised_range(n: int, m: int, probability: float = 0.9) -> tuple[float, float]:
    """Where the realised coverage of a region made from the m-th smallest of n calibration scores
    lies for `probability` of calibration sets: it is Beta(m, n + 1 - m) (Vovk 2012)."""
    tail = (1.0 - probability) / 2.0
    return beta_quantile(tail, m, n + 1 - m), beta_quantile(1.0 - tail, m, n + 1 - m)
