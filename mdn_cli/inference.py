"""Rebuild a trained model from a checkpoint and run it over a loader, batch by batch."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .calibration import Calibration
from .checkpoint import load_checkpoint
from .dataset import Batch, ImageRegressionDataset, make_loader, resolve_num_workers
from .errors import CheckpointError
from .mixture import Mixture
from .model import MDNRegressor, ModelArgs
from .runtime import Runtime
from .targets import TargetScaler


@dataclass
class Predictor:
    """A trained model ready to predict: the network, its target scaling and its calibration."""

    model: MDNRegressor
    scaler: TargetScaler
    calibration: Calibration

    @classmethod
    def from_checkpoint(cls, path, runtime: Runtime) -> tuple[Predictor, dict]:
        ckpt = load_checkpoint(path)
        try:
            args = ModelArgs.from_dict(ckpt["model_args"])
            model = MDNRegressor(args, pretrained=False)
            model.load_state_dict(ckpt["model"])
            scaler = TargetScaler.from_state_dict(ckpt["target_scaler"])
            calibration = Calibration.from_state(ckpt.get("calibration") or {})
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: checkpoint contents do not match this mdn ({type(e).__name__}: {str(e)[:160]})") from None
        runtime.prepare(model).eval()
        return cls(model, scaler, calibration), ckpt

    def mixture(self, outputs: Outputs, calibrated: bool = True) -> Mixture:
        """The predicted mixtures in the model's target space (with the std scale unless not `calibrated`)."""
        m = self.scaler.to_mixture(*outputs.heads)
        scale = self.calibration.sigma_scale
        return m.scaled(scale) if calibrated and scale != 1.0 else m

    def outputs_of(self, images: torch.Tensor, runtime: Runtime) -> Outputs:
        """Head outputs for a batch of prepared uint8 images (N, 3, S, S)."""
        n = images.shape[0]
        batch = Batch(images, torch.full((n,), math.nan, dtype=torch.float64), torch.arange(n), torch.full((n,), -1), [])
        return run_model(self.model, [batch], runtime, on_skip=print)

    def run(
        self,
        paths: list[Path],
        runtime: Runtime,
        targets: list[float] | None = None,
        batch_size: int = 64,
        num_workers: int | str = "auto",
        on_skip: Callable[[str], None] = print,
        progress: bool = False,
    ) -> Outputs:
        """Head outputs for every image of `paths` that decodes (unlabelled: NaN targets)."""
        dataset = ImageRegressionDataset(paths, targets if targets is not None else [math.nan] * len(paths), self.model.args.image_size)
        workers = 0 if len(paths) <= batch_size else resolve_num_workers(num_workers)
        loader = make_loader(dataset, batch_size, workers, pin_memory=runtime.pin_memory)
        batches = tqdm(loader, desc="predicting", unit="batch", leave=False, disable=not progress or len(loader) < 2)
        return run_model(self.model, batches, runtime, on_skip)


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
