"""Build a cascade from a dispatcher run, evaluate it and time its inference (METHOD.md section 4).

``build_cascade`` follows the recipe: embed the training set with the dispatcher (a trained
self-supervised SMN run folder), route it into groups, train one expert SMN per group with
SwAV, initialised from the dispatcher's scores and BatchNorm buffers
(``TrainConfig(init_from=...)``, which :func:`~selfmask.training.ssl.adapt_swav` honours
through ``prepare_backbone``), for the dispatcher's number of optimiser steps, then fit
the unconditional and conditional fusion PCA on the training set.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from selfmask.backbones import backbone_info, create_backbone
from selfmask.cascade.config import MODES, CascadeConfig
from selfmask.cascade.fusion import FusionPCA, concat_parts
from selfmask.cascade.model import ROOT, Cascade, expert_name
from selfmask.cascade.router import fit_router
from selfmask.data.base import ImageTensorDataset
from selfmask.errors import SelfmaskError

log = logging.getLogger("selfmask.cascade")


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


def _multicrop_from_dict(data: dict[str, Any] | None, info: Any, seed: int):  # noqa: ANN202
    from selfmask.data.multicrop import MultiCrop, MultiCropConfig

    if not data or data.get("type"):
        return MultiCrop.for_input_size(info.input_size, seed=seed, mean=info.mean, std=info.std)
    known = {f.name for f in fields(MultiCropConfig)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known}
    return MultiCrop(MultiCropConfig(**kw), seed=seed)


def _embed_all(cascade: Cascade, data: ImageTensorDataset, mode: str, batch_size: int) -> dict[str, Any]:
    """Root / expert parts of a whole dataset in batches, concatenated."""
    roots, routes, parts = [], [], []
    for i in range(0, len(data), batch_size):
        root, experts, rt = cascade.embed_parts(data.images[i : i + batch_size], mode)
        roots.append(root)
        routes.append(rt)
        parts.append(concat_parts(root, experts, None if mode == "unconditional" else rt))
    return {"root": torch.cat(roots), "routes": torch.cat(routes), "concat": torch.cat(parts)}


def fit_fusion(cascade: Cascade, train_set: ImageTensorDataset, dim: int, batch_size: int = 256) -> None:
    """Fit both modes' fusion PCA (to ``dim``) on ``train_set``'s concatenated embeddings, in place."""
    for mode in MODES:
        cascade.fusion[mode] = FusionPCA.fit(_embed_all(cascade, train_set, mode, batch_size)["concat"], dim)


def _changed_buffers(model: torch.nn.Module, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``buffer.<name>`` extras: the buffers training changed (BatchNorm statistics), as mask files store them."""
    return {f"buffer.{k}": v.detach().cpu().clone() for k, v in model.named_buffers()
            if k in base and not torch.equal(v.detach().cpu(), base[k])}


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
    from selfmask.evaluation import extract_features
    from selfmask.objectives import SwAVConfig
    from selfmask.storage import load_mask, load_run, save_mask
    from selfmask.training.config import TrainConfig
    from selfmask.training.run_folder import RunFolder, read_run_config, run_embedding
    from selfmask.training.ssl import adapt_swav

    cfg = cfg or CascadeConfig()
    dispatcher, out = Path(dispatcher), Path(out)
    if (out / "cascade.json").exists() and not overwrite:
        raise SelfmaskError(f"{out / 'cascade.json'} exists; pass overwrite=True (--overwrite) to rebuild it")
    dcfg = read_run_config(dispatcher)
    if not dcfg.get("mask"):
        raise SelfmaskError(f"dispatcher {str(dispatcher)!r} trained no masks; the cascade needs an SMN run")
    train_cfg = dict(dcfg.get("train") or {})
    if train_cfg.get("objective") != "swav":
        log.warning("dispatcher %s was trained with objective %r; experts are trained with SwAV",
                    dispatcher, train_cfg.get("objective"))
    if len(train_set) < cfg.num_experts:
        raise SelfmaskError(f"cascade: {cfg.num_experts} experts asked for, but the training set "
                            f"{train_set.name!r} has only {len(train_set)} images")
    steps = dispatcher_steps(dispatcher)
    weights = dcfg.get("weights")
    t0 = time.perf_counter()
    rebuilt = load_run(dispatcher)
    info = backbone_info(rebuilt.backbone, run_embedding(dcfg))  # the dispatcher's embedding
    if train_set.resolution != info.input_size:
        raise SelfmaskError(f"cascade: {train_set.name!r} has {train_set.resolution} px images, {info.name} expects "
                            f"{info.input_size}")
    out.mkdir(parents=True, exist_ok=True)
    save_mask(rebuilt.model, out / "root.mask", backbone=rebuilt.backbone, extra=rebuilt.extra, overwrite=True,
              source={**rebuilt.source, "role": "root"}, base_fingerprint=rebuilt.base_fingerprint)
    feats = extract_features(rebuilt.model, train_set, info.mean, info.std, batch_size=batch_size)
    router, groups = fit_router(feats, cfg.num_experts, cfg.router, cfg.router_dim, cfg.min_group_size, cfg.seed)
    for note in router.notes:
        log.warning("router: %s", note)
    swav_dict = dcfg.get("swav") or {}
    torch.manual_seed(int(dcfg["seed"]))
    base_buffers = {k: v.clone() for k, v in create_backbone(info.name, weights, info.embedding).named_buffers()}
    experts_report: list[dict[str, Any]] = []
    expert_masks = []
    for g in range(router.num_groups):
        idx = torch.nonzero(groups == g).flatten()
        subset = train_set.subset(idx, name=f"{train_set.name}[group {g}]")
        n = len(subset)
        seed = cfg.seed + 1 + g
        bs = min(int(train_cfg.get("batch_size", 64)), n)
        steps_per_epoch = max(1, n // bs)
        epochs = max(1, round(steps / steps_per_epoch))
        tdict = {k: v for k, v in train_cfg.items() if k not in ("resolved_lr", "resolved_weight_decay")}
        warmup = float(tdict.get("warmup_epochs", 0.0) or 0.0) * epochs / max(1, int(tdict.get("epochs", 1)))
        tdict.update(init_from=str(dispatcher), seed=seed, epochs=epochs, checkpoint_every=0,
                     warmup_epochs=warmup if warmup < epochs else 0.0, objective="swav")
        tcfg = TrainConfig.from_dict(tdict)
        swav = SwAVConfig.from_dict({**swav_dict, "queue_length": min(int(swav_dict.get("queue_length", 0)), n)}
                                    if swav_dict else {})
        crops = _multicrop_from_dict(dcfg.get("crops"), info, seed)
        torch.manual_seed(int(dcfg["seed"]))  # the dispatcher's base weights (a random base depends on the seed)
        backbone = create_backbone(info.name, weights, info.embedding)
        run = RunFolder(out / "runs" / expert_name(g), overwrite=True).prepare()
        start = time.perf_counter()
        result = adapt_swav(backbone, info, subset, tcfg, swav, crops=crops, run=run,
                            run_meta={"weights": weights, "cascade_group": g, "base_seed": int(dcfg["seed"])}, progress=progress)
        # straight from the trained model: a run folder rebuilds a random base (weights null) from the
        # run's own seed, while an expert's base is the dispatcher's
        save_mask(result.backbone, out / f"{expert_name(g)}.mask", backbone=info.name,
                  extra=_changed_buffers(result.backbone, base_buffers), overwrite=True,
                  base_fingerprint=rebuilt.base_fingerprint,
                  source={"run_dir": f"runs/{expert_name(g)}", "weights": weights, "seed": seed, "role": "expert",
                          "group": g})
        expert_masks.append(load_mask(out / f"{expert_name(g)}.mask"))
        row = {"group": g, "train_images": n, "batch_size": bs, "epochs": epochs, "steps": epochs * steps_per_epoch,
               "seed": seed, "final_loss": result.history[-1]["loss"], "seconds": round(time.perf_counter() - start, 1)}
        experts_report.append(row)
        log.info("expert %d: %s", g, row)
        if on_expert is not None:
            on_expert(g, row)
    torch.manual_seed(int(dcfg["seed"]))
    base = create_backbone(info.name, weights, info.embedding)
    cascade = Cascade(base, info, load_mask(out / "root.mask"), expert_masks, router)
    fit_fusion(cascade, train_set, cfg.fusion_dim or info.embed_dim, batch_size)
    report = {
        "cascade": cfg.to_dict(),
        "dispatcher": str(dispatcher),
        "dispatcher_steps": steps,
        "weights": weights,
        "base_seed": int(dcfg["seed"]),
        "train_set": train_set.name,
        "train_images": len(train_set),
        "group_sizes": torch.bincount(groups, minlength=router.num_groups).tolist(),
        "router_notes": list(router.notes),
        "experts": experts_report,
        "fusion_dim": {mode: cascade.fusion[mode].dim for mode in MODES},
        "build_seconds": round(time.perf_counter() - t0, 1),
    }
    cascade.meta = report
    cascade.save(out, overwrite=True)
    return cascade, report


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
        tr = _embed_all(cascade, train_set, mode, batch_size)
        te = _embed_all(cascade, test_set, mode, batch_size)
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
    import copy

    from selfmask.data.base import normalize_batch

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
