"""Unfamiliar-image warning: how far an image's backbone features lie from the training images'.

Score (Sun et al. 2022): the distance from the image's L2-normalised features to its k-th nearest
neighbour among the normalised features of up to BANK_SIZE training images. Features of an image
unlike anything trained on (noise, a blank square, a face for a puppy model, another camera) sit
far from all of them, while a new image of the same kind sits among them.

Threshold (conformal, like the intervals): on the calibration images, which the bank does not
contain, the ceil((n+1) q)-th smallest score. A new image exchangeable with them scores above it
with probability at most 1 - q (q = train.ood_quantile, 0.99 by default), so about 1% of familiar
images are flagged, whatever the model.

An ensemble averages its members' distances, each divided by the median distance of that
member's calibration images (members' feature spaces have different scales), and sets one
threshold on that average. Reported: ood_score = score / threshold; above 1 means flagged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

BANK_SIZE = 2048
NEIGHBOURS = 10


def normalise(features: torch.Tensor) -> torch.Tensor:
    """(N, D) -> float32 rows of unit length."""
    return torch.nn.functional.normalize(features.float(), dim=1)


@dataclass
class NeighbourDistance:
    """One member's feature bank: distance of new features to their k-th nearest bank row."""

    bank: torch.Tensor
    """(B, D) float32, unit rows: features of up to BANK_SIZE training images."""
    k: int = NEIGHBOURS
    scale: float = 1.0
    """Median distance of the calibration images (puts members on one scale)."""

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) features -> (N,) distances / scale, float64."""
        x = normalise(features)
        k = min(self.k, self.bank.shape[0])
        similarity = (x @ self.bank.T).topk(k, dim=1).values[:, -1]  # the k-th nearest: k-th largest cosine
        return (2.0 - 2.0 * similarity.double()).clamp_min(0.0).sqrt() / self.scale

    def state(self) -> dict:
        return {"bank": self.bank.half(), "k": self.k, "scale": self.scale}

    @classmethod
    def from_state(cls, state: dict) -> NeighbourDistance:
        bank = torch.as_tensor(state["bank"]).float()
        if bank.ndim != 2 or bank.shape[0] < 1 or not bool(torch.isfinite(bank).all()):
            raise ValueError("the feature bank must be a non-empty finite (B, D) matrix")
        scale, k = float(state.get("scale", 1.0)), int(state.get("k", NEIGHBOURS))
        if not (math.isfinite(scale) and scale > 0) or k < 1:
            raise ValueError(f"impossible feature-bank settings (k={k}, scale={scale})")
        return cls(normalise(bank), k, scale)


def subsample(n: int, size: int = BANK_SIZE, seed: int = 0) -> list[int]:
    """A fixed, seeded choice of at most `size` of n rows, in order."""
    if n <= size:
        return list(range(n))
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].tolist())


def _rank(n: int, quantile: float) -> int:
    return math.ceil(Fraction(quantile).limit_denominator(10**12) * (n + 1))


def conformal_threshold(scores: torch.Tensor, quantile: float) -> float:
    """The ceil((n+1) q)-th smallest score (inf when there are too few scores for q)."""
    n = scores.numel()
    m = _rank(n, quantile)
    return float(scores.double().sort().values[m - 1]) if m <= n else math.inf


def images_needed(quantile: float) -> int:
    """The fewest calibration images that give a finite threshold at `quantile`."""
    n = 1
    while _rank(n, quantile) > n:
        n += 1
    return n


@dataclass
class UnfamiliarImages:
    """The checkpoint's warning: one distance per member, averaged, and a threshold."""

    members: list[NeighbourDistance]
    threshold: float
    """On the averaged (scaled) distance; inf when the calibration set was too small."""
    quantile: float
    n_images: int
    """Calibration images behind the threshold."""

    def scores(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Per-member features (each (N, D_m)) -> (N,) ood_score = averaged distance / threshold."""
        mean = torch.stack([member(f) for member, f in zip(self.members, features)]).mean(0)
        return mean / self.threshold

    def describe(self) -> dict:
        return {"quantile": self.quantile, "n_images": self.n_images, "neighbours": self.members[0].k,
                "bank_images": [int(m.bank.shape[0]) for m in self.members]}

    def state(self) -> dict:
        return {"members": [m.state() for m in self.members], "threshold": self.threshold, "quantile": self.quantile,
                "n_images": self.n_images}

    @classmethod
    def from_state(cls, state: dict) -> UnfamiliarImages:
        threshold = float(state["threshold"])
        if not threshold > 0:
            raise ValueError(f"the unfamiliar-image threshold must be positive, got {threshold}")
        return cls([NeighbourDistance.from_state(m) for m in state["members"]], threshold, float(state["quantile"]),
                   int(state["n_images"]))

    @classmethod
    def fit(cls, banks: list[torch.Tensor], calibration_features: list[torch.Tensor], quantile: float) -> UnfamiliarImages:
        """Banks of training features and the calibration images' features, per member."""
        members = []
        for bank, features in zip(banks, calibration_features):
            member = NeighbourDistance(normalise(bank))
            member.scale = max(float(member(features).median()), 1e-12)
            members.append(member)
        model = cls(members, 1.0, quantile, int(calibration_features[0].shape[0]))
        model.threshold = conformal_threshold(model.scores(calibration_features), quantile)
        return model
