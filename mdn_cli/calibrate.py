"""Fit a checkpoint's post-hoc calibration on held-out images (after training, and for ensembles).

The std scale is fitted on val images (which already chose the epoch); the conformal levels on
calibration images that nothing else has touched. See calibration.py for the maths.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from . import mixture as mx
from .calibration import DEFAULT_LEVELS, Calibration, fit_sigma_scale
from .checkpoint import save_checkpoint
from .errors import DataError
from .inference import Predictor
from .labels import Example
from .runtime import Runtime


def calibrate_checkpoint(
    path: Path,
    method: str,
    val: list[Example],
    calibration: list[Example],
    runtime: Runtime,
    num_workers: int | str,
    log: Callable[[str], None],
    on_skip: Callable[[str], None],
) -> Calibration:
    """Fit `method` (none | scale | conformal) for the checkpoint at `path` and store it there."""
    predictor, ckpt = Predictor.from_checkpoint(path, runtime)
    result = Calibration()
    if method != "none":
        val_out = predictor.run([e.path for e in val], runtime, [e.target for e in val], num_workers=num_workers, on_skip=on_skip)
        if len(val_out.targets) == 0:
            raise DataError("no val image could be read: the std scale cannot be fitted")
        fit = fit_sigma_scale(predictor.scaler.to_mixture(*val_out.heads), val_out.targets)
        result = Calibration("scale", fit.scale, len(val_out.targets))
        log(f"std scale on {len(val_out.targets)} val images: component stds x {fit.scale:.3f}, "
            f"val NLL {fit.nll_before:.4f} -> {fit.nll_after:.4f}")
    if method == "conformal":
        if not calibration:
            log("note: no calibration images, so the intervals carry no coverage guarantee "
                "(raise data.calibration_fraction or add 'calibration' rows to the split column)")
        else:
            predictor.calibration = result
            out = predictor.run([e.path for e in calibration], runtime, [e.target for e in calibration],
                                num_workers=num_workers, on_skip=on_skip)
            m = predictor.mixture(out)
            pit = mx.cdf(m, out.targets).sort().values
            hdr = mx.hdr_score(m, out.targets).sort().values if hasattr(mx, "hdr_score") else torch.empty(0, dtype=torch.float64)
            result = Calibration("conformal", result.sigma_scale, result.val_images, pit, hdr)
            levels = ", ".join(
                f"{level:.0%} -> CDF levels {lo:.4f}..{hi:.4f}" for level in DEFAULT_LEVELS for lo, hi in [result.interval_probs(level)]
            )
            log(f"conformal intervals on {result.n_images} calibration images: {levels}")
            if "warning" in result.describe():
                log(f"warning: {result.describe()['warning']}")
    save_checkpoint({**ckpt, "calibration": result.state()}, path)
    return result
