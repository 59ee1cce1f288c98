"""``selfmask demo``: every method of the paper on the embedded benchmark, end to end, on a CPU.

1. Build (or read from the cache) the embedded benchmark.
2. Pretrain the small backbone on the pretraining domain (or reuse the cached checkpoint).
3. On the downstream domain, at 100 % and several low label fractions: k-NN and linear probe
   of the pretrained model, full fine-tuning (FFT), supervised masking and top-k masking, all
   through the same training and evaluation code a GPU user runs on CIFAR.
4. Write ``results.json``, ``results.md`` and PNG plots to the output folder.
"""

from __future__ import annotations

import logging
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from selfmask.errors import SelfmaskError
from selfmask.io import atomic_write_text

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
    methods: tuple[str, ...] = ("knn", "lp", "smn-knn", "smn-lp", "fft", "mask", "topk", "semi")
    pretrain_epochs: int = 6
    #: optimisation steps per adaptation run at 100 % labels; low-label runs get
    #: proportionally fewer, but at least ``min_steps``.
    steps_full: int = 400
    min_steps: int = 100
    warmup_fraction: float = 40 / 150  # the paper's 40 warm-up epochs of 150 (supervised)
    topk_keep_ratio: float = 0.9
    #: the self-masking network's recipe on the embedded benchmark (docs/swav.md, "What makes the SMN help"):
    #: SwAV optimisation steps, of which the first ``smn_head_warmup`` train only the head and prototypes
    smn_steps: int = 552
    smn_head_warmup: int = 138
    smn_prototypes: int = 100
    smn_lr: float = 1.0  # score learning rate (the paper's 50 switches off weights the digits need within an epoch)
    smn_bn: str = "eval"  # BatchNorm statistics frozen (the paper's best setting)
    smn_large_crop_scale: tuple[float, float] = (0.6, 1.0)
    smn_small_crop_scale: tuple[float, float] = (0.25, 0.5)
    smn_small_size: int = 16
    smn_color: bool = False  # no colour jitter / grayscale / blur: the 32-px views must stay matchable
    knn_k: int = 200
    knn_temperature: float = 0.1
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.quick:
            self.fractions = (1.0, 0.1)
            self.pretrain_epochs = min(self.pretrain_epochs, 3)
            self.steps_full = min(self.steps_full, 40)
            self.min_steps = min(self.min_steps, 20)
            self.smn_steps = min(self.smn_steps, 30)
            self.smn_head_warmup = min(self.smn_head_warmup, 10)
        for f in self.fractions:
            if not (0.0 < f <= 1.0):
                raise SelfmaskError(f"label fraction must be in (0, 1], got {f}")


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


def smn_recipe(cfg: DemoConfig, info: Any, num_images: int) -> tuple[Any, Any, Any]:
    """(SwAVConfig, TrainConfig, MultiCrop) of the demo's self-masking network on ``num_images`` images."""
    from selfmask.data.multicrop import MultiCrop
    from selfmask.objectives import SwAVConfig
    from selfmask.training.config import TrainConfig

    steps_per_epoch = max(1, num_images // 64)
    epochs = max(1, math.ceil(cfg.smn_steps / steps_per_epoch))
    swav = SwAVConfig(
        num_prototypes=cfg.smn_prototypes,
        queue_length=0 if cfg.quick else min(512, num_images // 2),
        queue_start_epoch=max(1, round(0.2 * epochs)),  # the paper: epoch 30 of 150
        freeze_prototypes_iters=max(1, cfg.smn_steps // 20),
        freeze_backbone_iters=cfg.smn_head_warmup,
    )
    tcfg = TrainConfig(method="mask", objective="swav", epochs=epochs, seed=cfg.seed, device=cfg.device, flip=False,
                       lr=cfg.smn_lr, mask={"bn": cfg.smn_bn})
    colour = {} if cfg.smn_color else {"jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0}
    crops = MultiCrop.for_input_size(
        info.input_size, seed=cfg.seed, mean=info.mean, std=info.std, flip_p=0.0, large_scale=cfg.smn_large_crop_scale,
        small_scale=cfg.smn_small_crop_scale, small_size=cfg.smn_small_size, **colour,
    )
    return swav, tcfg, crops


def train_smn(cfg: DemoConfig, info: Any, ckpt: Path, train: Any) -> tuple[Path, list[dict[str, Any]]]:
    """The self-masking network: masks trained with SwAV on all downstream images, no labels."""
    from selfmask.backbones import create_backbone
    from selfmask.training.run_folder import RunFolder
    from selfmask.training.ssl import adapt_swav

    swav, tcfg, crops = smn_recipe(cfg, info, len(train))
    run_dir = cfg.out / "runs" / "smn"
    result = adapt_swav(
        create_backbone(cfg.backbone, ckpt), info, train, tcfg, swav, crops=crops,
        run=RunFolder(run_dir, overwrite=True).prepare(), run_meta={"weights": str(ckpt)}, progress=cfg.progress,
    )
    RunFolder(run_dir).set_status("finished")
    return run_dir, result.history


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the demo; returns the ``results.json`` content."""
    from selfmask.backbones import backbone_info
    from selfmask.data.embedded import load_embedded
    from selfmask.experiments.lowshot import LowShotContext, lowshot_row
    from selfmask.reports import markdown_table, plot_lowshot, plot_sparsity, plot_training_loss
    from selfmask.training.run_folder import RunFolder

    t_start = time.perf_counter()
    out = RunFolder(cfg.out, overwrite=cfg.overwrite).prepare()
    out.set_status("running")
    info = backbone_info(cfg.backbone)
    bench = load_embedded(seed=cfg.seed, cache_dir=cfg.cache_dir, size="tiny" if cfg.quick else "default")
    ckpt = pretrained_checkpoint(cfg, bench)
    train, test = bench.downstream_train, bench.downstream_test
    ctx = LowShotContext(
        info=info, weights=str(ckpt), train=train, test=test, out_dir=cfg.out, device=cfg.device,
        steps_full=cfg.steps_full, min_steps=cfg.min_steps, warmup_fraction=cfg.warmup_fraction,
        topk_keep_ratio=cfg.topk_keep_ratio, knn_k=cfg.knn_k, knn_temperature=cfg.knn_temperature,
        progress=cfg.progress, flip=False,  # glyphs: a mirrored b is a d
    )
    if any(m in ("smn-knn", "smn-lp", "semi") for m in cfg.methods):
        t0 = time.perf_counter()
        ctx.smn_dir, smn_history = train_smn(cfg, info, ckpt, train)
        ctx.histories["SMN (SwAV, no labels)"] = smn_history
        log.info("self-masking network trained in %.0f s", time.perf_counter() - t0)
    rows: list[dict[str, Any]] = []
    for frac in cfg.fractions:
        for method in cfg.methods:
            if method == "semi" and frac == 1.0:
                continue  # semi-supervised continuation is a low-label setting
            row = lowshot_row(ctx, method, frac, cfg.seed)
            rows.append(row)
            log.info("%s @ %g labels: accuracy %.3f", row["method"], frac, row["accuracy"])

    plots = {
        "lowshot": str(plot_lowshot(rows, cfg.out / "lowshot.png")),
        "loss": str(plot_training_loss(ctx.histories, cfg.out / "loss.png")),
    }
    if ctx.sparsity:
        plots["sparsity"] = str(plot_sparsity(ctx.sparsity, cfg.out / "sparsity.png"))
    results = {
        "benchmark": {k: v for k, v in bench.meta.items() if isinstance(v, (str, int, float, list, dict))},
        "backbone": cfg.backbone,
        "pretrained_checkpoint": str(ckpt),
        "smn_run": str(ctx.smn_dir) if ctx.smn_dir else None,
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


__all__ = ["DemoConfig", "print_table", "run_demo"]
