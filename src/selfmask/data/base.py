"""The in-memory dataset every loader produces and every training loop reads.

Images are cached as ``uint8`` tensors ``(N, 3, H, W)`` at a chosen resolution, so
training reads tensors, not files; augmentation and normalisation happen on the
training device, per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from selfmask.errors import SelfmaskError


@dataclass
class ImageTensorDataset:
    """Images ``(N, 3, H, W)`` uint8, labels ``(N,)`` int64 in ``[0, len(classes))``."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str = "dataset"
    meta: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise SelfmaskError(
                f"{self.name}: images must be a uint8 tensor (N, 3, H, W), got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.dim() != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise SelfmaskError(
                f"{self.name}: {self.labels.shape[0] if self.labels.dim() else 0} labels for "
                f"{self.images.shape[0]} images"
            )
        self.labels = self.labels.to(torch.int64)
        if self.labels.numel() and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise SelfmaskError(f"{self.name}: labels outside [0, {len(self.classes)})")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, indices: Sequence[int] | torch.Tensor, name: str | None = None) -> ImageTensorDataset:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageTensorDataset(
            self.images[idx], self.labels[idx], list(self.classes), name or self.name, dict(self.meta)
        )


def normalize_batch(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` -> float, scaled to [0, 1] and normalised per channel."""
    x = images.to(dtype).div_(255.0)
    m = torch.tensor(mean, dtype=dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)
