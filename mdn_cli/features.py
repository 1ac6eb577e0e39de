"""Backbone feature cache: while the backbone is frozen, compute each image's features once
(deterministic eval crop) and train the head on them; many times faster than images."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .dataset import make_loader
from .inference import run_model
from .model import MDNRegressor
from .runtime import Runtime


class FeatureDataset(Dataset):
    """(features (D,), target, index) items; accepts the `(index, seed)` keys of SeededSampler."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor):
        self.features, self.targets, self.indices = features, targets, indices

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, float, int]:
        i = key[0] if isinstance(key, tuple) else key
        return self.features[i], float(self.targets[i]), int(self.indices[i])


class _Backbone(torch.nn.Module):
    """uint8 images -> backbone features (N, D) of an MDNRegressor."""

    def __init__(self, model: MDNRegressor):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.backbone(self.model.normalize(images))


def compute_features(
    model: MDNRegressor, loader: DataLoader, runtime: Runtime, on_skip: Callable[[str], None], progress: bool = True
) -> FeatureDataset:
    """Backbone features (N, D) float32 on CPU for every image of `loader` that decodes."""
    batches = tqdm(loader, desc="backbone features", unit="batch", leave=False, disable=not progress)
    out = run_model(_Backbone(model), batches, runtime, on_skip)
    return FeatureDataset(out.heads[0], out.targets, out.indices)


def feature_loader(dataset: FeatureDataset, batch_size: int, sampler=None, drop_last: bool = False) -> DataLoader:
    return make_loader(dataset, batch_size, num_workers=0, sampler=sampler, drop_last=drop_last)

