"""The cascade's router: cluster whitened PCA projections of L2-normalised embeddings (METHOD.md section 4).

The authors' code fits a 5-component Gaussian mixture to a whitened 20-d PCA of the
dispatcher's L2-normalised training embeddings; the paper's text says k-means. Both are
here (:func:`fit_router`). Fitting uses NumPy / scikit-learn; the fitted router is a handful
of plain tensors (:meth:`Router.tensors`), and routing is a few torch matrix products, so a
saved router needs neither scikit-learn nor pickle.

Clusters smaller than ``min_group_size`` (k-means and mixtures can leave a component empty,
or with too few images to train an expert on) are dissolved one at a time, smallest first:
their images go to their next most likely remaining cluster and the component is dropped
from the stored router, so routing never picks it. Every merge is recorded in ``notes``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from selfmask.errors import SelfmaskError


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fit_pca(x: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mean (D,), components (dim, D), variances (dim,))`` of ``x`` (float64, deterministic signs).

    Each component's sign is fixed so that its largest-magnitude entry is positive.
    """
    mean = x.mean(0)
    _u, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = vt[:dim]
    signs = np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(1)])
    comps = comps * np.where(signs == 0, 1.0, signs)[:, None]
    variances = s[:dim] ** 2 / max(1, x.shape[0] - 1)
    return mean, comps, variances


@dataclass
class Router:
    """A fitted router: whitening PCA plus k-means centres or Gaussian mixture components.

    Tensors (float64): ``mean (D,)``, ``components (d, D)``, ``scale (d,)`` (1 / sqrt of
    each component's variance); k-means: ``centers (k, d)``; mixture: ``means (k, d)``,
    ``precisions_cholesky (k, d, d)``, ``log_weights (k,)``.
    """

    method: str
    tensors: dict[str, torch.Tensor]
    notes: list[str] = field(default_factory=list)

    @property
    def num_groups(self) -> int:
        return int(self.tensors["centers" if self.method == "kmeans" else "means"].shape[0])

    @property
    def input_dim(self) -> int:
        return int(self.tensors["mean"].shape[0])

    def project(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Whitened PCA coordinates ``(N, d)`` of L2-normalised ``embeddings``."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.input_dim:
            raise SelfmaskError(
                f"router: expected embeddings of shape (N, {self.input_dim}), got {tuple(embeddings.shape)}"
            )
        t = self.tensors
        x = torch.nn.functional.normalize(embeddings.double(), dim=1)
        return ((x - t["mean"]) @ t["components"].T) * t["scale"]

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``(N, k)`` group scores, larger = more likely (negative squared distance or log density)."""
        return _scores(self.method, self.tensors, self.project(embeddings))

    def route(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The group (expert index, int64) of each embedding."""
        return self.scores(embeddings).argmax(1)

    @classmethod
    def from_tensors(cls, method: str, tensors: dict[str, torch.Tensor], where: str = "router") -> Router:
        """Rebuild from stored tensors, checking that names and shapes agree."""
        need = {"kmeans": ("mean", "components", "scale", "centers"),
                "gmm": ("mean", "components", "scale", "means", "precisions_cholesky", "log_weights")}
        if method not in need:
            raise SelfmaskError(f"{where}: unknown router method {method!r}; expected one of {sorted(need)}")
        missing = [k for k in need[method] if k not in tensors]
        if missing:
            raise SelfmaskError(f"{where}: router tensors {missing} are missing")
        t = {k: tensors[k].double() for k in need[method]}
        d, big_d = t["components"].shape
        groups = t["centers" if method == "kmeans" else "means"]
        ok = t["mean"].shape == (big_d,) and t["scale"].shape == (d,) and groups.dim() == 2 and groups.shape[1] == d
        if method == "gmm":
            k = groups.shape[0]
            ok = ok and t["precisions_cholesky"].shape == (k, d, d) and t["log_weights"].shape == (k,)
        if not ok:
            raise SelfmaskError(f"{where}: router tensor shapes are inconsistent: "
                                f"{ {k: list(v.shape) for k, v in t.items()} }")
        return cls(method, t)


def _scores(method: str, t: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    if method == "kmeans":
        return -torch.cdist(z, t["centers"]).square()
    # log N(z | mu_k, Sigma_k) + log w_k with Sigma_k^-1 = P_k P_k^T (scikit-learn's parametrisation)
    prec = t["precisions_cholesky"]
    y = torch.einsum("nd,kde->nke", z, prec) - torch.einsum("kd,kde->ke", t["means"], prec)
    log_det = torch.diagonal(prec, dim1=1, dim2=2).log().sum(1)
    d = z.shape[1]
    return -0.5 * (d * math.log(2 * math.pi) + y.square().sum(2)) + log_det + t["log_weights"]


def fit_router(
    embeddings: torch.Tensor,
    num_groups: int,
    method: str = "gmm",
    dim: int = 20,
    min_group_size: int = 16,
    seed: int = 0,
) -> tuple[Router, torch.Tensor]:
    """Cluster ``embeddings`` (N, D) into at most ``num_groups`` groups; return the router and each row's group.

    Raises:
        SelfmaskError: more groups than embeddings, or embeddings that are not a finite 2-D tensor.
    """
    if embeddings.dim() != 2 or embeddings.shape[0] == 0:
        raise SelfmaskError(f"router: expected a non-empty (N, D) embedding tensor, got {tuple(embeddings.shape)}")
    n = int(embeddings.shape[0])
    if num_groups > n:
        raise SelfmaskError(f"router: {num_groups} groups asked for, but only {n} training images to cluster")
    if not torch.isfinite(embeddings).all():
        raise SelfmaskError("router: the embeddings contain NaN or Inf")
    if method not in ("gmm", "kmeans"):
        raise SelfmaskError(f"router: unknown method {method!r}; expected 'gmm' or 'kmeans'")
    x = _l2(embeddings.double().numpy())
    d = max(1, min(dim, x.shape[1], n - 1))
    mean, comps, var = fit_pca(x, d)
    scale = 1.0 / np.sqrt(np.maximum(var, 1e-12))
    z = ((x - mean) @ comps.T) * scale
    notes = [] if d == dim else [f"router_dim {dim} clamped to {d} (embedding size {x.shape[1]}, {n} images)"]
    tensors: dict[str, torch.Tensor] = {
        "mean": torch.from_numpy(mean), "components": torch.from_numpy(np.ascontiguousarray(comps)),
        "scale": torch.from_numpy(scale),
    }
    if method == "kmeans":
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=num_groups, n_init=10, random_state=seed).fit(z)
        tensors["centers"] = torch.from_numpy(km.cluster_centers_.astype(np.float64))
    else:
        from sklearn.mixture import GaussianMixture

        gm = GaussianMixture(num_groups, covariance_type="full", random_state=seed, reg_covar=1e-4, n_init=1).fit(z)
        tensors["means"] = torch.from_numpy(gm.means_.astype(np.float64))
        tensors["precisions_cholesky"] = torch.from_numpy(gm.precisions_cholesky_.astype(np.float64))
        tensors["log_weights"] = torch.from_numpy(np.log(np.maximum(gm.weights_, 1e-300)))
    router = Router(method, tensors, notes)
    _merge_small_groups(router, embeddings, min_group_size)
    return router, router.route(embeddings)


def _merge_small_groups(router: Router, embeddings: torch.Tensor, min_group_size: int) -> None:
    """Drop components with fewer than ``min_group_size`` members, smallest first, until none is left."""
    group_keys = ("centers",) if router.method == "kmeans" else ("means", "precisions_cholesky", "log_weights")
    while router.num_groups > 1:
        counts = torch.bincount(router.route(embeddings), minlength=router.num_groups)
        small = int(counts.argmin())
        if int(counts[small]) >= min_group_size:
            return
        keep = [g for g in range(router.num_groups) if g != small]
        for key in group_keys:
            router.tensors[key] = router.tensors[key][keep].contiguous()
        router.notes.append(
            f"group {small} of {len(keep) + 1} had {int(counts[small])} training image(s) (< min_group_size "
            f"{min_group_size}): dissolved, its images routed to their next most likely group"
        )
    counts = torch.bincount(router.route(embeddings), minlength=1)
    if int(counts[0]) < min_group_size:
        raise SelfmaskError(
            f"router: only {int(counts[0])} training images in all, fewer than min_group_size {min_group_size}"
        )
