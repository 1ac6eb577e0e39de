"""Self-describing checkpoints: written atomically, loaded with `weights_only=True` only.

A checkpoint is a dict of plain data and tensors:
    format_version  int, FORMAT_VERSION
    config          the resolved config (nested dict)
    model_args      ModelArgs as a dict: rebuilds the network without the config
    target_scaler   TargetScaler as a dict: undoes standardisation and the target transform
    model           model state_dict
    epoch           epochs completed
    data            {"labels_sha256", "splits"}: the labels file and split the run was trained on
    calibration     Calibration.state(): std scale, sorted calibration scores (calibration.py)
    feature_bank    training features for the unfamiliar-image score (ood.py), after training
    unfamiliar      the unfamiliar-image threshold (ood.py), after training
    ... training state (optimizer, scheduler, schedule, grad_scaler, history, best_val_nll) in last.pt
An ensemble (kind: "ensemble") holds `members`, each with the model keys above, and its own
config, data, calibration and unfamiliar entries.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from . import interrupts
from .files import atomic_writer, write_error

FORMAT_VERSION = 2
REQUIRED_KEYS = ("format_version", "config", "model_args", "target_scaler", "model")
ENSEMBLE_KEYS = ("format_version", "config", "members", "calibration")


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    """Write atomically (temp file, fsync, rename): a crash, a full disk or Ctrl-C leaves either the
    previous complete file or the new complete file, never a torn one; a stop waits for the write."""
    path = Path(path)
    with interrupts.interrupts_held(), atomic_writer(path, "wb") as f:
        interrupts.reached("checkpoint-write")
        recording = _WriteErrors(f)
        try:
            torch.save({"format_version": FORMAT_VERSION, **payload}, recording)
        except RuntimeError:
            # torch's zip writer turns the file system's refusal into "enforce fail ... unexpected pos"
            if recording.error is None:
                raise
            raise write_error(path, recording.error) from None


class _WriteErrors:
    """A binary file that remembers the OSError of a failed write (torch.save hides it)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


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
    required = ENSEMBLE_KEYS if isinstance(ckpt, dict) and ckpt.get("kind") == "ensemble" else REQUIRED_KEYS
    missing = [k for k in required if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not an mdn checkpoint (missing {', '.join(missing)})")
    version = ckpt["format_version"]
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version}, this mdn reads version {FORMAT_VERSION}; "
            "use the mdn release that wrote it, or retrain"
        )
    return ckpt
