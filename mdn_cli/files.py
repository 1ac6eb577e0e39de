"""Atomic file writes: a crash, Ctrl-C or full disk leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TMP_SUFFIX = ".tmp"
_held: list[int] | None = None  # the signals held by the outermost `interrupts_held` block, while it runs


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends, then deliver them: a group of files (an epoch's
    checkpoints and history) is written whole, and an interrupt never lands inside `torch.save`,
    whose zip writer turns it into a RuntimeError. Nests; a no-op outside the main thread."""
    global _held
    if _held is not None or threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    _held = held
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():  # a signal arriving meanwhile still lands in `held`
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        _held = None
        for signum in dict.fromkeys(held):  # each kind once; the handler in force before decides what it means
            signal.raise_signal(signum)


def temp_path(path: Path) -> Path:
    """The hidden temp file beside `path` that a write goes to first (`.NAME.PID.tmp`)."""
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


@contextmanager
def atomic_writer(path: str | Path, mode: str = "w", durable: bool = True, **open_args: Any) -> Iterator[IO]:
    """Open a temp file beside `path` for writing; on success (fsync it unless not `durable`, as for
    a cache) rename it over `path`. On any failure (exceptions, KeyboardInterrupt, SIGTERM) the temp
    file is removed and `path` is untouched."""
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
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_writer(path) as f:
        f.write(text)


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete temp files that a killed process left in `folder` (`.*.tmp`); returns them."""
    stale = sorted(folder.glob(f".*{TMP_SUFFIX}"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
