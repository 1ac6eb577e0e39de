"""Mondrian taxonomies: which calibration images a prediction is calibrated with.

Split conformal promises its coverage on average over images. Calibrating each *cell* of images
on its own calibration images (Mondrian conformal, Vovk 2012) makes the promise hold within each
cell: for predictions of a given spread, of a given predicted value, of a user's group. A cell is
   (group, bin of the predicted centre, bin of the predicted log spread)
of the scaled mixture (scale.covariates), with bin edges at quantiles of the val images' values,
never of the calibration images' (the edges would then depend on the scores they calibrate).
Each cell needs images: bins are made so that about `images_per_cell` calibration images land in
each, and a cell with fewer than `min_images` falls back to its group's cell, then to all images,
and says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import mixture as mx
from .scale import covariates

IMAGES_PER_CELL = 100
"""About this many calibration images per cell (at least, and under twice it). MAPIE advises about
200 for Mondrian conformal on its own; here the covariate std scale fitted on val has already
taken out most of the trend in spread and value, and the cells only correct what is left: on
UTKFace, 2 x 2 cells of about 130 images held every quintile's coverage where 1 cell of 520 did
not (README, "How much can I trust the intervals?"). A 95% interval from 130 images still has a
realised coverage within about 2 points (s.d.) of its level."""
MIN_IMAGES = 50
"""Fewer than this in a cell and it falls back (a 95% interval needs 39 for finite ends)."""
SPREAD_CELL = 60
"""Calibration images per cell when there are too few for a 2 x 2 grid (under 400): the cells then
split the predicted spread alone, the axis where an average hides most (narrow intervals cover
too rarely). 60 keeps every cell above MIN_IMAGES; 199 images make 3 cells of about 66."""


def bins_for(n: int, axes: int, images_per_cell: int = IMAGES_PER_CELL) -> int:
    """Bins per axis so that n images over `axes` axes give about `images_per_cell` a cell (>= 1)."""
    return max(1, int(math.floor((n / images_per_cell) ** (1.0 / axes)))) if axes else 1


def grid_for(n: int) -> tuple[int, int]:
    """(value bins, spread bins) for n calibration images (per group): a square grid of about
    IMAGES_PER_CELL a cell when it has 2 bins a side or more, else bins of the spread alone."""
    bins = bins_for(n, 2)
    return (bins, bins) if bins > 1 else (1, max(1, n // SPREAD_CELL))


def quantile_edges(values: Tensor, bins: int) -> tuple[float, ...]:
    """The bins - 1 inner edges splitting `values` into equal-count bins."""
    if bins <= 1 or values.numel() == 0:
        return ()
    q = torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1]
    return tuple(torch.quantile(values.double(), q).tolist())


@dataclass(frozen=True)
class Taxonomy:
    """How a row is put in a cell. Edges are inner edges (ascending): k edges make k + 1 bins."""

    centre_edges: tuple[float, ...] = ()
    spread_edges: tuple[float, ...] = ()
    groups: tuple[str, ...] = ()
    """The groups that have cells of their own (data.group_column); empty: no groups."""
    group_edges: tuple[tuple[tuple[float, ...], tuple[float, ...]], ...] = ()
    """Per group (in `groups`' order): its own (centre, spread) edges, from its own val images, so
    that each group's cells hold about equal shares of its calibration images. Empty: every group
    uses the pooled edges above (which rows without a group always use)."""

    @property
    def shape(self) -> tuple[int, int, int]:
        return max(1, len(self.groups)), len(self.centre_edges) + 1, len(self.spread_edges) + 1

    def cell(self, group: int, centre: int, spread: int) -> int:
        _, nc, ns = self.shape
        return (group * nc + centre) * ns + spread

    def edges(self, group: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The (centre, spread) edges of group index `group` (-1: no group of its own)."""
        return self.group_edges[group] if self.group_edges and group >= 0 else (self.centre_edges, self.spread_edges)

    def assign(self, m: mx.Mixture, groups: list[str | None] | None = None) -> tuple[Tensor, Tensor]:
        """(cell (N,), group index (N,), -1 for a row whose group has no cell of its own)."""
        c, v = covariates(m)
        if self.groups:
            index = {g: i for i, g in enumerate(self.groups)}
            gi = torch.tensor([index.get(g, -1) if g is not None else -1 for g in (groups or [None] * len(m))], dtype=torch.long)
        else:
            gi = torch.zeros(len(m), dtype=torch.long)
        ci, si = torch.zeros(len(m), dtype=torch.long), torch.zeros(len(m), dtype=torch.long)
        for g in gi.unique().tolist():
            rows = gi == g
            ce, se = self.edges(g)
            ci[rows] = torch.bucketize(c[rows], torch.tensor(ce, dtype=torch.float64))
            si[rows] = torch.bucketize(v[rows], torch.tensor(se, dtype=torch.float64))
        _, nc, ns = self.shape
        return (gi.clamp_min(0) * nc + ci) * ns + si, gi

    def name(self, cell: int, transform: str) -> dict:
        """What a cell is, in words a record can carry: its group and the ranges of its bins."""
        _, nc, ns = self.shape
        g, rest = divmod(cell, nc * ns)
        c, s = divmod(rest, ns)
        centre_edges, spread_edges = self.edges(g if self.groups else -1)
        out: dict = {}
        if self.groups:
            out["group"] = self.groups[g]
        if centre_edges:
            edges = [-math.inf, *centre_edges, math.inf]
            unit = (lambda z: math.exp(z)) if transform == "log" else (lambda z: z)
            out["predicted_value_bin"] = {"index": c + 1, "of": nc, "range": [_finite(unit(edges[c])), _finite(unit(edges[c + 1]))]}
        if spread_edges:
            edges = [-math.inf, *spread_edges, math.inf]
            out["predicted_spread_bin"] = {"index": s + 1, "of": ns, "range": [_finite(math.exp(edges[s])), _finite(math.exp(edges[s + 1]))],
                                           "in": "log units" if transform == "log" else "target units"}
        return out

    def state(self) -> dict:
        out = {"centre_edges": list(self.centre_edges), "spread_edges": list(self.spread_edges), "groups": list(self.groups)}
        if self.group_edges:
            out["group_edges"] = [[list(ce), list(se)] for ce, se in self.group_edges]
        return out

    @classmethod
    def from_state(cls, state: dict) -> Taxonomy:
        def edges(values) -> tuple[float, ...]:
            out = tuple(float(x) for x in values)
            if list(out) != sorted(out) or not all(math.isfinite(x) for x in out):
                raise ValueError("bin edges must be sorted finite numbers")
            return out

        ce, se = edges(state.get("centre_edges", ())), edges(state.get("spread_edges", ()))
        groups = tuple(str(g) for g in state.get("groups", ()))
        per_group = tuple((edges(c), edges(s)) for c, s in state.get("group_edges", ()))
        if per_group and (len(per_group) != len(groups) or any(len(c) != len(ce) or len(s) != len(se) for c, s in per_group)):
            raise ValueError("each group needs as many bin edges as the pooled ones")
        return cls(ce, se, groups, per_group)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class CellScores:
    """The sorted calibration scores of each cell: PIT values (central intervals) and HDR scores
    (highest-density regions), plus those of all images together (the marginal fallback) and of
    each group (a cell's first fallback)."""

    pit: dict[int, Tensor] = field(default_factory=dict)
    hdr_score: dict[int, Tensor] = field(default_factory=dict)
    groups_pit: dict[int, Tensor] = field(default_factory=dict)
    groups_hdr: dict[int, Tensor] = field(default_factory=dict)
    all_pit: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.float64))
    all_hdr: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.float64))

    @classmethod
    def of(cls, taxonomy: Taxonomy, cells: Tensor, groups: Tensor, pit: Tensor, hdr: Tensor) -> CellScores:
        out = cls(all_pit=pit.sort().values, all_hdr=hdr.sort().values)
        for cell in cells.unique().tolist():
            rows = cells == cell
            out.pit[cell], out.hdr_score[cell] = pit[rows].sort().values, hdr[rows].sort().values
        if taxonomy.groups:
            for g in groups.unique().tolist():
                if g >= 0:
                    rows = groups == g
                    out.groups_pit[g], out.groups_hdr[g] = pit[rows].sort().values, hdr[rows].sort().values
        return out

    def state(self) -> dict:
        return {"cells": {str(k): {"pit": v, "hdr_score": self.hdr_score[k]} for k, v in self.pit.items()},
                "groups": {str(k): {"pit": v, "hdr_score": self.groups_hdr[k]} for k, v in self.groups_pit.items()},
                "pit": self.all_pit, "hdr_score": self.all_hdr}

    @classmethod
    def from_state(cls, state: dict) -> CellScores:
        def sorted_probabilities(values, name: str) -> Tensor:
            t = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
            if t.numel() and not (bool(((t >= 0) & (t <= 1)).all()) and bool((t.diff() >= 0).all())):
                raise ValueError(f"{name} must be sorted probabilities")
            return t

        out = cls(all_pit=sorted_probabilities(state.get("pit", ()), "pit"),
                  all_hdr=sorted_probabilities(state.get("hdr_score", ()), "hdr_score"))
        for key, part in (state.get("cells") or {}).items():
            out.pit[int(key)] = sorted_probabilities(part["pit"], "pit")
            out.hdr_score[int(key)] = sorted_probabilities(part["hdr_score"], "hdr_score")
        for key, part in (state.get("groups") or {}).items():
            out.groups_pit[int(key)] = sorted_probabilities(part["pit"], "pit")
            out.groups_hdr[int(key)] = sorted_probabilities(part["hdr_score"], "hdr_score")
        if out.all_pit.numel() == 0:
            raise ValueError("conformal calibration without calibration scores")
        return out
