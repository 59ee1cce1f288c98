"""``selfmask reproduce EXPERIMENT``: the paper's recipe on your data and weights, our number beside the paper's.

Each step of the plan (:mod:`selfmask.experiments.reproduce`) is an ordinary ``selfmask``
command writing into ``OUT/<step>``; ``adapt`` steps are run folders, so running the same
command again after a crash skips finished steps, resumes a step with a checkpoint
(``adapt --resume``) and redoes the rest.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from selfmask.cli.common import setup_logging
from selfmask.errors import SelfmaskError


def register(sub: argparse._SubParsersAction) -> None:
    from selfmask.experiments.reproduce import EXPERIMENTS

    p = sub.add_parser(
        "reproduce",
        help="run one of the paper's experiments with its recipe and report our numbers beside the paper's",
        description="Experiments (paper backbones with a recipe): "
        + "; ".join(f"{k} ({', '.join(v)})" for k, v in EXPERIMENTS.items())
        + ". The real runs need a GPU, the pretrained weights and the dataset; --epochs/--budget scale them down. "
        "Run the same command again to continue after a crash.",
    )
    p.add_argument("experiment", metavar="EXPERIMENT", help=", ".join(EXPERIMENTS))
    p.add_argument("--data", required=True, help="dataset specification (see `selfmask adapt --help`)")
    p.add_argument("--dataset", default=None, help="the paper's dataset this data is (cifar10, dtd, sun397, ...); "
                   "cifar10:/cifar100: data name it themselves")
    p.add_argument("--backbone", required=True, help="paper backbone (resnet18, resnet50, vit_b_32_clip)")
    p.add_argument("--weights", default=None, help="local checkpoint of the backbone")
    p.add_argument("--out", type=Path, required=True, help="folder of the steps and the report")
    p.add_argument("--device", default="cpu", help="cpu | cuda[:N]")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--epochs", type=int, default=None, help="epochs of every training step (scaled-down run)")
    scale.add_argument("--budget", type=float, default=None, help="fraction of the recipe's epochs, in (0, 1]")
    p.add_argument("--scale-down", default=None, metavar="PAPER_BACKBONE",
                   help="run PAPER_BACKBONE's recipe on a small stand-in --backbone (e.g. resnet_tiny); the report says so")
    p.add_argument("--cache-dir", type=Path, default=None, help="dataset cache (default ~/.cache/selfmask)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="training steps between checkpoints (0: each epoch)")
    p.add_argument("--overwrite", action="store_true", help="redo a finished reproduction in --out")
    p.add_argument("--progress", action="store_true", help="progress bars")
    p.set_defaults(func=run)


def _step_argv(step: Any, out: Path, cache_dir: Path | None) -> tuple[list[str] | None, str]:
    """The command that brings ``step`` to done, or ``None`` when it is done; and what is done to it."""
    folder = out / step.name
    if step.kind == "file":
        return (None, "done") if (folder / "results.json").is_file() else (list(step.argv), "run")
    status = _status(folder)
    if status == "finished" and (folder / "results.json").is_file():
        return None, "done"
    if status in ("running", "interrupted", "failed") and (folder / "checkpoint.pt").is_file():
        resume = ["adapt", "--resume", str(folder), "--no-progress"]
        return resume + (["--cache-dir", str(cache_dir)] if cache_dir else []), "resume"
    argv = list(step.argv)
    return (argv + ["--overwrite"] if folder.exists() else argv), "run"


def _status(folder: Path) -> str | None:
    try:
        return json.loads((folder / "status.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def _check_out(out: Path, settings: dict[str, Any], overwrite: bool, step_names: list[str]) -> None:
    """``OUT`` holds nothing, or this very reproduction (to continue), or a finished one to redo with --overwrite."""
    from selfmask.io import read_json_object

    record = out / "reproduce.json"
    if out.exists() and not out.is_dir():
        raise SelfmaskError(f"--out {str(out)!r} exists and is not a folder")
    if not record.is_file():
        if out.is_dir() and any(out.iterdir()):
            raise SelfmaskError(f"--out {str(out)!r} is not empty and holds no reproduction; choose an empty folder")
        return
    saved = read_json_object(record, str(record))
    same = {k: v for k, v in saved.items() if k not in ("device", "status")} == {
        k: v for k, v in settings.items() if k != "device"
    }
    if not same and not overwrite:
        raise SelfmaskError(
            f"{record} records another reproduction ({saved.get('experiment')}, {saved.get('backbone')}, "
            f"{saved.get('data')}); choose another --out or pass --overwrite"
        )
    if saved.get("status") == "finished" and same and not overwrite:
        raise SelfmaskError(f"{out} holds a finished reproduction (report.md); pass --overwrite to redo it")
    if overwrite:
        for name in [*step_names, "report.json", "report.md", "reproduce.json"]:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def run(args: argparse.Namespace) -> int:
    from selfmask.backbones import backbone_info
    from selfmask.cli import main
    from selfmask.data.sources import load_data
    from selfmask.experiments.reproduce import (
        check_classes,
        make_plan,
        report_markdown,
        report_rows,
        smn_percent_active,
    )
    from selfmask.io import atomic_write_json, atomic_write_text
    from selfmask.training.trainer import resolve_device

    setup_logging()
    out: Path = args.out
    request = dict(
        data=args.data, backbone=args.backbone, weights=args.weights, out=out, dataset=args.dataset,
        scale_down=args.scale_down, epochs=args.epochs, budget=args.budget, device=args.device,
        cache_dir=args.cache_dir, checkpoint_every=args.checkpoint_every, progress=args.progress,
    )
    plan = make_plan(args.experiment, **request)  # a bad request: one line, before the data are read
    resolve_device(args.device)
    info = backbone_info(args.backbone)
    if args.weights is not None and not Path(args.weights).is_file():
        raise SelfmaskError(f"--weights {args.weights!r} does not exist")
    train, _test = load_data(args.data, resolution=info.input_size, cache_dir=args.cache_dir)
    check_classes(plan.dataset, train.num_classes, args.data)  # before any training
    plan = make_plan(args.experiment, **request, train_images=len(train))
    _check_out(out, plan.settings, args.overwrite, [s.name for s in plan.steps])

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "reproduce.json", {**plan.settings, "status": "running"})
    for step in plan.steps:
        argv, action = _step_argv(step, out, args.cache_dir)
        if argv is None:
            print(f"reproduce: step {step.name}: done")
            continue
        print(f"reproduce: step {step.name}: {'resuming' if action == 'resume' else 'running'}: selfmask {' '.join(argv)}")
        (out / step.name).mkdir(parents=True, exist_ok=True)
        code = main(argv)
        if code != 0:
            print(f"reproduce: step {step.name} stopped (exit {code}); run the same command again to continue")
            return code
    results = {s.name: json.loads((out / s.name / "results.json").read_text()) for s in plan.steps}
    active = smn_percent_active(out / "smn") if plan.experiment == "smn" else None
    rows = report_rows(plan, results, percent_active=active)
    atomic_write_json(out / "report.json", {"settings": plan.settings, "rows": rows})
    text = report_markdown(plan, rows)
    atomic_write_text(out / "report.md", text)
    atomic_write_json(out / "reproduce.json", {**plan.settings, "status": "finished"})
    print(text, end="")
    print(f"report: {out / 'report.md'}")
    return 0
