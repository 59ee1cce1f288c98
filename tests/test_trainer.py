"""The one training loop: methods learn, run folders stay consistent, bad settings are refused."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_stripes
from selfmask.backbones import backbone_info, build_backbone
from selfmask.errors import SelfmaskError
from selfmask.masking import current_masks, mask_scores
from selfmask.training.config import TrainConfig
from selfmask.training.run_folder import RunFolder, load_run
from selfmask.training.trainer import TrainingDiverged, adapt, classify

INFO = backbone_info("resnet_tiny")


def _backbone(seed: int = 0):
    torch.manual_seed(seed)
    return build_backbone("resnet_tiny")


@pytest.mark.parametrize("method", ["mask", "topk", "fft"])
def test_methods_learn_stripes(method, stripes_train, stripes_test) -> None:
    cfg = TrainConfig(method=method, epochs=4, lr=0.05 if method == "fft" else None)
    result = adapt(_backbone(), INFO, stripes_train, cfg, progress=False)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    acc = classify(result.backbone, result.head, stripes_test, INFO)
    assert acc > 0.75, (method, acc)
    if method != "fft":
        masks = current_masks(result.backbone)
        assert any(not bool(m.all()) for m in masks.values())  # the masks moved


def test_run_folder_contents_and_reload(tmp_path, stripes_train, stripes_test) -> None:
    run = RunFolder(tmp_path / "run").prepare()
    result = adapt(_backbone(), INFO, stripes_train, TrainConfig(epochs=2), run=run, progress=False,
                   run_meta={"weights": None})
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.json", "status.json", "metrics.jsonl", "log.txt", "scores.safetensors", "head.safetensors"} <= files
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["backbone"] == "resnet_tiny" and cfg["mask"]["targets"] == "resnet" and cfg["train"]["resolved_lr"] == 50.0
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "trained"
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    backbone, head, _ = load_run(tmp_path / "run")
    x = stripes_test.images[:16]
    from selfmask.data.base import normalize_batch

    xn = normalize_batch(x, INFO.mean, INFO.std)
    result.backbone.eval(), result.head.eval(), backbone.eval(), head.eval()
    assert torch.equal(head(backbone(xn)), result.head(result.backbone(xn)))
    # a finished (trained) run is not overwritten without asking
    with pytest.raises(SelfmaskError, match="already holds a finished run"):
        RunFolder(tmp_path / "run").prepare()
    RunFolder(tmp_path / "run", overwrite=True).prepare()
    assert not (tmp_path / "run" / "scores.safetensors").exists()


def test_same_seed_same_masks(stripes_train) -> None:
    a = adapt(_backbone(), INFO, stripes_train, TrainConfig(epochs=1, seed=3), progress=False)
    b = adapt(_backbone(), INFO, stripes_train, TrainConfig(epochs=1, seed=3), progress=False)
    for k, s in mask_scores(a.backbone).items():
        assert torch.equal(s, mask_scores(b.backbone)[k])


def test_nan_loss_stops_with_step(tmp_path, stripes_train) -> None:
    run = RunFolder(tmp_path / "run").prepare()
    cfg = TrainConfig(method="fft", epochs=3, lr=1e30, head_lr=1e30)
    with pytest.raises(TrainingDiverged, match=r"at step \d+"):
        adapt(_backbone(), INFO, stripes_train, cfg, run=run, progress=False)
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "failed"


def test_interrupt_leaves_consistent_folder(tmp_path, stripes_train) -> None:
    run = RunFolder(tmp_path / "run").prepare()

    def stop(_row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        adapt(_backbone(), INFO, stripes_train, TrainConfig(epochs=3), run=run, progress=False, on_epoch=stop)
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "interrupted" and status["epoch"] == 1
    json.loads((tmp_path / "run" / "config.json").read_text())
    assert not list((tmp_path / "run").glob(".*.tmp"))
    RunFolder(tmp_path / "run").prepare()  # an interrupted run may be replaced without --overwrite


def test_unwritable_run_folder_detected_before_training(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SelfmaskError, match="not writable|not a folder"):
        RunFolder(blocker / "run").prepare()
    with pytest.raises(SelfmaskError, match="not a folder"):
        RunFolder(blocker).prepare()
    assert blocker.read_text() == "x"


def test_linear_method_keeps_backbone_frozen(stripes_train) -> None:
    bb = _backbone()
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    adapt(bb, INFO, stripes_train, TrainConfig(method="linear", epochs=1), progress=False)
    for k, v in bb.state_dict().items():
        assert torch.equal(v, before[k]), k  # eval-mode BN: not even running stats move


def test_masked_random_head(stripes_train) -> None:
    r = adapt(_backbone(), INFO, stripes_train, TrainConfig(epochs=1, head="masked-random"), progress=False)
    assert "weight" in mask_scores(r.head)
    assert not r.head.parametrizations.weight.original.requires_grad


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "adam"}, "unknown method"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"label_fraction": 0.0}, r"label fraction must be in \(0, 1\]"),
        ({"label_fraction": 1.5}, r"label fraction must be in \(0, 1\]"),
        ({"keep_ratio": 0.0}, "keep_ratio"),
        ({"lr": float("nan")}, "lr must be"),
        ({"head": "mlp"}, "unknown head"),
    ],
)
def test_bad_train_config(kwargs, match) -> None:
    with pytest.raises(SelfmaskError, match=match):
        TrainConfig(**kwargs)


def test_cuda_refused_when_absent(stripes_train) -> None:
    if torch.cuda.is_available():
        pytest.skip("machine has CUDA")
    with pytest.raises(SelfmaskError, match="CUDA is not available"):
        adapt(_backbone(), INFO, stripes_train, TrainConfig(device="cuda"), progress=False)


def test_tiny_training_set_refused() -> None:
    one = make_stripes(1, seed=0)
    with pytest.raises(SelfmaskError, match="at least 2"):
        adapt(_backbone(), INFO, one, TrainConfig(), progress=False)
