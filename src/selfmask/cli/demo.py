"""``selfmask demo``: the paper's methods end to end on the embedded benchmark."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run every method on the embedded benchmark (pretrain once, then adapt and evaluate)",
        description="Pretrain (or reuse) the small backbone, then k-NN, linear probe, FFT, supervised and top-k "
        "masking at several label fractions; writes results.json, results.md and plots.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="reduced version for tests (< 2 minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-dir", type=Path, default=None, help="benchmark/checkpoint cache (default ~/.cache/selfmask)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished demo in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from selfmask.experiments.demo import DemoConfig, print_table, run_demo

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = DemoConfig(
        out=args.out, quick=args.quick, seed=args.seed, device=args.device, cache_dir=args.cache_dir,
        overwrite=args.overwrite, progress=not args.no_progress,
    )
    results = run_demo(cfg)
    print()
    print_table(results)
    print(f"\nfinished in {results['seconds'] / 60:.1f} min; report: {cfg.out / 'results.md'} "
          f"(plots: {', '.join(results['plots'].values())})")
    return 0
