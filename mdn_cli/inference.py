"""A trained model (or an ensemble of them) rebuilt from a checkpoint, run over images batch by batch.

An ensemble of M members, each a mixture of K_m Gaussians, predicts one mixture of sum K_m
Gaussians with every member's weights divided by M (Lakshminarayanan et al. 2017): every exact
summary, score and calibration step applies to it unchanged. A single model is an ensemble of one.
Images are prepared once, at the largest member's input size; smaller members see that square
downscaled (antialiased) inside their forward pass, so every path (files, uploads, ONNX) agrees.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from . import interrupts
from .calibration import Calibrated, Calibration
from .checkpoint import load_checkpoint
from .data import BatchLoader, Source
from .data.dataset import Batch, resolve_num_workers
from .data.labels import Example
from .errors import CheckpointError
from .mixture import Mixture
from .model import MDNRegressor, ModelArgs
from .ood import FeatureBank, StageStatistics, UnfamiliarImages
from .runtime import Outputs, Runtime, concat, model_outputs, run_model
from .targets import TargetScaler


@dataclass
class Member:
    """One trained network: its weights, its target scaling, and its training-feature bank."""

    model: MDNRegressor
    scaler: TargetScaler
    bank: FeatureBank | None = None

    @classmethod
    def from_state(cls, state: dict) -> Member:
        args = ModelArgs.from_dict(state["model_args"])
        model = MDNRegressor(args, pretrained=False)
        model.load_state_dict(state["model"])
        bank = state.get("feature_bank")
        return cls(model, TargetScaler.from_state_dict(state["target_scaler"]), FeatureBank.from_state(bank) if bank else None)


class EnsembleForward(nn.Module):
    """uint8 images (N, 3, S, S) at the largest member's size -> per member (logits, means, stds,
    penultimate features, stage statistics...), flattened into one tuple: what run_model collects.
    `counts[i]`: how many of those tensors member i gave in the last call."""

    def __init__(self, members: list[MDNRegressor]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.stages = [StageStatistics(m.backbone) for m in members]
        for model, stages in zip(members, self.stages):
            stages.plan(model.args.image_size)
        self.counts: list[int] = []

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out: list[torch.Tensor] = []
        self.counts = []
        for model, stages in zip(self.members, self.stages):
            size = model.args.image_size
            x = images if images.shape[-1] == size else F.interpolate(images.float(), size=(size, size), mode="bilinear",
                                                                      antialias=True, align_corners=False)
            features = model.features(x)
            part = [*model.head(features), features.float(), *stages.collect()]
            self.counts.append(len(part))
            out += part
        return tuple(out)


@dataclass
class Predictions:
    """Per-member head outputs and features for every image that decoded, in loader order, on the CPU."""

    heads: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    """Per member (logits, means, stds), each (N, K_m) float32, standardised target space."""
    features: list[list[torch.Tensor]]
    """Per member: penultimate features (N, D) then each stage's statistics (N, 2C), float32."""
    targets: torch.Tensor
    """(N,) float64, target units (NaN when unlabelled)."""
    indices: torch.Tensor
    """(N,) int64: index of each row in the list of images."""


@dataclass
class Predictor:
    """A trained model or ensemble ready to predict: members, calibration, unfamiliar-image warning."""

    members: list[Member]
    calibration: Calibration
    unfamiliar: UnfamiliarImages | None = None
    target: dict | None = None
    """{"name", "unit"} of what is predicted (from the training config)."""

    @classmethod
    def from_checkpoint(cls, path, runtime: Runtime) -> tuple[Predictor, dict]:
        """Load and check a checkpoint file; returns the predictor and the checkpoint's contents."""
        return cls.from_checkpoint_state(load_checkpoint(path), runtime, path)

    @classmethod
    def from_checkpoint_state(cls, ckpt: dict, runtime: Runtime, path="checkpoint") -> tuple[Predictor, dict]:
        try:
            states = ckpt["members"] if ckpt.get("kind") == "ensemble" else [ckpt]
            members = [Member.from_state(state) for state in states]
            if len({m.scaler.transform for m in members}) != 1:
                raise ValueError("members with different target transforms")
            calibration = Calibration.from_state(ckpt.get("calibration") or {})
            unfamiliar = None
            if ckpt.get("unfamiliar"):
                if any(m.bank is None for m in members):
                    raise ValueError("an unfamiliar-image threshold without feature banks")
                unfamiliar = UnfamiliarImages.from_state(ckpt["unfamiliar"], [m.bank for m in members])  # type: ignore[misc]
            _check_plausible(members)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: damaged, or not written by this mdn ({type(e).__name__}: {str(e)[:200]}); "
                                  "use the checkpoint a training run wrote, or retrain") from None
        for member in members:
            runtime.prepare(member.model).eval()
        interrupts.reached("checkpoint-loaded")
        data = (ckpt.get("config") or {}).get("data", {})
        target = {"name": data.get("target_name") or data.get("target_column") or "target", "unit": data.get("target_unit", "")}
        return cls(members, calibration, unfamiliar, target), ckpt

    def __post_init__(self) -> None:
        self.forward = EnsembleForward([m.model for m in self.members]).eval()

    @property
    def image_size(self) -> int:
        """The side of the square images are prepared at (the largest member's input)."""
        return max(m.model.args.image_size for m in self.members)

    @property
    def transform(self) -> str:
        return self.members[0].scaler.transform

    @property
    def member_sizes(self) -> list[int]:
        """Components per member, in the order of the mixture's columns."""
        return [m.model.args.components for m in self.members]

    def mixture(self, predictions: Predictions, calibrated: bool = True) -> Mixture:
        """The predicted mixtures in the model's target space (with the std scale unless not
        `calibrated`): every member's components, weights divided by the number of members."""
        parts = [m.scaler.to_mixture(*heads) for m, heads in zip(self.members, predictions.heads)]
        raw = Mixture(
            torch.cat([p.weights for p in parts], dim=1) / len(parts),
            torch.cat([p.means for p in parts], dim=1),
            torch.cat([p.stds for p in parts], dim=1),
            self.transform,
        )
        return self.calibration.scaled(raw) if calibrated else raw

    def calibrated(self, predictions: Predictions, groups: list[str | None] | None = None) -> Calibrated:
        """The predictions as reported: scaled, each row with its calibration set (`groups`: each
        image's group, for a model calibrated by group)."""
        return self.calibration.attach(self.mixture(predictions), groups)

    def ood_scores(self, predictions: Predictions) -> torch.Tensor | None:
        """(N,) ood_score (above 1: unlike the training images), or None without a warning model."""
        return self.unfamiliar.scores(predictions.features) if self.unfamiliar is not None else None

    def predict_batch(self, images: torch.Tensor, runtime: Runtime) -> Predictions:
        """Predictions for a batch of prepared uint8 images (N, 3, S, S), S = image_size."""
        n = images.shape[0]
        batch = Batch(images, torch.full((n,), math.nan, dtype=torch.float64), torch.arange(n), torch.full((n,), -1), [])
        return self._collect(run_model(self.forward, [batch], runtime, on_skip=print))

    def run(self, loader: BatchLoader, runtime: Runtime, on_skip: Callable[[str], None] = print, progress: bool = False,
            moment: str = "predict-batch") -> Predictions:
        """Predictions for every image of a source's loader that decodes (`Predictor.loader`); the
        loader is closed afterwards. Each batch is a safe point for a stop (`moment` names it)."""
        parts = list(self.stream(loader, runtime, on_skip, progress, moment))
        return parts[0] if len(parts) == 1 else self._collect(concat([]))

    def stream(self, loader: BatchLoader, runtime: Runtime, on_skip: Callable[[str], None] = print, progress: bool = False,
               moment: str = "predict-batch", chunk: int = sys.maxsize) -> Iterator[Predictions]:
        """`run`, a chunk of at least `chunk` images at a time (memory stays flat)."""
        batches = tqdm(loader, desc="predicting", unit="batch", leave=False, disable=not progress or len(loader) < 2)
        try:
            for outputs in model_outputs(self.forward, batches, runtime, on_skip, moment, chunk):
                yield self._collect(outputs)
        finally:
            loader.close()

    def loader(self, source: Source, examples: list[Example], num_workers: int | str = "auto", batch_size: int = 64,
               name: str = "predict", pin_memory: bool = False) -> BatchLoader:
        """A loader of `examples`' images from `source`, prepared at this predictor's input size."""
        return source.loader(examples, self.image_size, batch_size, resolve_num_workers(num_workers), pin_memory=pin_memory, name=name)

    def _collect(self, outputs: Outputs) -> Predictions:
        heads, features, start = [], [], 0
        for count in self.forward.counts if outputs.heads else []:  # none when no image decoded: callers check
            part = outputs.heads[start : start + count]
            heads.append(tuple(part[:3]))
            features.append(list(part[3:]))
            start += count
        return Predictions(heads, features, outputs.targets, outputs.indices)  # type: ignore[arg-type]


def _check_plausible(members: list[Member]) -> None:
    """Refuse stored values no training could have produced, rather than print NaN or negative stds."""
    for m in members:
        args, scaler = m.model.args, m.scaler
        if not (math.isfinite(scaler.scale) and scaler.scale > 0 and math.isfinite(scaler.loc)):
            raise ValueError(f"impossible target scaling (loc={scaler.loc}, scale={scaler.scale})")
        if not (16 <= args.image_size <= 4096) or not (args.sigma_min > 0) or not all(s > 0 for s in args.std):
            raise ValueError(f"impossible model arguments (image_size={args.image_size}, sigma_min={args.sigma_min}, std={args.std})")
        for name, value in m.model.state_dict().items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(f"non-finite weights in {name}")
