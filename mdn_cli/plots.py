"""Matplotlib figures: evaluation diagnostics and per-image predictive densities (PNG files).

Every figure speaks in the user's words: `label` is the target as the config names it
("weight (lb)", see `config.target_label`), on the axes and in the titles.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from . import interrupts, metrics  # noqa: E402
from . import mixture as mx  # noqa: E402
from .calibration import Calibration, level_key  # noqa: E402
from .errors import DataError  # noqa: E402
from .modes import LIKELY_MASS  # noqa: E402
from .files import atomic_writer  # noqa: E402

DPI = 110

# One colour per meaning, the same in every figure. Components never use the density's colour,
# and none of them is red or green, which mark the mean and the median.
DENSITY = "#1f2d5c"
CENTRAL = "#4c8bd6"
HDR = "#1b9e77"
MEAN = "#d62828"
MEDIAN = "#2b9348"
MODE = "black"
MISS = "#d62828"
COMPONENTS = ("#e07b39", "#8e6cc4", "#8d6e63", "#e9b949", "#3fa7b5", "#c44569", "#6c757d")

# Above this many images, predicted-vs-true becomes a 2-D histogram: 3000 interval lines are a blur.
SCATTER_MAX = 1000


def checkpoint_label(checkpoint: Path) -> str:
    """The target's label ('weight (lb)') from a checkpoint's config, for plots made outside `evaluate`."""
    from .checkpoint import load_checkpoint
    from .config import target_label

    return target_label(load_checkpoint(checkpoint)["config"]["data"])


def _num(x: float | None) -> str:
    if x is None:
        return "unbounded"
    return f"{x:.4g}" if abs(x) < 1e5 else f"{x:.3e}"


def save_figure(fig: Figure, path: Path) -> Path:
    # Written to a temp file first: `curves.png` is redrawn during training while a user may be
    # looking at it, and an evaluation interrupted half way should not leave a torn PNG.
    try:
        with atomic_writer(path, "wb", durable=False) as f:
            fig.savefig(f, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    return path


def _split_of(evaluation) -> str | None:
    """The split every scored image belongs to ('test'), or None when mixed or unknown."""
    splits = {e.split for e in evaluation.examples}
    return splits.pop() if len(splits) == 1 else None


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluation_plots(evaluation, out: Path, label: str) -> list[Path]:
    """reliability.png, pit_histogram.png, predicted_vs_true.png and coverage_by_bin.png in `out`.

    `evaluation`: an `evaluate.Evaluation`; `label`: the target as axes name it, e.g. 'weight (lb)'."""
    split = _split_of(evaluation)
    n = len(evaluation.targets)
    images = f"{n} {split} image{'s' if n != 1 else ''}" if split else f"{n} image{'s' if n != 1 else ''}"
    figures = {
        "reliability.png": reliability_figure(evaluation, images),
        "pit_histogram.png": pit_figure(evaluation, images, label),
        "predicted_vs_true.png": predicted_vs_true_figure(evaluation, images, label),
        "coverage_by_bin.png": coverage_by_bin_figure(evaluation, images, label),
    }
    return [save_figure(fig, out / name) for name, fig in figures.items()]


def reliability_figure(evaluation, images: str) -> Figure:
    """Observed coverage of the reported central intervals against their nominal level, as
    reported and before calibration."""
    m, y, calibration = evaluation.mixture, evaluation.targets, evaluation.calibration
    reported = calibration.label
    levels = torch.linspace(0.02, 0.98, 49).tolist()
    fig, ax = plt.subplots(figsize=(5.8, 5.8), layout="constrained")
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", label="perfect calibration")
    if calibration.calibrated:
        raw = metrics.observed_coverage(mx.cdf(evaluation.raw, y), Calibration().attach(evaluation.raw), levels)
        ax.plot(levels, raw, color="0.45", lw=1.2, label="before calibration")
    observed = metrics.observed_coverage(mx.cdf(m, y), evaluation.pred, levels)
    ax.plot(levels, observed, color=CENTRAL, lw=2, label=f"reported ({reported})")
    # The binomial noise of an observed coverage: at 40 images a 10-point gap is chance.
    se = [2 * metrics.binomial_se(p, len(y)) for p in levels]
    ax.fill_between(levels, [p - s for p, s in zip(levels, se)], [p + s for p, s in zip(levels, se)], color="0.85",
                    label="±2 s.e. around the diagonal", zorder=0)
    ax.set(xlabel="nominal coverage of the central interval", ylabel="observed share of true values inside it",
           xlim=(0, 1), ylim=(0, 1), aspect="equal")
    ax.set_title(f"Reliability of the reported intervals\n{images}", fontsize=11)
    ax.text(0.03, 0.97, "above the diagonal: intervals too wide\nbelow: too narrow (overconfident)", fontsize=8,
            color="0.3", va="top", transform=ax.transAxes)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def pit_figure(evaluation, images: str, label: str) -> Figure:
    """PIT histogram of the model's distribution (after the std scale): flat when calibrated."""
    pit = mx.cdf(evaluation.mixture, evaluation.targets)
    n = len(pit)
    bins = int(min(20, max(5, round(math.sqrt(n)))))  # ~2 images per bin at n = 40 would be all noise
    expected = n / bins
    band = 2 * math.sqrt(n * (1 / bins) * (1 - 1 / bins))
    fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
    ax.hist(pit.numpy(), bins=bins, range=(0, 1), color=CENTRAL, edgecolor="white")
    ax.axhspan(max(expected - band, 0), expected + band, color="0.6", alpha=0.25, zorder=0, label="±2 s.e. of a flat histogram")
    ax.axhline(expected, color="0.3", ls="--", label="flat: calibrated")
    ax.set(xlabel=f"PIT: predicted probability of a value below the true {label}", ylabel="images", xlim=(0, 1))
    ax.set_title(f"PIT histogram ({images})\nU-shape: overconfident; hump: too cautious; slope: biased", fontsize=10)
    ax.legend(loc="upper center", fontsize=8, ncols=2, bbox_to_anchor=(0.5, -0.18), frameon=False)
    return fig


def predicted_vs_true_figure(evaluation, images: str, label: str) -> Figure:
    """Predicted median against the truth with the reported widest interval. Up to SCATTER_MAX
    images: one light line per interval and a dot per median. Above, where 3000 lines are a
    blur: a 2-D histogram of the medians, the misses as red dots, and the typical interval
    per decile of the true value (coverage_by_bin.png has the coverage per decile)."""
    m, y = evaluation.mixture, evaluation.targets
    n = len(y)
    level = max(evaluation.levels)
    key = level_key(level)
    lo, hi = evaluation.pred.interval(level)
    median = mx.median(m)
    inside = (y >= lo) & (y <= hi)
    lo_f, hi_f = torch.where(torch.isfinite(lo), lo, median), torch.where(torch.isfinite(hi), hi, median)
    fig, ax = plt.subplots(figsize=(6.6, 6.6), layout="constrained")
    if n <= SCATTER_MAX:
        alpha = float(min(0.5, max(0.08, 20.0 / max(n, 1))))
        for mask, color, what in ((inside, CENTRAL, "covers the truth"), (~inside, MISS, "misses")):
            if mask.any():
                ax.vlines(y[mask].numpy(), lo_f[mask].numpy(), hi_f[mask].numpy(), color=color, alpha=alpha, lw=1.2)
                ax.scatter(y[mask].numpy(), median[mask].numpy(), s=16 if n <= 200 else 7, color=color, zorder=3,
                           edgecolors="white", linewidths=0.3, label=f"median; its {key}% interval {what} ({int(mask.sum())})")
        ax.set_ylabel(f"predicted median {label}\n(lines: reported {key}% intervals)")
        values = torch.cat([y, median, lo_f, hi_f])
    else:
        order = torch.argsort(y)
        deciles = torch.tensor_split(order, 10)
        centre = [float(y[c].median()) for c in deciles]
        low = [float(lo_f[c].median()) for c in deciles]
        high = [float(hi_f[c].median()) for c in deciles]
        values = torch.cat([y, median, torch.tensor(low + high, dtype=torch.float64)])
        span = (float(values.min()), float(values.max()))
        counts = ax.hist2d(y.numpy(), median.numpy(), bins=60, range=[span, span], cmap="Blues", norm=LogNorm(), cmin=1)[3]
        fig.colorbar(counts, ax=ax, label="images per cell (median vs truth)", shrink=0.6)
        ax.scatter(y[~inside].numpy(), median[~inside].numpy(), s=4, color=MISS, alpha=0.7, lw=0, zorder=3,
                   label=f"median whose {key}% interval misses ({int((~inside).sum())})")
        ax.plot(centre, low, color=DENSITY, lw=1.3, marker="_", zorder=4,
                label=f"typical {key}% interval (median ends) per decile of the truth")
        ax.plot(centre, high, color=DENSITY, lw=1.3, marker="_", zorder=4)
        ax.set_ylabel(f"predicted median {label}")
    span = [float(values.min()), float(values.max())]
    pad = 0.03 * (span[1] - span[0])
    span = [span[0] - pad, span[1] + pad]
    ax.plot(span, span, color="0.3", ls="--", lw=1, label="prediction = truth")
    ax.set(xlabel=f"true {label}", xlim=span, ylim=span, aspect="equal")
    covered = float(inside.double().mean())
    ax.set_title(f"Predicted vs true ({images})\n{key}% intervals cover {covered:.1%} of the true values", fontsize=10)
    ax.legend(loc="upper left", fontsize=7.5, framealpha=0.9, markerscale=2.5)
    return fig


def coverage_by_bin_figure(evaluation, images: str, label: str) -> Figure:
    """Coverage of each reported interval within quintiles of the predicted std, of the predicted
    value and of the true value (and within each group), with ±2 binomial standard errors, the
    nominal levels, and the homogeneity test's p-value per level in each panel's title."""
    conditional = evaluation.metrics["conditional"]
    panels = [(key, what) for key, what in (("by_predicted_std", f"predicted std of {label}"),
                                            ("by_predicted_value", f"predicted {label} (mean)"),
                                            ("by_target", f"true {label}"), ("by_group", "group")) if key in conditional]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.9), sharey=True, layout="constrained", squeeze=False)
    handles = []
    for ax, (key, xlabel) in zip(axes[0], panels):
        table = conditional[key]
        rows = table["cells"]
        x = list(range(len(rows)))
        handles = []
        tests = []
        for j, level in enumerate(evaluation.levels):
            k = level_key(level)
            cov = [r[f"coverage_{k}"] for r in rows]
            err = [2 * r[f"se_{k}"] for r in rows]
            # Clipped to [0, 1]: with a few images per bin the normal approximation runs past both.
            yerr = [[min(e, c) for c, e in zip(cov, err)], [min(e, 1 - c) for c, e in zip(cov, err)]]
            shift = 0.12 * (j - (len(evaluation.levels) - 1) / 2)
            color = (CENTRAL, "#e07b39", "#8e6cc4", "#6c757d")[j % 4]
            handles.append(ax.errorbar([v + shift for v in x], cov, yerr=yerr, fmt="o-", ms=4, lw=1.2, capsize=2.5,
                                       color=color, label=f"{k}% interval (bars: ±2 s.e.)"))
            handles.append(ax.axhline(level, color=color, ls="--", lw=0.9, label=f"nominal {k}%"))
            tests.append(f"{k}%: p={table['homogeneity'][k]['p_value']:.2g}")
        ax.set_xticks(x, [r["cell"] for r in rows], rotation=35, ha="right", rotation_mode="anchor", fontsize=8)
        ax.set(xlabel=xlabel + ("" if key == "by_group" else " (equal-count bins)"), ylim=(0, 1.04), xlim=(-0.5, len(rows) - 0.5))
        ax.grid(axis="y", color="0.92")
        per_bin = sorted({r["n"] for r in rows})
        ax.set_title(f"{per_bin[0]}{f'-{per_bin[-1]}' if len(per_bin) > 1 else ''} images per bin\n"
                     f"same coverage in every bin? {', '.join(tests)}", fontsize=9)
    axes[0][0].set_ylabel("observed coverage")
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    fig.suptitle(f"Coverage of the reported intervals, bin by bin ({images}; p: chi-square test that every bin covers alike)",
                 fontsize=11)
    return fig


# ---------------------------------------------------------------------------------------------
# Per-image density


def _ends(pair, low: float, high: float) -> tuple[float, float]:
    """An interval's ends for drawing; a None (unbounded) end becomes the plot's edge."""
    a, b = pair
    return (low if a is None else a), (high if b is None else b)


def density_figure(image, m: mx.Mixture, summary: dict, label: str, name: str) -> Figure:
    """The image beside its predicted density (row 0 of `m`, which must be the scaled mixture the
    record `summary` was made from), all in target units.

    Draws the density (under a log transform, of the target itself: the Jacobian is in
    `mx.log_prob`), each component with weight >= 1%, the reported central intervals shaded, the
    mean and median, the modes (annotated with their mass when `summary["modes"]` has them), and a
    strip below the axis with the central intervals and, when present, the highest-density regions
    (`hdr_68`, `hdr_95`: lists of [low, high] pieces). `summary["in_distribution"] is False` adds a
    warning. Artists carry a gid ("hdr_68", "component_1", "mode_2", ...) that tests can find."""
    levels = sorted((k.removeprefix("interval_") for k in summary if k.startswith("interval_")), key=float)
    modes = summary.get("modes") or [{"location": summary["mode"], "mass": None}]
    # Highest-density regions say more than the central intervals only for a multimodal answer.
    multimodal = sum(1 for md in modes if (md.get("mass") or 0) >= LIKELY_MASS) > 1
    hdr_keys = [f"hdr_{k}" for k in levels if summary.get(f"hdr_{k}")] if multimodal else []

    # The x range: nearly all the mass, plus everything the record reports, with a little room.
    q = mx.quantile(m, [0.0025, 0.9975])[0].tolist()
    marks = [summary["mean"], summary["median"], *(d["location"] for d in modes)]
    marks += [v for k in levels for v in summary[f"interval_{k}"] if v is not None]
    marks += [v for key in hdr_keys for piece in summary[key] for v in piece if v is not None]
    low, high = min(q[0], *marks), max(q[1], *marks)
    pad = 0.06 * (high - low) + 1e-12 * max(abs(low), abs(high), 1.0)
    low, high = low - pad, high + pad
    if m.transform == "log":
        low = max(low, 0.0)  # no mass below zero; the axis starts there at the lowest
    # A fine grid plus the exact points drawn (interval ends, component centres, modes), so that
    # shading starts where the interval does and narrow peaks are not cut down by the grid.
    exact = [v for v in marks if low <= v <= high]
    centres = mx.Mixture(torch.ones(m.means.shape[1], 1), m.means[:1].reshape(-1, 1), m.stds[:1].reshape(-1, 1), m.transform)
    exact += [v for v in mx.median(centres).tolist() if low <= v <= high]
    grid = torch.cat([torch.linspace(low, high, 1500, dtype=torch.float64), torch.tensor(exact, dtype=torch.float64)])
    grid = torch.unique(grid[(grid > 0) | (m.transform != "log")])  # sorted; log p(0) is -inf, not a point to draw
    rows = mx.Mixture(m.weights[:1].expand(len(grid), -1), m.means[:1].expand(len(grid), -1),
                      m.stds[:1].expand(len(grid), -1), m.transform)
    density = mx.log_prob(rows, grid).exp()
    g, d = grid.numpy(), density.numpy()

    strip_rows = [(f"{k}% central" + (" (unbounded)" if None in summary[f"interval_{k}"] else ""), "central", summary[f"interval_{k}"])
                  for k in levels]
    strip_rows += [(f"{key.removeprefix('hdr_')}% HDR", "hdr", summary[key]) for key in hdr_keys]
    fig = plt.figure(figsize=(12.5, 5.6 + 0.22 * len(strip_rows)), layout="constrained")
    grid_spec = fig.add_gridspec(2, 2, width_ratios=[1, 2.4], height_ratios=[5, 0.55 + 0.32 * len(strip_rows)])
    ax_img = fig.add_subplot(grid_spec[:, 0])
    ax = fig.add_subplot(grid_spec[0, 1])
    strip = fig.add_subplot(grid_spec[1, 1], sharex=ax)

    ax_img.imshow(image)
    ax_img.set_axis_off()

    # Central intervals: the widest shaded lightest, so the narrower ones show as darker bands.
    # Legend: the density and its summaries in the first row, what it is made of below.
    handles = [Line2D([], [], color=DENSITY, lw=2.4, label=f"predicted density of {label}")]
    parts = []
    for i, k in enumerate(reversed(levels)):
        a, b = _ends(summary[f"interval_{k}"], low, high)
        alpha = 0.14 + 0.16 * i
        ax.fill_between(g, 0, d, where=(g >= a) & (g <= b), color=CENTRAL, alpha=alpha, lw=0, gid=f"interval_{k}")
        parts.insert(0, Patch(color=CENTRAL, alpha=alpha, label=f"{k}% central interval"))
    for k in range(m.weights.shape[1]):
        w = float(m.weights[0, k])
        if w < 0.01:
            continue
        comp = mx.Mixture(torch.ones(len(grid), 1), m.means[:1, k : k + 1].expand(len(grid), 1),
                          m.stds[:1, k : k + 1].expand(len(grid), 1), m.transform)
        color = COMPONENTS[k % len(COMPONENTS)]
        # On top of the density: where components are far apart each one *is* the density there,
        # and drawn underneath it would vanish.
        line, = ax.plot(g, w * mx.log_prob(comp, grid).exp().numpy(), ls=(0, (3, 2)), lw=1.5, color=color, zorder=5,
                        label=f"component {k + 1}, weight {w:.2f}", gid=f"component_{k + 1}")
        parts.append(line)
    ax.plot(g, d, color=DENSITY, lw=2.4, zorder=4, gid="density")
    handles.append(ax.axvline(summary["mean"], color=MEAN, lw=1.4, zorder=3, label=f"mean {_num(summary['mean'])}", gid="mean"))
    handles.append(ax.axvline(summary["median"], color=MEDIAN, lw=1.4, ls="--", zorder=3,
                              label=f"median {_num(summary['median'])}", gid="median"))

    peak = float(density.max())
    at = lambda x: float(mx.log_prob(m[0], torch.tensor([x])).exp())  # noqa: E731
    previous, raised = -math.inf, False
    for i, mode in enumerate(sorted(modes, key=lambda md: md["location"])):
        x, mass = mode["location"], mode.get("mass")
        ax.plot([x], [at(x)], marker="v", color=MODE, ms=7, ls="none", zorder=6, gid=f"mode_{i + 1}")
        text = f"mode {_num(x)}" if mass is None else f"mode {_num(x)}\n{mass:.0%} of the mass"
        # A label close to the previous one goes higher, so that close modes do not print over each other.
        raised = (x - previous < 0.12 * (high - low)) and not raised
        previous = x
        ax.annotate(text, (x, at(x)), textcoords="offset points", xytext=(0, 9 + 24 * raised), ha="center",
                    va="bottom", fontsize=8, zorder=6, bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
    handles.append(Line2D([], [], marker="v", color=MODE, ls="none",
                          label="mode" if len(modes) == 1 and modes[0].get("mass") is None else "modes, with their share of the mass"))
    ax.set(ylabel="probability density", ylim=(0, peak * 1.32), xlim=(low if m.transform != "log" else g[0], high))
    ax.tick_params(labelbottom=False)
    ax.grid(axis="x", color="0.93")

    # The intervals as bars under the axis: an HDR in pieces shows every piece.
    strip.set_ylim(-0.6, len(strip_rows) - 0.4)
    for row, (name_, kind, value) in enumerate(reversed(strip_rows)):
        pieces = value if kind == "hdr" else [value]
        spans = [_ends(p, low, high) for p in pieces]
        color = HDR if kind == "hdr" else CENTRAL
        strip.broken_barh([(a, b - a) for a, b in spans], (row - 0.32, 0.64), color=color,
                          alpha=0.9 if kind == "hdr" else 0.55, gid=f"{kind}_{name_.split('%')[0]}")
        for p, (a, b) in zip(pieces, spans):
            for end, x, side in ((p[0], a, "left"), (p[1], b, "right")):
                if end is None:  # unbounded: an arrow at the plot's edge
                    strip.annotate("", (x, row), xytext=(x + (20 if side == "left" else -20) * (high - low) / 600, row),
                                   arrowprops={"arrowstyle": "-|>", "color": DENSITY, "mutation_scale": 12})
        if kind == "hdr" and len(pieces) > 1:
            strip.text(high, row, f" {len(pieces)} pieces", va="center", ha="left", fontsize=7, color="0.3")
    strip.set_yticks(range(len(strip_rows)), [r[0] for r in reversed(strip_rows)], fontsize=8)
    strip.tick_params(axis="y", length=0)
    for side in ("left", "right", "top"):
        strip.spines[side].set_visible(False)
    strip.set_xlabel(label)
    strip.grid(axis="x", color="0.93")

    head = textwrap.fill(name, 110)
    s = summary
    line = (f"{label}: mean {_num(s['mean'])} ± {_num(s['std'])} (std), median {_num(s['median'])}"
            + "".join(f", {k}% interval [{_num(s[f'interval_{k}'][0])}, {_num(s[f'interval_{k}'][1])}]" for k in levels))
    fig.suptitle(f"{head}\n{textwrap.fill(line, 130)}", fontsize=10)
    if s.get("in_distribution") is False:
        ax.set_title(f"⚠ This image is unlike the images the model was trained on (unfamiliarity {s['ood_score']:.2f}; "
                     "above 1 is flagged):\nits numbers may be confidently wrong", color=MEAN, fontsize=9, fontweight="bold")
    ncols = len(handles)
    fig.legend(handles=_row_major(handles + parts, ncols), loc="outside lower center", ncols=ncols, fontsize=8, frameon=False)
    return fig


def _row_major(items: list, ncols: int) -> list:
    """Reorder so that a legend, which fills column by column, reads row by row."""
    nrows = math.ceil(len(items) / ncols)
    grid = [items[r * ncols : (r + 1) * ncols] for r in range(nrows)]
    return [row[c] for c in range(ncols) for row in grid if c < len(row)]


def density_plot(image, m: mx.Mixture, summary: dict, label: str, name: str, path: Path) -> Path:
    """Write `density_figure` to `path` (PNG)."""
    return save_figure(density_figure(image, m, summary, label, name), path)


def write_density_plots(predictions, m: mx.Mixture, out: Path, label: str,
                        on_written: Callable[[Path], None] = lambda path: None) -> list[Path]:
    """One `<image stem>.png` per prediction (row i of `m` belongs to predictions[i]); `label`
    names the target on the axes ('weight (lb)', see `checkpoint_label`). Each plot is a safe
    point for a stop; `on_written(path)` as each is written."""
    from .images import load_rgb

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--plot: cannot create the folder {out} ({e.strerror or type(e).__name__})") from None
    written, used = [], set()
    for i, p in enumerate(predictions):
        interrupts.reached("plot")
        interrupts.check()
        name = Path(p.image).stem
        while name in used:  # same file name in two folders
            name += "_"
        used.add(name)
        written.append(density_plot(load_rgb(p.image), m[i : i + 1], p.summary, label, str(p.image), out / f"{name}.png"))
        on_written(written[-1])
    return written


def label_histogram(targets: list[float], path: Path, label: str, source: Path) -> Path:
    """The labels' distribution (`mdn check-data`): a histogram, the median, and the same on a log axis
    for positive labels (where a log transform would make a skewed target symmetric)."""
    values = torch.tensor(targets, dtype=torch.float64)
    positive = bool((values > 0).all())
    fig, axes = plt.subplots(1, 2 if positive else 1, figsize=(11 if positive else 6.4, 4.2), layout="constrained", squeeze=False)
    bins = min(60, max(10, int(math.sqrt(len(values)))))
    panels = [(axes[0][0], values.numpy(), label)] + ([(axes[0][1], values.log().numpy(), f"log {label}")] if positive else [])
    for ax, data, xlabel in panels:
        ax.hist(data, bins=bins, color=CENTRAL, alpha=0.85)
        ax.axvline(float(np.median(data)), color=MEDIAN, lw=1.4, label=f"median {float(np.median(data)):.4g}")
        ax.set(xlabel=xlabel, ylabel="images")
        ax.legend(fontsize=8)
    fig.suptitle(f"Labels of {source} ({len(values)} images)", fontsize=11)
    return save_figure(fig, path)
