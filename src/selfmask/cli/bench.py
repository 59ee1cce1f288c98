"""``selfmask bench``: measured speed and memory figures (see BENCHMARKS.md)."""

from __future__ import annotations

import argparse
import json
import platform

import torch


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="measure masked-vs-full-fine-tuning step time and memory (ratios, medians)",
        description="Benchmarks: each figure is a ratio of two variants measured side by side in one run.",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--backbone", default=None, help="backbone (default: resnet_tiny on CPU, resnet50 on CUDA)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7, help="interleaved timing blocks (median over them)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from selfmask.bench import peak_memory_ratio, step_time_ratio

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch.cuda.is_available() is False on this machine")
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    backbone = args.backbone or ("resnet50" if args.device.startswith("cuda") else "resnet_tiny")
    result = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "step_time": step_time_ratio(backbone, args.batch, args.repeats, device=args.device),
        "peak_memory": peak_memory_ratio(backbone, args.batch, device=args.device),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    st, pm = result["step_time"], result["peak_memory"]
    print(f"machine: {result['machine']['platform']}, torch {torch.__version__}, {st['threads']} threads")
    print(f"{'figure':<40} {'masked':>12} {'FFT':>12} {'ratio':>7}")
    print(
        f"{f'step time ({backbone}, batch {args.batch}, {args.device})':<40} "
        f"{st['masked_step_s'] * 1e3:>10.1f}ms {st['fft_step_s'] * 1e3:>10.1f}ms {st['time_ratio']:>7.3f}"
    )
    print(
        f"{'peak memory growth':<40} {pm['masked_peak_bytes'] / 2**20:>10.1f}MB "
        f"{pm['fft_peak_bytes'] / 2**20:>10.1f}MB {pm['memory_ratio']:>7.3f}"
    )
    return 0
