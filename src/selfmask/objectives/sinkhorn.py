"""Sinkhorn-Knopp soft assignment of samples to prototypes (SwAV, Caron et al. 2020; METHOD.md section 2).

SwAV turns the prototype scores of a batch into *codes*: a soft assignment in
which every sample's code sums to 1 and the prototypes share the batch equally
(equipartition). The codes are the entropy-regularised optimal transport plan
between the samples and the prototypes, approximated by a few Sinkhorn-Knopp
iterations that alternately rescale the prototypes and the samples.

This implementation runs the very same iterations as the public SwAV code, but in
the log domain: every normalising sum is a ``logsumexp`` that subtracts its maximum
before exponentiating, so logits of any magnitude (1e4 and beyond) give finite
codes, where ``exp(scores / epsilon)`` overflows or underflows to a column of zeros
and then to NaN.

Distributed training: each process holds a slice of the batch. The per-prototype
sums run over the whole global batch, so they (and the per-prototype maxima) are
all-reduced; the per-sample sums are local. The result on every process is then
its slice of the single-process result on the concatenated batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.distributed as dist

from selfmask.errors import SelfmaskError

#: ``all_reduce(tensor, op)`` with ``op`` in ``{"sum", "max"}``: returns the tensor reduced over
#: every process (it may reduce in place and return its argument).
AllReduce = Callable[[torch.Tensor, Literal["sum", "max"]], torch.Tensor]


def torch_distributed_all_reduce(tensor: torch.Tensor, op: Literal["sum", "max"]) -> torch.Tensor:
    """:data:`AllReduce` over the default ``torch.distributed`` process group (in place)."""
    reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
    dist.all_reduce(tensor, op=reduce_op)
    return tensor


def resolve_all_reduce(all_reduce: AllReduce | None) -> AllReduce | None:
    """The injected hook, else ``torch.distributed`` when it is initialised with more than one process."""
    if all_reduce is not None:
        return all_reduce
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return torch_distributed_all_reduce
    return None


@torch.no_grad()
def sinkhorn_knopp(
    scores: torch.Tensor,
    epsilon: float = 0.05,
    iterations: int = 3,
    all_reduce: AllReduce | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Codes ``Q`` (B, K) for prototype scores ``scores`` (B, K) by Sinkhorn-Knopp.

    Starting from ``Q ~ exp(scores / epsilon)``, each iteration first rescales every
    prototype (column) to a total mass of ``1/K`` over the global batch, then every
    sample (row) to ``1/B``; finally the rows are scaled by ``B``.

    Marginals (the convention of SwAV's code):

    * every row of the result sums to 1 (up to rounding): it is a soft assignment;
    * after the last prototype step every column summed to exactly ``1/K`` of the
      total mass; the final sample step perturbs that, so the column sums of the
      result are ``B/K`` up to Sinkhorn's convergence error (small after 3
      iterations for cosine-similarity scores, vanishing as ``iterations`` grows).

    Args:
        scores: (B, K) prototype scores of the local batch (cosine similarities in SwAV).
        epsilon: entropy regularisation (0.05 in the paper); smaller is sharper.
        iterations: Sinkhorn iterations (3 in the paper).
        all_reduce: hook that reduces a tensor over processes; ``None`` uses
            ``torch.distributed`` when it is initialised with more than one process,
            else the batch is the whole batch.
        dtype: float32 or float64, the precision used inside (the result has this dtype);
            ``None`` (the default): the run's, i.e. the scores' dtype, float32 for half
            precision (a float64 run gets float64 codes).

    Returns:
        (B, K) codes, no gradient.

    Raises:
        SelfmaskError: scores not 2-D, fewer than 2 prototypes, a global batch smaller
            than 2 (one sample cannot be spread over prototypes), bad epsilon/iterations.

    Example::

        codes = sinkhorn_knopp(z @ prototypes.T)   # rows sum to 1
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise SelfmaskError(f"sinkhorn_knopp: scores must be a 2-D tensor (batch, prototypes), got {shape}")
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise SelfmaskError(f"sinkhorn_knopp: epsilon must be a finite number > 0, got {epsilon!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise SelfmaskError(f"sinkhorn_knopp: iterations must be an integer >= 1, got {iterations!r}")
    if dtype is None:
        dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    if dtype not in (torch.float32, torch.float64):
        raise SelfmaskError(f"sinkhorn_knopp: dtype must be torch.float32 or torch.float64, got {dtype}")
    local_batch, num_prototypes = scores.shape
    if num_prototypes < 2:
        raise SelfmaskError(f"sinkhorn_knopp: need at least 2 prototypes, got scores of shape {tuple(scores.shape)}")
    reduce = resolve_all_reduce(all_reduce)
    global_batch = local_batch
    if reduce is not None:
        count = torch.tensor([float(local_batch)], dtype=torch.float64, device=scores.device)
        global_batch = round(float(reduce(count, "sum").item()))
    if global_batch < 2:
        raise SelfmaskError(
            f"sinkhorn_knopp: the batch has {global_batch} sample(s); Sinkhorn needs at least 2 "
            "to share the prototypes between samples"
        )
    log_k = math.log(num_prototypes)
    log_b = math.log(global_batch)
    log_q = scores.detach().to(dtype) / epsilon
    for _ in range(iterations):
        # prototypes: total mass 1/K each, summed over the global batch
        col_max = log_q.amax(dim=0, keepdim=True)
        if reduce is not None:
            col_max = reduce(col_max.clone(), "max")
        col_sum = torch.exp(log_q - col_max).sum(dim=0, keepdim=True)
        if reduce is not None:
            col_sum = reduce(col_sum, "sum")
        log_q = log_q - (col_max + torch.log(col_sum)) - log_k
        # samples: total mass 1/B each (local sums)
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - log_b
    return torch.exp(log_q + log_b)


__all__ = ["AllReduce", "resolve_all_reduce", "sinkhorn_knopp", "torch_distributed_all_reduce"]
