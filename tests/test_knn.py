"""Weighted k-NN against a brute-force float64 reference: ties, k > bank, absent classes, chunking."""

from __future__ import annotations

import math

import pytest
import torch

from selfmask.errors import SelfmaskError
from selfmask.evaluation import KNNResult, knn_accuracy, knn_classify


def reference_knn(
    bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int, k: int, temperature: float
) -> list[int]:
    """Plain-python float64 weighted k-NN (METHOD.md section 3), one query at a time."""
    b = bank.double()
    b = b / b.norm(dim=1, keepdim=True)
    preds = []
    for q in queries.double():
        q = q / q.norm()
        sims = [float(v) for v in b @ q]
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[: min(k, len(sims))]
        votes = [0.0] * num_classes
        for i in order:
            votes[int(bank_labels[i])] += math.exp(sims[i] / temperature)
        preds.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return preds


@pytest.mark.parametrize(("k", "temperature", "chunk"), [(1, 0.1, 7), (5, 0.07, 3), (20, 0.1, 64), (200, 0.5, 16)])
def test_matches_float64_reference(k: int, temperature: float, chunk: int) -> None:
    g = torch.Generator().manual_seed(k)
    bank, queries = torch.randn(120, 16, generator=g), torch.randn(50, 16, generator=g)
    labels = torch.randint(0, 6, (120,), generator=g)
    pred = knn_classify(bank, labels, queries, 6, k=k, temperature=temperature, chunk_size=chunk)
    assert pred.tolist() == reference_knn(bank, labels, queries, 6, k, temperature)


def test_k_larger_than_bank_is_clamped_and_recorded() -> None:
    g = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(9, 4, generator=g), torch.randn(11, 4, generator=g)
    labels = torch.randint(0, 3, (9,), generator=g)
    qlabels = torch.randint(0, 3, (11,), generator=g)
    res = knn_accuracy(bank, labels, queries, qlabels, 3, k=200, temperature=0.1)
    assert isinstance(res, KNNResult)
    assert (res.k, res.k_requested, res.bank_size, res.num_queries) == (9, 200, 9, 11)
    expected = reference_knn(bank, labels, queries, 3, 9, 0.1)
    assert res.accuracy == pytest.approx(sum(int(p == t) for p, t in zip(expected, qlabels.tolist())) / 11)
    d = res.to_dict()
    assert d["k"] == 9 and d["k_requested"] == 200 and d["temperature"] == 0.1 and d["metric"] == "knn"


def test_class_absent_from_bank_is_never_predicted() -> None:
    g = torch.Generator().manual_seed(2)
    bank, queries = torch.randn(60, 8, generator=g), torch.randn(30, 8, generator=g)
    labels = torch.randint(0, 4, (60,), generator=g)
    labels[labels == 2] = 3  # class 2 exists (num_classes=5) but has no bank entry; class 4 neither
    pred = knn_classify(bank, labels, queries, 5, k=10, temperature=0.1)
    assert not torch.isin(pred, torch.tensor([2, 4])).any()
    assert pred.tolist() == reference_knn(bank, labels, queries, 5, 10, 0.1)
    # queries of the absent class are counted as errors
    res = knn_accuracy(bank, labels, queries, torch.full((30,), 2), 5, k=10)
    assert res.accuracy == 0.0


def test_ties_duplicate_bank_entries_and_vote_ties() -> None:
    # every bank entry equally similar: all k neighbours tie; votes then count labels
    bank = torch.ones(10, 3)
    labels = torch.tensor([0, 1, 1, 1, 2, 2, 2, 2, 0, 0])
    q = torch.ones(4, 3) * torch.tensor([[1.0], [2.0], [0.5], [3.0]])
    pred = knn_classify(bank, labels, q, 3, k=10)
    assert pred.tolist() == [2, 2, 2, 2]
    # exact vote tie between classes 0 and 1 goes to the lower index (like the reference)
    bank2 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    pred2 = knn_classify(bank2, torch.tensor([1, 0, 2]), torch.tensor([[1.0, 0.0]]), 3, k=2)
    assert pred2.tolist() == [0] == reference_knn(bank2, torch.tensor([1, 0, 2]), torch.tensor([[1.0, 0.0]]), 3, 2, 0.1)
    # a tie at the k-th place between neighbours of the same label cannot change the result
    bank3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    lab3 = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[1.0, 0.1]])
    assert knn_classify(bank3, lab3, query, 2, k=2).tolist() == reference_knn(bank3, lab3, query, 2, 2, 0.1)


def test_scale_invariance_and_chunking_do_not_change_predictions() -> None:
    g = torch.Generator().manual_seed(3)
    bank, queries = torch.randn(200, 32, generator=g), torch.randn(77, 32, generator=g)
    labels = torch.randint(0, 10, (200,), generator=g)
    a = knn_classify(bank, labels, queries, 10, k=20, chunk_size=1000)
    b = knn_classify(bank * 5.0, labels, queries * 0.01, 10, k=20, chunk_size=5)
    assert torch.equal(a, b)


def test_separable_clusters_score_perfectly() -> None:
    g = torch.Generator().manual_seed(4)
    centers = torch.randn(5, 64, generator=g) * 5
    lab = torch.arange(500) % 5
    qlab = torch.arange(100) % 5
    bank = centers[lab] + torch.randn(500, 64, generator=g) * 0.1
    q = centers[qlab] + torch.randn(100, 64, generator=g) * 0.1
    assert knn_accuracy(bank, lab, q, qlab, 5).accuracy == 1.0


def test_bad_inputs_raise() -> None:
    bank, labels = torch.randn(10, 4), torch.randint(0, 2, (10,))
    with pytest.raises(SelfmaskError, match="empty"):
        knn_classify(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.randn(2, 4), 2)
    with pytest.raises(SelfmaskError, match="dimension"):
        knn_classify(bank, labels, torch.randn(2, 5), 2)
    with pytest.raises(SelfmaskError, match="k must"):
        knn_classify(bank, labels, torch.randn(2, 4), 2, k=0)
    with pytest.raises(SelfmaskError, match="temperature"):
        knn_classify(bank, labels, torch.randn(2, 4), 2, temperature=0.0)
    with pytest.raises(SelfmaskError, match="labels must lie"):
        knn_classify(bank, labels + 5, torch.randn(2, 4), 2)
    with pytest.raises(SelfmaskError, match="labels of shape"):
        knn_classify(bank, labels[:3], torch.randn(2, 4), 2)
    with pytest.raises(SelfmaskError, match="empty"):
        knn_accuracy(bank, labels, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 2)
