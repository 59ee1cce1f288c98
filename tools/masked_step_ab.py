"""Masked / FFT step ratios of the current code and an older copy of it, side by side in ONE process.

    git archive COMMIT src | tar -x -C /tmp/before
    OMP_NUM_THREADS=1 PYTHONPATH=src python tools/masked_step_ab.py /tmp/before/src --repeats 15

Five variants train the same backbone on the same batch, interleaved in blocks of 3 steps
(rotating order, medians): FFT, and masked training on the fast and per-layer paths, each with
this tree's mask layer and with the older tree's (``selfmask/masking/layer.py`` loaded from
BEFORE_SRC; its ``ScoreMask`` / ``FlatMaskCache`` take over the same modules, so the rest of the
code is shared). A loaded machine slows all five alike, so the ratios compare where separate
runs could not (BENCHMARKS.md, "ResNet-18 masked / FFT step on the CPU").
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
from pathlib import Path

import torch

from selfmask.bench.step import _make_variant, _step, _Variant
from selfmask.bench.timing import interleaved_medians
from selfmask.masking.model import iter_score_masks


def _old_layer(before_src: Path):
    path = before_src / "selfmask" / "masking" / "layer.py"
    spec = importlib.util.spec_from_file_location("selfmask_masking_layer_before", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before_src", type=Path, help="the older tree's src folder")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    old = _old_layer(args.before_src)
    dev = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)

    def before(fast: bool) -> _Variant:
        v = _make_variant(args.backbone, True, 10, dev, 0)
        members = [pm for _n, _m, _t, pm in iter_score_masks(v.model)]
        for pm in members:
            pm.__class__ = old.ScoreMask
        if fast:
            old.FlatMaskCache(members)
        return v

    variants = {
        "fft": _make_variant(args.backbone, False, 10, dev, 0),
        "fast_before": before(True),
        "fast_after": _make_variant(args.backbone, True, 10, dev, 0, fast_masks=True),
        "plain_before": before(False),
        "plain_after": _make_variant(args.backbone, True, 10, dev, 0),
    }
    load = os.getloadavg()[0]
    fns = {k: functools.partial(_step, v, x, y, None) for k, v in variants.items()}
    med, done = interleaved_medians(fns, args.repeats, 3, dev)
    print(json.dumps({
        "backbone": args.backbone, "batch": args.batch, "size": args.size, "threads": torch.get_num_threads(),
        "repeats": done, "load_1min_before_after": [round(load, 2), round(os.getloadavg()[0], 2)],
        "step_ms": {k: round(v * 1e3, 1) for k, v in med.items()},
        "over_fft": {k: round(v / med["fft"], 4) for k, v in med.items()},
    }))


if __name__ == "__main__":
    main()
