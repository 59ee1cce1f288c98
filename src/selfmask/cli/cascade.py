"""``selfmask cascade DISPATCHER_RUN --out DIR``: experts for parts of the data, fused embeddings."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from selfmask.cli.common import add_eval_args

    p = sub.add_parser(
        "cascade",
        help="build a model cascade (router + expert SMNs + fused embeddings) from a self-supervised SMN run",
        description=(
            "From a trained SMN run folder (the dispatcher, e.g. `selfmask adapt --objective swav --out RUN`): "
            "embed its training set, route it into groups, train one expert SMN per group from the dispatcher "
            "with the same number of steps, fit the fusion PCA, save the cascade folder and evaluate it "
            "(k-NN and linear probe of the single SMN, conditional and unconditional fusion). See docs/cascade.md."
        ),
    )
    p.add_argument("dispatcher", metavar="DISPATCHER_RUN", type=Path, help="run folder of the dispatcher SMN")
    p.add_argument("--out", type=Path, required=True, help="cascade folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace a cascade in --out")
    p.add_argument("--data", default=None, help="dataset spec (default: the dispatcher's)")
    p.add_argument("--cache-dir", type=Path, default=None, help="dataset cache (default ~/.cache/selfmask)")
    p.add_argument("--experts", type=int, default=5, help="number of groups / experts (default 5)")
    p.add_argument("--router", default="gmm", help="gmm | kmeans (default gmm, as the authors' code)")
    p.add_argument("--router-dim", type=int, default=20, help="whitened PCA dimension the router clusters (default 20)")
    p.add_argument("--min-group-size", type=int, default=16, help="smaller clusters are merged away (default 16)")
    p.add_argument("--fusion-dim", type=int, default=None, help="fused embedding size (default: the backbone's)")
    p.add_argument("--seed", type=int, default=0, help="seed of clustering and expert training (default 0)")
    p.add_argument("--time-images", type=int, default=256, help="images for the inference timing (0: skip)")
    p.add_argument("--no-eval", action="store_true", help="build only")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_eval_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from selfmask.cascade import CascadeConfig
    from selfmask.cli.common import check_eval_args, setup_logging
    from selfmask.experiments.cascade import run_cascade

    setup_logging()
    check_eval_args(args)
    cfg = CascadeConfig(num_experts=args.experts, router=args.router, router_dim=args.router_dim,
                        min_group_size=args.min_group_size, fusion_dim=args.fusion_dim, seed=args.seed)
    cascade, results = run_cascade(args.dispatcher, args.out, cfg, data=args.data, cache_dir=args.cache_dir,
                                   overwrite=args.overwrite, progress=not args.no_progress, evaluate=not args.no_eval,
                                   knn_k=args.knn_k, knn_temperature=args.knn_temperature,
                                   linear_probe=not args.no_probe, time_images=args.time_images)
    report = results["build"]
    print(f"cascade folder: {args.out} ({cascade.num_experts} experts, groups {report['group_sizes']})")
    for note in report["router_notes"]:
        print(f"  router: {note}")
    for name, row in results.get("evaluation", {}).items():
        lp = f", linear probe {row['linear_probe_accuracy']:.4f}" if "linear_probe_accuracy" in row else ""
        print(f"  {name}: k-NN {row['knn_accuracy']:.4f}{lp}")
    if "inference" in results:
        inf = results["inference"]
        for name in ("single_smn", "conditional", "unconditional"):
            print(f"  {name}: {inf[name]['forward_passes']} forward passes, {inf[name]['ms_per_image']:.3f} ms/image")
    return 0
