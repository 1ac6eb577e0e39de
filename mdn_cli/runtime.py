"""Device and numeric precision, decided once per command and passed down."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None
    """bf16/fp16 autocast dtype on CUDA, None for full fp32."""

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

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
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model


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


def select_runtime(device_setting: str, precision: str = "auto", what: str = "train.precision") -> Runtime:
    """The device and the autocast dtype. `auto` precision: bf16 on GPUs with native bf16 (Ampere
    and newer), fp16 with a gradient scaler on older GPUs (V100, T4: their bf16 is emulated and
    slow), fp32 on CPU and MPS. `what` names the setting in error messages."""
    device = select_device(device_setting, "run.device" if what.startswith("train.") else "--device")
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
