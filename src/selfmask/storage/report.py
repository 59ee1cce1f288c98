"""The paper's Table 2 for one mask file: off-the-shelf compressors against ours.

METHOD.md section 5: the paper compresses byte-per-mask data with gzip, bz2, lzma,
lz4 and snappy and compares with fine-tuned fp32 weights compressed the same way.
Here every compressor also runs on the packed masks (one bit per weight), zstd at
level 19 is added, and our mask file is the last row.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from selfmask.storage.codecs import pack_bits
from selfmask.storage.maskfile import MaskFile


def _lz4(data: bytes) -> bytes:
    import lz4.frame

    return lz4.frame.compress(data, compression_level=lz4.frame.COMPRESSIONLEVEL_MAX)


def _snappy(data: bytes) -> bytes:
    import snappy

    return snappy.compress(data)


def _zstd19(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=19).compress(data)


#: name -> compressor (bytes -> bytes), each at its strongest standard setting.
COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip-9": lambda b: gzip.compress(b, compresslevel=9, mtime=0),
    "bz2-9": lambda b: bz2.compress(b, 9),
    "lzma-9": lambda b: lzma.compress(b, preset=9),
    "lz4-max": _lz4,
    "snappy": _snappy,
    "zstd-19": _zstd19,
}


def packed_mask_bytes(masks: Mapping[str, torch.Tensor]) -> bytes:
    """All masks at one bit per weight, tensor after tensor."""
    return b"".join(pack_bits(m.reshape(-1).numpy()) for m in masks.values())


def byte_mask_bytes(masks: Mapping[str, torch.Tensor]) -> bytes:
    """All masks at one byte (0 or 1) per weight: the paper's input to the compressors."""
    return b"".join(m.reshape(-1).numpy().astype(np.uint8).tobytes() for m in masks.values())


def fp32_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    """The floating-point tensors of a state dict as fp32, in name order."""
    parts = []
    for name in sorted(state):
        t = state[name]
        if t.dtype.is_floating_point:
            parts.append(t.detach().to("cpu", torch.float32).contiguous().reshape(-1).numpy().tobytes())
    return b"".join(parts)


def _row(data: bytes, fn: Callable[[bytes], bytes], fp32_reference: int) -> dict[str, float | int]:
    size = len(fn(data))
    return {
        "bytes": size,
        "reduction_percent": 100.0 * (1 - size / len(data)) if data else 0.0,
        "x_smaller_than_fp32": fp32_reference / size if size else float("inf"),
    }


def compress_report(
    mask: MaskFile, finetuned: Mapping[str, torch.Tensor] | None = None, base: Mapping[str, torch.Tensor] | None = None
) -> dict[str, Any]:
    """Sizes of the mask (packed bits and byte-per-mask) under every compressor, and ours.

    ``x_smaller_than_fp32`` compares with the fp32 size of the masked weights
    (``4 * n`` bytes); ours counts the mask file without its extra tensors (a head); ``reduction_percent`` with the uncompressed input of that column.
    With ``finetuned`` (a state dict), its floating-point tensors as fp32 go through the
    same compressors. ``summary`` is ``mask.summary(base)``: the file beside its per-tensor,
    per-channel and (with the base weights ``base``) weight-conditioned bounds.
    """
    n = mask.numel
    fp32_reference = 4 * n
    summary = mask.summary(base)
    mask_bytes = summary["mask_bytes"]  # the file without extra tensors: header + payloads
    inputs = {"packed_bits": packed_mask_bytes(mask.masks), "byte_per_mask": byte_mask_bytes(mask.masks)}
    if finetuned is not None:
        inputs["finetuned_fp32"] = fp32_bytes(finetuned)
    columns: dict[str, Any] = {}
    for column, data in inputs.items():
        columns[column] = {
            "raw_bytes": len(data),
            "compressors": {name: _row(data, fn, fp32_reference) for name, fn in COMPRESSORS.items()},
        }
    return {
        "backbone": mask.backbone,
        "masked_weights": n,
        "fraction_active": mask.active / n if n else 0.0,
        "fp32_bytes": fp32_reference,
        "entropy_bound_bytes": mask.entropy_bits / 8,
        "ours": {
            "file_bytes": mask.file_bytes,
            "mask_bytes": mask_bytes,
            "payload_bytes": mask.payload_bytes,
            "reduction_percent_vs_byte_per_mask": 100.0 * (1 - mask_bytes / n) if n else 0.0,
            "x_smaller_than_fp32": fp32_reference / mask_bytes if mask_bytes else float("inf"),
        },
        "columns": columns,
        "bounds_bytes": summary["bounds_bytes"],
        "summary": summary,
    }


__all__ = ["COMPRESSORS", "byte_mask_bytes", "compress_report", "fp32_bytes", "packed_mask_bytes"]
