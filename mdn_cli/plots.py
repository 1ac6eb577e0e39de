"""Matplotlib figures: evaluation diagnostics and per-image predictive densities (PNG files)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from . import metrics  # noqa: E402
from . import mixture as mx  # noqa: E402
from .calibration import Calibration, level_key  # noqa: E402


def evaluation_plots(evaluation, out: Path) -> list[Path]:
    """reliability.png, pit_histogram.png, predicted_vs_true.png and coverage_by_bin.png in `out`."""
    m, y, calibration = evaluation.mixture, evaluation.targets, evaluation.calibration
    pit = mx.cdf(m, y)
    n = len(y)
    paths = [out / "reliability.png", out / "pit_histogram.png", out / "predicted_vs_true.png", out / "coverage_by_bin.png"]
    reported = {"conformal": f"conformal, {calibration.n_images} calibration images", "scale": "std scale fitted on val",
                "none": "uncalibrated"}[calibration.method]

    # Reliability: observed coverage of the reported central intervals against their nominal level.
    levels = torch.linspace(0.02, 0.98, 49).tolist()
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", label="perfect calibration")
    if calibration.method != "none":
        raw = metrics.observed_coverage(mx.cdf(evaluation.raw, y), Calibration(), levels)
        ax.plot(levels, raw, color="0.45", lw=1.2, label="before calibration")
    ax.plot(levels, metrics.observed_coverage(pit, calibration, levels), color="C0", lw=2, label=f"reported ({reported})")
    ax.set(xlabel="nominal coverage of the central interval", ylabel="observed coverage", xlim=(0, 1), ylim=(0, 1),
           title=f"Reliability of the reported intervals ({n} images)")
    ax.text(0.04, 0.9, "above the diagonal: intervals too wide\nbelow: too narrow (overconfident)", fontsize=8, color="0.3")
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, paths[0])

    # PIT histogram of the model's distribution (after the std scale): flat when calibrated.
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = 20
    ax.hist(pit.numpy(), bins=bins, range=(0, 1), color="C0", edgecolor="white")
    ax.axhline(n / bins, color="0.3", ls="--", label="uniform (calibrated)")
    ax.set(xlabel="PIT = predicted CDF at the true value", ylabel="images", title=f"PIT histogram ({n} images)")
    ax.legend()
    _save(fig, paths[1])

    # Predicted median against the truth, with the reported 95% intervals as light vertical lines.
    level95 = max(evaluation.levels)
    lo, hi = calibration.interval(m, level95)
    median = mx.median(m)
    inside = (y >= lo) & (y <= hi)
    fig, ax = plt.subplots(figsize=(6, 6))
    alpha = float(min(0.6, max(0.04, 30.0 / max(n, 1))))
    finite_lo, finite_hi = torch.where(torch.isfinite(lo), lo, median), torch.where(torch.isfinite(hi), hi, median)
    for mask, color, label in ((inside, "C0", "covers the truth"), (~inside, "C3", "misses")):
        if mask.any():
            ax.vlines(y[mask].numpy(), finite_lo[mask].numpy(), finite_hi[mask].numpy(), color=color, alpha=alpha, lw=1)
            ax.scatter(y[mask].numpy(), median[mask].numpy(), s=6 if n > 500 else 12, color=color, zorder=3,
                       label=f"median, {level_key(level95)}% interval {label} ({int(mask.sum())})")
    span = [float(y.min()), float(y.max())]
    ax.plot(span, span, color="0.3", ls="--", lw=1)
    ax.set(xlabel="true value", ylabel=f"predicted median (lines: {level_key(level95)}% interval)", title=f"Predicted vs true ({n} images)")
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, paths[2])

    # Coverage where it matters: by decile of the true value and of the predicted std.
    conditional = evaluation.metrics["conditional"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, (key, xlabel) in zip(axes, (("by_target", "true value (decile bins)"), ("by_predicted_std", "predicted std (decile bins)"))):
        rows = conditional[key]
        x = list(range(len(rows)))
        for j, level in enumerate(evaluation.levels):
            k = level_key(level)
            cov = [r[f"coverage_{k}"] for r in rows]
            err = [2 * metrics.binomial_se(r[f"coverage_{k}"], r["n"]) for r in rows]
            ax.errorbar([v + 0.1 * (j - 0.5) for v in x], cov, yerr=err, fmt="o-", ms=4, capsize=2, color=f"C{j}", label=f"{k}% interval")
            ax.axhline(level, color=f"C{j}", ls="--", lw=0.8)
        ax.set_xticks(x, [f"{r['low']:.3g}-{r['high']:.3g}" for r in rows], rotation=45, ha="right", fontsize=7)
        ax.set(xlabel=xlabel, ylim=(0, 1.02))
    axes[0].set_ylabel("observed coverage (bars: ±2 s.e.)")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(f"Coverage by bin ({n} images; dashed: nominal)")
    _save(fig, paths[3])
    return paths


def density_plot(image, m: mx.Mixture, summary: dict, title: str, path: Path) -> Path:
    """The image beside its predicted density (row 0 of `m`): mean, median, 68%/95% intervals and
    each weighted component, all in target units."""
    q = mx.quantile(m, [0.005, 0.995])[0].tolist()
    lo, hi = (end if end is not None else fallback for end, fallback in zip(summary["interval_95"], q))
    pad = 0.35 * (hi - lo) + 1e-9
    low = max(lo - pad, 1e-9) if m.transform == "log" else lo - pad
    grid = torch.linspace(low, hi + pad, 600, dtype=torch.float64)
    rows = mx.Mixture(m.weights.expand(len(grid), -1), m.means.expand(len(grid), -1), m.stds.expand(len(grid), -1), m.transform)
    density = mx.log_prob(rows, grid).exp()

    fig, (ax_img, ax) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1, 1.8]})
    ax_img.imshow(image)
    ax_img.set_axis_off()
    ax_img.set_title(title, fontsize=9)
    ax.fill_between(grid, 0, density, where=(grid >= lo) & (grid <= hi), color="C0", alpha=0.15, label="95% interval")
    lo68, hi68 = (end if end is not None else fallback for end, fallback in zip(summary["interval_68"], (lo, hi)))
    ax.fill_between(grid, 0, density, where=(grid >= lo68) & (grid <= hi68), color="C0", alpha=0.3, label="68% interval")
    for k in range(m.weights.shape[1]):
        w = float(m.weights[0, k])
        if w < 0.01:
            continue
        comp = mx.Mixture(torch.ones(len(grid), 1, dtype=torch.float64), m.means[:1, k : k + 1].expand(len(grid), 1),
                          m.stds[:1, k : k + 1].expand(len(grid), 1), m.transform)
        ax.plot(grid, w * mx.log_prob(comp, grid).exp(), ls=":", lw=1.2, label=f"component {k + 1} (weight {w:.2f})")
    ax.plot(grid, density, color="C0", lw=2, label="predicted density")
    ax.axvline(summary["mean"], color="C3", lw=1.5, label=f"mean {summary['mean']:.4g}")
    ax.axvline(summary["median"], color="C2", lw=1.5, ls="--", label=f"median {summary['median']:.4g}")
    ax.set(xlabel="target", ylabel="density", ylim=(0, None))
    ax.legend(fontsize=7, loc="upper right")
    _save(fig, path)
    return path


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_density_plots(predictions, m: mx.Mixture, out: Path) -> list[Path]:
    """One `<image stem>.png` per prediction (row i of `m` belongs to predictions[i])."""
    from .images import load_rgb

    out.mkdir(parents=True, exist_ok=True)
    written, used = [], set()
    for i, p in enumerate(predictions):
        name = Path(p.image).stem
        while name in used:  # same file name in two folders
            name += "_"
        used.add(name)
        s = p.summary
        title = f"{Path(p.image).name}\nmean {s['mean']:.4g}, std {s['std']:.4g}, 95% {s['interval_95']}"
        written.append(density_plot(load_rgb(p.image), m[i : i + 1], s, title, out / f"{name}.png"))
    return written
