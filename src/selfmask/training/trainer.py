"""One training loop for every adaptation method (``selfmask adapt``).

``adapt(backbone, info, train_set, cfg)`` prepares the backbone for the method
(masks for ``mask``/``topk``, everything trainable for ``fft``, frozen for
``linear``), adds a head, and trains with SGD + momentum under a warm-up/cosine
schedule. Optionally it writes a :class:`~selfmask.training.run_folder.RunFolder`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from selfmask.backbones.registry import BackboneInfo
from selfmask.data.base import ImageTensorDataset, normalize_batch
from selfmask.errors import SelfmaskError
from selfmask.io import atomic_save_safetensors
from selfmask.masking import MaskConfig, is_masked, mask_model, mask_scores, mask_summary
from selfmask.masking.model import enable_fast_masks
from selfmask.training.augment import random_crop_flip
from selfmask.training.config import TrainConfig
from selfmask.training.distributed import (
    DistContext,
    check_world,
    current_context,
    rank_seed,
    to_sync_batchnorm,
    training_device,
    wrap_ddp,
)
from selfmask.training.identity import with_run_identity
from selfmask.training.loop import LoopSpec, TrainingDiverged, run_epochs
from selfmask.training.run_folder import RunFolder, write_run_config
from selfmask.training.schedule import make_scheduler

log = logging.getLogger("selfmask.train")


@dataclass
class TrainResult:
    backbone: nn.Module
    head: nn.Module | None
    config: TrainConfig
    mask_config: MaskConfig | None
    history: list[dict[str, Any]] = field(default_factory=list)
    train_indices: torch.Tensor | None = None  # the labelled subset used, if any


def resolve_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SelfmaskError(f"device {device!r} was asked for, but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise SelfmaskError(f"unsupported device {device!r}; expected cpu or cuda[:N]")
    return dev


def prepare_backbone(
    backbone: nn.Module, info: BackboneInfo, cfg: TrainConfig
) -> tuple[MaskConfig | None, list[dict[str, Any]]]:
    """Masks (mask/topk), everything trainable (fft) or everything frozen (linear); SGD param groups."""
    mcfg = cfg.mask_config(info.mask_preset)
    lr, wd = cfg.resolved_lr, cfg.resolved_weight_decay
    groups: list[dict[str, Any]] = []
    if mcfg is not None:
        mask_model(backbone, mcfg)
        if cfg.init_from is not None:
            load_scores_into(backbone, cfg.init_from)
        groups.append({"params": list(mask_scores(backbone).values()), "lr": lr, "weight_decay": wd, "name": "scores"})
    elif cfg.method == "fft":
        for p in backbone.parameters():
            p.requires_grad_(True)
        groups.append({"params": list(backbone.parameters()), "lr": lr, "weight_decay": wd, "name": "backbone"})
    else:  # linear
        for p in backbone.parameters():
            p.requires_grad_(False)
    return mcfg, groups


def load_scores_into(backbone: nn.Module, run_dir: str) -> None:
    """Copy a run folder's scores (and BatchNorm buffers) into an already masked ``backbone``."""
    from selfmask.training.run_folder import load_scores_and_buffers

    load_scores_and_buffers(backbone, run_dir)


def prepare_model(
    backbone: nn.Module, info: BackboneInfo, num_classes: int, cfg: TrainConfig
) -> tuple[nn.Module, nn.Module, MaskConfig | None, list[dict[str, Any]]]:
    """Set up backbone + head for ``cfg.method``; return them, the mask config and SGD param groups."""
    torch.manual_seed(cfg.seed)
    head = nn.Linear(info.embed_dim, num_classes)
    mcfg, groups = prepare_backbone(backbone, info, cfg)
    lr, wd = cfg.resolved_lr, cfg.resolved_weight_decay
    if cfg.method == "linear":
        groups.append({"params": list(head.parameters()), "lr": lr, "weight_decay": wd, "name": "head"})
    elif cfg.head == "masked-random":
        # the authors' head: random frozen weights, masked and trained like the backbone
        mask_model(head, cfg.head_mask_config())
        groups.append({"params": list(mask_scores(head).values()), "lr": lr, "weight_decay": 0.0, "name": "head-scores"})
    else:
        groups.append(
            {"params": list(head.parameters()), "lr": cfg.head_lr, "weight_decay": cfg.head_weight_decay, "name": "head"}
        )
    return backbone, head, mcfg, groups


class Classifier(nn.Module):
    """``head(backbone(x))``: one module for DistributedDataParallel and ``torch.compile``."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def speed_setup(backbone: nn.Module, cfg: TrainConfig, *extra: nn.Module) -> None:
    """The fast-path options that change modules in place: channels-last storage and flat masks.

    Under ``cfg.compile`` the masks keep the per-layer path, which ``torch.compile`` traces and
    fuses: the flat path's cache lookup is Python keyed by an integer per layer, on which
    ``torch.compile`` recompiles once per masked layer until its recompile limit (then eager).
    """
    if cfg.channels_last:
        backbone.to(memory_format=torch.channels_last)
    if cfg.fast_masks and not cfg.compile:
        for module in (backbone, *extra):
            if is_masked(module):
                enable_fast_masks(module)


def wrap_for_training(model: nn.Module, cfg: TrainConfig, ctx: DistContext, find_unused: bool = False) -> nn.Module:
    """``model`` under DDP (distributed runs) and ``torch.compile`` (``cfg.compile``)."""
    model = wrap_ddp(model, ctx, find_unused_parameters=find_unused)
    if cfg.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    return model


@contextlib.contextmanager
def autocast_for(cfg: TrainConfig, dev: torch.device) -> Iterator[None]:
    """bfloat16 autocast around a forward pass when ``cfg.precision == "bf16"``."""
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        yield


def prepare_input(x: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last and x.dim() == 4 else x


def make_optimizer(groups: list[dict[str, Any]], momentum: float) -> torch.optim.SGD:
    return torch.optim.SGD([{k: v for k, v in g.items() if k != "name"} for g in groups], momentum=momentum)


class RunGuard:
    """Keeps ``status.json`` truthful when training stops early (Ctrl-C, divergence)."""

    def __init__(self, run: RunFolder | None, total_epochs: int) -> None:
        self.run, self.total_epochs = run, total_epochs
        self.epoch = self.step = 0

    def __enter__(self) -> RunGuard:
        if self.run is not None:
            self.run.attach_log(log)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self.run is None:
            return
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self.run.set_status("interrupted", epoch=self.epoch, step=self.step, total_epochs=self.total_epochs)
        elif exc_type is not None and issubclass(exc_type, TrainingDiverged):
            self.run.set_status("failed", reason=str(exc), epoch=self.epoch, step=self.step)
        elif exc_type is not None:
            self.run.set_status("failed", reason=f"{exc_type.__name__}: {exc}", epoch=self.epoch, step=self.step)
        self.run.detach_log(log)

    def end_epoch(self, row: dict[str, Any]) -> None:
        self.epoch, self.step = row["epoch"], row["step"]
        if self.run is not None:
            self.run.append_metrics(row)
            self.run.set_status("running", epoch=self.epoch, total_epochs=self.total_epochs)


def set_train_mode(backbone: nn.Module, head: nn.Module, cfg: TrainConfig) -> None:
    # a linear probe reads the frozen backbone exactly as at evaluation (BN running stats)
    backbone.train(cfg.method != "linear")
    head.train()


def select_subset(train_set: ImageTensorDataset, cfg: TrainConfig) -> tuple[ImageTensorDataset, torch.Tensor | None]:
    if cfg.label_fraction is None and cfg.per_class is None:
        return train_set, None
    from selfmask.data.subsets import label_subset

    sub = label_subset(train_set.labels, fraction=cfg.label_fraction, per_class=cfg.per_class, seed=cfg.seed)
    idx = torch.as_tensor(sub.indices, dtype=torch.long)
    return train_set.subset(idx, name=f"{train_set.name}[{len(idx)} labelled]"), idx


def adapt(
    backbone: nn.Module,
    info: BackboneInfo,
    train_set: ImageTensorDataset,
    cfg: TrainConfig,
    *,
    run: RunFolder | None = None,
    run_meta: dict[str, Any] | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train ``backbone`` on ``train_set`` with ``cfg`` (supervised objective).

    Writes ``config.json``, ``status.json``, ``metrics.jsonl``, ``log.txt``,
    ``scores.safetensors`` / ``weights.safetensors`` and ``head.safetensors`` into
    ``run`` when one is given. Raises :class:`TrainingDiverged` on a NaN/Inf loss.

    Under an initialised ``torch.distributed`` process group (``torchrun``) every
    process calls this alike: ``cfg.batch_size`` is the global batch, each process
    trains on its slice under DDP, and only rank 0 writes into ``run``
    (:mod:`selfmask.training.distributed`).
    """
    if cfg.objective != "supervised":
        raise SelfmaskError(f"adapt(): objective {cfg.objective!r} is trained by adapt_swav()")
    ctx = current_context()
    dev = resolve_device(training_device(cfg.device, ctx))
    data, subset_idx = select_subset(train_set, cfg)
    if len(data) == 0:
        raise SelfmaskError(f"training set {train_set.name!r} is empty")
    if len(data) < 2 and cfg.method != "linear":
        raise SelfmaskError(f"training set {data.name!r} has {len(data)} image(s); BatchNorm training needs at least 2")
    bs = min(cfg.batch_size, len(data))
    check_world(ctx, bs, len(data))
    if cfg.sync_bn:
        backbone = to_sync_batchnorm(backbone, ctx, cfg.device)
    backbone, head, mcfg, groups = prepare_model(backbone, info, train_set.num_classes, cfg)
    backbone.to(dev)
    head.to(dev)
    speed_setup(backbone, cfg, head)
    model = wrap_for_training(Classifier(backbone, head), cfg, ctx)
    opt = make_optimizer(groups, cfg.momentum)
    steps_per_epoch = max(1, len(data) // bs)  # drop the last partial batch (BatchNorm)
    sched = make_scheduler(opt, steps_per_epoch * cfg.epochs, round(cfg.warmup_epochs * steps_per_epoch))
    if run is not None and not resume and ctx.is_main:
        write_run_config(run, info, train_set, len(data), cfg, mcfg, run_meta)
    log.info(
        "adapt: method=%s backbone=%s images=%d batch=%d epochs=%d lr=%g device=%s processes=%d",
        cfg.method, info.name, len(data), bs, cfg.epochs, cfg.resolved_lr, dev, ctx.world_size,
    )
    images, labels = data.images, data.labels
    gen = torch.Generator().manual_seed(rank_seed(cfg.seed, ctx))

    def step_fn(idx: torch.Tensor, _epoch: int, _step: int) -> tuple[torch.Tensor, dict[str, float]]:
        x = images[idx].to(dev, non_blocking=True)
        y = labels[idx].to(dev, non_blocking=True)
        if cfg.augment:
            x = random_crop_flip(x, gen, flip=cfg.flip)
        with autocast_for(cfg, dev):
            logits = model(prepare_input(normalize_batch(x, info.mean, info.std), cfg))
            loss = nn.functional.cross_entropy(logits.float(), y)
        n = len(y)
        return loss, {"loss": float(loss.detach()) * n, "correct": float((logits.argmax(1) == y).sum()), "seen": n}

    def epoch_row(sums: dict[str, float]) -> dict[str, Any]:
        row = {"loss": sums["loss"] / sums["seen"], "train_accuracy": sums["correct"] / sums["seen"]}
        if mcfg is not None:
            row["fraction_active"] = mask_summary(backbone).fraction_active
        return row

    spec = LoopSpec(
        num_items=len(data), batch_size=cfg.batch_size, epochs=cfg.epochs, seed=cfg.seed, optimizer=opt,
        scheduler=sched, generator=gen, modules={"backbone": backbone, "head": head},
        set_train_mode=lambda: set_train_mode(backbone, head, cfg), epoch_row=epoch_row,
        checkpoint_every=cfg.checkpoint_every, desc=cfg.method, progress=progress and ctx.is_main, dist=ctx,
    )
    history, step = run_epochs(spec, step_fn, run=run, resume=resume, on_epoch=on_epoch,
                               config_fingerprint=with_run_identity(cfg.to_dict(), info.name, run_meta))
    result = TrainResult(backbone, head, cfg, mcfg, history, subset_idx)
    if run is not None and ctx.is_main:
        save_trained(result, run)
        run.set_status("trained", epoch=len(history), step=step, total_epochs=cfg.epochs)
    return result


def save_trained(result: TrainResult, run: RunFolder) -> None:
    """Write the trained state (scores or weights, and the head) into the run folder."""
    if result.mask_config is not None:
        atomic_save_safetensors(run.file("scores.safetensors"), {k: v for k, v in mask_scores(result.backbone).items()})
        # BatchNorm running statistics keep updating during mask training (bn="train"):
        # they are part of the adapted model, so they are stored beside the scores.
        atomic_save_safetensors(run.file("buffers.safetensors"), dict(result.backbone.named_buffers()))
    elif result.config.method == "fft":
        atomic_save_safetensors(run.file("weights.safetensors"), result.backbone.state_dict())
    if result.head is not None:
        head_state = {k: v for k, v in result.head.state_dict().items()}
        atomic_save_safetensors(run.file("head.safetensors"), head_state)


@torch.no_grad()
def classify(
    backbone: nn.Module,
    head: nn.Module,
    dataset: ImageTensorDataset,
    info: BackboneInfo,
    device: str = "cpu",
    batch_size: int = 256,
) -> float:
    """Top-1 accuracy of ``head(backbone(x))`` on un-augmented ``dataset``."""
    dev = resolve_device(device)
    backbone.eval()
    head.eval()
    correct = 0
    for start in range(0, len(dataset), batch_size):
        x = normalize_batch(dataset.images[start : start + batch_size].to(dev), info.mean, info.std)
        y = dataset.labels[start : start + batch_size].to(dev)
        correct += int((head(backbone(x)).argmax(1) == y).sum())
    return correct / max(1, len(dataset))


def count_trainable_bits(result: TrainResult) -> dict[str, float]:
    """Stored size of an adaptation in bits: 1 bit per mask entry, 32 per fp32 weight."""
    head_bits = 0
    if result.head is not None:
        if result.config.head == "masked-random" and result.config.method != "linear":
            head_bits = sum(s.numel() for s in mask_scores(result.head).values())
        else:
            head_bits = 32 * sum(p.numel() for p in result.head.parameters())
    if result.mask_config is not None:
        s = mask_summary(result.backbone)
        return {"backbone_bits": s.raw_bits, "entropy_bits": s.entropy_bits, "head_bits": head_bits}
    if result.config.method == "fft":
        bits = 32 * sum(p.numel() for p in result.backbone.parameters())
        return {"backbone_bits": bits, "entropy_bits": math.nan, "head_bits": head_bits}
    return {"backbone_bits": 0, "entropy_bits": 0.0, "head_bits": head_bits}
