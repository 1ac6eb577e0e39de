"""Where a run's labelled images come from: one module per source behind one small interface.

    folder.py   a labels CSV beside a folder of image files (data.root, data.labels)
    shards.py   WebDataset tar shards on local disk or in an object store (data.shards)
Every source gives
    read()              every labelled image (its key, target, split and group), in a fixed order
    recorded(splits)    the images a run recorded in its splits.csv (to resume, to evaluate)
    loader(examples, image_size, batch_size, ...)
                        batches (dataset.Batch) of those images, decoded and squared: shuffled
                        and augmented by per-image seeds for training, in order otherwise
and names itself in messages (`where`). Training, calibration, evaluation and prediction ask a
source for their images; none of them opens an image file itself. Shared by the sources: the
labels reader (labels.py), the split rule (splits.py), batching (dataset.py) and the decode cache
(cache.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from .cache import DecodedCache
from .dataset import Augment, Batch
from .labels import Example, Labels


class Source(Protocol):
    where: str
    """The labels file or the shard set, for messages."""
    root: Path | None
    """The folder the images are files in (None: they are records of a shard set)."""

    def read(self, lenient: bool = False) -> Labels:
        """Every labelled image, with the notes and fingerprint a run keeps (labels.Labels)."""

    def recorded(self, splits_file: Path) -> list[Example]:
        """The images a run recorded in its splits.csv, as this source names them."""

    def loader(self, examples: list[Example], image_size: int, batch_size: int, num_workers: int, *, train: bool = False,
               seed: int = 0, augment: Augment = Augment(), rank: int = 0, world_size: int = 1, cache: DecodedCache | None = None,
               pin_memory: bool = False, name: str = "images") -> BatchLoader:
        """Batches of `examples`' images: for training (`train`) shuffled by (seed, epoch) and
        augmented by per-image seeds, over this process's share (`rank` of `world_size`) with the
        same number of steps in every process; else in order, this process's share."""


class BatchLoader(Protocol):
    def __iter__(self) -> Iterator[Batch]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def close(self) -> None: ...


def open_source(data: dict, root: Path | None = None) -> Source:
    """The source a config's data section describes (`root`: where a folder source's images are
    now, if not where the run was trained)."""
    if data.get("shards"):
        from .shards import ShardSource

        return ShardSource(data["shards"], data)
    from .folder import FolderSource

    return FolderSource(data, Path(root or data["root"]))


__all__ = ["Source", "BatchLoader", "open_source", "Example", "Labels", "Batch", "Augment"]
