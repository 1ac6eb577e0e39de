"""Training curves: curves.png in the run folder, redrawn as epochs end (train.py: CURVES_EVERY_S), and optionally
TensorBoard event files (run.tensorboard: true) for those who watch runs there."""

from __future__ import annotations

import math
import weakref
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .errors import ConfigError  # noqa: E402
from .plots import save_figure  # noqa: E402

BEST = "#d62828"
NLL_LINES = (("train_nll", "train", "#6c757d", "-"), ("val_nll", "val", "#1f2d5c", "-"),
             ("val_nll_calibrated", "val after the best std scale (what calibration gives)", "#4c8bd6", "--"))


def curves_figure(history: list[dict], best_epoch: int | None, label: str) -> Figure:
    """Three panels over the epochs of `history` (rows of metrics.csv): NLL (train, val, val after
    the best std scale), val MAE of the predicted mean in target units, learning rate. The best
    epoch is a vertical line (gid "best_epoch") in every panel."""
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(3, 1, figsize=(8, 8.4), sharex=True, layout="constrained",
                             gridspec_kw={"height_ratios": [1.5, 1, 0.8]})
    nll, mae, lr = axes
    few = len(history) <= 30  # markers help read a handful of epochs; on 200 they are a smear
    style = {"marker": "o", "ms": 3.5} if few else {}
    for key, name, color, ls in NLL_LINES:
        nll.plot(epochs, [r[key] for r in history], color=color, ls=ls, lw=1.6, label=name, **style)
    nll.set_ylabel("NLL (nats per image)\nlower is better")
    # Early epochs can sit far above the rest; keep the axis on the part where the choice is made.
    values = [r[k] for r in history for k, *_ in NLL_LINES if math.isfinite(r[k])]
    if len(history) > 4 and values:
        late = [r[k] for r in history[len(history) // 4 :] for k, *_ in NLL_LINES if math.isfinite(r[k])]
        top, bottom = max(late), min(values)
        if max(values) - bottom > 3 * (top - bottom):
            nll.set_ylim(bottom - 0.1 * (top - bottom), top + 0.6 * (top - bottom))
            nll.text(0.99, 0.97, "first epochs above the top of the axis", transform=nll.transAxes, ha="right",
                     va="top", fontsize=7, color="0.4")
    mae.plot(epochs, [r["val_mae"] for r in history], color="#1f2d5c", lw=1.6, label="val", **style)
    mae.set_ylabel(f"val MAE of the mean\n({label})")
    rates = [r["lr"] for r in history]
    positive = [v for v in rates if v > 0]
    if positive and (max(positive) / min(positive) > 30 or len(positive) < len(rates)):
        # Cosine decay ends at (nearly) zero, which a log axis cannot show: the axis stops four
        # decades below the peak and those last epochs sit on its bottom edge, marked as such.
        floor = max(min(positive) / 2, max(positive) * 1e-4)
        lr.set_yscale("log")
        lr.set_ylim(floor, max(positive) * 2)
        lr.plot(epochs, [max(v, floor) for v in rates], color="#6c757d", lw=1.6, **style)
        if min(rates) < floor:
            lr.text(0.99, 0.05, f"on the bottom edge: below {floor:.0e} (0 at the end of the decay)", transform=lr.transAxes,
                    ha="right", va="bottom", fontsize=7, color="0.4")
    else:
        lr.plot(epochs, rates, color="#6c757d", lw=1.6, **style)
        lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    lr.set_ylabel("learning rate\n(head)")
    lr.set_xlabel("epoch")
    for ax in axes:
        ax.grid(color="0.93")
        if best_epoch is not None:
            ax.axvline(best_epoch, color=BEST, lw=1.2, ls=":", gid="best_epoch",
                       label=f"best epoch ({best_epoch})" if ax is nll else None)
    if best_epoch is not None:
        row = next((r for r in history if r["epoch"] == best_epoch), None)
        if row is not None:
            nll.plot([best_epoch], [row["val_nll_calibrated"]], marker="*", ms=12, color=BEST, ls="none", zorder=5)
            mae.annotate(f"{row['val_mae']:.4g}", (best_epoch, row["val_mae"]), textcoords="offset points", xytext=(4, 4),
                         fontsize=8, color=BEST)
    # Above the panel, not in it: wherever it sits inside, some run's curves pass under it.
    nll.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.01), ncols=2, frameon=False)
    for ax in (nll, mae):
        ax.ticklabel_format(axis="y", useOffset=False)  # 3.9224, not "+3.922" and 0.0004
    last = epochs[-1] if epochs else 1
    nll.set_xlim(0.5, max(last, 1) + 0.5)
    if last <= 12:
        lr.set_xticks(range(1, max(last, 1) + 1))
    done = f"{len(history)} epoch{'s' if len(history) != 1 else ''}"
    fig.suptitle(f"Training curves ({done}{f', best: epoch {best_epoch}' if best_epoch is not None else ''})", fontsize=11)
    return fig


def write_curves(history: list[dict], path: Path, best_epoch: int | None, label: str) -> Path:
    """Write `curves_figure` to `path` (PNG) atomically: a viewer never sees half a file."""
    return save_figure(curves_figure(history, best_epoch, label), Path(path))


# ---------------------------------------------------------------------------------------------
# TensorBoard

TENSORBOARD_FOLDER = "tensorboard"
INSTALL_HINT = 'pip install "mdn-cli[tensorboard]"'


def tensorboard_log(folder: Path, main: bool = True) -> TensorBoardLog | None:
    """The run's TensorBoard log in `folder` (None on every process but the main one, which alone
    writes files). Every process raises ConfigError when tensorboard is not installed, so that
    none of them goes on to wait for the others."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(f"run.tensorboard: true needs the tensorboard package: {INSTALL_HINT} "
                          "(or set run.tensorboard: false; curves.png is written either way)") from None
    return TensorBoardLog(SummaryWriter(str(folder))) if main else None


class TensorBoardLog:
    """Scalars per epoch (every metrics.csv column), through torch's own SummaryWriter."""

    def __init__(self, writer):
        self.writer = writer
        # Training has no end-of-run hook for this; close (flush and stop the writer's thread) when
        # the training object goes away or the process ends.
        self._close = weakref.finalize(self, self.writer.close)

    def log(self, row: dict) -> None:
        """One metrics.csv row: every number but the epoch, at step = epoch."""
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, row["epoch"])
        self.writer.flush()  # so that a running TensorBoard shows the epoch now

    def close(self) -> None:
        self._close()
