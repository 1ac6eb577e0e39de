#!/usr/bin/env python
"""Speed of mdn's own code paths against bare PyTorch on the same machine, in one run.

    python scripts/bench.py [--quick] [--json OUT.json] [--device auto]

Builds a temporary folder of synthetic JPEG photos (320x240, smooth random content plus texture,
so decoding costs what a real photo of that size costs) and, per setting (backbone, image size,
batch size), measures:

1. training: mdn's own epochs (`mdn_cli.train.Training`, set up as `mdn train` sets it up, with
   a warm memory cache, `auto` workers and augmentation as configured; `Training.fit`) against a
   bare loop (same MDNRegressor, same AdamW, same mixture NLL) over pre-decoded uint8 tensors
   already on the device: images/s and the ratio mdn / bare;
2. the loader alone (no model): images/s cold (decoding every JPEG), warm from the memory cache
   and warm from a disk cache, each as a multiple of the bare training step's consumption rate;
3. shards: training images/s from the same images written as shards (`mdn shard`), on local disk
   and on a loopback S3 server (moto), against the folder;
4. prediction: `mdn_cli.predict.predict_images` on every image of the folder (onnxruntime, and
   `--backend torch`) against two bare loops: batched inference on pre-decoded tensors, and one
   that decodes the same files with the same decoder before each batch; and the wall time of
   `mdn predict one.jpg --checkpoint ckpt.pt` against a minimal script that loads the same
   checkpoint and runs one forward pass;
5. compute: FLOPs of one forward pass (FlopCounterMode; training ~ 3x forward) times the bare
   loop's rate, against a large matmul on the same device (the practical ceiling).

Every rate is the median over timed windows taken after warm-up; mdn and bare windows alternate,
so background load hits both alike. Prints a markdown table (with the targets and whether each is
met) and writes every number, including each window, to --json.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from mdn_cli.checkpoint import save_checkpoint
from mdn_cli.config import Config, load_config
from mdn_cli.data.cache import DecodedCache
from mdn_cli.data.dataset import Augment, resolve_num_workers
from mdn_cli.data.folder import unlabelled
from mdn_cli.distributed import Dist
from mdn_cli.engine import compile_module, make_optimizer, set_train_mode
from mdn_cli.images import decode_square
from mdn_cli.mixture import mixture_nll
from mdn_cli.model import MDNRegressor
from mdn_cli.predict import predict_images
from mdn_cli.runtime import Runtime, select_runtime
from mdn_cli.train import Training, model_args


def optimizer_for(model: MDNRegressor, cfg: Config) -> torch.optim.Optimizer:
    return make_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.backbone_lr_scale)


PHOTO_SIZE = (320, 240)  # width, height of the synthetic photos
# (cells across, amplitude) of the random colour fields summed into each photo: about 24 KB per
# JPEG at quality 90, 2.5 bits per pixel, like a real photo of that size
OCTAVES = ((4, 1.0), (16, 0.4), (64, 0.25), (160, 0.15))

TARGETS = {
    "train_ratio": (">=", 0.90, "training mdn / bare (warm memory cache)"),
    "loader_memory_x_bare": (">=", 2.0, "loader warm (memory) / bare step consumption"),
    "loader_disk_x_bare": (">=", 2.0, "loader warm (disk) / bare step consumption"),
    "shards_local_ratio": (">=", 0.95, "training from local shards / from the same images as a folder"),
    "shards_s3_ratio": (">=", 0.90, "training from shards on a loopback S3 server / from a folder"),
    "predict_decoding_ratio": (">=", 0.95, "batch prediction / bare loop decoding the same files"),
    "predict_decoding_ratio_torch": (">=", 0.95, "batch prediction `--backend torch` / bare loop decoding the same files"),
    "predict_batch_ratio": (">=", 0.90, "batch prediction / bare inference on pre-decoded tensors (headline setting)"),
    "predict_batch_ratio_torch": (">=", 0.90, "`--backend torch` / bare inference on pre-decoded tensors (headline setting)"),
    "predict_torch_ratio_small": (">=", 0.85, "`--backend torch` / bare inference on pre-decoded tensors (small setting)"),
    "predict_single_ratio": ("<=", 1.30, "`mdn predict one.jpg` wall time / minimal script"),
}


@dataclass(frozen=True)
class Setting:
    name: str
    backbone: str
    image_size: int
    batch_size: int


@dataclass(frozen=True)
class Plan:
    """How much work each measurement does."""

    n_images: int
    settings: tuple[Setting, ...]
    train_windows: int
    """Timed training windows (each: one whole `fit_epoch` call / the same number of bare steps)."""
    cpu_train_batches: int | None
    """On CPU, train on the folder's first N batches only (an epoch over 512 images at 224 px takes
    minutes on a laptop-class CPU); None or an accelerator: every image."""
    loader_windows: int
    predict_windows: int
    bare_predict_batches: int
    cli_runs: int
    cli_warmup: bool
    matmul_size: int
    matmul_repeats: int


FULL = Plan(
    n_images=512,
    settings=(Setting("headline", "resnet18", 224, 32), Setting("small", "resnet18", 96, 64)),
    train_windows=4,
    cpu_train_batches=3,
    loader_windows=5,
    predict_windows=3,
    bare_predict_batches=4,
    cli_runs=5,
    cli_warmup=True,
    matmul_size=2048,
    matmul_repeats=10,
)
QUICK = Plan(
    n_images=64,
    settings=(Setting("headline", "resnet18", 64, 16),),  # the small setting runs the same code
    train_windows=2,
    cpu_train_batches=None,
    loader_windows=2,
    predict_windows=2,
    bare_predict_batches=2,
    cli_runs=1,
    cli_warmup=False,
    matmul_size=512,
    matmul_repeats=3,
)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Timing helpers


def sync(device: torch.device) -> None:
    """Wait for queued device work, so a timer reads finished work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn, device: torch.device):
    """(seconds, fn()) with the device synchronised on both sides."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


@dataclass
class Rate:
    """Items per second over timed windows; `value` is the median window's rate."""

    windows: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    items: list[int] = field(default_factory=list)

    def add(self, seconds: float, items: int) -> None:
        self.seconds.append(seconds)
        self.items.append(items)
        self.windows.append(items / seconds)

    @property
    def value(self) -> float:
        return statistics.median(self.windows)

    def to_json(self) -> dict:
        return {"images_per_s": self.value, "windows": self.windows, "seconds": self.seconds, "images": self.items}


# ---------------------------------------------------------------------------------------------
# Data


def make_photos(folder: Path, n: int, seed: int = 0) -> tuple[list[Path], list[float]]:
    """n JPEG photos of 320x240: smooth random colour fields plus finer texture and sensor-like
    noise (a flat image would compress to almost nothing and decode unrealistically fast).
    Targets: a positive number tied to the image's brightness."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = PHOTO_SIZE
    paths, targets = [], []
    for i in range(n):
        canvas = np.zeros((h, w, 3), dtype=np.float32)
        for cells, amplitude in OCTAVES:
            low = rng.uniform(0, 255, (max(2, cells * h // w), cells, 3)).astype(np.uint8)
            canvas += amplitude * np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), dtype=np.float32)
        canvas = canvas / sum(a for _, a in OCTAVES) + rng.normal(0, 6, canvas.shape)
        pixels = np.clip(canvas, 0, 255).astype(np.uint8)
        path = folder / f"photo_{i:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
        targets.append(1.0 + float(pixels.mean()) / 32.0 + float(rng.normal(0, 0.2)))
    return paths, targets


def predecode(paths: list[Path], size: int, runtime: Runtime) -> torch.Tensor:
    """Every image decoded and resized once (the same pixels mdn's cache holds), on the device in
    the layout mdn feeds the model (channels_last on CUDA)."""
    return runtime.images(torch.stack([decode_square(p, size) for p in paths]))


def bench_config(setting: Setting, device: str, epochs: int) -> Config:
    return load_config(
        None,
        [
            f"run.device={device}",
            f"model.backbone={setting.backbone}",
            "model.pretrained=false",
            f"data.image_size={setting.image_size}",
            f"train.batch_size={setting.batch_size}",
            f"train.epochs={epochs}",
            "data.cache=memory",
            "data.num_workers=auto",
        ],
    )


def on_skip(message: str) -> None:
    raise RuntimeError(f"synthetic image failed to decode: {message}")


# ---------------------------------------------------------------------------------------------
# Measurements


def measure_matmul(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> dict:
    """GFLOP/s of an n x n matmul: the practical compute ceiling of this device."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    single, _ = timed(lambda: a @ b, device)
    inner = max(1, math.ceil(0.05 / single))  # fast devices: several products per sample

    def run():
        for _ in range(inner):
            a @ b

    samples = [timed(run, device)[0] / inner for _ in range(repeats)]
    seconds = statistics.median(samples)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "repeats": repeats, "per_sample": inner,
            "seconds": seconds, "gflops": 2 * n**3 / seconds / 1e9}


def count_forward_flops(model: MDNRegressor, images: torch.Tensor) -> float:
    """FLOPs of one forward pass per image (convolutions and matmuls, as FlopCounterMode counts)."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images)
    model.train(was_training)
    return counter.get_total_flops() / images.shape[0]


VAL_IMAGES = 8  # photos beyond the plan's, as the val split `Training` requires (never timed)


def write_labels(setting: Setting, photos: Path, paths: list[Path], targets: list[float], n_train: int, val: list[Path]) -> str:
    """A labels file of the first `n_train` photos (train) and `val`; returns its name."""
    labels = photos / f"labels-{setting.name}.csv"
    rows = [f"{p.name},{t!r},train" for p, t in zip(paths[:n_train], targets[:n_train])]
    rows += [f"{p.name},{targets[0]!r},val" for p in val]
    labels.write_text("image,target,split\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return labels.name


def build_training(setting: Setting, device: str, photos: Path, labels: str, epochs: int, tmp: Path, name: str = "folder",
                   **data) -> Training:
    """The run `mdn train` would set up (mdn_cli.train.Training: labels, split, target scaling,
    loaders with a memory cache, model, optimiser, schedule) for the labels file `labels` in
    `photos`; `data`: other data settings (shards)."""
    cfg = bench_config(setting, device, epochs)
    cfg.data.root, cfg.data.labels, cfg.data.split_column = str(photos), labels, "split"
    for key, value in data.items():
        setattr(cfg.data, key, value)
    cfg.run.out_dir, cfg.run.name = str(tmp / "runs"), f"{setting.name}-{name}"
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    run_dir.mkdir(parents=True)
    runtime = select_runtime(cfg.run.device, cfg.train.precision)
    training = Training(cfg, model_args(cfg), run_dir, runtime, Dist(), False, log)
    training.setup()
    return training


def make_bare_step(model: MDNRegressor, cfg: Config, runtime: Runtime, images: torch.Tensor, y: torch.Tensor,
                   batch_size: int, forward=None):
    """The compute-only reference: forward, mixture NLL, backward, AdamW step on tensors already
    on the device. No loader, no gradient clipping, no per-step host sync. `forward`: the model as
    called (torch.compile'd when mdn compiles it)."""
    forward = forward or model
    optimizer = optimizer_for(model, cfg)
    grad_scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.needs_grad_scaler)
    set_train_mode(model, False, batch_size)
    steps = images.shape[0] // batch_size

    def run(n_steps: int = steps) -> int:
        for i in range(n_steps):
            j = (i % steps) * batch_size
            with runtime.step_autocast():  # the precision of mdn's own training steps
                logits, means, stds = forward(images[j : j + batch_size])
            loss = mixture_nll(logits, means, stds, y[j : j + batch_size]).mean()
            optimizer.zero_grad(set_to_none=True)
            grad_scaler.scale(loss).backward()
            grad_scaler.step(optimizer)
            grad_scaler.update()
        return n_steps * batch_size

    return run


def measure_training(training: Training, bare_images: torch.Tensor, windows: int) -> dict:
    """mdn's own epochs (`Training.fit`: the loader, augmentation, the Fitter's step) against the
    bare loop, windows alternating."""
    t, device = training, training.runtime.device
    cfg = t.cfg
    bare_model = copy.deepcopy(t.model)  # same weights, its own optimiser
    y = t.targets.encode(torch.tensor([e.target for e in t.data.split("train")], dtype=torch.float64)).float().to(device)
    forward = compile_module(bare_model, log) if cfg.train.compile else bare_model
    bare = make_bare_step(bare_model, cfg, t.runtime, bare_images, y, cfg.train.batch_size, forward)

    def mdn_epoch(epoch: int) -> int:
        return t.fit(epoch).images

    warm_s, _ = timed(lambda: mdn_epoch(0), device)  # starts the workers and fills the memory cache
    bare(1)
    log(f"  train warm-up epoch (cold cache) {warm_s:.1f}s")
    mdn, ref = Rate(), Rate()
    for w in range(windows):
        ref.add(*timed(bare, device))
        mdn.add(*timed(lambda: mdn_epoch(w + 1), device))
        log(f"  train window {w + 1}/{windows}: mdn {mdn.windows[-1]:.1f} img/s, bare {ref.windows[-1]:.1f} img/s")
    del bare_model, bare
    return {
        "train_images": len(t.data.split("train")),
        "steps_per_window": t.steps_per_epoch,
        "augment": {"flip": cfg.data.flip, "shift": cfg.data.shift},
        "workers": t.num_workers,
        "precision": t.runtime.precision,
        "cold_first_epoch_images_per_s": t.steps_per_epoch * cfg.train.batch_size / warm_s,
        "mdn": mdn.to_json(),
        "bare": ref.to_json(),
        "ratio": mdn.value / ref.value,
    }


def loader_rate(loader, windows: int) -> Rate:
    """Images/s of full passes over `loader` with nothing consuming them; one warm-up pass."""

    def one_pass() -> int:
        return sum(batch.images.shape[0] for batch in loader)

    loader.set_epoch(0)
    one_pass()
    rate = Rate()
    for w in range(windows):
        loader.set_epoch(w + 1)
        start = time.perf_counter()
        n = one_pass()
        rate.add(time.perf_counter() - start, n)
    return rate


def measure_loader(setting: Setting, cfg: Config, runtime: Runtime, paths: list[Path], bare_rate: float, windows: int,
                   tmp: Path) -> dict:
    """mdn's loader alone over the whole folder (training settings: seeded shuffle, augmentation,
    batch size, auto workers): cold, warm memory cache, warm disk cache."""
    size, workers = setting.image_size, resolve_num_workers(cfg.data.num_workers)
    caches = {
        "cold": None,
        "memory": DecodedCache("memory", len(paths), size),
        "disk": DecodedCache("disk", len(paths), size, tmp / f"disk-cache-{setting.name}"),
    }
    source, examples = unlabelled(paths)
    out = {"images": len(paths), "workers": workers}
    for name, cache in caches.items():
        loader = source.loader(examples, size, setting.batch_size, workers, train=True, seed=cfg.run.seed,
                               augment=Augment(cfg.data.flip, cfg.data.shift), cache=cache, pin_memory=runtime.pin_memory)
        rate = loader_rate(loader, windows)
        out[name] = {**rate.to_json(), "x_bare_step": rate.value / bare_rate}
        log(f"  loader {name}: {rate.value:.0f} img/s = {rate.value / bare_rate:.1f}x the bare step")
        loader.close()
        gc.collect()
    return out


def write_bench_checkpoint(training: Training, path: Path) -> None:
    """The checkpoint training writes (best.pt, not calibrated), from the bench model."""
    save_checkpoint(training.model_state(), path)


def measure_batch_prediction(training: Training, checkpoint: Path, paths: list[Path], bare_images: torch.Tensor,
                             plan: Plan) -> dict:
    """`predict_images` on the whole folder (load checkpoint, decode through the loader, forward,
    the unfamiliar-image statistics, exact mixture summaries), with each backend, against two bare
    loops: batched inference on pre-decoded tensors (the strict reference: no decoding at all),
    and one that decodes the same files with the same decoder (images.decode_square) batch by
    batch in this process, then runs the network (the fair one: what any program must do)."""
    runtime, bs, size = training.runtime, training.cfg.train.batch_size, training.args.image_size
    device_setting = str(runtime.device)

    def run(backend: str) -> int:
        predictions, _ = predict_images(*unlabelled(paths), checkpoint, device=device_setting, batch_size=bs, on_skip=on_skip, progress=False,
                                        backend=backend, log=log)
        return len(predictions)

    model = copy.deepcopy(training.model).eval()
    n_batches = min(plan.bare_predict_batches, bare_images.shape[0] // bs)

    @torch.inference_mode()
    def bare() -> int:
        for i in range(n_batches):
            with runtime.autocast():
                model(bare_images[i * bs : (i + 1) * bs])
        return n_batches * bs

    @torch.inference_mode()
    def bare_decoding() -> int:
        for i in range(n_batches):
            images = runtime.images(torch.stack([decode_square(p, size) for p in paths[i * bs : (i + 1) * bs]]))
            with runtime.autocast():
                model(images)
        return n_batches * bs

    for backend in ("auto", "torch"):  # warm-up; `auto` exports the checkpoint for onnxruntime here, once
        predict_images(*unlabelled(paths[:bs]), checkpoint, device=device_setting, batch_size=bs, on_skip=on_skip, progress=False,
                       backend=backend, log=log)
    bare()
    rates = {name: Rate() for name in ("mdn", "mdn_torch", "bare", "bare_decoding")}
    for w in range(plan.predict_windows):
        rates["bare"].add(*timed(bare, runtime.device))
        rates["bare_decoding"].add(*timed(bare_decoding, runtime.device))
        rates["mdn"].add(*timed(lambda: run("auto"), runtime.device))
        rates["mdn_torch"].add(*timed(lambda: run("torch"), runtime.device))
        log(f"  predict window {w + 1}/{plan.predict_windows}: " + ", ".join(f"{k} {r.windows[-1]:.1f}" for k, r in rates.items())
            + " img/s")
    value = {k: r.value for k, r in rates.items()}
    return {"images": len(paths), **{k: r.to_json() for k, r in rates.items()},
            "ratio": value["mdn"] / value["bare"], "ratio_torch": value["mdn_torch"] / value["bare"],
            "ratio_decoding": value["mdn"] / value["bare_decoding"], "ratio_torch_decoding": value["mdn_torch"] / value["bare_decoding"]}


MINIMAL_PREDICT = textwrap.dedent(
    """\
    # One image, one forward pass: the least a single prediction can cost.
    import sys

    import numpy as np
    import torch
    import torchvision  # noqa: F401  (mdn imports it too)
    from PIL import Image

    from mdn_cli.model import MDNRegressor, ModelArgs

    checkpoint, image_path, device = sys.argv[1], sys.argv[2], torch.device(sys.argv[3])
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = MDNRegressor(ModelArgs.from_dict(ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    size = model.args.image_size
    image = Image.open(image_path).convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].to(device)
    with torch.inference_mode():
        logits, means, stds = model(x)
    print(torch.softmax(logits, -1).tolist(), means.tolist(), stds.tolist())
    """
)


def mdn_command() -> list[str]:
    script = Path(sys.executable).parent / ("mdn.exe" if os.name == "nt" else "mdn")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mdn_cli"]


def run_wall(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds


def measure_single_prediction(checkpoint: Path, image: Path, device: torch.device, plan: Plan, tmp: Path) -> dict:
    """Wall time of `mdn predict one.jpg --checkpoint ckpt.pt` against the minimal script, both
    fresh subprocesses (interpreter start, imports, checkpoint load, decode, one forward pass)."""
    minimal = tmp / "minimal_predict.py"
    minimal.write_text(MINIMAL_PREDICT, encoding="utf-8")
    commands = {
        "mdn": [*mdn_command(), "predict", str(image), "--checkpoint", str(checkpoint), "--device", str(device)],
        "minimal": [sys.executable, str(minimal), str(checkpoint), str(image), str(device)],
    }
    if plan.cli_warmup:  # compiled .pyc files and the OS file cache, as on any second use
        for command in commands.values():
            run_wall(command, tmp)
    runs: dict[str, list[float]] = {"mdn": [], "minimal": []}
    for _ in range(plan.cli_runs):
        for name, command in commands.items():
            runs[name].append(run_wall(command, tmp))
    mdn_s, minimal_s = statistics.median(runs["mdn"]), statistics.median(runs["minimal"])
    log(f"  single image: mdn predict {mdn_s:.2f}s, minimal script {minimal_s:.2f}s")
    return {"command": " ".join(commands["mdn"][1:]), "runs": plan.cli_runs, "mdn_s": mdn_s, "minimal_s": minimal_s,
            "mdn_runs_s": runs["mdn"], "minimal_runs_s": runs["minimal"], "ratio": mdn_s / minimal_s}


def compute_utilisation(forward_flops: float, train: dict, matmul: dict) -> dict:
    train_flops = 3 * forward_flops  # forward + backward (about twice the forward)
    bare_gflops = train_flops * train["bare"]["images_per_s"] / 1e9
    mdn_gflops = train_flops * train["mdn"]["images_per_s"] / 1e9
    return {
        "forward_gflop_per_image": forward_flops / 1e9,
        "train_gflop_per_image": train_flops / 1e9,
        "bare_gflops": bare_gflops,
        "mdn_gflops": mdn_gflops,
        "matmul_gflops": matmul["gflops"],
        "bare_fraction_of_matmul": bare_gflops / matmul["gflops"],
        "mdn_fraction_of_matmul": mdn_gflops / matmul["gflops"],
    }


@contextmanager
def loopback_s3():
    """A loopback S3 server (moto's server mode), reached through the standard AWS variables."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = dict(os.environ)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        boto3.client("s3").create_bucket(Bucket="mdn-bench")
        yield "s3://mdn-bench"
    finally:
        server.stop()
        os.environ.clear()
        os.environ.update(saved)


def measure_shards(setting: Setting, device: str, photos: Path, labels: str, n_train: int, windows: int, tmp: Path) -> dict:
    """Training img/s (`Training.fit`, the same config, a warm memory cache each) from the same
    images as a folder, as local shards, and as shards on a loopback S3 server (streamed through
    the shard cache); windows alternating, after one warm-up epoch each."""
    from mdn_cli.data.folder import FolderSource
    from mdn_cli.data.shards import write_shards

    epochs = windows + 1
    runs = {"folder": build_training(setting, device, photos, labels, epochs, tmp, "shards-folder")}
    data = runs["folder"].cfg.data.model_dump()
    per_shard = max(1, math.ceil(n_train / 4))  # 4 train shards: 2 per loader worker
    with loopback_s3() as bucket:
        for name, where in (("local", str(tmp / f"shards-{setting.name}")), ("s3", f"{bucket}/{setting.name}")):
            write_shards(FolderSource(data, photos), data, where, per_shard, log=lambda m: None)
            runs[name] = build_training(setting, device, photos, labels, epochs, tmp, f"shards-{name}", shards=where,
                                        shard_cache_dir=str(tmp / f"shard-cache-{setting.name}"))
        rates = {name: Rate() for name in runs}
        for name, t in runs.items():
            t.fit(0)  # workers started, caches filled (the S3 shards downloaded into the shard cache)
        for w in range(windows):
            for name, t in runs.items():
                rates[name].add(*timed(lambda t=t: t.fit(w + 1).images, t.runtime.device))
            log(f"  shards window {w + 1}/{windows}: " + ", ".join(f"{k} {r.windows[-1]:.1f}" for k, r in rates.items()) + " img/s")
        for t in runs.values():
            t.close()
    folder = rates["folder"].value
    return {**{k: r.to_json() for k, r in rates.items()}, "images": n_train, "images_per_shard": per_shard,
            "ratio_local": rates["local"].value / folder, "ratio_s3": rates["s3"].value / folder}


def run_setting(setting: Setting, plan: Plan, device: str, photos: Path, paths: list[Path], targets: list[float], val: list[Path],
                matmul: dict, tmp: Path) -> dict:
    log(f"setting {setting.name}: {setting.backbone} at {setting.image_size}px, batch {setting.batch_size}")
    probe = select_runtime(device)
    n_train = len(paths)
    if probe.device.type == "cpu" and plan.cpu_train_batches:
        n_train = min(n_train, plan.cpu_train_batches * setting.batch_size)
    labels = write_labels(setting, photos, paths, targets, n_train, val)
    training = build_training(setting, device, photos, labels, plan.train_windows + 1, tmp)
    bare_images = predecode(paths[:n_train], setting.image_size, training.runtime)
    result: dict = {**asdict(setting), "device": str(training.runtime.device)}

    result["train"] = train = measure_training(training, bare_images, plan.train_windows)
    flops = count_forward_flops(training.model, bare_images[: setting.batch_size])
    result["compute"] = compute_utilisation(flops, train, matmul)
    training.close()  # stops its workers before the next measurements

    result["loader"] = measure_loader(setting, training.cfg, training.runtime, paths, train["bare"]["images_per_s"],
                                      plan.loader_windows, tmp)
    result["shards"] = measure_shards(setting, device, photos, labels, n_train, plan.train_windows, tmp)

    checkpoint = tmp / f"ckpt-{setting.name}.pt"
    write_bench_checkpoint(training, checkpoint)
    all_images = bare_images if n_train == len(paths) else predecode(paths, setting.image_size, training.runtime)
    result["predict_batch"] = measure_batch_prediction(training, checkpoint, paths, all_images, plan)
    result["predict_single"] = measure_single_prediction(checkpoint, paths[0], training.runtime.device, plan, tmp)
    return result


# ---------------------------------------------------------------------------------------------
# Report


def target_checks(result: dict) -> dict[str, float]:
    pb = result["predict_batch"]
    checks = {
        "train_ratio": result["train"]["ratio"],
        "loader_memory_x_bare": result["loader"]["memory"]["x_bare_step"],
        "loader_disk_x_bare": result["loader"]["disk"]["x_bare_step"],
        "shards_local_ratio": result["shards"]["ratio_local"],
        "shards_s3_ratio": result["shards"]["ratio_s3"],
        "predict_decoding_ratio": pb["ratio_decoding"],
        "predict_decoding_ratio_torch": pb["ratio_torch_decoding"],
    }
    if result["name"] == "headline":
        checks |= {"predict_batch_ratio": pb["ratio"], "predict_batch_ratio_torch": pb["ratio_torch"]}
    else:
        checks["predict_torch_ratio_small"] = pb["ratio_torch"]
    return checks | {"predict_single_ratio": result["predict_single"]["ratio"]}


def is_met(key: str, value: float) -> bool:
    op, bound, _ = TARGETS[key]
    return value >= bound if op == ">=" else value <= bound


def markdown_table(results: list[dict], plan: Plan) -> str:
    rows = ["| setting | measurement | mdn | reference | ratio | target | met |", "|---|---|---|---|---|---|---|"]

    def row(r, what, mdn, ref, ratio, key=None):
        target = f"{TARGETS[key][0]} {TARGETS[key][1]:g}" if key else "(info)"
        met = ("yes" if is_met(key, ratio) else "**NO**") if key else ""
        shown = f"{ratio:.3f}" if ratio < 10 else f"{ratio:.0f}"
        rows.append(f"| {r['name']} ({r['image_size']}px, b{r['batch_size']}) | {what} | {mdn} | {ref} | {shown} | {target} | {met} |")

    def spread(rate: dict) -> str:  # median (slowest-fastest window)
        return f"{rate['images_per_s']:.1f} ({min(rate['windows']):.1f}-{max(rate['windows']):.1f})"

    for r in results:
        t, ld, pb, ps, c = r["train"], r["loader"], r["predict_batch"], r["predict_single"], r["compute"]
        bare = f"bare step {t['bare']['images_per_s']:.1f} img/s"
        row(r, f"training img/s ({t['train_images']} img/epoch, {t['workers']} workers)",
            spread(t["mdn"]), f"bare loop {spread(t['bare'])}", t["ratio"], "train_ratio")
        row(r, "loader img/s, cold (decode every JPEG)", f"{ld['cold']['images_per_s']:.0f}", bare, ld["cold"]["x_bare_step"])
        row(r, "loader img/s, warm memory cache", f"{ld['memory']['images_per_s']:.0f}", bare, ld["memory"]["x_bare_step"], "loader_memory_x_bare")
        row(r, "loader img/s, warm disk cache", f"{ld['disk']['images_per_s']:.0f}", bare, ld["disk"]["x_bare_step"], "loader_disk_x_bare")
        sh = r["shards"]
        row(r, f"training img/s from local shards ({sh['images']} images, {sh['images_per_shard']} a shard)", spread(sh["local"]),
            f"folder {spread(sh['folder'])}", sh["ratio_local"], "shards_local_ratio")
        row(r, "training img/s from shards on loopback S3", spread(sh["s3"]), f"folder {spread(sh['folder'])}", sh["ratio_s3"],
            "shards_s3_ratio")
        headline = r["name"] == "headline"
        for backend, key in (("auto", "mdn"), ("`--backend torch`", "mdn_torch")):
            suffix = "" if key == "mdn" else "_torch"
            row(r, f"batch prediction img/s, {backend} ({pb['images']} images)", spread(pb[key]),
                f"bare loop decoding the files {spread(pb['bare_decoding'])}", pb[f"ratio{suffix}_decoding"],
                f"predict_decoding_ratio{suffix}")
            strict = f"predict_batch_ratio{suffix}" if headline else ("predict_torch_ratio_small" if key == "mdn_torch" else None)
            row(r, f"batch prediction img/s, {backend}", spread(pb[key]), f"bare inference, pre-decoded {spread(pb['bare'])}",
                pb[f"ratio{suffix}"], strict)
        row(r, "single-image predict wall s (median)", f"{ps['mdn_s']:.2f}", f"minimal script {ps['minimal_s']:.2f}",
            ps["ratio"], "predict_single_ratio")
        row(r, f"compute GFLOP/s (train {c['train_gflop_per_image']:.2f} GFLOP/img)", f"mdn {c['mdn_gflops']:.1f}, bare {c['bare_gflops']:.1f}",
            f"matmul {c['matmul_gflops']:.1f}", c["bare_fraction_of_matmul"])
    notes = (
        f"\nMedians of {plan.train_windows} training windows (one whole `fit_epoch` call each, after a cold "
        f"warm-up epoch), {plan.loader_windows} loader passes (after one warm-up pass), {plan.predict_windows} "
        f"prediction windows, {plan.cli_runs} CLI runs{' (after one warm-up run)' if plan.cli_warmup else ''}; "
        "mdn and bare windows alternate; img/s columns: median (slowest-fastest window). "
        "Compute ratio = bare GFLOP/s / matmul GFLOP/s (training = 3x forward FLOPs)."
    )
    return "\n".join(rows) + notes


def machine_info(device: str) -> dict:
    runtime = select_runtime(device)
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": str(runtime.device),
        "precision": runtime.precision,
        "loader_workers_auto": resolve_num_workers("auto"),
    }
    if runtime.device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(runtime.device)
    if hasattr(os, "getloadavg"):
        info["load_average_1m_at_start"] = os.getloadavg()[0]
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 64 images, one setting at 64 px, 2 windows")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (as run.device)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    started = time.perf_counter()
    machine = machine_info(args.device)
    log(f"machine: {machine['cpu_count']} CPUs, torch {machine['torch']}, device {machine['device']}")

    runtime = select_runtime(args.device)
    matmul_fp32 = measure_matmul(runtime.device, torch.float32, plan.matmul_size, plan.matmul_repeats)
    # the ceiling is a matmul in the precision training runs in (bf16/fp16 autocast on CUDA, bf16 steps on some CPUs)
    matmul = matmul_fp32
    step_dtype = torch.bfloat16 if runtime.cpu_bf16_steps else runtime.amp_dtype
    if step_dtype is not None:
        matmul = measure_matmul(runtime.device, step_dtype, plan.matmul_size, plan.matmul_repeats)
    log(f"matmul {plan.matmul_size} {matmul['dtype']}: {matmul['gflops']:.1f} GFLOP/s")

    results = []
    with tempfile.TemporaryDirectory(prefix="mdn-bench-") as tmp_name:
        tmp = Path(tmp_name)
        paths, targets = make_photos(tmp / "photos", plan.n_images + VAL_IMAGES)
        val, paths, targets = paths[plan.n_images :], paths[: plan.n_images], targets[: plan.n_images]
        mean_kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        log(f"{len(paths)} JPEG photos {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}, {mean_kb:.0f} KB each on average")
        for setting in plan.settings:
            results.append(run_setting(setting, plan, args.device, tmp / "photos", paths, targets, val, matmul, tmp))

    if hasattr(os, "getloadavg"):
        machine["load_average_1m_at_end"] = os.getloadavg()[0]
    checks = [
        {"setting": r["name"], "measurement": key, "value": value, "op": TARGETS[key][0], "target": TARGETS[key][1],
         "met": is_met(key, value), "what": TARGETS[key][2]}
        for r in results
        for key, value in target_checks(r).items()
    ]
    report = {
        "quick": args.quick,
        "seconds": time.perf_counter() - started,
        "machine": machine,
        "plan": asdict(plan),
        "photos": {"n": plan.n_images, "width": PHOTO_SIZE[0], "height": PHOTO_SIZE[1], "mean_kb": mean_kb},
        "matmul": matmul,
        "matmul_fp32": matmul_fp32,
        "settings": results,
        "targets": checks,
    }
    print(
        f"## mdn benchmark{' (--quick)' if args.quick else ''}\n\n"
        f"machine: {machine['cpu']}, {machine['cpu_count']} CPUs ({machine['cpus_available']} available, "
        f"{machine['torch_threads']} torch threads), torch {machine['torch']}, torchvision {machine['torchvision']}, "
        f"device {machine.get('device_name', machine['device'])} ({machine['precision']}), "
        f"load average {machine.get('load_average_1m_at_start', float('nan')):.2f} at start\n"
        f"data: {plan.n_images} synthetic JPEG photos {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} ({mean_kb:.0f} KB on average); "
        f"matmul ceiling: {matmul['n']}x{matmul['n']} {matmul['dtype']}, median of {matmul['repeats']}: "
        f"{matmul['gflops']:.1f} GFLOP/s\n"
    )
    load = [machine.get(f"load_average_1m_at_{when}") for when in ("start", "end")]
    if any(x is not None and x > 0.5 * (machine["cpus_available"] or 1) for x in load):
        print(f"**warning: the machine was busy (1-minute load average {load[0]:.1f} at start, {load[1]:.1f} at end, "
              f"{machine['cpus_available']} CPUs): other processes share the cores, so the ratios are unreliable.**\n")
    print(markdown_table(results, plan))
    met = sum(c["met"] for c in checks)
    print(f"\ntargets met: {met}/{len(checks)}; total time {report['seconds']:.0f}s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
