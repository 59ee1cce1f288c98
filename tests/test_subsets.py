"""Low-shot label subsets: stratified, exactly reproducible, respect the fraction, bad input raises."""

from __future__ import annotations

import pytest
import torch

from selfmask.data.subsets import label_subset
from selfmask.errors import SelfmaskError


def make_labels(counts: list[int], seed: int = 0) -> torch.Tensor:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def test_exactly_reproducible_and_seed_dependent() -> None:
    labels = make_labels([50, 80, 30, 40])
    a = label_subset(labels, fraction=0.1, seed=3)
    b = label_subset(labels.clone(), fraction=0.1, seed=3)
    c = label_subset(labels, fraction=0.1, seed=4)
    assert torch.equal(a.indices, b.indices)
    assert a.to_dict() == b.to_dict()
    assert not torch.equal(a.indices, c.indices)


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.1, 0.25, 0.5, 1.0])
def test_respects_fraction_per_class(fraction: float) -> None:
    counts = [200, 150, 120, 300, 90]
    labels = make_labels(counts)
    sub = label_subset(labels, fraction=fraction, seed=0)
    assert len(torch.unique(sub.indices)) == len(sub)  # no duplicates
    assert torch.equal(sub.indices, torch.sort(sub.indices).values)
    picked = labels[sub.indices]
    for c, n in enumerate(counts):
        k = int((picked == c).sum())
        assert k == max(1, round(fraction * n))
        assert sub.per_class_counts[c] == k
    assert abs(sub.realized_fraction - fraction) <= len(counts) / len(labels) + 1e-9
    if fraction == 1.0:
        assert len(sub) == len(labels)


def test_at_least_one_per_class_at_tiny_fraction() -> None:
    labels = make_labels([30, 10, 5])
    sub = label_subset(labels, fraction=0.001, seed=1)
    assert sorted(labels[sub.indices].tolist()) == [0, 1, 2]


def test_per_class_count_and_nesting_free_of_other_classes() -> None:
    labels = make_labels([20, 20, 20])
    sub = label_subset(labels, per_class=4, seed=2)
    assert torch.bincount(labels[sub.indices]).tolist() == [4, 4, 4]
    # a class's choice does not depend on the other classes
    only0 = labels.clone()
    only0[labels == 2] = 1
    sub2 = label_subset(only0, per_class=4, seed=2)
    assert set(sub.indices[labels[sub.indices] == 0].tolist()) == set(sub2.indices[only0[sub2.indices] == 0].tolist())
    assert sub.to_dict()["per_class"] == 4 and sub.to_dict()["fraction"] is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fraction": 0.0}, "fraction"),
        ({"fraction": -0.1}, "fraction"),
        ({"fraction": 1.5}, "fraction"),
        ({"per_class": 0}, "per_class"),
        ({"per_class": 11}, "only 10"),
        ({}, "exactly one"),
        ({"fraction": 0.5, "per_class": 2}, "exactly one"),
    ],
)
def test_bad_inputs_raise(kwargs: dict, match: str) -> None:
    labels = make_labels([10, 12])
    with pytest.raises(SelfmaskError, match=match):
        label_subset(labels, **kwargs)


def test_empty_or_malformed_labels_raise() -> None:
    with pytest.raises(SelfmaskError, match="empty"):
        label_subset(torch.zeros(0, dtype=torch.long), fraction=0.5)
    with pytest.raises(SelfmaskError, match="1-D"):
        label_subset(torch.zeros(3, 2, dtype=torch.long), fraction=0.5)
    with pytest.raises(SelfmaskError, match="integers"):
        label_subset(torch.zeros(3), fraction=0.5)
