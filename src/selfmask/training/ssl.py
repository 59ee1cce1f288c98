"""Self-supervised masking: SwAV (and any other self-supervised objective of the registry)
over multi-crop views (METHOD.md section 2), a thin wrapper over the training engine.

``adapt_ssl`` trains masks (a self-masking network, SMN) or all weights (self-supervised
pretraining, ``method="fft"``) with no labels, with the objective ``cfg.objective`` names
(:mod:`selfmask.objectives.registry`). The objective's modules (SwAV's projection head
and prototypes) train with their own learning rate and are dropped afterwards. Same run
folder, progress, metrics and NaN/Ctrl-C handling as the supervised loop: it is the same
engine (:func:`selfmask.training.engine.train`).
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
from selfmask.objectives import SwAVConfig
from selfmask.objectives.registry import ObjectiveInputs, create_objective, default_crops, get_factory
from selfmask.training.config import TrainConfig
from selfmask.training.distributed import (
    DistContext,
    all_gather_rows,
    current_context,
    shard_range,
    training_device,
)
from selfmask.training.engine import TrainResult, finish, prepare_training, train
from selfmask.training.identity import with_run_identity
from selfmask.training.run_folder import RunFolder, write_run_config

log = logging.getLogger("selfmask.train")


@dataclass
class OnlineEval:
    """k-NN on a held-out labelled split every ``every`` epochs, to watch progress (never for selection)."""

    bank: ImageTensorDataset
    queries: ImageTensorDataset
    every: int = 1
    k: int = 20
    temperature: float = 0.07


def adapt_ssl(
    backbone: nn.Module,
    info: BackboneInfo,
    train_set: ImageTensorDataset,
    cfg: TrainConfig,
    settings: Any = None,
    *,
    objective: str | None = None,
    crops: Any = None,
    run: RunFolder | None = None,
    run_meta: dict[str, Any] | None = None,
    progress: bool = True,
    online_eval: OnlineEval | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train with a self-supervised objective; labels of ``train_set`` are never read.

    Args:
        settings: the objective's recipe (a ``SwAVConfig`` for SwAV; ``None``: its defaults).
        objective: a registered objective name (default: ``cfg.objective``).
        crops: a ``selfmask.data.multicrop.MultiCrop`` (default: the paper's 2 large +
            6 small crops, sizes scaled to the training images).
        online_eval: a k-NN on a labelled split every few epochs, added to the metrics.
    """
    name = cfg.objective if objective is None else objective
    if name == "supervised":
        raise SelfmaskError("adapt_ssl(): the supervised objective is trained by adapt()")
    get_factory(name)  # an unknown objective: one clear error before anything is set up
    if cfg.method not in ("mask", "topk", "fft"):
        raise SelfmaskError(f"self-supervised training needs method mask, topk or fft, got {cfg.method!r}")
    n = len(train_set)
    if min(cfg.batch_size, n) < 2:
        raise SelfmaskError(f"{name}: self-supervised training needs batches of at least 2 images; the training set has {n}")
    crops = crops or default_crops(ObjectiveInputs(info, train_set, cfg))  # made before the seed, as always
    check_crop_sizes(backbone, crops)
    inputs = ObjectiveInputs(info, train_set, cfg, settings, crops)
    backbone, obj, mcfg, groups = prepare_training(backbone, info, cfg, lambda: create_objective(name, inputs))
    recipe = obj.config_dict()
    ctx = current_context()
    log.info(
        "adapt (%s): method=%s backbone=%s images=%d batch=%d epochs=%d lr=%g device=%s processes=%d",
        name, cfg.method, info.name, n, min(cfg.batch_size, n), cfg.epochs, cfg.resolved_lr,
        training_device(cfg.device, ctx), ctx.world_size,
    )

    def online_knn(epoch: int) -> dict[str, Any]:
        if online_eval is None or epoch % online_eval.every:
            return {}
        return {"online_knn": _online_knn(backbone, info, online_eval, training_device(cfg.device, ctx), ctx)}

    history, steps = train(
        backbone, obj, train_set, cfg, param_groups=groups, run=run, resume=resume,
        progress=progress, on_epoch=on_epoch, epoch_extra=online_knn, desc=f"{obj.name} {cfg.method}",
        write_config=lambda: write_run_config(run, info, train_set, 0, cfg, mcfg, run_meta,
                                              **{name: recipe, "crops": _crops_dict(crops)}),
        fingerprint=with_run_identity({"train": cfg.to_dict(), name: recipe}, info.name, run_meta, _crops_dict(crops)),
    )
    return finish(TrainResult(backbone, None, cfg, mcfg, history, None), run, steps)


def check_crop_sizes(backbone: nn.Module, crops: Any) -> None:
    """Refuse, before any training, crops a backbone cannot take: a ViT whose position embeddings fix its
    input size (``input_resolution``) takes no other crop size."""
    fixed = getattr(backbone, "input_resolution", None)
    config = getattr(crops, "config", None)
    if not isinstance(fixed, int) or config is None:
        return
    sizes = {"large": config.large_size, **({"small": config.small_size} if config.n_small else {})}
    wrong = {kind: size for kind, size in sizes.items() if size != fixed}
    if wrong:
        which = " and ".join(f"{kind} crops are {size} px" for kind, size in wrong.items())
        raise SelfmaskError(
            f"{type(backbone).__name__} takes only {fixed}x{fixed} images (its position embeddings fix the size), "
            f"but the {which}: pass --small-crop-size {fixed} (or --small-crops 0)"
        )


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
    """Train with SwAV (:func:`adapt_ssl` with the ``swav`` objective); labels are never read.

    Args:
        crops: a ``selfmask.data.multicrop.MultiCrop`` (default: the paper's 2 large +
            6 small crops, sizes scaled to the backbone's input size).
        swav: the SwAV recipe (default: the paper's, 500 prototypes, queue of 512
            from epoch 30).
    """
    return adapt_ssl(backbone, info, train_set, cfg, swav or SwAVConfig(), objective="swav", crops=crops, run=run,
                     run_meta=run_meta, progress=progress, online_eval=online_eval, on_epoch=on_epoch, resume=resume)


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
