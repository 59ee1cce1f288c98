"""Build a cascade from a dispatcher run (METHOD.md section 4).

:func:`build_cascade` follows the recipe in five steps, one function each:

1. :func:`read_dispatcher`: what the cascade takes from the dispatcher's run folder (a trained
   self-supervised SMN): its base weights and seed, training settings, SwAV and crop settings,
   and the number of optimiser steps it took.
2. :func:`write_root` and :func:`route`: rebuild the dispatcher's model, save it as the root
   mask, embed the training set with it and split it into groups.
3. :func:`train_expert` (for each group): one expert SMN trained with SwAV on its group,
   initialised from the dispatcher's scores and BatchNorm buffers (``TrainConfig(init_from=...)``,
   which :func:`~selfmask.training.ssl.adapt_swav` honours through ``prepare_backbone``), for the
   dispatcher's number of optimiser steps (:func:`expert_schedule`).
4. :func:`~selfmask.cascade.fusion.fit_fusion`: the unconditional and conditional fusion PCA,
   fitted on the training set.
5. :meth:`Cascade.save`: the cascade folder, with the build report in its manifest.

Evaluation and timing of a built cascade live in :mod:`selfmask.cascade.evaluate`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from selfmask.backbones import backbone_info, create_backbone
from selfmask.backbones.registry import BackboneInfo
from selfmask.cascade.config import MODES, CascadeConfig
from selfmask.cascade.fusion import fit_fusion
from selfmask.cascade.model import Cascade, expert_name
from selfmask.cascade.router import Router, fit_router
from selfmask.data.base import ImageTensorDataset
from selfmask.errors import SelfmaskError

log = logging.getLogger("selfmask.cascade")


# ---------------------------------------------------------------------- 1. the dispatcher
@dataclass(frozen=True)
class Dispatcher:
    """What a cascade takes from its dispatcher's run folder.

    Attributes:
        path: the run folder.
        seed: the run's seed (a random base, ``weights`` None, is built after ``torch.manual_seed(seed)``).
        weights: the base weights the run recorded.
        embedding: the embedding the run recorded.
        train: its training settings (a ``TrainConfig``; ``None``: the defaults): the experts' starting point.
        objective: its self-supervised objective (``swav``, ``dino``, ...), which the experts train with
            too (SwAV for a dispatcher trained with labels).
        settings: that objective's settings (a ``SwAVConfig``, a ``DINOConfig``, ...; ``None``: the defaults).
        crops: its multi-crop settings (a ``MultiCropConfig``; ``None`` or a legacy ``{"type": ...}`` record: the
            defaults).
        steps: optimiser steps it took (see :func:`dispatcher_steps`).
    """

    path: Path
    seed: int
    weights: str | None
    embedding: str | None
    train: Any
    objective: str
    settings: Any
    crops: Any
    steps: int


def dispatcher_steps(run_dir: Path) -> int:
    """Optimiser steps the dispatcher run took (``status.json``, else the last ``metrics.jsonl`` row)."""
    status = run_dir / "status.json"
    if status.is_file():
        try:
            step = json.loads(status.read_text()).get("step")
        except ValueError:
            step = None
        if isinstance(step, int) and step > 0:
            return step
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if rows and isinstance(rows[-1].get("step"), int):
            return int(rows[-1]["step"])
    raise SelfmaskError(f"dispatcher {str(run_dir)!r}: cannot tell how many steps it trained (no status/metrics step)")


def read_dispatcher(path: str | Path) -> Dispatcher:
    """What the cascade takes from the dispatcher's ``config.json`` (the typed run-config reader); refuses a run
    without masks."""
    from selfmask.training.run_folder import read_run_config

    path = Path(path)
    dcfg = read_run_config(path)
    if dcfg.mask is None:
        raise SelfmaskError(f"dispatcher {str(path)!r} trained no masks; the cascade needs an SMN run")
    objective = dcfg.train.objective if dcfg.train is not None else "supervised"
    if objective == "supervised":
        log.warning("dispatcher %s was trained with objective %r; experts are trained with SwAV", path, objective)
        objective, settings = "swav", None
    else:
        settings = dcfg.objective_config
    return Dispatcher(path=path, seed=dcfg.seed, weights=dcfg.weights, embedding=dcfg.embedding, train=dcfg.train,
                      objective=objective, settings=settings, crops=dcfg.crops, steps=dispatcher_steps(path))


def _base_backbone(d: Dispatcher, info: BackboneInfo) -> torch.nn.Module:
    """The dispatcher's base backbone, as its run built it (a random base depends on the run's seed)."""
    torch.manual_seed(d.seed)
    return create_backbone(info.name, d.weights, info.embedding)


# ---------------------------------------------------------------------- 2. root and routing
def write_root(d: Dispatcher, train_set: ImageTensorDataset, out: Path) -> tuple[Any, BackboneInfo]:
    """Rebuild the dispatcher's masked model and save it as ``out/root.mask``; returns it and its backbone info."""
    from selfmask.storage import load_run, save_mask

    rebuilt = load_run(d.path)
    info = backbone_info(rebuilt.backbone, d.embedding)  # the dispatcher's embedding
    if train_set.resolution != info.input_size:
        raise SelfmaskError(f"cascade: {train_set.name!r} has {train_set.resolution} px images, {info.name} expects "
                            f"{info.input_size}")
    out.mkdir(parents=True, exist_ok=True)
    save_mask(rebuilt.model, out / "root.mask", backbone=rebuilt.backbone, extra=rebuilt.extra, overwrite=True,
              source={**rebuilt.source, "role": "root"}, base_fingerprint=rebuilt.base_fingerprint)
    return rebuilt, info


def route(model: torch.nn.Module, info: BackboneInfo, train_set: ImageTensorDataset, cfg: CascadeConfig,
          batch_size: int) -> tuple[Router, torch.Tensor]:
    """Embed ``train_set`` with the root model and fit the router; returns it and each image's group."""
    from selfmask.evaluation import extract_features

    feats = extract_features(model, train_set, info.mean, info.std, batch_size=batch_size)
    router, groups = fit_router(feats, cfg.num_experts, cfg.router, cfg.router_dim, cfg.min_group_size, cfg.seed)
    for note in router.notes:
        log.warning("router: %s", note)
    return router, groups


# ---------------------------------------------------------------------- 3. the experts
@dataclass(frozen=True)
class ExpertSchedule:
    """How one expert trains: the dispatcher's settings scaled to its group's size."""

    seed: int
    batch_size: int
    steps_per_epoch: int
    epochs: int
    train: Any  # TrainConfig
    objective: str  # the dispatcher's self-supervised objective
    settings: Any  # its settings (SwAVConfig, DINOConfig, ...; None: the defaults)


def expert_schedule(d: Dispatcher, group: int, n: int, cfg: CascadeConfig) -> ExpertSchedule:
    """Group ``group`` of ``n`` images: whole epochs closest to the dispatcher's step count, warm-up scaled alike.

    Batches are the dispatcher's (at most ``n``); the SwAV queue is at most ``n`` long.
    """
    from selfmask.objectives import SwAVConfig
    from selfmask.training.config import TrainConfig

    seed = cfg.seed + 1 + group
    train = d.train or TrainConfig()
    bs = min(train.batch_size, n)
    steps_per_epoch = max(1, n // bs)
    epochs = max(1, round(d.steps / steps_per_epoch))
    warmup = train.warmup_epochs * epochs / max(1, train.epochs)
    tcfg = replace(train, init_from=str(d.path), seed=seed, epochs=epochs, checkpoint_every=0,
                   warmup_epochs=warmup if warmup < epochs else 0.0, objective=d.objective)
    settings = d.settings
    if d.objective == "swav":  # the SwAV queue is at most the group long
        settings = replace(settings, queue_length=min(settings.queue_length, n)) if settings else SwAVConfig()
    return ExpertSchedule(seed, bs, steps_per_epoch, epochs, tcfg, d.objective, settings)


def _multicrop(d: Dispatcher, info: BackboneInfo, seed: int):  # noqa: ANN202
    """The dispatcher's multi-crop settings with ``seed`` (its defaults for the backbone when it recorded none)."""
    from selfmask.data.multicrop import MultiCrop, MultiCropConfig

    if not isinstance(d.crops, MultiCropConfig):
        return MultiCrop.for_input_size(info.input_size, seed=seed, mean=info.mean, std=info.std)
    return MultiCrop(d.crops, seed=seed)


def train_expert(
    d: Dispatcher,
    info: BackboneInfo,
    subset: ImageTensorDataset,
    group: int,
    cfg: CascadeConfig,
    out: Path,
    *,
    base_buffers: dict[str, torch.Tensor],
    base_fingerprint: str | None,
    progress: bool,
) -> dict[str, Any]:
    """Train group ``group``'s expert (run folder ``out/runs/expert-<g>``), save ``out/expert-<g>.mask``; its report row."""
    from selfmask.storage import save_mask
    from selfmask.storage.apply import changed_buffers
    from selfmask.training.run_folder import RunFolder
    from selfmask.training.ssl import adapt_ssl

    n = len(subset)
    plan = expert_schedule(d, group, n, cfg)
    crops = _multicrop(d, info, plan.seed)
    backbone = _base_backbone(d, info)
    run = RunFolder(out / "runs" / expert_name(group), overwrite=True).prepare()
    start = time.perf_counter()
    result = adapt_ssl(backbone, info, subset, plan.train, plan.settings, objective=plan.objective, crops=crops,
                       run=run, run_meta={"weights": d.weights, "cascade_group": group, "base_seed": d.seed},
                       progress=progress)
    # straight from the trained model: a run folder rebuilds a random base (weights null) from the
    # run's own seed, while an expert's base is the dispatcher's
    save_mask(result.backbone, out / f"{expert_name(group)}.mask", backbone=info.name,
              extra=changed_buffers(result.backbone, base_buffers), overwrite=True, base_fingerprint=base_fingerprint,
              source={"run_dir": f"runs/{expert_name(group)}", "weights": d.weights, "seed": plan.seed,
                      "role": "expert", "group": group})
    return {"group": group, "train_images": n, "batch_size": plan.batch_size, "epochs": plan.epochs,
            "steps": plan.epochs * plan.steps_per_epoch, "seed": plan.seed, "final_loss": result.history[-1]["loss"],
            "seconds": round(time.perf_counter() - start, 1)}


# ---------------------------------------------------------------------- the whole build
def build_cascade(
    dispatcher: str | Path,
    train_set: ImageTensorDataset,
    out: str | Path,
    cfg: CascadeConfig | None = None,
    *,
    overwrite: bool = False,
    progress: bool = False,
    batch_size: int = 256,
    on_expert: Callable[[int, dict[str, Any]], None] | None = None,
) -> tuple[Cascade, dict[str, Any]]:
    """Train the experts and fit the router and fusion; save the cascade folder to ``out``.

    Expert run folders go to ``out/runs/expert-<g>``. Returns the cascade and a build
    report (groups, sizes, steps, merges, timings), also stored in the manifest's ``meta``.
    """
    from selfmask.storage import load_mask

    cfg = cfg or CascadeConfig()
    out = Path(out)
    if (out / "cascade.json").exists() and not overwrite:
        raise SelfmaskError(f"{out / 'cascade.json'} exists; pass overwrite=True (--overwrite) to rebuild it")
    d = read_dispatcher(dispatcher)
    if len(train_set) < cfg.num_experts:
        raise SelfmaskError(f"cascade: {cfg.num_experts} experts asked for, but the training set "
                            f"{train_set.name!r} has only {len(train_set)} images")
    t0 = time.perf_counter()
    root, info = write_root(d, train_set, out)
    router, groups = route(root.model, info, train_set, cfg, batch_size)

    base_buffers = {k: v.clone() for k, v in _base_backbone(d, info).named_buffers()}
    experts_report: list[dict[str, Any]] = []
    for g in range(router.num_groups):
        subset = train_set.subset(torch.nonzero(groups == g).flatten(), name=f"{train_set.name}[group {g}]")
        row = train_expert(d, info, subset, g, cfg, out, base_buffers=base_buffers,
                           base_fingerprint=root.base_fingerprint, progress=progress)
        experts_report.append(row)
        log.info("expert %d: %s", g, row)
        if on_expert is not None:
            on_expert(g, row)

    expert_masks = [load_mask(out / f"{expert_name(g)}.mask") for g in range(router.num_groups)]
    cascade = Cascade(_base_backbone(d, info), info, load_mask(out / "root.mask"), expert_masks, router)
    fit_fusion(cascade, train_set, cfg.fusion_dim or info.embed_dim, batch_size)
    cascade.meta = {
        "cascade": cfg.to_dict(),
        "dispatcher": str(d.path),
        "dispatcher_steps": d.steps,
        "weights": d.weights,
        "base_seed": d.seed,
        "train_set": train_set.name,
        "train_images": len(train_set),
        "group_sizes": torch.bincount(groups, minlength=router.num_groups).tolist(),
        "router_notes": list(router.notes),
        "experts": experts_report,
        "fusion_dim": {mode: cascade.fusion[mode].dim for mode in MODES},
        "build_seconds": round(time.perf_counter() - t0, 1),
    }
    cascade.save(out, overwrite=True)
    return cascade, cascade.meta
