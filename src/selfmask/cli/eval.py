"""``selfmask eval``: weighted k-NN and linear probe of a backbone or of a run's adapted backbone."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from selfmask.cli.common import add_backbone_args, add_data_args, add_embedding_arg, add_eval_args, check_eval_args
from selfmask.errors import SelfmaskError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="k-NN and linear-probe accuracy of a backbone (or of a run folder's adapted backbone)",
        description="Embeds the un-augmented train and test splits and reports weighted k-NN (k and T recorded) "
        "and a linear probe. With --label-fraction the bank / probe use a seeded labelled subset.",
    )
    add_data_args(p)
    add_backbone_args(p)
    add_embedding_arg(p)
    p.add_argument("--run", type=Path, default=None, help="evaluate the adapted backbone of this run folder")
    p.add_argument("--label-fraction", type=float, default=None, help="fraction of training labels, in (0, 1]")
    p.add_argument("--per-class", type=int, default=None, help="labelled images per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--output", type=Path, default=None, help="also write the results to this JSON file")
    add_eval_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from selfmask.experiments.evaluate import evaluate_model
    from selfmask.io import atomic_write_json

    check_eval_args(args)
    if args.run is not None and (args.backbone or args.weights or args.embedding):
        raise SelfmaskError("give either --run or --backbone/--weights/--embedding, not both")
    res = evaluate_model(args.data, run=args.run, backbone=args.backbone or "resnet_tiny", weights=args.weights,
                         embedding=args.embedding, label_fraction=args.label_fraction, per_class=args.per_class,
                         knn_k=args.knn_k, knn_temperature=args.knn_temperature, linear_probe=not args.no_probe,
                         seed=args.seed, device=args.device, cache_dir=args.cache_dir)
    if args.output is not None:
        atomic_write_json(args.output, res)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"k-NN (k={args.knn_k}, T={args.knn_temperature}): {res['knn_accuracy']:.4f}")
        if "linear_probe_accuracy" in res:
            print(f"linear probe: {res['linear_probe_accuracy']:.4f}")
    return 0
