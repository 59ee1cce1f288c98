"""Masks coded given the base weights (issue 19) on real mask files: size against the bounds, time against lzma-9.

:func:`conditional_coding` takes a mask file and its base model, and codes the same masks
three ways, side by side in one process on one CPU thread (interleaved repeats, medians):

* ``conditioned``: the mask file as ``save_mask`` writes it (``"ans-weight"`` allowed);
* ``portable``: the same without the base weights (``save_mask(..., portable=True)``: the
  codecs of format version 1);
* ``lzma9``: ``lzma`` preset 9 of the packed masks (one bit per weight), the best
  general-purpose compressor of the storage benchmark.

Sizes are payloads and masks (the file without its extra tensors: header + payloads; for
lzma-9 its output) in bytes and bits per masked weight, each against the
per-tensor, per-channel and weight-conditioned bounds (:mod:`selfmask.storage.bounds`).
Decoding ``conditioned`` includes binning the base weights; none of the three includes the
fingerprint (``apply_mask`` takes it for every file).

:func:`synthetic_mask`: a mask file at ResNet-50 scale whose pruning depends on weight
magnitude, on a random base (no pretrained weights needed), for timing at that scale.
"""

from __future__ import annotations

import lzma
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from selfmask.backbones import build_backbone
from selfmask.fingerprint import model_fingerprint
from selfmask.masking.config import MaskConfig
from selfmask.masking.model import base_state_dict
from selfmask.storage.codecs import NEEDS_BASE, unpack_bits
from selfmask.storage.maskfile import MaskFile, decode_mask_file, encode_mask_file
from selfmask.storage.report import packed_mask_bytes


def _interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def conditional_coding(mask: MaskFile, base: nn.Module, repeats: int = 5) -> dict[str, Any]:
    """Sizes, bounds and coding times of ``mask`` (a mask file) coded given ``base`` or not (see the module)."""
    fingerprint = model_fingerprint(base)
    weights = base_state_dict(base)
    mask.decode_with_base(weights, fingerprint)  # the fingerprint error on another base
    masks = mask.masks
    meta = {"backbone": mask.backbone, "fingerprint": mask.fingerprint, "config": mask.config,
            "extra": mask.extra, "source": mask.source}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        conditioned, infos = encode_mask_file(masks, base=weights, **meta)
        portable, portable_infos = encode_mask_file(masks, **meta)
        packed = packed_mask_bytes(masks)
        xz = lzma.compress(packed, preset=9)
        sizes = [m.numel() for m in masks.values()]

        def lzma_decode() -> list[np.ndarray]:
            raw = np.frombuffer(lzma.decompress(xz), dtype=np.uint8)
            out, offset = [], 0
            for n in sizes:
                nbytes = (n + 7) // 8
                out.append(unpack_bits(raw[offset : offset + nbytes], n))
                offset += nbytes
            return out

        encode_s = _interleaved_medians({
            "conditioned": lambda: encode_mask_file(masks, base=weights, **meta),
            "portable": lambda: encode_mask_file(masks, **meta),
            "lzma9": lambda: lzma.compress(packed_mask_bytes(masks), preset=9),
        }, repeats)
        decode_s = _interleaved_medians({
            "conditioned": lambda: decode_mask_file(conditioned).decode_with_base(weights, fingerprint),
            "portable": lambda: decode_mask_file(portable),
            "lzma9": lzma_decode,
        }, repeats)
        back = decode_mask_file(conditioned).decode_with_base(weights, fingerprint)
        if any(not torch.equal(back.masks[k], m) for k, m in masks.items()):  # pragma: no cover
            raise RuntimeError("conditional_coding: the round trip is not exact")
        summary = back.summary(weights)
    finally:
        torch.set_num_threads(threads)
    n = summary["masked_weights"]
    bounds = summary["bounds_bytes"]
    payload = summary["payload_bytes"]
    portable_payload = sum(i.payload_bytes for i in portable_infos)
    extra = summary["extra_bytes"]  # a head, BatchNorm statistics: the same in both files
    masks_bytes = {"conditioned": len(conditioned) - extra, "portable": len(portable) - extra, "lzma9": len(xz)}
    bpw = 8 / n
    return {
        "backbone": mask.backbone,
        "masked_tensors": len(masks),
        "masked_weights": n,
        "active_fraction": summary["fraction_active"],
        "tensors_coded_given_weights": sum(i.codec in NEEDS_BASE for i in infos),
        "codecs": ",".join(sorted({i.codec for i in infos})),
        "file_bytes": {"conditioned": len(conditioned), "portable": len(portable), "lzma9": len(xz)},
        "payload_bytes": {"conditioned": payload, "portable": portable_payload},
        "bounds_bytes": bounds,
        "payload_bits_per_weight": {"conditioned": payload * bpw, "portable": portable_payload * bpw},
        "mask_bytes": masks_bytes,
        "mask_bits_per_weight": {k: v * bpw for k, v in masks_bytes.items()},
        "bounds_bits_per_weight": {k: None if v is None else v * bpw for k, v in bounds.items()},
        "conditioned_over_per_tensor_bound": payload / bounds["per_tensor"],
        "portable_over_per_tensor_bound": portable_payload / bounds["per_tensor"],
        "conditioned_over_weight_bound": payload / bounds["weight"],  # every tensor decoded with its base: known
        "weight_bound_over_per_tensor_bound": bounds["weight"] / bounds["per_tensor"],
        "conditioned_over_portable_masks": masks_bytes["conditioned"] / masks_bytes["portable"],
        "conditioned_over_lzma9_masks": masks_bytes["conditioned"] / masks_bytes["lzma9"],
        "encode_s": encode_s,
        "decode_s": decode_s,
        "encode_over_lzma9": {k: v / encode_s["lzma9"] for k, v in encode_s.items()},
        "decode_over_lzma9": {k: v / decode_s["lzma9"] for k, v in decode_s.items()},
        "encode_plus_decode_over_lzma9": {
            k: (encode_s[k] + decode_s[k]) / (encode_s["lzma9"] + decode_s["lzma9"]) for k in encode_s
        },
        "threads": 1,
        "repeats": repeats,
    }


def synthetic_mask(
    backbone: str = "resnet50", preset: str = "resnet-authors", seed: int = 0, off_max: float = 0.4
) -> tuple[MaskFile, nn.Module]:
    """Masks with ``P(off) = off_max * (1 - rank(|w|) / n) ** 3`` per tensor (about 90 % active at 0.4)
    on the random base of ``seed``: ``(mask file, base model)``."""
    torch.manual_seed(seed)
    model = build_backbone(backbone)
    config = MaskConfig.preset(preset)
    weights = {n: p.detach() for n, p in model.named_parameters() if config.matches(n)}
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name, w in weights.items():
        rank = torch.empty(w.numel(), dtype=torch.float64)
        rank[w.abs().flatten().argsort()] = torch.arange(w.numel(), dtype=torch.float64) / w.numel()
        masks[name] = (torch.rand(w.numel(), generator=g, dtype=torch.float64) >= off_max * (1 - rank) ** 3).view(w.shape)
    data, _ = encode_mask_file(masks, backbone=backbone, fingerprint=model_fingerprint(model), config=config,
                               source={"seed": seed, "synthetic": f"P(off) = {off_max} * (1 - rank(|w|)/n)^3"},
                               base=weights)
    return decode_mask_file(data, f"<synthetic {backbone} mask>"), model


__all__ = ["conditional_coding", "synthetic_mask"]
