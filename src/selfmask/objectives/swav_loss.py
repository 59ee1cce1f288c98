"""SwAV's swapped-prediction loss (Caron et al. 2020, eq. 1-3; METHOD.md section 2).

The codes of one view (computed by Sinkhorn-Knopp from the prototype scores of
the large crops, ``crops_for_assign``) are predicted from the prototype scores of
every *other* crop through a softmax with temperature 0.1; the loss is the
cross-entropy between codes and predictions, averaged over the predicting crops
and the assigned crops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from selfmask.errors import SelfmaskError
from selfmask.objectives.sinkhorn import AllReduce, sinkhorn_knopp


def _check_crop_scores(crop_scores: Sequence[torch.Tensor], crops_for_assign: Sequence[int], where: str) -> None:
    if len(crop_scores) < 2:
        raise SelfmaskError(f"{where}: need scores for at least 2 crops, got {len(crop_scores)}")
    if not crops_for_assign:
        raise SelfmaskError(f"{where}: crops_for_assign is empty")
    first = crop_scores[0]
    for v, s in enumerate(crop_scores):
        if s.dim() != 2 or s.shape != first.shape:
            raise SelfmaskError(
                f"{where}: crop {v} has scores of shape {tuple(s.shape)}; every crop must have "
                f"(batch, prototypes) = {tuple(first.shape)}"
            )
    for a in crops_for_assign:
        if not 0 <= a < len(crop_scores):
            raise SelfmaskError(f"{where}: crops_for_assign entry {a} is not a crop index in [0, {len(crop_scores)})")


def swav_loss(
    crop_scores: Sequence[torch.Tensor],
    codes: Sequence[torch.Tensor],
    crops_for_assign: Sequence[int] = (0, 1),
    temperature: float = 0.1,
) -> torch.Tensor:
    """Swapped-prediction loss.

    Args:
        crop_scores: one (B, K) tensor of prototype scores per crop (``z @ C^T`` with
            L2-normalised ``z`` and prototype rows ``C``), the same B images in every crop.
        codes: one (B, K) code tensor per entry of ``crops_for_assign`` (rows sum to 1;
            treated as constants).
        crops_for_assign: the crops whose codes are targets (0 and 1, the large crops).
        temperature: softmax temperature of the predictions (0.1 in the paper).

    Returns:
        Scalar loss: ``mean_a mean_{v != a} mean_b -sum_k q_a[b, k] log softmax(s_v[b] / T)[k]``.

    Example::

        codes = [sinkhorn_knopp(s.detach()) for s in scores[:2]]
        loss = swav_loss(scores, codes)
    """
    _check_crop_scores(crop_scores, crops_for_assign, "swav_loss")
    if len(codes) != len(crops_for_assign):
        raise SelfmaskError(f"swav_loss: got {len(codes)} code tensors for crops_for_assign={tuple(crops_for_assign)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise SelfmaskError(f"swav_loss: temperature must be a finite number > 0, got {temperature!r}")
    shape = crop_scores[0].shape
    for a, q in zip(crops_for_assign, codes):
        if q.shape != shape:
            raise SelfmaskError(f"swav_loss: codes for crop {a} have shape {tuple(q.shape)}, expected {tuple(shape)}")
    log_p = F.log_softmax(torch.stack(list(crop_scores)) / temperature, dim=2)  # (V, B, K)
    n_crops = len(crop_scores)
    total = crop_scores[0].new_zeros(())
    for a, q in zip(crops_for_assign, codes):
        others = [v for v in range(n_crops) if v != a]
        ce = -(q.detach().to(log_p.dtype).unsqueeze(0) * log_p[others]).sum(dim=2)  # (V-1, B)
        total = total + ce.mean()
    return total / len(crops_for_assign)


def assign_codes(
    crop_scores: Sequence[torch.Tensor],
    crops_for_assign: Sequence[int] = (0, 1),
    epsilon: float = 0.05,
    iterations: int = 3,
    queue_scores: Sequence[torch.Tensor] | None = None,
    all_reduce: AllReduce | None = None,
) -> list[torch.Tensor]:
    """Codes of the assigned crops by Sinkhorn-Knopp, optionally with queued scores.

    With ``queue_scores`` (one (L, K) tensor per assigned crop: the scores of queued
    embeddings from earlier batches), Sinkhorn runs on the queue and the batch
    together (more samples to share the prototypes) and the batch's rows are kept,
    as in SwAV. No gradient flows into the codes.
    """
    _check_crop_scores(crop_scores, crops_for_assign, "assign_codes")
    if queue_scores is not None and len(queue_scores) != len(crops_for_assign):
        raise SelfmaskError(
            f"assign_codes: got {len(queue_scores)} queue score tensors for crops_for_assign={tuple(crops_for_assign)}"
        )
    batch = crop_scores[0].shape[0]
    codes = []
    for i, a in enumerate(crops_for_assign):
        scores = crop_scores[a].detach()
        if queue_scores is not None:
            scores = torch.cat([queue_scores[i].detach().to(scores.dtype), scores])
        codes.append(sinkhorn_knopp(scores, epsilon, iterations, all_reduce)[-batch:])
    return codes


class SwAVLoss(nn.Module):
    """Thin module: codes by :func:`assign_codes`, then :func:`swav_loss`.

    Example::

        criterion = SwAVLoss()
        loss = criterion([z @ C.T for z in crop_embeddings])
    """

    def __init__(
        self,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        crops_for_assign: Sequence[int] = (0, 1),
        all_reduce: AllReduce | None = None,
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.epsilon = epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.crops_for_assign = tuple(crops_for_assign)
        self.all_reduce = all_reduce

    def forward(
        self, crop_scores: Sequence[torch.Tensor], queue_scores: Sequence[torch.Tensor] | None = None
    ) -> torch.Tensor:
        codes = assign_codes(
            crop_scores, self.crops_for_assign, self.epsilon, self.sinkhorn_iterations, queue_scores, self.all_reduce
        )
        return swav_loss(crop_scores, codes, self.crops_for_assign, self.temperature)


def collapse_warning(
    loss: float,
    num_prototypes: int,
    used_fraction: float,
    tolerance: float = 0.02,
    min_used_fraction: float = 0.10,
    assignments: int | None = None,
) -> str | None:
    """A warning when SwAV training shows the signs of collapse, else ``None``.

    Collapse shows as a loss stuck at ``ln(K)`` (uniform predictions) or as few
    prototypes ever being any sample's most likely code. Pass epoch means/counts,
    not a single step: one batch of B images can reach at most ``2B`` prototypes.

    Args:
        loss: the (mean) SwAV loss.
        num_prototypes: K.
        used_fraction: fraction of the K prototypes that were the argmax of at least
            one code (see :meth:`SwAVObjective.prototype_usage`).
        tolerance: absolute distance from ``ln(K)``, in nats, that counts as "at ln(K)".
        min_used_fraction: below this fraction of prototypes used, warn (10 %).
        assignments: number of codes behind ``used_fraction``; when given, the
            threshold is taken of ``min(K, assignments)`` so small batches do not warn
            for a limit they cannot reach.
    """
    if not math.isfinite(loss):
        return f"SwAV loss is {loss}: training diverged"
    ln_k = math.log(num_prototypes)
    if abs(loss - ln_k) <= tolerance:
        return (
            f"possible collapse: SwAV loss {loss:.4f} sits at ln({num_prototypes}) = {ln_k:.4f} "
            "(uniform predictions)"
        )
    reachable = num_prototypes if assignments is None else max(1, min(num_prototypes, assignments))
    threshold = min_used_fraction * reachable / num_prototypes
    if used_fraction < threshold:
        return (
            f"possible collapse: only {used_fraction:.1%} of {num_prototypes} prototypes receive assignments "
            f"(expected at least {threshold:.1%})"
        )
    return None


__all__ = ["SwAVLoss", "assign_codes", "collapse_warning", "swav_loss"]
