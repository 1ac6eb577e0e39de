"""`mdn train`: the training story.

    setup      labels -> splits (splits.csv) -> loaders -> model, optimiser, schedule (or last.pt)
    per epoch  fit (the head alone on cached features while the backbone is frozen)
               -> validate -> checkpoint (last.pt every epoch, best.pt when val improves)
    after      calibrate best.pt (std scale on val; interval levels on the calibration split)
               -> evaluate best.pt on the test split

Under torchrun every process runs this same story on its share of each batch; rank 0 alone logs,
shows progress and writes files (see distributed.py).
"""

from __future__ import annotations

import copy
import csv
import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from . import interrupts, phases
from .backbones import check_image_size, get_backbone
from .data.cache import DecodedCache, cache_directory
from .calibrate import calibrate_checkpoint
from .calibration import METHODS
from .check_data import cross_split_copies
from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config, target_label, to_yaml
from .curves import TENSORBOARD_FOLDER, tensorboard_log, write_curves
from .data import Source, open_source
from .data.dataset import Augment, SeededSampler, make_loader, resolve_num_workers
from .distributed import Dist, init_distributed, shutdown, sync_batchnorm
from .engine import (
    Fitter,
    Segment,
    batchnorm_trains,
    compile_module,
    fit_epoch,
    make_optimizer,
    make_scheduler,
    segments_from_state,
    segments_to_state,
    set_train_mode,
    validate_epoch,
)
from .errors import ConfigError, DataError, TrainingError
from .eta import RunEstimate, duration
from .features import cached_features
from .files import atomic_writer, write_text_atomic
from .data.labels import Example
from .model import MDNRegressor, ModelArgs
from .run_folder import lock_run_dir, prepare_run_dir
from .runtime import Runtime, select_runtime
from .data.splits import (
    SPLITS_FILE,
    assign_splits,
    check_split_sizes,
    describe_changes,
    split_counts,
    write_splits,
)
from .targets import TargetScaler

# curves.png is redrawn after an epoch once this many seconds have passed since its last drawing, and
# after the last epoch: a drawing takes about 0.3 s, a few percent of a run whose epochs take seconds.
CURVES_EVERY_S = 30.0

HISTORY_COLUMNS = ("epoch", "train_nll", "val_nll", "val_nll_calibrated", "val_mae", "lr", "images_per_s", "seconds")


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


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False, log: Callable[[str], None] = tqdm.write,
          reasons: dict[str, str] | None = None, header: str | None = None) -> Path:
    """Train a model as configured; returns the run folder. `reasons` and `header`: comments for the
    run's config.yaml (what the planner chose and why)."""
    cfg = cfg.model_copy(deep=True)
    cfg.data.root = str(Path(cfg.data.root).resolve())  # the checkpoint must find its data from anywhere
    args = model_args(cfg)  # every name in the config is checked before anything is written
    check_image_size(args.backbone, args.image_size)
    phases.begin_run()
    runtime = select_runtime(cfg.run.device, cfg.train.precision)
    dist = init_distributed(runtime.device.type)
    if dist.enabled and runtime.device.type == "cuda":
        runtime = replace(runtime, device=torch.device("cuda", dist.local_rank))
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    lock = None
    try:
        if dist.is_main:
            lock = lock_run_dir(run_dir)
            prepare_run_dir(run_dir, cfg, resume, overwrite, log)
        dist.barrier()
        training = Training(cfg, args, run_dir, runtime, dist, resume, log if dist.is_main else _quiet)
        training.comments = (reasons, header)
        return training.run()
    finally:
        if lock is not None:
            lock.release()
        shutdown(dist)


@dataclass
class RunData:
    """The run's labelled images, by split."""

    examples: list[Example]
    splits: list[str]
    labels_sha256: str | None
    rows: int = 0
    """Rows of the labels file (0: read back from splits.csv on --resume)."""

    def split(self, name: str) -> list[Example]:
        return [e for e, s in zip(self.examples, self.splits) if s == name]


def prepare_data(cfg: Config, source: Source, run_dir: Path, resume: bool, previous_sha256: str | None,
                 log: Callable[[str], None]) -> RunData:
    """The labels and their split: made from the source at the start, read back from the run's
    splits.csv on --resume (so images never move between splits during a run)."""
    where = source.where
    if resume:
        recorded = source.recorded(run_dir / SPLITS_FILE)
        try:
            labels = source.read()
            sha256 = labels.sha256
            changes = describe_changes(recorded, labels.examples) if sha256 != previous_sha256 else None
            if changes:
                log(f"{where} changed since this run started ({changes}); the resumed run keeps the images and labels "
                    f"recorded in {run_dir / SPLITS_FILE}. Start a new run to use the new file")
        except DataError as e:
            sha256 = previous_sha256
            log(f"note: the labels cannot be read now ({str(e).splitlines()[0]}); resuming from {run_dir / SPLITS_FILE}")
        return RunData(recorded, [e.split for e in recorded], sha256)  # type: ignore[misc]
    labels = source.read()
    for note in labels.notes:
        log(f"note: {note}")
    d = cfg.data
    plan = assign_splits(labels.examples, Path(d.root), d.val_fraction, d.calibration_fraction, d.test_fraction, d.split_seed)
    if plan.note:
        log(f"note: {plan.note}")
    leaks = cross_split_copies(labels.examples, plan.splits)  # files only: a shard set's records are checked when written
    if leaks:
        shown = "; ".join(f"{a.image} ({sa}) = {b.image} ({sb})" for a, b, sa, sb in leaks[:3])
        log(f"warning: {len(leaks)} photos have an exact copy in another split ({shown}{'; ...' if len(leaks) > 3 else ''}): "
            f"a copy in train makes every score of the other split optimistic. `mdn check-data {where}` lists them all "
            "(and near copies); remove one of each pair")
    return RunData(labels.examples, plan.splits, labels.sha256, labels.rows)


class Training:
    """One run, in phases: `setup`, then per epoch `fit` / `validate` / `end_epoch`, then `finish`
    (calibration and the test-split evaluation). What a checkpoint saves is `training_state`."""

    def __init__(self, cfg: Config, args: ModelArgs, run_dir: Path, runtime: Runtime, dist: Dist, resume: bool,
                 log: Callable[[str], None]):
        self.cfg, self.args, self.run_dir, self.runtime, self.dist, self.resume, self.log = (
            cfg, args, run_dir, runtime, dist, resume, log
        )
        self.skipped: set[str] = set()
        self.epoch = 0  # epochs completed
        self.history: list[dict] = []
        self.best_val = math.inf
        self.selection = "val_nll_calibrated" if METHODS[cfg.train.calibration].scales else "val_nll"
        self._trainable: tuple[str, nn.Module] | None = None
        self._feature_loaders: dict[str, torch.utils.data.DataLoader] = {}
        self.estimate: RunEstimate | None = None
        self.comments: tuple[dict[str, str] | None, str | None] = (None, None)  # reasons and header for config.yaml
        self._curves_drawn: tuple[int, float] = (0, -math.inf)  # epochs in curves.png, and when it was drawn
        # TensorBoard (run.tensorboard): made here, so that a missing package stops the run before it trains.
        self.tensorboard = tensorboard_log(run_dir / TENSORBOARD_FOLDER, dist.is_main) if cfg.run.tensorboard else None

    def run(self) -> Path:
        try:
            # Under torchrun, processes stop together: at training steps and epoch ends, which all reach.
            with interrupts.collective(self.dist.enabled):
                with phases.timed("data and model set-up"):
                    self.setup()
                if self.epoch < self.cfg.train.epochs:
                    with phases.timed("timing probe (for the ETA)"):
                        self.estimate = self.probe()
                for epoch in range(self.epoch, self.cfg.train.epochs):
                    self.dist.check_stop()
                    if self.should_stop():
                        break
                    started = time.perf_counter()
                    fit = self.fit(epoch)
                    val = self.validate(epoch)
                    seconds = time.perf_counter() - started
                    if self.estimate is not None:
                        self.estimate.finished_epoch(self.frozen(epoch), seconds)
                    self.end_epoch(epoch, fit, val, seconds)
                    interrupts.reached("epoch-end")
                self.dist.check_stop()
            if self.dist.is_main:
                self.draw_curves(final=True)
        finally:
            self.close()
        if self.dist.is_main:
            self.finish()
            self.log(phases.breakdown("where this run's time went"))
        return self.run_dir

    def close(self) -> None:
        """Stop the image loaders' worker processes (they otherwise live as long as the loaders)."""
        for loader in (getattr(self, "train_loader", None), getattr(self, "val_loader", None)):
            if loader is not None:
                loader.close()

    # --- setup --------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg, dist = self.cfg, self.dist
        if cfg.train.batch_size % dist.world_size:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be a multiple of the {dist.world_size} processes")
        self.batch_size = cfg.train.batch_size // dist.world_size  # per process; the global batch is train.batch_size
        previous = load_checkpoint(self.run_dir / "last.pt") if self.resume else None
        self.source = open_source(cfg.data.model_dump())
        self.data = prepare_data(cfg, self.source, self.run_dir, self.resume, (previous or {}).get("data", {}).get("labels_sha256"),
                                 self.log)
        interrupts.reached("labels-read")
        interrupts.check()
        check_split_sizes(self.data.splits, cfg.train.batch_size, self.source.where)
        train_targets = torch.tensor([e.target for e in self.data.split("train")], dtype=torch.float64)
        self.targets = TargetScaler.fit(train_targets, cfg.data.target_transform)
        self.num_workers = resolve_num_workers(cfg.data.num_workers)
        self.make_image_loaders()

        interrupts.check()
        torch.manual_seed(cfg.run.seed)  # initialisation; batches, augmentation and dropout have their own seeds
        model = MDNRegressor(self.args, pretrained=False if self.resume else cfg.model.pretrained)
        model.head.init_spread(self.targets.encode(train_targets))
        if dist.enabled:
            model = sync_batchnorm(model, self.runtime.device)
        self.model = self.runtime.prepare(model)
        self.optimizer = make_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.backbone_lr_scale)
        self.grad_scaler = torch.amp.GradScaler(self.runtime.device.type, enabled=self.runtime.needs_grad_scaler)
        self.segments = [Segment(0, cfg.train.epochs, cfg.train.warmup_epochs)]
        if previous is not None:
            self.load_training_state(previous)
        interrupts.reached("model-built")
        interrupts.check()
        if dist.is_main and not self.resume:  # once the model is built: its weights file, if any, has loaded
            write_splits(self.run_dir / SPLITS_FILE, self.data.examples, self.data.splits, cfg.data.target_column, cfg.data.group_column)
            write_text_atomic(self.run_dir / "config.yaml", to_yaml(cfg, *self.comments))
        self.scheduler = make_scheduler(self.optimizer, self.segments, self.steps_per_epoch)
        if previous is not None:  # after the scheduler, which sets every group's lr when it is made
            self.optimizer.load_state_dict(previous["optimizer"])
            self.scheduler.load_state_dict(previous["scheduler"])
            step = self.scheduler.last_epoch
            for group, base, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
                group["lr"] = base * factor(step)  # the schedule's value now, which a warm restart changes
        self.log(
            f"training {cfg.model.backbone} + {cfg.model.components}-component MDN on {self.runtime.device} "
            f"({self.runtime.precision}{f', {dist.world_size} processes' if dist.enabled else ''}): "
            f"{split_counts(self.data.splits)} images at {self.args.image_size}px, {self.num_workers} loader workers"
            + (f" ({self.data.rows - len(self.data.examples)} of the labels file's {self.data.rows} rows skipped: repeats)"
               if self.data.rows > len(self.data.examples) else "")
        )

    def make_image_loaders(self) -> None:
        cfg, dist = self.cfg, self.dist

        def loader(split: str, **train):
            rows = self.data.split(split)
            cache = None if cfg.data.cache == "none" else DecodedCache(
                cfg.data.cache, len(rows), self.args.image_size, cache_directory(cfg.data.cache_dir), dist.machine_tensor, split
            )
            return self.source.loader(rows, self.args.image_size, self.batch_size, self.num_workers, rank=dist.rank,
                                      world_size=dist.world_size, cache=cache, pin_memory=self.runtime.pin_memory, name=split, **train)

        self.train_loader = loader("train", train=True, seed=cfg.run.seed, augment=Augment(flip=cfg.data.flip, shift=cfg.data.shift))
        self.val_loader = loader("val")
        self.steps_per_epoch = len(self.train_loader)

    def load_training_state(self, state: dict) -> None:
        """Continue from last.pt: weights, gradient scaler, history and schedule (the optimiser and
        scheduler states follow in `setup`). A raised train.epochs becomes a warm restart; a lowered
        one stops earlier on the same schedule."""
        cfg = self.cfg
        self.model.load_state_dict(state["model"])
        saved_scaler = state.get("grad_scaler") or {}
        if self.grad_scaler.is_enabled() and saved_scaler:
            self.grad_scaler.load_state_dict(saved_scaler)
        elif self.grad_scaler.is_enabled():
            self.log("note: the run continues in fp16, which it did not use before: the gradient scaler starts afresh")
        self.epoch, self.history, self.best_val = state["epoch"], list(state["history"]), state["best_val_nll"]
        self.segments = segments_from_state(state["schedule"])
        planned = self.segments[-1].end
        self.log(f"resuming {self.run_dir} after epoch {self.epoch}/{cfg.train.epochs} (best {self.best_val:.4f})")
        if cfg.train.epochs > planned:
            added = cfg.train.epochs - self.epoch
            restart = Segment(self.epoch, cfg.train.epochs, min(cfg.train.warmup_epochs, added / 2), cfg.train.extend_lr_scale)
            self.segments = [s for s in self.segments if s.start < self.epoch] + [restart]
            self.log(
                f"train.epochs raised from {planned} to {cfg.train.epochs}: epochs {self.epoch + 1}-{cfg.train.epochs} are a warm "
                f"restart: warm-up over {restart.warmup:g} epochs to lr {cfg.train.lr * restart.peak:.2e} "
                f"(train.extend_lr_scale={restart.peak:g} x train.lr), then cosine decay to zero; early stopping counts from the restart"
            )
        elif cfg.train.epochs < planned and self.epoch < cfg.train.epochs:
            self.log(f"train.epochs lowered from {planned} to {cfg.train.epochs}: the run stops after epoch {cfg.train.epochs} "
                     "on its original schedule (the learning rate will not have decayed to zero)")

    # --- per epoch ----------------------------------------------------------------------------

    def probe(self, steps: int = 4) -> RunEstimate:
        """Time a few real steps on a copy of the model (the run itself is untouched) and estimate
        the whole run from them (eta.py); says so in the log."""
        cfg, model = self.cfg, copy.deepcopy(self.model)
        set_train_mode(model, False, cfg.train.batch_size)
        optimizer = make_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.backbone_lr_scale)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1e-3)  # small steps: the copy is thrown away
        scaler = torch.amp.GradScaler(self.runtime.device.type, enabled=self.runtime.needs_grad_scaler)

        def fitter(module: nn.Module) -> Fitter:
            return Fitter(module, optimizer, scheduler, scaler, self.targets, self.runtime, self.dist, dropout=self.args.dropout,
                          feature_dim=model.feature_dim, grad_clip=cfg.train.grad_clip, min_batch=2 if batchnorm_trains(model) else 1)

        whole, times, batch = fitter(model), [], None
        started = time.perf_counter()
        for i, batch in enumerate(self.train_loader):  # the real loader: decoding, workers and all
            whole.step(batch)
            times.append(time.perf_counter() - started)
            started = time.perf_counter()
            if i >= steps:
                break
        step_s = statistics.median(times[1:] or times)
        per_image, head_step_s = step_s / (3 * cfg.train.batch_size), 0.0  # without a readable image to time: a guess
        if batch is not None and len(batch.images):
            with torch.inference_mode():
                images = self.runtime.images(batch.images)
                started = time.perf_counter()
                features = model.eval().features(images)
                per_image = (time.perf_counter() - started) / len(images)
            set_train_mode(model, True, cfg.train.batch_size)
            started = time.perf_counter()
            fitter(model.head).step(replace(batch, images=features.float().cpu()))
            head_step_s = time.perf_counter() - started
        counts = {name: len(self.data.split(name)) for name in ("train", "val", "calibration", "test")}
        head_epochs = cfg.train.epochs if cfg.model.freeze_backbone else min(cfg.train.unfreeze_after or 0, cfg.train.epochs)
        load_s = step_s / 3  # what a forward pass through the loader costs against a training step, about (decode + forward)
        estimate = RunEstimate(
            epochs=cfg.train.epochs, head_epochs=head_epochs, started_epoch=self.epoch,
            full_epoch_s=self.steps_per_epoch * step_s + counts["val"] * (per_image + load_s / cfg.train.batch_size),
            head_epoch_s=self.steps_per_epoch * head_step_s,
            features_s=(counts["train"] + counts["val"]) * (per_image + load_s / cfg.train.batch_size) if head_epochs else 0.0,
            # the feature bank (up to 2048 train images), val and calibration, then the test split: forward passes
            after_s=(min(counts["train"], 2048) + counts["val"] + counts["calibration"] + counts["test"]) * 1.5 * per_image + 5.0,
        )
        stopping = "; early stopping can end it sooner" if cfg.train.early_stopping_patience else ""
        self.log(f"estimated time for the whole run: {duration(phases.elapsed() + estimate.total())} "
                 f"({cfg.train.epochs - self.epoch} epochs of {self.steps_per_epoch} steps at {step_s:.2f} s a step, timed on this "
                 f"machine, then calibration and the test split{stopping})")
        return estimate

    def frozen(self, epoch: int) -> bool:
        return self.cfg.model.freeze_backbone or (self.cfg.train.unfreeze_after is not None and epoch < self.cfg.train.unfreeze_after)

    def should_stop(self) -> bool:
        patience = self.cfg.train.early_stopping_patience
        restart = self.segments[-1].start  # an extended run counts from its warm restart, as a run of its own
        since = epochs_since_best(self.history[restart:], self.selection)
        if patience and since >= patience:
            self.log(f"early stopping: the {self.selection.replace('_', ' ')} has not improved for {since} epochs")
            return True
        return False

    def trainable(self, epoch: int) -> tuple[nn.Module, torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
        """What trains in this epoch (wrapped for DDP, compiled if asked) and its two loaders."""
        frozen = self.frozen(epoch)
        name = "head" if frozen else "model"
        if self._trainable is None or self._trainable[0] != name:
            # Drop the other phase's DDP wrapper first: its gradient hooks stay on the shared head
            # parameters until it is collected.
            self._trainable = None
            gc.collect()
            module = self.model.head if frozen else self.model
            wrapped = self.dist.wrap(module, self.runtime.device, find_unused_parameters=self.args.backbone.startswith("timm/"))
            if self.cfg.train.compile and not frozen:
                wrapped = compile_module(wrapped, self.log)
            self._trainable = (name, wrapped)
        if frozen:
            if not self._feature_loaders:
                with phases.timed("backbone features (frozen backbone)"):
                    self.make_feature_loaders()
            self.feature_sampler.set_epoch(epoch)
            return self._trainable[1], self._feature_loaders["train"], self._feature_loaders["val"]
        self.train_loader.set_epoch(epoch)
        return self._trainable[1], self.train_loader, self.val_loader

    def make_feature_loaders(self) -> None:
        self.log("computing backbone features once (the backbone is frozen)")
        loaders = {}
        for split in ("train", "val"):
            features = cached_features(self.model, self.data.split(split), self.source, self.runtime, self.dist,
                                       self.batch_size, self.num_workers, self.on_skip, split)
            if split == "train":
                self.feature_sampler = SeededSampler(len(features), True, self.cfg.run.seed, self.dist.rank, self.dist.world_size)
                loaders[split] = make_loader(features, self.batch_size, 0, self.feature_sampler, drop_last=True)
            else:
                share = list(range(self.dist.rank, len(features), self.dist.world_size))
                loaders[split] = make_loader(features, self.batch_size, 0, share)
        self._feature_loaders = loaders

    def fit(self, epoch: int):
        torch.manual_seed(self.cfg.run.seed * 1_000_003 + epoch)  # stochastic layers inside backbones: the same on resume
        # Before wrapping: DDP only synchronises the parameters that require gradients when it is built.
        set_train_mode(self.model, self.frozen(epoch), self.cfg.train.batch_size)
        module, train_loader, _ = self.trainable(epoch)
        fitter = Fitter(
            module, self.optimizer, self.scheduler, self.grad_scaler, self.targets, self.runtime, self.dist,
            dropout=self.args.dropout, feature_dim=self.model.feature_dim, grad_clip=self.cfg.train.grad_clip,
            min_batch=2 if batchnorm_trains(self.model) else 1,
        )
        left = f" (run: ~{duration(self.estimate.remaining(epoch))} left)" if self.estimate is not None else ""
        with phases.timed("train"):
            fit = fit_epoch(fitter, train_loader, self.on_skip, f"epoch {epoch + 1}/{self.cfg.train.epochs}{left}")
        if fit.steps == 0:
            raise TrainingError(
                f"epoch {epoch + 1} took no optimisation step: "
                + ("every loss was NaN or infinite; lower train.lr or check the labels" if fit.bad_steps else
                   "no batch had the 2 readable images BatchNorm needs; raise train.batch_size or fix the unreadable images")
            )
        return fit

    def validate(self, epoch: int):
        module = self.model.head if self.frozen(epoch) else self.model
        _, _, val_loader = self.trainable(epoch)
        with phases.timed("validation"):
            val = validate_epoch(module, val_loader, self.runtime, self.targets, self.dist, self.on_skip)
        if val.images == 0:
            raise DataError(
                f"no val image could be read in epoch {epoch + 1}, so no epoch can be chosen; fix or replace the "
                f"unreadable images (see {self.run_dir / 'skipped.txt'}) or choose other val images"
            )
        if not math.isfinite(val.nll):
            raise TrainingError(
                f"epoch {epoch + 1}: the validation NLL is {val.nll} (diverged); nothing of this epoch was saved, "
                f"{self.run_dir / 'last.pt'} and best.pt are intact. Lower train.lr or check the labels"
            )
        return val

    def end_epoch(self, epoch: int, fit, val, seconds: float) -> None:
        row = {
            "epoch": epoch + 1,
            "train_nll": fit.train_nll,
            "val_nll": val.nll,
            "val_nll_calibrated": val.nll_calibrated,
            "val_mae": val.mae,
            "lr": self.scheduler.get_last_lr()[-1],  # the head's (train.lr); the backbone runs at lr * backbone_lr_scale
            "images_per_s": fit.images / seconds,
            "seconds": seconds,
        }
        self.history.append(row)
        self.epoch = epoch + 1
        improved = row[self.selection] < self.best_val
        if improved:
            self.best_val = row[self.selection]
        if self.dist.is_main:
            with phases.timed("checkpoints and curves"):
                self.write_epoch(improved)
            self.draw_curves()
        if self.tensorboard is not None:
            self.tensorboard.log(row)
        self.log(
            f"epoch {epoch + 1:>3}/{self.cfg.train.epochs}  train NLL {fit.train_nll:8.4f}  val NLL {val.nll:8.4f} "
            f"(calibrated {val.nll_calibrated:.4f})  val MAE {val.mae:.4g}  lr {row['lr']:.2e}  {row['images_per_s']:.0f} img/s"
            f"{'  (head only)' if self.frozen(epoch) else ''}{f'  ({fit.bad_steps} NaN steps skipped)' if fit.bad_steps else ''}"
            f"{'  *best' if improved else ''}"
            f"{f'  (run: ~{duration(self.estimate.remaining(epoch + 1))} left)' if self.estimate is not None else ''}"
        )

    def model_state(self) -> dict:
        """What best.pt holds: everything predict needs, nothing it does not."""
        return {
            "config": self.cfg.model_dump(mode="json"),
            "model_args": self.args.to_dict(),
            "target_scaler": self.targets.state_dict(),
            "calibration": {"method": "none"},
            "model": self.model.state_dict(),
            "epoch": self.epoch,
            "data": {"labels_sha256": self.data.labels_sha256, "splits": split_counts(self.data.splits)},
        }

    def training_state(self) -> dict:
        """What last.pt adds to continue the run exactly."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "schedule": segments_to_state(self.segments),
            "grad_scaler": self.grad_scaler.state_dict(),
            "history": self.history,
            "best_val_nll": self.best_val,
        }

    def write_epoch(self, improved: bool) -> None:
        """best.pt, last.pt and metrics.csv of one epoch, written together (Ctrl-C waits for all three)."""
        state = self.model_state()
        with interrupts.interrupts_held():
            if improved:
                save_checkpoint(state, self.run_dir / "best.pt")
            save_checkpoint({**state, **self.training_state()}, self.run_dir / "last.pt")
            with atomic_writer(self.run_dir / "metrics.csv", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS)
                writer.writeheader()
                writer.writerows(self.history)

    def draw_curves(self, final: bool = False) -> None:
        """curves.png beside metrics.csv, so that a run can be watched: after the first epoch, then
        every CURVES_EVERY_S seconds at most, and at the end (`final`) if it lags metrics.csv."""
        drawn, when = self._curves_drawn
        if not self.history or drawn == len(self.history) or not (final or time.perf_counter() - when >= CURVES_EVERY_S):
            return
        with phases.timed("checkpoints and curves"):
            best = min(self.history, key=lambda r: r[self.selection])["epoch"]
            write_curves(self.history, self.run_dir / "curves.png", best, target_label(self.cfg.data.model_dump()))
        self._curves_drawn = (len(self.history), time.perf_counter())

    def on_skip(self, message: str) -> None:
        if self.cfg.data.on_bad_image == "error":
            saved = " (the checkpoints written so far are intact; --resume continues from them)" if self.epoch else ""
            raise DataError(f"{message}; remove it from the labels file or set data.on_bad_image: skip{saved}")
        if message not in self.skipped:
            self.skipped.add(message)
            if self.epoch:  # after the first epoch, images are met only in calibration and evaluation
                self.log(f"skipped: {message}")

    # --- after training -----------------------------------------------------------------------

    def finish(self) -> None:
        best_path = self.run_dir / "best.pt"
        interrupts.reached("calibration")
        interrupts.check()
        splits = {name: self.data.split(name) for name in ("train", "val", "calibration")}
        with phases.timed("calibration"):
            calibrate_checkpoint(best_path, self.cfg.train.calibration, splits, self.source, self.runtime, self.num_workers, self.log,
                                 on_skip=self.on_skip, ood_quantile=self.cfg.train.ood_quantile)
        if self.data.split("test"):
            interrupts.reached("evaluation")
            interrupts.check()
            from .evaluate import (  # the same code as `mdn evaluate`
                evaluate,
                format_metrics,
            )

            with phases.timed("test evaluation"):
                evaluation, out, described = evaluate(
                    best_path, runtime=self.runtime, num_workers=self.num_workers, on_skip=self.on_skip, overwrite=True,
                )
            self.log(f"test metrics of the best checkpoint ({described}; written to {out}):\n{format_metrics(evaluation.metrics)}")
        if self.skipped:
            write_text_atomic(self.run_dir / "skipped.txt", "\n".join(sorted(self.skipped)) + "\n")
            self.log(f"skipped {len(self.skipped)} unreadable images (listed in {self.run_dir / 'skipped.txt'})")
        self.log(f"best checkpoint ({self.selection.replace('_', ' ')} {self.best_val:.4f}): {best_path}")


def epochs_since_best(history: list[dict], key: str) -> int:
    """Epochs at the end of `history` without a new lowest `key`."""
    best, since = math.inf, 0
    for row in history:
        if row[key] < best:
            best, since = row[key], 0
        else:
            since += 1
    return since


def _quiet(message: str) -> None:
    """The log of every process but rank 0."""
