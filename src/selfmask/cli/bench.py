"""``selfmask bench``: measured speed, memory and size figures (see BENCHMARKS.md).

Each figure is a ratio of variants measured side by side in one run (interleaved,
medians), so a noisy machine affects both sides alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from selfmask.errors import SelfmaskError

SECTIONS = ("step", "fastpath", "memory", "augment", "data", "storage", "bank", "knn", "threads", "conditional")
# the sections of --suite gpu (selfmask.bench.suite.SECTIONS; listed here so --help needs no import)
GPU_SECTIONS = ("parity", "step", "memory", "swav", "bank", "knn", "compile")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="measure speed/memory/size figures: masked vs FFT step, augmentation, data, mask files, k-NN",
        description="Benchmarks; each figure is a ratio of variants measured side by side in one run. "
        f"Sections: {', '.join(SECTIONS)}.",
    )
    p.add_argument("--suite", default="cpu", help="cpu: the sections below, one figure each (default); gpu: every GPU "
                   f"figure in one capped run (sections {', '.join(GPU_SECTIONS)}; writes --out/suite.json and "
                   "suite.md; ends within 8 minutes on one H100/H200)")
    p.add_argument("--smoke", action="store_true",
                   help="--suite gpu at tiny sizes (on the CPU unless --device cuda; the CI check, < 2 min)")
    p.add_argument("--out", type=Path, default=None, help="--suite gpu: folder for suite.json and suite.md "
                   "(default bench-gpu, or bench-gpu-smoke with --smoke)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu; cuda for --suite gpu without --smoke)")
    p.add_argument("--backbone", default=None, help="--suite cpu: backbone of the step benchmarks (default: "
                   "resnet_tiny on CPU, resnet50 on CUDA)")
    p.add_argument("--batch", type=int, default=64, help="--suite cpu: batch size (the gpu suite has its own sizes)")
    p.add_argument("--repeats", type=int, default=7, help="--suite cpu: interleaved timing blocks (median over them)")
    p.add_argument("--only", nargs="+", default=None, metavar="SECTION", help="run only these sections")
    p.add_argument(
        "--mask",
        nargs="+",
        default=[],
        metavar="FILE",
        help="--suite cpu: mask files of the 'conditional' section (each on the base it records: backbone, weights "
        "path or seed); without: a synthetic ResNet-50 mask whose pruning depends on |w|",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from selfmask import bench

    if args.suite not in ("cpu", "gpu"):
        raise SelfmaskError(f"--suite must be cpu or gpu, got {args.suite!r}")
    known = GPU_SECTIONS if args.suite == "gpu" else SECTIONS
    unknown = [s for s in args.only or () if s not in known]
    if unknown:
        raise SelfmaskError(f"--only: unknown {args.suite} section(s) {', '.join(map(repr, unknown))}; "
                            f"sections: {', '.join(known)}")
    if args.device is None:
        args.device = "cuda" if args.suite == "gpu" and not args.smoke else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        hint = " (--smoke runs the suite on the CPU)" if args.suite == "gpu" else ""
        raise SelfmaskError(f"--device {args.device} was asked for, but torch.cuda.is_available() is False on this "
                            f"machine{hint}")
    if args.smoke and args.suite != "gpu":
        raise SelfmaskError("--smoke applies to --suite gpu only")
    if args.suite == "gpu":
        return _run_gpu_suite(args)
    if args.batch < 1 or args.repeats < 1:
        raise ValueError(f"--batch and --repeats must be >= 1, got {args.batch} and {args.repeats}")
    cuda = args.device.startswith("cuda")
    backbone = args.backbone or ("resnet50" if cuda else "resnet_tiny")
    sections: dict[str, Callable[[], dict[str, Any]]] = {
        "step": lambda: bench.step_time_ratio(backbone, args.batch, args.repeats, device=args.device),
        "fastpath": lambda: bench.fast_path_step_ratios(
            backbone, args.batch, args.repeats, device=args.device, amp="bf16" if cuda else None, channels_last=cuda),
        "memory": lambda: bench.peak_memory_ratio(backbone, args.batch, device=args.device),
        "augment": lambda: bench.augment_throughput(
            batch=args.batch, image_size=224 if cuda else 32, large_size=224 if cuda else 32,
            small_size=96 if cuda else 16, backbone=backbone, repeats=args.repeats, device=args.device),
        "data": lambda: bench.decode_vs_cache_throughput(num_images=128, repeats=min(args.repeats, 5)),
        "storage": lambda: bench.mask_file_size(),
        "bank": lambda: {
            **bench.bank_switch_time(device=args.device, repeats=args.repeats),
            "mixed": bench.bank_mixed_throughput(backbone, device=args.device, batch=args.batch, repeats=args.repeats),
        },
        "knn": lambda: bench.knn_time(device=args.device),
        "threads": lambda: bench.thread_step_times(
            batch=args.batch, threads=(1, args.threads if (args.threads or 0) > 1 else 2), repeats=args.repeats),
    }
    if not args.mask:
        sections["conditional"] = lambda: _synthetic_conditional(args.repeats)
    for i, path in enumerate(args.mask):
        sections[f"conditional[{i}]"] = lambda path=path: _conditional(path, args.repeats)
    result: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "date": time.strftime("%Y-%m-%d"),
        }
    }
    chosen = [s for s in (args.only or SECTIONS) if s != "conditional" or not args.mask]
    if args.mask and (args.only is None or "conditional" in args.only):
        chosen += [f"conditional[{i}]" for i in range(len(args.mask))]
    for name in chosen:
        t0 = time.perf_counter()
        result[name] = sections[name]()
        result[name]["bench_seconds"] = time.perf_counter() - t0
        if not args.json:
            _print_section(name, result[name])
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return 0


def _conditional(path: str, repeats: int) -> dict[str, Any]:
    """The 'conditional' section for one mask file, on the base it records."""
    from selfmask.bench import conditional_coding
    from selfmask.cli.common import build_base
    from selfmask.storage import load_mask

    mask = load_mask(path)
    where = argparse.Namespace(backbone=mask.backbone, weights=mask.source.get("weights"), seed=None)
    return {"file": path, **conditional_coding(mask, build_base(where, mask, path), repeats)}


def _synthetic_conditional(repeats: int) -> dict[str, Any]:
    from selfmask.bench import conditional_coding, synthetic_mask

    mask, base = synthetic_mask()
    return {"file": "synthetic resnet50, P(off) = 0.4 (1 - rank(|w|)/n)^3", **conditional_coding(mask, base, repeats)}


def _run_gpu_suite(args: argparse.Namespace) -> int:
    from selfmask.bench.suite import FULL, SMOKE, run_suite

    out = args.out or Path("bench-gpu-smoke" if args.smoke else "bench-gpu")
    result = run_suite(SMOKE if args.smoke else FULL, args.device, args.only or GPU_SECTIONS, out=out, smoke=args.smoke,
                       echo=lambda line: print(line, flush=True))
    failed = [s for s in result["sections"] if "error" in result[s]]
    print(f"wrote {out / 'suite.json'} and {out / 'suite.md'}" + (f"; failed sections: {', '.join(failed)}" if failed
                                                                   else ""))
    return 1 if failed else 0


_KEY_FIGURES = {
    "step": ("masked_step_s", "fft_step_s", "time_ratio"),
    "fastpath": ("fft_step_s", "masked_plain_step_s", "masked_fast_step_s", "plain_time_ratio", "fast_time_ratio"),
    "memory": ("masked_peak_bytes", "fft_peak_bytes", "memory_ratio"),
    "augment": ("images_per_s", "augment_s", "step_s", "augment_over_step"),
    "data": ("decode_images_per_s", "cache_read_images_per_s", "cache_speedup"),
    "storage": ("file_bytes", "payload_over_bound", "header_bytes", "bits_per_weight", "x_smaller_than_fp32",
                "encode_plus_decode_s"),
    "bank": ("switch_s", "copy_s", "switch_over_copy"),
    "knn": ("bank", "queries", "dim", "seconds", "queries_per_s"),
    "conditional": ("file", "masked_weights", "payload_bits_per_weight", "bounds_bits_per_weight",
                    "conditioned_over_per_tensor_bound", "conditioned_over_weight_bound", "mask_bytes",
                    "encode_over_lzma9", "decode_over_lzma9", "encode_plus_decode_over_lzma9"),
}


def _print_section(name: str, res: dict[str, Any]) -> None:
    figures = _KEY_FIGURES.get(name.split("[")[0], ())  # "conditional[0]": one per mask file
    keys = [k for k in figures if k in res] or [k for k in res if not isinstance(res[k], dict)]
    print(f"[{name}] " + ", ".join(f"{k}={_fmt(res[k])}" for k in keys))
    mixed = res.get("mixed")
    if isinstance(mixed, dict):  # bank: mixed-task batches, one line per number of tasks
        for row in mixed["rows"]:
            print(f"[{name}/mixed {mixed['backbone']}, batch {mixed['batch']}] "
                  + ", ".join(f"{k}={_fmt(v)}" for k, v in row.items()))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)
