"""selfmask: adapt frozen pretrained vision models by learning binary masks over their weights.

Implements "Self-Masking Networks for Unsupervised Adaptation" (Warmerdam, Caron,
Asano, GCPR 2024). See README.md for the command line and the Python API.
"""

from selfmask.errors import SelfmaskError
from selfmask.fingerprint import fingerprint_tensors, model_fingerprint
from selfmask.masking import (
    PRESETS,
    MaskConfig,
    MaskSummary,
    base_state_dict,
    base_tensors,
    current_masks,
    is_masked,
    mask_config,
    mask_model,
    mask_scores,
    mask_summary,
    merge_masks,
)

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "MaskConfig",
    "MaskSummary",
    "SelfmaskError",
    "__version__",
    "base_state_dict",
    "base_tensors",
    "current_masks",
    "fingerprint_tensors",
    "is_masked",
    "mask_config",
    "mask_model",
    "mask_scores",
    "mask_summary",
    "merge_masks",
    "model_fingerprint",
]
