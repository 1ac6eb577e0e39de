"""The network: backbone features -> MDN head (K mixture weights, means, std devs).

The model takes raw uint8 (or 0..255 float) images and normalises them itself with the
backbone's statistics, so predict applies exactly the preprocessing training used.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .backbones import get_backbone


@dataclass(frozen=True)
class ModelArgs:
    """Everything needed to rebuild the network from a checkpoint alone."""

    backbone: str
    components: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dropout: float = 0.1
    sigma_min: float = 1e-3

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelArgs:
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


class MDNHead(nn.Module):
    """Features (N, D) -> mixture logits, means, stds, each (N, K) float32, in standardised target units.

    Always in float32, outside any autocast region: in bf16 the means are off by ~3e-3 standardised
    units and the stds by ~0.7%, which would be baked into every interval."""

    def __init__(self, in_features: int, components: int, dropout: float = 0.1, sigma_min: float = 1e-3):
        super().__init__()
        self.components = components
        self.sigma_min = sigma_min
        self.dropout = dropout
        self.logits = nn.Linear(in_features, components)
        self.means = nn.Linear(in_features, components)
        self.stds = nn.Linear(in_features, components)

    @torch.no_grad()
    def init_spread(self, targets: torch.Tensor) -> None:
        """Start the K means at evenly spaced quantiles of the standardised train targets (N,), with
        equal weights and a width of about the gap between them: every component starts where
        there is data, which avoids the collapse of all mass onto one component."""
        k = self.components
        probs = (torch.arange(k, dtype=torch.float64) + 0.5) / k
        centres = torch.quantile(targets.double(), probs).float() if targets.numel() else torch.zeros(k)
        width = max(1.0 / k, 0.05) if k > 1 else 1.0
        for layer in (self.logits, self.means, self.stds):
            layer.weight.mul_(0.1)  # outputs start close to their biases
        self.logits.bias.zero_()
        self.means.bias.copy_(centres)
        self.stds.bias.fill_(math.log(math.expm1(max(width - self.sigma_min, 1e-3))))

    def forward(
        self, features: torch.Tensor, dropout_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`dropout_mask` (N, D): the trainer's per-sample dropout (already divided by the keep
        probability); without it, training mode draws one from the global random stream."""
        with torch.autocast(features.device.type, enabled=False):
            h = features.float()
            if self.training and self.dropout > 0:
                h = h * dropout_mask if dropout_mask is not None else F.dropout(h, self.dropout, training=True)
            stds = F.softplus(self.stds(h)) + self.sigma_min
            return self.logits(h), self.means(h), stds


class MDNRegressor(nn.Module):
    """uint8 images (N, 3, S, S) -> (logits, means, stds), each (N, K) float32."""

    def __init__(self, args: ModelArgs, pretrained: bool | str = False):
        super().__init__()
        self.args = args
        self.backbone, self.feature_dim = get_backbone(args.backbone).build(pretrained)
        self.head = MDNHead(self.feature_dim, args.components, args.dropout, args.sigma_min)
        self.register_buffer("pixel_mean", torch.tensor(args.mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(args.std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.pixel_mean) / self.pixel_std

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, 3, S, S) -> backbone features (N, D) (autocast dtype under autocast)."""
        return self.backbone(self.normalize(images))

    def forward(
        self, images: torch.Tensor, dropout_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.head(self.features(images), dropout_mask)
