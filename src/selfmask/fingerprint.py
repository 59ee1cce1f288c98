"""sha256 fingerprints of named tensors.

A fingerprint identifies the exact base weights a mask was trained on: it hashes,
in name order, each tensor's name, dtype, shape and raw bytes (little-endian,
contiguous, on the CPU). Two state dicts with the same fingerprint hold the same
numbers under the same names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch


def fingerprint_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 over the sorted ``(name, dtype, shape, bytes)`` of ``tensors``."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(repr(tuple(t.shape)).encode())
        t = t.to("cpu").contiguous()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """Fingerprint of a model's *base* state (masked or not): see ``base_state_dict``.

    A masked model and the plain backbone it was masked from have the same
    fingerprint, so a mask file can check it is applied to the weights it was
    trained on.
    """
    from selfmask.masking.model import base_state_dict

    return fingerprint_tensors(base_state_dict(model))
