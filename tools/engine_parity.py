"""Bit-for-bit parity of the training code across a refactor (issue 13: one training engine).

Runs a set of tiny training runs (supervised mask / topk / fft / linear / masked-random head,
a label subset, SwAV masks with a head warm-up and a queue, SwAV fft, a resumed run, supervised
pretraining) and records a SHA-256 of every trained tensor (scores, weights, buffers, head) and
of the loss/accuracy history of each. Write the digests on the old code, check them on the new::

    OMP_NUM_THREADS=1 PYTHONPATH=src python tools/engine_parity.py --write /tmp/parity.json   # before
    (or PYTHONPATH=/path/to/old/checkout/src: the script uses only the public training calls)
    OMP_NUM_THREADS=1 PYTHONPATH=src python tools/engine_parity.py --check /tmp/parity.json   # after

Exit status 1 names every run whose outputs changed. ``tools/engine_parity.main.json`` holds
the digests of main before the engine refactor (commit 6cf9efa), written on the project's
CPU machine (torch 2.13.0+cpu, one thread); other builds of torch may round differently.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_stripes  # noqa: E402  (the tests' own small synthetic data)

from selfmask.backbones import backbone_info, build_backbone  # noqa: E402
from selfmask.data.multicrop import MultiCrop  # noqa: E402
from selfmask.objectives import SwAVConfig  # noqa: E402
from selfmask.training.config import TrainConfig  # noqa: E402
from selfmask.training.run_folder import RunFolder  # noqa: E402

INFO = backbone_info("resnet_tiny")
DATA = make_stripes(64, seed=0)
TIMING = ("seconds", "images_per_second")


def _digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous().reshape(-1)
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _history(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _backbone():
    torch.manual_seed(0)
    return build_backbone("resnet_tiny")


def _summary(result, run_dir: Path | None = None) -> dict:
    out = {"backbone": _digest(result.backbone.state_dict()), "history": _history(result.history)}
    if result.head is not None:
        out["head"] = _digest(result.head.state_dict())
    if run_dir is not None:
        for name in ("scores.safetensors", "buffers.safetensors", "weights.safetensors", "head.safetensors"):
            if (run_dir / name).is_file():
                out[name] = hashlib.sha256((run_dir / name).read_bytes()).hexdigest()
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        out["metrics"] = _history(metrics)
    return out


def train_config(**kw):  # noqa: ANN003, ANN201
    """A TrainConfig on old and new code alike: since issue 13 the mask settings are one object, ``mask``."""
    from dataclasses import fields

    if "mask" in {f.name for f in fields(TrainConfig)}:
        mask = {k: kw.pop(k) for k in ("threshold", "init_score", "bn") if k in kw}
        kw = {**kw, "mask": mask} if mask else kw
    return TrainConfig(**kw)


def _supervised(tmp: Path, name: str, **kw) -> dict:
    from selfmask.training.trainer import adapt

    cfg = train_config(epochs=2, batch_size=16, seed=3, warmup_epochs=0.5, **kw)
    run = RunFolder(tmp / name).prepare()
    return _summary(adapt(_backbone(), INFO, DATA, cfg, run=run, progress=False), tmp / name)


def _swav(tmp: Path, name: str, method: str, train: dict | None = None, **kw) -> dict:
    from selfmask.training.ssl import adapt_swav

    cfg = train_config(method=method, objective="swav", epochs=2, batch_size=16, seed=5,
                      lr=0.01 if method == "fft" else None, **(train or {}))
    swav = SwAVConfig(num_prototypes=8, projection_dim=16, freeze_prototypes_iters=2, **kw)
    crops = MultiCrop.for_input_size(32, seed=5, mean=INFO.mean, std=INFO.std, n_small=2)
    run = RunFolder(tmp / name).prepare()
    return _summary(adapt_swav(_backbone(), INFO, DATA, cfg, swav, crops=crops, run=run, progress=False), tmp / name)


class _Crash(Exception):
    pass


def _resumed(tmp: Path) -> dict:
    from selfmask.training.trainer import adapt

    cfg = train_config(epochs=2, batch_size=16, seed=3, checkpoint_every=3, head="masked-random")

    def crash(row: dict) -> None:
        raise _Crash

    run = RunFolder(tmp / "resumed").prepare()
    try:
        adapt(_backbone(), INFO, DATA, cfg, run=run, progress=False, on_epoch=crash)
    except _Crash:
        pass
    result = adapt(_backbone(), INFO, DATA, cfg, run=RunFolder(tmp / "resumed"), progress=False, resume=True)
    return _summary(result, tmp / "resumed")


def _pretrain() -> dict:
    from selfmask.training.pretrain import pretrain_supervised

    model, history = pretrain_supervised(DATA, epochs=2, batch_size=24, seed=2, progress=False, flip=True)
    return {"backbone": _digest(model.state_dict()), "history": _history(history)}


def collect() -> dict[str, dict]:
    torch.set_num_threads(1)
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        out["mask"] = _supervised(tmp, "mask")
        out["topk"] = _supervised(tmp, "topk", method="topk", keep_ratio=0.7)
        out["fft"] = _supervised(tmp, "fft", method="fft", lr=0.01)
        out["linear"] = _supervised(tmp, "linear", method="linear", augment=False)
        out["masked_random_head"] = _supervised(tmp, "mrh", head="masked-random", threshold=0.5, init_score=1.2)
        out["label_subset"] = _supervised(tmp, "sub", label_fraction=0.5, flip=False)
        out["swav_mask"] = _swav(tmp, "swav_mask", "mask", freeze_backbone_iters=3, queue_length=32,
                                 queue_start_epoch=1)
        out["swav_fft"] = _swav(tmp, "swav_fft", "fft", queue_length=0)
        out["bf16_channels_last"] = _supervised(tmp, "bf16", precision="bf16", channels_last=True,
                                                head="masked-random")
        out["swav_bf16_channels_last"] = _swav(tmp, "swav_bf16", "mask", {"precision": "bf16", "channels_last": True},
                                               queue_length=0)
        out["no_fast_masks"] = _supervised(tmp, "plain", method="topk", fast_masks=False, bn="eval")
        out["resumed"] = _resumed(tmp)
        out["pretrain"] = _pretrain()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", type=Path, help="record the digests of this code")
    group.add_argument("--check", type=Path, help="compare this code's digests with a recorded file")
    args = ap.parse_args()
    now = collect()
    if args.write:
        args.write.write_text(json.dumps(now, indent=1, sort_keys=True))
        print(f"wrote {len(now)} runs to {args.write}")
        return 0
    before = json.loads(args.check.read_text())
    changed = [name for name in sorted(set(before) | set(now)) if before.get(name) != json.loads(json.dumps(now.get(name)))]
    for name in changed:
        print(f"CHANGED: {name}")
    print(f"{len(now) - len(changed)}/{len(now)} runs bit-identical")
    return 1 if changed else 0


if __name__ == "__main__":
    raise SystemExit(main())
