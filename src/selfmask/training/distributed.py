"""Multi-process training with PyTorch's own distributed engine (``torchrun``, ``env://``).

``torchrun --nproc_per_node N -m selfmask adapt ...`` starts N processes with
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` set;
:func:`init_distributed` joins them into one process group (NCCL on GPUs, gloo on
CPUs). The conventions of the training loop:

* ``batch_size`` is the *global* batch. Every process walks the same epoch
  permutation and takes its contiguous slice of each global batch
  (:func:`local_slice`), so the data order does not depend on the world size.
* Gradients are averaged by :class:`~torch.nn.parallel.DistributedDataParallel`
  (over the trainable parameters only: the scores and a head for masked models),
  so every process holds the same scores after every step.
* BatchNorm statistics are per process by default (each process normalises its own
  slice; DDP broadcasts rank 0's running statistics at every forward pass), as in
  most DDP recipes. ``TrainConfig.sync_bn`` converts BatchNorms to SyncBatchNorm
  (GPU only: PyTorch has no CPU SyncBatchNorm), whose statistics run over the global
  batch. With ``bn="eval"`` (frozen statistics) there are no batch statistics and an
  N-process run computes what one process computes on the global batch.
* Sinkhorn-Knopp all-reduces its prototype sums across processes by itself
  (:func:`~selfmask.objectives.sinkhorn.resolve_all_reduce`), so codes are those of
  the global batch.
* Only rank 0 writes files (run folder, checkpoints); every rank reads a checkpoint
  to resume. Random augmentation draws come from a per-rank generator.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from selfmask.errors import SelfmaskError


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def device(self) -> torch.device:
        """Where collective tensors live: the current GPU under NCCL, else the CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and logs (rank 0)."""
        return self.rank == 0


SINGLE = DistContext()


def env_world_size() -> int:
    """``WORLD_SIZE`` set by ``torchrun`` (1 when unset)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise SelfmaskError(f"environment variable WORLD_SIZE={raw!r} is not an integer") from None


def current_context() -> DistContext:
    """The context of an already initialised default process group (else a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
        backend=str(dist.get_backend()),
    )


def init_distributed(device: str) -> DistContext:
    """Join the process group ``torchrun`` describes in the environment; a single process otherwise.

    The backend is NCCL for ``cuda`` devices and gloo for the CPU. On a GPU each
    process uses ``cuda:LOCAL_RANK``. An already initialised group is reused.

    Raises:
        SelfmaskError: CUDA asked for where there is none, fewer GPUs than local
            processes, or torch.distributed missing.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SelfmaskError(f"device {device!r} was asked for, but CUDA is not available on this machine")
    if dist.is_available() and dist.is_initialized():
        return current_context()
    if env_world_size() <= 1:
        return SINGLE
    if not dist.is_available():
        raise SelfmaskError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise SelfmaskError(
                f"process LOCAL_RANK={local_rank} needs a GPU, but this machine has {torch.cuda.device_count()}; "
                "start at most one process per GPU (torchrun --nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://")
    return current_context()


def training_device(device: str, ctx: DistContext) -> str:
    """The device this process trains on: ``cuda:LOCAL_RANK`` for a distributed GPU run."""
    dev = torch.device(device)
    if ctx.enabled and dev.type == "cuda":
        return f"cuda:{ctx.local_rank}"
    return device


def check_world(ctx: DistContext, batch_size: int, num_items: int, what: str = "training set") -> int:
    """The per-process batch; raise before training when the world size cannot split the work.

    Raises:
        SelfmaskError: more processes than samples, or a global batch the world size
            does not divide.
    """
    if ctx.world_size > num_items:
        raise SelfmaskError(
            f"{ctx.world_size} processes but the {what} has only {num_items} images; "
            "start at most as many processes as there are images"
        )
    if batch_size % ctx.world_size:
        raise SelfmaskError(
            f"batch_size={batch_size} (the global batch) is not divisible by the {ctx.world_size} processes; "
            f"choose a multiple of {ctx.world_size}"
        )
    return batch_size // ctx.world_size


def local_slice(batch: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This process's contiguous part of a global batch of indices (equal parts)."""
    if not ctx.enabled:
        return batch
    per = len(batch) // ctx.world_size
    return batch[ctx.rank * per : (ctx.rank + 1) * per]


def rank_seed(seed: int, ctx: DistContext) -> int:
    """Seed of this process's augmentation generator (rank 0 keeps ``seed``: one process is unchanged)."""
    return seed + 1_000_003 * ctx.rank


def wrap_ddp(module: nn.Module, ctx: DistContext, find_unused_parameters: bool = False) -> nn.Module:
    """``module`` under :class:`~torch.nn.parallel.DistributedDataParallel` when distributed.

    DDP averages the gradients of the trainable parameters (frozen weights of a
    masked model are not communicated) and broadcasts rank 0's parameters and
    buffers at construction, so every process starts from the same state.
    """
    if not ctx.enabled or not any(p.requires_grad for p in module.parameters()):
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = None
    first = next(module.parameters())
    if first.device.type == "cuda":
        device_ids = [first.device.index]
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def to_sync_batchnorm(module: nn.Module, ctx: DistContext, device: str) -> nn.Module:
    """BatchNorms of ``module`` as SyncBatchNorm (statistics over the global batch).

    Call before masking (masks and the ``bn="eval"`` hooks then sit on the
    converted modules). A no-op for a single process.

    Raises:
        SelfmaskError: on a CPU (PyTorch's SyncBatchNorm runs on GPUs only).
    """
    if not ctx.enabled:
        return module
    if torch.device(device).type != "cuda":
        raise SelfmaskError("sync_bn: PyTorch's SyncBatchNorm runs on GPUs only; use per-process BatchNorm on a CPU")
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum of ``values`` over processes (a new tensor; the input itself when not distributed)."""
    if not ctx.enabled:
        return values
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_rows(rows: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenate the ``rows`` of every process in rank order; the parts may differ in length.

    Used to gather k-NN features: each process embeds its shard of a dataset
    (:func:`shard_range`) and every process receives the whole bank.
    """
    if not ctx.enabled:
        return rows
    count = torch.tensor([rows.shape[0]], dtype=torch.long, device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(ctx.world_size)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    longest = max(sizes)
    padded = rows.new_zeros((longest, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def shard_range(num_items: int, ctx: DistContext) -> range:
    """The items ``[start, stop)`` this process handles when a dataset is split in contiguous shards."""
    per = -(-num_items // ctx.world_size)
    start = min(num_items, ctx.rank * per)
    return range(start, min(num_items, start + per))


def all_gather_states(state: torch.Tensor, ctx: DistContext) -> list[torch.Tensor]:
    """Every process's copy of an equally shaped CPU byte tensor (random-generator states)."""
    if not ctx.enabled:
        return [state]
    local = state.to(ctx.device)
    parts = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(parts, local)
    return [p.cpu() for p in parts]


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def broadcast_flag(flag: bool, ctx: DistContext) -> bool:
    """Whether rank 0's ``flag`` is set (the decision of rank 0 for every process)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def shutdown(ctx: DistContext) -> None:
    """Leave the process group if this process joined one."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


__all__ = [
    "SINGLE",
    "DistContext",
    "all_gather_rows",
    "all_gather_states",
    "all_reduce_sum",
    "barrier",
    "broadcast_flag",
    "check_world",
    "current_context",
    "env_world_size",
    "init_distributed",
    "local_slice",
    "rank_seed",
    "shard_range",
    "shutdown",
    "to_sync_batchnorm",
    "training_device",
    "wrap_ddp",
]
