"""Arguments and steps shared by several commands."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from selfmask.errors import SelfmaskError
from selfmask.io import read_json_object


def add_data_args(p: argparse.ArgumentParser, default: str = "embedded") -> None:
    from selfmask.data.sources import SPEC_HELP

    p.add_argument("--data", default=default, help=f"dataset: {SPEC_HELP} (default: {default})")
    p.add_argument("--cache-dir", type=Path, default=None, help="dataset cache (default ~/.cache/selfmask)")


def add_backbone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backbone",
        default=None,
        help="backbone name (see `selfmask backbones`; default resnet_tiny), or timm:NAME, torchvision:NAME, "
        "open_clip:NAME, module.path:factory (a model of that library / your code, head removed)",
    )
    p.add_argument("--weights", default=None, help="local checkpoint of the backbone (.safetensors/.pt/.pth)")


def add_embedding_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embedding", default=None, choices=("class_token", "projected"),
                   help="CLIP ViTs: the 768-d post-LayerNorm class token (default, the paper's features) or the "
                   "projected 512-d embedding of CLIP's encode_image")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--knn-k", type=int, default=200, help="neighbours of the weighted k-NN (default 200)")
    p.add_argument("--knn-temperature", type=float, default=0.1, help="k-NN temperature T (default 0.1)")
    p.add_argument("--no-probe", action="store_true", help="skip the linear probe")


#: Commands that train or evaluate, and so take ``--threads`` (added by ``cli.main``).
THREADED_COMMANDS = ("demo", "adapt", "eval", "pretrain", "lowshot", "cascade", "bench", "reproduce")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under ``taskset`` or a container quota)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def default_threads(environ: Mapping[str, str] | None = None, cpus: int | None = None) -> int:
    """Torch threads when ``--threads`` is not given: ``OMP_NUM_THREADS`` if set to a positive
    integer (its first entry, as OpenMP reads a list), else the CPUs the process may use.

    Never the machine's load: thread counts change float sums, so a run must not depend
    on what else happens to be running (docs/scale.md has the measured advice for busy
    machines: ``--threads 1``).
    """
    env = (os.environ if environ is None else environ).get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) >= 1:
        return int(env)
    return usable_cpus() if cpus is None else cpus


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: OMP_NUM_THREADS if set, else the CPUs this process may use, "
                   f"here {default_threads()}; on a machine shared with other jobs use 1, see docs/scale.md)")


_ACTIVE_THREADS: list[int] = []  # thread counts of the commands running now, innermost last


@contextlib.contextmanager
def threads_from_args(args: argparse.Namespace) -> Iterator[int | None]:
    """Torch's thread count from ``args.threads`` while the command runs, restored after (so an
    in-process caller such as a test keeps its own); yields the count, or None for a command
    without the option.

    Without ``--threads``: the count of the command this one runs inside (``reproduce`` runs
    its steps as commands in the same process), else :func:`default_threads`.
    """
    if not hasattr(args, "threads"):
        yield None
        return
    if args.threads is not None:
        threads = args.threads
    else:
        threads = _ACTIVE_THREADS[-1] if _ACTIVE_THREADS else default_threads()
    if threads < 1:
        raise SelfmaskError(f"--threads must be >= 1, got {threads}")
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    _ACTIVE_THREADS.append(threads)
    try:
        yield threads
    finally:
        _ACTIVE_THREADS.pop()
        torch.set_num_threads(previous)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")


def read_config_file(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    if not path.is_file():
        raise SelfmaskError(f"config file {str(path)!r} does not exist")
    return read_json_object(path, f"config file {path}")


def check_setting_types(settings: dict[str, Any], where: str, optional: tuple[str, ...] = ("weights",)) -> None:
    """The path-like settings of a config file (data, backbone, weights) are strings (``optional`` ones may be null)."""
    for key in ("data", "backbone", "weights"):
        if key in settings and not isinstance(settings[key], str) and not (key in optional and settings[key] is None):
            null = " or null" if key in optional else ""
            raise SelfmaskError(f"{where}: {key!r} must be a string{null}, got {settings[key]!r}")


def check_eval_args(args: argparse.Namespace) -> None:
    if args.knn_k < 1:
        raise SelfmaskError(f"--knn-k must be >= 1, got {args.knn_k}")
    if not args.knn_temperature > 0:
        raise SelfmaskError(f"--knn-temperature must be > 0, got {args.knn_temperature}")


def add_base_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    """``--backbone/--weights/--seed``: the base model a mask file belongs to."""
    what = "backbone name (see selfmask backbones) or timm:NAME, torchvision:NAME, open_clip:NAME, module.path:factory"
    if not required:
        what += "; with it the masks are decoded on this base (needed for files coded given the base weights)"
    p.add_argument("--backbone", required=required, default=None, help=what)
    p.add_argument("--weights", default=None, metavar="BASE", help="base weights (.safetensors or .pt state dict)")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="without --weights: seed of the random base (default: the seed the mask file records, else 0)",
    )


def build_base(args: argparse.Namespace, mask: Any, where: str) -> Any:
    """The base backbone of ``--backbone``/``--weights`` (a random base: ``--seed`` or the file's recorded seed)."""
    import torch

    from selfmask.backbones import create_backbone

    if args.weights is None:
        seed = args.seed if args.seed is not None else mask.source.get("seed", 0)
        if type(seed) is not int:
            raise SelfmaskError(f"{where}: recorded seed {seed!r} is not an integer; pass --seed")
        torch.manual_seed(seed)
    return create_backbone(args.backbone, args.weights)


def load_mask_for_report(args: argparse.Namespace) -> tuple[Any, dict[str, Any] | None]:
    """``args.file`` read, and decoded on the base of ``--backbone`` when given: ``(MaskFile, base weights)``."""
    from selfmask.fingerprint import model_fingerprint
    from selfmask.masking.model import base_state_dict
    from selfmask.storage import load_mask

    mask = load_mask(args.file)
    if args.backbone is None:
        return mask, None
    model = build_base(args, mask, args.file)
    base = base_state_dict(model)
    fingerprint = model_fingerprint(model)
    if fingerprint != mask.fingerprint:  # the bounds of other weights would mean nothing
        raise SelfmaskError(
            f"{args.file}: the mask was trained on base fingerprint {mask.fingerprint[:16]}..., --backbone/--weights "
            f"give {fingerprint[:16]}... (different weights or a different backbone)"
        )
    return mask.decode_with_base(base, fingerprint), base


def bits_cell(bits: float | None, numel: int, width: int) -> str:
    """Bits per weight, right-aligned, or '-' when unknown."""
    return f"{'-':>{width}}" if bits is None else f"{bits / numel if numel else 0.0:>{width}.4f}"


def print_bounds(summary: dict[str, Any], width: int) -> None:
    """Per tensor and in total: our payload beside the per-tensor, per-channel and weight-conditioned bounds."""
    from selfmask.storage.bounds import BOUND_BINS

    print(f"bounds (bits per weight): ours, per tensor, per output channel, given {BOUND_BINS} quantile bins of |w|")
    print(f"{'tensor':<{width}}  {'codec':>10}  {'ours b/w':>8}  {'H tensor':>8}  {'H chan':>8}  {'H | w':>8}")
    for t in summary["tensors"]:
        b, n = t["bounds_bits"], t["numel"]
        print(
            f"{t['name']:<{width}}  {t['codec']:>10}  {bits_cell(8 * t['payload_bytes'], n, 8)}  "
            f"{bits_cell(b['per_tensor'], n, 8)}  {bits_cell(b['per_channel'], n, 8)}  {bits_cell(b['weight'], n, 8)}"
        )
    n, totals = summary["masked_weights"], summary["bounds_bytes"]
    cells = "  ".join(bits_cell(None if v is None else 8 * v, n, 8) for v in totals.values())
    print(f"{'total':<{width}}  {'':>10}  {bits_cell(8 * summary['payload_bytes'], n, 8)}  {cells}")
    parts = []
    for kind, label in (("per_tensor", "per-tensor"), ("per_channel", "per-channel"), ("weight", "weight-conditioned")):
        v = totals[kind]
        if v is None:
            parts.append(f"{label} bound -")
        else:
            ratio = f" ({summary['payload_bytes'] / v:.3f}x)" if v else ""
            parts.append(f"{label} bound {v:,.0f} B{ratio}")
    print(f"payload {summary['payload_bytes']:,} B (file {summary['file_bytes']:,} B); " + ", ".join(parts))
    if summary["needs_base"]:
        print(
            "some masks are coded given the base weights: pass --backbone (and --weights or --seed) to decode them "
            "and show their per-channel and weight-conditioned bounds"
        )
    elif totals["weight"] is None:
        print("the weight-conditioned bound needs the base weights: pass --backbone (and --weights or --seed)")
