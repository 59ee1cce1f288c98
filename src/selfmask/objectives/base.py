"""The contract between the training engine and an objective (supervised, SwAV, DINO, ...).

The engine (``selfmask.training.engine``) owns everything that is the same for every
objective: the data order, epochs, the optimiser and schedule, checkpoints and resume,
signals, NaN stops, distributed runs, progress and the run folder. An objective owns what
differs: how a batch becomes views, the modules it adds (heads, prototypes, a teacher),
the loss, and the numbers it reports.

Adding an objective is one new module that defines a class satisfying :class:`Objective`
(an ``nn.Module``, so its parameters and buffers move with ``.to(device)`` and its
``state_dict`` is checkpointed) and one registration line in
``selfmask.objectives.registry``.

Each step the engine calls, in order::

    views = objective.views(images, generator=g)               # augmentation
    with autocast:                                              # (bf16 runs), inside DDP
        loss, sums = objective.step(backbone, views, labels, epoch=e, step=s)
    optimizer.zero_grad(); loss.backward(); optimizer.step()
    objective.after_optimizer_step(backbone, step=s)

* ``images`` are the batch as stored (``uint8``, ``(B, C, H, W)``) on the training device.
  ``views`` turns them into what ``step`` consumes (normalised, augmented images; a list of
  multi-crop views), drawing every random number from ``generator``, the run's seeded CPU
  generator, which checkpoints keep, so a resumed run draws the same views. It runs outside
  autocast and outside DistributedDataParallel.
* ``step`` runs the forward pass and the loss: ``backbone`` is the module to call on images
  (it may be a thin wrapper that feeds it channels-last inputs); ``labels`` are the batch's
  labels, or ``None`` when ``needs_labels`` is false (the engine never reads labels for such
  an objective). It returns the scalar loss to back-propagate and a dict of per-batch *sums*
  (at least ``"loss"``, the loss times the batch size, and ``"seen"``, the batch size). The
  engine runs ``step`` inside one DistributedDataParallel over backbone and objective, so
  every trainable parameter must be used by it, unless ``find_unused_parameters`` is true.
  ``epoch`` counts from 0, ``step`` counts optimiser steps from 0 over the whole run.
* The engine adds the sums over the epoch (and over processes) and passes them to
  ``epoch_metrics``, whose dict starts the epoch's row of ``metrics.jsonl`` (the engine adds
  ``epoch``, ``step``, ``fraction_active`` of a masked backbone, ``lr``, ``seconds`` and
  ``images_per_second``). Per-process state that must be summed over processes (prototype
  usage) is reduced there by the objective itself (``resolve_all_reduce``).
* ``param_groups(lr)`` lists the objective's own trainable parameters as SGD parameter
  groups (``lr`` is the run's base learning rate, ``cfg.resolved_lr``; the objective may use
  its own). They follow the backbone's groups in the optimiser; every group follows the
  warm-up/cosine schedule.
* ``after_optimizer_step`` runs after every optimiser step: prototype normalisation, a
  momentum teacher's update, a queue's bookkeeping.
* ``checkpoint_modules()`` names the modules whose ``state_dict`` every checkpoint holds
  (beside ``"backbone"``), restored on resume; usually ``{"objective": self}``. Tensors that
  must survive resume but are not in a ``state_dict`` go in ``extra_state()`` (restored in
  place).
* ``config_dict()`` is recorded in the run's ``config.json`` under the objective's ``name``
  and in the checkpoint's settings (a resume with other settings is refused).
* Modules the objective creates draw their initial values from the global generator right
  after ``torch.manual_seed(cfg.seed)`` (``selfmask.training.engine.prepare_training``).
* After training the objective's modules are dropped: only the backbone (its masks or
  weights) and, for supervised objectives, ``head`` are kept.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from selfmask.errors import SelfmaskError


@runtime_checkable
class Objective(Protocol):
    """What every training objective provides to the engine (see the module docstring).

    Implementations are ``nn.Module`` subclasses (``to``, ``train``, ``state_dict`` come from
    there).
    """

    name: ClassVar[str]
    needs_labels: ClassVar[bool]
    find_unused_parameters: bool

    def views(self, images: torch.Tensor, *, generator: torch.Generator) -> Any: ...

    def step(
        self,
        backbone: nn.Module,
        views: Any,
        labels: torch.Tensor | None,
        *,
        epoch: int,
        step: int,
    ) -> tuple[torch.Tensor, dict[str, float]]: ...

    def param_groups(self, lr: float) -> list[dict[str, Any]]: ...

    def after_optimizer_step(self, backbone: nn.Module, *, step: int) -> None: ...

    def epoch_metrics(self, sums: dict[str, float]) -> dict[str, Any]: ...

    def checkpoint_modules(self) -> dict[str, nn.Module]: ...

    def extra_state(self) -> dict[str, torch.Tensor]: ...

    def config_dict(self) -> dict[str, Any]: ...

    # nn.Module's, listed so a protocol check catches a plain class
    def to(self, *args: Any, **kwargs: Any) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...


def embed_crops(backbone: nn.Module, crops: list[torch.Tensor]) -> list[torch.Tensor]:
    """Backbone embeddings (float32) of every multi-crop view, one forward pass per crop resolution.

    Consecutive crops of the same size are embedded as one batch (BatchNorm sees them
    together, as in SwAV's code); the result has one ``(B, D)`` tensor per crop.
    """
    out: list[torch.Tensor] = []
    i = 0
    while i < len(crops):
        j = i
        while j < len(crops) and crops[j].shape[-2:] == crops[i].shape[-2:]:
            j += 1
        emb = backbone(torch.cat(crops[i:j]))
        out.extend(emb.float().split(crops[i].shape[0]))
        i = j
    return out


# ---------------------------------------------------------------- objective settings (SwAVConfig, DINOConfig)
def is_int(value: object) -> bool:
    """An integer setting (``True`` is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def settings_error(settings: Any, name: str, expected: str) -> SelfmaskError:
    """``<Class>.<field>: expected ..., got ...``: the one-line error of a bad objective setting."""
    return SelfmaskError(f"{type(settings).__name__}.{name}: expected {expected}, got {getattr(settings, name)!r}")


def refuse_unknown_keys(cls: type, data: dict[str, Any]) -> None:
    """A settings dict (a run's ``config.json``) with a key ``cls`` does not have is refused, naming it."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SelfmaskError(f"{cls.__name__}: unknown keys {unknown}; expected a subset of {sorted(known)}")
