"""Learnable binary masks over frozen weights (METHOD.md section 1)."""

from selfmask.masking.config import (
    EFFICIENTNET_TARGETS,
    PRESETS,
    RESNET_AUTHORS_TARGETS,
    RESNET_TARGETS,
    VIT_TARGETS,
    MaskConfig,
)
from selfmask.masking.layer import MaskedWeight, ScoreMask, threshold_mask, topk_mask
from selfmask.masking.model import (
    MaskSummary,
    TensorMaskStats,
    base_state_dict,
    base_tensors,
    binary_entropy,
    current_masks,
    is_masked,
    iter_score_masks,
    mask_config,
    mask_model,
    mask_scores,
    mask_summary,
    merge_masks,
)

__all__ = [
    "EFFICIENTNET_TARGETS",
    "PRESETS",
    "RESNET_AUTHORS_TARGETS",
    "RESNET_TARGETS",
    "VIT_TARGETS",
    "MaskConfig",
    "MaskSummary",
    "MaskedWeight",
    "ScoreMask",
    "TensorMaskStats",
    "base_state_dict",
    "base_tensors",
    "binary_entropy",
    "current_masks",
    "is_masked",
    "iter_score_masks",
    "mask_config",
    "mask_model",
    "mask_scores",
    "mask_summary",
    "merge_masks",
    "threshold_mask",
    "topk_mask",
]
