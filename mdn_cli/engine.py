"""The training engine: the optimiser, the learning-rate schedule, one optimisation step, one
pass over the train split and one over the val split. `train.py` tells the story with these;
`scripts/bench.py` times them.

One step: forward (backbone under autocast; head and loss in fp32) -> mixture NLL of the
standardised targets -> backward (DistributedDataParallel averages gradients across processes)
-> gradient clipping -> AdamW -> schedule. Non-finite losses or gradients skip the step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm import tqdm

from . import interrupts
from . import mixture as mx
from .calibration import SELECTION_SCALES, nll_sums
from .data.dataset import Batch
from .distributed import Dist
from .errors import TrainingError
from .mixture import mixture_nll
from .model import MDNRegressor
from .runtime import Runtime, run_model
from .targets import TargetScaler

# A run gives up when this many consecutive steps had a non-finite loss or gradient.
MAX_BAD_STEPS = 20
# Below this many images in a (global) batch, batch statistics are too noisy: BatchNorm layers
# use their running statistics instead (their scales and shifts still train).
MIN_BATCHNORM_BATCH = 16


# ---------------------------------------------------------------------------------------------
# Optimiser and learning-rate schedule


def make_optimizer(model: MDNRegressor, lr: float, weight_decay: float, backbone_lr_scale: float) -> torch.optim.AdamW:
    """AdamW over every parameter (a frozen one simply gets no gradient), with no weight decay on
    biases and norm scales, and the backbone at lr * backbone_lr_scale."""
    groups = []
    for part, part_lr in ((model.backbone, lr * backbone_lr_scale), (model.head, lr)):
        params = list(part.parameters())
        groups.append({"params": [p for p in params if p.ndim > 1], "lr": part_lr, "weight_decay": weight_decay})
        groups.append({"params": [p for p in params if p.ndim <= 1], "lr": part_lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=lr)


@dataclass(frozen=True)
class Segment:
    """One stretch of the schedule: a linear warm-up from zero to `peak` (a factor on each
    parameter group's lr) over `warmup` epochs, then cosine decay to zero at epoch `end`."""

    start: int
    end: int
    warmup: float
    peak: float = 1.0


def schedule_factor(step: int, segments: list[Segment], steps_per_epoch: int) -> float:
    """The lr factor at optimisation `step` (counted from the start of training)."""
    epoch = step // steps_per_epoch
    segment = next((s for s in reversed(segments) if s.start <= epoch), segments[0])
    local = step - segment.start * steps_per_epoch
    warmup = round(segment.warmup * steps_per_epoch)
    total = (segment.end - segment.start) * steps_per_epoch
    if local < warmup:
        return segment.peak * (local + 1) / warmup
    progress = (local - warmup) / max(1, total - warmup)
    return segment.peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(optimizer: torch.optim.Optimizer, segments: list[Segment], steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    # A closure, not a callable object: LambdaLR would save an object's attributes in its state
    # dict and restore the old segments over the new ones when a run is extended.
    segments = list(segments)

    def factor(step: int) -> float:
        return schedule_factor(step, segments, steps_per_epoch)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def segments_to_state(segments: list[Segment]) -> list[dict]:
    return [asdict(s) for s in segments]


def segments_from_state(state: list[dict]) -> list[Segment]:
    return [Segment(**s) for s in state]


def set_train_mode(model: MDNRegressor, frozen: bool, global_batch: int) -> None:
    """Head in train mode; a frozen backbone entirely in eval mode (its BatchNorm statistics stay
    those it was pretrained with); with small global batches, BatchNorm layers use their running
    statistics while their scales and shifts still train."""
    model.train()
    model.backbone.requires_grad_(not frozen)
    if frozen:
        model.backbone.eval()
    elif global_batch < MIN_BATCHNORM_BATCH:
        for module in model.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def batchnorm_trains(model: MDNRegressor) -> bool:
    """Whether some BatchNorm layer computes batch statistics (then a batch needs 2+ images)."""
    return any(m.training for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


def dropout_masks(seeds: torch.Tensor, dim: int, p: float) -> torch.Tensor | None:
    """Per-sample dropout masks (N, dim) float32, already divided by the keep probability: each
    row depends only on its sample's seed, so the masks are the same however the batch is split
    across processes and whether or not the run was resumed."""
    if p <= 0:
        return None
    rows = [torch.rand(dim, generator=torch.Generator().manual_seed(int(s) ^ 0x5DEECE66D)) for s in seeds.tolist()]
    keep = torch.stack(rows) >= p if rows else torch.empty(0, dim, dtype=torch.bool)
    return keep.float() / (1.0 - p)


def compile_module(module: nn.Module, log: Callable[[str], None]) -> nn.Module:
    """`train.compile`: torch.compile; where it cannot compile (no compiler, unsupported platform),
    warn and train eagerly rather than fail."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True  # a graph that fails to compile runs eagerly
    try:
        return torch.compile(module)
    except Exception as e:  # noqa: BLE001 - any failure means: run eagerly
        log(f"warning: torch.compile is not available here ({type(e).__name__}: {str(e)[:120]}); training without it")
        return module


# ---------------------------------------------------------------------------------------------
# One step, one epoch


@dataclass
class Fitter:
    """Everything one optimisation step needs. `module` maps a batch's inputs (uint8 images, or
    cached backbone features while the backbone is frozen) and per-sample dropout masks to head
    outputs; it may be a DistributedDataParallel wrapper or a compiled module."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    grad_scaler: torch.amp.GradScaler
    targets: TargetScaler
    runtime: Runtime
    dist: Dist
    dropout: float
    feature_dim: int
    grad_clip: float | None = None
    min_batch: int = 1
    """Global images a batch needs for a step (2 while BatchNorm computes batch statistics)."""

    def step(self, batch: Batch) -> StepResult:
        """One optimisation step on this process's share of a global batch."""
        n = batch.images.shape[0]
        # one all-reduce: the global batch size, and whether any process was asked to stop (a safe point)
        global_n, stops = self.dist.sum([n, 1.0 if interrupts.requested() else 0.0])
        interrupts.stop_if(bool(stops))
        if global_n < self.min_batch:  # unreadable images can leave a batch too small
            return StepResult("too_small")
        images = self.runtime.images(batch.images)
        y = self.runtime.values(self.targets.encode(batch.targets))  # standardised in float64 on the CPU
        mask = dropout_masks(batch.seeds, self.feature_dim, self.dropout)
        with self.runtime.step_autocast():
            logits, means, stds = self.module(images, None if mask is None else self.runtime.values(mask))
        nll = mixture_nll(logits, means, stds, y)
        # This process's share of the global batch mean: DDP averages over processes, so the
        # gradient is that of the mean over all images, however unevenly they are split.
        loss = nll.sum() * (self.dist.world_size / global_n)
        self.optimizer.zero_grad(set_to_none=True)
        if not self.dist.all_true(bool(torch.isfinite(loss))):
            self.scheduler.step()
            return StepResult("non_finite")
        self.grad_scaler.scale(loss).backward()
        self.grad_scaler.unscale_(self.optimizer)
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip or math.inf)
        # fp16's grad scaler skips steps with inf gradients itself (and lowers its scale)
        if not (self.runtime.needs_grad_scaler or bool(torch.isfinite(norm))):
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            return StepResult("non_finite")
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        self.scheduler.step()
        return StepResult("done", float(nll.detach().sum()), n)


@dataclass(frozen=True)
class StepResult:
    outcome: str
    """done | too_small (skipped: too few images) | non_finite (skipped: NaN/inf loss or gradient)."""
    nll_sum: float = 0.0
    """Summed NLL of this process's images, standardised units."""
    images: int = 0


@dataclass(frozen=True)
class EpochFit:
    train_nll: float
    """Mean NLL per train image in target units (nats), over all processes."""
    images: int
    """Images that contributed to a step, over all processes."""
    steps: int
    bad_steps: int


def fit_epoch(fitter: Fitter, batches: Iterable[Batch], on_skip: Callable[[str], None], desc: str) -> EpochFit:
    """One pass over the train split. Raises TrainingError after MAX_BAD_STEPS non-finite steps in a row."""
    total, seen, steps, bad, bad_in_a_row = 0.0, 0, 0, 0, 0
    log_jacobian = 0.0  # sum of log y over the images seen, for the log transform's density
    bar = tqdm(batches, desc=desc, leave=False, dynamic_ncols=True, unit="batch", disable=not fitter.dist.is_main)
    for batch in bar:
        interrupts.reached("train-batch")
        for message in batch.skipped:
            on_skip(message)
        result = fitter.step(batch)
        if result.outcome == "too_small":
            continue
        if result.outcome == "non_finite":
            bad += 1
            bad_in_a_row += 1
            if bad_in_a_row >= MAX_BAD_STEPS:
                raise TrainingError(
                    f"the loss or its gradient was NaN or infinite in {bad_in_a_row} consecutive steps; lower train.lr, "
                    "check the labels for extreme values, or use train.precision: fp32. The checkpoints written so far are intact"
                )
            continue
        bad_in_a_row = 0
        steps += 1
        total += result.nll_sum
        seen += result.images
        if fitter.targets.transform == "log":
            log_jacobian += float(torch.log(batch.targets).sum())
        if seen:
            bar.set_postfix(nll=f"{(total + log_jacobian) / seen + math.log(fitter.targets.scale):.4f}")
    total, seen, log_jacobian = fitter.dist.sum([total, seen, log_jacobian])
    # In target units: standardised NLL + log(scale) (+ mean log y, the log transform's Jacobian).
    train_nll = (total + log_jacobian) / seen + math.log(fitter.targets.scale) if seen else math.nan
    return EpochFit(train_nll, int(seen), steps, bad)


@dataclass(frozen=True)
class Validation:
    nll: float
    """Mean NLL per val image in target units."""
    nll_calibrated: float
    """The same after the best single std scale (what calibration would give)."""
    mae: float
    """Mean absolute error of the predicted mean."""
    images: int


def validate_epoch(
    module: nn.Module, batches: Iterable[Batch], runtime: Runtime, targets: TargetScaler, dist: Dist, on_skip: Callable[[str], None]
) -> Validation:
    """Scores on this process's share of the val split, summed over all processes."""
    out = run_model(module, batches, runtime, on_skip, moment="val-batch", as_steps=True)
    sums = [0.0, 0.0, 0, *([0.0] * len(SELECTION_SCALES))]  # a process whose share did not decode still takes part
    if len(out.targets):
        m, y = targets.to_mixture(*out.heads), out.targets
        sums = [float(-mx.log_prob(m, y).sum()), float((mx.mean(m) - y).abs().sum()), len(y), *nll_sums(m, y)]
    nll_sum, abs_err_sum, n, *scaled = dist.sum(sums)
    if n == 0:
        return Validation(math.nan, math.nan, math.nan, 0)
    return Validation(nll_sum / n, min(scaled) / n, abs_err_sum / n, int(n))
