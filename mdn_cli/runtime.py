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
        """A batch of uint8 images (N, 3, S, S), moved to the device in its preferred layout."""
        batch = batch.to(self.device, non_blocking=True)
        return batch.contiguous(memory_format=torch.channels_last) if self.channels_last and batch.ndim == 4 else batch

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model


def select_device(setting: str) -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU; an explicit device that is absent is an error."""
    if setting == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"run.device: {setting} requested but no CUDA GPU is available; use run.device: auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"run.device: {setting} requested but only {torch.cuda.device_count()} GPU(s) exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("run.device: mps requested but MPS is not available; use run.device: auto or cpu")
    return device


def select_runtime(device_setting: str, precision: str = "auto") -> Runtime:
    device = select_device(device_setting)
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            raise ConfigError(f"train.precision: {precision} needs a CUDA GPU; use auto or fp32 on {device.type}")
        return Runtime(device, None)
    if precision == "fp32":
        return Runtime(device, None)
    bf16_ok = torch.cuda.is_bf16_supported()
    if precision == "bf16" and not bf16_ok:
        raise ConfigError("train.precision: bf16 is not supported by this GPU; use auto or fp16")
    if precision == "fp16" or not bf16_ok:
        return Runtime(device, torch.float16)
    return Runtime(device, torch.bfloat16)
