"""Light supervised augmentation on whole batches, on the training device.

:func:`random_crop_flip`: random crop with zero padding (1/8 of the image size) and
horizontal flip on uint8 batches, the standard CIFAR recipe (``selfmask adapt``).
:func:`random_shift_flip`: a shift by reflect padding on normalised batches (pretraining).
Both are vectorised with index arithmetic, so they cost a few milliseconds per batch, and
deterministic given a generator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def random_shift_flip(x: torch.Tensor, pad: int, flip: bool, gen: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample random crop of a ``pad``-reflect-padded batch ``(B, C, H, W)`` (i.e. a shift of up to
    ``pad`` pixels), and a random horizontal flip when ``flip``. Runs on the tensor's device."""
    b, c, h, w = x.shape
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device)).view(b, 1, h, 1).expand(b, c, h, w + 2 * pad)
        xp = xp.gather(2, rows)
        cols = (ox[:, None] + torch.arange(w, device=x.device)).view(b, 1, 1, w).expand(b, c, h, w)
        x = xp.gather(3, cols)
    if flip:
        do = (torch.rand(b, generator=gen) < 0.5).to(x.device).view(b, 1, 1, 1)
        x = torch.where(do, x.flip(3), x)
    return x
