"""Evaluate a built cascade and time its inference (METHOD.md section 4)."""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch

from selfmask.cascade.config import MODES
from selfmask.cascade.fusion import embed_dataset
from selfmask.cascade.model import ROOT, Cascade, expert_name
from selfmask.data.base import ImageTensorDataset, normalize_batch
from selfmask.errors import SelfmaskError


def evaluate_cascade(
    cascade: Cascade,
    train_set: ImageTensorDataset,
    test_set: ImageTensorDataset,
    *,
    knn_k: int = 200,
    knn_temperature: float = 0.1,
    linear_probe: bool = True,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, Any]:
    """k-NN and linear probe (the shared protocol) of the pretrained backbone, the single SMN (root) and both fusions."""
    from selfmask.evaluation import extract_features
    from selfmask.experiments.evaluate import evaluate_features

    rows: dict[str, Any] = {}
    model = cascade.bank.deactivate()
    feats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {
        "pretrained": tuple(extract_features(model, d, cascade.info.mean, cascade.info.std) for d in (train_set, test_set)),
    }
    for mode in MODES:
        tr = embed_dataset(cascade, train_set, mode, batch_size)
        te = embed_dataset(cascade, test_set, mode, batch_size)
        if "single_smn" not in feats:
            feats["single_smn"] = (tr["root"], te["root"])
        feats[mode] = (cascade.fusion[mode](tr["concat"]), cascade.fusion[mode](te["concat"]))
    for name, (ftr, fte) in feats.items():
        rows[name] = evaluate_features(model, cascade.info, train_set, test_set, knn_k=knn_k,
                                       knn_temperature=knn_temperature, linear_probe=linear_probe, seed=seed,
                                       train_features=ftr, test_features=fte)
        rows[name]["dim"] = int(ftr.shape[1])
    return rows


def time_inference(cascade: Cascade, images: torch.Tensor, repeats: int = 5) -> dict[str, Any]:
    """Forward passes and time per image of a single SMN vs the cascade's two modes; interleaved, medians.

    The single SMN is the root's masks merged into a separate plain model (what one would deploy:
    no switching); the cascade timings include switching masks in the bank. ``switch_ms`` is the
    median time of one :meth:`MaskBank.activate`.
    """
    if repeats < 1:
        raise SelfmaskError(f"time_inference: repeats must be >= 1, got {repeats}")
    single = copy.deepcopy(cascade.bank.activate(ROOT)).eval()
    cascade.bank.deactivate()
    info = cascade.info
    times: dict[str, list[float]] = {"single_smn": [], "conditional": [], "unconditional": [], "switch": []}
    passes: dict[str, int] = {"single_smn": 1}
    for _ in range(repeats):
        for name in ("single_smn", "conditional", "unconditional", "switch"):
            start = time.perf_counter()
            if name == "single_smn":
                with torch.no_grad():
                    single(normalize_batch(images, info.mean, info.std))
            elif name == "switch":
                cascade.bank.activate(expert_name(0))
            else:
                cascade.embed(images, name)
                passes[name] = cascade.last_stats.forward_passes if cascade.last_stats else 0
            times[name].append(time.perf_counter() - start)
    cascade.bank.deactivate()
    n = len(images)
    base = statistics.median(times["single_smn"])
    out: dict[str, Any] = {"images": n, "repeats": repeats, "threads": torch.get_num_threads(),
                           "switch_ms": 1000 * statistics.median(times["switch"])}
    for name in ("single_smn", "conditional", "unconditional"):
        med = statistics.median(times[name])
        out[name] = {"forward_passes": passes[name], "ms_per_image": 1000 * med / n, "ratio_to_single": med / base}
    return out
