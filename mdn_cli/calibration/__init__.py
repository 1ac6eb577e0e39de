"""Post-hoc calibration: a registry of methods behind one interface.

Every method is fitted after training on two disjoint splits (see splits.py) and gives a
`Calibration`:
    val split          a std scale (scale.py): shapes the density, mean and std
    calibration split  the levels of every reported interval and region (conformal methods), and
                       nothing else: it alone carries the coverage guarantee
The methods (each in its own module, registered below by name; `train.calibration` picks one):
    none        the model's own distribution
    scale       a constant std scale on val; no guarantee
    marginal    constant scale, then split conformal over all calibration images: coverage on
                average over images (what mdn did before it calibrated per cell)
    conformal   a std scale that depends on the prediction's centre and spread, then Mondrian
                split conformal: coverage within each cell of predicted value x predicted spread
                (x group, with data.group_column), falling back to wider cells where a cell has
                too few calibration images (cells.py). The default.
A `Calibration` answers for rows of a mixture: which cell each row is calibrated in (`rows`), the
CDF levels of its interval ends and the mass of its highest-density region (so every interval
and region can be rebuilt from the components), and what to say about it (`describe`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import mixture as mx
from .. import modes
from .cells import MIN_IMAGES, CellScores, Taxonomy
from .levels import DEFAULT_LEVELS, central_ranks, images_needed, level_key, nominal_probs, rank
from .scale import SELECTION_SCALES, StdScale, nll_sums

__all__ = ["Calibration", "Calibrated", "Rows", "METHODS", "DEFAULT_LEVELS", "level_key", "nominal_probs", "SELECTION_SCALES", "nll_sums",
           "fit", "Method"]


@dataclass(frozen=True)
class Rows:
    """Which calibration images each row of a mixture is calibrated with."""

    source: list[str]
    """Per row: "cell", "group" or "all" (the set its levels come from, after any fallback)."""
    key: list[int]
    """Per row: the cell or group index of that set (-1 for all images)."""
    cell: list[int]
    """Per row: its own cell (before any fallback)."""
    note: list[str | None]
    """Per row: why it fell back, if it did."""

    @classmethod
    def everyone(cls, n: int) -> Rows:
        return cls(["all"] * n, [-1] * n, [0] * n, [None] * n)

    def take(self, index: list[int]) -> Rows:
        return Rows(*([getattr(self, f)[i] for i in index] for f in ("source", "key", "cell", "note")))


@dataclass(frozen=True)
class Calibration:
    """A checkpoint's post-hoc calibration (stored as `state()` under "calibration")."""

    method: str = "none"
    scale: StdScale = field(default_factory=StdScale)
    taxonomy: Taxonomy = field(default_factory=Taxonomy)
    scores: CellScores | None = None
    """Sorted calibration scores per cell (conformal methods); None: nominal levels."""

    # --- the density ------------------------------------------------------------------------

    def scaled(self, m: mx.Mixture) -> mx.Mixture:
        """The model's mixtures with the std scale applied: what every reported number comes from."""
        return self.scale.apply(m)

    @property
    def calibrated(self) -> bool:
        """Whether anything was fitted (else: the model's own distribution)."""
        return METHODS[self.method].scales

    @property
    def label(self) -> str:
        """A few words for a legend: the method and, for conformal methods, its images."""
        if self.scores is None:
            return METHODS[self.method].about
        cells = f" in {len(self.scores.pit)} cells" if len(self.scores.pit) > 1 else ""
        return f"{self.method}, {self.n_images} calibration images{cells}"

    @property
    def n_images(self) -> int:
        """Calibration images behind the conformal levels (0 without them)."""
        return int(self.scores.all_pit.numel()) if self.scores is not None else 0

    # --- which images calibrate a row -----------------------------------------------------------

    def rows(self, m: mx.Mixture, groups: list[str | None] | None = None) -> Rows:
        """The calibration set of each row of the scaled mixture `m` (`groups`: each row's group,
        with data.group_column)."""
        if self.scores is None:
            return Rows.everyone(len(m))
        cells, gi = self.taxonomy.assign(m, groups)
        s = self.scores
        source, key, note = [], [], []
        given = groups or [None] * len(m)
        for cell, g, name in zip(cells.tolist(), gi.tolist(), given):
            if self.taxonomy.groups and g < 0:
                source.append("all")
                key.append(-1)
                note.append(f"group {name!r} has no calibration images of its own (known: {', '.join(self.taxonomy.groups)}): "
                            "calibrated with all images" if name is not None else
                            "no group given: calibrated with all images (give the image's group for its own calibration)")
            elif len(s.pit.get(cell, ())) >= MIN_IMAGES:
                source.append("cell")
                key.append(cell)
                note.append(None)
            elif self.taxonomy.groups and len(s.groups_pit.get(g, ())) >= MIN_IMAGES:
                source.append("group")
                key.append(g)
                note.append(f"its cell has {len(s.pit.get(cell, ()))} calibration images (under {MIN_IMAGES}): calibrated with its group's")
            else:
                source.append("all")
                key.append(-1)
                if len(self.taxonomy.groups) + len(self.taxonomy.centre_edges) + len(self.taxonomy.spread_edges):
                    note.append(f"its cell has {len(s.pit.get(cell, ()))} calibration images (under {MIN_IMAGES}): "
                                "calibrated with all images")
                else:
                    note.append(None)
        return Rows(source, key, cells.tolist(), note)

    def _set(self, source: str, key: int) -> tuple[Tensor, Tensor]:
        s = self.scores
        assert s is not None
        if source == "cell":
            return s.pit[key], s.hdr_score[key]
        if source == "group":
            return s.groups_pit[key], s.groups_hdr[key]
        return s.all_pit, s.all_hdr

    # --- intervals and regions ------------------------------------------------------------------

    def _set_probs(self, source: str, key: int, level: float) -> tuple[float, float]:
        pit, _ = self._set(source, key)
        n = pit.numel()
        j, k = central_ranks(n, level)
        return (float(pit[j - 1]) if j >= 1 else 0.0), (float(pit[k - 1]) if k <= n else 1.0)

    def interval_probs(self, level: float, rows: Rows) -> tuple[Tensor, Tensor]:
        """CDF levels (N,), (N,) of the mixture at each row's interval ends; 0.0 and 1.0 mean an
        unbounded end (too few calibration images for that level)."""
        n = len(rows.source)
        if self.scores is None:
            lo, hi = nominal_probs(level)
            return torch.full((n,), lo, dtype=torch.float64), torch.full((n,), hi, dtype=torch.float64)
        sets = list(zip(rows.source, rows.key))
        per_set = {s: self._set_probs(*s, level) for s in set(sets)}
        probs = torch.tensor([per_set[s] for s in sets], dtype=torch.float64).reshape(n, 2)
        return probs[:, 0], probs[:, 1]

    def interval(self, m: mx.Mixture, level: float, rows: Rows) -> tuple[Tensor, Tensor]:
        """The reported central interval at `level` for every row of the scaled mixture `m`, in
        target units: (low (N,), high (N,)); an unbounded end is -inf / +inf (0 under log)."""
        probs = torch.stack(self.interval_probs(level, rows), 1)  # (N, 2)
        # Each end on its own: calibration PITs can be exactly 0 or 1 (a model overconfident by 8+ stds).
        inner = (probs > 0.0) & (probs < 1.0)
        q = mx.quantile(m, torch.where(inner, probs, 0.5)) if len(m) else probs
        floor = 0.0 if m.transform == "log" else -math.inf
        ends = torch.where(inner, q, torch.where(probs <= 0.0, floor, math.inf))
        return ends[:, 0], ends[:, 1]

    def hdr_level(self, level: float, rows: Rows) -> Tensor:
        """(N,) mass of each row's highest-density region at `level` (1.0: the whole support)."""
        n = len(rows.source)
        if self.scores is None:
            return torch.full((n,), level, dtype=torch.float64)
        def mass(source: str, key: int) -> float:
            _, scores = self._set(source, key)
            m = rank(scores.numel(), level)
            return float(scores[m - 1]) if m <= scores.numel() else 1.0

        sets = list(zip(rows.source, rows.key))
        per_set = {s: mass(*s) for s in set(sets)}
        return torch.tensor([per_set[s] for s in sets], dtype=torch.float64)

    def hdr(self, m: mx.Mixture, level: float, rows: Rows) -> list[list[tuple[float, float]]]:
        """The reported highest-density region at `level` for every row of `m`: the smallest set
        holding the calibrated mass, as a list of (low, high) pieces in target units."""
        mass = self.hdr_level(level, rows)
        whole = mass >= 1.0  # too few calibration images for this level: the whole support
        out: list[list[tuple[float, float]]] = [[(0.0 if m.transform == "log" else -math.inf, math.inf)] for _ in range(len(m))]
        keep = (~whole).nonzero().squeeze(1)
        if keep.numel():
            regions = modes.hdr(m[keep], mass[keep].clamp(1e-12, 1.0 - 1e-15))
            for i, region in zip(keep.tolist(), regions):
                out[i] = region
        return out

    # --- what a prediction says about it ---------------------------------------------------------

    def describe(self, levels: tuple[float, ...], rows: Rows, m: mx.Mixture) -> list[dict]:
        """Per row, JSON-ready: the method, the cell its levels come from and how many calibration
        images are behind them, the CDF levels of the interval ends and the masses of the regions
        (to rebuild both from the components), the std scale, the guarantee in words, warnings."""
        method = METHODS[self.method]
        probs = [self.interval_probs(level, rows) for level in levels]
        masses = [self.hdr_level(level, rows) for level in levels]
        factors = self.scale.factors(m).tolist() if len(m) else []
        out = []
        for i in range(len(rows.source)):
            source, key = rows.source[i], rows.key[i]
            n = self._set(source, key)[0].numel() if self.scores is not None else 0
            record: dict = {"method": self.method, "n_images": n,
                            "interval_probs": [float(p[i]) for pair in probs for p in pair],
                            "hdr_masses": [float(mass[i]) for mass in masses],
                            "sigma_scale": factors[i], "levels": list(levels)}
            if self.scores is not None:
                record["calibrated_with"] = self._which(source, key, rows.cell[i], m.transform)
            record["guarantee"] = method.guarantee(n, record.get("calibrated_with"))
            warnings = [w for w in [rows.note[i]] if w]
            short = [lvl for lvl in levels if n and (central_ranks(n, lvl)[0] < 1 or central_ranks(n, lvl)[1] > n)]
            if self.scores is not None and short:
                warnings.append("; ".join(f"{lvl:.4g} needs at least {images_needed(lvl)} calibration images for finite ends"
                                          for lvl in short))
            if warnings:
                record["warning"] = "; ".join(warnings)
            out.append(record)
        return out

    def _which(self, source: str, key: int, cell: int, transform: str) -> dict:
        if source == "cell":
            return {"set": "cell", **self.taxonomy.name(cell, transform)}
        if source == "group":
            return {"set": "group", "group": self.taxonomy.groups[key]}
        return {"set": "all calibration images"}

    def summary(self, levels: tuple[float, ...] = DEFAULT_LEVELS) -> dict:
        """The calibration as a whole (health, metrics, export): method, images, cells, scale."""
        cells = self.scores is not None and bool(self.taxonomy.groups or self.taxonomy.centre_edges or self.taxonomy.spread_edges)
        out: dict = {"method": self.method, "n_images": self.n_images, "levels": list(levels), **self.scale.describe(),
                     "val_images": self.scale.images, "about": METHODS[self.method].about,
                     "guarantee": METHODS[self.method].guarantee(self.n_images, {"set": "cells"} if cells else None)}
        if cells:
            out["guarantee"] += (f" ({len(self.scores.pit)} cells of {', '.join(self._axes())}, "
                                 f"{min(int(p.numel()) for p in self.scores.pit.values())}-"
                                 f"{max(int(p.numel()) for p in self.scores.pit.values())} calibration images each)")
            out["cells"] = [{**self.taxonomy.name(cell, "none"), "n_images": int(pit.numel())} for cell, pit in sorted(self.scores.pit.items())]
        return out

    def _axes(self) -> list[str]:
        t = self.taxonomy
        return [f"{len(t.groups)} groups"] * bool(t.groups) + [f"{len(t.centre_edges) + 1} predicted-value bins"] * bool(t.centre_edges) \
            + [f"{len(t.spread_edges) + 1} predicted-spread bins"] * bool(t.spread_edges)

    def apply(self, m: mx.Mixture, groups: list[str | None] | None = None) -> Calibrated:
        """The model's raw mixtures, calibrated: scaled, each row in its calibration set."""
        return self.attach(self.scaled(m), groups)

    def attach(self, scaled: mx.Mixture, groups: list[str | None] | None = None) -> Calibrated:
        """Mixtures already scaled (an exported model's outputs), each row in its calibration set."""
        return Calibrated(scaled, self, self.rows(scaled, groups))

    # --- stored form ----------------------------------------------------------------------------

    def state(self) -> dict:
        return {"method": self.method, "scale": self.scale.state(), "taxonomy": self.taxonomy.state(),
                **({"scores": self.scores.state()} if self.scores is not None else {})}

    @classmethod
    def from_state(cls, state: dict) -> Calibration:
        method = str(state.get("method", "none"))
        if "scale" not in state:  # written before calibration methods had cells: one factor, one set of scores
            method = {"conformal": "marginal"}.get(method, method)
            scale = StdScale.constant_factor(float(state.get("sigma_scale", 1.0)), int(state.get("val_images", 0)))
            scores = {"pit": state.get("pit", ()), "hdr_score": state.get("hdr_score", ())} if method == "marginal" else None
            state = {"method": method, "scale": scale.state(), "taxonomy": {}, **({"scores": scores} if scores else {})}
        if method not in METHODS:
            raise ValueError(f"unknown calibration method {method!r}")
        scores = CellScores.from_state(state["scores"]) if state.get("scores") is not None else None
        if METHODS[method].conformal and scores is None:
            raise ValueError(f"a {method} calibration without calibration scores")
        return cls(method, StdScale.from_state(state["scale"]), Taxonomy.from_state(state.get("taxonomy") or {}), scores)


@dataclass(frozen=True)
class Calibrated:
    """Predictions as reported: the scaled mixtures (N rows), their calibration, and the
    calibration images behind each row. Every interval, region and record comes from here."""

    mixture: mx.Mixture
    calibration: Calibration
    rows: Rows

    def __len__(self) -> int:
        return len(self.mixture)

    def __getitem__(self, index) -> Calibrated:
        """Rows by a slice, a boolean mask or a list of positions."""
        positions = torch.arange(len(self))[index].reshape(-1).tolist()
        return Calibrated(self.mixture[torch.tensor(positions, dtype=torch.long)], self.calibration, self.rows.take(positions))

    def interval_probs(self, level: float) -> tuple[Tensor, Tensor]:
        return self.calibration.interval_probs(level, self.rows)

    def interval(self, level: float) -> tuple[Tensor, Tensor]:
        return self.calibration.interval(self.mixture, level, self.rows)

    def hdr_level(self, level: float) -> Tensor:
        return self.calibration.hdr_level(level, self.rows)

    def hdr(self, level: float) -> list[list[tuple[float, float]]]:
        return self.calibration.hdr(self.mixture, level, self.rows)

    def describe(self, levels: tuple[float, ...] = DEFAULT_LEVELS) -> list[dict]:
        return self.calibration.describe(levels, self.rows, self.mixture)


# ---------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class FitData:
    """What a method may fit on: the model's raw mixtures and targets of the val and calibration
    splits (and each calibration image's group, with data.group_column)."""

    val: mx.Mixture
    val_targets: Tensor
    cal: mx.Mixture | None = None
    cal_targets: Tensor | None = None
    cal_groups: list[str | None] | None = None
    val_groups: list[str | None] | None = None


@dataclass(frozen=True)
class Method:
    name: str
    about: str
    """One line: what it does."""
    fit: Callable[[FitData], Calibration]
    conformal: bool
    """Whether it needs calibration images (and gives a coverage guarantee)."""
    scales: bool
    """Whether it fits a std scale on val (training then picks the epoch by the scaled val NLL)."""
    guarantee: Callable[[int, dict | None], str]
    """The guarantee in words, given the images behind a row and the set they form."""


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def fit(method: str, data: FitData) -> Calibration:
    """Fit the method called `method` (a key of METHODS)."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; one of {', '.join(METHODS)}")
    return METHODS[method].fit(data)


from . import conformal, marginal, uncalibrated  # noqa: E402,F401 - each registers its methods
