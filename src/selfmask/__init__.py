"""selfmask: adapt frozen pretrained vision models by learning binary masks over their weights.

Implements "Self-Masking Networks for Unsupervised Adaptation" (Warmerdam, Caron,
Asano, GCPR 2024). See README.md for the command line and docs/quickstart.md for the
Python API, which is all importable from here (as PEFT's ``get_peft_model`` & co.)::

    from selfmask import create_backbone, mask_model, MaskConfig, mask_scores, save_mask, MaskBank

* backbones: :func:`create_backbone` (a registered name, ``timm:NAME``, ``torchvision:NAME``,
  ``open_clip:NAME`` or ``module.path:factory``; weights from a local file), :func:`backbone_info`,
  :func:`list_backbones`, :func:`register_backbone`;
* masks on any ``nn.Module``: :func:`mask_model`, :class:`MaskConfig`, :func:`mask_scores`,
  :func:`current_masks`, :func:`mask_summary`, :func:`merge_masks`;
* mask files and serving: :func:`save_mask`, :func:`load_mask`, :func:`apply_mask`,
  :func:`merge_mask`, :class:`MaskBank` (many tasks on one backbone, mixed-task batches),
  :func:`load_run` (a training run folder as a masked model).
"""

from selfmask.backbones import (
    BackboneInfo,
    backbone_info,
    build_backbone,
    create_backbone,
    imagenet_classifier,
    list_backbones,
    load_backbone_weights,
    register_backbone,
)
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
from selfmask.storage import MaskBank, MaskFile, apply_mask, load_mask, load_run, merge_mask, save_mask
from selfmask.version import __version__

__all__ = [
    "PRESETS",
    "BackboneInfo",
    "MaskBank",
    "MaskConfig",
    "MaskFile",
    "MaskSummary",
    "SelfmaskError",
    "__version__",
    "apply_mask",
    "backbone_info",
    "base_state_dict",
    "base_tensors",
    "build_backbone",
    "create_backbone",
    "current_masks",
    "fingerprint_tensors",
    "imagenet_classifier",
    "is_masked",
    "list_backbones",
    "load_backbone_weights",
    "load_mask",
    "load_run",
    "mask_config",
    "mask_model",
    "mask_scores",
    "mask_summary",
    "merge_mask",
    "merge_masks",
    "model_fingerprint",
    "register_backbone",
    "save_mask",
]
