"""Backbone feature cache: while the backbone is frozen, compute each image's features once
(deterministic centre crop) and train the head on them; many times faster than images.
Under torchrun the features are computed and held once per machine, split over its processes."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from .data import Source
from .data.labels import Example
from .distributed import Dist
from .model import MDNRegressor
from .runtime import Runtime, run_model


class FeatureDataset(Dataset):
    """(features (D,), target, index, seed) items over the images whose features exist; accepts the
    `(position, seed)` keys of SeededSampler, like ImageRegressionDataset."""

    def __init__(self, features: torch.Tensor, targets: list[float], rows: torch.Tensor):
        self.features, self.targets, self.rows = features, targets, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, float, int, int]:
        position, seed = key if isinstance(key, tuple) else (key, -1)
        i = int(self.rows[position])
        return self.features[i], self.targets[i], i, seed


class BackboneFeatures(nn.Module):
    """uint8 images -> backbone features (N, D) of an MDNRegressor, as float32."""

    def __init__(self, model: MDNRegressor):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.features(images).float()


def cached_features(
    model: MDNRegressor,
    examples: list[Example],
    source: Source,
    runtime: Runtime,
    dist: Dist,
    batch_size: int,
    num_workers: int,
    on_skip: Callable[[str], None],
    name: str,
) -> FeatureDataset:
    """Backbone features of every image of `examples` (from `source`) that decodes, computed once
    per machine: each of its processes computes an interleaved share into one shared tensor (N, D)."""
    n = len(examples)
    features = dist.machine_tensor(f"features-{name}", (n, model.feature_dim), torch.float32)
    decoded = dist.machine_tensor(f"features-{name}-decoded", (n,), torch.uint8)
    loader = source.loader(examples, model.args.image_size, batch_size, num_workers, rank=dist.local_rank,
                           world_size=dist.local_world_size, pin_memory=runtime.pin_memory, name="feature")
    batches = tqdm(loader, desc=f"backbone features ({name})", unit="batch", leave=False, disable=not dist.is_main)
    try:
        out = run_model(BackboneFeatures(model), batches, runtime, on_skip, moment="feature-batch")
    finally:
        loader.close()
    if len(out.indices):
        features[out.indices] = out.heads[0]
        decoded[out.indices] = 1
    dist.barrier()  # every share written
    return FeatureDataset(features, [e.target for e in examples], decoded.nonzero().squeeze(1))
