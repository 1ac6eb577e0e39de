"""Rebuild a trained model from a checkpoint and run it over a loader, batch by batch."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .calibration import NOMINAL_PROBS
from .checkpoint import load_checkpoint
from .dataset import Batch
from .errors import CheckpointError
from .mixture import Mixture
from .model import MDNRegressor, ModelArgs
from .runtime import Runtime
from .targets import TargetScaler


@dataclass
class Predictor:
    model: MDNRegressor
    scaler: TargetScaler
    sigma_scale: float = 1.0
    """Post-hoc calibration factor on every component std (1.0 = none)."""
    interval_probs: tuple[float, float, float, float] = NOMINAL_PROBS
    """CDF levels of the reported 68% and 95% intervals (conformal calibration moves them)."""

    @classmethod
    def from_checkpoint(cls, path, runtime: Runtime) -> tuple[Predictor, dict]:
        ckpt = load_checkpoint(path)
        try:
            args = ModelArgs.from_dict(ckpt["model_args"])
            model = MDNRegressor(args, pretrained=False)
            model.load_state_dict(ckpt["model"])
            scaler = TargetScaler.from_state_dict(ckpt["target_scaler"])
            calibration = ckpt.get("calibration") or {}
            sigma_scale = float(calibration.get("sigma_scale", 1.0))
            probs = tuple(float(p) for p in calibration.get("interval_probs", NOMINAL_PROBS))
            if len(probs) != 4:
                raise ValueError("interval_probs must hold 4 probabilities")
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: checkpoint contents do not match this mdn ({type(e).__name__}: {str(e)[:160]})") from None
        runtime.prepare(model).eval()
        return cls(model, scaler, sigma_scale, probs), ckpt

    def mixture(self, outputs: Outputs, calibrated: bool = True) -> Mixture:
        m = self.scaler.to_mixture(*outputs.heads)
        return m.scaled(self.sigma_scale) if calibrated and self.sigma_scale != 1.0 else m


@dataclass
class Outputs:
    """Head outputs for every image that decoded, in loader order, on the CPU."""

    heads: tuple[torch.Tensor, ...]
    """The model's outputs, float32: for MDNRegressor (logits, means, stds), each (N, K), in
    standardised target space."""
    targets: torch.Tensor
    """(N,) float64, target units."""
    indices: torch.Tensor
    """(N,) int64: dataset index of each row."""


@torch.inference_mode()
def run_model(model: torch.nn.Module, batches: Iterable[Batch], runtime: Runtime, on_skip: Callable[[str], None]) -> Outputs:
    """Run `model` over `batches` in eval mode; `on_skip(message)` for each image that did not decode."""
    was_training = model.training
    model.eval()
    heads: list[tuple[torch.Tensor, ...]] = []
    targets: list[torch.Tensor] = []
    indices: list[torch.Tensor] = []
    try:
        for batch in batches:
            for message in batch.skipped:
                on_skip(message)
            if batch.images.shape[0] == 0:
                continue
            with runtime.autocast():
                out = model(runtime.images(batch.images))
            heads.append(tuple(o.float().cpu() for o in (out if isinstance(out, tuple) else (out,))))
            targets.append(batch.targets)
            indices.append(batch.indices)
    finally:
        model.train(was_training)
    if not heads:
        empty = torch.empty(0, 0)
        return Outputs((empty, empty, empty), torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.int64))
    return Outputs(tuple(torch.cat(p) for p in zip(*heads)), torch.cat(targets), torch.cat(indices))  # type: ignore[arg-type]
