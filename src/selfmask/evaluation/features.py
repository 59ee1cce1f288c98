"""Frozen embeddings of a dataset: eval mode, no gradient, no augmentation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from selfmask.data.base import ImageTensorDataset, normalize_batch
from selfmask.errors import SelfmaskError


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: ImageTensorDataset,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Embeddings ``(len(dataset), D)`` (float32, on the CPU) of ``model`` for every image, in order.

    The model is put in eval mode for the pass (BatchNorm uses its running statistics) and
    restored to its previous mode afterwards.
    """
    if batch_size < 1:
        raise SelfmaskError(f"extract_features: batch_size must be >= 1, got {batch_size}")
    if len(dataset) == 0:
        raise SelfmaskError(f"extract_features: dataset {dataset.name!r} is empty")
    was_training = model.training
    model.eval()
    try:
        out = []
        for start in range(0, len(dataset), batch_size):
            x = normalize_batch(dataset.images[start : start + batch_size].to(device), mean, std)
            feats = model(x)
            if feats.dim() != 2:
                feats = torch.flatten(feats, 1)
            out.append(feats.float().cpu())
        return torch.cat(out)
    finally:
        model.train(was_training)


def pixel_features(dataset: ImageTensorDataset, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The raw-pixel baseline: flattened normalised pixels ``(N, 3 * H * W)``."""
    return normalize_batch(dataset.images, mean, std).flatten(1)
