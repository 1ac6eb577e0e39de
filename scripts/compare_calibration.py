#!/usr/bin/env python
"""Compare calibration methods on a trained checkpoint: coverage overall, per quintile of the
predicted std, of the predicted value and of the true value, and within a range of true values.

    python scripts/compare_calibration.py runs/utkface/best.pt --true-range 6 20

Every method is fitted on the run's own val split (std scales, bin edges) and calibration split
(conformal levels) and measured on its test split, which nothing fitted touches. Compared:
  mdn's registry: none, scale, marginal, conformal (the default), and the two halves of
  `conformal` alone (its covariate std scale with marginal conformal; Mondrian cells with a
  constant scale), to see what each half does;
  crepes (Bostrom 2022): a conformal predictive system on normalised residuals, Mondrian by the
  same cells (DifficultyEstimator-style normalisation by the predicted spread);
  MAPIE 1.6 ConditionalSplitConformalRegressor (Gibbs, Cherian and Candes 2023) with the feature
  map (1, centre, log spread) on normalised absolute residuals (needs mapie[conditional]).
crepes and MAPIE work on a centre and a spread, not on the mixture: their intervals are symmetric
in the model's space z (log target under a log transform) and they give no density (no NLL/CRPS).

The raw predictions of the three splits are cached beside the checkpoint
(calibration-inputs.pt), so a second run only refits. Prints a markdown table; --json writes all
numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from mdn_cli import calibration as cal
from mdn_cli import metrics
from mdn_cli import mixture as mx
from mdn_cli import modes
from mdn_cli.calibration.cells import CellScores, Taxonomy, bins_for, quantile_edges
from mdn_cli.calibration.scale import covariates, fit_constant, fit_covariates

LEVELS = (0.6827, 0.95)


def load_inputs(checkpoint: Path) -> dict:
    """Raw mixtures, targets and groups of val / calibration / test (cached beside the checkpoint)."""
    cache = checkpoint.parent / "calibration-inputs.pt"
    if cache.is_file() and cache.stat().st_mtime >= checkpoint.stat().st_mtime:
        return torch.load(cache, weights_only=False)
    from mdn_cli.inference import Predictor
    from mdn_cli.runtime import Runtime
    from mdn_cli.data import open_source
    from mdn_cli.data.splits import SPLITS_FILE

    runtime = Runtime(torch.device("cpu"), None)
    predictor, ckpt = Predictor.from_checkpoint(checkpoint, runtime)
    source = open_source(ckpt["config"]["data"])
    examples = source.recorded(checkpoint.parent / SPLITS_FILE)
    out = {"transform": predictor.transform}
    for split in ("val", "calibration", "test"):
        rows = [e for e in examples if e.split == split]
        p = predictor.run(predictor.loader(source, rows), runtime, progress=True)
        m = predictor.mixture(p, calibrated=False)
        kept = [rows[i] for i in p.indices.tolist()]
        out[split] = {"weights": m.weights, "means": m.means, "stds": m.stds, "y": p.targets,
                      "groups": [getattr(e, "group", None) for e in kept]}
    torch.save(out, cache)
    return out


def mixture(part: dict, transform: str) -> mx.Mixture:
    return mx.Mixture(part["weights"], part["means"], part["stds"], transform)


# --- methods: each gives the test intervals (and its mixture when it keeps one) ------------------


def ours(calibration: cal.Calibration, test: mx.Mixture, groups) -> cal.Calibrated:
    return calibration.apply(test, groups)


def study_variant(data: cal.FitData, std: str, value_bins: int, spread_bins: int) -> cal.Calibration:
    """A method assembled from the package's parts: the covariate or the constant std scale, then
    Mondrian cells of `value_bins` x `spread_bins` (1 x 1: marginal), edges from val."""
    scale = (fit_covariates if std == "covariates" else fit_constant)(data.val, data.val_targets)
    val, c = scale.apply(data.val), scale.apply(data.cal)
    centre, spread = covariates(val)
    taxonomy = Taxonomy(quantile_edges(centre, value_bins), quantile_edges(spread, spread_bins))
    ids, groups = taxonomy.assign(c)
    scores = CellScores.of(taxonomy, ids, groups, mx.cdf(c, data.cal_targets), modes.hdr_score(c, data.cal_targets))
    return cal.Calibration("conformal", scale, taxonomy, scores)  # the registry entry whose describe() fits it


def normalised(m: mx.Mixture, y: torch.Tensor | None):
    """(centre, spread, normalised residual) in the model's space z."""
    centre, log_spread = covariates(m)
    spread = log_spread.exp()
    if y is None:
        return centre, spread, None
    z = torch.log(y) if m.transform == "log" else y
    return centre, spread, (z - centre) / spread


def to_target(z: torch.Tensor, transform: str) -> torch.Tensor:
    return z.exp() if transform == "log" else z


def crepes_intervals(data: cal.FitData, test: mx.Mixture, transform: str) -> dict[float, tuple[torch.Tensor, torch.Tensor]]:
    from crepes import ConformalPredictiveSystem

    c_val, s_val, _ = normalised(data.val, None)
    c_cal, s_cal, r_cal = normalised(data.cal, data.cal_targets)
    c_test, s_test, _ = normalised(test, None)
    bins = max(2, bins_for(len(c_cal), 2))  # the same cells as the 2 x 2 Mondrian variants at least
    ce, se = quantile_edges(c_val, bins), quantile_edges(s_val.log(), bins)

    def cells(c, s):
        return (torch.bucketize(c, torch.tensor(ce, dtype=torch.float64)) * (len(se) + 1)
                + torch.bucketize(s.log(), torch.tensor(se, dtype=torch.float64))).numpy()

    cps = ConformalPredictiveSystem()
    residuals = (data.cal_targets.log() if transform == "log" else data.cal_targets) - c_cal
    cps.fit(residuals.numpy(), sigmas=s_cal.numpy(), bins=cells(c_cal, s_cal))
    out = {}
    for level in LEVELS:
        lo_p, hi_p = 100 * (1 - level) / 2, 100 * (1 + level) / 2
        ends = cps.predict(y_hat=c_test.numpy(), sigmas=s_test.numpy(), bins=cells(c_test, s_test),
                           lower_percentiles=[lo_p], higher_percentiles=[hi_p], y_min=-math.inf, y_max=math.inf)
        ends = torch.as_tensor(ends, dtype=torch.float64).reshape(len(c_test), 2)
        out[level] = (to_target(ends[:, 0], transform), to_target(ends[:, 1], transform))
    return out


def mapie_intervals(data: cal.FitData, test: mx.Mixture, transform: str) -> dict[float, tuple[torch.Tensor, torch.Tensor]]:
    import numpy as np
    from mapie.conditional_conformal_prediction import ConditionalSplitConformalRegressor
    from sklearn.base import BaseEstimator, RegressorMixin

    class Zero(RegressorMixin, BaseEstimator):  # the residuals are normalised: the point prediction is 0
        def fit(self, X, y):
            return self

        def predict(self, X):
            return np.zeros(len(X))

    c_cal, s_cal, r_cal = normalised(data.cal, data.cal_targets)
    c_test, s_test, _ = normalised(test, None)
    mean_c, sd_c, mean_s, sd_s = float(c_cal.mean()), float(c_cal.std()), float(s_cal.log().mean()), float(s_cal.log().std())
    x_cal = np.stack([(c_cal.numpy() - mean_c) / sd_c, (s_cal.log().numpy() - mean_s) / sd_s], 1)
    x_test = np.stack([(c_test.numpy() - mean_c) / sd_c, (s_test.log().numpy() - mean_s) / sd_s], 1)
    out = {}
    for level in LEVELS:
        model = ConditionalSplitConformalRegressor(lambda x: np.concatenate([np.ones((len(x), 1)), x], 1), Zero().fit(None, None),
                                                   confidence_level=level, conformity_score="absolute", prefit=True)
        model.conformalize(x_cal, r_cal.numpy())
        _, intervals = model.predict_interval(x_test)
        ends = torch.as_tensor(intervals[:, :, 0], dtype=torch.float64)
        out[level] = (to_target(c_test + s_test * ends[:, 0], transform), to_target(c_test + s_test * ends[:, 1], transform))
    return out


# --- measuring --------------------------------------------------------------------------------


def row(name: str, intervals: dict, y: torch.Tensor, reference: mx.Mixture, true_range, pred: cal.Calibrated | None,
        bins: int = 5, groups: list | None = None) -> dict:
    """Test-split numbers of one method. The bins (quintiles by default) come from the raw model's
    predictions, the same images for every method."""
    out: dict = {"method": name, "n": int(len(y))}
    if pred is not None:
        out["nll"] = float(-mx.log_prob(pred.mixture, y).mean())
        out["crps"] = float(mx.crps(pred.mixture, y).mean())
        out["mae"] = float((mx.mean(pred.mixture) - y).abs().mean())
    quintiles = {"std": metrics.equal_count_bins(mx.std(reference), bins), "value": metrics.equal_count_bins(mx.mean(reference), bins),
                 "true": metrics.equal_count_bins(y, bins)}
    lo_t, hi_t = true_range
    in_range = (y >= lo_t) & (y <= hi_t)
    for level, (lo, hi) in intervals.items():
        key = cal.level_key(level)
        covered = (y >= lo) & (y <= hi)
        cov = float(covered.double().mean())
        out[f"cov{key}"], out[f"se{key}"] = cov, metrics.binomial_se(cov, len(y))
        out[f"width{key}"] = float((hi - lo)[torch.isfinite(hi - lo)].mean())
        out[f"winkler{key}"] = float(metrics.winkler(lo, hi, y, level).mean())
        for q, index in quintiles.items():
            per = [float(covered[index == i].double().mean()) for i in range(bins)]
            out[f"{q}_q{key}"] = per
            out[f"{q}_p{key}"] = metrics.homogeneity(covered, index)["p_value"]
        out[f"range{key}"] = float(covered[in_range].double().mean()) if in_range.any() else math.nan
    out["range_n"] = int(in_range.sum())
    if groups and any(g is not None for g in groups):
        names = sorted({g for g in groups if g is not None})
        for level, (lo, hi) in intervals.items():
            covered = (y >= lo) & (y <= hi)
            out[f"groups{cal.level_key(level)}"] = {
                g: (float(covered[torch.tensor([x == g for x in groups])].double().mean()), sum(x == g for x in groups)) for g in names}
    return out


def markdown(rows: list[dict], true_range, bins: int = 5) -> str:
    lo, hi = true_range
    b = {3: "tercile", 4: "quartile", 5: "quintile", 10: "decile"}.get(bins, f"1/{bins}")
    head = (f"| method | NLL | CRPS | 68% cov ± s.e. | 95% cov ± s.e. | 68% by std {b} (p) | 95% by std {b} (p) "
            f"| 68% by value {b} (p) | 95% by value {b} (p) | 68% / 95% by true {b} "
            f"| true {lo:g}-{hi:g}: 68% / 95% | 68% / 95% width | 68% / 95% interval score |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"  # noqa: E731
    for r in rows:
        q = lambda name, k: f"{min(r[f'{name}_q{k}']):.2f}–{max(r[f'{name}_q{k}']):.2f} ({r[f'{name}_p{k}']:.2g})"  # noqa: E731
        lines.append(
            f"| {r['method']} | {fmt(r.get('nll'))} | {fmt(r.get('crps'))} | {r['cov68']:.3f} ± {r['se68']:.3f} | "
            f"{r['cov95']:.3f} ± {r['se95']:.3f} | {q('std', '68')} | {q('std', '95')} | {q('value', '68')} | {q('value', '95')} | "
            f"{min(r['true_q68']):.2f}–{max(r['true_q68']):.2f} / {min(r['true_q95']):.2f}–{max(r['true_q95']):.2f} | "
            f"{r['range68']:.3f} / {r['range95']:.3f} (n={r['range_n']}) | {r['width68']:.2f} / {r['width95']:.2f} | "
            f"{r['winkler68']:.2f} / {r['winkler95']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--true-range", type=float, nargs=2, default=(-math.inf, math.inf), metavar=("LOW", "HIGH"),
                        help="Also report coverage of the test images whose true value lies in [LOW, HIGH].")
    parser.add_argument("--json", type=Path, help="Write every number here.")
    parser.add_argument("--skip", nargs="*", default=[], help="Methods to leave out (e.g. mapie: it solves a program per image).")
    parser.add_argument("--bins", type=int, default=5, help="Equal-count bins for the conditional coverage (5: quintiles).")
    args = parser.parse_args(argv)
    inputs = load_inputs(args.checkpoint)
    t = inputs["transform"]
    val, c, test = (mixture(inputs[s], t) for s in ("val", "calibration", "test"))
    data = cal.FitData(val, inputs["val"]["y"], c, inputs["calibration"]["y"], inputs["calibration"]["groups"],
                       val_groups=inputs["val"].get("groups"))
    y, groups = inputs["test"]["y"], inputs["test"]["groups"]
    print(f"{args.checkpoint}: {len(val)} val, {len(c)} calibration, {len(test)} test images", file=sys.stderr)

    rows = []
    methods = {name: (lambda name=name: cal.fit(name, data)) for name in cal.METHODS}
    for std, value_bins, spread_bins in (("covariates", 1, 1), ("constant", 2, 2), ("constant", 3, 1), ("constant", 1, 3),
                                         ("covariates", 2, 2), ("covariates", 3, 1)):
        name = f"{std} scale + {'marginal' if value_bins * spread_bins == 1 else f'Mondrian {value_bins} value x {spread_bins} spread bins'}"
        methods[name] = lambda std=std, v=value_bins, sp=spread_bins: study_variant(data, std, v, sp)
    for name, make in methods.items():
        if name in args.skip:
            continue
        started = time.perf_counter()
        pred = ours(make(), test, groups)
        intervals = {level: pred.interval(level) for level in LEVELS}
        rows.append(row(name, intervals, y, test, args.true_range, pred, args.bins, groups))
        print(f"{name}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    for name, intervals_of in (("crepes CPS, Mondrian", crepes_intervals), ("MAPIE conditional (Gibbs et al.)", mapie_intervals)):
        if name.split()[0].lower() in args.skip:
            continue
        started = time.perf_counter()
        try:
            intervals = intervals_of(data, test, t)
        except ImportError as e:
            print(f"{name}: skipped ({e})", file=sys.stderr)
            continue
        rows.append(row(name, intervals, y, test, args.true_range, None, args.bins, groups))
        print(f"{name}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    print(markdown(rows, args.true_range, args.bins))
    if "groups68" in rows[0]:
        print("\n| method | " + " | ".join(f"group {g}: 68% / 95% (n)" for g in rows[0]["groups68"]) + " |")
        print("|---|" + "---|" * len(rows[0]["groups68"]))
        for r in rows:
            cells = [f"{r['groups68'][g][0]:.3f} / {r['groups95'][g][0]:.3f} ({r['groups68'][g][1]})" for g in r["groups68"]]
            print(f"| {r['method']} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
