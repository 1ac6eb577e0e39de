"""Target scaling: target units y <-> the standardised space the network predicts in.

    z = g(y)             g = identity ('none') or log ('log'): the model's target space
    u = (z - loc) / scale  standardised with train-split statistics: what the head outputs
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .mixture import Mixture


@dataclass(frozen=True)
class TargetScaler:
    transform: str
    """'none' or 'log'."""
    loc: float
    scale: float

    @classmethod
    def fit(cls, targets: torch.Tensor, transform: str) -> TargetScaler:
        z = cls._forward(targets.double(), transform)
        scale = float(z.std()) if z.numel() > 1 else 1.0
        if not math.isfinite(scale) or scale < 1e-12:
            scale = 1.0  # all train targets equal: keep units, the sigma floor does the rest
        return cls(transform, float(z.mean()), scale)

    @staticmethod
    def _forward(y: torch.Tensor, transform: str) -> torch.Tensor:
        return torch.log(y) if transform == "log" else y

    def encode(self, y: torch.Tensor) -> torch.Tensor:
        """Target units (N,) -> standardised (N,), same dtype."""
        return (self._forward(y, self.transform) - self.loc) / self.scale

    def to_mixture(self, logits: torch.Tensor, means: torch.Tensor, stds: torch.Tensor) -> Mixture:
        """Head outputs (N, K) in standardised space -> a float64 Mixture in the model's target space z."""
        return Mixture(
            weights=torch.softmax(logits.double(), dim=-1),
            means=means.double() * self.scale + self.loc,
            stds=stds.double() * self.scale,
            transform=self.transform,
        )

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> TargetScaler:
        return cls(str(state["transform"]), float(state["loc"]), float(state["scale"]))
