"""Matplotlib figures: evaluation diagnostics and per-image predictive densities (PNG files)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from . import metrics  # noqa: E402
from . import mixture as mx  # noqa: E402


def evaluation_plots(m: mx.Mixture, y: torch.Tensor, out: Path, probs95=mx.P95) -> list[Path]:
    """reliability.png, pit_histogram.png and predicted_vs_true.png in `out`; `probs95` are the
    CDF levels of the 95% interval ends."""
    y = y.double()
    pit = mx.cdf(m, y)
    paths = [out / "reliability.png", out / "pit_histogram.png", out / "predicted_vs_true.png"]

    # Reliability: observed coverage of central intervals against their nominal level.
    levels = torch.linspace(0.02, 0.98, 49).tolist()
    observed = metrics.central_coverage(pit, levels)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", label="perfect calibration")
    ax.plot(levels, observed, color="C0", lw=2, label="model")
    ax.set(xlabel="nominal coverage of central interval", ylabel="observed coverage", xlim=(0, 1), ylim=(0, 1),
           title=f"Reliability ({len(y)} images)")
    ax.text(0.04, 0.9, "above the diagonal: intervals too wide\nbelow: too narrow (overconfident)", fontsize=8, color="0.3")
    ax.legend(loc="lower right")
    _save(fig, paths[0])

    # PIT histogram: flat for a calibrated model.
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = 20
    ax.hist(pit.numpy(), bins=bins, range=(0, 1), color="C0", edgecolor="white")
    ax.axhline(len(y) / bins, color="0.3", ls="--", label="uniform (calibrated)")
    ax.set(xlabel="PIT = predicted CDF at the true value", ylabel="images", title="PIT histogram")
    ax.legend()
    _save(fig, paths[1])

    # Predicted median with 95% intervals against the truth.
    lo, hi = mx.quantile(m, list(probs95)).unbind(-1)
    median = mx.median(m)
    inside = (y >= lo) & (y <= hi)
    fig, ax = plt.subplots(figsize=(6, 6))
    for mask, color, label in ((inside, "C0", "95% interval covers truth"), (~inside, "C3", "misses")):
        if mask.any():
            ax.errorbar(y[mask].numpy(), median[mask].numpy(),
                        yerr=[(median - lo)[mask].numpy(), (hi - median)[mask].numpy()],
                        fmt="o", ms=3, color=color, ecolor=color, elinewidth=0.6, alpha=0.6, label=f"{label} ({int(mask.sum())})")
    span = [float(torch.minimum(y.min(), lo.min())), float(torch.maximum(y.max(), hi.max()))]
    ax.plot(span, span, color="0.4", ls="--", lw=1)
    ax.set(xlabel="true value", ylabel="predicted median (bars: 95% interval)", title="Predicted vs true")
    ax.legend(loc="upper left")
    _save(fig, paths[2])
    return paths


def density_plot(image, m: mx.Mixture, summary: dict, title: str, path: Path) -> Path:
    """The image beside its predicted density (row 0 of `m`): mean, median, 68%/95% intervals and
    each weighted component, all in target units."""
    lo, hi = summary["interval_95"]
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
    lo68, hi68 = summary["interval_68"]
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
        title = f"{Path(p.image).name}\nmean {s['mean']:.4g}, std {s['std']:.4g}, 95% [{s['interval_95'][0]:.4g}, {s['interval_95'][1]:.4g}]"
        written.append(density_plot(load_rgb(p.image), m[i : i + 1], s, title, out / f"{name}.png"))
    return written
