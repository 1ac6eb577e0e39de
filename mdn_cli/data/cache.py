"""Decoded-image caches (`data.cache`): decode and resize each image once, not once per epoch."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import DataError, WriteError
from ..files import atomic_writer
from ..images import decode_square


def cache_directory(setting: str | None) -> Path:
    if setting:
        return Path(setting).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mdn-cli" / "decoded"


class DecodedCache:
    """Decoded, resized images kept across epochs (`data.cache`), so later epochs skip decoding.

    memory: one uint8 tensor (N, 3, S, S) in shared memory that DataLoader workers fill in place;
            under torchrun, one per machine that all its processes fill (`allocate`).
    disk:   one raw file per image under `directory`, named by a hash of the file's path, size
            and mtime and the resize settings: survives restarts, rebuilt when a file changes.
    """

    VERSION = 1  # bump when decode_square changes

    def __init__(
        self,
        mode: str,
        n: int,
        size: int,
        directory: Path | None = None,
        allocate: Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor] | None = None,
        name: str = "images",
    ):
        self.mode, self.size = mode, size
        if mode == "memory":
            allocate = allocate or (lambda _, shape, dtype: torch.zeros(shape, dtype=dtype).share_memory_())
            self.images = allocate(f"{name}-{size}px", (n, 3, size, size), torch.uint8)
            self.filled = allocate(f"{name}-{size}px-filled", (n,), torch.uint8)
        elif mode == "disk":
            if directory is None:
                raise ValueError("a disk cache needs a directory")
            self.directory = Path(directory)
            _check_writable_folder(self.directory)
        else:
            raise ValueError(mode)

    def get(self, i: int, source: Path | bytes, size: int, name: str | None = None) -> torch.Tensor:
        """Image i decoded from `source` (a file, or a shard record's bytes named `name`), once."""
        if self.mode == "memory":
            if not self.filled[i]:
                self.images[i] = decode_square(source, size, name=name)
                self.filled[i] = 1
            return self.images[i].clone()
        return self._disk_get(source, size)

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
        try:
            with atomic_writer(file, "wb", durable=False) as f:
                f.write(image.numpy().tobytes())
        except WriteError:  # a full cache folder only costs speed
            pass
        return image


def _check_writable_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise DataError(
            f"data.cache_dir: {folder} is not a writable folder ({e.strerror or type(e).__name__}); "
            "point data.cache_dir at a folder you can write to, or set data.cache: memory or none"
        ) from None

