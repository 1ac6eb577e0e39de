"""Labelled image folders: read and validate the labels CSV, split it, and load images in batches.

The loader yields uint8 image batches (N, 3, S, S) and float64 targets in target units; the
model normalises pixels itself and the trainer standardises targets, so nothing here depends
on the backbone or on training statistics.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .errors import DataError
from .images import UnreadableImageError, load_rgb

SPLITS = ("train", "val", "test")
MAX_REPORTED = 20


@dataclass(frozen=True)
class Example:
    image: str
    """The image path as written in the labels file (relative to the data root)."""
    path: Path
    """The resolved image path."""
    target: float
    """The label, in target units."""
    split: str | None
    """train/val/test from the split column, or None when the file has none."""
    line: int
    """1-based line of the labels file (header is line 1), for error messages."""


def read_labels(
    labels_path: Path,
    root: Path,
    image_column: str,
    target_column: str,
    split_column: str | None,
    target_transform: str = "none",
) -> list[Example]:
    """Read and validate the whole labels CSV; report every problem found at once (DataError)."""
    try:
        with open(labels_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = list(reader)
    except FileNotFoundError:
        raise DataError(f"{labels_path}: labels file not found; check data.root and data.labels") from None
    except UnicodeDecodeError:
        raise DataError(f"{labels_path}: not a UTF-8 text CSV file") from None
    except (OSError, csv.Error) as e:
        raise DataError(f"{labels_path}: cannot read labels file ({e})") from None
    if not header:
        raise DataError(f"{labels_path}: labels file is empty; expected a header line such as 'image,target'")
    reader.fieldnames = header
    for key, column in (("data.image_column", image_column), ("data.target_column", target_column)):
        if column not in header:
            guess = difflib.get_close_matches(column, header, n=1, cutoff=0.5)
            hint = f"; did you mean '{guess[0]}'? Set {key}: {guess[0]}" if guess else f"; set {key} to one of them"
            raise DataError(f"{labels_path}: no column '{column}' (columns: {', '.join(header)}){hint}")
    if not rows:
        raise DataError(f"{labels_path}: labels file has a header but no rows")
    has_split = split_column is not None and split_column in header

    root_resolved = root.resolve()
    problems: list[str] = []
    examples: list[Example] = []
    seen: dict[str, Example] = {}
    for line, row in enumerate(rows, start=2):
        where = f"{labels_path}:{line}"
        image = (row.get(image_column) or "").strip()
        if not image:
            problems.append(f"{where}: empty image path")
            continue
        path = _resolve_inside(root_resolved, image)
        if path is None:
            problems.append(f"{where}: image path '{image}' points outside data.root; use a path relative to {root}")
            continue
        text = (row.get(target_column) or "").strip()
        try:
            target = float(text)
        except ValueError:
            problems.append(f"{where}: target '{text}' in column '{target_column}' is not a number")
            continue
        if not math.isfinite(target):
            problems.append(f"{where}: target '{text}' is not a finite number")
            continue
        if target_transform == "log" and target <= 0:
            problems.append(
                f"{where}: target {text} is not positive, which data.target_transform: log requires; "
                "fix the label or use target_transform: none"
            )
            continue
        split = None
        if has_split:
            split = (row.get(split_column) or "").strip().lower()
            split = {"valid": "val", "validation": "val"}.get(split, split)
            if split not in SPLITS:
                problems.append(f"{where}: split '{row.get(split_column)}' is not one of train, val, test")
                continue
        example = Example(image=image, path=path, target=target, split=split, line=line)
        previous = seen.get(str(path))
        if previous is not None:
            if (previous.target, previous.split) != (target, split):
                problems.append(f"{where}: '{image}' is listed again with a different label (first on line {previous.line})")
            continue  # an exact duplicate row is dropped
        seen[str(path)] = example
        if not path.is_file():
            problems.append(f"{where}: image file '{image}' not found under {root}")
            continue
        examples.append(example)

    if problems:
        shown = problems[:MAX_REPORTED]
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise DataError(
            f"{labels_path}: {len(problems)} problem{'s' if len(problems) > 1 else ''} in the labels file\n"
            + "\n".join(f"  {p}" for p in shown)
            + more
        )
    return examples


def _resolve_inside(root: Path, image: str) -> Path | None:
    if os.path.isabs(image):
        return None
    path = (root / image).resolve()
    return path if path.is_relative_to(root) else None


def assign_splits(examples: list[Example], val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """The split of each example: the file's own split column, else a seeded random split."""
    if examples and examples[0].split is not None:
        return [e.split for e in examples]  # type: ignore[misc]
    n = len(examples)
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    order = list(range(n))
    random.Random(seed).shuffle(order)
    splits = ["train"] * n
    for rank, i in enumerate(order):
        if rank < n_val:
            splits[i] = "val"
        elif rank < n_val + n_test:
            splits[i] = "test"
    return splits


def check_split_sizes(splits: list[str], batch_size: int, labels_path: Path) -> None:
    counts = {s: splits.count(s) for s in SPLITS}
    if counts["train"] == 0 or counts["val"] == 0:
        raise DataError(
            f"{labels_path}: {counts['train']} train and {counts['val']} val images; training needs both. "
            "Add images, fix the split column, or change data.val_fraction / data.test_fraction"
        )
    if counts["train"] < batch_size:
        raise DataError(
            f"{labels_path}: the train split has {counts['train']} images, fewer than train.batch_size={batch_size}; "
            "lower train.batch_size or add images"
        )


def write_splits(path: Path, examples: list[Example], splits: list[str]) -> None:
    """splits.csv in the run folder: the exact split used, so evaluation scores the same test set."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "target", "split"])
        for example, split in zip(examples, splits):
            writer.writerow([example.image, repr(example.target), split])
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Images -> tensors


class ImageRegressionDataset(Dataset):
    """(uint8 image (3, S, S), target, index) items. A file that cannot be decoded yields its
    error message instead, so the main process decides whether to stop or skip (workers cannot).

    Indexed by `i` (the plain centre square) or by `(i, seed)` from `SeededSampler`: the
    augmentation of a sample then depends only on that seed, not on worker count or history,
    which makes a resumed run see exactly the images an uninterrupted one would.
    """

    def __init__(
        self,
        paths: list[Path],
        targets: list[float],
        image_size: int,
        augment: bool = False,
        cache: DecodedCache | None = None,
    ):
        self.paths = paths
        self.targets = targets
        self.image_size = image_size
        self.augment = augment
        self.cache = cache

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, float, int] | str:
        i, seed = key if isinstance(key, tuple) else (key, None)
        try:
            if self.cache is not None:
                image = self.cache.get(i, self.paths[i], self.image_size)
            else:
                image = decode_square(self.paths[i], self.image_size)
        except UnreadableImageError as e:
            return str(e)
        if self.augment and seed is not None:
            image = random_shift_flip(image, self.image_size, torch.Generator().manual_seed(seed))
        return image, self.targets[i], i


def random_shift_flip(image: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop of `size` after reflect-padding by size/16, and a random mirror.

    Shifts and mirror images only: scale or colour changes could change the label (a bigger or
    more golden puppy is a heavier one).
    """
    pad = max(1, size // 16)
    image = torch.nn.functional.pad(image[None].float(), (pad, pad, pad, pad), mode="reflect")[0].to(torch.uint8)
    h, w = image.shape[-2:]
    top = int(torch.randint(0, h - size + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - size + 1, (1,), generator=generator))
    image = image[:, top : top + size, left : left + size]
    if bool(torch.rand((), generator=generator) < 0.5):
        image = image.flip(-1)
    return image


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


def decode_square(path: Path, size: int) -> torch.Tensor:
    """Decode an image, resize its shorter side to `size` and take the centre square: uint8 (3, S, S).
    This is all the per-image work that does not change between epochs (what the caches keep)."""
    image = load_rgb(path, draft_size=size)
    w, h = image.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    if new != (w, h):
        # resize straight to the crop box: one resampling pass, and only over the pixels kept
        box = (left / scale, top / scale, (left + size) / scale, (top + size) / scale)
        image = image.resize((size, size), Image.BILINEAR, box=box, reducing_gap=3.0)
    else:
        image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()


def cache_directory(setting: str | None) -> Path:
    if setting:
        return Path(setting).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mdn-cli" / "decoded"


class DecodedCache:
    """Decoded, resized images kept across epochs (`data.cache`), so later epochs skip decoding.

    memory: one shared uint8 tensor (N, 3, S, S) that DataLoader workers fill in place.
    disk:   one raw file per image under `directory`, named by a hash of the file's path, size
            and mtime and the resize settings: survives restarts, rebuilt when a file changes.
    """

    VERSION = 1  # bump when decode_square changes

    def __init__(self, mode: str, n: int, size: int, directory: Path | None = None):
        self.mode, self.size = mode, size
        if mode == "memory":
            self.images = torch.zeros((n, 3, size, size), dtype=torch.uint8).share_memory_()
            self.filled = torch.zeros(n, dtype=torch.bool).share_memory_()
        elif mode == "disk":
            if directory is None:
                raise ValueError("a disk cache needs a directory")
            self.directory = Path(directory)
            self.directory.mkdir(parents=True, exist_ok=True)
        else:
            raise ValueError(mode)

    def get(self, i: int, path: Path, size: int) -> torch.Tensor:
        if self.mode == "memory":
            if not self.filled[i]:
                self.images[i] = decode_square(path, size)
                self.filled[i] = True
            return self.images[i].clone()
        return self._disk_get(path, size)

    def _disk_get(self, path: Path, size: int) -> torch.Tensor:
        try:
            stat = path.stat()
        except OSError:
            return decode_square(path, size)  # raises the usual UnreadableImageError
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{size}|v{self.VERSION}"
        file = self.directory / f"{hashlib.sha1(key.encode()).hexdigest()}.u8"
        nbytes = 3 * size * size
        try:
            data = file.read_bytes()
            if len(data) == nbytes:
                return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(3, size, size)
        except OSError:
            pass
        image = decode_square(path, size)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(image.numpy().tobytes())
            os.replace(tmp, file)
        except OSError:  # a full or read-only cache folder only costs speed
            tmp.unlink(missing_ok=True)
        return image


@dataclass
class Batch:
    images: torch.Tensor
    """uint8 (N, 3, S, S)."""
    targets: torch.Tensor
    """float64 (N,), target units (NaN when unlabelled)."""
    indices: torch.Tensor
    """int64 (N,): each image's index in the dataset."""
    skipped: list[str]
    """Error messages of the images in this batch that could not be decoded."""

    def pin_memory(self) -> Batch:
        self.images = self.images.pin_memory()
        self.targets = self.targets.pin_memory()
        return self


def collate(items: list[tuple[torch.Tensor, float, int] | str]) -> Batch:
    good = [item for item in items if not isinstance(item, str)]
    skipped = [item for item in items if isinstance(item, str)]
    if not good:
        return Batch(torch.empty(0, 3, 1, 1, dtype=torch.uint8), torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.int64), skipped)
    images = torch.stack([g[0] for g in good])
    targets = torch.tensor([g[1] for g in good], dtype=torch.float64)
    indices = torch.tensor([g[2] for g in good], dtype=torch.int64)
    return Batch(images, targets, indices, skipped)


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
    sampler: torch.utils.data.Sampler | None = None,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A batched loader of `Batch`es; workers stay alive across epochs."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )
