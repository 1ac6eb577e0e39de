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
from .export import OnnxPredictor, is_onnx
from .inference import Predictor
from .predict import onnx_predictor_for, records, summarize
from .runtime import Runtime, select_runtime

ImageLike = str | Path | bytes | Image.Image | np.ndarray | torch.Tensor


class Model:
    """A trained model on a device, ready to predict. Safe to share between threads."""

    def __init__(self, predictor: Predictor | None, runtime: Runtime, checkpoint: Path, onnx: OnnxPredictor | None = None):
        self.predictor, self.runtime, self.checkpoint, self.onnx = predictor, runtime, checkpoint, onnx
        self._lock = threading.Lock()  # PyTorch forward passes one at a time (the warning's recorders hold per-pass state)

    @classmethod
    def load(cls, checkpoint: str | Path, device: str = "auto", precision: str = "fp32", backend: str = "auto",
             log: Callable[[str], None] = lambda message: None) -> Model:
        """Load a checkpoint (best.pt, or an ensemble), or a model `mdn export` wrote (.onnx, run on
        onnxruntime). `backend` as `mdn predict --backend`: auto runs a checkpoint on onnxruntime in
        fp32 on a CPU where it is installed (its export is cached once), else PyTorch. Raises
        mdn_cli.errors.CheckpointError."""
        if is_onnx(Path(checkpoint)):
            return cls(None, Runtime(torch.device("cpu"), None), Path(checkpoint),
                       onnx_predictor_for(Path(checkpoint), backend, device, precision, log))
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
        return (self.onnx or self.predictor).image_size

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

    def predict_prepared(self, batch: torch.Tensor, levels: Sequence[float] = DEFAULT_LEVELS,
                         groups: Sequence[str | None] | None = None) -> list[dict]:
        """Records for a batch of prepared images, uint8 (N, 3, S, S); `groups`: each image's group,
        for a model calibrated by group (an unknown group or none: the overall calibration, said so
        in the record's calibration warning)."""
        groups = list(groups) if groups is not None else None
        if self.onnx is not None:
            m, ood = self.onnx.predict_batch(batch)
            return summarize(self.onnx.calibration.attach(m, groups), tuple(levels), self.onnx.member_sizes, ood)
        with self._lock:
            predictions = self.predictor.predict_batch(batch, self.runtime)
        return records(self.predictor, predictions, tuple(levels), groups)

    def predict(self, images: Sequence[ImageLike], levels: Sequence[float] = DEFAULT_LEVELS, batch_size: int = 32,
                groups: Sequence[str | None] | None = None) -> list[dict]:
        """One record per image, in order (`groups`: one per image, as for `predict_prepared`)."""
        if groups is not None and len(groups) != len(images):
            raise ValueError(f"{len(groups)} groups for {len(images)} images; give one group (or None) per image")
        records: list[dict] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            records += self.predict_prepared(torch.stack([self.prepare(image) for image in chunk]), levels,
                                             groups[start : start + batch_size] if groups is not None else None)
        return records

    @property
    def groups(self) -> tuple[str, ...]:
        """The groups the model is calibrated for one by one (empty: not calibrated by group)."""
        return (self.onnx or self.predictor).calibration.taxonomy.groups

    def describe(self) -> dict:
        """What the model is: members (backbone, components, input size), target transform,
        calibration, unfamiliar-image warning."""
        p = self.predictor
        if p is None:  # an exported model: its metadata says the same
            meta = self.onnx.meta
            members = meta.get("members") or [{"components": k} for k in meta["member_components"]]
            unfamiliar = meta.get("unfamiliar")
            unfamiliar = {k: v for k, v in unfamiliar.items() if k != "threshold_applied"} if unfamiliar else None
            calibration = self.onnx.calibration
        else:
            members = [{"backbone": m.model.args.backbone, "components": m.model.args.components,
                        "image_size": m.model.args.image_size} for m in p.members]
            unfamiliar = p.unfamiliar.describe() if p.unfamiliar is not None else None
            calibration = p.calibration
        return {
            "checkpoint": str(self.checkpoint),
            "backend": self.backend,
            "members": members,
            "image_size": self.image_size,
            "target_transform": (self.onnx or p).transform,
            "calibration": calibration.summary(),
            "unfamiliar_images": unfamiliar,
        }


__all__ = ["Model"]
