"""Weighted k-NN evaluation time for a CIFAR-sized ResNet-50 bank (50,000 x 2,048)."""

from __future__ import annotations

import time

import torch


def knn_time(
    bank: int = 50_000, dim: int = 2_048, queries: int | None = None, num_classes: int = 100, k: int = 200,
    temperature: float = 0.1, device: str = "cpu", seed: int = 0,
) -> dict[str, float | int | str]:
    """Seconds to classify ``queries`` random queries against a random bank (chunked k-NN).

    Default queries: 10,000 (a CIFAR test split) on a GPU, 2,000 on a CPU; the rate is
    reported so the two are comparable.
    """
    from selfmask.evaluation import knn_classify

    dev = torch.device(device)
    queries = queries or (10_000 if dev.type == "cuda" else 2_000)
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(bank, dim, generator=g).to(dev)
    labels = torch.randint(0, num_classes, (bank,), generator=g).to(dev)
    q = torch.randn(queries, dim, generator=g).to(dev)
    knn_classify(feats, labels, q[:256], num_classes, k, temperature)  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    knn_classify(feats, labels, q, num_classes, k, temperature)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    return {"bank": bank, "dim": dim, "queries": queries, "k": k, "temperature": temperature, "device": device,
            "seconds": seconds, "queries_per_s": queries / seconds, "threads": torch.get_num_threads()}
