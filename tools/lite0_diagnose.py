"""Two diagnostics behind docs/backbones.md's reading of issue 15's EfficientNet-Lite0 runs.

    PYTHONPATH=src python tools/lite0_diagnose.py embed RUN_DIR     # has the embedding collapsed?
    PYTHONPATH=src python tools/lite0_diagnose.py bn RUN_DIR...     # do BatchNorm statistics lag the masks?

`embed`: on the first 512 train images (64 px), the pretrained backbone and the run's: mean embedding
norm and its spread, mean cosine similarity between two images, effective rank of the centred
embeddings (exp of the entropy of the normalised squared singular values).
`bn`: test accuracy of a supervised run's head as trained, then with every BatchNorm's running
statistics recomputed as a plain average over the un-augmented train images. A diagnostic that reads
the test split: it chooses nothing.
"""

from __future__ import annotations

import sys

import torch

from selfmask.backbones import backbone_info, create_backbone
from selfmask.data.base import normalize_batch
from selfmask.data.sources import load_data
from selfmask.evaluation import extract_features
from selfmask.training.run_folder import load_run
from selfmask.training.trainer import classify

INFO = backbone_info("efficientnet_lite0_64")


def embed(run: str) -> None:
    train, _ = load_data("embedded", resolution=INFO.input_size)
    sub = train.subset(torch.arange(512))
    adapted, _, _ = load_run(run)
    for name, model in (("pretrained", create_backbone(INFO.name).eval()), (run, adapted.eval())):
        f = extract_features(model, sub, INFO.mean, INFO.std, batch_size=128)
        norm = f.norm(dim=1)
        z = torch.nn.functional.normalize(f, dim=1)
        cos = (z @ z.T)[~torch.eye(len(f), dtype=torch.bool)].mean()
        s = torch.linalg.svdvals(f - f.mean(0))
        p = s**2 / (s**2).sum()
        rank = torch.exp(-(p * p.clamp_min(1e-12).log()).sum())
        print(f"{name}: norm {norm.mean():.3f} +- {norm.std():.3f}, mean cosine {cos:.3f}, effective rank {rank:.1f}")


def bn(runs: list[str]) -> None:
    train, test = load_data("embedded", resolution=INFO.input_size)
    for run in runs:
        model, head, _ = load_run(run)
        if head is None:
            raise SystemExit(f"{run}: no head (a self-supervised run); `bn` needs a supervised one")
        print(f"{run}: test accuracy as trained {classify(model, head, test, INFO):.3f}", flush=True)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # cumulative average
        model.train()
        with torch.no_grad():
            for i in range(0, len(train), 250):
                model(normalize_batch(train.images[i : i + 250], INFO.mean, INFO.std))
        print(f"{run}: test accuracy, BatchNorm statistics recomputed on train {classify(model, head, test, INFO):.3f}")


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("embed", "bn") or (sys.argv[1] == "embed" and len(sys.argv) != 3):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    embed(sys.argv[2]) if sys.argv[1] == "embed" else bn(sys.argv[2:])
