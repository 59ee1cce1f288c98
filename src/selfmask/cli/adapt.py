"""``selfmask adapt``: train masks (or a baseline) on a dataset and evaluate them.

This module parses and prints; :func:`selfmask.experiments.adapt.run_adapt` does the work.
The training, mask, objective and crop options are generated from their dataclasses
(:mod:`selfmask.cli.flags`).
"""

from __future__ import annotations

import argparse
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
from selfmask.cli.flags import add_setting_flags, by_dest, check_settings, flag_names, given_settings, grouped
from selfmask.errors import SelfmaskError

#: Config-file keys besides the settings' own: what to adapt and on which data.
OTHER_KEYS = ("data", "backbone", "weights", "embedding")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "adapt",
        help="adapt a backbone: supervised masking, top-k masks, full fine-tuning or a linear head",
        description="Train and evaluate one adaptation. Settings come from flags, or from a JSON --config file "
        "(keys as the flags with underscores and without no-, e.g. \"augment\": false, plus "
        "data/backbone/weights/embedding); flags win.",
    )
    add_data_args(p)
    add_backbone_args(p)
    add_embedding_arg(p)
    p.add_argument("--out", type=Path, default=None, help="run folder to write (required unless --resume)")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="continue an interrupted run from RUN_DIR/checkpoint.pt with the settings in RUN_DIR/config.json")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    p.add_argument("--config", type=Path, default=None, help="JSON file of settings")
    add_setting_flags(p)
    g = p.add_argument_group("crop shortcuts and monitoring (self-supervised objectives)")
    g.add_argument("--no-color", action="store_true", help="no colour jitter and no grayscale in the crops")
    g.add_argument("--no-blur", action="store_true", help="no Gaussian blur in the crops")
    g.add_argument("--online-knn-every", type=int, default=None, help="k-NN on a held-out tenth of the training set "
                   "every N epochs, to watch progress (0 = off)")
    p.add_argument("--no-eval", action="store_true", help="train only")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_eval_args(p)
    p.set_defaults(func=run)


#: Options outside the generated ones that apply to self-supervised objectives only.
_SSL_SWITCHES = ("no_color", "no_blur", "online_knn_every")


def _given(args: argparse.Namespace, name: str) -> bool:
    """Whether option ``name`` was given (options default to None, switches to False; 0 is a value)."""
    value = getattr(args, name, None)
    return value is not None and value is not False


def resolve_settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(settings by option name, other settings): defaults < config file < flags."""
    file_cfg = read_config_file(args.config)
    known = by_dest()
    unknown = sorted(set(file_cfg) - set(known) - set(OTHER_KEYS))
    if unknown:
        raise SelfmaskError(f"config file {args.config}: unknown key {unknown[0]!r}"
                            f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}; "
                            "keys are the options' names with underscores (see selfmask adapt --help)")
    check_setting_types(file_cfg, f"config file {args.config}")
    settings = check_settings({k: v for k, v in file_cfg.items() if k in known}, f"config file {args.config}")
    settings.update(given_settings(args))
    other = {
        "data": args.data if args.data != "embedded" or "data" not in file_cfg else file_cfg["data"],
        "backbone": args.backbone or file_cfg.get("backbone") or "resnet_tiny",
        "weights": args.weights or file_cfg.get("weights"),
        "embedding": args.embedding or file_cfg.get("embedding"),
    }
    return settings, other


def _new_job(args: argparse.Namespace, options: dict[str, Any]) -> Any:
    """The job of a new run from the flags and ``--config``; settings of another objective are refused."""
    from selfmask.experiments.adapt import AdaptJob, check_objective_settings
    from selfmask.training.config import objective_configs

    if args.out is None:
        raise SelfmaskError("--out RUN_DIR is required (or --resume RUN_DIR to continue a run)")
    settings, other = resolve_settings(args)
    objective = settings.get("objective", "supervised")
    check_objective_settings(objective, None, None)  # an objective that does not exist: one line, before the rest
    self_supervised = objective_configs()[objective] is not None
    foreign = [d for d in settings if not by_dest()[d].applies_to(objective)]
    foreign += [] if self_supervised else [n for n in _SSL_SWITCHES if _given(args, n)]
    if foreign:
        option = by_dest().get(foreign[0])
        owner = ("a self-supervised objective" if option is None or option.group == "crops" else
                 f"--objective {' or '.join(option.objectives) if option.objectives else option.group}")
        raise SelfmaskError(f"{flag_names(foreign)} only apply to {owner} (this run's objective: {objective!r})")
    groups = grouped(settings, objective)
    train = groups.get("train", {})
    if "mask" in groups:
        train["mask"] = groups["mask"]
    crops = groups.get("crops", {})
    if args.no_color:
        crops.update(jitter_p=0.0, grayscale_p=0.0)
    if args.no_blur:
        crops["blur_p"] = 0.0
    objective_config = groups.get(objective)
    check_objective_settings(objective, objective_config or {}, crops)
    return AdaptJob(train=train, data=other["data"], out=args.out, backbone=other["backbone"],
                    weights=other["weights"], embedding=other["embedding"], objective_config=objective_config,
                    crops=crops, overwrite=args.overwrite, **options)


def _resume_job(args: argparse.Namespace, options: dict[str, Any]) -> Any:
    """The job of ``--resume RUN_DIR``; a flag that would change what is trained is refused, not ignored."""
    from selfmask.experiments.adapt import resume_job

    run_dir = args.resume
    if args.out is not None and Path(args.out).resolve() != Path(run_dir).resolve():
        raise SelfmaskError(f"--resume {str(run_dir)!r} continues the run in place; drop --out {str(args.out)!r}")
    fixed = [*given_settings(args), *[n for n in ("config", "backbone", "weights", "embedding", "no_color", "no_blur")
                                      if _given(args, n)]]
    fixed += ["data"] if args.data != "embedded" else []
    if fixed:
        raise SelfmaskError(f"--resume takes the run's settings from {run_dir}/config.json; drop {flag_names(fixed)}")
    return resume_job(run_dir, **options)


def stopped_exit_code(stop: BaseException, run_dir: Path) -> int:
    """Report a clean SIGINT/SIGTERM stop and return the shell's code for it (128 + signal number)."""
    import signal
    import sys

    name = next((s.name for s in (signal.SIGTERM, signal.SIGINT) if s.name in str(stop)), "SIGINT")
    print(f"selfmask adapt: {stop}; the checkpoint is saved, continue with: selfmask adapt --resume {run_dir}",
          file=sys.stderr)
    return 128 + int(signal.Signals[name])


def run(args: argparse.Namespace) -> int:
    from selfmask.experiments.adapt import run_adapt

    setup_logging()
    check_eval_args(args)
    options = {"cache_dir": args.cache_dir, "progress": not args.no_progress, "evaluate": not args.no_eval,
               "knn_k": args.knn_k, "knn_temperature": args.knn_temperature, "linear_probe": not args.no_probe,
               "online_knn_every": args.online_knn_every or 0}
    job = _resume_job(args, options) if args.resume is not None else _new_job(args, options)
    outcome = run_adapt(job)
    if outcome.stopped is not None:
        return stopped_exit_code(outcome.stopped, outcome.run_dir)
    if outcome.results is None:
        return 0  # a process other than rank 0
    print(f"run folder: {outcome.run_dir}")
    for key in ("test_accuracy", "knn_accuracy", "linear_probe_accuracy"):
        if key in outcome.results:
            print(f"  {key}: {outcome.results[key]:.4f}")
    return 0
