"""Weighted k-nearest-neighbour classification of frozen features (METHOD.md section 3).

The protocol of InstDisc / DINO / the paper: features are L2-normalised, similarity is the
cosine, each query takes its ``k`` most similar bank entries and each neighbour votes for its
label with weight ``exp(sim / T)``; the class with the largest summed vote wins. The paper uses
``k = 200, T = 0.1`` (DINO: 20, 0.07), so both are explicit arguments and are recorded with
every result. Queries are processed in chunks so that a 50,000 x 2,048 bank needs only the
bank itself plus one ``chunk_size x bank`` similarity block in memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from selfmask.errors import SelfmaskError

DEFAULT_K = 200
DEFAULT_TEMPERATURE = 0.1


@dataclass(frozen=True)
class KNNResult:
    """A k-NN accuracy with the settings that produced it.

    ``k`` is the number of neighbours actually used (``min(k_requested, bank_size)``).
    """

    accuracy: float
    k: int
    k_requested: int
    temperature: float
    bank_size: int
    num_queries: int
    num_classes: int

    def to_dict(self) -> dict[str, object]:
        return {"metric": "knn", **asdict(self)}


def _check_features(name: str, feats: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    if not isinstance(feats, torch.Tensor) or feats.dim() != 2:
        raise SelfmaskError(f"k-NN: {name} features must be a 2-D tensor (N, D), got {getattr(feats, 'shape', feats)}")
    if labels is not None and (labels.dim() != 1 or labels.shape[0] != feats.shape[0]):
        raise SelfmaskError(f"k-NN: {name} has {feats.shape[0]} features but labels of shape {tuple(labels.shape)}")


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Predicted labels ``(num_queries,)`` of weighted k-NN; see the module docstring.

    ``k`` larger than the bank is clamped to the bank size. Ties between equally similar
    neighbours at the k-th place are broken by ``torch.topk`` (deterministic on the CPU); ties
    between class votes go to the lowest class index.
    """
    _check_features("train", train_features, train_labels)
    _check_features("query", query_features)
    if train_features.shape[0] == 0:
        raise SelfmaskError("k-NN: the feature bank (train split) is empty")
    if train_features.shape[1] != query_features.shape[1]:
        raise SelfmaskError(
            f"k-NN: train features have dimension {train_features.shape[1]}, queries {query_features.shape[1]}"
        )
    if k < 1:
        raise SelfmaskError(f"k-NN: k must be >= 1, got {k}")
    if not temperature > 0:
        raise SelfmaskError(f"k-NN: temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise SelfmaskError(f"k-NN: chunk_size must be >= 1, got {chunk_size}")
    labels = train_labels.to(device=train_features.device, dtype=torch.long)
    if num_classes < 1 or int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise SelfmaskError(
            f"k-NN: train labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]"
        )
    k = min(k, train_features.shape[0])
    bank = F.normalize(train_features.float(), dim=1)
    preds = []
    for start in range(0, query_features.shape[0], chunk_size):
        q = F.normalize(query_features[start : start + chunk_size].to(bank.device).float(), dim=1)
        sim = q @ bank.T  # (chunk, bank)
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, device=bank.device, dtype=torch.float64)
        votes.scatter_add_(1, labels[top_idx], (top_sim.double() / temperature).exp())
        preds.append(votes.argmax(1))
    if not preds:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat(preds).cpu()


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    chunk_size: int = 256,
) -> KNNResult:
    """Top-1 accuracy of :func:`knn_classify` on ``test_features``, with its settings."""
    _check_features("test", test_features, test_labels)
    if test_features.shape[0] == 0:
        raise SelfmaskError("k-NN: the query (test) split is empty")
    pred = knn_classify(train_features, train_labels, test_features, num_classes, k, temperature, chunk_size)
    acc = (pred == test_labels.cpu().long()).double().mean().item()
    return KNNResult(
        accuracy=acc,
        k=min(k, int(train_features.shape[0])),
        k_requested=k,
        temperature=float(temperature),
        bank_size=int(train_features.shape[0]),
        num_queries=int(test_features.shape[0]),
        num_classes=num_classes,
    )
