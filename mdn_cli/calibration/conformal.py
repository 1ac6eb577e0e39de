"""`conformal` (the default): a std scale that depends on the prediction (val), then Mondrian split
conformal in cells of predicted value x predicted spread (x group).

1. On val: the covariate std scale (scale.py) moves each prediction's spread towards what val
   images show for predictions of its centre and spread; the bin edges of both are quantiles of
   the val images' scaled predictions.
2. On the calibration split: each cell's own sorted PIT values and HDR scores (cells.py).
A new image in a cell with n calibration images gets intervals that cover at least their level
of new images of that cell, and below level + 1/(n+1): the promise of split conformal, held
within each cell (Vovk 2012), so the narrowest predictions, the two ends of the target's range
and each group get what the level says. A cell with too few images falls back to its group, then
to all images, and its records say so.
"""

from __future__ import annotations

import torch

from .. import mixture as mx
from .. import modes
from . import Calibration, FitData, Method, register
from .cells import CellScores, Taxonomy, grid_for, quantile_edges
from .scale import covariates, fit_covariates

GROUP_VAL_IMAGES = 20
"""Val images a group needs for bin edges of its own (fewer: the pooled edges)."""


def fit_conformal(data: FitData) -> Calibration:
    scale = fit_covariates(data.val, data.val_targets)
    val = scale.apply(data.val)
    cal = scale.apply(data.cal)
    names = sorted({g for g in data.cal_groups or [] if g is not None})
    per_group = min((sum(1 for g in data.cal_groups if g == name) for name in names), default=len(cal))
    centre_bins, spread_bins = grid_for(per_group)
    centre, spread = covariates(val)
    pooled = (quantile_edges(centre, centre_bins), quantile_edges(spread, spread_bins))
    # Each group's bins from its own val images (a quiet group's spreads sit low: pooled edges would
    # crowd its images into the narrow cells and leave its others small); pooled for a group with
    # too few val images to place edges.
    group_edges = []
    for name in names if data.val_groups is not None else ():
        rows = torch.tensor([g == name for g in data.val_groups], dtype=torch.bool)
        enough = int(rows.sum()) >= GROUP_VAL_IMAGES
        group_edges.append((quantile_edges(centre[rows], centre_bins), quantile_edges(spread[rows], spread_bins)) if enough else pooled)
    taxonomy = Taxonomy(*pooled, tuple(names), tuple(group_edges))
    cells, groups = taxonomy.assign(cal, data.cal_groups)
    pit, hdr = mx.cdf(cal, data.cal_targets), modes.hdr_score(cal, data.cal_targets)
    return Calibration("conformal", scale, taxonomy, CellScores.of(taxonomy, cells, groups, pit, hdr))


def _guarantee(n: int, which: dict | None) -> str:
    if not which or which.get("set") == "all calibration images":
        return (f"split conformal on all {n} calibration images: each interval covers at least its level of new images like "
                "them, on average over images")
    if which["set"] == "group":
        return (f"split conformal on the {n} calibration images of group {which['group']!r}: each interval covers at least "
                "its level of new images of that group, on average over them")
    if which["set"] == "cells":
        return (f"Mondrian split conformal on {n} calibration images, each cell (predicted value and spread, and group) "
                "calibrated on its own images: each interval covers at least its level of new images of its cell, on average over them")
    return (f"Mondrian split conformal on the {n} calibration images of this prediction's cell (its predicted value and "
            "spread, and group): each interval covers at least its level of new images of the same cell, on average over them")


register(Method(
    "conformal", "a std scale by predicted value and spread (val), then split conformal within cells of both (and of groups)",
    fit_conformal, conformal=True, scales=True, guarantee=_guarantee,
))
