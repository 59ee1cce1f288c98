"""``selfmask pack RUN_DIR -o FILE``: store a training run's masks in a mask file."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pack",
        help="write the learned masks of a run folder to a compact mask file",
        description=(
            "Rebuild the masked model of RUN_DIR (config.json, scores.safetensors, optional head.safetensors) "
            "and write its masks, entropy-coded, with the base fingerprint and MaskConfig (see docs/storage.md)."
        ),
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="training run folder")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="mask file to write")
    p.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    p.add_argument(
        "--portable",
        action="store_true",
        help="do not code masks given the base weights (larger, but `selfmask inspect`/load_mask decode it alone)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from selfmask.storage import load_run, save_mask
    from selfmask.storage.codecs import NEEDS_BASE
    from selfmask.storage.container import check_output_path
    from selfmask.training.run_folder import RUN_FILES

    inputs = [Path(args.run_dir) / name for name in RUN_FILES]
    check_output_path(args.output, overwrite=args.overwrite, inputs=inputs)  # refuse before any work
    rebuilt = load_run(args.run_dir)
    infos = save_mask(
        rebuilt.model,
        args.output,
        backbone=rebuilt.backbone,
        extra=rebuilt.extra,
        overwrite=args.overwrite,
        source=rebuilt.source,
        portable=args.portable,
        base_fingerprint=rebuilt.base_fingerprint,
        inputs=inputs,
    )
    numel = sum(i.numel for i in infos)
    payload = sum(i.payload_bytes for i in infos)
    conditioned = sum(i.codec in NEEDS_BASE for i in infos)
    print(
        f"wrote {args.output}: {len(infos)} masked tensors, {numel:,} weights, "
        f"{payload:,} payload bytes ({8 * payload / max(numel, 1):.3f} bits/weight)"
        + (f"; {conditioned} coded given the base weights (decoding needs them)" if conditioned else "")
    )
    return 0
