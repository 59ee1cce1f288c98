"""The masked-weight computation: ``theta' = theta * M / alpha`` (METHOD.md section 1).

:class:`MaskedWeight` is the straight-through autograd function and
:class:`ScoreMask` the ``torch.nn.utils.parametrize`` parametrization that owns
the scores of one tensor. Neither knows anything about models or configuration
files: everything they need arrives at construction.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from torch import nn


def threshold_mask(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """``M = 1[S > mu]`` as a bool tensor."""
    return scores > threshold


def topk_count(n: int, keep_ratio: float, rule: str = "authors") -> int:
    """Entries a top-k mask of ``n`` entries keeps, at least one.

    ``"authors"``: ``n - int((1 - keep_ratio) * n)``, as the paper's code (``int`` truncates the
    count dropped); ``"round"``: ``round(keep_ratio * n)`` (mask files of format version 1).
    """
    if rule == "authors":
        k = n - int((1.0 - keep_ratio) * n)
    elif rule == "round":
        k = round(keep_ratio * n)
    else:
        raise ValueError(f"topk_count: unknown rule {rule!r}")
    return max(1, min(n, k))


def topk_mask(scores: torch.Tensor, keep_ratio: float, parts: int = 1, rule: str = "authors") -> torch.Tensor:
    """Keep the ``keep_ratio`` fraction of the largest scores (at least one entry).

    Exactly :func:`topk_count` entries are kept; ties are broken by ``torch.topk``'s
    (deterministic) order. With ``parts > 1`` the tensor is cut into that many equal
    parts along dim 0 and each keeps its own count (fused q/k/v).
    """
    if parts > 1:
        chunks = scores.reshape(parts, -1)
        return torch.stack([topk_mask(chunk, keep_ratio, 1, rule) for chunk in chunks]).view_as(scores)
    n = scores.numel()
    k = topk_count(n, keep_ratio, rule)
    if k == n:
        return torch.ones_like(scores, dtype=torch.bool)
    flat = torch.zeros(n, dtype=torch.bool, device=scores.device)
    flat[scores.detach().reshape(-1).topk(k, sorted=False).indices] = True
    return flat.view_as(scores)


def selective_trainable_mask(
    shape: torch.Size | tuple[int, ...], trainable_fraction: float, seed: int, name: str
) -> torch.Tensor:
    """The entries of tensor ``name`` that selective masking trains (bool, CPU).

    Exactly ``max(1, round(trainable_fraction * n))`` entries of the ``n`` are chosen
    uniformly at random (``torch.randperm``) by a generator seeded from ``seed`` and
    ``name``, so the choice depends on neither the order of the tensors nor anything
    else, and a mask file can regenerate it from its ``MaskConfig`` (paper appendix:
    selective masking).
    """
    n = math.prod(shape)
    if n == 0:
        return torch.zeros(tuple(shape), dtype=torch.bool)
    k = max(1, min(n, round(trainable_fraction * n)))
    digest = hashlib.sha256(f"selfmask-selective:{int(seed)}:{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    flat = torch.zeros(n, dtype=torch.bool)
    flat[torch.randperm(n, generator=generator)[:k]] = True
    return flat.view(tuple(shape))


def _inv_alpha(mask: torch.Tensor, dtype: torch.dtype, parts: int = 1) -> torch.Tensor:
    """``1 / sqrt(mean(M))`` without a host synchronisation (per part: a ``(parts,)`` tensor).

    An all-zero mask would make alpha zero; the output is zero there whatever
    alpha is, so the count is clamped to one to keep every number finite.
    """
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if parts > 1:
        count = mask.reshape(parts, -1).sum(dim=1, dtype=acc).clamp_min(1.0)
        return torch.rsqrt(count / (mask.numel() // parts)).to(dtype)
    count = mask.sum(dtype=acc).clamp_min(1.0)
    return torch.rsqrt(count / mask.numel()).to(dtype)


def _scale_parts(t: torch.Tensor, factor: torch.Tensor) -> None:
    """``t *= factor`` in place; a ``(parts,)`` factor scales each equal part of dim 0 by its own number."""
    if factor.dim() == 0:
        t.mul_(factor)
    else:
        t.view(factor.numel(), -1).mul_(factor.unsqueeze(1))


class MaskedWeight(torch.autograd.Function):
    """``theta * M / alpha`` with a straight-through gradient to the scores.

    Forward: ``out = weight * M * inv_alpha`` with ``inv_alpha = 1/sqrt(mean(M))``
    (or 1 without rescaling). Backward (straight-through, ``dM/dS = 1``), as the
    authors' code, whose alpha is computed from the straight-through mask::

        dL/dS_i = g_i * w_i / alpha  -  sum_j(g_j * w_j * M_j) / (2 * n * alpha**3)

    where ``g = dL/dout``. The second term is the gradient through alpha.

    A fused q/k/v tensor masked in parts has one alpha per part: ``inv_alpha`` is then a
    ``(parts,)`` tensor, ``n`` and the sum run over each part, exactly as three tensors.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        weight: torch.Tensor,
        scores: torch.Tensor,
        mask: torch.Tensor,
        rescale: bool,
        inv_alpha: torch.Tensor | None = None,
        parts: int = 1,
    ) -> torch.Tensor:
        # ``inv_alpha`` may arrive precomputed (the fast path, :class:`FlatMaskCache`); it is
        # the very number ``_inv_alpha(mask, dtype)`` gives, computed for all tensors at once.
        out = torch.mul(weight, mask)
        if not rescale:
            inv_alpha = None
        elif inv_alpha is None:
            inv_alpha = _inv_alpha(mask, weight.dtype, parts)
        if inv_alpha is not None:
            _scale_parts(out, inv_alpha)
        # The output is the weight the layer uses; the layer saves it for its own
        # backward anyway, so keeping it here costs no memory. The mask (1 byte per
        # entry) is kept only when the weight itself needs a gradient.
        ctx.inv_alpha = inv_alpha
        ctx.save_for_backward(weight, out, mask if ctx.needs_input_grad[0] else None)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        weight, out, mask = ctx.saved_tensors
        grad_weight = grad_scores = None
        inv_alpha = ctx.inv_alpha
        if ctx.needs_input_grad[1]:
            grad_scores = torch.mul(grad_out, weight)
            if inv_alpha is not None and inv_alpha.dim() == 0:
                grad_scores.mul_(inv_alpha)
                # sum(g*w*M) / (2 n alpha^3) = <g, out> * inv_alpha^2 / (2n), as out = w*M*inv_alpha
                dot = torch.dot(grad_out.reshape(-1), out.reshape(-1))
                grad_scores.sub_(dot * (inv_alpha * inv_alpha) / (2 * out.numel()))
            elif inv_alpha is not None:  # one alpha per part: the same per part
                parts = inv_alpha.numel()
                _scale_parts(grad_scores, inv_alpha)
                dot = (grad_out.reshape(parts, -1) * out.reshape(parts, -1)).sum(dim=1)
                correction = dot * (inv_alpha * inv_alpha) / (2 * (out.numel() // parts))
                grad_scores.view(parts, -1).sub_(correction[:, None])
        if ctx.needs_input_grad[0]:
            grad_weight = grad_out * mask
            if inv_alpha is not None:
                _scale_parts(grad_weight, inv_alpha)
        return grad_weight, grad_scores, None, None, None, None


class ScoreMask(nn.Module):
    """Parametrization replacing a tensor ``theta`` by ``theta * M / alpha``.

    It holds the real-valued ``scores`` (same shape as ``theta``) as its only
    parameter. Registered with ``torch.nn.utils.parametrize``, so the host module
    keeps its class and its forward; ``module.weight`` simply becomes the masked
    weight, and the frozen original lives at
    ``module.parametrizations.weight.original`` (PyTorch's naming).

    Args:
        shape: shape of the masked tensor.
        mode: ``"threshold"`` or ``"topk"``.
        threshold: ``mu`` (threshold mode).
        keep_ratio: fraction kept per tensor (top-k mode).
        rescale: divide by ``alpha = sqrt(mean(M))``.
        init_score: ``S0``.
        init_noise: half-width of uniform noise added to ``S0``.
        generator: random generator for the noise (CPU).
        device, dtype: where the scores live (float32 unless the weight is float64).
        trainable: selective masking (threshold mode): a bool tensor of the shape,
            True where the entry is trainable; elsewhere ``M = 1`` and the score gets
            no gradient. ``None`` (the default) trains every entry.
        parts: mask the tensor as this many equal parts along dim 0, each with its own
            alpha and top-k count (3 for a fused q/k/v tensor; 1, the default, for the rest).
        topk_count: the top-k count rule (:func:`topk_count`).
    """

    def __init__(
        self,
        shape: torch.Size | tuple[int, ...],
        *,
        mode: str = "threshold",
        threshold: float = 0.0,
        keep_ratio: float | None = None,
        rescale: bool = True,
        init_score: float = 1.0,
        init_noise: float = 0.0,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        trainable: torch.Tensor | None = None,
        parts: int = 1,
        topk_count: str = "authors",
    ) -> None:
        super().__init__()
        self.topk_count = topk_count
        if parts < 1 or (parts > 1 and (not shape or shape[0] % parts)):
            raise ValueError(f"ScoreMask: cannot cut shape {list(shape)} into {parts} equal parts along dim 0")
        self.parts = int(parts)
        if mode not in ("threshold", "topk"):
            raise ValueError(f"ScoreMask: unknown mode {mode!r}")
        if mode == "topk" and keep_ratio is None:
            raise ValueError("ScoreMask: mode='topk' needs keep_ratio")
        self.mode = mode
        self.threshold = float(threshold)
        self.keep_ratio = None if keep_ratio is None else float(keep_ratio)
        self.rescale = bool(rescale)
        scores = torch.full(tuple(shape), float(init_score), dtype=dtype)
        if init_noise:
            noise = torch.rand(tuple(shape), generator=generator, dtype=torch.float64)
            scores += ((noise * 2 - 1) * init_noise).to(dtype)
        self.scores = nn.Parameter(scores.to(device))
        if trainable is not None:
            if mode != "threshold":
                raise ValueError("ScoreMask: a trainable subset (selective masking) needs mode='threshold'")
            if tuple(trainable.shape) != tuple(shape) or trainable.dtype != torch.bool:
                raise ValueError(f"ScoreMask: trainable must be a bool tensor of shape {tuple(shape)}")
            trainable = trainable.to(device)
        self.register_buffer("trainable", trainable, persistent=False)
        self._selective = trainable is not None  # a plain attribute: the default path stays as fast
        # the fast path (:func:`~selfmask.masking.model.enable_fast_masks`): a cache shared by
        # every mask of a model that computes all masks and alphas in one pass per step
        self._flat_cache: FlatMaskCache | None = None
        self._flat_index = -1

    def mask(self) -> torch.Tensor:
        """The current binary mask (bool, no gradient)."""
        with torch.no_grad():
            if self.mode == "topk":
                assert self.keep_ratio is not None
                return topk_mask(self.scores, self.keep_ratio, self.parts, self.topk_count)
            if self._selective:
                return threshold_mask(self.scores, self.threshold) | ~self.trainable
            return threshold_mask(self.scores, self.threshold)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self._flat_cache is not None:
            mask, inv_alpha = self._flat_cache.lookup(self._flat_index)
            scores = self.scores
            if self._selective:
                scores = torch.where(self.trainable, scores, scores.detach())
            return MaskedWeight.apply(weight, scores, mask, self.rescale, inv_alpha, self.parts)
        if self._selective:
            # fixed entries: M = 1 (in mask()) and no gradient to their scores
            scores = torch.where(self.trainable, self.scores, self.scores.detach())
            return MaskedWeight.apply(weight, scores, self.mask(), self.rescale, None, self.parts)
        return MaskedWeight.apply(weight, self.scores, self.mask(), self.rescale, None, self.parts)

    def extra_repr(self) -> str:
        detail = f"keep_ratio={self.keep_ratio}" if self.mode == "topk" else f"threshold={self.threshold}"
        text = f"shape={tuple(self.scores.shape)}, mode={self.mode}, {detail}, rescale={self.rescale}"
        if self.parts > 1:
            text += f", parts={self.parts}"
        if self._selective:
            text += f", trainable={int(self.trainable.sum())}/{self.trainable.numel()}"
        return text


class FlatMaskCache:
    """The fast path: masks and alphas of many threshold-mode :class:`ScoreMask` s in one pass.

    The scores of every member live in one flat buffer per (device, dtype): each
    ``ScoreMask.scores`` parameter keeps its identity (optimisers, state dicts and
    names are untouched) but its storage becomes a view into the buffer. One pass
    computes ``M = 1[S > mu]`` of all tensors with one comparison, the active counts
    of all tensors with one segmented sum and every ``1/alpha`` with one ``rsqrt``;
    the per-tensor masks are views of the result. The pass is cached and redone only
    when a member's scores changed (an optimiser step, a ``load_state_dict``: tracked
    by the parameters' version counters), so a step with several forward passes
    (SwAV's multi-crop) computes its masks once.

    The numbers are the plain path's: the same comparison, exact integer counts (in
    float32 up to 2**24 entries per tensor, float64 above) and the same
    ``rsqrt(count / n)``, so masks and masked weights are identical. A member masked in
    parts (fused q/k/v) counts as that many segments and gets a ``(parts,)`` ``1/alpha``.

    Args:
        members: threshold-mode score masks (top-k masks cannot share one pass).
    """

    def __init__(self, members: list[ScoreMask]) -> None:
        if not members:
            raise ValueError("FlatMaskCache: no score masks given")
        for pm in members:
            if pm.mode != "threshold":
                raise ValueError(f"FlatMaskCache: only threshold-mode masks share a pass, got mode={pm.mode!r}")
        self.members = list(members)
        self._groups: list[_FlatGroup] = []
        by_key: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, pm in enumerate(self.members):
            by_key.setdefault((pm.scores.device, pm.scores.dtype), []).append(i)
        self._group_of = [0] * len(self.members)
        self._row = [0] * len(self.members)
        for g, indices in enumerate(by_key.values()):
            self._groups.append(_FlatGroup([self.members[i] for i in indices]))
            for row, i in enumerate(indices):
                self._group_of[i], self._row[i] = g, row
        for i, pm in enumerate(self.members):
            pm._flat_cache, pm._flat_index = self, i

    def lookup(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask, inv_alpha)`` of member ``index``, recomputing the pass if its scores changed."""
        group = self._groups[self._group_of[index]]
        row = self._row[index]
        if not group.fresh(row):
            group.refresh()
        return group.masks[row], group.inv_alpha[row]

    def detach(self) -> None:
        """Return every member to the plain path (their scores keep their values)."""
        for pm in self.members:
            pm._flat_cache, pm._flat_index = None, -1


class _FlatGroup:
    """Members of one device and dtype: one flat score buffer and its cached pass."""

    def __init__(self, members: list[ScoreMask]) -> None:
        self.members = members
        self.lengths = [pm.scores.numel() for pm in members]
        # count segments: one per part of each member (fused q/k/v: three)
        self.segments = [n // pm.parts for pm, n in zip(members, self.lengths) for _ in range(pm.parts)]
        self.flat = torch.empty(0)
        self.masks: list[torch.Tensor] = []
        self.inv_alpha: list[torch.Tensor] = []
        self._versions = [-1] * len(members)
        self._pointers = [-1] * len(members)
        self._flatten()

    def _flatten(self) -> None:
        """Move the scores into one buffer; each parameter's storage becomes a view of it."""
        first = self.members[0].scores
        with torch.no_grad():
            self.flat = torch.cat([pm.scores.detach().reshape(-1) for pm in self.members]) if self.members else first
            offset = 0
            for pm, n in zip(self.members, self.lengths):
                pm.scores.data = self.flat[offset : offset + n].view(pm.scores.shape)
                offset += n
        device = self.flat.device
        self._lengths_t = torch.tensor(self.segments, dtype=torch.long, device=device)
        # exact integer counts: float32 holds every integer up to 2**24
        self._acc = torch.float64 if self.flat.dtype == torch.float64 or max(self.lengths) > 2**24 else torch.float32
        self._numels = torch.tensor(self.segments, dtype=self._acc, device=device)
        thresholds = {pm.threshold for pm in self.members}
        self._threshold: float | torch.Tensor = thresholds.pop() if len(thresholds) == 1 else torch.cat(
            [torch.full((n,), pm.threshold, dtype=self.flat.dtype) for pm, n in zip(self.members, self.lengths)]
        ).to(device)
        self._fixed: torch.Tensor | None = None
        if any(pm._selective for pm in self.members):
            self._fixed = torch.cat(
                [
                    (~pm.trainable).reshape(-1) if pm._selective else torch.zeros(n, dtype=torch.bool, device=device)
                    for pm, n in zip(self.members, self.lengths)
                ]
            )
        self._pointers = [pm.scores.data_ptr() for pm in self.members]
        self._versions = [-1] * len(self.members)

    def fresh(self, row: int) -> bool:
        scores = self.members[row].scores
        return scores._version == self._versions[row] and scores.data_ptr() == self._pointers[row]

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute every mask and ``1/alpha`` of the group in one pass."""
        if any(pm.scores.data_ptr() != ptr for pm, ptr in zip(self.members, self._pointers)):
            self._flatten()  # the parameters were moved (``.to()``) or replaced: gather them again
        mask = self.flat > self._threshold
        if self._fixed is not None:
            mask |= self._fixed
        counts = torch.segment_reduce(mask.to(self._acc), "sum", lengths=self._lengths_t)
        inv_alpha = torch.rsqrt(counts.clamp_min(1.0) / self._numels).to(self.flat.dtype)
        self.masks = [m.view(pm.scores.shape) for m, pm in zip(mask.split(self.lengths), self.members)]
        per_member = inv_alpha.split([pm.parts for pm in self.members])
        self.inv_alpha = [a if pm.parts > 1 else a[0] for a, pm in zip(per_member, self.members)]
        self._versions = [pm.scores._version for pm in self.members]
