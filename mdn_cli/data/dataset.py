"""Images -> batches: the dataset, train-time augmentation, the seeded sampler and the loader.

The loader yields uint8 image batches (N, 3, S, S) and float64 targets in target units; the
model normalises pixels itself and the trainer standardises targets, so nothing here depends
on the backbone or on training statistics.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from ..images import UnreadableImageError, decode_square
from ..interrupts import ignore_in_worker

if TYPE_CHECKING:
    from .cache import DecodedCache


@dataclass(frozen=True)
class Augment:
    """Train-time augmentation (`data.flip`, `data.shift`). Never scale or colour: a bigger or more
    golden puppy is a heavier one."""

    flip: bool = False
    shift: bool = False

    def __bool__(self) -> bool:
        return self.flip or self.shift


class ImageRegressionDataset(Dataset):
    """(uint8 image (3, S, S), target, index, seed) items. A file that cannot be decoded yields its
    error message instead, so the main process decides whether to stop or skip (workers cannot).

    Indexed by `i` (the plain centre square, seed -1) or by `(i, seed)` from `SeededSampler`: the
    augmentation (and the trainer's dropout) of a sample then depends only on that seed, not on
    worker count, process count or history, which makes a resumed or multi-process run see
    exactly the images an uninterrupted single process would.
    """

    def __init__(
        self,
        paths: list[Path],
        targets: list[float],
        image_size: int,
        augment: Augment = Augment(),
        cache: DecodedCache | None = None,
    ):
        self.paths = paths
        self.targets = targets
        self.image_size = image_size
        self.augment = augment
        self.cache = cache

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, float, int, int] | str:
        i, seed = key if isinstance(key, tuple) else (key, -1)
        try:
            if self.cache is not None:
                image = self.cache.get(i, self.paths[i], self.image_size)
            else:
                image = decode_square(self.paths[i], self.image_size)
        except UnreadableImageError as e:
            return str(e)
        if self.augment and seed >= 0:
            image = augment_image(image, self.augment, torch.Generator().manual_seed(seed))
        return image, self.targets[i], i, seed


def augment_image(image: torch.Tensor, augment: Augment, generator: torch.Generator) -> torch.Tensor:
    """A random shift by up to size/16 pixels each way (the gap filled by repeating the border
    pixels: reflecting them would mirror whatever sits at the edge into a second copy), then a
    random mirror image."""
    if augment.shift:
        size = image.shape[-1]
        pad = max(1, size // 16)
        padded = torch.nn.functional.pad(image[None].float(), (pad, pad, pad, pad), mode="replicate")[0].to(torch.uint8)
        top, left = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=generator))
        image = padded[:, top : top + size, left : left + size]
    if augment.flip and bool(torch.rand((), generator=generator) < 0.5):
        image = image.flip(-1)
    return image.contiguous()


class SeededSampler(torch.utils.data.Sampler):
    """Yields `(index, sample_seed)`; the order and seeds depend only on (seed, epoch).

    With `world_size > 1` each rank gets its own interleaved share of the same permutation,
    padded to equal length, as torch's DistributedSampler does.
    """

    def __init__(self, n: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist() if self.shuffle else list(range(self.n))
        seeds = torch.randint(0, 2**62, (self.n,), generator=g).tolist()
        total = len(self) * self.world_size
        order = (order * math.ceil(total / max(1, self.n)))[:total]
        for i in order[self.rank :: self.world_size]:
            yield i, seeds[i]


@dataclass
class Batch:
    images: torch.Tensor
    """uint8 (N, 3, S, S)."""
    targets: torch.Tensor
    """float64 (N,), target units (NaN when unlabelled)."""
    indices: torch.Tensor
    """int64 (N,): each image's index in the dataset."""
    seeds: torch.Tensor
    """int64 (N,): each sample's seed from SeededSampler (-1 outside training)."""
    skipped: list[str]
    """Error messages of the images in this batch that could not be decoded."""

    def pin_memory(self) -> Batch:
        self.images = self.images.pin_memory()
        self.targets = self.targets.pin_memory()
        return self


def collate(items: list[tuple[torch.Tensor, float, int, int] | str]) -> Batch:
    good = [item for item in items if not isinstance(item, str)]
    skipped = [item for item in items if isinstance(item, str)]
    if not good:
        empty = torch.empty(0, dtype=torch.int64)
        return Batch(torch.empty(0, 3, 1, 1, dtype=torch.uint8), torch.empty(0, dtype=torch.float64), empty, empty, skipped)
    images = torch.stack([g[0] for g in good])  # (N, 3, S, S) images, or (N, D) cached backbone features
    targets = torch.tensor([g[1] for g in good], dtype=torch.float64)
    indices = torch.tensor([g[2] for g in good], dtype=torch.int64)
    seeds = torch.tensor([g[3] for g in good], dtype=torch.int64)
    return Batch(images, targets, indices, seeds, skipped)


def resolve_num_workers(setting: int | str) -> int:
    """`auto`: one worker per available core, at most 8; decoding overlaps the model step."""
    if setting != "auto":
        return int(setting)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return min(8, cores)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    sampler: torch.utils.data.Sampler | list[int] | None = None,
    drop_last: bool = False,
    pin_memory: bool = False,
    name: str = "images",
) -> Loader:
    """A batched loader of `Batch`es; workers stay alive across epochs (stop them with
    `Loader.close`) and ignore Ctrl-C and SIGTERM, which the main process acts on. `name` names
    the moment its first worker starts (`NAME-workers`, see interrupts.reached).

    It has its own generator: a DataLoader without one draws its workers' base seed from the
    global RNG each time it starts an iterator, and with persistent workers that happens in the
    first epoch of a process only, which made a resumed run's dropout differ from an
    uninterrupted one's."""
    return Loader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=worker_init(name) if num_workers > 0 else None,
    )


def worker_init(name: str):
    """A DataLoader's worker_init_fn: ignore stop signals; the first worker marks `NAME-workers`."""
    return functools.partial(ignore_in_worker, f"{name}-workers")


class Loader(DataLoader):
    """A DataLoader of `Batch`es with the two things a run needs besides iterating it: `set_epoch`
    (the seeded sampler's epoch) and `close` (stop its worker processes now). A worker that dies
    ends the command with one clear line (a DataError) instead of a traceback or a hang; a worker
    dies when it cannot hand a batch over (shared memory full: a small /dev/shm, a file-size
    limit): `interrupts.ignore_in_worker` makes it exit then, where Python's queue would drop the
    batch and leave both sides waiting for ever."""

    def __iter__(self):
        iterator = super().__iter__()
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except RuntimeError as e:
                if "DataLoader worker" not in str(e):
                    raise
                raise DataError(
                    f"an image loader process stopped ({str(e).splitlines()[0][:160]}); usually the shared memory that hands "
                    "batches over is full (/dev/shm, or a file-size limit): free some, or set data.num_workers: 0"
                ) from None
            yield batch

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def close(self) -> None:
        """Stop the worker processes now and wait for them: persistent workers otherwise live until
        the loader is collected, which after an error or a stop can be at interpreter exit, where a
        worker still writing to its pipe prints a broken-pipe traceback."""
        iterator = getattr(self, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()  # what DataLoader's own __del__ calls
        self._iterator = None
