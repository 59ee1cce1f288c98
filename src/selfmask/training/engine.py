"""One training engine for every objective: supervised masking, top-k, FFT, linear heads,
self-supervised masking (SwAV, ...) and pretraining.

:func:`train` runs any :class:`~selfmask.objectives.base.Objective` (the contract is that
module's docstring) over a dataset of images::

    backbone, objective, mcfg, groups = prepare_training(backbone, info, cfg, make_objective)
    history, steps = train(backbone, objective, dataset, cfg, param_groups=groups, run=run)

The engine owns what is the same for every objective: the device, fast-path options
(channels-last, flat masks, ``torch.compile``), DDP, the SGD optimiser over the
backbone's groups and the objective's, the warm-up/cosine schedule, mixed precision, and
(through :func:`selfmask.training.loop.run_epochs`) the data order, epochs, checkpoints and
resume, SIGINT/SIGTERM, NaN stops, progress and the run folder's status and metrics.
``selfmask.training.trainer.adapt`` (supervised), ``selfmask.training.ssl.adapt_ssl``
(SwAV and other self-supervised objectives) and ``selfmask.training.pretrain`` are thin
wrappers that build an objective and call :func:`train`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from selfmask.backbones.registry import BackboneInfo
from selfmask.data.base import ImageTensorDataset
from selfmask.errors import SelfmaskError
from selfmask.io import atomic_save_safetensors
from selfmask.masking import MaskConfig, is_masked, mask_model, mask_scores, mask_summary
from selfmask.masking.model import enable_fast_masks
from selfmask.objectives.base import Objective
from selfmask.training.config import TrainConfig
from selfmask.training.distributed import (
    DistContext,
    check_world,
    current_context,
    rank_seed,
    to_sync_batchnorm,
    training_device,
    wrap_ddp,
)
from selfmask.training.loop import LoopSpec, run_epochs, steps_per_epoch
from selfmask.training.schedule import make_scheduler

log = logging.getLogger("selfmask.train")


@dataclass
class TrainResult:
    backbone: nn.Module
    head: nn.Module | None
    config: TrainConfig
    mask_config: MaskConfig | None
    history: list[dict[str, Any]] = field(default_factory=list)
    train_indices: torch.Tensor | None = None  # the labelled subset used, if any


def resolve_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SelfmaskError(f"device {str(device)!r} was asked for, but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise SelfmaskError(f"unsupported device {str(device)!r}; expected cpu or cuda[:N]")
    return dev


def prepare_backbone(
    backbone: nn.Module, info: BackboneInfo, cfg: TrainConfig
) -> tuple[MaskConfig | None, list[dict[str, Any]]]:
    """Masks (mask/topk), everything trainable (fft) or everything frozen (linear); SGD param groups."""
    mcfg = cfg.mask_config(info.mask_preset)
    lr, wd = cfg.resolved_lr, cfg.resolved_weight_decay
    groups: list[dict[str, Any]] = []
    if mcfg is not None:
        mask_model(backbone, mcfg)
        if cfg.init_from is not None:
            load_scores_into(backbone, cfg.init_from)
        groups.append({"params": list(mask_scores(backbone).values()), "lr": lr, "weight_decay": wd, "name": "scores"})
    elif cfg.method == "fft":
        for p in backbone.parameters():
            p.requires_grad_(True)
        groups.append({"params": list(backbone.parameters()), "lr": lr, "weight_decay": wd, "name": "backbone"})
    else:  # linear
        for p in backbone.parameters():
            p.requires_grad_(False)
    return mcfg, groups


def load_scores_into(backbone: nn.Module, run_dir: str) -> None:
    """Copy a run folder's scores (and BatchNorm buffers) into an already masked ``backbone``."""
    from selfmask.training.run_folder import load_scores_and_buffers

    load_scores_and_buffers(backbone, run_dir)


def prepare_training(
    backbone: nn.Module, info: BackboneInfo, cfg: TrainConfig, make_objective: Callable[[], Objective]
) -> tuple[nn.Module, Objective, MaskConfig | None, list[dict[str, Any]]]:
    """The set-up every ``adapt`` shares, in the order that fixes the random numbers.

    SyncBatchNorm (``cfg.sync_bn``, before masking), ``torch.manual_seed(cfg.seed)``, the
    objective's new modules (``make_objective()``: heads, prototypes, a teacher; they draw
    their initial values from that seed), then the backbone for ``cfg.method``
    (:func:`prepare_backbone`, which draws nothing from the global generator).

    Returns:
        ``(backbone, objective, mask_config, backbone_param_groups)``.
    """
    if cfg.sync_bn:
        backbone = to_sync_batchnorm(backbone, current_context(), cfg.device)
    torch.manual_seed(cfg.seed)
    objective = make_objective()
    mcfg, groups = prepare_backbone(backbone, info, cfg)
    return backbone, objective, mcfg, groups


def speed_setup(backbone: nn.Module, cfg: TrainConfig, *extra: nn.Module) -> None:
    """The fast-path options that change modules in place: channels-last storage and flat masks.

    Under ``cfg.compile`` the masks keep the per-layer path, which ``torch.compile`` traces and
    fuses: the flat path's cache lookup is Python keyed by an integer per layer, on which
    ``torch.compile`` recompiles once per masked layer until its recompile limit (then eager).
    """
    if cfg.channels_last:
        backbone.to(memory_format=torch.channels_last)
    if cfg.fast_masks and not cfg.compile:
        for module in (backbone, *extra):
            if is_masked(module):
                enable_fast_masks(module)


def wrap_for_training(
    model: nn.Module, cfg: TrainConfig, ctx: DistContext, find_unused: bool = False
) -> nn.Module:
    """``model`` under DDP (distributed runs) and ``torch.compile`` (``cfg.compile``)."""
    model = wrap_ddp(model, ctx, find_unused_parameters=find_unused)
    if cfg.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    return model


@contextlib.contextmanager
def autocast_for(cfg: TrainConfig, dev: torch.device) -> Iterator[None]:
    """bfloat16 autocast around a forward pass when ``cfg.precision == "bf16"``."""
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        yield


def make_optimizer(groups: list[dict[str, Any]], momentum: float) -> torch.optim.SGD:
    return torch.optim.SGD([{k: v for k, v in g.items() if k != "name"} for g in groups], momentum=momentum)


class ChannelsLast(nn.Module):
    """``backbone`` fed channels-last inputs (``cfg.channels_last``), as the objective sees it."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.inner = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)


class ObjectiveStep(nn.Module):
    """Backbone + objective as one module, so one DistributedDataParallel (and one
    ``torch.compile``) covers every trainable parameter: ``forward`` is ``objective.step``."""

    def __init__(self, backbone: nn.Module, objective: Objective, channels_last: bool = False) -> None:
        super().__init__()
        self.backbone = ChannelsLast(backbone) if channels_last else backbone
        self.objective = objective

    def forward(
        self, views: Any, labels: torch.Tensor | None, epoch: int, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return self.objective.step(self.backbone, views, labels, epoch=epoch, step=step)


def train(
    backbone: nn.Module,
    objective: Objective,
    data: ImageTensorDataset,
    cfg: TrainConfig,
    *,
    param_groups: list[dict[str, Any]] | None = None,
    drop_last: bool = True,
    run: Any = None,
    resume: bool = False,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    write_config: Callable[[], None] | None = None,
    epoch_extra: Callable[[int], dict[str, Any]] | None = None,
    fingerprint: dict[str, Any] | None = None,
    desc: str = "train",
    order: Callable[[int], torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    dist: DistContext | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Train ``backbone`` (and ``objective``'s modules) with ``objective`` on ``data``.

    Args:
        backbone: prepared for its method (masks attached, or weights trainable/frozen).
        objective: anything satisfying :class:`~selfmask.objectives.base.Objective`.
        data: the training images (and labels, read only when ``objective.needs_labels``).
        cfg: the run's settings; the engine reads the shared ones: ``epochs``, ``batch_size``,
            ``seed`` (data order, augmentation), ``momentum``, ``warmup_epochs``,
            ``checkpoint_every``, ``device``, ``precision``, ``channels_last``, ``compile``,
            ``fast_masks``, ``resolved_lr`` (passed to ``objective.param_groups``) and ``method``
            (``linear`` keeps the backbone in eval mode: a linear probe reads BatchNorm
            running statistics as at evaluation).
        param_groups: the backbone's SGD groups (scores, or all weights); the objective's
            ``param_groups(cfg.resolved_lr)`` are appended after them.
        drop_last: drop the last partial batch (BatchNorm); ``False`` trains on it too.
        run: a :class:`~selfmask.training.run_folder.RunFolder` (rank 0 writes status,
            metrics, log and checkpoints), or ``None``.
        resume: continue from ``run``'s ``checkpoint.pt`` (checked against ``fingerprint``).
        write_config: called once on rank 0 before the first step of a fresh (not resumed)
            run, after the set-up checks passed: writes the run's ``config.json``.
        epoch_extra: ``epoch_extra(epoch)`` (1-based) adds entries to an epoch's metrics row
            (e.g. an online k-NN).
        fingerprint: the settings a checkpoint must match to be resumed.
        order: a custom data order per epoch (default: a function of seed and epoch).
        generator: the augmentation generator (default: seeded with the run's seed, per rank).
        dist: the distributed context (default: the initialised process group, if any).

    Returns:
        ``(history, steps)``: one metrics row per epoch, and the optimiser steps taken.

    Raises:
        TrainingDiverged: the loss became NaN/Inf.
        StopRequested: SIGINT/SIGTERM (a checkpoint is written first when ``run`` is given).
    """
    ctx = current_context() if dist is None else dist
    dev = resolve_device(training_device(cfg.device, ctx))
    n = len(data)
    bs = min(cfg.batch_size, n)
    check_world(ctx, bs, n)
    backbone.to(dev)
    objective.to(dev)
    speed_setup(backbone, cfg, objective)
    model = wrap_for_training(ObjectiveStep(backbone, objective, cfg.channels_last), cfg, ctx,
                              find_unused=bool(getattr(objective, "find_unused_parameters", False)))
    opt = make_optimizer(list(param_groups or []) + objective.param_groups(cfg.resolved_lr), cfg.momentum)
    per_epoch = steps_per_epoch(n, cfg.batch_size, drop_last)
    sched = make_scheduler(opt, per_epoch * cfg.epochs, round(cfg.warmup_epochs * per_epoch))
    gen = generator if generator is not None else torch.Generator().manual_seed(rank_seed(cfg.seed, ctx))
    masked = is_masked(backbone)
    images, labels = data.images, data.labels

    def step_fn(idx: torch.Tensor, epoch: int, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        x = images[idx].to(dev, non_blocking=True)
        y = labels[idx].to(dev, non_blocking=True) if objective.needs_labels else None
        views = objective.views(x, generator=gen)  # augmentation: outside autocast and DDP
        with autocast_for(cfg, dev):
            return model(views, y, epoch, step)

    def set_train_mode() -> None:
        backbone.train(cfg.method != "linear")
        objective.train()

    def epoch_row(sums: dict[str, float], epoch: int) -> dict[str, Any]:
        row = dict(objective.epoch_metrics(sums))
        if masked:
            row["fraction_active"] = mask_summary(backbone).fraction_active
        if epoch_extra is not None:
            row.update(epoch_extra(epoch))
        return row

    spec = LoopSpec(
        num_items=n, batch_size=cfg.batch_size, epochs=cfg.epochs, seed=cfg.seed, optimizer=opt, scheduler=sched,
        generator=gen, modules={"backbone": backbone, **objective.checkpoint_modules()},
        set_train_mode=set_train_mode, epoch_row=epoch_row,
        after_step=lambda step: objective.after_optimizer_step(backbone, step=step),
        extra_state=objective.extra_state(), checkpoint_every=cfg.checkpoint_every, desc=desc,
        progress=progress and ctx.is_main, dist=ctx, order=order, drop_last=drop_last,
    )
    if write_config is not None and run is not None and not resume and ctx.is_main:
        write_config()
    return run_epochs(spec, step_fn, run=run, resume=resume, on_epoch=on_epoch, config_fingerprint=fingerprint)


def save_trained(result: TrainResult, run: Any) -> None:
    """Write the trained state (scores or weights, and the head) into the run folder."""
    if result.mask_config is not None:
        atomic_save_safetensors(run.file("scores.safetensors"), {k: v for k, v in mask_scores(result.backbone).items()})
        # BatchNorm running statistics keep updating during mask training (bn="train"):
        # they are part of the adapted model, so they are stored beside the scores.
        atomic_save_safetensors(run.file("buffers.safetensors"), dict(result.backbone.named_buffers()))
    elif result.config.method == "fft":
        atomic_save_safetensors(run.file("weights.safetensors"), result.backbone.state_dict())
    if result.head is not None:
        head_state = {k: v for k, v in result.head.state_dict().items()}
        atomic_save_safetensors(run.file("head.safetensors"), head_state)


def finish(result: TrainResult, run: Any, steps: int) -> TrainResult:
    """Rank 0 writes the trained state into ``run`` and marks it ``trained``."""
    if run is not None and current_context().is_main:
        save_trained(result, run)
        run.set_status("trained", epoch=len(result.history), step=steps, total_epochs=result.config.epochs)
    return result


__all__ = [
    "ObjectiveStep",
    "TrainResult",
    "finish",
    "prepare_backbone",
    "prepare_training",
    "resolve_device",
    "save_trained",
    "speed_setup",
    "train",
]
