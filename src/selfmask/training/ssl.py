"""Self-supervised masking: the SwAV objective over multi-crop views (METHOD.md section 2).

``adapt_swav`` trains masks (a self-masking network, SMN) or all weights (SwAV
pretraining, ``method="fft"``) with no labels. The projection head and prototypes
train with their own learning rate and are dropped afterwards. Same run folder,
progress, metrics and NaN/Ctrl-C handling as the supervised loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from selfmask.backbones.registry import BackboneInfo
from selfmask.data.base import ImageTensorDataset
from selfmask.errors import SelfmaskError
from selfmask.masking import mask_summary
from selfmask.objectives import SwAVConfig, SwAVObjective, collapse_warning, validate_queue
from selfmask.training.config import TrainConfig
from selfmask.training.distributed import (
    DistContext,
    all_gather_rows,
    all_reduce_sum,
    check_world,
    current_context,
    rank_seed,
    shard_range,
    to_sync_batchnorm,
    training_device,
)
from selfmask.training.identity import with_run_identity
from selfmask.training.loop import LoopSpec, run_epochs
from selfmask.training.run_folder import RunFolder, write_run_config
from selfmask.training.schedule import make_scheduler
from selfmask.training.trainer import (
    TrainResult,
    autocast_for,
    make_optimizer,
    prepare_backbone,
    prepare_input,
    resolve_device,
    save_trained,
    speed_setup,
    wrap_for_training,
)

log = logging.getLogger("selfmask.train")


@dataclass
class OnlineEval:
    """k-NN on a held-out labelled split every ``every`` epochs, to watch progress (never for selection)."""

    bank: ImageTensorDataset
    queries: ImageTensorDataset
    every: int = 1
    k: int = 20
    temperature: float = 0.07


def _embed_crops(backbone: nn.Module, crops: list[torch.Tensor], cfg: TrainConfig | None = None) -> list[torch.Tensor]:
    """Backbone embeddings of every crop, one forward pass per crop resolution."""
    out: list[torch.Tensor] = []
    i = 0
    while i < len(crops):
        j = i
        while j < len(crops) and crops[j].shape[-2:] == crops[i].shape[-2:]:
            j += 1
        batch = torch.cat(crops[i:j])
        emb = backbone(prepare_input(batch, cfg) if cfg is not None else batch)
        out.extend(emb.float().split(crops[i].shape[0]))
        i = j
    return out


class SwAVModel(nn.Module):
    """Backbone + SwAV objective as one module (one DistributedDataParallel over both)."""

    def __init__(self, backbone: nn.Module, objective: SwAVObjective, cfg: TrainConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.objective = objective
        self.cfg = cfg

    def forward(self, crops: list[torch.Tensor], epoch: int, iteration: int) -> tuple[torch.Tensor, dict[str, float]]:
        warmup = iteration < self.objective.cfg.freeze_backbone_iters  # head warm-up: no gradient reaches the backbone
        with torch.no_grad() if warmup else contextlib.nullcontext():  # so no graph is recorded for it either
            embeddings = _embed_crops(self.backbone, crops, self.cfg)
        return self.objective(embeddings, epoch=epoch, iteration=iteration)


def adapt_swav(
    backbone: nn.Module,
    info: BackboneInfo,
    train_set: ImageTensorDataset,
    cfg: TrainConfig,
    swav: SwAVConfig | None = None,
    *,
    crops: Any = None,
    run: RunFolder | None = None,
    run_meta: dict[str, Any] | None = None,
    progress: bool = True,
    online_eval: OnlineEval | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train with SwAV; labels of ``train_set`` are never read.

    Args:
        crops: a ``selfmask.data.multicrop.MultiCrop`` (default: the paper's 2 large +
            6 small crops, sizes scaled to the backbone's input size).
        swav: the SwAV recipe (default: the paper's, 500 prototypes, queue of 512
            from epoch 30).
    """
    from selfmask.data.multicrop import MultiCrop

    if cfg.method not in ("mask", "topk", "fft"):
        raise SelfmaskError(f"self-supervised training needs method mask, topk or fft, got {cfg.method!r}")
    swav = swav or SwAVConfig()
    ctx = current_context()
    dev = resolve_device(training_device(cfg.device, ctx))
    crops = crops or MultiCrop.for_input_size(train_set.resolution, seed=cfg.seed, mean=info.mean, std=info.std)
    n = len(train_set)
    bs = min(cfg.batch_size, n)
    if bs < 2:
        raise SelfmaskError(f"SwAV needs batches of at least 2 images; the training set has {n}")
    validate_queue(swav, n, bs)
    check_world(ctx, bs, n)
    if cfg.sync_bn:
        backbone = to_sync_batchnorm(backbone, ctx, cfg.device)
    torch.manual_seed(cfg.seed)
    mcfg, groups = prepare_backbone(backbone, info, cfg)
    objective = SwAVObjective(info.embed_dim, swav)
    backbone.to(dev)
    objective.to(dev)
    speed_setup(backbone, cfg)
    # prototypes frozen for the first iterations take no part in the graph: DDP must look for unused ones
    model = wrap_for_training(SwAVModel(backbone, objective, cfg), cfg, ctx,
                              find_unused=swav.freeze_prototypes_iters > 0)
    opt = make_optimizer(groups + objective.param_groups(), cfg.momentum)
    steps_per_epoch = max(1, n // bs)
    sched = make_scheduler(opt, steps_per_epoch * cfg.epochs, round(cfg.warmup_epochs * steps_per_epoch))
    if run is not None and not resume and ctx.is_main:
        write_run_config(run, info, train_set, 0, cfg, mcfg, run_meta, swav=swav.to_dict(), crops=_crops_dict(crops))
    log.info(
        "adapt (SwAV): method=%s backbone=%s images=%d batch=%d epochs=%d lr=%g prototypes=%d device=%s processes=%d",
        cfg.method, info.name, n, bs, cfg.epochs, cfg.resolved_lr, swav.num_prototypes, dev, ctx.world_size,
    )
    gen = torch.Generator().manual_seed(rank_seed(cfg.seed, ctx))

    def step_fn(idx: torch.Tensor, epoch: int, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        x = train_set.images[idx].to(dev, non_blocking=True)
        views = crops(x, generator=gen)
        with autocast_for(cfg, dev):
            loss, _stats = model(views, epoch, step)
        return loss, {"loss": float(loss.detach()) * len(idx), "seen": len(idx)}

    def set_mode() -> None:
        backbone.train()
        objective.train()

    def epoch_row(sums: dict[str, float]) -> dict[str, Any]:
        if ctx.enabled:  # prototype usage over the global batches of the epoch
            objective.assignment_counts.copy_(all_reduce_sum(objective.assignment_counts, ctx))
        usage = objective.prototype_usage()
        row: dict[str, Any] = {"loss": sums["loss"] / sums["seen"], "prototypes_used": usage["used_fraction"]}
        if mcfg is not None:
            row["fraction_active"] = mask_summary(backbone).fraction_active
        warning = collapse_warning(row["loss"], swav.num_prototypes, **usage)
        if warning:
            row["collapse_warning"] = warning
            log.warning("%s", warning)
        if online_eval is not None and (len(history_ref) + 1) % online_eval.every == 0:
            row["online_knn"] = _online_knn(backbone, info, online_eval, str(dev), ctx)
        history_ref.append(None)
        return row

    history_ref: list[None] = []
    spec = LoopSpec(
        num_items=n, batch_size=bs, epochs=cfg.epochs, seed=cfg.seed, optimizer=opt, scheduler=sched, generator=gen,
        modules={"backbone": backbone, "objective": objective}, set_train_mode=set_mode, epoch_row=epoch_row,
        after_step=objective.after_optimizer_step, extra_state={"assignment_counts": objective.assignment_counts},
        checkpoint_every=cfg.checkpoint_every, desc=f"SwAV {cfg.method}", progress=progress and ctx.is_main, dist=ctx,
    )
    history, step = run_epochs(spec, step_fn, run=run, resume=resume, on_epoch=on_epoch,
                               config_fingerprint=with_run_identity({"train": cfg.to_dict(), "swav": swav.to_dict()},
                                                                     info.name, run_meta, _crops_dict(crops)))
    result = TrainResult(backbone, None, cfg, mcfg, history, None)
    if run is not None and ctx.is_main:
        save_trained(result, run)
        run.set_status("trained", epoch=len(history), step=step, total_epochs=cfg.epochs)
    return result


def _online_knn(backbone: nn.Module, info: BackboneInfo, ev: OnlineEval, device: str, ctx: DistContext) -> float:
    from selfmask.evaluation import extract_features, knn_accuracy

    fb = gather_features(backbone, ev.bank, info, device, ctx, extract_features)
    fq = gather_features(backbone, ev.queries, info, device, ctx, extract_features)
    res = knn_accuracy(fb, ev.bank.labels, fq, ev.queries.labels, num_classes=ev.bank.num_classes, k=ev.k,
                       temperature=ev.temperature)
    backbone.train()
    return res.accuracy


def gather_features(
    backbone: nn.Module, dataset: ImageTensorDataset, info: BackboneInfo, device: str, ctx: DistContext,
    extract: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """Features of all of ``dataset``: each process embeds its contiguous shard, every process gets all rows.

    ``extract(backbone, dataset, mean, std, device=...)`` embeds one dataset (e.g.
    :func:`selfmask.evaluation.extract_features`). A single process embeds everything.
    """
    if not ctx.enabled:
        return extract(backbone, dataset, info.mean, info.std, device=device)
    part = shard_range(len(dataset), ctx)
    idx = torch.arange(part.start, part.stop, dtype=torch.long)
    if len(idx):
        local = extract(backbone, dataset.subset(idx), info.mean, info.std, device=device)
    else:  # more processes than items: an empty part of the right width
        local = extract(backbone, dataset.subset(torch.arange(1)), info.mean, info.std, device=device)[:0]
    return all_gather_rows(local.to(ctx.device), ctx).to(local.device)


def _crops_dict(crops: Any) -> dict[str, Any]:
    cfg = getattr(crops, "config", None)
    if cfg is None:
        return {"type": type(crops).__name__}
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items() if not (isinstance(v, float) and math.isnan(v))}
