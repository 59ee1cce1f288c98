"""The SwAV objective for self-supervised masking (METHOD.md section 2).

Pieces, each usable alone:

* :class:`SwAVConfig`: every number of the recipe, validated once.
* :class:`SwAVHead`: a fresh projection head (one Linear ``embed_dim -> 128`` as the
  paper uses for ResNet-50, or an MLP), followed by L2 normalisation.
* :class:`Prototypes`: ``K`` prototype vectors (a bias-free Linear ``128 -> K``) whose
  rows are L2-normalised after every optimiser step.
* :class:`SwAVQueue`: embeddings of earlier batches used, from a start epoch on, as
  extra samples when computing codes.
* :class:`SwAVObjective`: head + prototypes + queue + loss, the one module a trainer uses.
* :class:`MultiCropSwAV`: SwAV over a backbone's multi-crop views, the training engine's
  objective (``selfmask.objectives.base.Objective``).

Head and prototypes are trained normally (their own learning rate, 0.15, and weight
decay, 1e-6), are never masked, and are discarded after training.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from selfmask.errors import SelfmaskError
from selfmask.objectives.base import embed_crops, is_int, refuse_unknown_keys, settings_error
from selfmask.objectives.sinkhorn import AllReduce, resolve_all_reduce
from selfmask.objectives.swav_loss import assign_codes, collapse_warning, swav_loss

log = logging.getLogger("selfmask.train")


@dataclass(frozen=True)
class SwAVConfig:
    """The SwAV recipe (defaults: the paper, METHOD.md section 2).

    Attributes:
        num_prototypes: K, the number of prototypes (500; the ablation tries 50 and 5000).
        temperature: softmax temperature of the swapped prediction (0.1).
        epsilon: Sinkhorn entropy regularisation (0.05).
        sinkhorn_iterations: Sinkhorn-Knopp iterations (3).
        crops_for_assign: crops whose codes are the targets (0 and 1: the two large crops).
        projection_dim: output size of the projection head (128).
        projection_hidden_dim: ``None``: the head is one Linear (the paper's SMN head);
            an integer: Linear -> BatchNorm -> ReLU -> Linear with this hidden width
            (the head of SwAV pretraining).
        queue_length: embeddings kept per assigned crop (512); 0 disables the queue.
        queue_start_epoch: first epoch (0-based) at which the queue is filled (30 of 150);
            its contents are used once it is full.
        freeze_prototypes_iters: the prototypes receive no gradient for this many
            iterations from the start (313, SwAV's public code: one ImageNet epoch at
            batch 4096); the paper only says "the first iterations".
        freeze_backbone_iters: the backbone (its masks, or its weights in a full fine-tuning
            run) receives no gradient for this many iterations from the start, so the fresh
            head and prototypes first learn on the pretrained features (a head warm-up; 0, the
            paper's recipe, trains both from the first step). Early swapped-prediction gradients
            through a random head are noise that can switch off weights the task needs.
        head_lr: learning rate of the head and prototypes (0.15).
        head_weight_decay: weight decay of the head and prototypes (1e-6).
    """

    num_prototypes: int = 500
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    crops_for_assign: tuple[int, ...] = (0, 1)
    projection_dim: int = 128
    projection_hidden_dim: int | None = None
    queue_length: int = 512
    queue_start_epoch: int = 30
    freeze_prototypes_iters: int = 313
    freeze_backbone_iters: int = 0
    head_lr: float = 0.15
    head_weight_decay: float = 1e-6

    def __post_init__(self) -> None:
        if not is_int(self.num_prototypes) or self.num_prototypes < 2:
            raise settings_error(self, "num_prototypes",
                                 "an integer >= 2 (codes spread a batch over at least 2 prototypes)")
        for name in ("temperature", "epsilon", "head_lr"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise settings_error(self, name, "a finite number > 0")
        if not isinstance(self.head_weight_decay, (int, float)) or not (
            math.isfinite(self.head_weight_decay) and self.head_weight_decay >= 0
        ):
            raise settings_error(self, "head_weight_decay", "a finite number >= 0")
        if not is_int(self.sinkhorn_iterations) or self.sinkhorn_iterations < 1:
            raise settings_error(self, "sinkhorn_iterations", "an integer >= 1")
        for name in ("queue_length", "queue_start_epoch", "freeze_prototypes_iters", "freeze_backbone_iters"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise settings_error(self, name, "an integer >= 0")
        if not is_int(self.projection_dim) or self.projection_dim < 1:
            raise settings_error(self, "projection_dim", "an integer >= 1")
        if self.projection_hidden_dim is not None and (
            not is_int(self.projection_hidden_dim) or self.projection_hidden_dim < 1
        ):
            raise settings_error(self, "projection_hidden_dim", "None (one Linear) or an integer >= 1")
        cfa = tuple(self.crops_for_assign)
        if not cfa or any(not is_int(a) or a < 0 for a in cfa) or len(set(cfa)) != len(cfa):
            raise settings_error(self, "crops_for_assign", "a non-empty tuple of distinct crop indices >= 0")
        object.__setattr__(self, "crops_for_assign", cfa)

    @property
    def min_crops(self) -> int:
        """Crops a forward pass needs: every assigned crop plus at least one other."""
        return max(max(self.crops_for_assign) + 1, 2)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields (for run folders)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["crops_for_assign"] = list(self.crops_for_assign)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SwAVConfig:
        refuse_unknown_keys(cls, data)
        data = dict(data)
        if "crops_for_assign" in data:
            data["crops_for_assign"] = tuple(data["crops_for_assign"])
        return cls(**data)


def validate_queue(cfg: SwAVConfig, dataset_size: int, batch_size: int) -> None:
    """Check that a SwAV run over ``dataset_size`` images in batches of ``batch_size`` can work.

    Raises:
        SelfmaskError: a batch smaller than 2 (Sinkhorn needs 2 samples), a batch larger
            than the data, or a queue longer than the data (it would hold several
            embeddings of the same images).
    """
    if batch_size < 2:
        raise SelfmaskError(f"SwAV: batch size {batch_size} is too small; Sinkhorn-Knopp needs at least 2 images")
    if batch_size > dataset_size:
        raise SelfmaskError(f"SwAV: batch size {batch_size} is larger than the dataset ({dataset_size} images)")
    if cfg.queue_length > dataset_size:
        raise SelfmaskError(
            f"SwAV: queue_length {cfg.queue_length} is longer than the dataset ({dataset_size} images); "
            f"use a queue of at most {dataset_size} (or 0 to disable it)"
        )


class SwAVHead(nn.Module):
    """Projection head followed by L2 normalisation (rows of the output have unit norm).

    Args:
        input_dim: the backbone's embedding size (2048 for ResNet-50).
        output_dim: projection size (128).
        hidden_dim: ``None`` for one Linear (the paper's SMN head), else the hidden
            width of a Linear -> BatchNorm1d -> ReLU -> Linear MLP.
    """

    def __init__(self, input_dim: int, output_dim: int = 128, hidden_dim: int | None = None) -> None:
        super().__init__()
        if input_dim < 1 or output_dim < 1 or (hidden_dim is not None and hidden_dim < 1):
            raise SelfmaskError(
                f"SwAVHead: sizes must be >= 1, got input_dim={input_dim}, output_dim={output_dim}, "
                f"hidden_dim={hidden_dim}"
            )
        if hidden_dim is None:
            self.projection: nn.Module = nn.Linear(input_dim, output_dim)
        else:
            self.projection = nn.Sequential(
                nn.Linear(input_dim, hidden_dim),
                nn.BatchNorm1d(hidden_dim),
                nn.ReLU(inplace=True),
                nn.Linear(hidden_dim, output_dim),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(x), dim=1)


class Prototypes(nn.Module):
    """``K`` prototype vectors of size ``dim``: a bias-free Linear ``dim -> K``.

    Rows are unit-norm at construction; call :meth:`normalize_` after every optimiser
    step (SwAV's code does it before every forward, which is the same thing), so
    scores ``z @ C^T`` of unit-norm ``z`` are cosine similarities.
    """

    def __init__(self, dim: int = 128, num_prototypes: int = 500) -> None:
        super().__init__()
        if num_prototypes < 2:
            raise SelfmaskError(f"Prototypes: num_prototypes must be >= 2, got {num_prototypes}")
        layer = nn.Linear(dim, num_prototypes, bias=False)  # PyTorch's default Linear initialisation
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.normalize_()

    @property
    def num_prototypes(self) -> int:
        return int(self.weight.shape[0])

    @torch.no_grad()
    def normalize_(self) -> None:
        """L2-normalise every prototype (row) in place."""
        self.weight.copy_(F.normalize(self.weight, dim=1))

    def forward(self, z: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """Scores ``z @ C^T``; ``frozen=True`` lets no gradient reach the prototypes."""
        weight = self.weight.detach() if frozen else self.weight
        return z @ weight.t()


class SwAVQueue(nn.Module):
    """First-in-first-out store of recent embeddings, one row of slots per assigned crop.

    Following SwAV's code: from ``start_epoch`` on, every training batch's embeddings
    of the assigned crops are pushed (the newest first); the contents are used for the
    codes once the queue is full. Before ``start_epoch`` nothing is stored or used.
    The queue is local to a process (as SwAV, divide the length by the number of
    processes for a global queue of the same size).
    """

    def __init__(self, length: int, num_assign: int, dim: int, start_epoch: int = 0) -> None:
        super().__init__()
        if length < 1 or num_assign < 1 or dim < 1 or start_epoch < 0:
            raise SelfmaskError(
                f"SwAVQueue: need length >= 1, num_assign >= 1, dim >= 1, start_epoch >= 0; got length={length}, "
                f"num_assign={num_assign}, dim={dim}, start_epoch={start_epoch}"
            )
        self.length = length
        self.start_epoch = start_epoch
        self.register_buffer("embeddings", torch.zeros(num_assign, length, dim))
        self.filled = 0

    def is_active(self, epoch: int) -> bool:
        """Whether the queue collects embeddings at ``epoch``."""
        return epoch >= self.start_epoch

    @property
    def is_full(self) -> bool:
        """Whether the contents are used for codes (every slot holds a real embedding)."""
        return self.filled >= self.length

    @torch.no_grad()
    def push(self, embeddings: torch.Tensor) -> None:
        """Insert (num_assign, B, dim) embeddings at the front; the oldest fall off the end."""
        if embeddings.dim() != 3 or embeddings.shape[0] != self.embeddings.shape[0] or (
            embeddings.shape[2] != self.embeddings.shape[2]
        ):
            raise SelfmaskError(
                f"SwAVQueue.push: expected embeddings of shape ({self.embeddings.shape[0]}, B, "
                f"{self.embeddings.shape[2]}), got {tuple(embeddings.shape)}"
            )
        new = torch.cat([embeddings.detach().to(self.embeddings.dtype), self.embeddings], dim=1)[:, : self.length]
        self.embeddings.copy_(new)
        self.filled = min(self.length, self.filled + int(embeddings.shape[1]))

    def reset(self) -> None:
        self.embeddings.zero_()
        self.filled = 0

    def get_extra_state(self) -> dict[str, int]:
        return {"filled": self.filled}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.filled = int(state["filled"])


class SwAVObjective(nn.Module):
    """SwAV on backbone embeddings of multi-crop views: head, prototypes, queue and loss.

    Usage by a trainer::

        obj = SwAVObjective(embed_dim, SwAVConfig())
        opt = torch.optim.SGD([{"params": scores, "lr": 50}, *obj.param_groups()], momentum=0.9)
        for epoch ...:
            for i, crops in ...:            # crops: list of (B, embed_dim), large crops first
                loss, stats = obj(crops, epoch=epoch, iteration=global_step)
                opt.zero_grad(); loss.backward(); opt.step()
                obj.after_optimizer_step()   # re-normalise the prototypes
            warning = collapse_warning(epoch_loss, cfg.num_prototypes, **obj.prototype_usage())

    ``iteration`` counts optimiser steps from the start of training (for the prototype
    freeze); ``epoch`` counts from 0 (for the queue). In evaluation mode the queue is
    neither filled nor usage counted.
    """

    def __init__(self, embed_dim: int, cfg: SwAVConfig | None = None, all_reduce: AllReduce | None = None) -> None:
        super().__init__()
        self.cfg = cfg or SwAVConfig()
        self.embed_dim = embed_dim
        self.all_reduce = all_reduce
        self.head = SwAVHead(embed_dim, self.cfg.projection_dim, self.cfg.projection_hidden_dim)
        self.prototypes = Prototypes(self.cfg.projection_dim, self.cfg.num_prototypes)
        self.queue: SwAVQueue | None = None
        if self.cfg.queue_length > 0:
            self.queue = SwAVQueue(
                self.cfg.queue_length, len(self.cfg.crops_for_assign), self.cfg.projection_dim, self.cfg.queue_start_epoch
            )
        self.register_buffer("assignment_counts", torch.zeros(self.cfg.num_prototypes, dtype=torch.long), persistent=False)

    def param_groups(self) -> list[dict[str, Any]]:
        """One optimiser parameter group: head and prototypes with their own lr and weight decay."""
        return [{"params": list(self.parameters()), "lr": self.cfg.head_lr, "weight_decay": self.cfg.head_weight_decay}]

    def prototypes_frozen(self, iteration: int) -> bool:
        return iteration < self.cfg.freeze_prototypes_iters

    def _check_crops(self, crops: Sequence[torch.Tensor]) -> int:
        if not isinstance(crops, (list, tuple)) or len(crops) < self.cfg.min_crops:
            n = len(crops) if isinstance(crops, (list, tuple)) else type(crops).__name__
            raise SelfmaskError(
                f"SwAVObjective: need a list of at least {self.cfg.min_crops} crop embeddings "
                f"(crops_for_assign={self.cfg.crops_for_assign} plus one to predict from), got {n}"
            )
        batch = crops[0].shape[0] if crops[0].dim() == 2 else -1
        for v, c in enumerate(crops):
            if c.dim() != 2 or c.shape[0] != batch or c.shape[1] != self.embed_dim:
                raise SelfmaskError(
                    f"SwAVObjective: crop {v} has embeddings of shape {tuple(c.shape)}; expected "
                    f"({max(batch, 1)}, {self.embed_dim}) like crop 0 (the same images in every crop)"
                )
        return batch

    def forward(
        self, crop_embeddings: Sequence[torch.Tensor], epoch: int = 0, iteration: int = 0
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss and statistics for one batch.

        Args:
            crop_embeddings: backbone embeddings (B, embed_dim), one per crop, the same B images in each.
            epoch: 0-based epoch (queue from ``queue_start_epoch``).
            iteration: 0-based optimiser step (prototypes frozen while ``< freeze_prototypes_iters``).

        Returns:
            ``(loss, stats)``; stats: ``loss``, ``prototypes_used`` (fraction of the K
            prototypes that are the argmax of at least one code in this batch),
            ``max_prototypes_used`` (the most this batch could reach, ``min(1, codes/K)``),
            ``queue_used`` and ``prototypes_frozen`` (0/1).
        """
        cfg = self.cfg
        batch = self._check_crops(crop_embeddings)
        z = self.head(torch.cat(list(crop_embeddings)))
        frozen = self.prototypes_frozen(iteration)
        scores = self.prototypes(z, frozen=frozen).split(batch)
        z_views = z.split(batch)

        queue_scores = None
        queue = self.queue
        if queue is not None and queue.is_active(epoch) and queue.is_full:
            with torch.no_grad():
                w = self.prototypes.weight.detach()
                queue_scores = [queue.embeddings[i].to(w.dtype) @ w.t() for i in range(len(cfg.crops_for_assign))]
        codes = assign_codes(
            scores, cfg.crops_for_assign, cfg.epsilon, cfg.sinkhorn_iterations, queue_scores, self.all_reduce
        )
        if self.training and queue is not None and queue.is_active(epoch):
            queue.push(torch.stack([z_views[a].detach() for a in cfg.crops_for_assign]))
        loss = swav_loss(scores, codes, cfg.crops_for_assign, cfg.temperature)

        with torch.no_grad():
            winners = torch.cat([q.argmax(dim=1) for q in codes])
            counts = torch.bincount(winners, minlength=cfg.num_prototypes)
            if self.training:
                self.assignment_counts += counts
            used = int((counts > 0).sum())
        stats = {
            "loss": float(loss.detach()),
            "prototypes_used": used / cfg.num_prototypes,
            "max_prototypes_used": min(1.0, winners.numel() / cfg.num_prototypes),
            "queue_used": float(queue_scores is not None),
            "prototypes_frozen": float(frozen),
        }
        return loss, stats

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Re-normalise the prototypes; call after every ``optimizer.step()``."""
        self.prototypes.normalize_()

    def prototype_usage(self, reset: bool = True) -> dict[str, float | int]:
        """Fraction of prototypes that were some code's argmax since the last reset.

        Returns ``{"used_fraction": ..., "assignments": ...}`` (the keyword arguments of
        :func:`~selfmask.objectives.swav_loss.collapse_warning`).
        """
        counts = self.assignment_counts
        out: dict[str, float | int] = {
            "used_fraction": float((counts > 0).sum()) / self.cfg.num_prototypes,
            "assignments": int(counts.sum()),
        }
        if reset:
            counts.zero_()
        return out


class MultiCropSwAV(nn.Module):
    """SwAV over multi-crop views of a backbone: the engine's
    :class:`~selfmask.objectives.base.Objective` for self-supervised masking (and SwAV
    pretraining, ``method="fft"``).

    Each step embeds every crop with the backbone (under ``no_grad`` during the
    ``freeze_backbone_iters`` head warm-up) and applies :class:`SwAVObjective`. Its state is
    checkpointed under ``"objective"`` (the :class:`SwAVObjective`'s keys).

    Args:
        embed_dim: the backbone's embedding size.
        cfg: the SwAV recipe.
        crops: ``crops(uint8_images, generator=g) -> list of views`` (large crops first),
            e.g. :class:`selfmask.data.multicrop.MultiCrop`.
        all_reduce: Sinkhorn's and the prototype usage's all-reduce (default: torch.distributed
            when initialised).
    """

    name: ClassVar[str] = "swav"
    needs_labels: ClassVar[bool] = False

    def __init__(self, embed_dim: int, cfg: SwAVConfig, crops: Any, all_reduce: AllReduce | None = None) -> None:
        super().__init__()
        self.swav = SwAVObjective(embed_dim, cfg, all_reduce)
        self.crops = crops
        # prototypes frozen for the first iterations take no part in the graph: DDP must look for unused ones
        self.find_unused_parameters = cfg.freeze_prototypes_iters > 0

    @property
    def cfg(self) -> SwAVConfig:
        return self.swav.cfg

    def views(self, images: torch.Tensor, *, generator: torch.Generator) -> list[torch.Tensor]:
        return self.crops(images, generator=generator)

    def step(
        self, backbone: nn.Module, views: list[torch.Tensor], labels: torch.Tensor | None, *, epoch: int, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        warmup = step < self.cfg.freeze_backbone_iters  # head warm-up: no gradient reaches the backbone
        with torch.no_grad() if warmup else contextlib.nullcontext():  # so no graph is recorded for it either
            embeddings = embed_crops(backbone, views)
        loss, _stats = self.swav(embeddings, epoch=epoch, iteration=step)
        n = views[0].shape[0]
        return loss, {"loss": float(loss.detach()) * n, "seen": n}

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return self.swav.param_groups()

    def after_optimizer_step(self, backbone: nn.Module, *, step: int) -> None:
        self.swav.after_optimizer_step()

    def epoch_metrics(self, sums: dict[str, float]) -> dict[str, Any]:
        reduce = resolve_all_reduce(self.swav.all_reduce)
        if reduce is not None:  # prototype usage over the global batches of the epoch
            self.swav.assignment_counts.copy_(reduce(self.swav.assignment_counts.clone(), "sum"))
        usage = self.swav.prototype_usage()
        row: dict[str, Any] = {"loss": sums["loss"] / sums["seen"], "prototypes_used": usage["used_fraction"]}
        warning = collapse_warning(row["loss"], self.cfg.num_prototypes, **usage)
        if warning:
            row["collapse_warning"] = warning
            log.warning("%s", warning)
        return row

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        return {"objective": self.swav}

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {"assignment_counts": self.swav.assignment_counts}

    def config_dict(self) -> dict[str, Any]:
        return self.cfg.to_dict()


__all__ = ["MultiCropSwAV", "Prototypes", "SwAVConfig", "SwAVHead", "SwAVObjective", "SwAVQueue", "validate_queue"]
