"""The evaluation protocol every run and the demo share: k-NN and linear probe on frozen features."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfmask.backbones.registry import BackboneInfo
from selfmask.data.base import ImageTensorDataset


def evaluate_features(
    backbone: nn.Module,
    info: BackboneInfo,
    train_set: ImageTensorDataset,
    test_set: ImageTensorDataset,
    *,
    bank_indices: torch.Tensor | None = None,
    knn_k: int = 200,
    knn_temperature: float = 0.1,
    linear_probe: bool = True,
    probe_c: float | None = None,
    seed: int = 0,
    device: str = "cpu",
    train_features: torch.Tensor | None = None,
    test_features: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Weighted k-NN and linear probe of ``backbone``'s un-augmented embeddings.

    The bank / probe training set is ``train_set`` restricted to ``bank_indices``
    (the labelled subset in low-shot settings); queries are all of ``test_set``.
    Every number comes with the settings that produced it. Precomputed features
    can be passed to avoid re-embedding.
    """
    from selfmask.evaluation import extract_features, knn_accuracy
    from selfmask.evaluation import linear_probe as run_probe

    if train_features is None:
        train_features = extract_features(backbone, train_set, info.mean, info.std, device=device)
    if test_features is None:
        test_features = extract_features(backbone, test_set, info.mean, info.std, device=device)
    y_train, y_test = train_set.labels, test_set.labels
    if bank_indices is not None:
        train_features, y_train = train_features[bank_indices], y_train[bank_indices]
    knn = knn_accuracy(
        train_features, y_train, test_features, y_test, num_classes=train_set.num_classes, k=knn_k,
        temperature=knn_temperature,
    )
    out: dict[str, Any] = {"knn": knn.to_dict(), "knn_accuracy": knn.accuracy}
    if linear_probe:
        probe = run_probe(train_features, y_train, test_features, y_test, C=probe_c, seed=seed)
        out["linear_probe"] = probe.to_dict()
        out["linear_probe_accuracy"] = probe.accuracy
    return out


def evaluate_model(
    data: str,
    *,
    run: str | Path | None = None,
    backbone: str = "resnet_tiny",
    weights: str | None = None,
    embedding: str | None = None,
    label_fraction: float | None = None,
    per_class: int | None = None,
    knn_k: int = 200,
    knn_temperature: float = 0.1,
    linear_probe: bool = True,
    seed: int = 0,
    device: str = "cpu",
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """``selfmask eval``'s work: :func:`evaluate_features` of a run folder's adapted backbone (``run``) or of
    ``backbone``/``weights`` (a random base after ``torch.manual_seed(seed)``), on ``data``; with
    ``label_fraction``/``per_class`` the bank and probe use a seeded labelled subset. The result records the
    settings that produced it."""
    from selfmask.backbones import backbone_info, create_backbone
    from selfmask.data.sources import load_data
    from selfmask.data.subsets import label_subset
    from selfmask.training.run_folder import load_run
    from selfmask.training.trainer import resolve_device

    resolve_device(device)
    if run is not None:
        model, _head, cfg = load_run(run, device=device)
        info = backbone_info(cfg.backbone, cfg.embedding)
    else:
        info = backbone_info(backbone, embedding)
        torch.manual_seed(seed)
        model = create_backbone(info.name, weights, info.embedding)
    train, test = load_data(data, resolution=info.input_size, cache_dir=cache_dir)
    bank = subset = None
    if label_fraction is not None or per_class is not None:
        subset = label_subset(train.labels, fraction=label_fraction, per_class=per_class, seed=seed)
        bank = torch.as_tensor(subset.indices, dtype=torch.long)
    res = evaluate_features(model, info, train, test, bank_indices=bank, knn_k=knn_k, knn_temperature=knn_temperature,
                            linear_probe=linear_probe, seed=seed, device=device)
    return {"backbone": info.name, "embedding": info.embedding, "weights": weights,
            "run": str(run) if run else None, "data": data,
            "subset": subset.to_dict() if subset is not None else None, **res}
