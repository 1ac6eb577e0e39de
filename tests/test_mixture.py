"""mdn_cli.mixture against independent references: scipy (special functions, quad, brentq),
numpy brute force and Monte Carlo. Nothing here reuses the module's own formulas."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import integrate, optimize, special, stats

from mdn_cli.mixture import (
    Mixture,
    cdf,
    crps,
    interval,
    log_prob,
    mean,
    median,
    mixture_nll,
    quantile,
    std,
)
from mdn_cli.modes import mode

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")


P68 = (0.158655, 0.841345)  # the central 68.27% interval (mean +/- 1 sigma of a Gaussian)
P95 = (0.025, 0.975)
PROBS = (0.01, 0.025, P68[0], 0.5, P68[1], 0.975, 0.99)


def _random_cases(seed: int, mu_scale: float, s_range: tuple[float, float], prefix: str) -> dict:
    rng = np.random.default_rng(seed)
    cases = {}
    for k in range(1, 9):
        w = rng.dirichlet(np.ones(k))
        mu = rng.normal(0.0, mu_scale, k)
        s = np.exp(rng.uniform(math.log(s_range[0]), math.log(s_range[1]), k))
        cases[f"{prefix}K{k}"] = (w, mu, s)
    return cases


def _case(w, mu, s):
    return tuple(np.asarray(v, dtype=float) for v in (w, mu, s))


# Mixtures in z = y (transform "none"). Quantile probabilities stay away from the plateaus of the
# separated cases (partial weight sums 0.35, 0.25, 0.7), where the quantile is not unique.
GAUSS = {
    **_random_cases(20240611, 3.0, (0.2, 3.0), "rand"),
    "w0.999": _case([0.999, 0.001], [0.0, 4.0], [1.0, 0.5]),
    "w1e-6": _case([1 - 1e-6, 1e-6], [1.0, -3.0], [0.5, 2.0]),
    "tiny_sigma": _case([0.4, 0.6], [0.0, 3e-4], [1e-4, 1e-4]),
    "huge_sigma": _case([0.3, 0.7], [-500.0, 2000.0], [1e3, 1e3]),
    "sep100": _case([0.35, 0.65], [0.0, 100.0], [1.0, 1.0]),
    "sep_mixed": _case([0.25, 0.45, 0.3], [0.0, 1.0, 101.0], [0.01, 0.01, 1.0]),
    "tiny_and_huge": _case([0.5, 0.5], [0.0, 10.0], [1e-4, 1e3]),
}

# Mixtures in z = log y (transform "log"); stds are in log space.
LOGN = {
    **_random_cases(7, 1.0, (0.05, 0.6), "lrand"),
    "lw0.999": _case([0.999, 0.001], [0.0, 2.0], [0.3, 0.2]),
    "lw1e-6": _case([1 - 1e-6, 1e-6], [1.0, -2.0], [0.2, 0.5]),
    "ltiny_sigma": _case([0.4, 0.6], [0.0, 3e-4], [1e-4, 1e-4]),
    "lsep100": _case([0.3, 0.7], [0.0, 1.0], [0.01, 0.01]),
    "lwide": _case([0.5, 0.5], [0.0, 1.0], [1.5, 0.5]),  # heavy right tail; kept out of Monte Carlo
}


def mixture_of(params, transform: str, rows: int = 1) -> Mixture:
    w, mu, s = (torch.tensor(np.tile(v, (rows, 1)), dtype=F64) for v in params)
    return Mixture(w, mu, s, transform)


# ---- numpy / scipy references ------------------------------------------------------------------


def ref_pdf(params, t, transform="none"):
    w, mu, s = params
    t = np.asarray(t, dtype=float)[..., None]
    if transform == "log":
        return (w * stats.lognorm.pdf(t, s, scale=np.exp(mu))).sum(-1)
    return (w * np.exp(-0.5 * ((t - mu) / s) ** 2) / (s * math.sqrt(2 * math.pi))).sum(-1)


def ref_cdf(params, t, transform="none"):
    w, mu, s = params
    t = np.asarray(t, dtype=float)
    if transform == "log":
        with np.errstate(divide="ignore"):
            t = np.where(t > 0, np.log(np.maximum(t, 1e-300)), -np.inf)
    return (w * special.ndtr((t[..., None] - mu) / s)).sum(-1)


def ref_sf(params, t, transform="none"):
    w, mu, s = params
    t = np.log(t) if transform == "log" else np.asarray(t, dtype=float)
    return (w * special.ndtr((mu - t[..., None]) / s)).sum(-1)


def breakpoints(params, transform="none", extra=()):
    """Component centres and +-c std points, so quad never steps over a narrow component."""
    _, mu, s = params
    c = np.array([-14.0, -8.0, -5.0, -3.0, -1.5, 0.0, 1.5, 3.0, 5.0, 8.0, 12.0, 16.0])
    pts = (mu[:, None] + s[:, None] * c).ravel()
    if transform == "log":
        pts = np.exp(pts)
    return np.unique(np.concatenate([pts, np.asarray(extra, dtype=float)]))


def typical(params, transform="none"):
    """Order of magnitude of the target, to turn quad's relative targets into absolute ones."""
    _, mu, s = params
    return math.exp((mu + 3 * s).max()) if transform == "log" else np.abs(np.r_[mu - 3 * s, mu + 3 * s]).max()


def piecewise_quad(f, pts, scale):
    total = 0.0
    for a, b in itertools.pairwise(pts):
        total += integrate.quad(f, a, b, epsabs=1e-15 * scale, epsrel=1e-12, limit=200)[0]
    return total


def ref_quantile(params, p, transform="none"):
    _, mu, s = params
    lo, hi = (mu - 40 * s).min(), (mu + 40 * s).max()
    if transform == "log":
        lo, hi = math.exp(lo), math.exp(hi)
    tol = {"xtol": 1e-300, "rtol": 4 * np.finfo(float).eps}
    return optimize.brentq(lambda t: ref_cdf(params, t, transform) - p, lo, hi, **tol)


def ref_moments(params, transform="none"):
    pts, scale = breakpoints(params, transform), typical(params, transform)
    m1 = piecewise_quad(lambda t: t * ref_pdf(params, t, transform), pts, scale)
    var = piecewise_quad(lambda t: (t - m1) ** 2 * ref_pdf(params, t, transform), pts, scale**2)
    return m1, math.sqrt(var)


def ref_crps(params, y, transform="none"):
    """int (F(t) - 1{t >= y})^2 dt: F^2 below y, and the survival function squared above y (not
    (1 - F)^2, which would lose the upper tail to rounding)."""
    pts = breakpoints(params, transform, extra=[y] if transform == "none" or y > 0 else [])
    scale = typical(params, transform)
    below, above = pts[pts <= y], pts[pts >= y]
    total = piecewise_quad(lambda t: ref_cdf(params, t, transform) ** 2, below, scale) if len(below) > 1 else 0.0
    total += piecewise_quad(lambda t: ref_sf(params, t, transform) ** 2, above, scale) if len(above) > 1 else 0.0
    # Only under "log" with y <= 0 can y lie below every breakpoint: on [y, pts[0]] F is 0 (or
    # below Phi(-14)), so the integrand is 1 there.
    return total + max(0.0, pts[0] - y)

def ref_density_peak(params, lo, hi, transform):
    """Root of the density's derivative in [lo, hi]. For "log", p_y(t) = f(log t) / t has slope
    (f'(u) - f(u)) / t^2 at u = log t, with f the Gaussian mixture density of z = log y."""
    w, mu, s = params

    def slope(u):
        f_k = w * np.exp(-0.5 * ((u - mu) / s) ** 2) / s
        return (f_k * (mu - u) / s**2).sum() - (f_k.sum() if transform == "log" else 0.0)

    if transform == "log":
        return math.exp(optimize.brentq(slope, math.log(lo), math.log(hi), xtol=1e-300, rtol=4 * np.finfo(float).eps))
    return optimize.brentq(slope, lo, hi, xtol=1e-300, rtol=4 * np.finfo(float).eps)


def gauss_crps_k1(mu, s, y):
    z = (y - mu) / s
    return s * (z * (2 * stats.norm.cdf(z) - 1) + 2 * stats.norm.pdf(z) - 1 / math.sqrt(math.pi))


def lognormal_crps_k1(mu, s, y):
    """Closed form for one log-normal (Baran & Lerch 2015, eq. 5)."""
    w = (math.log(y) - mu) / s
    phi = stats.norm.cdf
    return y * (2 * phi(w) - 1) - 2 * math.exp(mu + s * s / 2) * (phi(w - s) + phi(s / math.sqrt(2)) - 1)


# ---- training loss -----------------------------------------------------------------------------


def test_nll_single_gaussian_is_gaussian_nll():
    rng = np.random.default_rng(0)
    mu, s, y = rng.normal(0, 5, 50), np.exp(rng.uniform(-5, 5, 50)), rng.normal(0, 5, 50)
    logits = torch.tensor(rng.normal(0, 3, (50, 1)))
    got = mixture_nll(logits, torch.tensor(mu[:, None]), torch.tensor(s[:, None]), torch.tensor(y))
    np.testing.assert_allclose(got.numpy(), -stats.norm.logpdf(y, mu, s), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_nll_matches_brute_force_log_of_sum(k):
    rng = np.random.default_rng(k)
    logits = rng.normal(0, 2, (40, k))
    mu, s, y = rng.normal(0, 2, (40, k)), np.exp(rng.uniform(-1, 1, (40, k))), rng.normal(0, 2, 40)
    w = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    brute = -np.log((w * stats.norm.pdf(y[:, None], mu, s)).sum(-1))
    got = mixture_nll(*(torch.tensor(v) for v in (logits, mu, s, y)))
    np.testing.assert_allclose(got.numpy(), brute, rtol=1e-12)


def test_nll_finite_for_extreme_inputs_in_float32():
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, -1e4], [0.0, 0.0, 0.0], [1e4, 1e4, -1e4]])
    means = torch.tensor([[0.0, 5.0, -5.0]] * 4)
    stds = torch.tensor([[1e-4, 1e-4, 1.0], [1e-4, 1e-4, 1e-4], [1e-4, 2e-4, 1e-4], [1.0, 1e-4, 1e-4]])
    y = torch.tensor([1e3, -1e3, 3e2, 0.5])
    leaves = [t.clone().requires_grad_(True) for t in (logits, means, stds)]
    nll = mixture_nll(*leaves, y)
    assert nll.dtype == torch.float32
    assert torch.isfinite(nll).all()
    nll.sum().backward()
    for t in leaves:
        assert torch.isfinite(t.grad).all()
    # Not just finite: the value a float64 log-sum-exp gives from the same float32 inputs.
    lw = special.log_softmax(logits.double().numpy(), axis=-1)
    lc = stats.norm.logpdf(y.double().numpy()[:, None], means.double().numpy(), stds.double().numpy())
    np.testing.assert_allclose(nll.detach().double().numpy(), -special.logsumexp(lw + lc, axis=-1), rtol=1e-5)


def test_nll_half_precision_inputs_do_not_overflow():
    # |z| = 400: z**2 = 1.6e5 overflows float16 (max 65504).
    args = [torch.zeros(3, 2), torch.zeros(3, 2), torch.full((3, 2), 0.01), torch.full((3,), 4.0)]
    nll = mixture_nll(*(a.half() for a in args))
    assert nll.dtype == torch.float32 and torch.isfinite(nll).all()
    np.testing.assert_allclose(nll.numpy(), -stats.norm.logpdf(4.0, 0.0, np.float16(0.01)), rtol=1e-5)


# ---- "none": exact summaries against scipy -----------------------------------------------------


@pytest.mark.parametrize("name", GAUSS)
def test_quantiles_match_brentq_inversion(name):
    params = GAUSS[name]
    got = quantile(mixture_of(params, "none", rows=2), list(PROBS))
    assert got.shape == (2, len(PROBS)) and got.dtype == F64
    ref = np.array([ref_quantile(params, p) for p in PROBS])
    scale = params[2].min()  # absolute slack for quantiles near 0, in units of the narrowest component
    for row in got.numpy():
        np.testing.assert_allclose(row, ref, rtol=1e-9, atol=1e-9 * scale)


@pytest.mark.parametrize("name", GAUSS)
def test_mean_std_match_numerical_integration(name):
    params = GAUSS[name]
    m = mixture_of(params, "none")
    m1, sd = ref_moments(params)
    np.testing.assert_allclose(mean(m).item(), m1, rtol=1e-8, atol=1e-10 * sd)
    np.testing.assert_allclose(std(m).item(), sd, rtol=1e-8)


@pytest.mark.parametrize("name", GAUSS)
def test_crps_matches_numerical_integration(name):
    params = GAUSS[name]
    w, mu, s = params
    ys = np.array([mu[0] + 0.3 * s[0], (w * mu).sum(), mu.max() + 3 * s.max(), mu.min() - 50 * s.max()])
    got = crps(mixture_of(params, "none", rows=len(ys)), torch.tensor(ys))
    ref = np.array([ref_crps(params, y) for y in ys])
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-8)


@pytest.mark.parametrize("name", GAUSS)
def test_cdf_and_log_prob_match_scipy(name):
    params = GAUSS[name]
    w, mu, s = params
    ys = np.concatenate([mu, mu + 0.7 * s, [mu.min() - 3 * s.max()]])
    m = mixture_of(params, "none", rows=len(ys))
    np.testing.assert_allclose(cdf(m, torch.tensor(ys)).numpy(), ref_cdf(params, ys), rtol=1e-13, atol=1e-15)
    ref_lp = special.logsumexp(np.log(w) + stats.norm.logpdf(ys[:, None], mu, s), axis=-1)
    np.testing.assert_allclose(log_prob(m, torch.tensor(ys)).numpy(), ref_lp, rtol=1e-12, atol=1e-12)


def _dense_grid(params, transform):
    _, mu, s = params
    local = [mu[:, None] + s[:, None] * np.linspace(-3, 3, 2001)]
    if transform == "log":  # each log-normal peaks at exp(mu - s^2), not exp(mu)
        local.append((mu - s * s)[:, None] + s[:, None] * np.linspace(-3, 3, 2001))
    grid = np.concatenate([np.linspace((mu - 6 * s).min(), (mu + 6 * s).max(), 20001)] + [g.ravel() for g in local])
    grid = np.unique(np.exp(grid) if transform == "log" else grid)
    # Drop rounding-level near-duplicates from the overlapping grids: neighbours must be distinct.
    return grid[np.r_[True, np.diff(grid) > 1e-9 * np.maximum(np.abs(grid[1:]), s.min())]]


@pytest.mark.parametrize(
    "name, transform", [(n, "none") for n in GAUSS] + [(n, "log") for n in LOGN]
)
def test_mode_beats_dense_grid_argmax(name, transform):
    params = (GAUSS if transform == "none" else LOGN)[name]
    got = mode(mixture_of(params, transform)).item()
    grid = _dense_grid(params, transform)
    dens = ref_pdf(params, grid, transform)
    best = dens.argmax()
    # The grid max is a lower bound on the true max, so the mode must reach it...
    assert ref_pdf(params, got, transform) >= dens[best] * (1 - 1e-12)
    # ...and lie between the grid's best point's neighbours, where the density's slope changes
    # sign: brentq on that slope pins the peak to rounding level.
    lo, hi = grid[best - 1], grid[best + 1]
    assert lo <= got <= hi
    peak = ref_density_peak(params, lo, hi, transform)
    assert abs(got - peak) <= 1e-9 * abs(peak) + 1e-9 * params[2].min()



@pytest.mark.parametrize(
    "name, transform",
    [("w0.999", "none"), ("sep_mixed", "none"), ("tiny_and_huge", "none"), ("randK3", "none")]
    + [("lw1e-6", "log"), ("lrandK4", "log")],
)
def test_far_tail_quantiles_and_cdf(name, transform):
    # F(q) = 1e-12 must be solved with relative (not absolute) precision in F, and 1 - 1e-12
    # through the survival function: F itself is 1 - 1e-12 +- 1e-16 there.
    params = (GAUSS if transform == "none" else LOGN)[name]
    _, mu, s = params
    lo, hi = (mu - 40 * s).min(), (mu + 40 * s).max()
    if transform == "log":
        lo, hi = math.exp(lo), math.exp(hi)
    tol = {"xtol": 1e-300, "rtol": 4 * np.finfo(float).eps}
    probs = [1e-12, 1e-6, 1 - 1e-6, 1 - 1e-12]

    def solve(p):  # upper tails solve sf(t) = 1 - p, which is exact in floating point for p > 0.5
        if p < 0.5:
            return optimize.brentq(lambda t: ref_cdf(params, t, transform) - p, lo, hi, **tol)
        return optimize.brentq(lambda t: (1 - p) - ref_sf(params, t, transform), lo, hi, **tol)

    ref = [solve(p) for p in probs]
    got = quantile(mixture_of(params, transform), probs)[0].numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-9)
    y = (mu - 9 * s).min()  # F ~ 1e-19 here
    y = math.exp(y) if transform == "log" else y
    got_f = cdf(mixture_of(params, transform), torch.tensor([y], dtype=F64)).item()
    np.testing.assert_allclose(got_f, ref_cdf(params, y, transform), rtol=1e-10)


# ---- K = 1 closed forms --------------------------------------------------------------------------


@pytest.mark.parametrize("mu, s", [(0.0, 1.0), (3.5, 1e-4), (-200.0, 1e3), (1e4, 2.5)])
def test_single_gaussian_closed_forms(mu, s):
    rows = 5
    m = Mixture(torch.ones(rows, 1), torch.full((rows, 1), mu), torch.full((rows, 1), s))  # float32 in
    mu32, s32 = np.float64(np.float32(mu)), np.float64(np.float32(s))  # what float32 inputs hold
    y = mu32 + s32 * np.array([-3.0, -0.4, 0.0, 1.1, 7.0])
    probs = [1e-12, 0.001, 0.1, 0.5, 0.8, 0.999, 1 - 1e-12]  # far tails: both need full relative precision
    ref_q = np.tile(mu32 + s32 * stats.norm.ppf(probs), (rows, 1))
    np.testing.assert_allclose(quantile(m, probs).numpy(), ref_q, rtol=1e-12, atol=1e-10 * s32)
    np.testing.assert_allclose(median(m).numpy(), mu32, rtol=1e-12, atol=1e-12 * s32)
    lo, hi = interval(m, 0.9)
    np.testing.assert_allclose(lo.numpy(), mu32 - s32 * stats.norm.ppf(0.95), rtol=1e-12, atol=1e-10 * s32)
    np.testing.assert_allclose(hi.numpy(), mu32 + s32 * stats.norm.ppf(0.95), rtol=1e-12, atol=1e-10 * s32)
    np.testing.assert_allclose(crps(m, torch.tensor(y)).numpy(), gauss_crps_k1(mu32, s32, y), rtol=1e-10)
    np.testing.assert_allclose(mean(m).numpy(), mu32, rtol=1e-15)
    np.testing.assert_allclose(std(m).numpy(), s32, rtol=1e-14)
    np.testing.assert_allclose(mode(m).numpy(), mu32, rtol=1e-14, atol=1e-9 * s32)
    np.testing.assert_allclose(log_prob(m, torch.tensor(y)).numpy(), stats.norm.logpdf(y, mu32, s32), rtol=1e-12)


@pytest.mark.parametrize("mu, s", [(0.3, 0.5), (-2.0, 0.01), (4.0, 1.2), (0.0, 3.0)])
def test_single_lognormal_closed_forms(mu, s):
    d = stats.lognorm(s, scale=math.exp(mu))
    m = Mixture(torch.ones(4, 1, dtype=F64), torch.full((4, 1), mu, dtype=F64), torch.full((4, 1), s, dtype=F64), "log")
    y = d.ppf([0.001, 0.3, 0.5, 0.97])
    probs = [0.001, 0.1, 0.5, 0.9, 0.999]
    np.testing.assert_allclose(quantile(m, probs).numpy(), np.tile(d.ppf(probs), (4, 1)), rtol=1e-12)
    np.testing.assert_allclose(mean(m).numpy(), d.mean(), rtol=1e-13)
    np.testing.assert_allclose(std(m).numpy(), d.std(), rtol=1e-12)
    # The density of y peaks at exp(mu - s^2), below exp(median of z) = exp(mu).
    np.testing.assert_allclose(mode(m).numpy(), math.exp(mu - s * s), rtol=1e-12)
    np.testing.assert_allclose(log_prob(m, torch.tensor(y)).numpy(), d.logpdf(y), rtol=1e-12)
    ref = [lognormal_crps_k1(mu, s, v) for v in y]
    np.testing.assert_allclose(crps(m, torch.tensor(y)).numpy(), ref, rtol=1e-8)


# ---- "log": deterministic references -----------------------------------------------------------


@pytest.mark.parametrize("name", LOGN)
def test_log_quantiles_moments_crps_match_scipy(name):
    params = LOGN[name]
    w, mu, s = params
    ys = np.exp(np.array([mu[0] + 0.2 * s[0], (w * mu).sum(), mu.max() + 4 * s.max(), mu.min() - 30 * s.max()]))
    m = mixture_of(params, "log", rows=len(ys))
    q_ref = np.array([ref_quantile(params, p, "log") for p in PROBS])
    np.testing.assert_allclose(quantile(m, list(PROBS)).numpy(), np.tile(q_ref, (len(ys), 1)), rtol=1e-9)
    m1, sd = ref_moments(params, "log")
    np.testing.assert_allclose(mean(m).numpy(), m1, rtol=1e-8)
    np.testing.assert_allclose(std(m).numpy(), sd, rtol=1e-7)
    got = crps(m, torch.tensor(ys))
    ref = np.array([ref_crps(params, y, "log") for y in ys])
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-7)


def test_log_crps_for_non_positive_y():
    params = LOGN["lrandK3"]
    m = mixture_of(params, "log", rows=2)
    ys = np.array([0.0, -2.5])
    ref = np.array([ref_crps(params, y, "log") for y in ys])
    np.testing.assert_allclose(crps(m, torch.tensor(ys)).numpy(), ref, rtol=1e-8)


@pytest.mark.parametrize("name", LOGN)
def test_log_prob_includes_jacobian(name):
    params = LOGN[name]
    w, mu, s = params
    k = w.argmax()
    ys = np.exp(np.array([mu[k] + 0.3 * s[k], mu[k] - s[k]]))
    m = mixture_of(params, "log", rows=len(ys))
    lp = log_prob(m, torch.tensor(ys)).numpy()
    np.testing.assert_allclose(lp, np.log(ref_pdf(params, ys, "log")), rtol=1e-11, atol=1e-11)
    # d/dy of the module's own cdf; h is 1e-4 of the narrowest component's width in y.
    h = 1e-4 * ys * s.min()
    fd = (cdf(m, torch.tensor(ys + h)) - cdf(m, torch.tensor(ys - h))).numpy() / (2 * h)
    np.testing.assert_allclose(np.exp(lp), fd, rtol=1e-6)


def test_log_transform_outside_support():
    m = mixture_of(LOGN["lrandK2"], "log", rows=3)
    y = torch.tensor([0.0, -1.0, 1e-300], dtype=F64)
    lp, F = log_prob(m, y), cdf(m, y)
    assert torch.isneginf(lp[:2]).all() and torch.isfinite(lp[2])
    assert (F[:2] == 0).all() and F[2].item() < 1e-100


# ---- "log": Monte Carlo --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lrandK2", "lrandK3", "lrandK5", "lw0.999"])
def test_log_summaries_agree_with_monte_carlo(name):
    params = LOGN[name]
    w, mu, s = params
    n = 400_000
    rng = np.random.default_rng(11)
    comp = rng.choice(len(w), size=n, p=w)
    samples = np.exp(rng.normal(mu[comp], s[comp]))
    m = mixture_of(params, "log")
    # Tolerances are 4 standard errors of the Monte Carlo estimate: a correct implementation lands
    # outside with probability ~6e-5 per check (and the seed is fixed), while the usual mistakes
    # (exp of the z mean, E[y^2] without the s^2 terms) are off by several percent, i.e. >> 4 SE
    # at this n (SE ~ 0.1% of the mean here).
    x_bar, sd_hat = samples.mean(), samples.std()
    assert abs(mean(m).item() - x_bar) <= 4 * sd_hat / math.sqrt(n)
    m4 = ((samples - x_bar) ** 4).mean()
    se_sd = math.sqrt((m4 - sd_hat**4) / n) / (2 * sd_hat)  # delta method on the sample variance
    assert abs(std(m).item() - sd_hat) <= 4 * se_sd
    q = quantile(m, list(PROBS)).numpy()[0]
    frac_below = (samples[:, None] <= q).mean(0)
    assert np.all(np.abs(frac_below - np.array(PROBS)) <= 4 * np.sqrt(np.array(PROBS) * (1 - np.array(PROBS)) / n))


# ---- calibration sanity ----------------------------------------------------------------------------


@pytest.mark.parametrize("transform", ["none", "log"])
def test_exact_intervals_cover_and_pit_is_uniform(transform):
    # 20_000 varied bimodal mixtures, one draw from each.
    n = 20_000
    rng = np.random.default_rng(3)
    w1 = rng.uniform(0.2, 0.8, n)
    gap = rng.uniform(2.0, 6.0, n)
    centre = rng.normal(0.0, 2.0, n)
    w = np.stack([w1, 1 - w1], 1)
    mu = np.stack([centre - gap / 2, centre + gap / 2], 1)
    s = rng.uniform(0.3, 1.0, (n, 2))
    if transform == "log":
        mu, s = mu / 4, s / 4  # keep y = exp(z) within a sane range
    comp = (rng.uniform(size=n) > w1).astype(int)
    z = rng.normal(mu[np.arange(n), comp], s[np.arange(n), comp])
    y = torch.tensor(np.exp(z) if transform == "log" else z)
    m = Mixture(*(torch.tensor(v) for v in (w, mu, s)), transform)

    def within(frac, p):
        return abs(frac - p) <= 4 * math.sqrt(p * (1 - p) / n)

    q68 = quantile(m, P68)
    assert within(((y >= q68[:, 0]) & (y <= q68[:, 1])).double().mean().item(), 0.6827)
    lo95, hi95 = interval(m, 0.95)
    # (1 - 0.95) / 2 is 0.025 + 2e-17 in floating point: equal up to that.
    np.testing.assert_allclose(torch.stack([lo95, hi95], 1).numpy(), quantile(m, P95).numpy(), rtol=1e-12, atol=1e-12)
    assert within(((y >= lo95) & (y <= hi95)).double().mean().item(), 0.95)
    pit = cdf(m, y).numpy()
    assert abs(pit.mean() - 0.5) <= 4 * math.sqrt(1 / 12 / n)
    assert stats.kstest(pit, "uniform").pvalue > 1e-3


# ---- the Mixture container and batching ----------------------------------------------------------


def test_batched_rows_with_zero_weight_padding_match_single_rows():
    names = list(GAUSS)
    kmax = 8
    rows = []
    for name in names:
        w, mu, s = GAUSS[name]
        pad = kmax - len(w)
        rows.append((np.r_[w, np.zeros(pad)], np.r_[mu, np.zeros(pad)], np.r_[s, np.ones(pad)]))
    batch = Mixture(*(torch.tensor(np.stack(v)) for v in zip(*rows)))
    y = torch.tensor([GAUSS[n][1][0] + 0.5 for n in names])
    singles = [mixture_of(GAUSS[n], "none") for n in names]
    for fn in (mean, std, median, mode):
        one_by_one = torch.cat([fn(m1) for m1 in singles])
        np.testing.assert_allclose(fn(batch).numpy(), one_by_one.numpy(), rtol=1e-9, atol=1e-12)
    for fn in (cdf, crps, log_prob):
        one_by_one = torch.cat([fn(m1, y[i : i + 1]) for i, m1 in enumerate(singles)])
        np.testing.assert_allclose(fn(batch, y).numpy(), one_by_one.numpy(), rtol=1e-10, atol=1e-14)


def test_log_crps_is_chunked_in_row_order():
    names = list(LOGN)
    rng = np.random.default_rng(5)
    idx = rng.integers(0, len(names), 600)
    rows = []
    for i in idx:
        w, mu, s = LOGN[names[i]]
        pad = 8 - len(w)
        rows.append((np.r_[w, np.zeros(pad)], np.r_[mu, np.zeros(pad)], np.r_[s, np.ones(pad)]))
    m = Mixture(*(torch.tensor(np.stack(v)) for v in zip(*rows)), "log")
    y = torch.tensor(np.exp(rng.normal(0, 1, len(idx))))
    got = crps(m, y)
    for j in (0, 1, 299, 300, 301, 599):
        np.testing.assert_allclose(got[j].item(), crps(m[j], y[j : j + 1]).item(), rtol=1e-12)


def test_container_semantics():
    w = torch.tensor([[0.3, 0.7], [0.5, 0.5], [1.0, 0.0]], dtype=torch.float32)
    mu = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    s = torch.tensor([[1.0, 2.0], [0.5, 0.5], [0.1, 0.2]])
    m = Mixture(w, mu, s)
    assert m.weights.dtype == m.means.dtype == m.stds.dtype == F64
    assert len(m) == 3
    sub = m[1:]
    assert len(sub) == 2 and torch.equal(sub.means, mu[1:].double())
    assert torch.equal(m[torch.tensor([2, 0])].stds, s[[2, 0]].double())
    assert len(m[1]) == 1 and torch.equal(m[1].means, mu[1:2].double())
    wide = m.scaled(2.0)
    assert torch.equal(wide.stds, 2 * s.double()) and torch.equal(m.stds, s.double())
    np.testing.assert_allclose(std(wide[2:]).item(), 2 * np.float32(0.1), rtol=1e-12)  # weight 1 on component 0
    assert quantile(m, 0.5).shape == (3,)
    assert quantile(m, torch.tensor(0.5)).shape == (3,)
    assert quantile(m, [0.5]).shape == (3, 1)
    assert quantile(m, torch.tensor([0.1, 0.5, 0.9])).shape == (3, 3)
    assert cdf(m, torch.zeros(3, dtype=torch.float32)).dtype == F64


@pytest.mark.parametrize(
    "call",
    [
        lambda: Mixture(torch.ones(2, 1), torch.zeros(2, 1), torch.ones(2, 1), "sqrt"),
        lambda: Mixture(torch.ones(2, 2), torch.zeros(2, 1), torch.ones(2, 1)),
        lambda: quantile(Mixture(torch.ones(2, 1), torch.zeros(2, 1), torch.ones(2, 1)), 1.0),
        lambda: quantile(Mixture(torch.ones(2, 1), torch.zeros(2, 1), torch.ones(2, 1)), [0.5, 0.0]),
        lambda: interval(Mixture(torch.ones(2, 1), torch.zeros(2, 1), torch.ones(2, 1)), 1.0),
        lambda: cdf(Mixture(torch.ones(2, 1), torch.zeros(2, 1), torch.ones(2, 1)), torch.zeros(3)),
    ],
    ids=["transform", "shapes", "p=1", "p=0", "level=1", "y-shape"],
)
def test_invalid_arguments_raise_value_error(call):
    with pytest.raises(ValueError):
        call()
