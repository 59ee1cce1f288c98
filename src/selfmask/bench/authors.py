"""The authors' way of masking, written by us as a benchmark baseline (never used for training).

The authors' public code computes, in every masked layer and every forward pass, a
float mask through a straight-through function, ``alpha = sqrt(mean(mask))`` from that
float mask, and ``weight * mask / alpha`` as a new full-size tensor built by autograd:
all masks are recomputed into a second copy of every weight each step, and autograd
keeps the float mask and the intermediate products for the backward pass. The
numbers are ours (METHOD.md section 1, gradient through alpha included), so the
benchmark compares only how they are computed: here, plain autograd on float masks;
in :mod:`selfmask.masking`, a bool mask, one fused backward and (fast path) one mask
pass per step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from selfmask.masking.config import MaskConfig
from selfmask.masking.model import freeze_and_locate_targets


class _StraightThrough(torch.autograd.Function):
    """``1[S > mu]`` as a float tensor, gradient passed through unchanged (``dM/dS = 1``)."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, threshold: float) -> torch.Tensor:  # type: ignore[override]
        return (scores > threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


class AuthorsMask(nn.Module):
    """Parametrization ``weight * M / sqrt(mean(M))`` built from autograd operations on a float mask.

    ``parts``: a fused q/k/v tensor is three tensors in the authors' (Hugging Face) layout,
    each with its own alpha; here each equal part along dim 0 gets its own.
    """

    def __init__(self, weight: torch.Tensor, threshold: float = 0.0, init_score: float = 1.0, parts: int = 1) -> None:
        super().__init__()
        self.threshold = float(threshold)
        self.parts = int(parts)
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32  # as selfmask's scores
        self.scores = nn.Parameter(torch.full_like(weight, init_score, dtype=dtype))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mask = _StraightThrough.apply(self.scores, self.threshold)
        if self.parts == 1:
            return weight * mask / torch.sqrt(mask.mean())
        m = mask.reshape(self.parts, -1)
        return (weight.reshape(self.parts, -1) * m / torch.sqrt(m.mean(dim=1, keepdim=True))).reshape(weight.shape)


def authors_mask_model(model: nn.Module, config: MaskConfig) -> nn.Module:
    """Mask the parameters ``config`` targets the authors' way (threshold mode); freeze the rest.

    Raises:
        ValueError: the config is not in threshold mode with rescaling, or matches nothing.
    """
    if config.mode != "threshold" or not config.rescale:
        raise ValueError("authors_mask_model: only threshold-mode masks with alpha rescaling are modelled")
    for name, module, tensor_name in freeze_and_locate_targets(model, config):
        weight = getattr(module, tensor_name)
        mask = AuthorsMask(weight, config.threshold, config.init_score, config.parts(name, tuple(weight.shape)))
        parametrize.register_parametrization(module, tensor_name, mask, unsafe=True)
    return model


def authors_scores(model: nn.Module) -> dict[str, nn.Parameter]:
    """The score parameters :func:`authors_mask_model` added, by the qualified name of the masked tensor."""
    out = {}
    for module_name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for tensor_name, chain in module.parametrizations.items():
                for p in chain:
                    if isinstance(p, AuthorsMask):
                        out[f"{module_name}.{tensor_name}" if module_name else tensor_name] = p.scores
    return out


__all__ = ["AuthorsMask", "authors_mask_model", "authors_scores"]
