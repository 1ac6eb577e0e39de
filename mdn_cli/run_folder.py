"""The run folder `run.out_dir/run.name`: what mdn writes there, and when it may reuse it.

A folder holds a run to protect once it has a last.pt (a completed epoch). Files of a start that
failed before that are mdn's own leftovers and are replaced without asking. `--overwrite`
removes only the files listed in RUN_FILES, never anything else in the folder.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock, Timeout

from .checkpoint import load_checkpoint
from .config import Config
from .errors import RunError
from .files import remove_stale_temp_files

RUN_FILES = (
    "config.yaml", "splits.csv", "metrics.csv", "last.pt", "best.pt", "eval", "skipped.txt", "curves.png", "tensorboard",
)
# Keys that may change on --resume: they change how the run is executed or how long it runs, not
# what the epochs done so far mean.
RESUMABLE_CHANGES = {
    "train.epochs", "train.early_stopping_patience", "train.extend_lr_scale", "train.precision", "train.compile",
    "data.num_workers", "data.cache", "data.cache_dir", "data.shard_cache_dir", "data.shard_cache_gb", "run.device", "run.tensorboard",
}


def lock_run_dir(run_dir: Path) -> FileLock:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(run_dir / ".lock")
        lock.acquire(timeout=0)
    except Timeout:
        raise RunError(f"{run_dir}: another mdn process is training into this folder; wait for it or pick another run.name") from None
    except OSError as e:
        raise RunError(f"{run_dir}: cannot create the run folder ({e.strerror}); check run.out_dir") from None
    return lock


def prepare_run_dir(run_dir: Path, cfg: Config, resume: bool, overwrite: bool, log: Callable[[str], None]) -> None:
    """Check that the folder may be used as asked; clear what may be cleared."""
    if resume and overwrite:
        raise RunError("--resume and --overwrite contradict each other; pick one")
    stale = remove_stale_temp_files(run_dir)  # left by a process that was killed mid-write
    if stale:
        log(f"removed {len(stale)} unfinished temporary file{'s' if len(stale) > 1 else ''} left by an earlier process")
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    has_run = (run_dir / "last.pt").exists()
    if resume:
        if not has_run:
            raise RunError(f"{run_dir}: nothing to resume (no last.pt: no epoch was completed); start without --resume")
        previous = load_checkpoint(run_dir / "last.pt")["config"]
        changed = changed_keys(previous, cfg.model_dump(mode="json"))
        if changed:
            raise RunError(
                f"{run_dir}: cannot resume with a different config ({', '.join(changed)} changed); "
                f"only {', '.join(sorted(RESUMABLE_CHANGES))} may change. Start a new run with another run.name"
            )
        return
    if has_run and not overwrite:
        raise RunError(
            f"{run_dir} already holds a run ({', '.join(existing)}); continue it with --resume, "
            "replace it with --overwrite, or set run.name"
        )
    for name in existing:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if existing and has_run:
        log(f"--overwrite: removed {', '.join(existing)} from {run_dir}")


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        dotted = prefix + key
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, dotted + ".")
        elif a != b and dotted not in RESUMABLE_CHANGES:
            keys.append(dotted)
    return keys
