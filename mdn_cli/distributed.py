"""Data-parallel training under torchrun: one process per device, DistributedDataParallel.

`torchrun --nproc_per_node=N -m mdn_cli train config.yaml` sets RANK/WORLD_SIZE/LOCAL_RANK;
without them everything here is a no-op for a single process. Backend: nccl on CUDA, gloo on CPU.

What makes N processes train the same model as one process with the same global batch:
- each process gets an interleaved share of the same seeded permutation (SeededSampler);
- gradients are averaged by DistributedDataParallel (bucketed, overlapped with backward);
- BatchNorm layers compute their batch statistics over the global batch (torch's SyncBatchNorm
  on GPUs, `GlooSyncBatchNorm` below on CPUs, where torch's has no kernels);
- the loss of each process is its share of the global batch mean (`Dist.sum` of the counts);
- dropout masks come from per-sample seeds, not from a process's random stream.
Decoded images and cached backbone features are held once per machine (`machine_tensor`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from . import interrupts


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over all processes."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def check_stop(self) -> None:
        """A safe point every process reaches together: all of them stop if any was asked to."""
        interrupts.stop_if(bool(self.sum([1.0 if interrupts.requested() else 0.0])[0]))

    def all_true(self, flag: bool) -> bool:
        """True only if `flag` is true on every process (keeps collective decisions in step)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item() > 0)

    def wrap(self, module: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
        """`module` in DistributedDataParallel (a no-op for one process). DDP broadcasts rank 0's
        parameters and buffers when it is built, so every process starts from the same weights."""
        if not self.enabled:
            return module
        return nn.parallel.DistributedDataParallel(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
        )

    def machine_tensor(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A zero-filled CPU tensor that all processes of this machine share (one copy per
        machine, not one per process). Writes by any of them, or by their loader workers, are
        seen by all. For one process: ordinary shared memory."""
        if self.local_world_size <= 1:
            return torch.zeros(shape, dtype=dtype).share_memory_()
        numel = 1
        for n in shape:
            numel *= n
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        folder = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
        path = folder / f"mdn-{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}-{os.environ.get('MASTER_PORT', '0')}-{name}.bin"
        if self.local_rank == 0:
            with open(path, "wb") as f:
                f.truncate(nbytes)  # sparse zeros: memory is used only where written
        self.barrier()
        tensor = torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)
        self.barrier()
        if self.local_rank == 0:
            path.unlink()  # every process has it mapped; the memory goes when the last one exits, even on a crash
        return tensor


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def init_distributed(device_type: str) -> Dist:
    """Join the torchrun process group when launched by torchrun; a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    if device_type == "cpu":
        # N processes on one machine share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))
    return Dist(rank, world_size, local_rank, local_world_size)


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# BatchNorm over the global batch


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm layer of `model` by one whose batch statistics span all processes.
    Parameters and buffers are kept (same objects), so state dicts keep their keys."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert(model)


def _convert(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlooSyncBatchNorm):
        new = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, _convert(child))
    return module


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics are those of the batch of all processes, for CPU
    process groups (torch's SyncBatchNorm needs GPU kernels). Differentiable: the statistics are
    summed over processes by an all-reduce whose backward sums the gradients back.
    Two passes in float64 (mean, then the spread around it), like cuDNN's numerics."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() // x.shape[1]], dtype=torch.float64)
        totals = _AllReduceSum.apply(torch.cat([x.double().sum(dims), count]))
        n = totals[-1]
        mean = totals[:-1] / n
        centred = x.double() - mean.view(shape)
        var = _AllReduceSum.apply(centred.pow(2).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_((var * n / (n - 1).clamp_min(1)).to(self.running_var.dtype), momentum)
        y = (centred * torch.rsqrt(var + self.eps).view(shape)).to(x.dtype)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes, differentiable: the gradient of every process's input is the sum of
    the gradients of every process's output."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad
