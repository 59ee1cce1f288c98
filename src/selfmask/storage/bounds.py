"""Information bounds of one binary mask: what the best coder of each kind of model can reach.

Each bound is an empirical entropy: the bits a coder would need if it knew, for free,
the active fraction of every context it conditions on (METHOD.md section 5).

* per tensor: ``n H(k / n)``, one probability for all entries (what ``"ans"`` reaches);
* per channel: ``sum_i cols H(k_i / cols)`` over the output channels (rows) of the tensor;
* weight-conditioned: ``sum_b n_b H(k_b / n_b)`` over :data:`BOUND_BINS` quantile bins of
  ``|w|`` within the tensor (the base weights; :func:`selfmask.storage.conditional.weight_bins`).

``"ans-channel"`` and ``"ans-weight"`` pay for their counts on top, and can go below a
bound when they use finer contexts than it.
"""

from __future__ import annotations

import numpy as np

from selfmask.storage.conditional import context_entropy_bits, weight_bins

#: Quantile bins of |w| of the weight-conditioned bound.
BOUND_BINS = 16


def tensor_bounds(flat: np.ndarray, rows: int | None = None, weights: np.ndarray | None = None) -> dict[str, float | None]:
    """Bounds in bits of a flat bool mask: ``per_tensor``, ``per_channel`` (``None`` without
    ``rows``), ``weight`` (``None`` without the flat base ``weights`` of the same entries)."""
    n = flat.size
    out: dict[str, float | None] = {
        "per_tensor": context_entropy_bits(np.array([np.count_nonzero(flat)]), np.array([n])),
        "per_channel": None,
        "weight": None,
    }
    if rows is not None and rows > 0 and n % rows == 0:
        cols = n // rows
        out["per_channel"] = context_entropy_bits(np.count_nonzero(flat.reshape(rows, cols), axis=1), np.full(rows, cols))
    if weights is not None and weights.size == n:
        bins = weight_bins(weights, BOUND_BINS)
        out["weight"] = context_entropy_bits(
            np.bincount(bins, weights=flat.astype(np.float64), minlength=BOUND_BINS), np.bincount(bins, minlength=BOUND_BINS)
        )
    return out


__all__ = ["BOUND_BINS", "tensor_bounds"]
