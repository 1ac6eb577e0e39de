"""Device and numeric precision, decided once per command and passed down; running a module over
batches on them (`model_outputs`, `run_model`: validation, cached features, calibration, evaluation,
prediction)."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import interrupts
from .errors import ConfigError

if TYPE_CHECKING:
    from .data.dataset import Batch


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None
    """bf16/fp16 autocast dtype on CUDA, None for full fp32."""
    cpu_bf16_steps: bool = False
    """On a CPU with native bf16, the backbone runs under bf16 autocast in training steps and in
    validation (1.5-2.6x as fast, measured), which train and pick the epoch; every pass that
    calibrates or measures (calibration, the test split, prediction) stays fp32, as onnxruntime's
    predictions are."""

    def autocast(self) -> contextlib.AbstractContextManager:
        """For every pass over the model."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def step_autocast(self) -> contextlib.AbstractContextManager:
        """For a training step's forward pass and validation."""
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.cpu_bf16_steps else self.autocast()

    @property
    def needs_grad_scaler(self) -> bool:
        return self.amp_dtype == torch.float16

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    @property
    def channels_last(self) -> bool:
        """NHWC tensors: what cuDNN's fastest convolution kernels (and tensor cores) want."""
        return self.device.type == "cuda"

    def images(self, batch: torch.Tensor) -> torch.Tensor:
        """A batch of uint8 images (N, 3, S, S) (or float32 cached features (N, D)), moved to the
        device in its preferred layout."""
        batch = batch.to(self.device, non_blocking=True)
        return batch.contiguous(memory_format=torch.channels_last) if self.channels_last and batch.ndim == 4 else batch

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """Float data (targets, masks) on the device as float32: MPS has no float64, and nothing
        on the device needs it (float64 maths stays on the CPU)."""
        return x.to(dtype=torch.float32).to(self.device, non_blocking=True)

    @property
    def precision(self) -> str:
        name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]
        return "bf16 training steps and validation, fp32 otherwise" if self.cpu_bf16_steps else name

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last_weights(model) else model

    def channels_last_weights(self, model: torch.nn.Module) -> bool:
        """Whether `model`'s convolutions run in NHWC here: always on CUDA; on CPUs where oneDNN is
        faster that way, which is every built-in backbone but convnext (measured on a 2-core x86 CPU,
        224 px: training 1.05-1.85x, inference 1.1-1.7x as fast as the default layout; convnext_tiny
        inference 0.83x). The weights alone decide on a CPU: a convolution with NHWC weights gives NHWC
        outputs, whatever the input's layout."""
        if self.channels_last:
            return True
        if self.device.type != "cpu":
            return False
        from .backbones import get_backbone  # noqa: PLC0415 - the registry, not a dependency of every runtime user

        backbone = getattr(getattr(model, "args", None), "backbone", None)
        return backbone is not None and get_backbone(backbone).cpu_channels_last


def select_device(setting: str, what: str = "run.device") -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU; an explicit device that is absent is an error naming
    `what` (the config key or command-line option that asked for it)."""
    if setting == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise ConfigError(f"{what}: '{setting}' is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{what}: {setting} requested but no CUDA GPU is available; use auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{what}: {setting} requested but only {torch.cuda.device_count()} GPU(s) exist")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"{what}: mps requested but MPS is not available; use auto or cpu")
    elif device.type != "cpu":
        raise ConfigError(f"{what}: '{setting}' is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (x86 AVX512-BF16 or AMX, read from /proc/cpuinfo
    on Linux): there oneDNN's bf16 convolutions are faster than fp32; elsewhere bf16 is emulated and
    slower. MDN_CPU_BF16=0 or 1 overrides the answer."""
    override = os.environ.get("MDN_CPU_BF16")
    if override in ("0", "1"):
        return override == "1"
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return bool(re.search(r"^flags\s*:.*\b(avx512_bf16|amx_bf16)\b", flags, re.M))


def select_runtime(device_setting: str, precision: str = "auto", what: str = "train.precision") -> Runtime:
    """The device and the autocast dtype. `auto` precision: bf16 on GPUs with native bf16 (Ampere
    and newer), fp16 with a gradient scaler on older GPUs (V100, T4: their bf16 is emulated and
    slow); on CPUs, fp32, but training steps and validation (`what` train.*) in bf16 where the CPU
    has it natively (`cpu_bf16_steps`); fp32 on MPS. `what` names the setting in error messages."""
    training = what.startswith("train.")
    device = select_device(device_setting, "run.device" if training else "--device")
    if device.type == "cpu" and training and precision in ("auto", "bf16"):
        native = cpu_has_native_bf16()
        if precision == "bf16" and not native:
            raise ConfigError(f"{what}: bf16 needs a CUDA GPU or a CPU with native bf16 (AVX512-BF16 or AMX), which this one "
                              "lacks; use auto or fp32")
        return Runtime(device, None, cpu_bf16_steps=native)
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            raise ConfigError(f"{what}: {precision} needs a CUDA GPU; use fp32 on {device.type}")
        return Runtime(device, None)
    if precision == "fp32":
        return Runtime(device, None)
    bf16_native = torch.cuda.is_bf16_supported(including_emulation=False)
    if precision == "bf16" and not bf16_native:
        raise ConfigError(f"{what}: bf16 is not native on this GPU ({torch.cuda.get_device_name(device)}); use fp16 or auto")
    if precision == "fp16" or not bf16_native:
        return Runtime(device, torch.float16)
    return Runtime(device, torch.bfloat16)


@dataclass
class Outputs:
    """A module's outputs for every image that decoded, in loader order, on the CPU."""

    heads: tuple[torch.Tensor, ...]
    """The module's outputs, float32, each with N rows."""
    targets: torch.Tensor
    """(N,) float64, target units."""
    indices: torch.Tensor
    """(N,) int64: dataset index of each row."""


def model_outputs(model: torch.nn.Module, batches: Iterable[Batch], runtime: Runtime, on_skip: Callable[[str], None],
                  moment: str = "batch", chunk: int = sys.maxsize, as_steps: bool = False) -> Iterator[Outputs]:
    """Run `model` over `batches` in eval mode, yielding the outputs of every `chunk` images (at
    least) that decoded, in loader order: memory stays flat over any number of images. `on_skip(message)`
    for each image that did not decode. Every submodule's own mode is restored afterwards (a frozen
    backbone stays in eval mode while the head trains). Each batch is a safe point for a stop
    (`moment` names it for tests). `as_steps`: in the training steps' precision (validation, which
    picks the epoch; on CUDA the same as every pass)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    parts: list[Outputs] = []
    try:
        for batch in batches:
            interrupts.reached(moment)
            interrupts.check()
            for message in batch.skipped:
                on_skip(message)
            if batch.images.shape[0] == 0:
                continue
            with torch.inference_mode(), runtime.step_autocast() if as_steps else runtime.autocast():
                out = model(runtime.images(batch.images))
            heads = tuple(o.float().cpu() for o in (out if isinstance(out, tuple) else (out,)))
            parts.append(Outputs(heads, batch.targets, batch.indices))
            if sum(len(p.indices) for p in parts) >= chunk:
                yield concat(parts)
                parts = []
        if parts:
            yield concat(parts)
    finally:
        for module, training in modes:
            module.training = training


def concat(parts: list[Outputs]) -> Outputs:
    if not parts:
        return Outputs((), torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.int64))
    if len(parts) == 1:
        return parts[0]
    return Outputs(tuple(torch.cat(p) for p in zip(*(part.heads for part in parts))), torch.cat([p.targets for p in parts]),
                   torch.cat([p.indices for p in parts]))


def run_model(model: torch.nn.Module, batches: Iterable[Batch], runtime: Runtime, on_skip: Callable[[str], None],
              moment: str = "batch", as_steps: bool = False) -> Outputs:
    """`model_outputs` of every image at once."""
    return concat(list(model_outputs(model, batches, runtime, on_skip, moment, as_steps=as_steps)))
