"""Post-hoc calibration (mdn_cli/calibration/): the std scales, the split-conformal maths (hand-computed
order statistics, simulations of the guarantee), and the conditional method's promise cell by
cell and group by group, with crepes as an independent oracle for the Mondrian interval ends."""

import math

import pytest
import torch

from mdn_cli import calibration as cal
from mdn_cli import mixture as mx
from mdn_cli import modes as md
from mdn_cli.calibration import Calibration, FitData, level_key
from mdn_cli.calibration.cells import MIN_IMAGES, CellScores, Taxonomy, bins_for, grid_for
from mdn_cli.calibration.levels import beta_quantile, central_ranks, images_needed, realised_range
from mdn_cli.calibration.scale import StdScale, fit_constant, fit_covariates
from mdn_cli.metrics import coverage_by, equal_count_bins, homogeneity, score

pytestmark = pytest.mark.usefixtures("single_thread")


def overconfident(n: int, seed: int, true_std: float = 2.0):
    """A 2-component model whose stds are `true_std` times too small, and data from the truth."""
    g = torch.Generator().manual_seed(seed)
    means = torch.stack([torch.zeros(n), torch.full((n,), 6.0)], 1).double()
    weights = torch.tensor([[0.3, 0.7]]).double().expand(n, 2)
    stds = torch.ones(n, 2, dtype=torch.float64)
    k = (torch.rand(n, generator=g) < 0.7).long()
    y = means[torch.arange(n), k] + true_std * torch.randn(n, generator=g, dtype=torch.float64)
    return mx.Mixture(weights, means, stds), y


def marginal(pit: torch.Tensor, hdr: torch.Tensor | None = None) -> Calibration:
    """A marginal conformal calibration from given scores (no std scale)."""
    hdr = pit if hdr is None else hdr
    return Calibration("marginal", StdScale(), Taxonomy(), CellScores(all_pit=pit.sort().values, all_hdr=hdr.sort().values))


def one_gaussian(n: int, transform: str = "none") -> mx.Mixture:
    return mx.Mixture(torch.ones(n, 1), torch.zeros(n, 1), torch.ones(n, 1), transform)


def test_constant_scale_recovers_the_true_spread_and_lowers_nll():
    m, y = overconfident(4000, 0)
    fit = fit_constant(m, y)
    assert abs(math.exp(fit.coef[0]) - 2.0) < 0.1
    assert float(-mx.log_prob(fit.apply(m), y).mean()) < float(-mx.log_prob(m, y).mean()) - 0.1
    assert abs(score(Calibration().attach(fit.apply(m)), y)["coverage_95"] - 0.95) < 0.02


def test_constant_scale_leaves_a_calibrated_model_alone():
    m, y = overconfident(4000, 1, true_std=1.0)
    assert abs(math.exp(fit_constant(m, y).coef[0]) - 1.0) < 0.05


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
def test_central_ranks_by_hand(n, level, j, k):
    assert central_ranks(n, level) == (j, k)


def test_coverage_is_exactly_m_over_n_plus_1_and_within_the_bounds():
    for n in (1, 2, 5, 19, 20, 39, 40, 99, 100, 511, 512, 1000):
        for level in (0.1, 0.5, 0.6827, 0.8, 0.9, 0.95, 0.99):
            j, k = central_ranks(n, level)
            assert level <= (k - j) / (n + 1) < level + 1 / (n + 1)
            assert 0 <= j and k <= n + 1
            assert (n + 1 - k) - j in (0, 1)  # tails as even as ranks allow


@pytest.mark.parametrize("level, needed", [(0.5, 3), (0.6827, 6), (0.9, 19), (0.95, 39), (0.99, 199)])
def test_images_needed_for_finite_ends(level, needed):
    assert images_needed(level) == needed
    j, k = central_ranks(needed, level)
    assert j >= 1 and k <= needed
    j, k = central_ranks(needed - 1, level)
    assert j == 0 or k == needed
    assert images_needed(0.99, central=False) == 99


def test_the_realised_coverage_range_matches_scipys_beta():
    stats = pytest.importorskip("scipy.stats")
    for n, m in ((99, 99), (199, 198), (520, 516), (30, 12)):
        low, high = realised_range(n, m, 0.9)
        assert low == pytest.approx(stats.beta.ppf(0.05, m, n + 1 - m), abs=1e-9)
        assert high == pytest.approx(stats.beta.ppf(0.95, m, n + 1 - m), abs=1e-9)
    assert beta_quantile(0.5, 1, 1) == pytest.approx(0.5, abs=1e-12)


def test_interval_probs_are_the_chosen_order_statistics():
    pit = torch.tensor([0.02, 0.10, 0.31, 0.47, 0.55, 0.71, 0.80, 0.93, 0.99], dtype=torch.float64)  # n = 9
    c = marginal(pit)
    pred = c.attach(one_gaussian(1))
    assert [p.item() for p in pred.interval_probs(0.6827)] == [0.02, 0.93]  # ranks 1 and 8
    assert [p.item() for p in pred.interval_probs(0.5)] == [0.10, 0.80]  # 10 * 0.5 = 5 -> m = 5, j = 2, k = 7
    assert [p.item() for p in pred.interval_probs(0.95)] == [0.0, 1.0]  # m = 10 = n + 1: both ends unbounded
    lo, hi = pred.interval(0.95)
    assert lo.item() == -math.inf and hi.item() == math.inf
    lo, hi = c.attach(one_gaussian(1, "log")).interval(0.95)
    assert lo.item() == 0.0 and hi.item() == math.inf  # under log the lower end of the support is 0
    described = pred.describe((0.6827, 0.95))[0]
    assert described["method"] == "marginal" and described["n_images"] == 9
    assert described["interval_probs"] == [0.02, 0.93, 0.0, 1.0]
    assert "0.95 needs at least 39 calibration images" in described["warning"]


def test_calibration_pits_of_exactly_0_or_1_give_unbounded_ends_not_a_crash():
    """A badly overconfident model (or drift) puts calibration targets 9 stds away: their PITs round
    to exactly 1.0 (or 0.0). The chosen order statistics can then both be 1.0."""
    m = one_gaussian(2)
    high = marginal(torch.tensor([0.2, 0.4] + [1.0] * 17, dtype=torch.float64))  # n = 19: j = 3, k = 17
    lo, hi = high.attach(m).interval(0.6827)
    assert lo.tolist() == [math.inf, math.inf] and hi.tolist() == [math.inf, math.inf]
    assert "warning" not in high.attach(m).describe((0.6827,))[0]  # 19 images are enough for 68%
    low = marginal(torch.tensor([0.0] * 17 + [0.6, 0.8], dtype=torch.float64))
    lo, hi = low.attach(m).interval(0.6827)
    assert lo.tolist() == [-math.inf, -math.inf] and hi.tolist() == [-math.inf, -math.inf]
    mixed = marginal(torch.tensor([0.0] * 3 + [0.5] * 13 + [1.0] * 3, dtype=torch.float64))
    lo, hi = mixed.attach(m).interval(0.6827)  # lower end unbounded below, upper end unbounded above
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
    j, k = central_ranks(n, level)
    lo = cal_pit[:, j - 1] if j >= 1 else torch.zeros(trials, dtype=torch.float64)
    hi = cal_pit[:, k - 1] if k <= n else torch.ones(trials, dtype=torch.float64)
    coverage = float(((new_pit >= lo) & (new_pit <= hi)).double().mean())
    slack = 4 * math.sqrt(level * (1 - level) / trials)
    exact = math.ceil(round(level * (n + 1), 9)) / (n + 1)
    assert coverage == pytest.approx(exact, abs=slack)
    assert level - slack <= coverage <= level + 1 / (n + 1) + slack
    uncalibrated = float(((new_pit >= (1 - level) / 2) & (new_pit <= (1 + level) / 2)).double().mean())
    assert uncalibrated < level - 0.1  # the model alone is far off: the guarantee does real work


def test_marginal_calibration_end_to_end_covers_new_data():
    m_val, y_val = overconfident(500, 4, true_std=1.6)
    m_cal, y_cal = overconfident(500, 2, true_std=1.6)
    c = cal.fit("marginal", FitData(m_val, y_val, m_cal, y_cal))
    m_new, y_new = overconfident(20000, 3, true_std=1.6)
    result, before = score(c.apply(m_new), y_new), score(Calibration().attach(m_new), y_new)
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
        ({"method": "conformal", "scale": {"coef": [0.0]}, "taxonomy": {"centre_edges": [1.0, 0.0]}, "scores": {"pit": [0.5]}},
         "sorted"),
        ({"method": "conformal", "scale": {"coef": [0.0, 1.0]}, "scores": {"pit": [0.5]}}, "std-scale coefficients"),
    ],
)
def test_impossible_stored_calibrations_are_refused(state, words):
    with pytest.raises(ValueError, match=words):
        Calibration.from_state(state)


def test_a_checkpoint_from_before_cells_reads_as_marginal():
    old = {"method": "conformal", "sigma_scale": 1.5, "val_images": 30, "pit": torch.tensor([0.1, 0.5, 0.9]),
           "hdr_score": torch.tensor([0.2, 0.4, 0.6])}
    c = Calibration.from_state(old)
    assert c.method == "marginal" and c.n_images == 3 and math.exp(c.scale.coef[0]) == pytest.approx(1.5)
    again = Calibration.from_state(c.state())  # and it round-trips in the new form
    assert (again.method, again.scale, again.taxonomy) == (c.method, c.scale, c.taxonomy)
    assert torch.equal(again.scores.all_pit, c.scores.all_pit) and torch.equal(again.scores.all_hdr, c.scores.all_hdr)


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

    one = one_gaussian(n)
    covered = 0.0
    for _ in range(trials // 500):
        c = marginal(torch.tensor([0.5]), md.hdr_score(one, data(n)))
        new = one_gaussian(500)
        mass = c.attach(new).hdr_level(level)
        covered += float((md.hdr_score(new, data(500)) <= mass).double().sum())
    coverage = covered / (trials // 500 * 500)
    slack = 5 * math.sqrt(level * (1 - level) / (trials // 500)) / 5 + 0.02  # calibration sets: trials // 500 of them
    exact = math.ceil(round(level * (n + 1), 9)) / (n + 1)
    assert coverage == pytest.approx(exact, abs=slack)


def test_reported_regions_are_the_model_hdr_at_the_calibrated_mass():
    scores = torch.linspace(0.05, 0.99, 19, dtype=torch.float64)  # n = 19
    two = mx.Mixture(torch.tensor([[0.5, 0.5]]), torch.tensor([[-3.0, 3.0]]), torch.tensor([[0.5, 0.5]]))
    pred = marginal(torch.tensor([0.5]), scores).attach(two)
    assert pred.hdr_level(0.5).item() == pytest.approx(float(scores[9]))  # ceil(0.5 * 20) = 10th smallest
    assert pred.hdr_level(0.95).item() == pytest.approx(float(scores[18]))  # 19th: the largest
    pieces = pred.hdr(0.5)[0]
    assert len(pieces) == 2 and pieces == md.hdr(two, float(scores[9]))[0]
    assert pred.describe((0.5, 0.95))[0]["hdr_masses"] == pytest.approx([float(scores[9]), float(scores[18])])
    few = marginal(torch.tensor([0.5]), scores[:5]).attach(two)
    assert few.hdr(0.95) == [[(-math.inf, math.inf)]]  # too few images: the whole line, never a fake bound


# --- conditional calibration: the promise cell by cell ----------------------------------------------


def heteroscedastic(n: int, seed: int):
    """A model whose predicted spread is wrong in a way that depends on it: it predicts N(2, s^2)
    with s log-uniform in [0.2, 5], while the truth is N(2, (0.55 sqrt(s) + 0.25)^2): far too
    confident where it is confident, too unsure where it is unsure. On average the two cancel."""
    g = torch.Generator().manual_seed(seed)
    s = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(0.2), math.log(5.0), generator=g))
    true_std = 0.55 * s.sqrt() + 0.25
    y = 2.0 + true_std * torch.randn(n, generator=g, dtype=torch.float64)
    return mx.Mixture(torch.ones(n, 1), torch.full((n, 1), 2.0), s.unsqueeze(1)), y, s


def test_conditional_calibration_holds_in_every_bin_where_marginal_fails():
    """Marginal conformal is right on average and wrong in the narrow and the wide predictions; the
    conditional method (a std scale by spread on val, Mondrian cells on the calibration split) is
    right in every quintile of the predicted spread, within Monte-Carlo noise."""
    val, y_val, _ = heteroscedastic(1500, 1)
    c_m, y_cal, _ = heteroscedastic(2000, 2)
    test, y, s = heteroscedastic(20000, 3)
    data = FitData(val, y_val, c_m, y_cal)
    quintile = equal_count_bins(s, 5)
    results = {}
    for method in ("marginal", "conformal"):
        table = coverage_by(cal.fit(method, data).apply(test), y, quintile)
        results[method] = [(row["coverage_68"], row["coverage_95"]) for row in table["cells"]]
    se68, se95 = math.sqrt(0.68 * 0.32 / 4000), math.sqrt(0.95 * 0.05 / 4000)
    marginal_68 = [a for a, _ in results["marginal"]]
    assert sum(marginal_68) / 5 == pytest.approx(0.6827, abs=0.03)  # right on average ...
    assert marginal_68[0] < 0.6827 - 8 * se68 and marginal_68[-1] > 0.6827 + 8 * se68  # ... wrong at both ends
    # the realised coverage of one calibration set varies too (about 0.02 at 68% for ~400 images a cell)
    for cov68, cov95 in results["conformal"]:
        assert abs(cov68 - 0.6827) < 3 * se68 + 0.035, results["conformal"]
        assert abs(cov95 - 0.95) < 3 * se95 + 0.02, results["conformal"]


def test_bin_edges_come_from_val_never_from_the_calibration_images():
    """Mutation guard: edges fitted on the calibration images would depend on the scores they calibrate."""
    val, y_val, _ = heteroscedastic(1000, 4)
    a, y_a, _ = heteroscedastic(800, 5)
    b, y_b, _ = heteroscedastic(800, 6)
    first = cal.fit("conformal", FitData(val, y_val, a, y_a)).taxonomy
    second = cal.fit("conformal", FitData(val, y_val, b, y_b)).taxonomy
    assert first.spread_edges and first == second  # other calibration images, the same cells
    other_val, y_other, _ = heteroscedastic(1000, 7)
    assert cal.fit("conformal", FitData(other_val, y_other, a, y_a)).taxonomy != first


def test_each_row_is_calibrated_with_its_own_cell():
    """Off-by-one guard: rows whose spread lies just below and just above an edge take the PITs of
    the cell on their side, and say which cell that is."""
    taxonomy = Taxonomy(spread_edges=(0.0,))  # log spread < 0 -> bin 1 of 2, >= 0 -> bin 2 of 2
    narrow, wide = torch.linspace(0.01, 0.30, MIN_IMAGES + 10), torch.linspace(0.70, 0.99, MIN_IMAGES + 10)
    zeros = torch.zeros(len(narrow), dtype=torch.long)
    scores = CellScores.of(taxonomy, torch.cat([zeros, zeros + 1]), torch.cat([zeros, zeros]),
                           torch.cat([narrow, wide]).double(), torch.cat([narrow, wide]).double())
    c = Calibration("conformal", StdScale(), taxonomy, scores)
    m = mx.Mixture(torch.ones(2, 1), torch.zeros(2, 1), torch.tensor([[math.exp(-1e-9)], [math.exp(1e-9)]], dtype=torch.float64))
    pred = c.attach(m)
    lo, hi = pred.interval_probs(0.6827)
    assert float(hi[0]) <= 0.30 and float(lo[1]) >= 0.70
    described = pred.describe((0.6827,))
    assert [d["calibrated_with"]["predicted_spread_bin"]["index"] for d in described] == [1, 2]
    assert all(d["n_images"] == MIN_IMAGES + 10 for d in described)


def test_a_small_cell_falls_back_and_says_so():
    taxonomy = Taxonomy(spread_edges=(0.0,))
    pit = torch.linspace(0.01, 0.99, 80, dtype=torch.float64)
    cells = torch.tensor([0] * 75 + [1] * 5)
    c = Calibration("conformal", StdScale(), taxonomy, CellScores.of(taxonomy, cells, torch.zeros(80, dtype=torch.long), pit, pit))
    record = c.attach(mx.Mixture(torch.ones(1, 1), torch.zeros(1, 1), torch.full((1, 1), 2.0))).describe((0.6827,))[0]
    assert record["n_images"] == 80 and record["calibrated_with"] == {"set": "all calibration images"}
    assert f"its cell has 5 calibration images (under {MIN_IMAGES}): calibrated with all images" in record["warning"]


def two_groups(n: int, seed: int):
    """Images the model cannot tell apart; group B's labels carry three times the noise."""
    g = torch.Generator().manual_seed(seed)
    groups = ["A" if u < 0.5 else "B" for u in torch.rand(n, generator=g).tolist()]
    noise = torch.tensor([0.5 if name == "A" else 1.5 for name in groups], dtype=torch.float64)
    y = noise * torch.randn(n, generator=g, dtype=torch.float64)
    return mx.Mixture(torch.ones(n, 1), torch.zeros(n, 1), torch.ones(n, 1)), y, groups


def test_each_group_gets_its_coverage_and_an_unknown_group_is_told():
    val, y_val, _ = two_groups(600, 1)
    m_cal, y_cal, g_cal = two_groups(1200, 2)
    test, y, groups = two_groups(20000, 3)
    conditional = cal.fit("conformal", FitData(val, y_val, m_cal, y_cal, g_cal))
    assert conditional.taxonomy.groups == ("A", "B")
    index = torch.tensor([0 if g == "A" else 1 for g in groups])

    def within(row: dict) -> bool:  # 3 s.e. of the test images, plus the realised noise of ~600 calibration images
        return abs(row["coverage_95"] - 0.95) < 3 * math.sqrt(0.95 * 0.05 / row["n"]) + 0.02

    pooled = coverage_by(cal.fit("marginal", FitData(val, y_val, m_cal, y_cal, g_cal)).apply(test, groups), y, index)["cells"]
    assert not all(within(row) for row in pooled)  # one pooled calibration: the quiet group over-, the noisy one under-covered
    by_group = coverage_by(conditional.apply(test, groups), y, index)["cells"]
    assert all(within(row) for row in by_group), by_group
    records = conditional.apply(test[:2], ["C", None]).describe((0.95,))
    assert "group 'C' has no calibration images of its own (known: A, B): calibrated with all images" in records[0]["warning"]
    assert "no group given" in records[1]["warning"]
    assert all(r["calibrated_with"] == {"set": "all calibration images"} and r["n_images"] == 1200 for r in records)
    own = conditional.apply(test[:1], ["B"]).describe((0.95,))[0]
    assert own["n_images"] == sum(1 for g in g_cal if g == "B") and "warning" not in own
    from mdn_cli.calibrate import _log_fit

    lines: list[str] = []  # what training prints: its calibration images with their groups, no warning
    _log_fit(conditional, FitData(val, y_val, m_cal, y_cal, g_cal), lines.append)
    assert lines and not any(line.startswith("warning") for line in lines), lines
    assert "each cell (predicted value and spread, and group) calibrated on its own" in conditional.summary()["guarantee"]


def test_covariate_scale_is_at_least_as_good_as_a_constant_one_on_val():
    val, y_val, _ = heteroscedastic(1500, 8)
    constant, covariate = fit_constant(val, y_val), fit_covariates(val, y_val)
    nll = lambda s: float(-mx.log_prob(s.apply(val), y_val).mean())  # noqa: E731
    assert not covariate.constant and nll(covariate) < nll(constant) - 0.05
    state = covariate.state()
    assert StdScale.from_state(state) == covariate


def test_mondrian_interval_ends_match_crepes():
    """Oracle: for single Gaussians, the ends mdn takes from a cell's sorted PITs are the prediction
    plus std times that cell's normalised residual of the same rank: what crepes' Mondrian
    conformal predictive system gives for the percentiles that pick those ranks (crepes takes
    rank int(p (n+1)) for a lower percentile p, ceil(p (n+1)) for a higher one)."""
    crepes = pytest.importorskip("crepes")
    g = torch.Generator().manual_seed(9)
    n_cells, per_cell = 3, 199
    cells = torch.arange(n_cells).repeat_interleave(per_cell)
    mu = torch.randn(len(cells), generator=g, dtype=torch.float64)
    s = torch.exp(0.3 * torch.randn(len(cells), generator=g, dtype=torch.float64))
    y = mu + s * (1.0 + cells.double()) * torch.randn(len(cells), generator=g, dtype=torch.float64)
    m = mx.Mixture(torch.ones(len(cells), 1), mu.unsqueeze(1), s.unsqueeze(1))
    taxonomy = Taxonomy(spread_edges=())  # cells given directly below
    scores = CellScores.of(taxonomy, cells, torch.zeros_like(cells), mx.cdf(m, y), md.hdr_score(m, y))
    test_mu = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    test_s = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    cps = crepes.ConformalPredictiveSystem().fit((y - mu).numpy(), sigmas=s.numpy(), bins=cells.numpy())
    for level in (0.9, 0.8):
        for cell in range(n_cells):
            pit = scores.pit[cell]
            j, k = central_ranks(per_cell, level)
            ours_lo = test_mu + test_s * torch.special.ndtri(pit[j - 1])
            ours_hi = test_mu + test_s * torch.special.ndtri(pit[k - 1])
            theirs = cps.predict(y_hat=test_mu.numpy(), sigmas=test_s.numpy(), bins=[cell] * 3,
                                 lower_percentiles=[100 * (j + 0.5) / (per_cell + 1)],
                                 higher_percentiles=[100 * (k - 0.5) / (per_cell + 1)])
            theirs = torch.as_tensor(theirs, dtype=torch.float64).reshape(3, 2)
            torch.testing.assert_close(ours_lo, theirs[:, 0], rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(ours_hi, theirs[:, 1], rtol=1e-9, atol=1e-9)


def test_homogeneity_test_tells_equal_from_unequal_cells():
    cells = torch.arange(5).repeat_interleave(400)
    g = torch.Generator().manual_seed(0)
    equal = torch.rand(2000, generator=g) < 0.68
    assert homogeneity(equal, cells)["p_value"] > 0.01
    unequal = torch.rand(2000, generator=g) < (0.5 + 0.08 * cells.double())
    assert homogeneity(unequal, cells)["p_value"] < 1e-6
    stats = pytest.importorskip("scipy.stats")
    table = [[int(equal[cells == c].sum()), int((~equal[cells == c]).sum())] for c in range(5)]
    assert homogeneity(equal, cells)["p_value"] == pytest.approx(stats.chi2_contingency(table, correction=False)[1], rel=1e-6)


def test_bins_for_the_calibration_set_size():
    assert bins_for(520, 2) == 2 and bins_for(399, 2) == 1 and bins_for(5000, 2) == 7 and bins_for(150, 1) == 1
    # too few for a 2 x 2 grid: the spread alone, in cells of at least 60 (never below MIN_IMAGES)
    assert grid_for(520) == (2, 2) and grid_for(399) == (1, 6) and grid_for(199) == (1, 3) and grid_for(119) == (1, 1)
    assert all(n // grid_for(n)[1] >= MIN_IMAGES for n in range(100, 400))


def kinked(n: int, seed: int):
    """Right where it is unsure, far too confident below a spread of 1: it predicts N(2, s^2) with
    s log-uniform in [0.1, 10], the truth is N(2, max(s, 1)^2). No smooth rescaling of the
    spread matches the kink; cells of the spread do."""
    g = torch.Generator().manual_seed(seed)
    s = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(0.1), math.log(10.0), generator=g))
    y = 2.0 + s.clamp_min(1.0) * torch.randn(n, generator=g, dtype=torch.float64)
    return mx.Mixture(torch.ones(n, 1), torch.full((n, 1), 2.0), s.unsqueeze(1)), y, s


def test_a_small_calibration_set_still_calibrates_the_narrow_predictions():
    """199 calibration images are too few for a 2 x 2 grid; the cells then split the predicted
    spread alone, and the narrowest third of the predictions covers as promised on average over
    calibration sets, where one level for all leaves it below."""
    val, y_val, _ = kinked(300, 1)
    test, y, s = kinked(6000, 3)
    narrow = s <= s.quantile(1 / 3)
    covered: dict[str, list[float]] = {"marginal": [], "conformal": []}
    for seed in range(20):
        c_m, y_cal, _ = kinked(199, 100 + seed)
        for method in covered:
            lo, hi = cal.fit(method, FitData(val, y_val, c_m, y_cal)).apply(test).interval(0.68)
            covered[method].append(float(((y >= lo) & (y <= hi))[narrow].double().mean()))
    mean = {method: sum(v) / len(v) for method, v in covered.items()}
    assert mean["conformal"] == pytest.approx(0.6827, abs=0.025), mean
    assert mean["marginal"] < 0.6827 - 0.1, mean


def test_each_group_gets_bins_from_its_own_val_images():
    """A quiet group predicts narrow spreads, a noisy one wide ones: pooled bin edges would put all
    of one group in the narrow cells; each group's own edges (from its val images, never from the
    calibration images) share its calibration images about equally among its cells."""
    def spread_groups(n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        groups = ["A" if u < 0.5 else "B" for u in torch.rand(n, generator=g).tolist()]
        low = torch.tensor([0.2 if name == "A" else 1.0 for name in groups], dtype=torch.float64)
        s = low * torch.exp(torch.rand(n, generator=g, dtype=torch.float64) * math.log(5.0))
        centre = torch.randn(n, generator=g, dtype=torch.float64)
        y = centre + s * torch.randn(n, generator=g, dtype=torch.float64)
        return mx.Mixture(torch.ones(n, 1), centre.unsqueeze(1), s.unsqueeze(1)), y, groups

    val, y_val, g_val = spread_groups(1000, 1)
    m_cal, y_cal, g_cal = spread_groups(1000, 2)
    fitted = cal.fit("conformal", FitData(val, y_val, m_cal, y_cal, g_cal, val_groups=g_val))
    assert len(fitted.taxonomy.group_edges) == 2 and fitted.taxonomy.shape == (2, 2, 2)
    sizes = {cell: int(p.numel()) for cell, p in fitted.scores.pit.items()}
    assert len(sizes) == 8 and all(80 <= n <= 180 for n in sizes.values()), sizes  # about 125 in each
    assert Taxonomy.from_state(fitted.taxonomy.state()) == fitted.taxonomy
    from mdn_cli.calibration.cells import quantile_edges
    from mdn_cli.calibration.scale import covariates

    centre, spread = covariates(fitted.scale.apply(val))  # the edges are the group's own val quantiles
    for i, name in enumerate(("A", "B")):
        rows = torch.tensor([g == name for g in g_val])
        assert fitted.taxonomy.group_edges[i] == (quantile_edges(centre[rows], 2), quantile_edges(spread[rows], 2))
    pooled = cal.fit("conformal", FitData(val, y_val, m_cal, y_cal, g_cal))  # no val groups: pooled edges, lopsided cells
    assert not pooled.taxonomy.group_edges and max(int(p.numel()) for p in pooled.scores.pit.values()) > 200
