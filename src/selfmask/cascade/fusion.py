"""Fusion of root and expert embeddings (METHOD.md section 4, step 4).

Every model's embedding is L2-normalised (so no model dominates by scale), the root and the
``k`` expert embeddings are concatenated (``(1 + k) * D`` values), and a PCA fitted on the
training set reduces the concatenation to ``fusion_dim``. Unconditional fusion fills every
expert's slot; conditional fusion fills only the routed expert's slot and leaves the others
zero, so it needs only two forward passes per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from selfmask.cascade.config import MODES
from selfmask.cascade.router import fit_pca
from selfmask.errors import SelfmaskError

if TYPE_CHECKING:
    from selfmask.cascade.model import Cascade
    from selfmask.data.base import ImageTensorDataset


def concat_parts(root: torch.Tensor, experts: list[torch.Tensor | None], routes: torch.Tensor | None) -> torch.Tensor:
    """``(N, (1 + k) * D)`` float64: L2-normalised root then expert embeddings.

    ``experts[g]`` is ``(N, D)`` (unconditional, ``routes`` None) or the embeddings of the
    rows routed to ``g`` only (conditional, ``routes`` gives each row's expert; ``None``
    when no row went to ``g``). Slots of experts a row was not routed to stay zero.
    """
    n, d = root.shape
    out = torch.zeros(n, (1 + len(experts)) * d, dtype=torch.float64)
    out[:, :d] = torch.nn.functional.normalize(root.double(), dim=1)
    for g, emb in enumerate(experts):
        if emb is None:
            continue
        cols = slice((1 + g) * d, (2 + g) * d)
        normed = torch.nn.functional.normalize(emb.double(), dim=1)
        if routes is None:
            out[:, cols] = normed
        else:
            out[routes == g, cols] = normed
    return out


@dataclass
class FusionPCA:
    """``(x - mean) @ components.T``: the fitted reduction of concatenated embeddings (float64 tensors)."""

    mean: torch.Tensor  # ((1 + k) * D,)
    components: torch.Tensor  # (fusion_dim, (1 + k) * D)

    @classmethod
    def fit(cls, concatenated: torch.Tensor, dim: int) -> FusionPCA:
        """Fit on the training set's concatenations; ``dim`` is clamped to ``min(N - 1, width)``."""
        n, width = concatenated.shape
        dim = max(1, min(dim, width, n - 1))
        mean, comps, _var = fit_pca(concatenated.double().numpy(), dim)
        return cls(torch.from_numpy(mean), torch.from_numpy(comps.copy()))

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    def __call__(self, concatenated: torch.Tensor) -> torch.Tensor:
        if concatenated.dim() != 2 or concatenated.shape[1] != self.mean.shape[0]:
            raise SelfmaskError(
                f"fusion: expected concatenated embeddings of width {self.mean.shape[0]}, got {tuple(concatenated.shape)}"
            )
        return ((concatenated.double() - self.mean) @ self.components.T).float()

    def check(self, width: int, where: str) -> None:
        if self.mean.shape != (width,) or self.components.dim() != 2 or self.components.shape[1] != width:
            raise SelfmaskError(
                f"{where}: fusion PCA has mean {list(self.mean.shape)} and components {list(self.components.shape)}; "
                f"expected width {width}"
            )


def embed_dataset(cascade: Cascade, data: ImageTensorDataset, mode: str, batch_size: int) -> dict[str, Any]:
    """A whole dataset's root embeddings, routes and concatenated parts (``mode``), in batches."""
    roots, routes, parts = [], [], []
    for i in range(0, len(data), batch_size):
        root, experts, rt = cascade.embed_parts(data.images[i : i + batch_size], mode)
        roots.append(root)
        routes.append(rt)
        parts.append(concat_parts(root, experts, None if mode == "unconditional" else rt))
    return {"root": torch.cat(roots), "routes": torch.cat(routes), "concat": torch.cat(parts)}


def fit_fusion(cascade: Cascade, train_set: ImageTensorDataset, dim: int, batch_size: int = 256) -> None:
    """Fit both modes' fusion PCA (to ``dim``) on ``train_set``'s concatenated embeddings, in place."""
    for mode in MODES:
        cascade.fusion[mode] = FusionPCA.fit(embed_dataset(cascade, train_set, mode, batch_size)["concat"], dim)
