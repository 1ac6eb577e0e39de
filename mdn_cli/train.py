"""`mdn train`: the training loop, top to bottom.

    labels -> splits -> loaders -> model + MDN head -> AdamW, warm-up + cosine
    -> per epoch: train, validate (NLL in target units), last.pt, best.pt, metrics.csv
    -> early stopping -> test metrics of best.pt
"""

from __future__ import annotations

import csv
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from filelock import FileLock, Timeout
from tqdm import tqdm

from .backbones import get_backbone
from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config, to_yaml
from .data import (
    Example,
    ImageRegressionDataset,
    SeededSampler,
    assign_splits,
    check_split_sizes,
    make_loader,
    read_labels,
    resolve_num_workers,
    write_splits,
)
from .errors import DataError, RunError, TrainingError
from .calibration import fit_sigma_scale
from .features import compute_features, feature_loader
from .inference import run_model
from . import mixture as mx
from .mixture import mixture_nll
from .model import MDNRegressor, ModelArgs
from .runtime import Runtime, select_runtime
from .targets import TargetScaler

RUN_FILES = ("config.yaml", "splits.csv", "metrics.csv", "last.pt", "best.pt", "eval", "skipped.txt")
HISTORY_COLUMNS = ("epoch", "train_nll", "val_nll", "val_mae", "lr", "images_per_s", "seconds")
# A run gives up when this many consecutive steps had a non-finite loss.
MAX_BAD_STEPS = 20


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
    )
    splits = assign_splits(examples, cfg.data.val_fraction, cfg.data.test_fraction, cfg.run.seed)
    return examples, splits


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False, log: Callable[[str], None] = tqdm.write) -> Path:
    """Train a model as configured; returns the run folder."""
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(run_dir / ".lock")
        lock.acquire(timeout=0)
    except Timeout:
        raise RunError(f"{run_dir}: another mdn process is training into this folder; wait for it or pick another run.name") from None
    except OSError as e:
        raise RunError(f"{run_dir}: cannot create the run folder ({e.strerror}); check run.out_dir") from None
    try:
        return _train(cfg, run_dir, resume, overwrite, log)
    finally:
        lock.release()


def _train(cfg: Config, run_dir: Path, resume: bool, overwrite: bool, log: Callable[[str], None]) -> Path:
    cfg.data.root = str(Path(cfg.data.root).resolve())  # the checkpoint must find its data from anywhere
    _prepare_run_dir(run_dir, cfg, resume, overwrite)
    runtime = select_runtime(cfg.run.device, cfg.train.precision)
    _seed_everything(cfg.run.seed)

    # --- data ---
    examples, splits = load_examples(cfg)
    check_split_sizes(splits, cfg.train.batch_size, labels_path(cfg))
    write_splits(run_dir / "splits.csv", examples, splits)
    (run_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    by_split = {s: [e for e, sp in zip(examples, splits) if sp == s] for s in ("train", "val", "test")}
    train_targets = torch.tensor([e.target for e in by_split["train"]], dtype=torch.float64)
    scaler = TargetScaler.fit(train_targets, cfg.data.target_transform)

    spec = get_backbone(cfg.model.backbone)
    image_size = cfg.data.image_size or spec.image_size
    num_workers = resolve_num_workers(cfg.data.num_workers)

    def dataset(split: str, augment: bool) -> ImageRegressionDataset:
        rows = by_split[split]
        return ImageRegressionDataset([e.path for e in rows], [e.target for e in rows], image_size, augment)

    sampler = SeededSampler(len(by_split["train"]), shuffle=True, seed=cfg.run.seed)
    train_loader = make_loader(
        dataset("train", cfg.data.augment), cfg.train.batch_size, num_workers, sampler, drop_last=True, pin_memory=runtime.pin_memory
    )
    val_loader = make_loader(dataset("val", False), cfg.train.batch_size, num_workers, pin_memory=runtime.pin_memory)

    # --- model and optimiser ---
    args = ModelArgs(
        backbone=cfg.model.backbone,
        components=cfg.model.components,
        image_size=image_size,
        mean=spec.mean,
        std=spec.std,
        dropout=cfg.model.dropout,
        sigma_min=cfg.model.sigma_min,
    )
    model = MDNRegressor(args, pretrained=False if resume else cfg.model.pretrained)
    model.head.init_spread(scaler.encode(train_targets))
    model.to(runtime.device)
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
        log(f"resuming {run_dir} after epoch {start_epoch}/{cfg.train.epochs} (best val NLL {best_val:.4f})")
    log(
        f"training {cfg.model.backbone} + {cfg.model.components}-component MDN on {runtime.device} "
        f"({'fp32' if runtime.amp_dtype is None else str(runtime.amp_dtype).removeprefix('torch.')}): "
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

    cache: dict[str, DataLoader] = {}  # feature loaders, built the first time the backbone is frozen

    bad_epochs = _epochs_since_best(history)
    for epoch in range(start_epoch, cfg.train.epochs):
        if cfg.train.early_stopping_patience and bad_epochs >= cfg.train.early_stopping_patience:
            log(f"early stopping: val NLL has not improved for {bad_epochs} epochs")
            break
        torch.manual_seed(cfg.run.seed * 1_000_003 + epoch)  # dropout: identical on resume
        started = time.perf_counter()
        if frozen(epoch):
            if not cache:
                log("computing backbone features once (the backbone is frozen)")
                train_features = compute_features(model, make_loader(dataset("train", False), cfg.train.batch_size, num_workers), runtime, on_skip)
                cache["sampler"] = SeededSampler(len(train_features), shuffle=True, seed=cfg.run.seed)
                cache["train"] = feature_loader(train_features, cfg.train.batch_size, cache["sampler"], drop_last=True)
                cache["val"] = feature_loader(compute_features(model, val_loader, runtime, on_skip), cfg.train.batch_size)
            cache["sampler"].set_epoch(epoch)
            forward, loaders = model.head, (cache["train"], cache["val"])
        else:
            sampler.set_epoch(epoch)
            forward, loaders = model, (train_loader, val_loader)
        _set_train_mode(model, frozen(epoch), cfg.train.batch_size)
        train_nll, seen = _train_one_epoch(
            forward, loaders[0], optimizer, scheduler, grad_scaler, scaler, runtime, cfg, epoch, on_skip
        )
        seconds = time.perf_counter() - started
        val_out = run_model(forward, loaders[1], runtime, on_skip)
        val_mixture, val_y = scaler.to_mixture(*val_out.heads), val_out.targets
        val = {"nll": float(-mx.log_prob(val_mixture, val_y).mean()), "mae": float((mx.mean(val_mixture) - val_y).abs().mean())}
        row = {
            "epoch": epoch + 1,
            "train_nll": train_nll,
            "val_nll": val["nll"],
            "val_mae": val["mae"],
            "lr": scheduler.get_last_lr()[0],
            "images_per_s": seen / seconds,
            "seconds": seconds,
        }
        history.append(row)
        improved = val["nll"] < best_val
        if improved:
            best_val = val["nll"]
        bad_epochs = 0 if improved else bad_epochs + 1
        state = checkpoint(epoch + 1)
        if improved:
            save_checkpoint(state, run_dir / "best.pt")
        save_checkpoint(
            {
                **state,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "grad_scaler": grad_scaler.state_dict(),
                "history": history,
                "best_val_nll": best_val,
            },
            run_dir / "last.pt",
        )
        _write_history(run_dir / "metrics.csv", history)
        log(
            f"epoch {epoch + 1:>3}/{cfg.train.epochs}  train NLL {train_nll:8.4f}  val NLL {val['nll']:8.4f}  "
            f"val MAE {val['mae']:.4g}  lr {row['lr']:.2e}  {row['images_per_s']:.0f} img/s"
            f"{'  (head only)' if frozen(epoch) else ''}{'  *best' if improved else ''}"
        )
    if skipped:
        (run_dir / "skipped.txt").write_text("\n".join(sorted(skipped)) + "\n", encoding="utf-8")
        log(f"skipped {len(skipped)} unreadable images (listed in {run_dir / 'skipped.txt'})")

    best_path = run_dir / "best.pt"
    if cfg.train.calibration == "scale":
        best = load_checkpoint(best_path)
        model.load_state_dict(best["model"])
        val_out = run_model(model, val_loader, runtime, on_skip)
        fit = fit_sigma_scale(scaler.to_mixture(*val_out.heads), val_out.targets)
        save_checkpoint({**best, "calibration": {"sigma_scale": fit.scale}}, best_path)
        log(
            f"calibration on {len(val_out.targets)} val images: component stds x {fit.scale:.3f}, "
            f"val NLL {fit.nll_before:.4f} -> {fit.nll_after:.4f}"
        )
    if by_split["test"]:
        from .evaluate import evaluate, format_metrics  # the same code as `mdn evaluate`

        evaluation, out, described = evaluate(
            best_path, device=cfg.run.device, num_workers=num_workers, on_skip=lambda message: log(f"skipped: {message}")
        )
        log(f"test metrics of the best checkpoint ({described}; written to {out}):\n{format_metrics(evaluation.metrics)}")
    log(f"best checkpoint (val NLL {best_val:.4f}): {best_path}")
    return run_dir


def _train_one_epoch(model, loader, optimizer, scheduler, grad_scaler, scaler, runtime: Runtime, cfg: Config, epoch, on_skip):
    """One pass over the train split; returns (mean train NLL in target units, images seen).
    `model` maps a batch's inputs (images, or cached features) to head outputs."""
    total_nll, seen, bad_steps = 0.0, 0, 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False, dynamic_ncols=True, unit="batch")
    for batch in bar:
        for message in batch.skipped:
            on_skip(message)
        n = batch.images.shape[0]
        if n < 2:  # BatchNorm needs 2+ images; only happens when a batch lost images to skips
            continue
        images = batch.images.to(runtime.device, non_blocking=True)
        y = batch.targets.to(runtime.device, non_blocking=True)
        with runtime.autocast():
            logits, means, stds = model(images)
        loss = mixture_nll(logits.float(), means.float(), stds.float(), scaler.encode(y).float()).mean()
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            bad_steps += 1
            if bad_steps >= MAX_BAD_STEPS:
                raise TrainingError(
                    f"the loss was NaN or infinite in {bad_steps} consecutive steps; lower train.lr, "
                    "check the labels for extreme values, or use train.precision: fp32. Checkpoints so far are intact"
                )
            scheduler.step()
            continue
        bad_steps = 0
        grad_scaler.scale(loss).backward()
        if cfg.train.grad_clip:
            grad_scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
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
    return (total_nll / seen if seen else math.nan), seen


def _make_optimizer(model: MDNRegressor, cfg: Config) -> torch.optim.Optimizer:
    """AdamW over every parameter (a frozen one simply gets no gradient), with no weight decay on
    biases and norm scales, and the backbone at lr * backbone_lr_scale."""
    groups = []
    for part, lr in ((model.backbone, cfg.train.lr * cfg.train.backbone_lr_scale), (model.head, cfg.train.lr)):
        params = list(part.parameters())
        groups.append({"params": [p for p in params if p.ndim > 1], "lr": lr, "weight_decay": cfg.train.weight_decay})
        groups.append({"params": [p for p in params if p.ndim <= 1], "lr": lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=cfg.train.lr)


# Below this batch size, BatchNorm statistics of one batch are too noisy to update running stats.
MIN_BATCHNORM_BATCH = 16


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


def _epochs_since_best(history: list[dict]) -> int:
    best = math.inf
    since = 0
    for row in history:
        if row["val_nll"] < best:
            best, since = row["val_nll"], 0
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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
