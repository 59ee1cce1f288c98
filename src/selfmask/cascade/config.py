"""Settings of a model cascade (METHOD.md section 4): router, experts and fusion."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from selfmask.errors import SelfmaskError

ROUTERS = ("gmm", "kmeans")
MODES = ("conditional", "unconditional")


@dataclass
class CascadeConfig:
    """How a cascade is built from a dispatcher SMN.

    Attributes:
        num_experts: groups the router splits the training set into, one expert SMN each
            (the paper: 5).
        router: ``gmm`` (a Gaussian mixture with full covariances, the authors' code; the
            default because it is what produced the published numbers, and its soft,
            elliptical groups follow the embedding density better than k-means' Voronoi
            cells) or ``kmeans`` (what the paper's text says).
        router_dim: dimension of the whitened PCA projection the router clusters (the
            authors' code: 20); clamped to what the data allows.
        min_group_size: a cluster with fewer training images is dissolved and its images
            go to their next most likely cluster (the merge is recorded in the manifest);
            at least 2, since SwAV's Sinkhorn step needs 2 images per batch.
        fusion_dim: dimension of the fused embedding (PCA of the concatenated root and
            expert embeddings); ``None`` = the backbone's embedding size, so a fused
            embedding costs a k-NN bank as much as a single SMN's.
        seed: seeds clustering and the experts' training (expert ``g`` uses ``seed + 1 + g``).
    """

    num_experts: int = 5
    router: Literal["gmm", "kmeans"] = "gmm"
    router_dim: int = 20
    min_group_size: int = 16
    fusion_dim: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.num_experts, bool) or not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise SelfmaskError(f"CascadeConfig.num_experts: expected an integer >= 1, got {self.num_experts!r}")
        if self.router not in ROUTERS:
            raise SelfmaskError(f"CascadeConfig.router: expected one of {ROUTERS}, got {self.router!r}")
        if not isinstance(self.router_dim, int) or self.router_dim < 1:
            raise SelfmaskError(f"CascadeConfig.router_dim: expected an integer >= 1, got {self.router_dim!r}")
        if not isinstance(self.min_group_size, int) or self.min_group_size < 2:
            raise SelfmaskError(f"CascadeConfig.min_group_size: expected an integer >= 2, got {self.min_group_size!r}")
        if self.fusion_dim is not None and (not isinstance(self.fusion_dim, int) or self.fusion_dim < 1):
            raise SelfmaskError(f"CascadeConfig.fusion_dim: expected None or an integer >= 1, got {self.fusion_dim!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CascadeConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise SelfmaskError(f"CascadeConfig: unknown keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**data)
