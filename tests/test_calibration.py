"""Post-hoc calibration: the std scale, and the split-conformal guarantee (proved by hand-computed
order statistics and by simulation, not asserted)."""

import math

import pytest
import torch

from mdn_cli import mixture as mx
from mdn_cli.calibration import (
    Calibration,
    conformal_ranks,
    fit_sigma_scale,
    images_needed,
    level_key,
)
from mdn_cli.metrics import score


def overconfident(n: int, seed: int, true_std: float = 2.0):
    """A 2-component model whose stds are `true_std` times too small, and data from the truth."""
    g = torch.Generator().manual_seed(seed)
    means = torch.stack([torch.zeros(n), torch.full((n,), 6.0)], 1).double()
    weights = torch.tensor([[0.3, 0.7]]).double().expand(n, 2)
    stds = torch.ones(n, 2, dtype=torch.float64)
    k = (torch.rand(n, generator=g) < 0.7).long()
    y = means[torch.arange(n), k] + true_std * torch.randn(n, generator=g, dtype=torch.float64)
    return mx.Mixture(weights, means, stds), y


def conformal(m: mx.Mixture, y: torch.Tensor) -> Calibration:
    return Calibration("conformal", 1.0, 0, mx.cdf(m, y).sort().values)


def test_scale_recovers_the_true_spread_and_lowers_nll():
    m, y = overconfident(4000, 0)
    fit = fit_sigma_scale(m, y)
    assert abs(fit.scale - 2.0) < 0.1
    assert fit.nll_after < fit.nll_before - 0.1
    assert abs(score(m.scaled(fit.scale), y, Calibration())["coverage_95"] - 0.95) < 0.02


def test_scale_leaves_a_calibrated_model_alone():
    m, y = overconfident(4000, 1, true_std=1.0)
    assert abs(fit_sigma_scale(m, y).scale - 1.0) < 0.05


# --- the order statistic, by hand --------------------------------------------------------------
# m = ceil(level (n+1)) ranks of n+1 must lie inside; the rest split as evenly as possible, the
# lower tail getting the smaller half: j = floor((n+1-m)/2), k = j + m; coverage m/(n+1).


@pytest.mark.parametrize(
    "n, level, j, k",
    [
        (39, 0.95, 1, 39),  # (n+1) level = 38 exactly: m = 38, not 39 (the ceil must not round an integer up)
        (40, 0.95, 1, 40),  # 38.95 -> m = 39
        (19, 0.95, 0, 19),  # 19 -> m = 19: one rank left outside, at the top: no lower bound
        (9, 0.6827, 1, 8),  # 6.827 -> m = 7, 3 ranks outside: 1 below, 2 above
        (99, 0.55, 22, 77),  # 55 exactly, though 0.55 * 100 is 55.00000000000001 in floating point
        (19, 0.9, 1, 19),  # 18 exactly (0.9 * 20 is exact in floating point too)
        (3, 0.5, 1, 3),  # 2 exactly -> m = 2
        (4, 0.5, 1, 4),  # 2.5 -> m = 3
        (1, 0.5, 0, 1),  # 1 exactly -> m = 1: the single score bounds it from above
        (10, 0.99, 0, 11),  # 10.89 -> m = 11 = n + 1: no finite end at all
        (199, 0.99, 1, 199),  # 198 exactly
    ],
)
def test_conformal_ranks_by_hand(n, level, j, k):
    assert conformal_ranks(n, level) == (j, k)


def test_coverage_is_exactly_m_over_n_plus_1_and_within_the_bounds():
    for n in (1, 2, 5, 19, 20, 39, 40, 99, 100, 511, 512, 1000):
        for level in (0.1, 0.5, 0.6827, 0.8, 0.9, 0.95, 0.99):
            j, k = conformal_ranks(n, level)
            assert level <= (k - j) / (n + 1) < level + 1 / (n + 1)
            assert 0 <= j and k <= n + 1
            assert (n + 1 - k) - j in (0, 1)  # tails as even as ranks allow


@pytest.mark.parametrize("level, needed", [(0.5, 3), (0.6827, 6), (0.9, 19), (0.95, 39), (0.99, 199)])
def test_images_needed_for_finite_ends(level, needed):
    assert images_needed(level) == needed
    j, k = conformal_ranks(needed, level)
    assert j >= 1 and k <= needed
    j, k = conformal_ranks(needed - 1, level)
    assert j == 0 or k == needed


def test_interval_probs_are_the_chosen_order_statistics():
    pit = torch.tensor([0.02, 0.10, 0.31, 0.47, 0.55, 0.71, 0.80, 0.93, 0.99], dtype=torch.float64)  # n = 9
    cal = Calibration("conformal", 1.0, 0, pit)
    assert cal.interval_probs(0.6827) == (0.02, 0.93)  # ranks 1 and 8
    assert cal.interval_probs(0.5) == (0.10, 0.80)  # 10 * 0.5 = 5 -> m = 5, j = 2, k = 7
    assert cal.interval_probs(0.95) == (0.0, 1.0)  # m = 10 = n + 1: both ends unbounded
    lo, hi = cal.interval(mx.Mixture(torch.ones(1, 1), torch.zeros(1, 1), torch.ones(1, 1)), 0.95)
    assert lo.item() == -math.inf and hi.item() == math.inf
    lo, hi = cal.interval(mx.Mixture(torch.ones(1, 1), torch.zeros(1, 1), torch.ones(1, 1), "log"), 0.95)
    assert lo.item() == 0.0 and hi.item() == math.inf  # under log the lower end of the support is 0
    described = cal.describe((0.6827, 0.95))
    assert described["method"] == "conformal" and described["n_images"] == 9
    assert described["interval_probs"] == [0.02, 0.93, 0.0, 1.0]
    assert "0.95 needs at least 39 calibration images" in described["warning"]


def test_calibration_pits_of_exactly_0_or_1_give_unbounded_ends_not_a_crash():
    """A badly overconfident model (or drift) puts calibration targets 9 stds away: their PITs round
    to exactly 1.0 (or 0.0). The chosen order statistics can then both be 1.0."""
    m = mx.Mixture(torch.ones(2, 1), torch.zeros(2, 1), torch.ones(2, 1))
    high = Calibration("conformal", 1.0, 0, torch.tensor([0.2, 0.4] + [1.0] * 17, dtype=torch.float64))  # n = 19: j = 3, k = 17
    lo, hi = high.interval(m, 0.6827)
    assert lo.tolist() == [math.inf, math.inf] and hi.tolist() == [math.inf, math.inf]
    assert "warning" not in high.describe((0.6827,))  # 19 images are enough for 68%: no "needs more images"
    low = Calibration("conformal", 1.0, 0, torch.tensor([0.0] * 17 + [0.6, 0.8], dtype=torch.float64))
    lo, hi = low.interval(m, 0.6827)
    assert lo.tolist() == [-math.inf, -math.inf] and hi.tolist() == [-math.inf, -math.inf]
    mixed = Calibration("conformal", 1.0, 0, torch.tensor([0.0] * 3 + [0.5] * 13 + [1.0] * 3, dtype=torch.float64))
    lo, hi = mixed.interval(m, 0.6827)  # lower end unbounded below, upper end unbounded above
    assert lo.tolist() == [-math.inf, -math.inf] and hi.tolist() == [math.inf, math.inf]


# --- the guarantee, by simulation ---------------------------------------------------------------


@pytest.mark.parametrize("n", [9, 20, 50])
@pytest.mark.parametrize("level", [0.5, 0.6827, 0.9])
def test_split_conformal_coverage_by_simulation(n, level):
    """A fixed, badly miscalibrated predictive distribution (N(0, 1), while the data are skewed,
    shifted and twice as wide) and exchangeable data. Over many calibration sets the mean
    coverage of a new image is exactly m/(n+1): at least the level, below level + 1/(n+1)."""
    trials = 40_000
    g = torch.Generator().manual_seed(n * 1000 + round(level * 100))

    def data(*shape):
        e = torch.randn(*shape, generator=g, dtype=torch.float64)
        return 0.5 + 2.0 * e + 0.6 * (e * e - 1)  # skewed, wider than the model thinks

    cal_pit = torch.special.ndtr(data(trials, n)).sort(dim=1).values
    new_pit = torch.special.ndtr(data(trials))
    j, k = conformal_ranks(n, level)
    lo = cal_pit[:, j - 1] if j >= 1 else torch.zeros(trials, dtype=torch.float64)
    hi = cal_pit[:, k - 1] if k <= n else torch.ones(trials, dtype=torch.float64)
    coverage = float(((new_pit >= lo) & (new_pit <= hi)).double().mean())
    slack = 4 * math.sqrt(level * (1 - level) / trials)
    exact = math.ceil(round(level * (n + 1), 9)) / (n + 1)
    assert coverage == pytest.approx(exact, abs=slack)
    assert level - slack <= coverage <= level + 1 / (n + 1) + slack
    uncalibrated = float(((new_pit >= (1 - level) / 2) & (new_pit <= (1 + level) / 2)).double().mean())
    assert uncalibrated < level - 0.1  # the model alone is far off: the guarantee does real work


def test_calibration_object_end_to_end_covers_new_data():
    m_cal, y_cal = overconfident(500, 2, true_std=1.6)
    cal = conformal(m_cal, y_cal)
    lo, hi = cal.interval_probs(0.95)
    assert lo < 0.025 and hi > 0.975  # widened
    m_new, y_new = overconfident(20000, 3, true_std=1.6)
    result, before = score(m_new, y_new, cal), score(m_new, y_new, Calibration())
    assert before["coverage_95"] < 0.85  # the overconfident model alone misses
    # >= nominal in expectation; with 500 calibration images the realised coverage has s.d. ~0.01
    assert 0.95 - 0.03 <= result["coverage_95"] <= 0.95 + 0.03
    assert 0.6827 - 0.05 <= result["coverage_68"] <= 0.6827 + 0.05


def test_level_keys():
    assert [level_key(v) for v in (0.6827, 0.95, 0.5, 0.999, 0.8)] == ["68", "95", "50", "99.9", "80"]


@pytest.mark.parametrize(
    "state, words",
    [
        ({"method": "magic"}, "unknown calibration method"),
        ({"method": "scale", "sigma_scale": -1.0}, "sigma_scale"),
        ({"method": "scale", "sigma_scale": float("nan")}, "sigma_scale"),
        ({"method": "conformal", "pit": torch.tensor([0.9, 0.1])}, "sorted"),
        ({"method": "conformal", "pit": torch.tensor([0.1, 1.5])}, "sorted"),
        ({"method": "conformal"}, "without calibration scores"),
    ],
)
def test_impossible_stored_calibrations_are_refused(state, words):
    with pytest.raises(ValueError, match=words):
        Calibration.from_state(state)


# --- highest-density regions, calibrated the same way -------------------------------------------


@pytest.mark.parametrize("n", [9, 30])
@pytest.mark.parametrize("level", [0.5, 0.9])
def test_conformal_highest_density_regions_cover_by_simulation(n, level):
    """The model predicts one Gaussian; the data are bimodal. The region reported at `level` (the
    model's HDR at the m-th smallest calibration HDR score) holds a new image with probability
    exactly m/(n+1)."""
    trials = 20_000
    g = torch.Generator().manual_seed(n + round(level * 100))

    def data(count):
        side = torch.where(torch.rand(count, generator=g) < 0.5, -1.5, 1.5).double()
        return side + 0.6 * torch.randn(count, generator=g, dtype=torch.float64)

    one = mx.Mixture(torch.ones(n, 1), torch.zeros(n, 1), torch.ones(n, 1))
    covered = 0.0
    for _ in range(trials // 500):
        cal = Calibration("conformal", 1.0, 0, torch.tensor([0.5]), mx.hdr_score(one, data(n)).sort().values)
        mass = cal.hdr_level(level)
        new = mx.Mixture(torch.ones(500, 1), torch.zeros(500, 1), torch.ones(500, 1))
        covered += float((mx.hdr_score(new, data(500)) <= mass).double().sum())
    coverage = covered / (trials // 500 * 500)
    slack = 5 * math.sqrt(level * (1 - level) / (trials // 500)) / 5 + 0.02  # calibration sets: trials // 500 of them
    exact = math.ceil(round(level * (n + 1), 9)) / (n + 1)
    assert coverage == pytest.approx(exact, abs=slack)


def test_reported_regions_are_the_model_hdr_at_the_calibrated_mass():
    scores = torch.linspace(0.05, 0.99, 19, dtype=torch.float64)  # n = 19
    cal = Calibration("conformal", 1.0, 0, torch.tensor([0.5]), scores)
    assert cal.hdr_level(0.5) == pytest.approx(float(scores[9]))  # ceil(0.5 * 20) = 10th smallest
    assert cal.hdr_level(0.95) == pytest.approx(float(scores[18]))  # 19th: the largest
    two = mx.Mixture(torch.tensor([[0.5, 0.5]]), torch.tensor([[-3.0, 3.0]]), torch.tensor([[0.5, 0.5]]))
    pieces = cal.hdr(two, 0.5)[0]
    assert len(pieces) == 2 and pieces == mx.hdr(two, float(scores[9]))[0]
    few = Calibration("conformal", 1.0, 0, torch.tensor([0.5]), scores[:5])
    assert few.hdr(two, 0.95) == [[(-math.inf, math.inf)]]  # too few images: the whole line, never a fake bound
    assert Calibration().hdr(two, 0.68) == mx.hdr(two, 0.68)  # uncalibrated: the model's own HDR
