"""``selfmask pretrain``: pretrain a small backbone on the embedded benchmark's pretraining domain."""

from __future__ import annotations

import argparse
from pathlib import Path

from selfmask.cli.common import add_data_args, setup_logging
from selfmask.errors import SelfmaskError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pretrain a backbone (supervised) and save it as a checkpoint users load with --weights",
        description="Trains the backbone with a temporary linear head and saves the backbone as .safetensors.",
    )
    add_data_args(p, default="embedded-pretrain")
    p.add_argument("--backbone", default="resnet_tiny")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--objective", default="supervised", help="supervised | swav (self-supervised, no labels)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: supervised 0.1, swav 0.3)")
    p.add_argument("--prototypes", type=int, default=100, help="SwAV prototypes (default 100 for the small data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write (.safetensors)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from selfmask.backbones import backbone_info
    from selfmask.data.sources import load_data
    from selfmask.storage.container import check_output_path
    from selfmask.training.pretrain import pretrain_supervised, save_backbone
    from selfmask.training.trainer import resolve_device

    setup_logging()
    backbone_info(args.backbone)
    resolve_device(args.device)
    if args.epochs < 1:
        raise SelfmaskError(f"--epochs must be >= 1, got {args.epochs}")
    if args.out.suffix != ".safetensors":
        raise SelfmaskError(f"--out {str(args.out)!r}: expected a .safetensors file name")
    check_output_path(args.out, overwrite=args.overwrite)  # not a device, a folder or (without --overwrite) a file
    if args.objective not in ("supervised", "swav"):
        raise SelfmaskError(f"--objective must be supervised or swav, got {args.objective!r}")
    train, _test = load_data(args.data, resolution=backbone_info(args.backbone).input_size, cache_dir=args.cache_dir)
    if args.objective == "swav":
        model, history = pretrain_swav(train, args)
    else:
        kw = {"lr": args.lr} if args.lr is not None else {}
        model, history = pretrain_supervised(
            train, backbone=args.backbone, epochs=args.epochs, seed=args.seed, device=args.device,
            progress=not args.no_progress, **kw,
        )
    save_backbone(model, args.out)
    print(f"saved {args.backbone} to {args.out} (final loss {history[-1]['loss']:.3f})")
    return 0


def pretrain_swav(train, args: argparse.Namespace):  # noqa: ANN001, ANN201
    """SwAV pretraining of every weight from a random initialisation (like the paper's ResNet-50 SwAV)."""
    import torch

    from selfmask.backbones import backbone_info, build_backbone
    from selfmask.objectives import SwAVConfig
    from selfmask.training.config import TrainConfig
    from selfmask.training.ssl import adapt_swav

    info = backbone_info(args.backbone)
    torch.manual_seed(args.seed)
    model = build_backbone(args.backbone)
    steps = max(1, len(train) // 64) * args.epochs
    swav = SwAVConfig(
        num_prototypes=args.prototypes, projection_hidden_dim=2 * info.embed_dim,
        queue_length=min(512, len(train) // 2), queue_start_epoch=max(1, args.epochs // 5),
        freeze_prototypes_iters=max(1, steps // 20),
    )
    cfg = TrainConfig(method="fft", objective="swav", epochs=args.epochs, lr=args.lr or 0.3, weight_decay=1e-6,
                      warmup_epochs=min(1.0, args.epochs / 10), seed=args.seed, device=args.device)
    result = adapt_swav(model, info, train, cfg, swav, progress=not args.no_progress)
    return result.backbone, result.history
