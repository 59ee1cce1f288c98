"""Every method x objective x backbone trains, resumes bit for bit and reloads (one table, as PEFT's
``tests/test_custom_models.py`` runs every tuner over a list of small models).

Each case is trained three ways on a few dozen 32 px images, 2 epochs of 3 steps:

* uninterrupted;
* stopped after epoch 1 (a Ctrl-C raised from ``on_epoch``, after the epoch's checkpoint), then
  resumed from the run folder: its trained tensors and per-epoch losses must equal the
  uninterrupted run's bit for bit;
* reloaded: the run folder rebuilt by ``load_run`` (masks: also packed to a mask file and applied to
  a fresh base with ``apply_mask``) must give the trained model's embeddings exactly.

Adding an objective is one :class:`Objective` entry in :data:`OBJECTIVES` (its name, the methods it
trains and how to call its training function); adding a backbone is one name in :data:`BACKBONES`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import make_stripes
from selfmask.backbones import backbone_info, create_backbone
from selfmask.data.base import normalize_batch
from selfmask.masking import is_masked, mask_scores
from selfmask.training.config import TrainConfig
from selfmask.training.run_folder import RunFolder

SEED = 0
IMAGES = 24
EPOCHS = 2
BATCH = 8  # 3 steps per epoch
DATA = make_stripes(IMAGES, seed=SEED, size=32)

#: The small ResNet and the small ViT (both 32 px, CPU-sized).
BACKBONES = ["resnet_tiny", "vit_tiny_clip"]


def _supervised(backbone, info, data, cfg, **kw):  # noqa: ANN001, ANN003, ANN202
    from selfmask.training.trainer import adapt

    return adapt(backbone, info, data, cfg, progress=False, **kw)


def tiny_crops(info, seed: int):  # noqa: ANN001, ANN201
    """Multi-crop views for the self-supervised objectives: 2 large + 2 small crops.

    The small crops are as large as the input: a ViT's position embeddings fix its input at 32 px.
    """
    from selfmask.data.multicrop import MultiCrop

    return MultiCrop.for_input_size(info.input_size, seed=seed, mean=info.mean, std=info.std, n_small=2,
                                    small_size=info.input_size)


def _swav(backbone, info, data, cfg, **kw):  # noqa: ANN001, ANN003, ANN202
    from selfmask.objectives import SwAVConfig
    from selfmask.training.ssl import adapt_swav

    swav = SwAVConfig(num_prototypes=8, queue_length=16, queue_start_epoch=0, freeze_prototypes_iters=1)
    return adapt_swav(backbone, info, data, cfg, swav, crops=tiny_crops(info, cfg.seed), progress=False, **kw)


def _dino(backbone, info, data, cfg, **kw):  # noqa: ANN001, ANN003, ANN202
    from selfmask.objectives.dino import DINOConfig
    from selfmask.training.ssl import adapt_ssl

    dino = DINOConfig(out_dim=16, hidden_dim=16, bottleneck_dim=8, freeze_last_layer_iters=1, head_batchnorm=True)
    return adapt_ssl(backbone, info, data, cfg, dino, crops=tiny_crops(info, cfg.seed), progress=False, **kw)


@dataclass(frozen=True)
class Objective:
    """One training objective of the matrix.

    Attributes:
        name: ``TrainConfig.objective``.
        methods: the ``TrainConfig.method`` values it trains.
        train: ``train(backbone, info, data, cfg, run=..., resume=..., on_epoch=...) -> TrainResult``
            with tiny settings of its own (prototypes, crops, ...).
        settings: further ``TrainConfig`` fields for this objective.
    """

    name: str
    methods: tuple[str, ...]
    train: Callable[..., Any]
    settings: dict[str, Any] = field(default_factory=dict)


OBJECTIVES = [
    Objective("supervised", ("mask", "topk", "fft", "linear"), _supervised),
    Objective("swav", ("mask", "topk", "fft"), _swav),
    Objective("dino", ("mask", "topk", "fft"), _dino),
]

CASES = [
    pytest.param(obj, method, backbone, id=f"{obj.name}-{method}-{backbone}")
    for obj, backbone in itertools.product(OBJECTIVES, BACKBONES)
    for method in obj.methods
]


def _config(obj: Objective, method: str) -> TrainConfig:
    # warm-up across the stop point: the schedule's state must resume too; augmentation draws from a generator
    return TrainConfig(method=method, objective=obj.name, epochs=EPOCHS, batch_size=BATCH, seed=SEED,
                       warmup_epochs=1.5, **obj.settings)


def _base(name: str) -> torch.nn.Module:
    """The base a run folder rebuilds (``weights: null``: random after ``torch.manual_seed(seed)``)."""
    torch.manual_seed(SEED)
    return create_backbone(name)


def _trained_tensors(result: Any) -> dict[str, torch.Tensor]:
    """What training changes: scores (masks) or weights (fft), the head, and the backbone's buffers; by name."""
    out: dict[str, torch.Tensor] = {f"buffer.{k}": v for k, v in result.backbone.named_buffers()}
    if is_masked(result.backbone):
        out.update({f"score.{k}": v for k, v in mask_scores(result.backbone).items()})
    elif result.config.method == "fft":
        out.update({f"weight.{k}": v for k, v in result.backbone.named_parameters()})
    if result.head is not None:
        out.update({f"head.{k}": v for k, v in result.head.state_dict().items()})
    return {k: v.detach().clone() for k, v in out.items()}


def _history(result: Any) -> list[dict[str, Any]]:
    """Per-epoch rows without their timings (everything else must match bit for bit)."""
    timed = ("second", "time", "elapsed")
    return [{k: v for k, v in row.items() if not any(t in k for t in timed)} for row in result.history]


@torch.no_grad()
def _embed(model: torch.nn.Module, name: str) -> torch.Tensor:
    info = backbone_info(name)
    return model.eval()(normalize_batch(DATA.images[:8], info.mean, info.std))


class Stop(KeyboardInterrupt):
    """A Ctrl-C after the first epoch (its checkpoint is written before ``on_epoch``)."""


def _stop_after_first_epoch(row: dict[str, Any]) -> None:
    if row["epoch"] == 1:
        raise Stop


_RUNS: dict[str, dict[str, Any]] = {}


@pytest.fixture
def runs(request, tmp_path_factory) -> dict[str, Any]:  # noqa: ANN001
    """The case trained uninterrupted and stopped-then-resumed; once per case for all tests."""
    params = request.node.callspec.params
    obj, method, backbone = params["obj"], params["method"], params["backbone"]
    key = request.node.callspec.id
    if key not in _RUNS:
        torch.set_num_threads(1)
        info = backbone_info(backbone)
        cfg = _config(obj, method)
        root = tmp_path_factory.mktemp(key)
        initial = _trained_tensors_of_fresh(backbone, cfg, obj)
        whole = obj.train(_base(backbone), info, DATA, cfg, run=RunFolder(root / "whole").prepare())
        with pytest.raises(Stop):
            obj.train(_base(backbone), info, DATA, cfg, run=RunFolder(root / "stopped").prepare(),
                      on_epoch=_stop_after_first_epoch)
        status = json.loads((root / "stopped" / "status.json").read_text())
        resumed = obj.train(_base(backbone), info, DATA, cfg, run=RunFolder(root / "stopped").prepare(), resume=True)
        _RUNS[key] = {"whole": whole, "resumed": resumed, "stopped_status": status, "root": root, "initial": initial}
    return _RUNS[key]


def _trained_tensors_of_fresh(backbone: str, cfg: TrainConfig, obj: Objective) -> dict[str, torch.Tensor]:
    """The trained tensors before any step: the same set-up with zero learning rates (no step moves them; buffers may)."""
    from dataclasses import replace

    zero = replace(cfg, epochs=1, lr=0.0, head_lr=0.0, momentum=0.0, weight_decay=0.0, head_weight_decay=0.0,
                   warmup_epochs=0.0)
    result = obj.train(_base(backbone), backbone_info(backbone), DATA, zero)
    return _trained_tensors(result)


@pytest.mark.parametrize("obj, method, backbone", CASES)
def test_trains(runs, obj, method, backbone) -> None:  # noqa: ANN001
    whole = runs["whole"]
    rows = _history(whole)
    assert [r["epoch"] for r in rows] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    after = _trained_tensors(whole)
    trained = {"mask": "score.", "topk": "score.", "fft": "weight.", "linear": "head."}[method]
    moved = [k for k, v in after.items() if k.startswith(trained) and not torch.equal(v, runs["initial"][k])]
    assert moved, f"training changed none of the {trained}* tensors"
    run = runs["root"] / "whole"
    config = json.loads((run / "config.json").read_text())
    assert (config["train"]["method"], config["train"]["objective"], config["backbone"]) == (method, obj.name, backbone)
    assert json.loads((run / "status.json").read_text())["status"] == "trained"
    expected = {"mask": "scores", "topk": "scores", "fft": "weights", "linear": "head"}[method]
    assert (run / f"{expected}.safetensors").is_file()


@pytest.mark.parametrize("obj, method, backbone", CASES)
def test_resume_is_bit_identical(runs, obj, method, backbone) -> None:  # noqa: ANN001
    assert runs["stopped_status"]["status"] == "interrupted" and runs["stopped_status"]["epoch"] == 1
    whole, resumed = _trained_tensors(runs["whole"]), _trained_tensors(runs["resumed"])
    assert whole.keys() == resumed.keys()
    different = [k for k in whole if not torch.equal(whole[k], resumed[k])]
    assert not different, f"resumed run differs in {different[:5]}"
    assert _history(runs["resumed"]) == _history(runs["whole"])
    lines = (runs["root"] / "stopped" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]


@pytest.mark.parametrize("obj, method, backbone", CASES)
def test_reloads_with_the_same_embeddings(runs, obj, method, backbone, tmp_path) -> None:  # noqa: ANN001
    from selfmask.training.run_folder import load_run as rebuild_run

    whole, run = runs["whole"], runs["root"] / "whole"
    expected = _embed(whole.backbone, backbone)
    model, head, _config_json = rebuild_run(run)
    assert torch.equal(_embed(model, backbone), expected)
    if whole.head is not None:  # the reloaded head classifies alike
        assert head is not None and torch.equal(head.eval()(expected), whole.head.eval()(expected))
    if method in ("mask", "topk"):
        from selfmask.storage import apply_mask, load_run, save_mask

        packed = load_run(run)
        assert torch.equal(_embed(packed.model, backbone), expected)
        save_mask(packed.model, tmp_path / "m.mask", backbone=packed.backbone, extra=packed.extra,
                  base_fingerprint=packed.base_fingerprint)
        assert torch.equal(_embed(apply_mask(_base(backbone), tmp_path / "m.mask"), backbone), expected)
