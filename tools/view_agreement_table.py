"""How alike do two augmented views of an embedded-benchmark image look to the backbone? (docs/swav.md)

    PYTHONPATH=src python tools/view_agreement_table.py WEIGHTS.safetensors      (about 30 s on 2 cores)

``WEIGHTS``: a ``resnet_tiny`` checkpoint pretrained on the embedded benchmark's letters (the one
``selfmask demo`` caches, or ``selfmask pretrain --out``). Prints a Markdown table of
:func:`selfmask.evaluation.view_agreement` (512 downstream training images, mean of 3 crop seeds)
for the paper's multi-crop recipe scaled to 32 px and milder variants.
"""

from __future__ import annotations

import argparse

import torch

from selfmask.backbones import backbone_info, create_backbone
from selfmask.data.multicrop import MultiCrop, MultiCropConfig
from selfmask.data.sources import load_data
from selfmask.evaluation import view_agreement

RECIPES = [
    ("the paper's recipe scaled to 32 px (scales 0.14-1 and 0.05-0.14)", {}),
    ("the paper's, no colour jitter / grayscale / blur", {"jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0}),
    ("large 0.5-1, small 0.3-0.6", {"large_scale": (0.5, 1.0), "small_scale": (0.3, 0.6)}),
    ("large 0.5-1, small 0.3-0.6, no colour / blur",
     {"large_scale": (0.5, 1.0), "small_scale": (0.3, 0.6), "jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()
    info = backbone_info("resnet_tiny")
    backbone = create_backbone("resnet_tiny", args.weights)
    train, _ = load_data("embedded", resolution=info.input_size, cache_dir=args.cache_dir)
    x, y = train.images[: args.images], train.labels[: args.images]
    print(f"chance: {1 / len(x):.3f}\n")
    print("| multi-crop recipe | large-large | large-small | same class |\n|---|---|---|---|")
    for name, kw in RECIPES:
        res = []
        for seed in range(3):
            cfg = MultiCropConfig.for_input_size(info.input_size, mean=info.mean, std=info.std, flip_p=0.0, n_small=2, **kw)
            res.append(view_agreement(backbone, x, MultiCrop(cfg, seed=seed), y, generator=torch.Generator().manual_seed(seed)))
        mean = {k: sum(getattr(r, k) for r in res) / len(res) for k in ("large_large", "large_small", "class_large_large")}
        print(f"| {name} | {mean['large_large']:.3f} | {mean['large_small']:.3f} | {mean['class_large_large']:.3f} |")


if __name__ == "__main__":
    main()
