"""DINO instead of SwAV for the demo's self-masking network: train, judge on validation, then on test.

Train (all 3,000 downstream training images, no labels; judged on the validation split of
tools/smn_levers.py: a bank of 2,400 training images and 600 training images as queries, the
test split is never read)::

    PYTHONPATH=src python tools/dino_smn.py train WEIGHTS --seed 0 --out-dim 1024 --out runs/dino-s0

Test (only for the setting chosen on validation; bank = all training images, queries = the
test split, k = 200, T = 0.1, as docs/lowshot.md's "SMN k-NN" at 100 %)::

    PYTHONPATH=src python tools/dino_smn.py test WEIGHTS runs/dino-s0 runs/dino-s1 runs/dino-s2

``WEIGHTS``: the demo's pretrained ``resnet_tiny``
(``~/.cache/selfmask/pretrained-resnet_tiny-seed0-e6.safetensors``). Everything but the
objective is the SwAV SMN's recipe (``selfmask.experiments.demo.smn_recipe``: 552 steps of
which 138 head warm-up, score lr 1, BatchNorm frozen, mild crops without colour, the same
``TrainConfig`` and ``MultiCrop``) with ``objective="dino"``, trained by the engine
(``selfmask.training.ssl.adapt_ssl``), which writes a run folder (config.json, metrics.jsonl,
scores) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from selfmask.backbones import backbone_info, create_backbone  # noqa: E402
from selfmask.data.embedded import load_embedded  # noqa: E402
from selfmask.evaluation.features import extract_features  # noqa: E402
from selfmask.evaluation.knn import knn_accuracy  # noqa: E402
from selfmask.experiments.demo import DemoConfig, smn_recipe  # noqa: E402
from selfmask.masking import mask_summary  # noqa: E402
from selfmask.objectives.dino import DINOConfig  # noqa: E402
from selfmask.training.run_folder import RunFolder, load_scores_and_buffers  # noqa: E402
from selfmask.training.ssl import adapt_ssl  # noqa: E402


def validation_split(train):  # noqa: ANN001, ANN201
    """tools/smn_levers.py's split of the training images: (bank of 2,400, 600 queries)."""
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(123))
    return train.subset(perm[600:]), train.subset(perm[:600])


def knn(model, info, bank, queries) -> float:  # noqa: ANN001
    fb = F.normalize(extract_features(model, bank, info.mean, info.std), dim=1)
    fq = F.normalize(extract_features(model, queries, info.mean, info.std), dim=1)
    return knn_accuracy(fb, bank.labels, fq, queries.labels, bank.num_classes, k=200, temperature=0.1).accuracy


def train(args: argparse.Namespace) -> None:
    info = backbone_info("resnet_tiny")
    full = load_embedded(seed=0).downstream_train
    recipe = DemoConfig(seed=args.seed, smn_steps=args.steps, smn_head_warmup=args.warmup)
    _swav, tcfg, crops = smn_recipe(recipe, info, len(full))  # SwAV's TrainConfig and crops, unchanged
    dcfg = DINOConfig(
        out_dim=args.out_dim, hidden_dim=args.hidden_dim, bottleneck_dim=args.bottleneck_dim,
        teacher_temperature=args.teacher_temperature, warmup_teacher_temperature=args.teacher_temperature,
        teacher_momentum=args.teacher_momentum, head_lr=args.head_lr, head_batchnorm=args.head_batchnorm,
        freeze_last_layer_iters=max(1, args.steps // 20),  # as the SwAV SMN's prototypes
        freeze_backbone_iters=args.warmup,
    )
    tcfg = replace(tcfg, objective="dino")
    run = RunFolder(args.out, overwrite=True).prepare()
    result = adapt_ssl(create_backbone("resnet_tiny", args.weights), info, full, tcfg, dcfg, crops=crops, run=run,
                       run_meta={"weights": str(args.weights)}, progress=False,
                       on_epoch=lambda row: print({k: row[k] for k in row if k not in ("seconds", "lr")}, flush=True))
    backbone, history, steps = result.backbone, result.history, result.history[-1]["step"]
    bank, val = validation_split(full)
    res = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"},
        "dino": dcfg.to_dict(), "train": tcfg.to_dict(), "steps": steps,
        "loss": [round(h["loss"], 4) for h in history],
        "teacher_entropy": [round(h["teacher_entropy"], 4) for h in history],
        "fraction_active": history[-1]["fraction_active"],
        "val_knn": knn(backbone, info, bank, val),
    }
    if args.pretrained_too:
        res["val_knn_pretrained"] = knn(create_backbone("resnet_tiny", args.weights), info, bank, val)
    print(json.dumps({k: v for k, v in res.items() if k not in ("train", "args")}), flush=True)
    run.write_json("dino_smn.json", res)


def test(args: argparse.Namespace) -> None:
    from selfmask.experiments.evaluate import evaluate_features
    from selfmask.masking import mask_model

    info = backbone_info("resnet_tiny")
    bench = load_embedded(seed=0)
    tr, te = bench.downstream_train, bench.downstream_test

    def test_knn(model) -> float:  # noqa: ANN001
        ev = evaluate_features(model, info, tr, te, knn_k=200, knn_temperature=0.1, linear_probe=False)
        return float(ev["knn_accuracy"])

    out = {"pretrained": test_knn(create_backbone("resnet_tiny", args.weights)), "runs": {}}
    for run in args.runs:
        cfg = json.loads((Path(run) / "dino_smn.json").read_text())
        backbone = create_backbone("resnet_tiny", args.weights)
        _swav, tcfg, _crops = smn_recipe(DemoConfig(seed=cfg["args"]["seed"]), info, len(tr))
        mask_model(backbone, tcfg.mask_config(info.mask_preset))  # the masks train() put on, same threshold
        load_scores_and_buffers(backbone, run)
        out["runs"][str(run)] = {"seed": cfg["args"]["seed"], "test_knn": test_knn(backbone),
                                 "fraction_active": mask_summary(backbone).fraction_active}
        print(run, out["runs"][str(run)], flush=True)
    accs = [r["test_knn"] for r in out["runs"].values()]
    if len(accs) > 1:
        out["mean"], out["std"] = statistics.mean(accs), statistics.stdev(accs)
    print(json.dumps(out, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(required=True)
    t = sub.add_parser("train")
    t.add_argument("weights")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=552)
    t.add_argument("--warmup", type=int, default=138, help="head warm-up steps (freeze_backbone_iters)")
    t.add_argument("--out-dim", type=int, default=1024)
    t.add_argument("--hidden-dim", type=int, default=256)
    t.add_argument("--bottleneck-dim", type=int, default=64)
    t.add_argument("--teacher-temperature", type=float, default=0.04)
    t.add_argument("--teacher-momentum", type=float, default=0.996)
    t.add_argument("--head-lr", type=float, default=0.03)
    t.add_argument("--head-batchnorm", action="store_true", help="BatchNorm in the head (DINO's use_bn_in_head)")
    t.add_argument("--pretrained-too", action="store_true", help="also the pretrained backbone's validation k-NN")
    t.add_argument("--out", type=Path, required=True)
    t.set_defaults(func=train)
    e = sub.add_parser("test")
    e.add_argument("weights")
    e.add_argument("runs", nargs="+", type=Path)
    e.add_argument("--json", type=Path, default=None)
    e.set_defaults(func=test)
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.func(args)


if __name__ == "__main__":
    main()
