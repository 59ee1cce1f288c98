"""Label-efficient settings (METHOD.md sections 3 and 6): one row per (method, label fraction, seed).

Methods:

========== ==================================================================================
``knn``      weighted k-NN of the pretrained backbone (bank: the labelled subset)
``lp``       linear probe of the pretrained backbone on the labelled subset
``smn-knn``  k-NN of the self-masking network (masks trained with no labels on all images)
``smn-lp``   linear probe of the SMN's embeddings on the labelled subset
``fft``      full fine-tuning on the labelled subset
``mask``     supervised masking on the labelled subset, from scratch (all-ones masks)
``topk``     top-k masks on the labelled subset
``semi``     supervised masking on the labelled subset, continued from the SMN's scores
========== ==================================================================================

Every row carries the settings that produced it (fraction, labelled count, seed, k and T,
the probe's C, epochs and steps).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from selfmask.backbones.registry import BackboneInfo
from selfmask.data.base import ImageTensorDataset
from selfmask.errors import SelfmaskError

METHOD_LABELS = {
    "knn": "k-NN (pretrained)",
    "lp": "linear probe",
    "smn-knn": "SMN k-NN",
    "smn-lp": "SMN + linear probe",
    "fft": "FFT",
    "mask": "supervised mask",
    "topk": "top-k mask",
    "semi": "SMN + supervised mask",
}
TRAINED = ("fft", "mask", "topk", "semi")
NEEDS_SMN = ("smn-knn", "smn-lp", "semi")


@dataclass
class LowShotContext:
    """Everything the rows share: data, backbone, cached features, training budget."""

    info: BackboneInfo
    weights: str | None
    train: ImageTensorDataset
    test: ImageTensorDataset
    out_dir: Path
    device: str = "cpu"
    smn_dir: Path | None = None
    steps_full: int = 600
    min_steps: int = 120
    warmup_fraction: float = 40 / 150
    topk_keep_ratio: float = 0.9
    flip: bool = True
    knn_k: int = 200
    knn_temperature: float = 0.1
    progress: bool = True
    histories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    sparsity: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    _features: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _smn_bits: int | None = None

    def backbone(self, which: str = "pretrained") -> torch.nn.Module:
        from selfmask.backbones import create_backbone
        from selfmask.training.run_folder import load_run

        if which == "smn":
            if self.smn_dir is None:
                raise SelfmaskError("this method needs a self-masking network: give an SMN run folder")
            return load_run(self.smn_dir, device=self.device)[0]
        torch.manual_seed(0)
        return create_backbone(self.info.name, self.weights, self.info.embedding).to(self.device)

    def features(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        from selfmask.evaluation import extract_features

        if which not in self._features:
            model = self.backbone(which)
            self._features[which] = (
                extract_features(model, self.train, self.info.mean, self.info.std, device=self.device),
                extract_features(model, self.test, self.info.mean, self.info.std, device=self.device),
            )
        return self._features[which]


#: A labelled subset smaller than this many batches is repeated (each repeat gets its own
#: augmentation) so that an epoch has at least this many steps: with 20 labelled images an
#: epoch would otherwise be one step, and per-epoch work (metrics, checkpoints) would dominate.
MIN_BATCHES_PER_EPOCH = 10


def tiled(dataset: ImageTensorDataset, batch: int) -> ImageTensorDataset:
    """``dataset`` repeated to at least ``MIN_BATCHES_PER_EPOCH`` batches (unchanged if already larger)."""
    need = batch * MIN_BATCHES_PER_EPOCH
    if len(dataset) >= need:
        return dataset
    reps = math.ceil(need / len(dataset))
    idx = torch.arange(len(dataset)).repeat(reps)
    return dataset.subset(idx, name=f"{dataset.name} x{reps}")


def epochs_for(n_items: int, batch: int, steps: int) -> int:
    """Epochs giving about ``steps`` optimiser steps over ``n_items`` images."""
    steps_per_epoch = max(1, n_items // min(batch, n_items))
    return max(1, math.ceil(steps / steps_per_epoch))


def lowshot_row(ctx: LowShotContext, method: str, fraction: float, seed: int) -> dict[str, Any]:
    """Train (if the method trains) and evaluate one method at one label fraction and seed."""
    from selfmask.data.subsets import label_subset
    from selfmask.experiments.evaluate import evaluate_features
    from selfmask.masking import mask_summary
    from selfmask.training.config import TrainConfig
    from selfmask.training.run_folder import RunFolder
    from selfmask.training.trainer import adapt, classify, count_trainable_bits

    if method not in METHOD_LABELS:
        raise SelfmaskError(f"unknown low-shot method {method!r}; expected one of {sorted(METHOD_LABELS)}")
    t0 = time.perf_counter()
    subset = label_subset(ctx.train.labels, fraction=fraction, seed=seed)
    idx = torch.as_tensor(subset.indices, dtype=torch.long)
    row: dict[str, Any] = {
        "method": METHOD_LABELS[method], "method_id": method, "label_fraction": fraction,
        "labelled_images": len(idx), "seed": seed,
    }
    head_bits = 32 * (ctx.info.embed_dim + 1) * ctx.train.num_classes
    if method in ("knn", "lp", "smn-knn", "smn-lp"):
        which = "smn" if method.startswith("smn") else "pretrained"
        f_train, f_test = ctx.features(which)
        ev = evaluate_features(
            None, ctx.info, ctx.train, ctx.test, bank_indices=idx, knn_k=ctx.knn_k,  # type: ignore[arg-type]
            knn_temperature=ctx.knn_temperature, linear_probe=method.endswith("lp"), seed=seed,
            train_features=f_train, test_features=f_test,
        )
        row.update(_ev_fields(ev))
        row["accuracy"] = ev["linear_probe_accuracy"] if method.endswith("lp") else ev["knn_accuracy"]
        smn_bits = _smn_bits(ctx) if which == "smn" else 0
        row["stored_bits"] = smn_bits + (head_bits if method.endswith("lp") else 0)
    else:
        labelled = tiled(ctx.train.subset(idx, name=f"{ctx.train.name}[{len(idx)} labelled]"), 64)
        epochs = epochs_for(len(labelled), 64, max(ctx.min_steps, round(ctx.steps_full * fraction)))
        tcfg = TrainConfig(
            method="mask" if method == "semi" else method, epochs=epochs,
            warmup_epochs=round(ctx.warmup_fraction * epochs, 3) if epochs > 1 else 0.0,
            keep_ratio=ctx.topk_keep_ratio, flip=ctx.flip, seed=seed, device=ctx.device,
            init_from=str(ctx.smn_dir) if method == "semi" else None,
        )
        if method == "semi" and ctx.smn_dir is None:
            raise SelfmaskError("method 'semi' needs a self-masking network: give an SMN run folder")
        run_dir = ctx.out_dir / "runs" / f"{method}-{fraction:g}-seed{seed}"
        result = adapt(
            ctx.backbone("pretrained"), ctx.info, labelled, tcfg, run=RunFolder(run_dir, overwrite=True).prepare(),
            run_meta={"weights": ctx.weights, "label_subset": subset.to_dict()}, progress=ctx.progress,
        )
        acc = classify(result.backbone, result.head, ctx.test, ctx.info, device=ctx.device)
        ev = evaluate_features(
            result.backbone, ctx.info, ctx.train, ctx.test, bank_indices=idx, knn_k=ctx.knn_k,
            knn_temperature=ctx.knn_temperature, seed=seed, device=ctx.device,
        )
        bits = count_trainable_bits(result)
        row.update(_ev_fields(ev))
        row.update({
            "accuracy": acc, "stored_bits": bits["backbone_bits"] + bits["head_bits"],
            "entropy_bits": bits["entropy_bits"], "epochs": epochs, "steps": result.history[-1]["step"],
            "run": str(run_dir),
        })
        if result.mask_config is not None:
            s = mask_summary(result.backbone)
            row["fraction_active"] = s.fraction_active
            if fraction == 1.0 and seed == 0 or METHOD_LABELS[method] not in ctx.sparsity:
                ctx.sparsity[METHOD_LABELS[method]] = [(t.name, t.fraction_active) for t in s.tensors]
        ctx.histories[f"{METHOD_LABELS[method]} @ {fraction:g}"] = result.history
        rf = RunFolder(run_dir)
        rf.write_json("results.json", row)
        rf.set_status("finished")
    row["seconds"] = time.perf_counter() - t0
    return row


def _ev_fields(ev: dict[str, Any]) -> dict[str, Any]:
    knn = ev["knn"]
    out = {
        "knn_accuracy": ev["knn_accuracy"],
        "knn_k": knn.get("k_requested", knn.get("k")),  # as asked; clamped to the bank size when larger
        "knn_k_used": knn.get("k"),
        "knn_temperature": knn.get("temperature"),
    }
    if "linear_probe_accuracy" in ev:
        out["linear_probe_accuracy"] = ev["linear_probe_accuracy"]
        out["probe_C"] = ev["linear_probe"].get("C")
    return out


def _smn_bits(ctx: LowShotContext) -> int:
    """Stored bits of the SMN's masks (one bit per masked weight), counted once per context."""
    from selfmask.masking import mask_summary

    if ctx._smn_bits is None:
        ctx._smn_bits = mask_summary(ctx.backbone("smn")).raw_bits
    return ctx._smn_bits


def summarize(rows: list[dict[str, Any]], metric: str = "accuracy") -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds, per (method, fraction)."""
    groups: dict[tuple[str, float], list[float]] = {}
    for r in rows:
        if r.get(metric) is not None:
            groups.setdefault((r["method"], r["label_fraction"]), []).append(float(r[metric]))
    out = []
    for (method, frac), vals in groups.items():
        mean = sum(vals) / len(vals)
        std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
        out.append({"method": method, "label_fraction": frac, "mean": mean, "std": std, "seeds": len(vals)})
    return sorted(out, key=lambda r: (r["label_fraction"], r["method"]))
