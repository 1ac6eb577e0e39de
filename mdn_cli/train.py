"""`mdn train`: the training loop, top to bottom.

    labels -> splits -> loaders -> model + MDN head -> AdamW, warm-up + cosine
    -> per epoch: train (head alone on cached features while the backbone is frozen),
       validate (NLL in target units), last.pt, best.pt, metrics.csv
    -> early stopping -> calibration of best.pt on val -> test metrics of best.pt

Under torchrun every process runs this same loop on its share of each batch; rank 0 alone logs,
shows progress and writes files (see distributed.py).
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from tqdm import tqdm

from . import mixture as mx
from .backbones import get_backbone
from .cache import DecodedCache, cache_directory
from .calibration import conformal_probs, fit_sigma_scale, nll_sums
from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config, to_yaml
from .dataset import (
    ImageRegressionDataset,
    SeededSampler,
    make_loader,
    resolve_num_workers,
)
from .distributed import Dist, init_distributed, shutdown
from .errors import ConfigError, DataError, RunError, TrainingError
from .features import compute_features, feature_loader
from .inference import run_model
from .labels import Example, read_labels
from .mixture import mixture_nll
from .model import MDNRegressor, ModelArgs
from .runtime import Runtime, select_runtime
from .splits import assign_splits, check_split_sizes, write_splits
from .targets import TargetScaler

RUN_FILES = ("config.yaml", "splits.csv", "metrics.csv", "last.pt", "best.pt", "eval", "skipped.txt")
HISTORY_COLUMNS = ("epoch", "train_nll", "val_nll", "val_nll_calibrated", "val_mae", "lr", "images_per_s", "seconds")
# A run gives up when this many consecutive steps had a non-finite loss or gradient.
MAX_BAD_STEPS = 20
# Below this many images per process, one batch's BatchNorm statistics are too noisy to train with.
MIN_BATCHNORM_BATCH = 16


def labels_path(cfg: Config) -> Path:
    labels = Path(cfg.data.labels)
    return labels if labels.is_absolute() else Path(cfg.data.root) / labels


def load_examples(cfg: Config) -> tuple[list[Example], list[str]]:
    """The validated labels file and the split of each row."""
    examples = read_labels(
        labels_path(cfg),
        Path(cfg.data.root),
        cfg.data.image_column,
        cfg.data.target_column,
        cfg.data.split_column,
        cfg.data.target_transform,
    ).examples
    splits = assign_splits(examples, cfg.data.val_fraction, cfg.data.test_fraction, cfg.run.seed)
    return examples, splits


def model_args(cfg: Config) -> ModelArgs:
    """The network's arguments for a config (stored in every checkpoint)."""
    spec = get_backbone(cfg.model.backbone)
    return ModelArgs(
        backbone=cfg.model.backbone,
        components=cfg.model.components,
        image_size=cfg.data.image_size or spec.image_size,
        mean=spec.mean,
        std=spec.std,
        dropout=cfg.model.dropout,
        sigma_min=cfg.model.sigma_min,
    )


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False, log: Callable[[str], None] = tqdm.write) -> Path:
    """Train a model as configured; returns the run folder."""
    cfg = cfg.model_copy(deep=True)
    cfg.data.root = str(Path(cfg.data.root).resolve())  # the checkpoint must find its data from anywhere
    runtime = select_runtime(cfg.run.device, cfg.train.precision)
    ctx = init_distributed(runtime.device.type)
    if ctx.enabled and runtime.device.type == "cuda":
        runtime = replace(runtime, device=torch.device("cuda", ctx.local_rank))
    if not ctx.is_main:
        log = _quiet
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    lock = None
    try:
        if ctx.is_main:
            lock = _lock_run_dir(run_dir)
            _prepare_run_dir(run_dir, cfg, resume, overwrite)
        ctx.barrier()
        return _train(cfg, run_dir, runtime, ctx, resume, log)
    finally:
        if lock is not None:
            lock.release()
        shutdown(ctx)


def _train(cfg: Config, run_dir: Path, runtime: Runtime, ctx: Dist, resume: bool, log: Callable[[str], None]) -> Path:
    if cfg.train.batch_size % ctx.world_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be a multiple of the {ctx.world_size} processes")
    batch_size = cfg.train.batch_size // ctx.world_size  # per process; the global batch is train.batch_size
    torch.manual_seed(cfg.run.seed)  # initialisation; the split and batches have their own seeded generators

    # --- data ---
    examples, splits = load_examples(cfg)
    check_split_sizes(splits, cfg.train.batch_size, labels_path(cfg))
    if ctx.is_main:
        write_splits(run_dir / "splits.csv", examples, splits)
        (run_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    by_split = {s: [e for e, sp in zip(examples, splits) if sp == s] for s in ("train", "val", "test")}
    train_targets = torch.tensor([e.target for e in by_split["train"]], dtype=torch.float64)
    scaler = TargetScaler.fit(train_targets, cfg.data.target_transform)

    spec = get_backbone(cfg.model.backbone)
    image_size = cfg.data.image_size or spec.image_size
    num_workers = resolve_num_workers(cfg.data.num_workers)
    caches: dict[str, DecodedCache] = {}

    def dataset(split: str, augment: bool = False) -> ImageRegressionDataset:
        rows = by_split[split]
        if cfg.data.cache != "none" and split not in caches:
            caches[split] = DecodedCache(cfg.data.cache, len(rows), image_size, cache_directory(cfg.data.cache_dir))
        return ImageRegressionDataset([e.path for e in rows], [e.target for e in rows], image_size, augment, caches.get(split))

    sampler = SeededSampler(len(by_split["train"]), True, cfg.run.seed, ctx.rank, ctx.world_size)
    train_loader = make_loader(
        dataset("train", cfg.data.augment), batch_size, num_workers, sampler, drop_last=True, pin_memory=runtime.pin_memory
    )
    val_shard = list(range(ctx.rank, len(by_split["val"]), ctx.world_size))
    val_loader = make_loader(dataset("val"), batch_size, num_workers, val_shard, pin_memory=runtime.pin_memory)

    # --- model and optimiser ---
    args = model_args(cfg)
    model = MDNRegressor(args, pretrained=False if resume else cfg.model.pretrained)
    model.head.init_spread(scaler.encode(train_targets))
    runtime.prepare(model)
    ctx.broadcast_state(model)
    optimizer = _make_optimizer(model, cfg)
    steps_per_epoch = len(train_loader)
    scheduler = _warmup_cosine(optimizer, round(cfg.train.warmup_epochs * steps_per_epoch), cfg.train.epochs * steps_per_epoch)
    grad_scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.needs_grad_scaler)

    start_epoch, history, best_val = 0, [], math.inf
    if resume:
        state = load_checkpoint(run_dir / "last.pt")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        grad_scaler.load_state_dict(state["grad_scaler"])
        start_epoch, history, best_val = state["epoch"], list(state["history"]), state["best_val_nll"]
        log(f"resuming {run_dir} after epoch {start_epoch}/{cfg.train.epochs} (best {best_val:.4f})")
    log(
        f"training {cfg.model.backbone} + {cfg.model.components}-component MDN on {runtime.device} "
        f"({'fp32' if runtime.amp_dtype is None else str(runtime.amp_dtype).removeprefix('torch.')}"
        f"{f', {ctx.world_size} processes' if ctx.enabled else ''}): "
        f"{len(by_split['train'])} train / {len(by_split['val'])} val / {len(by_split['test'])} test images "
        f"at {image_size}px, {num_workers} loader workers"
    )

    def checkpoint(epoch: int) -> dict:
        return {
            "config": cfg.model_dump(mode="json"),
            "model_args": args.to_dict(),
            "target_scaler": scaler.state_dict(),
            "calibration": {"sigma_scale": 1.0},
            "model": model.state_dict(),
            "epoch": epoch,
        }

    skipped: set[str] = set()

    def on_skip(message: str) -> None:
        if cfg.data.on_bad_image == "error":
            raise DataError(f"{message}; remove it from the labels file or set data.on_bad_image: skip")
        skipped.add(message)

    def frozen(epoch: int) -> bool:
        return cfg.model.freeze_backbone or (cfg.train.unfreeze_after is not None and epoch < cfg.train.unfreeze_after)

    feature_loaders: dict = {}  # over backbone features, built the first time the backbone is frozen
    compiled = _compiler(cfg.train.compile, log)

    # The best epoch is the one with the best val NLL after the std scale that calibration will fit:
    # a later epoch with better means but overconfident stds beats an earlier, blunter one.
    selection = "val_nll" if cfg.train.calibration == "none" else "val_nll_calibrated"
    bad_epochs = _epochs_since_best(history, selection)
    for epoch in range(start_epoch, cfg.train.epochs):
        if cfg.train.early_stopping_patience and bad_epochs >= cfg.train.early_stopping_patience:
            log(f"early stopping: the {selection.replace('_', ' ')} has not improved for {bad_epochs} epochs")
            break
        torch.manual_seed(cfg.run.seed * 1_000_003 + epoch)  # dropout: identical on resume
        started = time.perf_counter()
        if frozen(epoch):
            if not feature_loaders:
                log("computing backbone features once (the backbone is frozen)")
                train_images = make_loader(dataset("train"), batch_size, num_workers)
                features = compute_features(model, train_images, runtime, on_skip, ctx.is_main)
                feature_loaders["sampler"] = SeededSampler(len(features), True, cfg.run.seed, ctx.rank, ctx.world_size)
                feature_loaders["train"] = feature_loader(features, batch_size, feature_loaders["sampler"], drop_last=True)
                feature_loaders["val"] = feature_loader(compute_features(model, val_loader, runtime, on_skip, ctx.is_main), batch_size)
            feature_loaders["sampler"].set_epoch(epoch)
            forward, loaders = model.head, (feature_loaders["train"], feature_loaders["val"])
        else:
            sampler.set_epoch(epoch)
            forward, loaders = compiled(model), (train_loader, val_loader)
        _set_train_mode(model, frozen(epoch), batch_size)
        train_nll, seen, bad_steps = _train_one_epoch(
            forward, loaders[0], optimizer, scheduler, grad_scaler, scaler, runtime, ctx, cfg, epoch, on_skip
        )
        seconds = time.perf_counter() - started
        ctx.broadcast_state(model)  # BatchNorm statistics: rank 0's, as DistributedDataParallel does
        val_out = run_model(forward, loaders[1], runtime, on_skip)
        val_mixture, val_y = scaler.to_mixture(*val_out.heads), val_out.targets
        nll_sum, abs_err_sum, n_val, *scaled_sums = ctx.sum(
            [float(-mx.log_prob(val_mixture, val_y).sum()), float((mx.mean(val_mixture) - val_y).abs().sum()), len(val_y),
             *nll_sums(val_mixture, val_y)]
        )
        val = {"nll": nll_sum / n_val, "mae": abs_err_sum / n_val, "nll_calibrated": min(scaled_sums) / n_val}
        if not math.isfinite(val["nll"]):
            raise TrainingError(
                f"epoch {epoch + 1}: the validation NLL is {val['nll']} (diverged); nothing of this epoch was saved, "
                f"{run_dir / 'last.pt'} and best.pt are intact. Lower train.lr or check the labels"
            )
        row = {
            "epoch": epoch + 1,
            "train_nll": train_nll,
            "val_nll": val["nll"],
            "val_nll_calibrated": val["nll_calibrated"],
            "val_mae": val["mae"],
            "lr": scheduler.get_last_lr()[-1],  # the head's (train.lr); the backbone runs at lr * backbone_lr_scale
            "images_per_s": seen / seconds,
            "seconds": seconds,
        }
        history.append(row)
        improved = row[selection] < best_val
        if improved:
            best_val = row[selection]
        bad_epochs = 0 if improved else bad_epochs + 1
        if ctx.is_main:
            state = checkpoint(epoch + 1)
            if improved:
                save_checkpoint(state, run_dir / "best.pt")
            training_state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "grad_scaler": grad_scaler.state_dict(),
                "history": history,
                "best_val_nll": best_val,
            }
            save_checkpoint({**state, **training_state}, run_dir / "last.pt")
            _write_history(run_dir / "metrics.csv", history)
        log(
            f"epoch {epoch + 1:>3}/{cfg.train.epochs}  train NLL {train_nll:8.4f}  val NLL {val['nll']:8.4f} "
            f"(calibrated {val['nll_calibrated']:.4f})  "
            f"val MAE {val['mae']:.4g}  lr {row['lr']:.2e}  {row['images_per_s']:.0f} img/s"
            f"{'  (head only)' if frozen(epoch) else ''}{f'  ({bad_steps} NaN steps skipped)' if bad_steps else ''}"
            f"{'  *best' if improved else ''}"
        )
    if not ctx.is_main:
        return run_dir
    if skipped:
        (run_dir / "skipped.txt").write_text("\n".join(sorted(skipped)) + "\n", encoding="utf-8")
        log(f"skipped {len(skipped)} unreadable images (listed in {run_dir / 'skipped.txt'})")

    best_path = run_dir / "best.pt"
    if cfg.train.calibration != "none":
        best = load_checkpoint(best_path)
        model.load_state_dict(best["model"])
        val_out = run_model(model, make_loader(dataset("val"), batch_size, num_workers), runtime, on_skip)
        val_mixture = scaler.to_mixture(*val_out.heads)
        fit = fit_sigma_scale(val_mixture, val_out.targets)
        calibration = {"sigma_scale": fit.scale}
        log(
            f"calibration on {len(val_out.targets)} val images: component stds x {fit.scale:.3f}, "
            f"val NLL {fit.nll_before:.4f} -> {fit.nll_after:.4f}"
        )
        if cfg.train.calibration == "conformal":
            probs = conformal_probs(val_mixture.scaled(fit.scale), val_out.targets)
            calibration["interval_probs"] = list(probs)
            log(f"conformal intervals: 68% -> quantiles {probs[0]:.4f}..{probs[1]:.4f}, 95% -> {probs[2]:.4f}..{probs[3]:.4f}")
        save_checkpoint({**best, "calibration": calibration}, best_path)
    if by_split["test"]:
        from .evaluate import (  # the same code as `mdn evaluate`
            evaluate,
            format_metrics,
        )

        evaluation, out, described = evaluate(
            best_path, device=str(runtime.device), num_workers=num_workers, on_skip=lambda message: log(f"skipped: {message}")
        )
        log(f"test metrics of the best checkpoint ({described}; written to {out}):\n{format_metrics(evaluation.metrics)}")
    log(f"best checkpoint ({selection.replace('_', ' ')} {best_val:.4f}): {best_path}")
    return run_dir


def _train_one_epoch(
    model, loader, optimizer, scheduler, grad_scaler, scaler, runtime: Runtime, ctx: Dist, cfg: Config, epoch, on_skip
):
    """One pass over the train split; `model` maps a batch's inputs (images, or cached features)
    to head outputs. Returns (mean train NLL in target units over all processes, images seen by
    all processes, steps skipped because the loss or the gradient was NaN/infinite)."""
    total_nll, seen, bad_in_a_row, bad_steps = 0.0, 0, 0, 0
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False, dynamic_ncols=True, unit="batch", disable=not ctx.is_main)
    for batch in bar:
        for message in batch.skipped:
            on_skip(message)
        n = batch.images.shape[0]
        if not ctx.all_true(n >= 2):  # BatchNorm needs 2+ images; a batch can lose images to skips
            continue
        images = runtime.images(batch.images)
        y = batch.targets.to(runtime.device, non_blocking=True)
        with runtime.autocast():
            logits, means, stds = model(images)
        loss = mixture_nll(logits.float(), means.float(), stds.float(), scaler.encode(y).float()).mean()
        optimizer.zero_grad(set_to_none=True)
        finite = ctx.all_true(bool(torch.isfinite(loss)))
        if finite:
            grad_scaler.scale(loss).backward()
            ctx.average_gradients(params)
            grad_scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip or math.inf)
            # fp16's grad scaler skips steps with inf gradients itself (and lowers its scale)
            finite = runtime.needs_grad_scaler or bool(torch.isfinite(norm))
        if not finite:
            bad_steps += 1
            bad_in_a_row += 1
            if bad_in_a_row >= MAX_BAD_STEPS:
                raise TrainingError(
                    f"the loss or its gradient was NaN or infinite in {bad_in_a_row} consecutive steps; lower train.lr, "
                    "check the labels for extreme values, or use train.precision: fp32. The checkpoints written so far are intact"
                )
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            continue
        bad_in_a_row = 0
        grad_scaler.step(optimizer)
        grad_scaler.update()
        scheduler.step()
        # Reported in target units: standardised NLL + log(scale) (+ mean log y, the log transform's Jacobian).
        nll = float(loss.detach()) + math.log(scaler.scale)
        if scaler.transform == "log":
            nll += float(torch.log(batch.targets).mean())
        total_nll += nll * n
        seen += n
        bar.set_postfix(nll=f"{total_nll / seen:.4f}")
    total_nll, seen = ctx.sum([total_nll, seen])
    return (total_nll / seen if seen else math.nan), int(seen), bad_steps


def _compiler(enabled: bool, log: Callable[[str], None]) -> Callable[[torch.nn.Module], torch.nn.Module]:
    """`train.compile`: torch.compile the model once; where it cannot compile (no compiler,
    unsupported platform), warn and train eagerly rather than fail."""
    done: dict[int, torch.nn.Module] = {}

    def compiled(model: torch.nn.Module) -> torch.nn.Module:
        if not enabled:
            return model
        if id(model) not in done:
            import torch._dynamo

            torch._dynamo.config.suppress_errors = True  # a graph that fails to compile runs eagerly
            try:
                done[id(model)] = torch.compile(model)
            except Exception as e:  # noqa: BLE001 - any failure means: run eagerly
                log(f"warning: torch.compile is not available here ({type(e).__name__}: {str(e)[:120]}); training without it")
                done[id(model)] = model
        return done[id(model)]

    return compiled


def _quiet(message: str) -> None:
    """The log of every process but rank 0."""


def _lock_run_dir(run_dir: Path) -> FileLock:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(run_dir / ".lock")
        lock.acquire(timeout=0)
    except Timeout:
        raise RunError(f"{run_dir}: another mdn process is training into this folder; wait for it or pick another run.name") from None
    except OSError as e:
        raise RunError(f"{run_dir}: cannot create the run folder ({e.strerror}); check run.out_dir") from None
    return lock


def _make_optimizer(model: MDNRegressor, cfg: Config) -> torch.optim.Optimizer:
    """AdamW over every parameter (a frozen one simply gets no gradient), with no weight decay on
    biases and norm scales, and the backbone at lr * backbone_lr_scale."""
    groups = []
    for part, lr in ((model.backbone, cfg.train.lr * cfg.train.backbone_lr_scale), (model.head, cfg.train.lr)):
        params = list(part.parameters())
        groups.append({"params": [p for p in params if p.ndim > 1], "lr": lr, "weight_decay": cfg.train.weight_decay})
        groups.append({"params": [p for p in params if p.ndim <= 1], "lr": lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=cfg.train.lr)


def _set_train_mode(model: MDNRegressor, frozen: bool, batch_size: int) -> None:
    """Head in train mode; a frozen backbone entirely in eval mode (its BatchNorm statistics stay
    those it was pretrained with); with small batches, BatchNorm layers use their running
    statistics while their scales and shifts still train."""
    model.train()
    model.backbone.requires_grad_(not frozen)
    if frozen:
        model.backbone.eval()
    elif batch_size < MIN_BATCHNORM_BATCH:
        for module in model.backbone.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def _warmup_cosine(optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _epochs_since_best(history: list[dict], key: str) -> int:
    best = math.inf
    since = 0
    for row in history:
        if row[key] < best:
            best, since = row[key], 0
        else:
            since += 1
    return since


def _write_history(path: Path, history: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS)
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)


def _prepare_run_dir(run_dir: Path, cfg: Config, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise RunError("--resume and --overwrite contradict each other; pick one")
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    if resume:
        if not (run_dir / "last.pt").exists():
            raise RunError(f"{run_dir}: nothing to resume (no last.pt); start without --resume")
        previous = load_checkpoint(run_dir / "last.pt")["config"]
        changed = _changed_keys(previous, cfg.model_dump(mode="json"))
        if changed:
            raise RunError(
                f"{run_dir}: cannot resume with a different config ({', '.join(changed)} changed); "
                "only train.epochs, train.early_stopping_patience, data.num_workers and run.device may change"
            )
    elif existing:
        if not overwrite:
            raise RunError(
                f"{run_dir} already holds a run ({', '.join(existing)}); continue it with --resume, "
                "replace it with --overwrite, or set run.name"
            )
        for name in existing:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()


RESUMABLE_CHANGES = {"train.epochs", "train.early_stopping_patience", "data.num_workers", "run.device"}


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        dotted = prefix + key
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, dotted + ".")
        elif a != b and dotted not in RESUMABLE_CHANGES:
            keys.append(dotted)
    return keys

