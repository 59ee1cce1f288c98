"""Self-supervised masking: the SwAV objective over multi-crop views (METHOD.md section 2).

``adapt_swav`` trains masks (a self-masking network, SMN) or all weights (SwAV
pretraining, ``method="fft"``) with no labels. The projection head and prototypes
train with their own learning rate and are dropped afterwards. Same run folder,
progress, metrics and NaN/Ctrl-C handling as the supervised loop.
"""

from __future__ import annotations

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
from selfmask.training.loop import LoopSpec, run_epochs
from selfmask.training.run_folder import RunFolder
from selfmask.training.schedule import make_scheduler
from selfmask.training.trainer import (
    TrainResult,
    make_optimizer,
    prepare_backbone,
    resolve_device,
    save_trained,
    write_run_config,
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


def _embed_crops(backbone: nn.Module, crops: list[torch.Tensor]) -> list[torch.Tensor]:
    """Backbone embeddings of every crop, one forward pass per crop resolution."""
    out: list[torch.Tensor] = []
    i = 0
    while i < len(crops):
        j = i
        while j < len(crops) and crops[j].shape[-2:] == crops[i].shape[-2:]:
            j += 1
        emb = backbone(torch.cat(crops[i:j]))
        out.extend(emb.split(crops[i].shape[0]))
        i = j
    return out


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
    dev = resolve_device(cfg.device)
    crops = crops or MultiCrop.for_input_size(train_set.resolution, seed=cfg.seed, mean=info.mean, std=info.std)
    n = len(train_set)
    bs = min(cfg.batch_size, n)
    if bs < 2:
        raise SelfmaskError(f"SwAV needs batches of at least 2 images; the training set has {n}")
    validate_queue(swav, n, bs)
    torch.manual_seed(cfg.seed)
    mcfg, groups = prepare_backbone(backbone, info, cfg)
    objective = SwAVObjective(info.embed_dim, swav)
    backbone.to(dev)
    objective.to(dev)
    opt = make_optimizer(groups + objective.param_groups(), cfg.momentum)
    steps_per_epoch = max(1, n // bs)
    sched = make_scheduler(opt, steps_per_epoch * cfg.epochs, round(cfg.warmup_epochs * steps_per_epoch))
    if run is not None and not resume:
        write_run_config(run, info, train_set, 0, cfg, mcfg, run_meta, swav=swav.to_dict(), crops=_crops_dict(crops))
    log.info(
        "adapt (SwAV): method=%s backbone=%s images=%d batch=%d epochs=%d lr=%g prototypes=%d device=%s",
        cfg.method, info.name, n, bs, cfg.epochs, cfg.resolved_lr, swav.num_prototypes, dev,
    )
    gen = torch.Generator().manual_seed(cfg.seed)

    def step_fn(idx: torch.Tensor, epoch: int, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        x = train_set.images[idx].to(dev, non_blocking=True)
        loss, _stats = objective(_embed_crops(backbone, crops(x, generator=gen)), epoch=epoch, iteration=step)
        return loss, {"loss": float(loss.detach()) * len(idx), "seen": len(idx)}

    def set_mode() -> None:
        backbone.train()
        objective.train()

    def epoch_row(sums: dict[str, float]) -> dict[str, Any]:
        usage = objective.prototype_usage()
        row: dict[str, Any] = {"loss": sums["loss"] / sums["seen"], "prototypes_used": usage["used_fraction"]}
        if mcfg is not None:
            row["fraction_active"] = mask_summary(backbone).fraction_active
        warning = collapse_warning(row["loss"], swav.num_prototypes, **usage)
        if warning:
            row["collapse_warning"] = warning
            log.warning("%s", warning)
        if online_eval is not None and (len(history_ref) + 1) % online_eval.every == 0:
            row["online_knn"] = _online_knn(backbone, info, online_eval, cfg.device)
        history_ref.append(None)
        return row

    history_ref: list[None] = []
    spec = LoopSpec(
        num_items=n, batch_size=bs, epochs=cfg.epochs, seed=cfg.seed, optimizer=opt, scheduler=sched, generator=gen,
        modules={"backbone": backbone, "objective": objective}, set_train_mode=set_mode, epoch_row=epoch_row,
        after_step=objective.after_optimizer_step, extra_state={"assignment_counts": objective.assignment_counts},
        checkpoint_every=cfg.checkpoint_every, desc=f"SwAV {cfg.method}", progress=progress,
    )
    history, step = run_epochs(spec, step_fn, run=run, resume=resume, on_epoch=on_epoch,
                               config_fingerprint={"train": cfg.to_dict(), "swav": swav.to_dict()})
    result = TrainResult(backbone, None, cfg, mcfg, history, None)
    if run is not None:
        save_trained(result, run)
        run.set_status("trained", epoch=len(history), step=step, total_epochs=cfg.epochs)
    return result


def _online_knn(backbone: nn.Module, info: BackboneInfo, ev: OnlineEval, device: str) -> float:
    from selfmask.evaluation import extract_features, knn_accuracy

    fb = extract_features(backbone, ev.bank, info.mean, info.std, device=device)
    fq = extract_features(backbone, ev.queries, info.mean, info.std, device=device)
    res = knn_accuracy(fb, ev.bank.labels, fq, ev.queries.labels, num_classes=ev.bank.num_classes, k=ev.k,
                       temperature=ev.temperature)
    backbone.train()
    return res.accuracy


def _crops_dict(crops: Any) -> dict[str, Any]:
    cfg = getattr(crops, "config", None)
    if cfg is None:
        return {"type": type(crops).__name__}
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items() if not (isinstance(v, float) and math.isnan(v))}
