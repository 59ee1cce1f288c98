"""``selfmask adapt``: train masks (or a baseline) on a dataset and evaluate them; one loop for all methods."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from selfmask.cli.common import (
    add_backbone_args,
    add_data_args,
    add_embedding_arg,
    add_eval_args,
    check_eval_args,
    check_setting_types,
    read_config_file,
    setup_logging,
)
from selfmask.errors import SelfmaskError

# flag name -> TrainConfig field; flags default to None so a config file can fill them
_TRAIN_FLAGS: dict[str, tuple[type, str]] = {
    "method": (str, "mask | topk | fft | linear (default mask)"),
    "objective": (str, "supervised | swav (default supervised)"),
    "epochs": (int, "passes over the training set (default 10)"),
    "batch_size": (int, "images per step (default 64)"),
    "lr": (float, "learning rate of what is adapted (default: mask 50, fft 0.001, linear 0.1)"),
    "head_lr": (float, "learning rate of the new head (default 0.1)"),
    "momentum": (float, "SGD momentum (default 0.9)"),
    "weight_decay": (float, "weight decay of what is adapted (default: masks 0, fft 5e-4)"),
    "warmup_epochs": (float, "linear warm-up epochs before the cosine decay (default 0)"),
    "head": (str, "linear | masked-random (default linear)"),
    "keep_ratio": (float, "fraction kept per tensor for --method topk (default 0.9)"),
    "threshold": (float, "mask threshold mu (default 0)"),
    "init_score": (float, "initial score S0 (default 1)"),
    "mask_targets": (str, "MaskConfig targets: preset name or regex (default: the backbone's preset)"),
    "bn": (str, "BatchNorm statistics: train | eval (default train)"),
    "seed": (int, "seed (default 0)"),
    "device": (str, "cpu | cuda[:N] (default cpu)"),
    "label_fraction": (float, "train on this seeded fraction of the labels, in (0, 1]"),
    "per_class": (int, "train on this many labelled images per class"),
    "precision": (str, "fp32 | bf16 (bfloat16 autocast of the forward passes; default fp32)"),
    "init_from": (str, "start the masks from this run folder's scores and BN statistics (an SMN: semi-supervised)"),
    "checkpoint_every": (int, "write a resumable checkpoint every N steps (default 0: at the end of each epoch only)"),
}

# boolean switches: flag -> (TrainConfig field, value when given, help)
_SPEED_SWITCHES: dict[str, tuple[str, bool, str]] = {
    "channels_last": ("channels_last", True, "channels-last weights and inputs (GPU convolutions)"),
    "compile": ("compile", True, "run the model through torch.compile"),
    "no_fast_masks": ("fast_masks", False, "compute masks per layer per forward pass (the plain path)"),
    "sync_bn": ("sync_bn", True, "distributed GPU runs: SyncBatchNorm instead of per-process statistics"),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "adapt",
        help="adapt a backbone: supervised masking, top-k masks, full fine-tuning or a linear head",
        description="Train and evaluate one adaptation. Settings come from flags, or from a JSON --config file "
        "(keys as the flags with underscores, plus data/backbone/weights); flags win.",
    )
    add_data_args(p)
    add_backbone_args(p)
    add_embedding_arg(p)
    p.add_argument("--out", type=Path, default=None, help="run folder to write (required unless --resume)")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="continue an interrupted run from RUN_DIR/checkpoint.pt with the settings in RUN_DIR/config.json")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    p.add_argument("--config", type=Path, default=None, help="JSON file of settings")
    for name, (typ, help_) in _TRAIN_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=help_)
    p.add_argument("--no-augment", action="store_true", help="no random crop / flip")
    p.add_argument("--no-flip", action="store_true", help="no horizontal flips (glyphs: a mirrored b is a d)")
    g = p.add_argument_group("speed and scale (several processes: torchrun --nproc_per_node N -m selfmask adapt ...)")
    for flag, (_field, _value, help_) in _SPEED_SWITCHES.items():
        g.add_argument("--" + flag.replace("_", "-"), action="store_true", help=help_)
    add_swav_args(p)
    p.add_argument("--no-eval", action="store_true", help="train only")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_eval_args(p)
    p.set_defaults(func=run)


def add_swav_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("self-supervised (--objective swav)")
    g.add_argument("--prototypes", type=int, default=None, help="number of prototypes K (default 500)")
    g.add_argument("--queue-length", type=int, default=None, help="queue length, 0 = none (default 512)")
    g.add_argument("--queue-start-epoch", type=int, default=None, help="0-based epoch the queue starts (default 30)")
    g.add_argument("--freeze-prototypes-iters", type=int, default=None, help="steps with frozen prototypes (default 313)")
    g.add_argument("--freeze-backbone-iters", type=int, default=None,
                   help="head warm-up: steps in which only the head and prototypes learn (default 0)")
    g.add_argument("--small-crops", type=int, default=None, help="number of small crops (default 6)")
    g.add_argument("--large-crop-scale", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="area fraction range of the large crops (default 0.14 1.0, the paper's)")
    g.add_argument("--small-crop-scale", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="area fraction range of the small crops (default 0.05 0.14, the paper's)")
    g.add_argument("--small-crop-size", type=int, default=None, metavar="PX",
                   help="side of the small crops in pixels (default: 96/224 of the input size, 14 at 32 px)")
    g.add_argument("--no-color", action="store_true", help="no colour jitter and no grayscale in the crops")
    g.add_argument("--no-blur", action="store_true", help="no Gaussian blur in the crops")
    g.add_argument("--online-knn-every", type=int, default=None, help="k-NN on a held-out tenth of the training set "
                   "every N epochs, to watch progress (0 = off)")


def _swav_overrides(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(SwAVConfig keywords, MultiCropConfig keywords) given by the flags."""
    kw = {k: v for k, v in {
        "num_prototypes": args.prototypes, "queue_length": args.queue_length,
        "queue_start_epoch": args.queue_start_epoch, "freeze_prototypes_iters": args.freeze_prototypes_iters,
        "freeze_backbone_iters": args.freeze_backbone_iters,
    }.items() if v is not None}
    crop_kw: dict[str, Any] = {"n_small": args.small_crops} if args.small_crops is not None else {}
    if args.no_flip:
        crop_kw["flip_p"] = 0.0
    if args.large_crop_scale is not None:
        crop_kw["large_scale"] = tuple(args.large_crop_scale)
    if args.small_crop_scale is not None:
        crop_kw["small_scale"] = tuple(args.small_crop_scale)
    if args.small_crop_size is not None:
        crop_kw["small_size"] = args.small_crop_size
    if args.no_color:
        crop_kw.update(jitter_p=0.0, grayscale_p=0.0)
    if args.no_blur:
        crop_kw["blur_p"] = 0.0
    return kw, crop_kw


def check_swav_flags(args: argparse.Namespace) -> None:
    """Validate the SwAV and multi-crop flags before any work (bad values: SelfmaskError)."""
    from selfmask.data.multicrop import MultiCropConfig
    from selfmask.objectives import SwAVConfig

    kw, crop_kw = _swav_overrides(args)
    SwAVConfig(**kw)
    MultiCropConfig.for_input_size(224, **crop_kw)  # scales and probabilities do not depend on the size


def swav_settings(args: argparse.Namespace, info: object, seed: int):  # noqa: ANN201
    """SwAVConfig and MultiCrop from the flags (paper defaults otherwise)."""
    from selfmask.data.multicrop import MultiCrop
    from selfmask.objectives import SwAVConfig

    kw, crop_kw = _swav_overrides(args)
    crops = MultiCrop.for_input_size(info.input_size, seed=seed, mean=info.mean, std=info.std, **crop_kw)
    return SwAVConfig(**kw), crops


def resolve_settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(training settings, other settings): defaults < config file < flags."""
    file_cfg = read_config_file(args.config)
    other_keys = {"data", "backbone", "weights", "embedding"}
    switch_fields = {f for f, _v, _h in _SPEED_SWITCHES.values()}
    unknown = set(file_cfg) - set(_TRAIN_FLAGS) - other_keys - {"augment", "flip"} - switch_fields
    if unknown:
        raise SelfmaskError(f"config file {args.config}: unknown keys {sorted(unknown)}")
    check_setting_types(file_cfg, f"config file {args.config}")
    train = {k: v for k, v in file_cfg.items() if k in _TRAIN_FLAGS or k in ("augment", "flip") or k in switch_fields}
    for name in _TRAIN_FLAGS:
        v = getattr(args, name)
        if v is not None:
            train[name] = v
    if args.no_augment:
        train["augment"] = False
    if args.no_flip:
        train["flip"] = False
    for flag, (field_name, value, _h) in _SPEED_SWITCHES.items():
        if getattr(args, flag, False):
            train[field_name] = value
    other = {
        "data": args.data if args.data != "embedded" or "data" not in file_cfg else file_cfg["data"],
        "backbone": args.backbone or file_cfg.get("backbone") or "resnet_tiny",
        "weights": args.weights or file_cfg.get("weights"),
        "embedding": args.embedding or file_cfg.get("embedding"),
    }
    return train, other


def _given(args: argparse.Namespace, name: str) -> bool:
    """Whether flag ``name`` was given (options default to None, switches to False; 0 is a value)."""
    value = getattr(args, name, None)
    return value is not None and value is not False


#: SwAV and multi-crop flags that shape training (``--online-knn-every`` only watches it).
_SWAV_TRAINING_FLAGS = ("prototypes", "queue_length", "queue_start_epoch", "freeze_prototypes_iters",
                        "freeze_backbone_iters", "small_crops", "small_crop_size",
                        "large_crop_scale", "small_crop_scale", "no_color", "no_blur")

#: Flags of the SwAV objective and its multi-crop views; refused for a supervised run.
_SWAV_FLAGS = (*_SWAV_TRAINING_FLAGS, "online_knn_every")

#: Flags that change what is trained; ``--resume`` takes all of them from RUN_DIR/config.json.
_RESUME_FIXED = (*_TRAIN_FLAGS, "config", "backbone", "weights", "embedding", *_SWAV_TRAINING_FLAGS)


def resume_settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], tuple[Any, Any] | None]:
    """``(training settings, other settings, (SwAVConfig, MultiCrop) or None)`` of the run in ``--resume``.

    Everything that shapes training comes from ``RUN_DIR/config.json`` as ``selfmask adapt``
    wrote it (``train``, ``backbone``, ``weights``, ``data_spec`` and, for SwAV, ``swav`` and
    ``crops``); giving such a flag as well is refused rather than silently ignored.
    """
    from selfmask.data.multicrop import MultiCrop, MultiCropConfig
    from selfmask.objectives import SwAVConfig
    from selfmask.training.config import TrainConfig
    from selfmask.training.identity import check_saved_run
    from selfmask.training.run_folder import read_run_config, run_embedding

    run_dir = args.resume
    if args.out is not None and Path(args.out).resolve() != Path(run_dir).resolve():
        raise SelfmaskError(f"--resume {str(run_dir)!r} continues the run in place; drop --out {str(args.out)!r}")
    given = [n for n in _RESUME_FIXED if _given(args, n)]
    given += ["data"] if args.data != "embedded" else []
    given += [f for f, on in (("no_augment", args.no_augment), ("no_flip", args.no_flip)) if on]
    if given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        raise SelfmaskError(f"--resume takes the run's settings from {run_dir}/config.json; drop {flags}")
    saved = read_run_config(run_dir)
    where = Path(run_dir) / "config.json"
    for key in ("train", "data_spec"):
        if key not in saved:
            raise SelfmaskError(f"{where}: key {key!r} is missing (was this run written by `selfmask adapt`?)")
    if not isinstance(saved["train"], dict):
        raise SelfmaskError(f"{where}: 'train' must be an object")
    check_saved_run(saved, where)  # wrong types: one clear line, not a traceback
    try:
        cfg = TrainConfig.from_dict(saved["train"])  # unknown keys and bad values: one clear error
    except (SelfmaskError, TypeError) as exc:
        raise SelfmaskError(f"{where}: invalid 'train' settings ({exc})") from None
    train = {k: v for k, v in cfg.to_dict().items() if k not in ("resolved_lr", "resolved_weight_decay")}
    other = {"data": saved["data_spec"], "backbone": saved["backbone"], "weights": saved.get("weights"),
             "embedding": run_embedding(saved)}
    swav_crops = None
    if train.get("objective") == "swav":
        for key in ("swav", "crops"):
            if not isinstance(saved.get(key), dict):
                raise SelfmaskError(f"{where}: key {key!r} is missing or not an object (a SwAV run records it)")
        crops_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in saved["crops"].items()}
        try:
            crops = MultiCrop(MultiCropConfig(**crops_cfg), seed=int(saved["seed"]))
        except TypeError as exc:
            raise SelfmaskError(f"{where}: invalid 'crops' settings ({exc})") from None
        swav_crops = (SwAVConfig.from_dict(saved["swav"]), crops)
    return train, other, swav_crops


def stopped_exit_code(stop: BaseException, run_dir: Path) -> int:
    """Report a clean SIGINT/SIGTERM stop and return the shell's code for it (128 + signal number)."""
    import signal
    import sys

    name = next((s.name for s in (signal.SIGTERM, signal.SIGINT) if s.name in str(stop)), "SIGINT")
    print(f"selfmask adapt: {stop}; the checkpoint is saved, continue with: selfmask adapt --resume {run_dir}",
          file=sys.stderr)
    return 128 + int(signal.Signals[name])


def run(args: argparse.Namespace) -> int:
    from selfmask.training.config import TrainConfig
    from selfmask.training.distributed import init_distributed, shutdown
    from selfmask.training.preflight import run_preflight
    from selfmask.training.trainer import resolve_device

    setup_logging()
    check_eval_args(args)
    if args.resume is not None:
        train_settings, other, swav_crops = resume_settings(args)
        out, resume = args.resume, True
    else:
        if args.out is None:
            raise SelfmaskError("--out RUN_DIR is required (or --resume RUN_DIR to continue a run)")
        train_settings, other = resolve_settings(args)
        out, resume, swav_crops = args.out, False, None
        objective = train_settings.get("objective", "supervised")
        if objective != "swav":
            ignored = [n for n in _SWAV_FLAGS if _given(args, n)]
            if ignored:
                flags = ", ".join("--" + n.replace("_", "-") for n in ignored)
                raise SelfmaskError(f"{flags} only apply to --objective swav (this run's objective: {objective!r})")
        else:
            check_swav_flags(args)
    # every problem (config, device, backbone, weights, data, run folder, disk) at once, before any work
    run_preflight(out=out, backbone=other["backbone"], weights=other["weights"], data=other["data"],
                  train_settings=train_settings, overwrite=args.overwrite and not resume, resume=resume)
    from selfmask.backbones import backbone_info

    backbone_info(other["backbone"], other["embedding"])  # an embedding the backbone does not offer: one line
    cfg = TrainConfig(**train_settings)
    resolve_device(cfg.device)
    ctx = init_distributed(cfg.device)  # torchrun: join the process group (CUDA checked first)
    try:
        return _run(args, cfg, other, ctx, out, resume, swav_crops)
    finally:
        shutdown(ctx)


def _run(
    args: argparse.Namespace, cfg: Any, other: dict[str, Any], ctx: Any, out: Path, resume: bool, swav_crops: Any
) -> int:
    import torch

    from selfmask.backbones import backbone_info, create_backbone
    from selfmask.data.sources import load_data
    from selfmask.experiments.evaluate import evaluate_features
    from selfmask.fingerprint import model_fingerprint
    from selfmask.training.distributed import barrier, broadcast_flag
    from selfmask.training.loop import StopRequested
    from selfmask.training.run_folder import RunFolder
    from selfmask.training.trainer import adapt, classify, count_trainable_bits

    if not ctx.is_main:  # one log: rank 0's
        logging.getLogger("selfmask").setLevel(logging.WARNING)
    info = backbone_info(other["backbone"], other["embedding"])
    run_folder = RunFolder(out, overwrite=args.overwrite and not resume)
    if ctx.is_main:  # rank 0 prepares the folder; the others learn whether it could
        try:
            run_folder.prepare()  # writable, not a finished run
        except SelfmaskError:
            broadcast_flag(False, ctx)
            raise
    if not broadcast_flag(True, ctx):
        raise SelfmaskError(f"rank 0 could not prepare the run folder {str(out)!r}; see its message")
    if not ctx.is_main:
        barrier(ctx)  # rank 0 reads (and caches) the data first
    train, test = load_data(other["data"], resolution=info.input_size, cache_dir=args.cache_dir)
    if ctx.is_main:
        barrier(ctx)
    if len(train) == 0 or len(test) == 0:
        raise SelfmaskError(f"data {other['data']!r}: empty split (train {len(train)}, test {len(test)} images)")
    torch.manual_seed(cfg.seed)
    backbone = create_backbone(info.name, other["weights"], info.embedding)
    meta = {"weights": other["weights"], "data_spec": other["data"], "base_fingerprint": model_fingerprint(backbone)}
    try:
        if cfg.objective == "swav":
            from selfmask.training.ssl import OnlineEval, adapt_swav

            swav, crops = swav_crops or swav_settings(args, info, cfg.seed)
            online = None
            if (args.online_knn_every or 0) > 0:
                held = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))
                cut = max(1, len(train) // 10)
                online = OnlineEval(train.subset(held[cut:]), train.subset(held[:cut]), every=args.online_knn_every)
            result = adapt_swav(backbone, info, train, cfg, swav, crops=crops, run=run_folder, run_meta=meta,
                                progress=not args.no_progress, online_eval=online, resume=resume)
        else:
            result = adapt(backbone, info, train, cfg, run=run_folder, progress=not args.no_progress, run_meta=meta,
                           resume=resume)
    except StopRequested as stop:
        return stopped_exit_code(stop, run_folder.path)
    except OSError as exc:  # e.g. the disk filled up: checkpoints are atomic, so the last one is intact
        where = exc.filename or run_folder.path
        raise SelfmaskError(
            f"writing {where} failed during training: {exc.strerror or exc}; the last complete checkpoint is kept. "
            f"Fix the cause (e.g. free disk space), then continue with: selfmask adapt --resume {run_folder.path}"
        ) from None
    if not ctx.is_main:
        return 0  # rank 0 evaluates and writes results.json
    results: dict[str, Any] = {"method": cfg.method, "label_fraction": cfg.label_fraction, "per_class": cfg.per_class,
                               "seed": cfg.seed, "backbone": info.name, "embedding": info.embedding,
                               "data": other["data"],
                               "final_train_loss": result.history[-1]["loss"], **count_trainable_bits(result)}
    if not args.no_eval:
        try:
            if result.head is not None:
                results["test_accuracy"] = classify(result.backbone, result.head, test, info, device=cfg.device)
            results.update(
                evaluate_features(
                    result.backbone, info, train, test, bank_indices=result.train_indices, knn_k=args.knn_k,
                    knn_temperature=args.knn_temperature, linear_probe=not args.no_probe, seed=cfg.seed,
                    device=cfg.device,
                )
            )
        except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: training is saved, --resume evaluates
            run_folder.set_status("interrupted", phase="evaluation", epoch=cfg.epochs, total_epochs=cfg.epochs)
            return stopped_exit_code(KeyboardInterrupt(f"{stop or 'stopped by SIGINT'} during the final evaluation"),
                                     run_folder.path)
    run_folder.write_json("results.json", results)
    run_folder.set_status("finished")
    print(f"run folder: {run_folder.path}")
    for key in ("test_accuracy", "knn_accuracy", "linear_probe_accuracy"):
        if key in results:
            print(f"  {key}: {results[key]:.4f}")
    return 0
