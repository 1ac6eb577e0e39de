"""Modes, highest-density regions and the HDR conformity score of mdn_cli.modes, against
independent references: densities and CDFs from scipy.stats (norm / lognorm, never the module's
own log_prob or cdf) on very fine grids, brentq, and Monte Carlo."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, optimize, special, stats

from mdn_cli.mixture import Mixture, interval
from mdn_cli.modes import hdr, hdr_score, mode, modes

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")


# ---- scipy references, in target units --------------------------------------------------------------


def ref_pdf(params, y, transform):
    w, mu, s = params
    y = np.asarray(y, dtype=float)[..., None]
    if transform == "log":
        return (w * stats.lognorm.pdf(y, s, scale=np.exp(mu))).sum(-1)
    return (w * stats.norm.pdf(y, mu, s)).sum(-1)


def ref_logpdf(params, y, transform):
    """log density of y; the grid references compare these, which do not underflow between far modes."""
    w, mu, s = params
    y = np.asarray(y, dtype=float)[..., None]
    with np.errstate(divide="ignore"):
        lw = np.log(w)
        if transform == "log":
            return special.logsumexp(lw + stats.lognorm.logpdf(y, s, scale=np.exp(mu)), axis=-1)
        return special.logsumexp(lw + stats.norm.logpdf(y, mu, s), axis=-1)


def ref_cdf(params, y, transform):
    w, mu, s = params
    y = np.asarray(y, dtype=float)[..., None]
    if transform == "log":
        return (w * stats.lognorm.cdf(y, s, scale=np.exp(mu))).sum(-1)
    return (w * stats.norm.cdf(y, mu, s)).sum(-1)


def ref_sf(params, y, transform):
    w, mu, s = params
    y = np.asarray(y, dtype=float)[..., None]
    if transform == "log":
        return (w * stats.lognorm.sf(y, s, scale=np.exp(mu))).sum(-1)
    return (w * stats.norm.sf(y, mu, s)).sum(-1)


def region_mass(params, intervals, transform):
    """Probability of a union of disjoint intervals; survival functions above the median keep
    the upper tail exact."""
    lo = np.array([a for a, _ in intervals])
    hi = np.array([b for _, b in intervals])
    upper = ref_cdf(params, lo, transform) > 0.5
    lower_part = ref_cdf(params, hi, transform) - ref_cdf(params, lo, transform)
    upper_part = ref_sf(params, lo, transform) - ref_sf(params, hi, transform)
    return float(np.where(upper, upper_part, lower_part).sum())


def fine_grid(params, transform, n=200_001, tails=7.0):
    """Grid in target units: uniform over the whole support that matters, plus 2001 points across
    +-tails stds of every component so narrow components are resolved too."""
    _, mu, s = params
    lo, hi = (mu - tails * s).min(), (mu + tails * s).max()
    local = [np.linspace(m - tails * sd, m + tails * sd, 2001) for m, sd in zip(mu, s)]
    z = np.unique(np.concatenate([np.linspace(lo, hi, n), *local]))
    # Where the grids overlap, neighbours a rounding error apart would read noise as a slope.
    z = z[np.r_[True, np.diff(z) > 1e-6 * (hi - lo) / n]]
    return np.exp(z) if transform == "log" else z


def grid_cells(params, transform):
    """The fine grid, each cell's log density at its midpoint (scipy) and its exact mass (scipy CDF)."""
    y = fine_grid(params, transform)
    return y, ref_logpdf(params, 0.5 * (y[1:] + y[:-1]), transform), np.diff(ref_cdf(params, y, transform))


_NAMED_CELLS: dict = {}


def brute_hdr(params, level, transform, cells=None):
    """Highest-density region by brute force: grid cells sorted by density, taken until their
    mass reaches `level`. Returns the intervals and the grid."""
    y, dens, cell_mass = cells or grid_cells(params, transform)
    order = np.argsort(-dens, kind="stable")
    take = np.zeros(len(dens), dtype=bool)
    take[order[: np.searchsorted(np.cumsum(cell_mass[order]), level) + 1]] = True
    edges = np.flatnonzero(np.diff(np.r_[0, take.astype(int), 0]))
    return [(y[a], y[b]) for a, b in zip(edges[::2], edges[1::2])], y


def brute_modes(params, transform):
    """Grid local maxima of the density (scipy) and the exact CDF mass between grid minima."""
    y = fine_grid(params, transform)
    d = ref_logpdf(params, y, transform)
    up = np.diff(d) > 0
    peaks = np.flatnonzero(up[:-1] & ~up[1:]) + 1
    troughs = np.flatnonzero(~up[:-1] & up[1:]) + 1
    cuts = np.r_[0.0, ref_cdf(params, y[troughs], transform), 1.0]
    # A grid minimum is within a step of the true antimode: its mass is off by at most density * step.
    slack = np.r_[0.0, ref_pdf(params, y[troughs], transform) * (y[troughs + 1] - y[troughs - 1]), 0.0]
    return y[peaks], np.diff(cuts), slack[1:] + slack[:-1], y


def density_peak(params, lo, hi, transform):
    """Root of the slope of the density of y in [lo, hi] (brentq), for "log" with the Jacobian:
    d/dy [f(log y) / y] has the sign of f'(u) - f(u), u = log y, f the mixture density of z."""
    w, mu, s = params

    def slope(u):
        f_k = w * np.exp(-0.5 * ((u - mu) / s) ** 2) / s
        return (f_k * (mu - u) / s**2).sum() - (f_k.sum() if transform == "log" else 0.0)

    tol = {"xtol": 1e-300, "rtol": 4 * np.finfo(float).eps}
    if transform == "log":
        return math.exp(optimize.brentq(slope, math.log(lo), math.log(hi), **tol))
    return optimize.brentq(slope, lo, hi, **tol)


def one(params, transform) -> Mixture:
    w, mu, s = (torch.tensor(np.asarray(v, dtype=float)[None], dtype=F64) for v in params)
    return Mixture(w, mu, s, transform)


def batch(cases, transform) -> Mixture:
    """Rows of varying K in one batch, padded with zero-weight components."""
    k = max(len(c[0]) for c in cases)
    pad = [
        (np.r_[w, np.zeros(k - len(w))], np.r_[mu, np.zeros(k - len(w))], np.r_[s, np.ones(k - len(w))])
        for w, mu, s in cases
    ]
    w, mu, s = (torch.tensor(np.stack(v), dtype=F64) for v in zip(*pad))
    return Mixture(w, mu, s, transform)


def _case(w, mu, s):
    return tuple(np.asarray(v, dtype=float) for v in (w, mu, s))


def random_cases(seed, n, transform):
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        k = int(rng.integers(1, 5))
        w = rng.dirichlet(np.ones(k))
        if transform == "log":
            mu, s = rng.normal(0.0, 0.6, k), np.exp(rng.uniform(math.log(0.05), math.log(0.8), k))
        else:
            mu, s = rng.normal(0.0, 2.0, k), np.exp(rng.uniform(math.log(0.1), math.log(2.0), k))
        cases.append(_case(w, mu, s))
    return cases


# Named shapes that exercise one thing each; stds of "log" cases are in log space.
CASES = {
    "none": {
        "sep100": _case([0.35, 0.65], [0.0, 100.0], [1.0, 1.0]),
        "overlap_one_mode": _case([0.5, 0.5], [0.0, 1.5], [1.0, 1.0]),
        "w0.999_bump": _case([0.999, 0.001], [0.0, 6.0], [1.0, 0.05]),
        "w0.999_no_bump": _case([0.999, 0.001], [0.0, 1.0], [1.0, 0.5]),
        "tiny_sigma": _case([0.4, 0.6], [1.0, 1.0006], [1e-4, 1e-4]),
        "huge_sigma": _case([0.3, 0.7], [-500.0, 4000.0], [1e3, 1e3]),
        "far_mean": _case([0.5, 0.5], [1e4, 1e4 + 5.0], [1.0, 0.5]),
        "three": _case([0.2, 0.5, 0.3], [-3.0, 0.0, 4.0], [0.5, 1.0, 0.7]),
        "wide_under_narrow": _case([0.6, 0.4], [0.0, 0.3], [0.05, 2.0]),
        # A shallow bump on the wide component (dip ~4e-3 nats) with its antimode within 1/8 of its
        # std: the critical-point grid alone misses it, the hill-climb from its mean does not.
        "shallow_bump": _case([0.26, 0.74], [0.48, -0.04], [0.1, 1.35]),
        # A mode (near -2.146, mass 0.27) beside a narrow spike, its antimode within one grid step and
        # no mean in its basin: only the probe at the extremum of g' finds it.
        "probe_needed": _case([0.089, 0.336, 0.163, 0.412], [-2.356, -2.286, 1.941, 0.851], [0.021, 1.159, 1.128, 2.919]),
        # A mode (near 0.176) whose basin holds no component mean: hill-climbs alone miss it.
        "no_mean_in_basin": _case(
            [0.19, 0.285, 0.115, 0.115, 0.295], [-0.14, 0.48, 0.34, 0.28, 0.0], [0.058, 0.089, 0.78, 0.145, 0.223]
        ),
    },
    "log": {
        "lsep": _case([0.3, 0.7], [0.0, 1.0], [0.05, 0.05]),
        "lskew": _case([1.0], [0.0], [0.8]),
        "lwide": _case([0.5, 0.5], [0.0, 1.0], [1.0, 0.3]),
        "lw0.999": _case([0.999, 0.001], [0.0, 1.0], [0.2, 0.02]),
        "ltiny_sigma": _case([0.4, 0.6], [2.0, 2.0006], [1e-4, 1e-4]),
        "lthree": _case([0.3, 0.4, 0.3], [-1.0, 0.0, 1.0], [0.15, 0.2, 0.1]),
    },
}
NAMED = [(t, n) for t in CASES for n in CASES[t]]


# ---- modes ------------------------------------------------------------------------------------------


def check_modes_against_grid(params, transform, got):
    locs, masses, slack, y = brute_modes(params, transform)
    assert len(got) == len(locs), (got, locs)
    for (loc, mass), grid_loc, grid_mass, tol in zip(got, locs, masses, slack):
        i = np.searchsorted(y, grid_loc)
        lo, hi = y[i - 1], y[i + 1]
        assert lo <= loc <= hi
        peak = density_peak(params, lo, hi, transform)
        assert abs(loc - peak) <= 1e-9 * (abs(peak) + params[2].min())
        # The grid antimode is within a grid step of the true one, where the density is lowest.
        assert abs(mass - grid_mass) <= tol + 1e-14
    assert abs(sum(mass for _, mass in got) - 1.0) <= 1e-12


@pytest.mark.parametrize("transform, name", NAMED)
def test_modes_match_grid_maxima_and_masses(transform, name):
    params = CASES[transform][name]
    check_modes_against_grid(params, transform, modes(one(params, transform))[0])


@pytest.mark.parametrize("transform", ["none", "log"])
def test_modes_of_random_mixtures_in_one_padded_batch(transform):
    cases = random_cases(11, 12, transform)
    got = modes(batch(cases, transform))
    for params, row in zip(cases, got):
        check_modes_against_grid(params, transform, row)


def test_separated_modes_carry_their_weights():
    got = modes(one(CASES["none"]["sep100"], "none"))[0]
    assert [round(loc, 9) for loc, _ in got] == [0.0, 100.0]
    np.testing.assert_allclose([mass for _, mass in got], [0.35, 0.65], rtol=0, atol=1e-12)
    got = modes(one(CASES["log"]["lsep"], "log"))[0]
    np.testing.assert_allclose([mass for _, mass in got], [0.3, 0.7], rtol=0, atol=1e-12)
    # Log-normal modes are exp(mu - s^2), not exp(mu).
    np.testing.assert_allclose([loc for loc, _ in got], np.exp([0.0 - 0.05**2, 1.0 - 0.05**2]), rtol=1e-12)


def test_overlapping_components_make_one_mode_of_mass_one():
    (loc, mass), = modes(one(CASES["none"]["overlap_one_mode"], "none"))[0]
    assert mass == pytest.approx(1.0, abs=1e-15)
    assert loc == pytest.approx(0.75, abs=1e-12)  # symmetric


def test_small_weight_mode_or_not_and_min_mass():
    # 0.001 of a narrow component 6 stds out is its own bump; 1 std out it is swallowed.
    bump = modes(one(CASES["none"]["w0.999_bump"], "none"))[0]
    # Its mass is its weight plus the big component's tail beyond the antimode (~1e-9).
    assert len(bump) == 2 and bump[1][1] == pytest.approx(0.001, rel=1e-5)
    assert len(modes(one(CASES["none"]["w0.999_no_bump"], "none"))[0]) == 1
    # min_mass drops it and gives its mass to the mode it is a shoulder of: masses still sum to 1.
    (loc, mass), = modes(one(CASES["none"]["w0.999_bump"], "none"), min_mass=1e-2)[0]
    assert mass == pytest.approx(1.0, abs=1e-15) and abs(loc) < 1e-6
    # Three modes; the light middle one merges across its higher antimode.
    params = _case([0.45, 0.005, 0.545], [0.0, 3.0, 5.0], [1.0, 0.1, 0.8])
    full = modes(one(params, "none"))[0]
    assert len(full) == 3
    merged = modes(one(params, "none"), min_mass=0.05)[0]
    assert len(merged) == 2 and sum(m for _, m in merged) == pytest.approx(1.0, abs=1e-15)
    y = np.linspace(0.0, 5.0, 200001)
    d = ref_pdf(params, y, "none")
    left_min, right_min = d[(y > 1) & (y < 3)].min(), d[(y > 3) & (y < 4.9)].min()
    joined = 0 if left_min > right_min else 2  # the neighbour across the higher antimode
    np.testing.assert_allclose(merged[0 if joined == 0 else 1][1], full[joined][1] + full[1][1], atol=1e-15)


def test_zero_weight_padding_changes_nothing():
    params = CASES["none"]["three"]
    w, mu, s = params
    # Padding components far away, narrow, or on top of a mode: none may add a mode or move an end.
    padded = one((np.r_[w, 0.0, 0.0, 0.0], np.r_[mu, 50.0, -3.0, 0.0], np.r_[s, 1e-3, 1.0, 1e-4]), "none")
    plain = one(params, "none")
    np.testing.assert_allclose(modes(padded)[0], modes(plain)[0], rtol=1e-12, atol=1e-14)
    for a, b in zip(hdr(padded, 0.8)[0], hdr(plain, 0.8)[0]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    y = torch.tensor([0.3])
    np.testing.assert_allclose(hdr_score(padded, y).numpy(), hdr_score(plain, y).numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("transform", ["none", "log"])
def test_highest_mode_agrees_with_mode(transform):
    cases = random_cases(5, 40, transform)
    m = batch(cases, transform)
    top = [max(row, key=lambda lm: ref_pdf(params, lm[0], transform))[0] for params, row in zip(cases, modes(m))]
    np.testing.assert_allclose(top, mode(m).numpy(), rtol=1e-9, atol=1e-12)


# ---- highest-density regions --------------------------------------------------------------------------


def check_hdr(params, level, transform, got, ref_steps=3, cells=None):
    """got against the brute-force HDR, then the defining properties with scipy."""
    ref, y = brute_hdr(params, level, transform, cells)
    assert len(got) == len(ref), (got, ref)
    for (a, b), (ra, rb) in zip(got, ref):
        for end, ref_end in ((a, ra), (b, rb)):
            i = np.clip(np.searchsorted(y, ref_end), ref_steps, len(y) - ref_steps - 1)
            assert y[i - ref_steps] <= end <= y[i + ref_steps], (end, ref_end)
    flat = np.array(got).ravel()
    assert np.all(np.diff(flat) > 0)  # sorted, disjoint, non-empty
    if transform == "log":
        assert flat[0] > 0
    # Exactly `level` of probability...
    assert abs(region_mass(params, got, transform) - level) <= 1e-10
    # ...bounded by one density level t: equal at every end, above it inside, below it outside.
    dens = ref_pdf(params, flat, transform)
    t = dens.mean()
    np.testing.assert_allclose(dens, t, rtol=1e-7)
    rng = np.random.default_rng(0)
    span = flat[-1] - flat[0]
    around = rng.uniform(flat[0] - span, flat[-1] + span, 2000)
    probe = np.r_[around, np.concatenate([rng.uniform(a, b, 50) for a, b in got])]
    if transform == "log":
        probe = probe[probe > 0]
    inside = np.zeros(len(probe), dtype=bool)
    for a, b in got:
        inside |= (probe >= a) & (probe <= b)
    p = ref_pdf(params, probe, transform)
    assert np.all(p[inside] >= t * (1 - 1e-6)) and np.all(p[~inside] <= t * (1 + 1e-6))


@pytest.mark.parametrize("transform, name", NAMED)
@pytest.mark.parametrize("level", [0.3, 0.6827, 0.95])
def test_hdr_matches_brute_force(transform, name, level):
    params = CASES[transform][name]
    if (transform, name) not in _NAMED_CELLS:  # one grid per case for all levels
        _NAMED_CELLS[transform, name] = grid_cells(params, transform)
    check_hdr(params, level, transform, hdr(one(params, transform), level)[0], cells=_NAMED_CELLS[transform, name])


@pytest.mark.parametrize("transform", ["none", "log"])
def test_hdr_of_random_mixtures_with_per_row_levels(transform):
    cases = random_cases(3, 12, transform)
    levels = np.random.default_rng(4).uniform(0.05, 0.99, len(cases))
    got = hdr(batch(cases, transform), torch.tensor(levels))
    for params, level, row in zip(cases, levels, got):
        check_hdr(params, level, transform, row)


def test_two_separated_components_give_two_intervals():
    got = hdr(one(CASES["none"]["sep100"], "none"), 0.6827)[0]
    assert len(got) == 2
    # Both intervals sit at the same density level: closed form for two far-apart Gaussians.
    (a0, b0), (a1, b1) = got
    assert a0 == pytest.approx(-b0, rel=1e-12) and (a1 + b1) / 2 == pytest.approx(100.0, rel=1e-14)
    r0, r1 = b0, (b1 - a1) / 2
    assert 0.35 * math.exp(-0.5 * r0**2) == pytest.approx(0.65 * math.exp(-0.5 * r1**2), rel=1e-10)
    assert 0.35 * math.erf(r0 / math.sqrt(2)) + 0.65 * math.erf(r1 / math.sqrt(2)) == pytest.approx(0.6827, abs=1e-13)
    # At 0.3 only the heavier component's interval is in.
    assert len(hdr(one(CASES["none"]["sep100"], "none"), 0.3)[0]) == 1


def test_intervals_that_meet_at_an_antimode_are_merged():
    # Two bumps with a shallow dip: at a high level the region runs through the antimode.
    params = _case([0.5, 0.5], [0.0, 1.2], [0.5, 0.5])
    assert len(modes(one(params, "none"))[0]) == 2
    low, high = hdr(one(params, "none"), 0.1)[0], hdr(one(params, "none"), 0.9)[0]
    assert len(low) == 2 and len(high) == 1
    check_hdr(params, 0.9, "none", high)


@pytest.mark.parametrize("mu, s", [(0.0, 1.0), (-3.0, 1e-4), (1e4, 1.0), (5.0, 1e3)])
@pytest.mark.parametrize("level", [1e-6, 0.5, 0.95, 1 - 1e-9])
def test_single_gaussian_hdr_is_the_central_interval(mu, s, level):
    (a, b), = hdr(one(_case([1.0], [mu], [s]), "none"), level)[0]
    half = s * stats.norm.isf((1 - level) / 2)
    assert (a, b) == pytest.approx((mu - half, mu + half), rel=0, abs=1e-13 * s + 4e-16 * abs(mu))


def test_single_gaussian_needs_one_evaluation(monkeypatch):
    # The solver starts from erfinv(level), exact for one Gaussian: one evaluation must do, also
    # far from 0 or with tiny stds, where brackets built from absolute points would round.
    import mdn_cli.modes as mx

    calls = []
    real = mx._inside_outside
    monkeypatch.setattr(mx, "_inside_outside", lambda *a: calls.append(1) or real(*a))
    for mu, s in [(0.0, 1.0), (1e4, 1.0), (-3.0, 1e-4), (5.0, 1e3)]:
        for level in (1e-6, 0.5, 1 - 1e-9):
            calls.clear()
            hdr(one(_case([1.0], [mu], [s]), "none"), level)
            assert len(calls) == 1, (mu, s, level, len(calls))


@pytest.mark.parametrize("mu, s", [(0.0, 0.8), (1.0, 0.1), (-2.0, 1.5), (0.5, 1e-3)])
@pytest.mark.parametrize("level", [1e-6, 0.5, 0.95, 1 - 1e-9])
def test_single_lognormal_hdr_is_the_shortest_interval(mu, s, level):
    # p_y(e^z) is proportional to exp(-(z - (mu - s^2))^2 / (2 s^2)): the HDR is log-symmetric about
    # the mode, [exp(c - h), exp(c + h)] with c = mu - s^2 and P(|Z + s| <= h / s) = level for a
    # standard normal Z; h by brentq, that probability by quad (exact for tiny levels too) or by
    # scipy's ndtr of the two tails.
    c = mu - s * s

    def mass(h):  # above 1/2 through the two tails, which keep their relative precision
        if level > 0.5:
            return (1.0 - level) - special.ndtr(-h / s - s) - special.ndtr(s - h / s)
        return integrate.quad(stats.norm.pdf, -h / s - s, h / s - s, epsabs=0, epsrel=1e-13)[0] - level

    h = optimize.brentq(mass, 0.0, 40.0 * s, xtol=1e-300, rtol=4 * np.finfo(float).eps)
    (a, b), = hdr(one(_case([1.0], [mu], [s]), "log"), level)[0]
    assert math.log(a) == pytest.approx(c - h, abs=1e-12 * s + 1e-9 * h)
    assert math.log(b) == pytest.approx(c + h, abs=1e-12 * s + 1e-9 * h)
    dist = stats.lognorm(s, scale=math.exp(mu))
    # The shortest interval of its probability: moving it either way makes it longer.
    for shift in (-1e-4, 1e-4):
        p_lo = dist.cdf(a) * (1 + shift)
        assert dist.ppf(p_lo + level) - dist.ppf(p_lo) > (b - a) * (1 - 1e-9)
    if level > 0.1 and s > 0.05:  # a visibly skewed log-normal: much shorter than the central interval
        central = dist.ppf([(1 - level) / 2, (1 + level) / 2])
        assert b - a < (central[1] - central[0]) * (1 - 1e-3)


@pytest.mark.parametrize("transform", ["none", "log"])
def test_hdr_never_longer_than_central_interval(transform):
    cases = random_cases(8, 40, transform)
    m = batch(cases, transform)
    for level in (0.5, 0.9):
        lo, hi = interval(m, level)
        for row, a, b in zip(hdr(m, level), lo.tolist(), hi.tolist()):
            assert sum(y1 - y0 for y0, y1 in row) <= (b - a) * (1 + 1e-12)


@pytest.mark.parametrize(
    "transform, name",
    [("none", "three"), ("none", "tiny_sigma"), ("none", "huge_sigma"), ("log", "lthree"), ("log", "lwide")],
)
@pytest.mark.parametrize("level", [1e-6, 1 - 1e-9])
def test_extreme_levels(transform, name, level):
    params = CASES[transform][name]
    got = hdr(one(params, transform), level)[0]
    assert abs(region_mass(params, got, transform) - level) <= 1e-12
    dens = ref_pdf(params, np.array(got).ravel(), transform)
    np.testing.assert_allclose(dens, dens.mean(), rtol=1e-6)
    if level < 0.5:  # around the highest mode
        (a, b), = got
        assert a < mode(one(params, transform)).item() < b


# ---- the conformity score ---------------------------------------------------------------------------


@pytest.mark.parametrize("transform", ["none", "log"])
def test_score_is_the_smallest_level_whose_hdr_holds_y(transform):
    cases = random_cases(21, 40, transform)
    m = batch(cases, transform)
    rng = np.random.default_rng(22)
    # Points drawn around the mixtures, in target units.
    lo = np.array([(mu - 3 * s).min() for _, mu, s in cases])
    hi = np.array([(mu + 3 * s).max() for _, mu, s in cases])
    z = rng.uniform(lo, hi)
    y = torch.tensor(np.exp(z) if transform == "log" else z)
    score = hdr_score(m, y)
    tiny = 1e-7
    ok = (score > tiny) & (score < 1 - tiny)
    assert int(ok.sum()) > 30
    inner = hdr(m, torch.where(ok, score - tiny, 0.5))
    outer = hdr(m, torch.where(ok, score + tiny, 0.5))

    def holds(intervals, v):
        return any(a <= v <= b for a, b in intervals)

    for i in np.flatnonzero(ok.numpy()):
        assert holds(outer[i], y[i].item()) and not holds(inner[i], y[i].item())
    # And the score is the scipy mass of the region where the density is above p(y).
    for i in np.flatnonzero(ok.numpy())[:10]:
        region = hdr(m[int(i)], score[i])[0]
        dens = ref_pdf(cases[i], np.array(region).ravel(), transform)
        np.testing.assert_allclose(dens, ref_pdf(cases[i], y[i].item(), transform), rtol=1e-7)


def ref_score(params, y, transform, grid, grid_logpdf):
    """P(p(Y) > p(y)) with scipy: the crossings of log p = log p(y), bracketed on the fine grid and
    refined by brentq, and the CDF mass between them."""
    w, mu, s = params
    ly = ref_logpdf(params, y, transform)

    def excess(t):  # log p(t) - log p(y), by hand: scipy.stats' per-call overhead is too slow for brentq
        u = math.log(t) if transform == "log" else t
        terms = np.log(w) - 0.5 * ((u - mu) / s) ** 2 - np.log(s) - 0.5 * math.log(2 * math.pi)
        return special.logsumexp(terms) - (u if transform == "log" else 0.0) - ly

    above = grid_logpdf > ly
    cells = np.flatnonzero(above[1:] != above[:-1])
    tol = {"xtol": 1e-300, "rtol": 4 * np.finfo(float).eps}
    roots = [optimize.brentq(excess, grid[i], grid[i + 1], **tol) for i in cells]
    return region_mass(params, list(zip(roots[::2], roots[1::2])), transform)


@pytest.mark.parametrize(
    "transform, name",
    [("none", "three"), ("none", "shallow_bump"), ("none", "no_mean_in_basin"), ("log", "lthree"), ("log", "lwide")]
    + [("none", "merging")],
)
def test_score_matches_scipy_around_modes_and_antimodes(transform, name):
    params = CASES[transform].get(name) or _case([0.5, 0.5], [0.0, 1.2], [0.5, 0.5])
    locs, _, _, y = brute_modes(params, transform)
    d = ref_logpdf(params, y, transform)
    troughs = y[np.flatnonzero((d[1:-1] < d[:-2]) & (d[1:-1] < d[2:])) + 1]
    step = params[2].min() * (np.array([-0.05, -1e-3, 1e-3, 0.05]))
    near = np.concatenate([troughs[:, None] + step, locs[:, None] + 6 * step]).ravel()
    if transform == "log":
        near = np.exp(np.log(np.concatenate([troughs, locs]))[:, None] + step).ravel()
    got = hdr_score(one(params, transform)[[0] * len(near)], torch.tensor(near)).numpy()
    want = [ref_score(params, v, transform, y, d) for v in near]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


def test_score_edge_values():
    m = one(_case([0.5, 0.5], [0.0, 0.5], [1.0, 0.3]), "log")
    outside = torch.tensor([0.0, -1.0, math.inf])
    assert hdr_score(batch([_case([1.0], [0.0], [1.0])] * 3, "log"), outside).tolist() == [1.0, 1.0, 1.0]
    top = mode(m)
    assert hdr_score(m, top).item() == pytest.approx(0.0, abs=1e-12)
    g = one(_case([1.0], [2.0], [3.0]), "none")
    # One Gaussian: P(|Y - mu| < |y - mu|).
    for y in (2.0 + 1e-7, 2.0 + 3.0, 2.0 - 30.0):
        expected = math.erf(abs(y - 2.0) / 3.0 / math.sqrt(2))
        assert hdr_score(g, torch.tensor([y], dtype=F64)).item() == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("transform", ["none", "log"])
def test_scores_of_draws_from_the_prediction_are_uniform(transform):
    # What makes conformal HDRs valid: under the predicted distribution, the score is Uniform(0,1).
    n = 2000
    rng = np.random.default_rng(31)
    cases = random_cases(30, n, transform)
    comp = [rng.choice(len(w), p=w) for w, _, _ in cases]
    z = np.array([rng.normal(mu[k], s[k]) for (_, mu, s), k in zip(cases, comp)])
    y = torch.tensor(np.exp(z) if transform == "log" else z)
    score = hdr_score(batch(cases, transform), y).numpy()
    assert stats.kstest(score, "uniform").pvalue > 1e-3


def test_empty_batch_and_nan():
    empty = Mixture(torch.zeros(0, 3, dtype=F64), torch.zeros(0, 3, dtype=F64), torch.ones(0, 3, dtype=F64))
    assert modes(empty) == [] and hdr(empty, 0.5) == [] and hdr_score(empty, torch.zeros(0)).shape == (0,)
    assert math.isnan(hdr_score(one(_case([1.0], [0.0], [1.0]), "none"), torch.tensor([math.nan])).item())


def test_invalid_levels_raise():
    m = one(_case([1.0], [0.0], [1.0]), "none")
    for bad in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            hdr(m, bad)
    with pytest.raises(ValueError, match="shape"):
        hdr(m, torch.tensor([0.5, 0.5]))
