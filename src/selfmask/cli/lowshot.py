"""``selfmask lowshot``: the label-efficient sweep (fractions x seeds x methods), mean and std."""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

from selfmask.cli.common import add_backbone_args, add_data_args, setup_logging
from selfmask.errors import SelfmaskError


def register(sub: argparse._SubParsersAction) -> None:
    from selfmask.experiments.lowshot import METHOD_LABELS

    p = sub.add_parser(
        "lowshot",
        help="low-shot sweep: SMN + linear probe vs linear probe, FFT and supervised masking over label fractions",
        description="Each (method, fraction, seed) trains and/or evaluates on a seeded labelled subset; the SMN "
        "(a `selfmask adapt --objective swav` run folder) is trained once without labels. Methods: "
        + ", ".join(f"{k} ({v})" for k, v in METHOD_LABELS.items()),
    )
    add_data_args(p)
    add_backbone_args(p)
    p.add_argument("--smn", type=Path, default=None, help="run folder of a self-masking network (SwAV masks)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.04, 0.1])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=["lp", "smn-lp", "fft", "mask", "semi"])
    p.add_argument("--steps-full", type=int, default=600, help="optimisation steps of a trained method at 100 %% labels")
    p.add_argument("--min-steps", type=int, default=120, help="at least this many steps at low fractions")
    p.add_argument("--knn-k", type=int, default=200)
    p.add_argument("--knn-temperature", type=float, default=0.1)
    p.add_argument("--no-flip", action="store_true", help="no horizontal flips (glyphs: a mirrored b is a d)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from selfmask.backbones import backbone_info
    from selfmask.data.sources import load_data
    from selfmask.experiments.lowshot import METHOD_LABELS, NEEDS_SMN, LowShotContext, lowshot_row, summarize
    from selfmask.reports import markdown_table, plot_lowshot
    from selfmask.training.run_folder import RunFolder, read_run_config
    from selfmask.training.trainer import resolve_device

    setup_logging()
    resolve_device(args.device)
    for m in args.methods:
        if m not in METHOD_LABELS:
            raise SelfmaskError(f"unknown method {m!r}; expected some of {sorted(METHOD_LABELS)}")
    for f in args.fractions:
        if not (0.0 < f <= 1.0):
            raise SelfmaskError(f"label fraction must be in (0, 1], got {f}")
    smn_cfg = None
    if any(m in NEEDS_SMN for m in args.methods):
        if args.smn is None:
            raise SelfmaskError(f"methods {[m for m in args.methods if m in NEEDS_SMN]} need --smn RUN_DIR")
        smn_cfg = read_run_config(args.smn)
        name = args.backbone or smn_cfg.backbone
        weights = args.weights or smn_cfg.weights
        if name != smn_cfg.backbone:
            raise SelfmaskError(f"--backbone {name!r} differs from the SMN's backbone {smn_cfg.backbone!r}")
    else:
        name, weights = args.backbone or "resnet_tiny", args.weights
    info = backbone_info(name, smn_cfg.embedding if smn_cfg is not None else None)  # the SMN's embedding
    out = RunFolder(args.out, overwrite=args.overwrite).prepare()
    out.set_status("running")
    train, test = load_data(args.data, resolution=info.input_size, cache_dir=args.cache_dir)
    ctx = LowShotContext(
        info=info, weights=weights, train=train, test=test, out_dir=args.out, device=args.device, smn_dir=args.smn,
        steps_full=args.steps_full, min_steps=args.min_steps, knn_k=args.knn_k, knn_temperature=args.knn_temperature,
        progress=not args.no_progress, flip=not args.no_flip,
    )
    rows = [lowshot_row(ctx, m, f, s) for f in args.fractions for s in args.seeds for m in args.methods]
    summary = summarize(rows)
    plot = plot_lowshot(rows, args.out / "lowshot.png")
    out.write_json("results.json", {
        "data": args.data, "backbone": name, "embedding": info.embedding, "weights": weights,
        "smn": str(args.smn) if args.smn else None,
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "rows": rows, "summary": summary, "plot": str(plot),
    })
    table = markdown_table(
        [{**r, "mean_std": f"{r['mean']:.3f} ± {r['std']:.3f}"} for r in summary],
        [("method", "method"), ("label_fraction", "labels"), ("mean_std", "test acc (mean ± std)"), ("seeds", "seeds")],
    )
    (args.out / "results.md").write_text(f"# Low-shot sweep\n\n{table}\n\n![low-shot]({plot.name})\n")
    out.set_status("finished")
    print(table)
    print(f"\nresults: {args.out / 'results.json'}; plot: {plot}")
    return 0
