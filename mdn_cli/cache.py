"""Decoded-image caches (`data.cache`): decode and resize each image once, not once per epoch."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from .dataset import decode_square


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

