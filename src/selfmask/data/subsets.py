"""Low-shot label subsets (METHOD.md section 3): a seeded, stratified choice of training labels.

Either a ``fraction`` of the labels (e.g. 0.01 for the paper's 1 % CIFAR-10 setting) or a fixed
``per_class`` count. Sampling is stratified: each class contributes ``round(fraction * n_c)``
examples (at least one), so the realised fraction matches the request up to rounding and no
class disappears. The result depends only on the labels, the settings and the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfmask.errors import SelfmaskError


@dataclass(frozen=True)
class LabelSubset:
    """Indices (sorted ascending) into the labelled set, with the settings that produced them."""

    indices: torch.Tensor
    fraction: float | None
    per_class: int | None
    seed: int
    num_total: int
    per_class_counts: dict[int, int]

    def __len__(self) -> int:
        return int(self.indices.numel())

    @property
    def realized_fraction(self) -> float:
        return len(self) / self.num_total

    def to_dict(self) -> dict[str, object]:
        return {
            "fraction": self.fraction,
            "per_class": self.per_class,
            "seed": self.seed,
            "num_selected": len(self),
            "num_total": self.num_total,
            "realized_fraction": self.realized_fraction,
            "per_class_counts": {str(k): v for k, v in self.per_class_counts.items()},
        }


def label_subset(
    labels: torch.Tensor, *, fraction: float | None = None, per_class: int | None = None, seed: int = 0
) -> LabelSubset:
    """A stratified subset of ``labels`` (1-D integer tensor), exactly reproducible from ``seed``.

    Exactly one of ``fraction`` (in (0, 1]) or ``per_class`` (>= 1, at most the size of the
    smallest class) must be given. Classes are the distinct values present in ``labels``.
    Each class is permuted by its own generator seeded from ``(seed, class)``, so a class's
    choice does not depend on the other classes.
    """
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        raise SelfmaskError(f"label_subset: labels must be a 1-D tensor, got {getattr(labels, 'shape', type(labels))}")
    if labels.numel() == 0:
        raise SelfmaskError("label_subset: the label set is empty")
    if labels.is_floating_point() or labels.is_complex():
        raise SelfmaskError(f"label_subset: labels must be integers, got {labels.dtype}")
    if (fraction is None) == (per_class is None):
        raise SelfmaskError(f"label_subset: give exactly one of fraction or per_class (got {fraction}, {per_class})")
    if fraction is not None and not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise SelfmaskError(f"label_subset: fraction must be in (0, 1], got {fraction!r}")
    labels = labels.cpu().long()
    classes, counts = torch.unique(labels, return_counts=True)
    if per_class is not None:
        if not isinstance(per_class, int) or per_class < 1:
            raise SelfmaskError(f"label_subset: per_class must be an int >= 1, got {per_class!r}")
        smallest = int(counts.min())
        if per_class > smallest:
            c = int(classes[counts.argmin()])
            raise SelfmaskError(
                f"label_subset: per_class={per_class} but class {c} has only {smallest} labelled examples"
            )
    chosen: list[torch.Tensor] = []
    per_counts: dict[int, int] = {}
    for c, n_c in zip(classes.tolist(), counts.tolist(), strict=True):
        members = torch.nonzero(labels == c).flatten()
        take = per_class if per_class is not None else max(1, round(float(fraction) * n_c))  # type: ignore[arg-type]
        gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(c)) % (2**63 - 1))
        chosen.append(members[torch.randperm(n_c, generator=gen)[:take]])
        per_counts[int(c)] = int(take)
    indices = torch.sort(torch.cat(chosen)).values
    return LabelSubset(
        indices=indices,
        fraction=None if fraction is None else float(fraction),
        per_class=per_class,
        seed=int(seed),
        num_total=int(labels.numel()),
        per_class_counts=per_counts,
    )
