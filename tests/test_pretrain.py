"""Supervised pretraining: runs on a tiny set, lowers the loss, saves a loadable backbone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from selfmask.backbones import create_backbone
from selfmask.data.base import ImageTensorDataset
from selfmask.errors import SelfmaskError
from selfmask.masking import MaskConfig, mask_model
from selfmask.training.pretrain import pretrain_supervised, random_shift_flip, save_backbone


def easy_dataset(n: int = 96) -> ImageTensorDataset:
    """Two classes a small net can separate quickly: bright left half vs bright right half, plus noise."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    img = torch.randint(0, 80, (n, 3, 32, 32), generator=g)
    img[labels == 0, :, :, :16] += 150
    img[labels == 1, :, :, 16:] += 150
    return ImageTensorDataset(img.clamp(0, 255).to(torch.uint8), labels, ["left", "right"], "easy")


def test_lowers_loss_and_saves_loadable_backbone(tmp_path: Path) -> None:
    logs: list[str] = []
    model, history = pretrain_supervised(
        easy_dataset(), "resnet_tiny", epochs=4, batch_size=32, lr=0.05, seed=0, progress=False, log=logs.append
    )
    assert len(history) == 4 and len(logs) == 4
    assert history[-1]["loss"] < history[0]["loss"]
    assert {"epoch", "loss", "train_accuracy", "lr", "seconds", "images_per_second"} <= set(history[0])
    assert not model.training
    path = save_backbone(model, tmp_path / "bb.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["bb.safetensors"]
    loaded = create_backbone("resnet_tiny", weights=path).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_deterministic_given_seed() -> None:
    a, ha = pretrain_supervised(easy_dataset(32), epochs=1, batch_size=16, seed=3, progress=False)
    b, hb = pretrain_supervised(easy_dataset(32), epochs=1, batch_size=16, seed=3, progress=False)
    assert ha[0]["loss"] == hb[0]["loss"]
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_random_shift_is_a_shift() -> None:
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    y = random_shift_flip(x, 0, False)
    assert torch.equal(x, y)
    z = random_shift_flip(x, 2, False, torch.Generator().manual_seed(0))
    assert z.shape == x.shape
    # the centre 4x4 of the input appears somewhere in each shifted output (shift <= 2)
    for i in range(2):
        found = any(
            torch.equal(z[i, :, 2 - dy : 6 - dy, 2 - dx : 6 - dx], x[i, :, 2:6, 2:6])
            for dy in range(-2, 3)
            for dx in range(-2, 3)
        )
        assert found


def test_bad_inputs_raise(tmp_path: Path) -> None:
    ds = easy_dataset(8)
    with pytest.raises(SelfmaskError, match="epochs"):
        pretrain_supervised(ds, epochs=0, progress=False)
    with pytest.raises(SelfmaskError, match="empty"):
        pretrain_supervised(ds.subset([]), epochs=1, progress=False)
    model = create_backbone("resnet_tiny")
    with pytest.raises(SelfmaskError, match="safetensors"):
        save_backbone(model, tmp_path / "bb.pt")
    mask_model(model, MaskConfig())
    with pytest.raises(SelfmaskError, match="masks"):
        save_backbone(model, tmp_path / "bb.safetensors")
    assert not (tmp_path / "bb.safetensors").exists()


def test_self_supervised_pretraining_with_dino_moves_every_layer_and_saves(tmp_path: Path) -> None:
    from selfmask.experiments.pretrain import pretrain_ssl

    torch.manual_seed(1)
    before = create_backbone("resnet_tiny").state_dict()
    model, history = pretrain_ssl(easy_dataset(64), backbone="resnet_tiny", objective="dino", epochs=2, seed=1,
                                  progress=False)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
    after = model.state_dict()
    moved = [k for k, v in before.items() if v.is_floating_point() and not torch.equal(v, after[k])]
    assert "stem.0.weight" in moved or any(k.endswith("conv1.weight") for k in moved), moved[:5]
    path = save_backbone(model, tmp_path / "dino.safetensors")
    loaded = create_backbone("resnet_tiny", weights=path).eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(loaded(x), model.eval()(x))


def test_pretrain_names_the_objectives_it_offers(tmp_path: Path) -> None:
    from selfmask.experiments.pretrain import pretrain_objectives, run_pretrain

    assert {"supervised", "swav", "dino"} <= set(pretrain_objectives())
    with pytest.raises(SelfmaskError, match=r"--objective must be one of .*dino.*, got 'byol'"):
        run_pretrain(data="embedded", backbone="resnet_tiny", objective="byol", epochs=1,
                     out=tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
