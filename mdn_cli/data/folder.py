"""The folder source: image files under `data.root`, listed in a labels CSV (`data.labels`), or
given one by one (`mdn predict`). Random access: a seeded sampler orders each epoch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .cache import DecodedCache
from .dataset import Augment, ImageRegressionDataset, Loader, SeededSampler, make_loader
from .labels import Example, Labels, read_labels
from .splits import read_splits


@dataclass
class FolderSource:
    data: dict
    """The config's data section: the labels file and its columns."""
    root: Path
    """The folder the image paths are relative to."""

    @property
    def labels(self) -> Path:
        labels = Path(self.data["labels"])
        return labels if labels.is_absolute() else self.root / labels

    @property
    def where(self) -> str:
        return str(self.labels)

    def read(self, lenient: bool = False) -> Labels:
        d = self.data
        return read_labels(self.labels, self.root, d["image_column"], d["target_column"], d.get("split_column"),
                           d.get("target_transform", "none"), d.get("group_column"), lenient=lenient)

    def recorded(self, splits_file: Path) -> list[Example]:
        return read_splits(splits_file, self.root, self.data)

    def loader(self, examples: list[Example], image_size: int, batch_size: int, num_workers: int, *, train: bool = False,
               seed: int = 0, augment: Augment = Augment(), rank: int = 0, world_size: int = 1, cache: DecodedCache | None = None,
               pin_memory: bool = False, name: str = "images") -> Loader:
        dataset = ImageRegressionDataset([e.path for e in examples], [e.target for e in examples], image_size,
                                         augment if train else Augment(), cache)
        if train:
            sampler = SeededSampler(len(examples), True, seed, rank, world_size)
            return make_loader(dataset, batch_size, num_workers, sampler, drop_last=True, pin_memory=pin_memory, name=name)
        share = list(range(rank, len(examples), world_size))
        workers = 0 if len(share) <= batch_size else num_workers  # starting workers costs more than one batch
        return make_loader(dataset, batch_size, workers, share, pin_memory=pin_memory, name=name)


def unlabelled(paths: list[Path]) -> tuple[FolderSource, list[Example]]:
    """Image files to predict, as a source and its examples (no targets: NaN)."""
    examples = [Example(image=str(p), path=p, target=math.nan, split=None, line=0) for p in paths]
    return FolderSource({"labels": "", "image_column": "image", "target_column": "target"}, Path(".")), examples
