"""Self-describing checkpoints: written atomically, loaded with `weights_only=True` only.

A checkpoint is a dict of plain data and tensors:
    format_version  int, FORMAT_VERSION
    config          the resolved config (nested dict)
    model_args      ModelArgs as a dict: rebuilds the network without the config
    target_scaler   TargetScaler as a dict: undoes standardisation and the target transform
    calibration     {"sigma_scale": float, ...} post-hoc calibration (1.0 = none)
    model           model state_dict
    epoch           epochs completed
    ... training state (optimizer, scheduler, history, best_val_nll) in last.pt
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .files import atomic_writer

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "config", "model_args", "target_scaler", "model")


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    """Write atomically (temp file, fsync, rename): a crash leaves either the previous complete
    file or the new complete file, never a torn one."""
    path = Path(path)
    try:
        with atomic_writer(path, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **payload}, f)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write checkpoint ({e.strerror or e}); the previous file is intact") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check a checkpoint; never unpickles arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not zipfile.is_zipfile(path) or "global" not in str(e).lower():
            raise CheckpointError(f"{path}: not a readable mdn checkpoint (truncated or not a checkpoint)") from None
        raise CheckpointError(
            f"{path}: refused to load: the file holds Python objects other than tensors and plain data, "
            "which could run code. Only load checkpoints written by mdn"
        ) from None
    except Exception as e:  # noqa: BLE001 - truncated zips, random bytes and legacy pickles fail in many ways
        raise CheckpointError(f"{path}: not a readable mdn checkpoint (truncated or not a checkpoint: {type(e).__name__})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path}: not an mdn checkpoint (missing {', '.join(k for k in REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt)})")
    version = ckpt["format_version"]
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version}, this mdn reads version {FORMAT_VERSION}; "
            "use the mdn release that wrote it, or retrain"
        )
    return ckpt
