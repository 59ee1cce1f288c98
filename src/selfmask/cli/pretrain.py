"""``selfmask pretrain``: pretrain a small backbone on the embedded benchmark's pretraining domain."""

from __future__ import annotations

import argparse
from pathlib import Path

from selfmask.cli.common import add_data_args, setup_logging


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pretrain a backbone (supervised) and save it as a checkpoint users load with --weights",
        description="Trains the backbone with a temporary linear head and saves the backbone as .safetensors.",
    )
    add_data_args(p, default="embedded-pretrain")
    p.add_argument("--backbone", default="resnet_tiny")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--objective", default="supervised", help="supervised | swav | dino (swav and dino: self-supervised, no labels)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: supervised 0.1, swav 0.3)")
    p.add_argument("--prototypes", type=int, default=100, help="SwAV prototypes (default 100 for the small data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write (.safetensors)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from selfmask.experiments.pretrain import run_pretrain

    setup_logging()
    history = run_pretrain(data=args.data, backbone=args.backbone, objective=args.objective, epochs=args.epochs,
                           out=args.out, lr=args.lr, prototypes=args.prototypes, seed=args.seed, device=args.device,
                           overwrite=args.overwrite, cache_dir=args.cache_dir, progress=not args.no_progress)
    print(f"saved {args.backbone} to {args.out} (final loss {history[-1]['loss']:.3f})")
    return 0
