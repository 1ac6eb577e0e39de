"""Atomic file writes: a crash, Ctrl-C or full disk leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .errors import WriteError

TMP_SUFFIX = ".tmp"


def temp_path(path: Path) -> Path:
    """The hidden temp file beside `path` that a write goes to first (`.NAME.PID.tmp`)."""
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


@contextmanager
def atomic_writer(path: str | Path, mode: str = "w", durable: bool = True, **open_args: Any) -> Iterator[IO]:
    """Open a temp file beside `path` for writing; on success (fsync it unless not `durable`, as for
    a cache) rename it over `path`. On any failure (exceptions, KeyboardInterrupt, SIGTERM) the temp
    file is removed and `path` is untouched; a write the file system refuses (a full disk, a
    file-size limit) raises WriteError naming `path`."""
    path = Path(path)
    tmp = temp_path(path)
    if "b" not in mode:
        open_args.setdefault("encoding", "utf-8")
    try:
        with open(tmp, mode, **open_args) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_error(path: Path, e: OSError) -> WriteError:
    """The one-line error for a write the file system refused."""
    return WriteError(f"{path}: cannot write ({e.strerror or type(e).__name__}); free some space or choose another folder "
                      f"(the previous {path.name}, if there was one, is intact)")


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_writer(path) as f:
        f.write(text)


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete temp files that a killed process left in `folder` (`.*.tmp`); returns them."""
    stale = sorted(folder.glob(f".*{TMP_SUFFIX}"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
