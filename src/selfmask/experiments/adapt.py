"""The work behind ``selfmask adapt``: check, train, evaluate and record one adaptation run.

:func:`run_adapt` takes an :class:`AdaptJob` (the typed settings and where to read and
write) and returns an :class:`AdaptOutcome`; the command line only builds the job and
prints the outcome. :func:`resume_job` builds the job of an interrupted run from its
``config.json``. Under ``torchrun`` every process calls :func:`run_adapt` alike: rank 0
prepares the run folder and reads (caches) the data first, and alone evaluates and writes
``results.json``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from selfmask.errors import SelfmaskError
from selfmask.training.config import TrainConfig, objective_configs

log = logging.getLogger("selfmask")

#: Held out of the training set for ``online_knn_every`` (a tenth), never used for selection.
ONLINE_HELD_OUT = 10


@dataclass
class AdaptJob:
    """One ``selfmask adapt`` run.

    Attributes:
        train: the training settings; a dict of :class:`TrainConfig` fields is checked by
            the preflight together with every other problem (one message lists them all).
        data: the data specification (``selfmask.data.sources``).
        out: the run folder.
        backbone, weights, embedding: the model to adapt.
        objective_config: the objective's settings (e.g. a ``SwAVConfig``); ``None``: its defaults.
        crops: the multi-crop views of a self-supervised objective: a ``MultiCropConfig``, or
            a dict of fields overriding the paper's recipe scaled to the backbone's input size.
        resume: continue the interrupted run in ``out`` (its settings come from its config.json).
        overwrite: replace a finished run in ``out``.
        evaluate: k-NN (``knn_k``, ``knn_temperature``), linear probe (``linear_probe``) and
            the head's test accuracy after training.
        online_knn_every: self-supervised runs: k-NN on a held-out tenth of the training set
            every this many epochs, to watch progress (0: off).
    """

    train: TrainConfig | dict[str, Any]
    data: str
    out: Path
    backbone: str = "resnet_tiny"
    weights: str | None = None
    embedding: str | None = None
    objective_config: Any = None
    crops: Any = field(default_factory=dict)
    resume: bool = False
    overwrite: bool = False
    cache_dir: Path | None = None
    progress: bool = True
    evaluate: bool = True
    knn_k: int = 200
    knn_temperature: float = 0.1
    linear_probe: bool = True
    online_knn_every: int = 0


@dataclass
class AdaptOutcome:
    """What :func:`run_adapt` did: the run folder, ``results.json``'s content (``None`` on ranks other than 0
    and when stopped) and, when a signal stopped it, the stop (``selfmask.training.loop.StopRequested`` during
    training, ``KeyboardInterrupt`` during the final evaluation)."""

    run_dir: Path
    results: dict[str, Any] | None = None
    stopped: BaseException | None = None


def resume_job(run_dir: str | Path, **options: Any) -> AdaptJob:
    """The job of the interrupted run in ``run_dir``: everything that shapes training from its ``config.json``
    (``train``, ``backbone``, ``weights``, ``embedding``, ``data_spec`` and the objective's and crops' settings);
    ``options`` are the rest (``cache_dir``, ``progress``, the evaluation settings)."""
    from selfmask.training.run_folder import read_run_config

    saved = read_run_config(run_dir)
    where = Path(run_dir) / "config.json"
    if saved.train is None or saved.data_spec is None:
        missing = "train" if saved.train is None else "data_spec"
        raise SelfmaskError(f"{where}: key {missing!r} is missing (was this run written by `selfmask adapt`?)")
    if objective_configs().get(saved.train.objective) is not None:
        for key, value in ((saved.train.objective, saved.objective_config), ("crops", saved.multicrop())):
            if value is None:
                raise SelfmaskError(f"{where}: key {key!r} is missing or not an object (a "
                                    f"{saved.train.objective} run records it)")
    return AdaptJob(train=saved.train, data=saved.data_spec, out=Path(run_dir), backbone=saved.backbone,
                    weights=saved.weights, embedding=saved.embedding, objective_config=saved.objective_config,
                    crops=saved.crops, resume=True, **options)


def check_objective_settings(objective: str, objective_config: Any, crops: Any) -> None:
    """The objective's settings and crop overrides are valid (before any other work)."""
    from selfmask.data.multicrop import MultiCropConfig

    configs = objective_configs()
    if objective not in configs:
        raise SelfmaskError(f"unknown objective {objective!r}; expected one of {tuple(configs)}")
    if configs[objective] is None:
        return
    if isinstance(objective_config, dict):
        configs[objective](**objective_config)
    if isinstance(crops, dict):
        MultiCropConfig.for_input_size(224, **crops)  # scales and probabilities do not depend on the size


def run_adapt(job: AdaptJob) -> AdaptOutcome:
    """Preflight, then train and evaluate ``job``; writes the run folder and ``results.json``.

    Raises :class:`~selfmask.errors.SelfmaskError` for every user mistake (the preflight
    lists all it finds at once); a signal during training or evaluation is returned as
    ``AdaptOutcome.stopped`` with the checkpoint saved.
    """
    from selfmask.backbones import backbone_info
    from selfmask.training.distributed import init_distributed, shutdown
    from selfmask.training.preflight import run_preflight
    from selfmask.training.trainer import resolve_device

    # every problem (config, device, backbone, weights, data, run folder, disk) at once, before any work
    run_preflight(out=job.out, backbone=job.backbone, weights=job.weights, data=job.data, train_settings=job.train,
                  overwrite=job.overwrite and not job.resume, resume=job.resume)
    backbone_info(job.backbone, job.embedding)  # an embedding the backbone does not offer: one line
    cfg = job.train if isinstance(job.train, TrainConfig) else TrainConfig(**job.train)
    resolve_device(cfg.device)
    ctx = init_distributed(cfg.device)  # torchrun: join the process group (CUDA checked first)
    try:
        return _train_and_evaluate(replace(job, train=cfg), ctx)
    finally:
        shutdown(ctx)


def _prepare_folder(job: AdaptJob, ctx: Any) -> Any:
    """Rank 0 prepares the run folder (writable, not a finished run); the others learn whether it could."""
    from selfmask.training.distributed import broadcast_flag
    from selfmask.training.run_folder import RunFolder

    run_folder = RunFolder(job.out, overwrite=job.overwrite and not job.resume)
    if ctx.is_main:
        try:
            run_folder.prepare()
        except SelfmaskError:
            broadcast_flag(False, ctx)
            raise
    if not broadcast_flag(True, ctx):
        raise SelfmaskError(f"rank 0 could not prepare the run folder {str(job.out)!r}; see its message")
    return run_folder


def _load_data(job: AdaptJob, info: Any, ctx: Any) -> tuple[Any, Any]:
    """The train and test splits; rank 0 reads (and caches) them first."""
    from selfmask.data.sources import load_data
    from selfmask.training.distributed import barrier

    if not ctx.is_main:
        barrier(ctx)
    train, test = load_data(job.data, resolution=info.input_size, cache_dir=job.cache_dir)
    if ctx.is_main:
        barrier(ctx)
    if len(train) == 0 or len(test) == 0:
        raise SelfmaskError(f"data {job.data!r}: empty split (train {len(train)}, test {len(test)} images)")
    return train, test


def online_split(train: Any, every: int, seed: int) -> Any:
    """``OnlineEval`` on a seeded held-out tenth of ``train`` (bank: the rest), or ``None`` when ``every`` is 0."""
    import torch

    from selfmask.training.ssl import OnlineEval

    if every <= 0:
        return None
    held = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    cut = max(1, len(train) // ONLINE_HELD_OUT)
    return OnlineEval(train.subset(held[cut:]), train.subset(held[:cut]), every=every)


def _crops(job: AdaptJob, info: Any, seed: int) -> Any:
    from selfmask.data.multicrop import MultiCrop, MultiCropConfig

    if isinstance(job.crops, MultiCropConfig):
        return MultiCrop(job.crops, seed=seed)
    overrides = dict(job.crops or {})
    if not job.train.flip:
        overrides.setdefault("flip_p", 0.0)
    return MultiCrop.for_input_size(info.input_size, seed=seed, mean=info.mean, std=info.std, **overrides)


def _objective_config(job: AdaptJob) -> Any:
    cls = objective_configs()[job.train.objective]
    if job.objective_config is None:
        return cls()
    return cls(**job.objective_config) if isinstance(job.objective_config, dict) else job.objective_config


def _train(job: AdaptJob, backbone: Any, info: Any, train: Any, run_folder: Any, meta: dict[str, Any]) -> Any:
    from selfmask.training.trainer import adapt

    cfg = job.train
    if cfg.objective == "supervised":
        return adapt(backbone, info, train, cfg, run=run_folder, progress=job.progress, run_meta=meta,
                     resume=job.resume)
    from selfmask.training.ssl import adapt_ssl

    online = online_split(train, job.online_knn_every, cfg.seed)
    return adapt_ssl(backbone, info, train, cfg, _objective_config(job), objective=cfg.objective,
                     crops=_crops(job, info, cfg.seed), run=run_folder, run_meta=meta, progress=job.progress,
                     online_eval=online, resume=job.resume)


def _train_and_evaluate(job: AdaptJob, ctx: Any) -> AdaptOutcome:
    import torch

    from selfmask.backbones import backbone_info, create_backbone
    from selfmask.fingerprint import model_fingerprint
    from selfmask.training.loop import StopRequested

    cfg = job.train
    if not ctx.is_main:  # one log: rank 0's
        logging.getLogger("selfmask").setLevel(logging.WARNING)
    info = backbone_info(job.backbone, job.embedding)
    run_folder = _prepare_folder(job, ctx)
    train, test = _load_data(job, info, ctx)
    torch.manual_seed(cfg.seed)
    backbone = create_backbone(info.name, job.weights, info.embedding)
    meta = {"weights": job.weights, "data_spec": job.data, "base_fingerprint": model_fingerprint(backbone)}
    try:
        result = _train(job, backbone, info, train, run_folder, meta)
    except StopRequested as stop:
        return AdaptOutcome(run_folder.path, stopped=stop)
    except OSError as exc:  # e.g. the disk filled up: checkpoints are atomic, so the last one is intact
        where = exc.filename or run_folder.path
        raise SelfmaskError(
            f"writing {where} failed during training: {exc.strerror or exc}; the last complete checkpoint is kept. "
            f"Fix the cause (e.g. free disk space), then continue with: selfmask adapt --resume {run_folder.path}"
        ) from None
    if not ctx.is_main:
        return AdaptOutcome(run_folder.path)  # rank 0 evaluates and writes results.json
    try:
        results = _results(job, result, info, train, test)
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: training is saved, --resume evaluates
        run_folder.set_status("interrupted", phase="evaluation", epoch=cfg.epochs, total_epochs=cfg.epochs)
        return AdaptOutcome(run_folder.path,
                            stopped=KeyboardInterrupt(f"{stop or 'stopped by SIGINT'} during the final evaluation"))
    run_folder.write_json("results.json", results)
    run_folder.set_status("finished")
    return AdaptOutcome(run_folder.path, results)


def _results(job: AdaptJob, result: Any, info: Any, train: Any, test: Any) -> dict[str, Any]:
    """``results.json``: the settings that produced the numbers, the stored size and the evaluation."""
    from selfmask.experiments.evaluate import evaluate_features
    from selfmask.training.trainer import classify, count_trainable_bits

    cfg = job.train
    results: dict[str, Any] = {"method": cfg.method, "label_fraction": cfg.label_fraction, "per_class": cfg.per_class,
                               "seed": cfg.seed, "backbone": info.name, "embedding": info.embedding, "data": job.data,
                               "final_train_loss": result.history[-1]["loss"], **count_trainable_bits(result)}
    if job.evaluate:
        if result.head is not None:
            results["test_accuracy"] = classify(result.backbone, result.head, test, info, device=cfg.device)
        results.update(
            evaluate_features(
                result.backbone, info, train, test, bank_indices=result.train_indices, knn_k=job.knn_k,
                knn_temperature=job.knn_temperature, linear_probe=job.linear_probe, seed=cfg.seed, device=cfg.device,
            )
        )
    return results


__all__ = ["AdaptJob", "AdaptOutcome", "check_objective_settings", "online_split", "resume_job", "run_adapt"]
