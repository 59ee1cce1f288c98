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

    loss, sums = objective.step(backbone, images, labels, epoch=e, step=s, generator=g)
    loss.backward(); optimizer.step()
    objective.after_optimizer_step(backbone, step=s)

* ``images`` are the batch's un-normalised images in ``[0, 1]`` on the training device;
  ``labels`` are its labels, or ``None`` when ``needs_labels`` is false (the engine never
  reads labels for such an objective). ``generator`` is the run's seeded CPU generator for
  augmentation, so a resumed run draws the same views.
* ``step`` returns the scalar loss to back-propagate and a dict of per-batch *sums* (at
  least ``"loss"``, the loss times the batch size, and ``"seen"``, the batch size). The
  engine adds the sums over the epoch (and over processes) and passes them to
  ``epoch_metrics``, whose dict is one row of ``metrics.jsonl``.
* ``param_groups(lr)`` lists the objective's own trainable parameters as SGD parameter
  groups (``lr`` is the run's base learning rate; the objective may use its own).
* ``after_optimizer_step`` runs after every optimiser step: prototype normalisation, a
  momentum teacher's update, a queue's bookkeeping.
* ``state_dict()`` (``nn.Module``'s) is saved in every checkpoint and restored on resume;
  tensors that must survive resume but are not buffers go in ``extra_state()``.
* ``config_dict()`` is recorded in the run's ``config.json`` under ``"objective"``.
* After training the objective's modules are dropped: only the backbone (its masks or
  weights) and, for supervised objectives, ``head`` are kept.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Objective(Protocol):
    """What every training objective provides to the engine (see the module docstring)."""

    name: ClassVar[str]
    needs_labels: ClassVar[bool]

    def step(
        self,
        backbone: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor | None,
        *,
        epoch: int,
        step: int,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, dict[str, float]]: ...

    def param_groups(self, lr: float) -> list[dict[str, Any]]: ...

    def after_optimizer_step(self, backbone: nn.Module, *, step: int) -> None: ...

    def epoch_metrics(self, sums: dict[str, float]) -> dict[str, Any]: ...

    def extra_state(self) -> dict[str, torch.Tensor]: ...

    def config_dict(self) -> dict[str, Any]: ...
