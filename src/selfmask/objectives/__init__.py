"""Training objectives behind one contract (:class:`Objective`, see ``base.py``), by name.

* ``supervised``: cross-entropy of a head (:class:`SupervisedObjective`).
* ``swav``: SwAV over multi-crop views for self-supervised masking (:class:`MultiCropSwAV`,
  built from :class:`SwAVObjective`; METHOD.md section 2).

``create_objective(name, ObjectiveInputs(...))`` builds one; a new objective is one module
and one registration line in ``registry.py``.
"""

from selfmask.objectives.base import Objective, embed_crops
from selfmask.objectives.registry import ObjectiveInputs, create_objective, objective_names, register_objective
from selfmask.objectives.sinkhorn import AllReduce, resolve_all_reduce, sinkhorn_knopp, torch_distributed_all_reduce
from selfmask.objectives.supervised import SupervisedObjective
from selfmask.objectives.swav import (
    MultiCropSwAV,
    Prototypes,
    SwAVConfig,
    SwAVHead,
    SwAVObjective,
    SwAVQueue,
    validate_queue,
)
from selfmask.objectives.swav_loss import SwAVLoss, assign_codes, collapse_warning, swav_loss

__all__ = [
    "AllReduce",
    "MultiCropSwAV",
    "Objective",
    "ObjectiveInputs",
    "Prototypes",
    "SupervisedObjective",
    "SwAVConfig",
    "SwAVHead",
    "SwAVLoss",
    "SwAVObjective",
    "SwAVQueue",
    "assign_codes",
    "collapse_warning",
    "create_objective",
    "embed_crops",
    "objective_names",
    "register_objective",
    "resolve_all_reduce",
    "sinkhorn_knopp",
    "swav_loss",
    "torch_distributed_all_reduce",
    "validate_queue",
]
