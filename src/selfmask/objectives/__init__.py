"""Training objectives: SwAV for self-supervised masking (METHOD.md section 2)."""

from selfmask.objectives.sinkhorn import AllReduce, resolve_all_reduce, sinkhorn_knopp, torch_distributed_all_reduce
from selfmask.objectives.swav import Prototypes, SwAVConfig, SwAVHead, SwAVObjective, SwAVQueue, validate_queue
from selfmask.objectives.swav_loss import SwAVLoss, assign_codes, collapse_warning, swav_loss

__all__ = [
    "AllReduce",
    "Prototypes",
    "SwAVConfig",
    "SwAVHead",
    "SwAVLoss",
    "SwAVObjective",
    "SwAVQueue",
    "assign_codes",
    "collapse_warning",
    "resolve_all_reduce",
    "sinkhorn_knopp",
    "swav_loss",
    "torch_distributed_all_reduce",
    "validate_queue",
]
