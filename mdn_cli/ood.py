"""Unfamiliar-image warning: how far an image lies from the training images, as the network sees them.

What the network sees of an image: its penultimate features, and for each stage of the backbone
(the last activation at each spatial resolution) the per-channel mean and standard deviation of
that activation map. The penultimate features alone miss inputs that are unlike the training
images in their low-level statistics: on the toy data they flagged 70% of solid-colour squares,
the stage statistics 100%.

Score (kNN, Sun et al. 2022): for each of these vectors, the distance from the image's
L2-normalised vector to its k-th nearest neighbour among those of up to BANK_SIZE training images,
divided by the median of that distance over the val images; the score is the mean over the
vectors (and, for an ensemble, over the members).

Threshold (conformal, like the intervals): the ceil((n+1) q)-th smallest score of the n
calibration images, which neither the bank nor the scales saw. A new image exchangeable with them
scores above it with probability at most 1 - q (q = train.ood_quantile, 0.99 by default).
Reported: ood_score = score / threshold; above 1 means flagged.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .calibration.levels import images_needed, rank, realised_range

BANK_SIZE = 2048
NEIGHBOURS = 10


class StageStatistics:
    """Collects, while a backbone runs, the per-channel mean and std (N, 2C) of the last 4-D
    activation at each spatial resolution: one vector per stage, largest resolution first.

    The statistics are taken when the layer runs (a later in-place op, such as a residual `+=`,
    may change the tensor), at the layers of the input size's plan only: which layer is last at
    each resolution. Only those layers carry a hook: a forward hook on every layer sends each
    module through PyTorch's slow call path and made the network alone 15% slower. `plan(size)`
    finds the layers with a one-image pass that computes nothing else; an input size without a
    plan gets one from its first pass, which hooks and computes the statistics at every layer."""

    def __init__(self, backbone: nn.Module):
        self.backbone = backbone
        self.leaves = [m for m in backbone.modules() if not any(True for _ in m.children())]
        self.latest: dict[tuple[int, int], torch.Tensor] = {}
        self.last: dict[tuple[int, int], int] = {}  # resolution -> id of the last layer seen there, this pass
        self.plans: dict[tuple[int, int], set[int]] = {}  # input size -> ids of the layers to record
        self.size: tuple[int, int] = (0, 0)
        self.planning = False
        self.start = backbone.register_forward_pre_hook(self._start)
        self.hooked: dict[int, RemovableHandle] = {}  # the layers of every plan
        self.probing: list[RemovableHandle] = []  # every other layer, during a pass without a plan

    @torch.no_grad()
    def plan(self, size: int) -> None:
        """Find the layers to record for square inputs of `size` (one image through the backbone in
        eval mode; every module's mode is restored)."""
        if (size, size) in self.plans:
            return
        parameter = next(self.backbone.parameters())
        modes = [(m, m.training) for m in self.backbone.modules()]
        self.backbone.eval()
        self.planning = True
        try:
            self.backbone(torch.zeros(1, 3, size, size, dtype=parameter.dtype, device=parameter.device))
            self._learn()
        finally:
            self.planning = False
            self.latest, self.last = {}, {}
            for m, training in modes:
                m.training = training

    def remove(self) -> None:
        """Take every hook off the backbone."""
        for handle in [self.start, *self.hooked.values(), *self.probing]:
            handle.remove()
        self.hooked, self.probing = {}, []

    def _start(self, module: nn.Module, args) -> None:
        self.size = (int(args[0].shape[-2]), int(args[0].shape[-1]))  # ints: an exporter may trace sizes as tensors
        self.latest, self.last = {}, {}
        if self.size not in self.plans and not self.probing:
            self.probing = [m.register_forward_hook(self._record) for m in self.leaves if id(m) not in self.hooked]

    def _learn(self) -> None:
        """The pass that just ran, with every layer hooked, gives the plan of its input size."""
        layers = set(self.last.values())
        self.plans[self.size] = layers
        for handle in self.probing:
            handle.remove()
        self.probing = []
        for m in self.leaves:
            if id(m) in layers and id(m) not in self.hooked:
                self.hooked[id(m)] = m.register_forward_hook(self._record)

    def _record(self, module: nn.Module, inputs, output) -> None:
        plan = self.plans.get(self.size)
        if plan is not None and id(module) not in plan:
            return
        if isinstance(output, torch.Tensor) and output.ndim == 4 and min(output.shape[-2:]) > 1:
            key = (int(output.shape[-2]), int(output.shape[-1]))
            self.last[key] = id(module)
            if self.planning:
                return
            x = output.float()
            mean = x.mean((2, 3), keepdim=True)
            std = (x - mean).square().mean((2, 3)).sqrt()  # two passes: 3x faster than torch.std on CPUs, as exact
            self.latest[key] = torch.cat([mean.flatten(1), std], 1)

    def collect(self) -> list[torch.Tensor]:
        if self.size not in self.plans:
            self._learn()
        stages = [self.latest[k] for k in sorted(self.latest, reverse=True)]
        self.latest = {}
        return stages


def normalise(features: torch.Tensor) -> torch.Tensor:
    """(N, D) -> float32 rows of unit length."""
    return torch.nn.functional.normalize(features.float(), dim=1)


@dataclass
class FeatureBank:
    """One member's training vectors: per vector kind (penultimate features, then each stage),
    up to BANK_SIZE unit rows, and the val median distance that scales it."""

    vectors: list[torch.Tensor]
    """Per kind (B, D_j) float32, unit rows."""
    scales: list[float]
    k: int = NEIGHBOURS

    @functools.cached_property
    def _vectors64(self) -> list[torch.Tensor]:
        return [v.double() for v in self.vectors]

    def distances(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        """(N,) float64: mean over kinds of the scaled k-th nearest-neighbour distance. The cosines
        are float64: near 1, float32's rounding moved a score by 1e-5 with the rows batched together."""
        total = 0.0
        for bank, x, scale in zip(self._vectors64, vectors, self.scales):
            k = min(self.k, bank.shape[0])
            similarity = (normalise(x).double() @ bank.T).topk(k, dim=1).values[:, -1]  # k-th nearest = k-th largest cosine
            total = total + (2.0 - 2.0 * similarity).clamp_min(0.0).sqrt() / scale
        return total / len(self.vectors)

    def state(self) -> dict:
        return {"vectors": [v.half() for v in self.vectors], "scales": list(self.scales), "k": self.k}

    @classmethod
    def from_state(cls, state: dict) -> FeatureBank:
        vectors = [normalise(torch.as_tensor(v)) for v in state["vectors"]]
        scales, k = [float(s) for s in state["scales"]], int(state["k"])
        if not vectors or any(v.ndim != 2 or v.shape[0] < 1 or not bool(torch.isfinite(v).all()) for v in vectors):
            raise ValueError("a feature bank must hold non-empty finite (B, D) matrices")
        if len(scales) != len(vectors) or not all(math.isfinite(s) and s > 0 for s in scales) or k < 1:
            raise ValueError(f"impossible feature-bank settings (k={k}, scales={scales[:3]}...)")
        return cls(vectors, scales, k)

    @classmethod
    def of(cls, vectors: list[torch.Tensor]) -> FeatureBank:
        """A bank of training vectors, not yet scaled."""
        return cls([normalise(v) for v in vectors], [1.0] * len(vectors))


def subsample(n: int, size: int = BANK_SIZE, seed: int = 0) -> list[int]:
    """A fixed, seeded choice of at most `size` of n rows, in order."""
    if n <= size:
        return list(range(n))
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].tolist())


def threshold_rank(n: int, quantile: float) -> tuple[int, float]:
    """(rank m of the threshold among n sorted calibration scores, the level it carries). The
    level asked for needs m = ceil(q (n+1)) <= n; with fewer images, the largest level n images
    support, n/(n+1): the largest score (no smaller set of images gets a warning at all)."""
    m = rank(n, quantile)
    return (m, quantile) if m <= n else (n, n / (n + 1))


@dataclass
class UnfamiliarImages:
    """The checkpoint's warning: the members' banks and one threshold on their mean distance."""

    members: list[FeatureBank]
    threshold: float
    quantile: float
    """The level the threshold carries: at most 1 - quantile of images like the calibration images are flagged."""
    n_images: int
    """Calibration images behind the threshold."""
    asked: float | None = None
    """train.ood_quantile, when the calibration images were too few for it (then `quantile` is lower)."""

    def scores(self, vectors: list[list[torch.Tensor]]) -> torch.Tensor:
        """Per member, its vectors (each (N, D_j)) -> (N,) ood_score (above 1: flagged)."""
        return torch.stack([bank.distances(v) for bank, v in zip(self.members, vectors)]).mean(0) / self.threshold

    def false_flags(self) -> dict:
        """How often images like the calibration images are flagged: at most 1 - quantile on average
        over calibration sets; for this one set it is 1 - Beta(m, n+1-m), whose 90% range shows how
        noisy a threshold from n images is."""
        n = self.n_images
        m, _ = threshold_rank(n, self.quantile)
        low, high = realised_range(n, m)
        return {"expected": 1.0 - m / (n + 1), "range_90": [1.0 - high, 1.0 - low]}

    def describe(self) -> dict:
        out = {"quantile": self.quantile, "n_images": self.n_images, "neighbours": self.members[0].k,
               "bank_images": [int(m.vectors[0].shape[0]) for m in self.members], "false_flag_rate": self.false_flags()}
        if self.asked is not None:
            out["warning"] = (f"{self.n_images} calibration images are too few for train.ood_quantile={self.asked} (it needs "
                              f"{images_needed(self.asked, central=False)}): the threshold is the largest calibration score, "
                              f"level {self.quantile:.4g}")
        return out

    def fitted_message(self) -> str:
        """The training log's line about the threshold."""
        flags = self.false_flags()
        low, high = flags["range_90"]
        line = (f"unfamiliar-image threshold on {self.n_images} calibration images: flags about {flags['expected']:.1%} of images "
                f"like them (for this set of calibration images between {low:.1%} and {high:.1%}, 90% range)")
        return f"{line}; warning: {self.describe()['warning']}" if self.asked is not None else line

    def state(self) -> dict:
        return {"threshold": self.threshold, "quantile": self.quantile, "n_images": self.n_images,
                **({"asked": self.asked} if self.asked is not None else {})}

    @classmethod
    def from_state(cls, state: dict, banks: list[FeatureBank]) -> UnfamiliarImages:
        threshold = float(state["threshold"])
        if not (math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"the unfamiliar-image threshold must be a positive number, got {threshold}")
        asked = state.get("asked")
        return cls(banks, threshold, float(state["quantile"]), int(state["n_images"]), float(asked) if asked is not None else None)

    @classmethod
    def fit(cls, banks: list[FeatureBank], scaling: list[list[torch.Tensor]], calibration: list[list[torch.Tensor]],
            quantile: float) -> UnfamiliarImages:
        """Scale each bank by the median distances of the `scaling` images (the val split), then set
        the threshold on the `calibration` images' scores: the threshold's images fit nothing else,
        so the share of new images flagged keeps its guarantee. With fewer calibration images than
        `quantile` needs, the threshold is their largest score (see threshold_rank)."""
        for bank, vectors in zip(banks, scaling):
            bank.scales = [1.0] * len(bank.vectors)
            per_kind = [FeatureBank([v], [1.0], bank.k).distances([x]) for v, x in zip(bank.vectors, vectors)]
            bank.scales = [max(float(d.median()), 1e-12) for d in per_kind]
        n = int(calibration[0][0].shape[0])
        m, level = threshold_rank(n, quantile)
        model = cls(banks, 1.0, level, n, quantile if level != quantile else None)
        model.threshold = max(float(model.scores(calibration).double().sort().values[m - 1]), 1e-12)
        return model
