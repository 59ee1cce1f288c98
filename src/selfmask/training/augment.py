"""Light supervised augmentation on whole uint8 batches, on the training device.

Random crop with zero padding (1/8 of the image size) and horizontal flip, the
standard CIFAR recipe; vectorised with index arithmetic so it costs a few
milliseconds per batch and is deterministic given a generator.
"""

from __future__ import annotations

import torch


def random_crop_flip(
    images: torch.Tensor, generator: torch.Generator, padding: int | None = None, flip: bool = True
) -> torch.Tensor:
    """Randomly crop (after zero-padding) and, if ``flip``, flip a ``(B, C, H, W)`` batch; same dtype."""
    b, c, h, w = images.shape
    pad = max(1, h // 8) if padding is None else padding
    dev = images.device
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(dev)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(dev)
    flipped = (torch.rand(b, generator=generator) < (0.5 if flip else 0.0)).to(dev)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    rows = oy[:, None] + torch.arange(h, device=dev)[None, :]  # (B, H)
    cols = ox[:, None] + torch.arange(w, device=dev)[None, :]  # (B, W)
    cols = torch.where(flipped[:, None], cols.flip(1), cols)
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]
