"""Supervised adaptation (``selfmask adapt``), a thin wrapper over the training engine.

``adapt(backbone, info, train_set, cfg)`` prepares the backbone for the method
(masks for ``mask``/``topk``, everything trainable for ``fft``, frozen for
``linear``), adds a head (the supervised objective,
:class:`~selfmask.objectives.supervised.SupervisedObjective`), and trains it with
:func:`selfmask.training.engine.train`: SGD + momentum under a warm-up/cosine
schedule. Optionally it writes a :class:`~selfmask.training.run_folder.RunFolder`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from selfmask.backbones.registry import BackboneInfo
from selfmask.data.base import ImageTensorDataset, normalize_batch
from selfmask.errors import SelfmaskError
from selfmask.masking import mask_scores, mask_summary
from selfmask.objectives.registry import ObjectiveInputs, create_objective
from selfmask.training.config import TrainConfig
from selfmask.training.distributed import current_context, training_device
from selfmask.training.engine import (
    TrainResult,
    finish,
    prepare_backbone,
    prepare_training,
    resolve_device,
    save_trained,
    speed_setup,
    train,
)
from selfmask.training.identity import with_run_identity
from selfmask.training.loop import TrainingDiverged
from selfmask.training.run_folder import RunFolder, write_run_config

log = logging.getLogger("selfmask.train")


def select_subset(train_set: ImageTensorDataset, cfg: TrainConfig) -> tuple[ImageTensorDataset, torch.Tensor | None]:
    if cfg.label_fraction is None and cfg.per_class is None:
        return train_set, None
    from selfmask.data.subsets import label_subset

    sub = label_subset(train_set.labels, fraction=cfg.label_fraction, per_class=cfg.per_class, seed=cfg.seed)
    idx = torch.as_tensor(sub.indices, dtype=torch.long)
    return train_set.subset(idx, name=f"{train_set.name}[{len(idx)} labelled]"), idx


def adapt(
    backbone: nn.Module,
    info: BackboneInfo,
    train_set: ImageTensorDataset,
    cfg: TrainConfig,
    *,
    run: RunFolder | None = None,
    run_meta: dict[str, Any] | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train ``backbone`` on ``train_set`` with ``cfg`` (supervised objective).

    Writes ``config.json``, ``status.json``, ``metrics.jsonl``, ``log.txt``,
    ``scores.safetensors`` / ``weights.safetensors`` and ``head.safetensors`` into
    ``run`` when one is given. Raises :class:`TrainingDiverged` on a NaN/Inf loss.

    Under an initialised ``torch.distributed`` process group (``torchrun``) every
    process calls this alike: ``cfg.batch_size`` is the global batch, each process
    trains on its slice under DDP, and only rank 0 writes into ``run``
    (:mod:`selfmask.training.distributed`).
    """
    if cfg.objective != "supervised":
        raise SelfmaskError(f"adapt(): objective {cfg.objective!r} is trained by adapt_ssl()")
    data, subset_idx = select_subset(train_set, cfg)
    if len(data) == 0:
        raise SelfmaskError(f"training set {train_set.name!r} is empty")
    if len(data) < 2 and cfg.method != "linear":
        raise SelfmaskError(f"training set {data.name!r} has {len(data)} image(s); BatchNorm training needs at least 2")
    backbone, objective, mcfg, groups = prepare_training(
        backbone, info, cfg, lambda: create_objective("supervised", ObjectiveInputs(info, train_set, cfg))
    )
    ctx = current_context()
    log.info(
        "adapt: method=%s backbone=%s images=%d batch=%d epochs=%d lr=%g device=%s processes=%d",
        cfg.method, info.name, len(data), min(cfg.batch_size, len(data)), cfg.epochs, cfg.resolved_lr,
        training_device(cfg.device, ctx), ctx.world_size,
    )
    history, steps = train(
        backbone, objective, data, cfg, param_groups=groups, run=run, resume=resume,
        progress=progress, on_epoch=on_epoch, desc=cfg.method,
        write_config=lambda: write_run_config(run, info, train_set, len(data), cfg, mcfg, run_meta),
        fingerprint=with_run_identity(cfg.to_dict(), info.name, run_meta),
    )
    return finish(TrainResult(backbone, objective.head, cfg, mcfg, history, subset_idx), run, steps)


@torch.no_grad()
def classify(
    backbone: nn.Module,
    head: nn.Module,
    dataset: ImageTensorDataset,
    info: BackboneInfo,
    device: str = "cpu",
    batch_size: int = 256,
) -> float:
    """Top-1 accuracy of ``head(backbone(x))`` on un-augmented ``dataset``."""
    dev = resolve_device(device)
    backbone.eval()
    head.eval()
    correct = 0
    for start in range(0, len(dataset), batch_size):
        x = normalize_batch(dataset.images[start : start + batch_size].to(dev), info.mean, info.std)
        y = dataset.labels[start : start + batch_size].to(dev)
        correct += int((head(backbone(x)).argmax(1) == y).sum())
    return correct / max(1, len(dataset))


def count_trainable_bits(result: TrainResult) -> dict[str, float]:
    """Stored size of an adaptation in bits: 1 bit per mask entry, 32 per fp32 weight."""
    head_bits = 0
    if result.head is not None:
        if result.config.head == "masked-random" and result.config.method != "linear":
            head_bits = sum(s.numel() for s in mask_scores(result.head).values())
        else:
            head_bits = 32 * sum(p.numel() for p in result.head.parameters())
    if result.mask_config is not None:
        s = mask_summary(result.backbone)
        return {"backbone_bits": s.raw_bits, "entropy_bits": s.entropy_bits, "head_bits": head_bits}
    if result.config.method == "fft":
        bits = 32 * sum(p.numel() for p in result.backbone.parameters())
        return {"backbone_bits": bits, "entropy_bits": math.nan, "head_bits": head_bits}
    return {"backbone_bits": 0, "entropy_bits": 0.0, "head_bits": head_bits}


__all__ = [
    "TrainResult",
    "TrainingDiverged",
    "adapt",
    "classify",
    "count_trainable_bits",
    "prepare_backbone",
    "resolve_device",
    "save_trained",
    "select_subset",
    "speed_setup",
]
