"""Modes and highest-density regions of batches of 1-D Gaussian mixtures (see mixture.py).

The shape of a predicted density: its highest point (`mode`), every local maximum with the
probability it holds (`modes`), the smallest region holding a given probability (`hdr`), and the
conformity score that calibrates such regions (`hdr_score`). Deterministic, float64: safeguarded
Newton and bisection, never sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .mixture import _F64, _LOG_SQRT_2PI, Mixture, _from_z, _ndtr, _target, _to_z

def mode(m: Mixture) -> Tensor:
    """(N,) highest-density point of the density of y, in target units.

    Under "log" this maximises p_y(y) = p_z(log y) / y, i.e. log p_z(z) - z over z: not
    exp(mode of z). Hill-climbs from every component (and, for "log", from each log-normal mode
    exp(mu - s^2) as well as exp(mu)) and keeps the start that ends highest.
    """
    c = 1.0 if m.transform == "log" else 0.0  # log p_y(e^z) = log p_z(z) - c*z
    starts = torch.cat([m.means] if c == 0.0 else [m.means, m.means - m.stds**2], dim=1)  # (N, S)
    z, g = _climb(torch.log(m.weights), m.means, m.stds, starts, c)
    return _from_z(m, z.gather(-1, g.argmax(-1, keepdim=True)).squeeze(-1))


def _climb(logw: Tensor, mu: Tensor, s: Tensor, starts: Tensor, c: float) -> tuple[Tensor, Tensor]:
    """Hill-climbs of log(sum_k w_k N(z; mu_k, s_k)) - c*z from every start: (z (N, S), objective (N, S)).

    logw, mu, s: (N, K); starts: (N, S). Each step takes the better of a Newton step (where the
    objective is concave) and the EM fixed-point step of Carreira-Perpinan (2000); the latter
    maximises a minoriser of the log density, so every step goes uphill and Newton gives the fast
    final convergence. A climb ends at the local maximum whose basin holds its start.
    """
    n = mu.shape[0]
    # One hill-climb per (row, start) pair, flattened so that converged ones can drop out.
    row = torch.arange(n, device=starts.device).repeat_interleave(starts.shape[1])
    mu, s, logw = mu[row], s[row], logw[row]  # (N*S, K)
    z = starts.reshape(-1).clone()

    def objective(z: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Objective at points z (P,) of hill-climbs idx (P,) and the responsibilities (P, K)."""
        x = (z.unsqueeze(-1) - mu[idx]) / s[idx]
        lj = logw[idx] - 0.5 * x * x - torch.log(s[idx])
        lse = torch.logsumexp(lj, -1)
        return lse - c * z, torch.exp(lj - lse.unsqueeze(-1))

    active = torch.arange(z.numel(), device=z.device)
    _, resp = objective(z, active)
    for _ in range(100):
        if active.numel() == 0:
            break
        za, r, mua, iv = z[active], resp[active], mu[active], s[active] ** -2
        e = (mua - za.unsqueeze(-1)) * iv  # d/dz log N_k
        a = (r * iv).sum(-1)  # > 0, and >= -(curvature): the fixed-point step is a damped Newton step
        slope = (r * e).sum(-1)
        curv = (r * e * e).sum(-1) - slope * slope - a
        z_fp = ((r * iv * mua).sum(-1) - c) / a
        z_nt = torch.where(curv < 0, za - (slope - c) / curv, z_fp)
        g_fp, r_fp = objective(z_fp, active)
        g_nt, r_nt = objective(z_nt, active)
        # Comparing (not requiring g to rise) lets rounding-level ties at the top resolve either way.
        take_nt = g_nt >= g_fp  # False where Newton overshot to a non-finite point
        z_new = torch.where(take_nt, z_nt, z_fp)
        z[active] = z_new
        resp[active] = torch.where(take_nt.unsqueeze(-1), r_nt, r_fp)
        # Converged: the step is tiny against the local width 1/sqrt(a), or at rounding level of z.
        moving = (z_new - za).abs() > 1e-10 * a.rsqrt() + 4 * torch.finfo(_F64).eps * z_new.abs()
        active = active[moving]
    g, _ = objective(z, torch.arange(z.numel(), device=z.device))
    return z.reshape(starts.shape), g.reshape(starts.shape)


# ---- modes and highest-density regions -----------------------------------------------------------
#
# Every question here is about the shape of p_y. Under "log", p_y(e^z) = p_z(z) e^-z, and
#     w N(z; mu, s) e^-z = w e^(s^2/2 - mu) N(z; mu - s^2, s),
# so as a function of z the density of y is (up to a constant) again a Gaussian mixture: the
# "shape mixture", with means mu - s^2 (the log-normal modes) and reweighted components. All level
# sets and critical points are computed on it in z (g = its log density); all probabilities use the
# model's own mixture in z. So the density of y has at most K modes under either transform: a 1-D
# Gaussian mixture of K components has at most K (Carreira-Perpinan & Williams 2003, via
# scale-space theory); nothing below relies on that bound.

MODE_MIN_MASS = 1e-3
# A mode worth naming to a user (tables, plots, the web page): at least this much probability.
LIKELY_MASS = 0.05
"""A `min_mass` for `modes` in reports and plots: bumps holding under 0.1% of the probability are
real local maxima of the predicted density, but say nothing a reader can use."""

# Offsets, in each component's stds, at which the sign of g' is read to bracket critical points:
# every mode lies within one std of some component mean, since at a maximum
# g'' = sum_k r_k ((mu_k - z)^2 - s_k^2) / s_k^4 <= 0. See _critical_points for what else it takes.
_CRIT_GRID = torch.arange(-10, 11, dtype=_F64) / 8


def _shape_mixture(m: Mixture) -> tuple[Tensor, Tensor, Tensor]:
    """Normalised log weights, means and stds (N, K) of the mixture in z whose density is
    proportional to p_y(y(z)). Zero-weight padding keeps log weight -inf."""
    lw, mu = torch.log(m.weights), m.means
    if m.transform == "log":
        s2 = m.stds**2
        lw, mu = lw + 0.5 * s2 - m.means, m.means - s2
    return lw - torch.logsumexp(lw, -1, keepdim=True), mu, m.stds


def _shape_logpdf(lw: Tensor, mu: Tensor, s: Tensor, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """g(z), g'(z) and g''(z) of the shape mixture (lw, mu, s: (N, K)) at points z (N, P) -> three (N, P)."""
    s = s.unsqueeze(-2)
    x = (z.unsqueeze(-1) - mu.unsqueeze(-2)) / s
    lj = lw.unsqueeze(-2) - 0.5 * x * x - torch.log(s) - _LOG_SQRT_2PI
    g = torch.logsumexp(lj, -1)
    r = torch.exp(lj - g.unsqueeze(-1))  # responsibilities
    e = -x / s  # d/dz log N_k
    g1 = (r * e).sum(-1)
    return g, g1, (r * (e * e - 1.0 / (s * s))).sum(-1) - g1 * g1


@dataclass(frozen=True)
class _Critical:
    """The modes and antimodes of the density of y for a batch of N mixtures, in z.

    Row n has count[n] = J_n modes in modes[n, :J_n] (ascending) and J_n - 1 antimodes, anti[n, j]
    between modes j and j + 1; J = max J_n columns, the rest padding (g = -inf, anti = +inf).
    """

    lw: Tensor  # (N, K) shape mixture, as _shape_mixture
    mu: Tensor
    s: Tensor
    modes: Tensor  # (N, J) z
    g_modes: Tensor  # (N, J) g at the modes, -inf in padding
    anti: Tensor  # (N, J-1) z, +inf in padding
    g_anti: Tensor  # (N, J-1) g at the antimodes, -inf in padding
    count: Tensor  # (N,) number of modes
    log_resp: Tensor  # (N, J, K) log responsibilities of the shape components at each mode
    curv: Tensor  # (N, J) -g'' at each mode (>= 0)
    width: Tensor  # (N, J) local width at each mode, 1/sqrt(sum_k r_k / s_k^2): between min and max s

    def take(self, rows: Tensor) -> _Critical:
        """The same for a subset of the rows."""
        return _Critical(*(getattr(self, f.name)[rows] for f in fields(self)))

    @property
    def valid(self) -> Tensor:
        return torch.arange(self.modes.shape[1], device=self.modes.device) < self.count.unsqueeze(-1)

    @property
    def g_top(self) -> Tensor:
        return self.g_modes.amax(-1)


def _critical_points(m: Mixture) -> _Critical:
    """All local maxima of the density of y and the minima between them.

    Every sign change of g' between neighbouring points brackets one critical point, which
    safeguarded Newton on g' pins to a few ulps; the work is in choosing points that leave no mode
    and antimode together in one bracket. Three sources, each catching what the others miss:
    offsets _CRIT_GRID around every component (every mode lies within one std of a component mean);
    either side of where hill-climbs from every component mean end (a shallow bump of a wide
    component whose antimode is closer than the grid spacing: the grid alone misses one in ~100
    random mixtures); and, in cells where g' keeps its sign but g'' changes it, the extremum of g'
    (a narrow bump whose basin holds no mean: the hill-climbs alone miss one in ~1000). Against a
    dense scan of 3e4 random mixtures of 2-8 components, stds 0.01-3, 3 rows still differed, each
    by a bump with a dip under 5e-5 nats: next to flat.
    """
    lw, mu, s = _shape_mixture(m)
    n = mu.shape[0]
    # Zero-weight padding places no grid points and starts no climb: it takes the heaviest component's place.
    heavy = lw.argmax(-1, keepdim=True)
    real = lw > -math.inf
    mu_g = torch.where(real, mu, mu.gather(-1, heavy))
    s_g = torch.where(real, s, s.gather(-1, heavy))
    tops, _ = _climb(lw, mu, s, mu_g, 0.0)
    eps = 1e-4 * s_g.amin(-1, keepdim=True)
    grid = torch.cat(
        [(mu_g.unsqueeze(-1) + s_g.unsqueeze(-1) * _CRIT_GRID.to(mu.device)).reshape(n, -1), tops - eps, tops + eps],
        dim=-1,
    ).sort(-1).values
    _, g1, g2 = _shape_logpdf(lw, mu, s, grid)
    up, convex = g1 > 0, g2 > 0
    # A cell whose ends agree on the sign of g' can still hold a mode and an antimode close
    # together if g' has an extremum inside it (g'' changes sign): locate that extremum to 1/4096
    # of the cell and read the sign of g' there too.
    probe = (up[:, :-1] == up[:, 1:]) & (convex[:, :-1] != convex[:, 1:])
    p = int(probe.sum(-1).max())
    if p:
        cells = torch.argsort((~probe).to(torch.int8), dim=-1, stable=True)[:, :p]
        lo, hi = grid.gather(1, cells), grid.gather(1, cells + 1)
        convex_lo = convex.gather(1, cells)
        for _ in range(12):
            mid = 0.5 * (lo + hi)
            same = (_shape_logpdf(lw, mu, s, mid)[2] > 0) == convex_lo
            lo, hi = torch.where(same, mid, lo), torch.where(same, hi, mid)
        extra = 0.5 * (lo + hi)
        grid, order = torch.cat([grid, extra], -1).sort(-1)
        up = torch.cat([up, _shape_logpdf(lw, mu, s, extra)[1] > 0], -1).gather(1, order)
    # Left of every mean g' > 0 and right of every mean g' < 0, so the grid's first and last
    # points have those signs and the sign changes alternate max, min, ..., max: 2J - 1 of them.
    change = up[:, :-1] != up[:, 1:]
    n_crit = change.sum(-1)
    c = int(n_crit.max())
    cells = torch.argsort((~change).to(torch.int8), dim=-1, stable=True)[:, :c]  # change cells first, in order
    lo, hi = grid.gather(1, cells), grid.gather(1, cells + 1)
    up_lo = up.gather(1, cells)
    # Each bracket holds one root of g': safeguarded Newton (g'' is at hand), bisection where a
    # Newton step leaves the bracket or fails to halve the previous step (a flat, degenerate top;
    # the steep switch of g' between far-apart components), on the unfinished brackets only.
    crit, lo, hi, up_lo = (0.5 * (lo + hi)).reshape(-1), lo.reshape(-1), hi.reshape(-1), up_lo.reshape(-1)
    step = hi - lo
    row = torch.arange(n, device=mu.device).repeat_interleave(c)
    floor = 1e-9 * s_g.amin(-1)[row]
    idx = torch.nonzero((torch.arange(c, device=mu.device) < n_crit.unsqueeze(-1)).reshape(-1)).squeeze(-1)
    for _ in range(200):
        if idx.numel() == 0:
            break
        ri, x, loi, hii = row[idx], crit[idx], lo[idx], hi[idx]
        _, g1, g2 = (t.squeeze(-1) for t in _shape_logpdf(lw[ri], mu[ri], s[ri], x.unsqueeze(-1)))
        same = (g1 > 0) == up_lo[idx]
        loi, hii = torch.where(same, x, loi), torch.where(same, hii, x)
        newton = x - g1 / g2
        ok = (newton >= loi) & (newton <= hii) & ((newton - x).abs() <= 0.5 * step[idx].abs())
        new = torch.where(ok, newton, 0.5 * (loi + hii))
        # After a Newton step this small the error is ~step^2 / width: nil.
        small = (new - x).abs() <= 1e-9 * (hii - loi).clamp_min(floor[idx])
        done = (ok & small) | (hii - loi <= 4 * torch.finfo(_F64).eps * x.abs())
        crit[idx], lo[idx], hi[idx], step[idx] = new, loi, hii, new - x
        idx = idx[~done]
    crit = crit.reshape(n, c)
    count = (n_crit + 1) // 2
    j = (c + 1) // 2
    cols = torch.arange(j, device=mu.device)
    valid = cols < count.unsqueeze(-1)
    # Padding copies the row's first mode (so the formulas below stay finite) and gets g = -inf.
    modes = torch.where(valid, crit[:, 0::2], crit[:, :1])
    anti = torch.where(cols[:-1] < (count - 1).unsqueeze(-1), crit[:, 1::2], math.inf)
    g_modes, _, g2 = _shape_logpdf(lw, mu, s, modes)
    g_modes = torch.where(valid, g_modes, -math.inf)
    g_anti = torch.where(anti < math.inf, _shape_logpdf(lw, mu, s, anti.clamp_max(torch.finfo(_F64).max))[0], -math.inf)
    x = (modes.unsqueeze(-1) - mu.unsqueeze(-2)) / s.unsqueeze(-2)
    lj = lw.unsqueeze(-2) - 0.5 * x * x - torch.log(s).unsqueeze(-2)
    log_resp = lj - torch.logsumexp(lj, -1, keepdim=True)
    width = (torch.exp(log_resp) / s.unsqueeze(-2) ** 2).sum(-1).rsqrt()
    return _Critical(lw, mu, s, modes, g_modes, anti, g_anti, count, log_resp, (-g2).clamp_min(0.0), width)


def _rel_logpdf(off: Tensor, log_resp: Tensor, s: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """g(m + d) - g(m) and g'(m + d) at offsets d (...) from a mode m -> two (...).

    off = m - mu_k, log_resp = log responsibilities at m, s = s_k: (..., K) of the shape mixture.
    Written relative to the mode, g(m + d) - g(m) = log sum_k r_k exp(e_k) with r_k the
    responsibilities at m and e_k = -d (d + 2 (m - mu_k)) / (2 s_k^2), so it keeps full relative
    precision as d -> 0 (log1p / expm1 there) instead of the 1e-16 * |g| of a difference of two
    log densities: level sets close to a mode (levels ~1e-6) depend on it.
    """
    dd = d.unsqueeze(-1)
    e = -dd * (dd + 2.0 * off) / (2.0 * s * s)
    big = log_resp + e
    lse = torch.logsumexp(big, -1)
    r = torch.exp(log_resp)
    terms = torch.where(e <= 30.0, r * torch.expm1(e.clamp_max(30.0)), torch.exp(big) - r)
    near = torch.log1p(terms.sum(-1))
    dg = torch.where(lse > -0.1, near, lse)
    slope = (torch.softmax(big, -1) * (-(off + dd) / (s * s))).sum(-1)
    return dg, slope


def _mode_offsets(cp: _Critical) -> Tensor:
    """(N, J, K) m_j - mu_k for the shape mixture."""
    return cp.modes.unsqueeze(-1) - cp.mu.unsqueeze(-2)


_SIDES = (-1.0, 1.0)


def _level_set(cp: _Critical, delta: Tensor, touch: Tensor, r_start: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Where g falls to the level g(m_j) + delta_j on either side of each mode m_j.

    delta: (N, J), the level relative to each mode (the mode is inside the set where delta <= 0);
    touch: (N, J-1), whether the level is at or below antimode j, so the set runs through it.
    Returns (r, slope): r (N, J, 2) distances from the mode to the left and right ends of its
    interval (to the antimode where it touches one; NaN for modes above which the level lies),
    slope (N, J, 2) g' at the ends. r_start: distances from a nearby level, to start Newton from.
    Safeguarded Newton on sqrt(g(m) - g(m + d)), which is close to linear in |d| for each
    Gaussian, inside a bracket that bisection keeps.
    """
    n, j = cp.modes.shape
    dev = cp.modes.device
    sides = torch.tensor(_SIDES, dtype=_F64, device=dev)
    active = (delta <= 0) & cp.valid
    edge = torch.full((n, 1), math.inf, dtype=_F64, device=dev)
    neighbour = torch.stack([torch.cat([-edge, cp.anti], 1), torch.cat([cp.anti, edge], 1)], -1)  # (N, J, 2)
    no = torch.zeros((n, 1), dtype=torch.bool, device=dev)
    touching = torch.stack([torch.cat([no, touch], 1), torch.cat([touch, no], 1)], -1) & active.unsqueeze(-1)
    # Beyond the outermost modes, g < level wherever every component's own log density is below it
    # (the weights sum to 1): past mu_k +- s_k sqrt(2 (g_k(peak) - level)) for every k.
    level = (cp.g_modes + delta).unsqueeze(-1)  # (N, J, 1)
    log_s = torch.log(cp.s).unsqueeze(-2)
    rad2 = 2.0 * (-level - log_s - _LOG_SQRT_2PI)
    # Near a peak rad2 is a difference of O(1) numbers: pad it by their rounding so the bound holds.
    rad2 = rad2 + 16 * torch.finfo(_F64).eps * (level.abs() + log_s.abs() + 1.0)
    reaches = (rad2 >= 0) & (cp.lw.unsqueeze(-2) > -math.inf)
    reach = cp.s.unsqueeze(-2) * rad2.clamp_min(0.0).sqrt()
    # Measured from the mode (m - mu_k + reach_k), not as points: mu + reach would round to the
    # ulp of a far-off z (1e-12 at 1e4), which can put the bound inside the root. 1e-12 spare.
    off = _mode_offsets(cp)
    left = torch.where(reaches, off + reach, -math.inf).amax(-1)
    right = torch.where(reaches, reach - off, -math.inf).amax(-1)
    r_tail = torch.stack([left, right], -1).clamp_min(0.0) * (1 + 1e-12)
    r_max = torch.where(neighbour.isfinite(), (neighbour - cp.modes.unsqueeze(-1)).abs(), r_tail)

    target = (-delta).clamp_min(0.0).sqrt().unsqueeze(-1)  # (N, J, 1)
    width = cp.width.unsqueeze(-1)
    guess = target * torch.where(cp.curv > 0, (2.0 / cp.curv).sqrt(), math.sqrt(2.0) * cp.width).unsqueeze(-1)
    if r_start is not None:
        guess = torch.where(r_start.isfinite() & (r_start > 0), r_start, guess)
    solved = active.unsqueeze(-1) & ~touching & (target > 0) & (r_max > 0)
    # Newton on the unfinished ends only: (N, J, 2) flattened to E ends, K components each.
    k = cp.mu.shape[1]
    flat = (n, j, 2, k)
    off = off.unsqueeze(2).expand(flat).reshape(-1, k)
    log_resp = cp.log_resp.unsqueeze(2).expand(flat).reshape(-1, k)
    s = cp.s[:, None, None, :].expand(flat).reshape(-1, k)
    side = sides.expand(n, j, 2).reshape(-1)
    target, width = target.expand(n, j, 2).reshape(-1), width.expand(n, j, 2).reshape(-1)
    hi = r_max.reshape(-1).clone()
    lo = torch.zeros_like(hi)
    guess = guess.expand(n, j, 2).reshape(-1)
    r = torch.where((guess > lo) & (guess < hi), guess, 0.5 * (lo + hi))
    slope = torch.zeros_like(r)
    idx = torch.nonzero(solved.reshape(-1)).squeeze(-1)
    for _ in range(100):
        if idx.numel() == 0:
            break
        ri, loi, hii, ti = r[idx], lo[idx], hi[idx], target[idx]
        dg, sl = _rel_logpdf(off[idx], log_resp[idx], s[idx], side[idx] * ri)
        root = (-dg).clamp_min(0.0).sqrt()
        psi = root - ti
        inside = psi < 0
        loi, hii = torch.where(inside, ri, loi), torch.where(inside, hii, ri)
        # d psi / dr = -(side * g') / (2 root); where root is 0 the Newton step is not finite and bisection takes over.
        r_nt = ri - psi * 2.0 * root / (-(side[idx] * sl))
        ok = r_nt.isfinite() & (r_nt >= loi) & (r_nt <= hii)
        r_new = torch.where(ok, r_nt, 0.5 * (loi + hii))
        # psi curves on the scale of the local width, so after a Newton step of h the error is
        # ~h^2 / width: this h leaves ~1e-16 r, the relative precision tiny levels need.
        converged = ok & ((r_new - ri).abs() <= 1e-8 * (ri * width[idx]).sqrt())
        done = converged | (hii - loi <= 4 * torch.finfo(_F64).eps * hii)
        r[idx], lo[idx], hi[idx], slope[idx] = r_new, loi, hii, sl
        idx = idx[~done]
    r, slope = r.reshape(n, j, 2), slope.reshape(n, j, 2)
    r = torch.where(solved, r, torch.where(touching, r_max, 0.0))
    r = torch.where(active.unsqueeze(-1), r, math.nan)
    return r, torch.where(solved, slope, 0.0)


def _ends_std(m: Mixture, cp: _Critical, r: Tensor) -> Tensor:
    """The interval ends m_j -+ r_j in each model component's stds: (N, J, 2, K); 0 where r is NaN.

    Computed from (m_j - mu_k) -+ r rather than from the end itself, so that an end a few ulps of
    m_j away from a far-off mode (means ~1e4, stds ~1e-4) keeps its exact probability.
    """
    sides = torch.tensor(_SIDES, dtype=_F64, device=r.device)
    off = (cp.modes.unsqueeze(-1) - m.means.unsqueeze(-2)).unsqueeze(-2)  # (N, J, 1, K)
    return (off + torch.nan_to_num(sides * r).unsqueeze(-1)) / m.stds.unsqueeze(-2).unsqueeze(-2)


def _between(m: Mixture, xa: Tensor, xb: Tensor) -> Tensor:
    """Probability between two points given in each component's stds (..., K), xa <= xb -> (...).

    Each component's share comes from the tail it lies in, so tail probabilities keep their
    relative precision (F(b) - F(a) would leave them an absolute 1e-16).
    """
    part = torch.where(xa > 0, _ndtr(-xa) - _ndtr(-xb), _ndtr(xb) - _ndtr(xa))
    return (m.weights.view(-1, *([1] * (xa.ndim - 2)), m.weights.shape[-1]) * part).sum(-1)


def _inside_outside(m: Mixture, x: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
    """(N,) probabilities inside and outside the union of the active modes' intervals, x as _ends_std.

    Outside: below the first interval, in the gaps between consecutive active intervals (0 where
    they meet at an antimode) and above the last, each from its own tail: near-1 levels need it.
    """
    j = active.shape[1]
    inside = torch.where(active, _between(m, x[:, :, 0], x[:, :, 1]), 0.0).sum(-1)
    # The right end of the closest active interval to the left of each mode, -inf for none.
    key = torch.where(active, torch.arange(j, device=x.device), -1)
    last = key.cummax(-1).values
    prev = torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], 1)
    right = x[:, :, 1]  # (N, J, K)
    prev_right = right.gather(1, prev.clamp_min(0).unsqueeze(-1).expand_as(right))
    prev_right = torch.where((prev >= 0).unsqueeze(-1), prev_right, -math.inf)
    gaps = torch.where(active, _between(m, prev_right, x[:, :, 0]), 0.0).sum(-1)
    top = right.gather(1, last[:, -1:].clamp_min(0).unsqueeze(-1).expand(-1, 1, right.shape[-1])).squeeze(1)
    above = _between(m, top.unsqueeze(1), torch.full_like(top, math.inf).unsqueeze(1)).squeeze(1)
    return inside, torch.where(last[:, -1] >= 0, gaps + above, 1.0)


def _levels(m: Mixture, level: float | Tensor) -> Tensor:
    level = torch.as_tensor(level, dtype=_F64, device=m.means.device)
    if level.ndim == 0:
        level = level.expand(len(m))
    if level.shape != (len(m),):
        raise ValueError(f"HDR level must be a float or have shape ({len(m)},), got {tuple(level.shape)}")
    if not bool(((level > 0) & (level < 1)).all()):
        lo, hi = level.min().item(), level.max().item()
        raise ValueError(f"HDR levels must lie strictly between 0 and 1, got min {lo}, max {hi}")
    return level


def _hdr_radii(m: Mixture, cp: _Critical, level: Tensor) -> tuple[Tensor, Tensor]:
    """Solve P({g >= g_top - v^2}) = level for v: the radii r (N, J, 2) and touch (N, J-1) there.

    The probability grows with v from 0 (v = 0: the highest mode alone) to 1, as erf(v) for one
    Gaussian. Newton on it, with d P / dv = 2 v sum over the ends of p(end) / |g'(end)|, inside a
    bracket kept by bisection (or doubling v while there is no upper bracket yet) wherever Newton
    leaves it or fails to halve |f|. Only the rows still unsolved are evaluated.
    """
    n = len(m)
    dev = m.means.device
    upper = level > 0.5
    # Relative to the probability solved for; 4e-16 is the rounding floor of the inside probability.
    tol = 1e-13 * torch.minimum(level, 1.0 - level) + torch.where(upper, 0.0, 4e-16)
    gap = cp.g_top.unsqueeze(-1) - cp.g_modes  # (N, J): how far below the top each mode is; +inf padding
    anti_gap = cp.g_anti - cp.g_top.unsqueeze(-1)  # (N, J-1), -inf padding

    def evaluate(rows: Tensor, v: Tensor, r_start: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """f(v), increasing in v and 0 at the solution, its derivative, and the radii and touch at v."""
        sub, msub = cp.take(rows), m[rows]
        u = -(v * v).unsqueeze(-1)
        touch = anti_gap[rows] >= u
        r, slope = _level_set(sub, u + gap[rows], touch, r_start)
        x = _ends_std(msub, sub, r)
        inside, outside = _inside_outside(msub, x, ~r[..., 0].isnan())
        # Above 1/2 solve on the probability outside: 1 - level is exact there, and so is outside.
        f = torch.where(upper[rows], (1.0 - level[rows]) - outside, inside - level[rows])
        s = msub.stds.unsqueeze(-2).unsqueeze(-2)
        logp = torch.logsumexp(torch.log(msub.weights).unsqueeze(-2).unsqueeze(-2) - 0.5 * x * x - torch.log(s), -1)
        # Ends pinned to an antimode (or to the mode itself) do not move with v.
        speed = torch.where(slope != 0, torch.exp(logp - _LOG_SQRT_2PI) / slope.abs(), 0.0)
        return f, 2.0 * v * speed.sum((-1, -2)), r, touch

    def full(value: float) -> Tensor:
        return torch.full((n,), value, dtype=_F64, device=dev)

    # P has kinks where a mode joins (v^2 = gap_j) and where two intervals meet (v^2 = -anti_gap):
    # evaluating there first leaves a bracket on one smooth piece, where Newton converges fast.
    kinks = torch.cat([gap, -anti_gap], 1).sqrt()  # (N, 2J-1); inf for padding
    v = torch.special.erfinv(level).clamp_min(1e-300)
    v_lo, v_hi, f_prev = full(0.0), full(math.inf), full(math.inf)
    j = cp.modes.shape[1]
    r_out = torch.full((n, j, 2), math.nan, dtype=_F64, device=dev)
    touch_out = torch.zeros((n, max(j - 1, 0)), dtype=torch.bool, device=dev)
    r_start = r_out.clone()
    rows = torch.arange(n, device=dev)
    for _ in range(200):
        vr = v[rows]
        f, df, r, touch = evaluate(rows, vr, r_start[rows])
        r_out[rows], touch_out[rows] = r, touch
        below = f < 0
        lo, hi = torch.where(below, vr, v_lo[rows]), torch.where(below, v_hi[rows], vr)
        v_nt = vr - f / df
        ok = v_nt.isfinite() & (v_nt > lo) & (v_nt < hi) & (f.abs() <= 0.5 * f_prev[rows].abs())
        v_new = torch.where(ok, v_nt, torch.where(hi.isfinite(), 0.5 * (lo + hi), 2.0 * vr))
        k = kinks[rows]
        inner = (k > lo.unsqueeze(-1) * (1 + 1e-9)) & (k < hi.unsqueeze(-1) * (1 - 1e-9))
        nearest = torch.where(inner, (k - v_new.unsqueeze(-1)).abs(), math.inf).argmin(-1, keepdim=True)
        kink = k.gather(-1, nearest).squeeze(-1)
        # Just past the kink: exactly at it, an end sits on an antimode, a double root of g - level.
        v_new = torch.where(inner.any(-1), torch.minimum(kink * (1 + 1e-8), 0.5 * (kink + hi)), v_new)
        v_lo[rows], v_hi[rows], f_prev[rows] = lo, hi, f
        done = (f.abs() <= tol[rows]) | (hi.isfinite() & (hi - lo <= 4 * torch.finfo(_F64).eps * hi))
        # Start the next Newton on the radii from these, scaled as sqrt(-delta) for each mode.
        scale = ((v_new * v_new).unsqueeze(-1) - gap[rows]).sqrt() / ((vr * vr).unsqueeze(-1) - gap[rows]).sqrt()
        r_start[rows] = r * scale.unsqueeze(-1)
        v[rows] = v_new
        rows = rows[~done]
        if rows.numel() == 0:
            break
    return r_out, touch_out


def _row_lists(values: list, count: list) -> list:
    return [row[:c] for row, c in zip(values, count)]


def modes(m: Mixture, min_mass: float = 0.0) -> list[list[tuple[float, float]]]:
    """Every local maximum of the density of y, per row: [(location in target units, mass), ...].

    Sorted by location. The mass of a mode is the probability between the antimodes (density
    minima) on either side of it, -inf (0 under "log") and +inf at the ends, so a row's masses sum
    to 1; a single Gaussian or log-normal has one mode of mass 1, two well separated components
    two modes whose masses are their weights.
    min_mass: modes lighter than this are dropped, each merged into the neighbour across its
    higher antimode (the mode it is a shoulder of), lightest first, so the masses still sum to 1.
    The default 0 reports every local maximum, because the maths here is exact: a shallow bump
    of a predicted density is a real one. Reports and plots pass MODE_MIN_MASS (1e-3).
    """
    if len(m) == 0:
        return []
    cp = _critical_points(m)
    x = (cp.anti.unsqueeze(-1) - m.means.unsqueeze(-2)) / m.stds.unsqueeze(-2)
    below = (m.weights.unsqueeze(-2) * _ndtr(x)).sum(-1).clamp(0.0, 1.0)  # (N, J-1); 1 in padding
    one = torch.ones((len(m), 1), dtype=_F64, device=below.device)
    edges = torch.cat([0.0 * one, below, one], 1)
    mass = edges[:, 1:] - edges[:, :-1]
    count = cp.count.tolist()
    locs = _row_lists(_from_z(m, cp.modes).tolist(), count)
    masses = _row_lists(mass.tolist(), count)
    heights = _row_lists(cp.g_anti.tolist(), [c - 1 for c in count])
    out = []
    for loc, mass_row, anti in zip(locs, masses, heights):
        while len(mass_row) > 1 and min(mass_row) < min_mass:
            i = min(range(len(mass_row)), key=mass_row.__getitem__)
            # Merge across the higher of its antimodes: anti[i - 1] on the left, anti[i] on the right.
            left = i == len(mass_row) - 1 or (i > 0 and anti[i - 1] >= anti[i])
            into = i - 1 if left else i + 1
            mass_row[into] += mass_row[i]
            del loc[i], mass_row[i], anti[i - 1 if left else i]
        out.append(list(zip(loc, mass_row)))
    return out


def hdr(m: Mixture, level: float | Tensor) -> list[list[tuple[float, float]]]:
    """Highest-density region of probability `level`, per row: sorted, disjoint [(low, high), ...].

    The smallest set holding probability `level`: {y : p_y(y) >= t} with t chosen so that its
    probability is `level`, in target units and for the density of y (under "log" the Jacobian
    counts, so even one log-normal's HDR is not its central interval; low > 0). For a multimodal
    prediction it is one interval per mode that reaches above t, merged where they meet at an
    antimode, and it is never longer in total than the central interval of the same level.
    level: a float in (0, 1) or a tensor of N per-row levels. Mass matches `level` to ~1e-13 and
    the ends are exact to ~1e-12 of the local std (the ulp of a far-off y aside).
    """
    level = _levels(m, level)
    if len(m) == 0:
        return []
    cp = _critical_points(m)
    r, touch = _hdr_radii(m, cp, level)
    sides = torch.tensor(_SIDES, dtype=_F64, device=r.device)
    ends = _from_z(m, cp.modes.unsqueeze(-1) + sides * r).tolist()  # (N, J, 2), NaN for modes below t
    active = (~r[..., 0].isnan()).tolist()
    touch = touch.tolist()
    out = []
    for row_ends, row_active, row_touch in zip(ends, active, touch):
        intervals: list[tuple[float, float]] = []
        for j, (lo, hi) in enumerate(row_ends):
            if not row_active[j]:
                continue
            if intervals and row_touch[j - 1]:  # meets the previous interval at antimode j - 1
                intervals[-1] = (intervals[-1][0], hi)
            else:
                intervals.append((lo, hi))
        out.append(intervals)
    return out


def hdr_score(m: Mixture, y: Tensor) -> Tensor:
    """(N,) conformity score of observed y (N,) in target units: P(p_y(Y) > p_y(y)) under the prediction.

    The probability of the region where the density is higher than at y, i.e. the smallest HDR
    level whose region holds y: y is in hdr(m, a) exactly when hdr_score(m, y) <= a. Under a
    calibrated model the scores of observed targets are Uniform(0, 1), and the split-conformal HDR
    at level 1 - alpha is hdr(m, s_(k)) with s_(k) the ceil((n + 1)(1 - alpha))-th smallest of n
    calibration scores. 0 at the highest mode; 1 for y outside the support (y <= 0 under "log").
    """
    y = _target(m, y)
    if len(m) == 0:
        return y.clone()
    z = _to_z(m, y)
    inside = z.isfinite()
    cp = _critical_points(m)
    d = (torch.where(inside, z, cp.modes[:, 0]).unsqueeze(-1) - cp.modes).unsqueeze(-1)
    delta = _rel_logpdf(_mode_offsets(cp), cp.log_resp, cp.s.unsqueeze(1), d.squeeze(-1))[0]  # g(z) - g(m_j), (N, J)
    delta = torch.where(cp.valid, delta, math.inf)
    touch = cp.g_anti - cp.g_modes[:, :-1] >= delta[:, :-1]  # g(antimode j) >= g(z), seen from mode j
    r, _ = _level_set(cp, delta, touch)
    score = _inside_outside(m, _ends_std(m, cp, r), ~r[..., 0].isnan())[0].clamp(0.0, 1.0)
    return torch.where(inside, score, torch.where(z.isnan(), math.nan, 1.0))
