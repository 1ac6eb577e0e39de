"""Predicting from Python: load a checkpoint once, then predict images as often as needed.

    from mdn_cli.api import Model

    model = Model.load("runs/toy/best.pt")
    records = model.predict(["puppy.jpg", PIL.Image.open("other.png")])
    records[0]["mean"], records[0]["interval_95"]

Each record is exactly what `mdn predict --format json` prints for an image, without the "image"
key: mean, std, median, mode, the central intervals, the components and how the intervals were
calibrated.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .calibration import DEFAULT_LEVELS
from .images import decode_square, square
from .export import OnnxPredictor
from .inference import Predictor
from .predict import onnx_predictor_for, records, summarize
from .runtime import Runtime, select_runtime

ImageLike = str | Path | bytes | Image.Image | np.ndarray | torch.Tensor


class Model:
    """A trained model on a device, ready to predict. Safe to share between threads."""

    def __init__(self, predictor: Predictor, runtime: Runtime, checkpoint: Path, onnx: OnnxPredictor | None = None):
        self.predictor, self.runtime, self.checkpoint, self.onnx = predictor, runtime, checkpoint, onnx
        self._lock = threading.Lock()  # PyTorch forward passes one at a time (the warning's recorders hold per-pass state)

    @classmethod
    def load(cls, checkpoint: str | Path, device: str = "auto", precision: str = "fp32", backend: str = "auto",
             log: Callable[[str], None] = lambda message: None) -> Model:
        """Load a checkpoint (best.pt, or an ensemble). `backend` as `mdn predict --backend`: auto
        runs onnxruntime in fp32 on a CPU where it is installed (its export is cached once), else
        PyTorch. Raises mdn_cli.errors.CheckpointError."""
        runtime = select_runtime(device, precision, what="precision")
        predictor, _ = Predictor.from_checkpoint(checkpoint, runtime)
        return cls(predictor, runtime, Path(checkpoint), onnx_predictor_for(Path(checkpoint), backend, device, precision, log))

    @property
    def backend(self) -> str:
        """What runs the network: "onnxruntime" or "torch"."""
        return "onnxruntime" if self.onnx is not None else "torch"

    @property
    def image_size(self) -> int:
        """Side of the square images are prepared at, in pixels."""
        return self.predictor.image_size

    def prepare(self, image: ImageLike, name: str | None = None) -> torch.Tensor:
        """One image as the model's uint8 input (3, S, S): decoded, upright, RGB, resized so its
        shorter side is S, centre square. Paths and bytes go through the same checks as
        `mdn predict` (raises mdn_cli.images.UnreadableImageError naming `name`)."""
        size = self.image_size
        if isinstance(image, (str, Path, bytes, bytearray)):
            return decode_square(image, size, name=name)
        if isinstance(image, Image.Image):
            return square(image.convert("RGB"), size)
        array = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        if array.dtype != np.uint8 or array.ndim != 3:
            raise ValueError(f"expected a uint8 image array (H, W, 3) or (3, H, W), got {array.dtype} {array.shape}")
        if array.shape[0] == 3 and array.shape[-1] != 3:
            array = array.transpose(1, 2, 0)
        return square(Image.fromarray(np.ascontiguousarray(array), "RGB"), size)

    def predict_prepared(self, batch: torch.Tensor, levels: Sequence[float] = DEFAULT_LEVELS) -> list[dict]:
        """Records for a batch of prepared images, uint8 (N, 3, S, S)."""
        if self.onnx is not None:
            m, ood = self.onnx.predict_batch(batch)
            return summarize(m, self.onnx.calibration, tuple(levels), self.onnx.member_sizes, ood)
        with self._lock:
            predictions = self.predictor.predict_batch(batch, self.runtime)
        return records(self.predictor, predictions, tuple(levels))

    def predict(self, images: Sequence[ImageLike], levels: Sequence[float] = DEFAULT_LEVELS, batch_size: int = 32) -> list[dict]:
        """One record per image, in order."""
        records: list[dict] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            records += self.predict_prepared(torch.stack([self.prepare(image) for image in chunk]), levels)
        return records

    def describe(self) -> dict:
        """What the model is: members (backbone, components, input size), target transform,
        calibration, unfamiliar-image warning."""
        p = self.predictor
        return {
            "checkpoint": str(self.checkpoint),
            "backend": self.backend,
            "members": [{"backbone": m.model.args.backbone, "components": m.model.args.components,
                         "image_size": m.model.args.image_size} for m in p.members],
            "image_size": p.image_size,
            "target_transform": p.transform,
            "calibration": p.calibration.describe(),
            "unfamiliar_images": p.unfamiliar.describe() if p.unfamiliar is not None else None,
        }


__all__ = ["Model"]
