"""``selfmask inspect FILE [--backbone NAME [--weights BASE]] [--json]``: what a mask file holds and how small it is."""

from __future__ import annotations

import argparse
import json

from selfmask.cli.common import add_base_args, load_mask_for_report, print_bounds


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="per-tensor and total bits per weight, bounds, ratios to fp32/fp16, fingerprint of a mask file",
        description=(
            "Verify a mask file (checksum, sizes) and print its contents, with the per-tensor, per-channel and "
            "weight-conditioned bounds beside its size. With --backbone (and --weights) the masks are decoded on "
            "that base (checked by fingerprint): files coded given the base weights need it for their masks."
        ),
    )
    p.add_argument("file", metavar="FILE", help="mask file")
    add_base_args(p, required=False)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    mask, base = load_mask_for_report(args)
    summary = mask.summary(base)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{args.file}: {summary['format']} v{summary['version']}, backbone {summary['backbone']}")
    print(f"fingerprint: {summary['fingerprint']}")
    print(f"mask config: {json.dumps(summary['mask_config'])}")
    rows = summary["tensors"]
    width = max([len(t["name"]) for t in rows] + [6])
    print(f"{'tensor':<{width}}  {'weights':>10}  {'active':>8}  {'codec':>10}  {'bytes':>9}  {'bits/w':>6}  {'H bits/w':>8}")
    for t in rows:
        hb = t["entropy_bits"] / t["numel"] if t["numel"] else 0.0
        print(
            f"{t['name']:<{width}}  {t['numel']:>10,}  {t['fraction_active']:>8.2%}  {t['codec']:>10}  "
            f"{t['payload_bytes']:>9,}  {t['bits_per_weight']:>6.3f}  {hb:>8.3f}"
        )
    print(
        f"{'total':<{width}}  {summary['masked_weights']:>10,}  {summary['fraction_active']:>8.2%}  {'':>10}  "
        f"{summary['payload_bytes']:>9,}  {summary['payload_bits_per_weight']:>6.3f}  "
        f"{summary['entropy_bits_per_weight']:>8.3f}"
    )
    print(
        f"file: {summary['file_bytes']:,} bytes; masks: {summary['mask_bytes']:,} bytes (header "
        f"{summary['header_bytes']:,} B) = {summary['bits_per_weight']:.3f} bits per masked weight, "
        f"{summary['ratio_to_fp32']:.1f}x smaller than fp32 weights, {summary['ratio_to_fp16']:.1f}x than fp16; "
        f"entropy bound {summary['entropy_bound_bytes']:,.0f} B"
    )
    for name, info in summary["extra"].items():
        print(f"extra: {name} {info['dtype']} {info['shape']}")
    print_bounds(summary, width)
    return 0
