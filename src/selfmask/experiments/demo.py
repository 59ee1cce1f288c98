"""``selfmask demo``: every method of the paper on the embedded benchmark, end to end, on a CPU.

1. Build (or read from the cache) the embedded benchmark.
2. Pretrain the small backbone on the pretraining domain (or reuse the cached checkpoint).
3. On the downstream domain, at 100 % and several low label fractions: k-NN and linear probe
   of the pretrained model, full fine-tuning (FFT), supervised masking and top-k masking, all
   through the same training and evaluation code a GPU user runs on CIFAR.
4. Write ``results.json``, ``results.md`` and PNG plots to the output folder.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from selfmask.errors import SelfmaskError
from selfmask.io import atomic_write_json, atomic_write_text

log = logging.getLogger("selfmask.demo")


@dataclass
class DemoConfig:
    """Settings of the demo; ``quick`` shrinks everything for tests (< 2 minutes)."""

    out: Path = Path("runs/demo")
    quick: bool = False
    seed: int = 0
    backbone: str = "resnet_tiny"
    cache_dir: Path | None = None
    device: str = "cpu"
    overwrite: bool = False
    fractions: tuple[float, ...] = (1.0, 0.1, 0.04, 0.01)
    methods: tuple[str, ...] = ("fft", "mask", "topk")
    pretrain_epochs: int = 15
    #: optimisation steps per adaptation run at 100 % labels; low-label runs get
    #: proportionally fewer, but at least ``min_steps``.
    steps_full: int = 600
    min_steps: int = 120
    warmup_fraction: float = 40 / 150  # the paper's 40 warm-up epochs of 150 (supervised)
    topk_keep_ratio: float = 0.9
    knn_k: int = 200
    knn_temperature: float = 0.1
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.quick:
            self.fractions = (1.0, 0.1)
            self.pretrain_epochs = min(self.pretrain_epochs, 4)
            self.steps_full = min(self.steps_full, 60)
            self.min_steps = min(self.min_steps, 30)
        for f in self.fractions:
            if not (0.0 < f <= 1.0):
                raise SelfmaskError(f"label fraction must be in (0, 1], got {f}")


def _epochs_for(n_labelled: int, batch: int, steps: int) -> int:
    steps_per_epoch = max(1, n_labelled // min(batch, n_labelled))
    return max(1, math.ceil(steps / steps_per_epoch))


def pretrained_checkpoint(cfg: DemoConfig, bench: Any) -> Path:
    """The cached pretrained backbone for this benchmark build; pretrain once if missing."""
    from selfmask.data.embedded import default_cache_dir
    from selfmask.training.pretrain import pretrain_supervised, save_backbone

    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    key = bench.meta.get("cache_key", f"seed{cfg.seed}")
    path = cache / f"pretrained-{cfg.backbone}-{key}-e{cfg.pretrain_epochs}.safetensors"
    if path.is_file():
        log.info("reusing pretrained backbone %s", path)
        return path
    log.info("pretraining %s on the pretraining domain (%d images), saved to %s", cfg.backbone, len(bench.pretrain_train), path)
    model, _hist = pretrain_supervised(
        bench.pretrain_train, backbone=cfg.backbone, epochs=cfg.pretrain_epochs, seed=cfg.seed, device=cfg.device,
        progress=cfg.progress,
    )
    save_backbone(model, path)
    return path


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the demo; returns the ``results.json`` content."""
    from selfmask.backbones import backbone_info, create_backbone
    from selfmask.data.embedded import load_embedded
    from selfmask.data.subsets import label_subset
    from selfmask.evaluation import extract_features
    from selfmask.experiments.evaluate import evaluate_features
    from selfmask.masking import mask_summary
    from selfmask.reports import markdown_table, plot_lowshot, plot_sparsity, plot_training_loss
    from selfmask.training.config import TrainConfig
    from selfmask.training.run_folder import RunFolder
    from selfmask.training.trainer import adapt, classify, count_trainable_bits

    t_start = time.perf_counter()
    out = RunFolder(cfg.out, overwrite=cfg.overwrite).prepare()
    out.set_status("running")
    info = backbone_info(cfg.backbone)
    bench = load_embedded(seed=cfg.seed, cache_dir=cfg.cache_dir, size="tiny" if cfg.quick else "default")
    ckpt = pretrained_checkpoint(cfg, bench)
    train, test = bench.downstream_train, bench.downstream_test
    pretrained = create_backbone(cfg.backbone, ckpt)
    f_train = extract_features(pretrained, train, info.mean, info.std, device=cfg.device)
    f_test = extract_features(pretrained, test, info.mean, info.std, device=cfg.device)

    rows: list[dict[str, Any]] = []
    histories: dict[str, list[dict[str, Any]]] = {}
    sparsity: dict[str, list[tuple[str, float]]] = {}
    embed_bits = 32 * info.embed_dim * train.num_classes + 32 * train.num_classes  # a linear head
    for frac in cfg.fractions:
        subset = label_subset(train.labels, fraction=frac, seed=cfg.seed)
        idx = torch.as_tensor(subset.indices, dtype=torch.long)
        common = {"label_fraction": frac, "labelled_images": len(idx), "seed": cfg.seed}
        t0 = time.perf_counter()
        ev = evaluate_features(
            pretrained, info, train, test, bank_indices=idx, knn_k=cfg.knn_k, knn_temperature=cfg.knn_temperature,
            seed=cfg.seed, train_features=f_train, test_features=f_test,
        )
        rows.append({"method": "k-NN (pretrained)", **common, "accuracy": ev["knn_accuracy"],
                     "knn_accuracy": ev["knn_accuracy"], "stored_bits": 0, **_knn_settings(ev),
                     "seconds": time.perf_counter() - t0})
        rows.append({"method": "linear probe", **common, "accuracy": ev["linear_probe_accuracy"],
                     "linear_probe_accuracy": ev["linear_probe_accuracy"], "stored_bits": embed_bits,
                     "probe": ev["linear_probe"]})
        for method in cfg.methods:
            t0 = time.perf_counter()
            epochs = _epochs_for(len(idx), 64, max(cfg.min_steps, round(cfg.steps_full * frac)))
            tcfg = TrainConfig(
                method=method, epochs=epochs, warmup_epochs=round(cfg.warmup_fraction * epochs, 3) if epochs > 1 else 0.0,
                keep_ratio=cfg.topk_keep_ratio, seed=cfg.seed, device=cfg.device, label_fraction=frac,
            )
            run_dir = cfg.out / "runs" / f"{method}-{frac:g}"
            result = adapt(
                create_backbone(cfg.backbone, ckpt), info, train, tcfg,
                run=RunFolder(run_dir, overwrite=True).prepare(), run_meta={"weights": str(ckpt)}, progress=cfg.progress,
            )
            acc = classify(result.backbone, result.head, test, info, device=cfg.device)
            ev = evaluate_features(
                result.backbone, info, train, test, bank_indices=idx, knn_k=cfg.knn_k,
                knn_temperature=cfg.knn_temperature, seed=cfg.seed, device=cfg.device,
            )
            bits = count_trainable_bits(result)
            row = {"method": _LABELS[method], **common, "accuracy": acc, "knn_accuracy": ev["knn_accuracy"],
                   "linear_probe_accuracy": ev["linear_probe_accuracy"], **_knn_settings(ev),
                   "stored_bits": bits["backbone_bits"] + bits["head_bits"], "entropy_bits": bits["entropy_bits"],
                   "epochs": epochs, "steps": result.history[-1]["step"], "run": str(run_dir),
                   "seconds": time.perf_counter() - t0}
            if result.mask_config is not None:
                s = mask_summary(result.backbone)
                row["fraction_active"] = s.fraction_active
                if frac == 1.0:
                    sparsity[_LABELS[method]] = [(t.name, t.fraction_active) for t in s.tensors]
            rows.append(row)
            histories[f"{_LABELS[method]} @ {frac:g}"] = result.history
            results_dir = RunFolder(run_dir)
            results_dir.write_json("results.json", row)
            results_dir.set_status("finished")
            log.info("%s @ %g labels: accuracy %.3f (k-NN %.3f)", method, frac, acc, ev["knn_accuracy"])

    plots = {
        "lowshot": str(plot_lowshot(rows, cfg.out / "lowshot.png")),
        "loss": str(plot_training_loss(histories, cfg.out / "loss.png")),
    }
    if sparsity:
        plots["sparsity"] = str(plot_sparsity(sparsity, cfg.out / "sparsity.png"))
    results = {
        "benchmark": {k: v for k, v in bench.meta.items() if isinstance(v, (str, int, float, list, dict))},
        "backbone": cfg.backbone,
        "pretrained_checkpoint": str(ckpt),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "seconds": time.perf_counter() - t_start,
        "rows": rows,
        "plots": plots,
    }
    out.write_json("results.json", results)
    atomic_write_text(cfg.out / "results.md", results_markdown(results, markdown_table))
    out.set_status("finished", seconds=results["seconds"])
    return results


_LABELS = {"fft": "FFT", "mask": "supervised mask", "topk": "top-k mask", "linear": "linear (SGD)"}

TABLE_COLUMNS = [
    ("method", "method"),
    ("label_fraction", "labels"),
    ("labelled_images", "labelled"),
    ("accuracy", "test acc"),
    ("knn_accuracy", "k-NN"),
    ("linear_probe_accuracy", "lin. probe"),
    ("fraction_active", "active"),
    ("stored_bits", "stored bits"),
]


def _knn_settings(ev: dict[str, Any]) -> dict[str, Any]:
    knn = ev.get("knn", {})
    return {"knn_k": knn.get("k"), "knn_temperature": knn.get("temperature")}


def results_markdown(results: dict[str, Any], table: Any) -> str:
    m = results["machine"]
    lines = [
        "# selfmask demo results",
        "",
        f"Backbone `{results['backbone']}` pretrained on the embedded benchmark's pretraining domain, adapted to its "
        f"downstream domain. Machine: {m['platform']}, torch {m['torch']}, {m['threads']} threads; "
        f"total {results['seconds'] / 60:.1f} min.",
        "",
        "`test acc` is each method's own prediction on the test split (its head, or the k-NN / probe); `k-NN` "
        f"(k={results['config']['knn_k']}, T={results['config']['knn_temperature']}) and `lin. probe` are measured on the "
        "method's frozen embeddings with the labelled subset as bank / probe training set.",
        "",
        table(results["rows"], TABLE_COLUMNS),
        "",
        "Plots: " + ", ".join(f"[{k}]({Path(v).name})" for k, v in results["plots"].items()),
        "",
    ]
    return "\n".join(lines)


def print_table(results: dict[str, Any]) -> None:
    from selfmask.reports import markdown_table

    print(markdown_table(results["rows"], TABLE_COLUMNS))


def load_results(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


__all__ = ["DemoConfig", "run_demo", "print_table", "atomic_write_json"]
