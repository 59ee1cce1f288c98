"""One row of docs/swav.md's lever table: an SMN on the embedded benchmark, judged on a validation split.

    PYTHONPATH=src python tools/smn_levers.py WEIGHTS.safetensors --data v2 --lr 1 --bn eval \\
        --large 0.6 1 --small 0.25 0.5 --small-size 16 --no-color --warmup 138 --steps 552 --out row.json

``WEIGHTS``: the demo's pretrained ``resnet_tiny`` (``~/.cache/selfmask/pretrained-resnet_tiny-seed0-e6.safetensors``
after ``make demo``). ``--data``: ``v2`` (the benchmark), ``v2-flat`` (random colours on plain backgrounds)
or ``v1`` (version 1's textures and colours): the same glyphs and poses painted three ways.
The downstream *training* split is cut into a bank of 2,400 images and 600 validation queries
(fixed generator); the test split is never read. Prints and writes the pretrained and SMN k-NN
(k = 200, T = 0.1) and 1 % / 4 % linear probes (C = 1, three balanced subsets, mean).
About 5 minutes on one idle core.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from selfmask.backbones import backbone_info, create_backbone
from selfmask.data.embedded import DOWNSTREAM_APPEARANCE, DOWNSTREAM_APPEARANCE_V1, build_embedded
from selfmask.data.render import Appearance
from selfmask.data.sources import resized
from selfmask.evaluation.features import extract_features
from selfmask.evaluation.knn import knn_accuracy
from selfmask.evaluation.linear_probe import linear_probe
from selfmask.experiments.demo import DemoConfig, smn_recipe
from selfmask.training.ssl import adapt_swav

APPEARANCES = {
    "v2": DOWNSTREAM_APPEARANCE,
    "v2-flat": Appearance(textures=("flat",), distractor_prob=0.0),
    "v1": DOWNSTREAM_APPEARANCE_V1,
}


def evaluate(model, info, bank, val) -> dict[str, float]:  # noqa: ANN001
    fb = F.normalize(extract_features(model, bank, info.mean, info.std), dim=1)
    fv = F.normalize(extract_features(model, val, info.mean, info.std), dim=1)
    out = {"knn": knn_accuracy(fb, bank.labels, fv, val.labels, 10).accuracy}
    for frac in (0.01, 0.04):
        per_class = max(1, round(frac * len(bank) / 10))
        accs = []
        for s in range(3):
            g = torch.Generator().manual_seed(1000 + s)
            idx = torch.cat([
                torch.nonzero(bank.labels == c).flatten()[torch.randperm(int((bank.labels == c).sum()), generator=g)[:per_class]]
                for c in range(10)
            ])
            accs.append(linear_probe(fb[idx], bank.labels[idx], fv, val.labels, C=1.0).accuracy)
        out[f"lp{frac:g}"] = sum(accs) / len(accs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights", nargs="?", default=None, help="backbone weights (default: the backbone's own, if any)")
    ap.add_argument("--backbone", default="resnet_tiny", help="any built-in backbone (e.g. efficientnet_lite0_64)")
    ap.add_argument("--data", choices=sorted(APPEARANCES), default="v2")
    ap.add_argument("--steps", type=int, default=552)
    ap.add_argument("--warmup", type=int, default=138, help="head warm-up steps (freeze_backbone_iters)")
    ap.add_argument("--prototypes", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1.0, help="score learning rate")
    ap.add_argument("--bn", choices=("train", "eval"), default="eval")
    ap.add_argument("--large", type=float, nargs=2, default=(0.6, 1.0))
    ap.add_argument("--small", type=float, nargs=2, default=(0.25, 0.5))
    ap.add_argument("--small-size", type=int, default=16)
    ap.add_argument("--no-color", action="store_true", help="no colour jitter, grayscale or blur")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)

    info = backbone_info(args.backbone)
    full = build_embedded(0, downstream_appearance=APPEARANCES[args.data]).downstream_train
    if info.input_size != full.resolution:  # bicubic, as `--data embedded` does for such a backbone
        full = resized(full, info.input_size)
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(123))
    bank, val = full.subset(perm[600:]), full.subset(perm[:600])
    res = {"args": {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "pretrained": evaluate(create_backbone(args.backbone, args.weights), info, bank, val)}
    print("pretrained", res["pretrained"], flush=True)

    recipe = DemoConfig(  # the demo's recipe with this row's levers
        seed=args.seed, smn_steps=args.steps, smn_head_warmup=args.warmup, smn_prototypes=args.prototypes,
        smn_lr=args.lr, smn_bn=args.bn, smn_large_crop_scale=tuple(args.large), smn_small_crop_scale=tuple(args.small),
        smn_small_size=args.small_size, smn_color=not args.no_color,
    )
    swav, tcfg, crops = smn_recipe(recipe, info, len(full))
    result = adapt_swav(create_backbone(args.backbone, args.weights), info, full, tcfg, swav, crops=crops, progress=False)
    res["loss"] = [round(h["loss"], 4) for h in result.history]
    res["fraction_active"] = result.history[-1].get("fraction_active")
    res["smn"] = evaluate(result.backbone, info, bank, val)
    print("smn", res["smn"], "loss", res["loss"], "active", res["fraction_active"], flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
