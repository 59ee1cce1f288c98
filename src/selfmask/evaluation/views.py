"""Do two augmented views of an image look alike to a model? A check to run before SwAV.

SwAV predicts the code of one view from another view of the same image. If the model's
embeddings of two views of an image are no closer than those of two different images, the
codes are hard to predict and the loss tends to stay at ln(K): look at the augmentation
before the optimiser. :func:`view_agreement` measures this with
instance retrieval: for each image, is the nearest view (cosine similarity) among the other
view of every image in the sample the view of the same image?
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfmask.errors import SelfmaskError


@dataclass(frozen=True)
class ViewAgreement:
    """Instance retrieval between views (chance is ``1 / images``).

    Attributes:
        images: images in the sample.
        large_large: fraction of images whose first large crop's nearest second large crop is its own.
        large_small: the same from the first large crop to the first small crop (``None``: no small crops).
        class_large_large: fraction whose nearest second large crop has the same label (``None``: no labels).
    """

    images: int
    large_large: float
    large_small: float | None
    class_large_large: float | None

    @property
    def chance(self) -> float:
        return 1.0 / self.images


def _embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if out.dim() < 2:
        raise SelfmaskError(f"view_agreement: the model returned shape {tuple(out.shape)}; expected (B, D) embeddings")
    return F.normalize(out.flatten(1).float(), dim=1).cpu()


@torch.no_grad()
def view_agreement(
    model: nn.Module,
    images: torch.Tensor,
    crops: object,
    labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> ViewAgreement:
    """Instance retrieval between augmented views of ``images`` under ``model`` (eval mode).

    Args:
        model: maps a normalised (B, 3, H, W) batch to (B, D) embeddings.
        images: uint8 (B, 3, H, W), B >= 2 (a few hundred give a stable figure).
        crops: a :class:`selfmask.data.multicrop.MultiCrop` with at least 2 large crops.
        labels: optional (B,) class labels, for the class-level figure.
        generator: random source of the crops (default: a generator seeded with 0, so repeated
            calls give the same figure and the crops' own random state is left alone).

    The images are moved to the model's device; the figures are computed on the CPU. Each
    module's train/eval mode is restored afterwards.
    """
    n_large = getattr(getattr(crops, "config", None), "n_large", None)
    if n_large is None or n_large < 2:
        raise SelfmaskError("view_agreement: crops must be a MultiCrop with at least 2 large crops")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] < 2:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise SelfmaskError(f"view_agreement: images must be a (B >= 2, 3, H, W) uint8 tensor, got {shape}")
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.dim() != 1
                               or labels.shape[0] != images.shape[0]):
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise SelfmaskError(f"view_agreement: labels must be a tensor of shape ({images.shape[0]},), got {shape}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else images.device
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        views = crops(images.to(device), generator=generator)
        first, second = _embed(model, views[0]), _embed(model, views[1])
        small = _embed(model, views[n_large]) if len(views) > n_large else None
    finally:
        for m, training in modes.items():
            m.training = training
    own = torch.arange(images.shape[0])
    nearest = (first @ second.t()).argmax(dim=1)
    large_small = None if small is None else float(((first @ small.t()).argmax(dim=1) == own).float().mean())
    cls = None
    if labels is not None:
        labels = labels.cpu()
        cls = float((labels[nearest] == labels).float().mean())
    return ViewAgreement(int(images.shape[0]), float((nearest == own).float().mean()), large_small, cls)


__all__ = ["ViewAgreement", "view_agreement"]
