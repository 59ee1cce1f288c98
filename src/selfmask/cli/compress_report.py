"""``selfmask compress-report FILE [--finetuned WEIGHTS] [--json]``: the paper's Table 2 for one mask."""

from __future__ import annotations

import argparse
import json

from selfmask.cli.common import add_base_args, load_mask_for_report, print_bounds


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compress-report",
        help="compare the mask file with gzip/bz2/lzma/lz4/snappy/zstd on packed and byte-per-mask data",
        description=(
            "The paper's Table 2 for this mask: off-the-shelf compressors on the packed masks (1 bit/weight), "
            "on byte-per-mask data, and on fine-tuned fp32 weights (--finetuned), against the mask file, and the "
            "file beside the per-tensor, per-channel and weight-conditioned bounds. Files coded given the base "
            "weights need --backbone (and --weights or --seed) to decode their masks."
        ),
    )
    p.add_argument("file", metavar="FILE", help="mask file")
    add_base_args(p, required=False)
    p.add_argument("--finetuned", default=None, metavar="WEIGHTS", help="fine-tuned weights to compress as well")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from selfmask.backbones import load_state_dict_file
    from selfmask.errors import SelfmaskError
    from selfmask.storage.report import compress_report

    mask, base = load_mask_for_report(args)
    if mask.needs_base:
        raise SelfmaskError(
            f"{args.file}: the masks are coded given the base weights: pass --backbone (and --weights or --seed) "
            "to decode them"
        )
    finetuned = load_state_dict_file(args.finetuned) if args.finetuned else None
    report = compress_report(mask, finetuned, base)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    cols = report["columns"]
    print(
        f"{args.file}: {report['masked_weights']:,} masked weights of {report['backbone']}, "
        f"{report['fraction_active']:.2%} active; fp32 weights {report['fp32_bytes']:,} B"
    )
    header = f"{'compressor':<12}" + "".join(f"  {c + ' (B, % red., x<fp32)':>42}" for c in cols)
    print(header)
    for name in next(iter(cols.values()))["compressors"]:
        cells = []
        for c in cols.values():
            r = c["compressors"][name]
            cells.append(f"  {r['bytes']:>16,} {r['reduction_percent']:>9.2f}% {r['x_smaller_than_fp32']:>13.1f}x")
        print(f"{name:<12}" + "".join(cells))
    ours = report["ours"]
    print(
        f"{'selfmask':<12}  {ours['mask_bytes']:>16,} B of masks ({ours['reduction_percent_vs_byte_per_mask']:.2f}% smaller "
        f"than byte-per-mask, {ours['x_smaller_than_fp32']:.1f}x smaller than fp32); "
        f"entropy bound {report['entropy_bound_bytes']:,.0f} B"
    )
    summary = report["summary"]
    print_bounds(summary, max([len(t["name"]) for t in summary["tensors"]] + [6]))
    return 0
