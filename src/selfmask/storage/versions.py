"""Mask file format versions: the one place that says what each version means (docs/storage.md).

Both the byte container (:mod:`selfmask.storage.container`, which refuses a file of another
format or an unknown version before parsing its tensors) and the mask file reader and writer
(:mod:`selfmask.storage.maskfile`) read these; this module imports neither.
"""

from __future__ import annotations

from typing import Any

from selfmask.masking.config import LEGACY_DEFAULTS

FORMAT_NAME = "selfmask.mask"
#: The version this code writes. 1: the first. 2: fused q/k/v tensors masked as three parts
#: (``MaskConfig.split_fused``; the index records ``parts`` per tensor) and the authors' top-k
#: count (``MaskConfig.topk_count``). 3: the ``"ans-weight"`` codec (masks coded given the base
#: weights, decoded only with them).
FORMAT_VERSION = 3
#: Versions this code reads.
READ_VERSIONS = (1, 2, 3)
#: For a file of an older version: the MaskConfig fields whose default changed since, as that
#: version's code used them (an old file stores no such key), so it applies bit for bit.
LEGACY_CONFIG: dict[int, dict[str, Any]] = {1: LEGACY_DEFAULTS}
#: Codecs introduced after version 1, and the version that introduced them.
CODEC_SINCE = {"ans-weight": 3}

__all__ = ["CODEC_SINCE", "FORMAT_NAME", "FORMAT_VERSION", "LEGACY_CONFIG", "READ_VERSIONS"]
