"""`marginal`: one constant std scale (val), then split conformal over all calibration images.

Each interval covers at least its level of new images like the calibration images, on average
over images (Lei et al. 2018): exact whatever the network, but only on average, so the narrowest
predictions and whole groups of images can sit below the level while others sit above it.
"""

from __future__ import annotations

import torch

from .. import mixture as mx
from .. import modes
from . import Calibration, FitData, Method, register
from .cells import CellScores, Taxonomy
from .scale import fit_constant


def fit_marginal(data: FitData) -> Calibration:
    scale = fit_constant(data.val, data.val_targets)
    m = scale.apply(data.cal)
    pit, hdr = mx.cdf(m, data.cal_targets), modes.hdr_score(m, data.cal_targets)
    zero = torch.zeros(len(m), dtype=torch.long)
    return Calibration("marginal", scale, Taxonomy(), CellScores.of(Taxonomy(), zero, zero, pit, hdr))


register(Method(
    "marginal", "a constant std scale (val), then split conformal over all calibration images", fit_marginal, conformal=True, scales=True,
    guarantee=lambda n, which: (f"split conformal on {n} calibration images: each interval covers at least its level of new "
                                "images like them, on average over images (not within each kind of image)"),
))
