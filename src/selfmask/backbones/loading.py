"""Load backbone weights from a local file (no network, no arbitrary unpickling).

Minimal first version: ``.safetensors`` or a ``torch.load(weights_only=True)`` state
dict, loaded strictly. The backbones issue extends this with wrapped/prefixed
checkpoints, head-key dropping and clear per-key errors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from selfmask.backbones.registry import build_backbone
from selfmask.errors import SelfmaskError


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a weights-only torch file."""
    path = Path(path)
    if not path.is_file():
        raise SelfmaskError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise SelfmaskError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


def create_backbone(name: str, weights: str | Path | None = None) -> nn.Module:
    """Build backbone ``name``; with ``weights``, load them from a local file."""
    model = build_backbone(name)
    if weights is not None:
        state = load_state_dict_file(weights)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise SelfmaskError(
                f"{weights}: does not fit backbone {name!r}: missing keys {missing[:8]}, "
                f"unexpected keys {unexpected[:8]}"
            )
    return model
