"""Preflight: every problem found before training, each named clearly, all listed together, exit 2."""

from __future__ import annotations

import json
import os
import shutil
from collections import namedtuple

import pytest
import torch

import selfmask.training.preflight as pf
from conftest import make_stripes
from selfmask.backbones import backbone_info, build_backbone
from selfmask.cli.main import main
from selfmask.training.config import TrainConfig
from selfmask.training.preflight import PreflightError, checkpoint_bytes_estimate, preflight, run_preflight
from selfmask.training.run_folder import RunFolder
from selfmask.training.trainer import adapt

Usage = namedtuple("Usage", "total used free")


def _ok(tmp_path, **kw):
    args = {"out": tmp_path / "run", "backbone": "resnet_tiny", "weights": None, "data": "embedded-tiny",
            "train_settings": {"epochs": 1}}
    args.update(kw)
    return preflight(**args)


def test_a_good_setup_has_no_problem_and_creates_nothing(tmp_path) -> None:
    assert _ok(tmp_path) == []
    assert not (tmp_path / "run").exists()
    assert list(tmp_path.iterdir()) == []  # the write probe is gone too


def test_every_problem_is_listed_at_once_through_the_cli(tmp_path, capsys) -> None:
    (tmp_path / "taken").write_text("a file where the run folder should go")
    code = main([
        "adapt", "--data", f"folder:{tmp_path / 'no-data'}", "--weights", str(tmp_path / "missing.pt"),
        "--epochs", "0", "--backbone", "resnet_tiny", "--out", str(tmp_path / "taken"), "--no-progress",
    ])
    err = capsys.readouterr().err
    assert code == 2
    assert "4 problems found before training (nothing was started):" in err
    assert "config: epochs must be >= 1, got 0" in err
    assert f"weights file {str(tmp_path / 'missing.pt')!r} does not exist" in err
    assert f"data 'folder:{tmp_path / 'no-data'}': {str(tmp_path / 'no-data')!r} does not exist or is not a folder" in err
    assert f"run folder {str(tmp_path / 'taken')!r} exists and is not a folder" in err


def test_config_backbone_and_device_problems(tmp_path) -> None:
    problems = _ok(tmp_path, backbone="resnet_huge", train_settings={"batch_size": 0, "device": "tpu"})
    assert problems == [
        "config: batch_size must be >= 1, got 0",
        "backbone: unknown backbone 'resnet_huge'; available: " + ", ".join(
            ["efficientnet_lite0", "efficientnet_lite0_32", "efficientnet_lite0_64", "resnet18", "resnet50",
             "resnet_small", "resnet_tiny", "vit_b_32_clip", "vit_b_32_clip_gelu", "vit_tiny_clip"])
        + "; or timm:NAME, torchvision:NAME, open_clip:NAME or module.path:factory",
    ]
    problems = _ok(tmp_path, train_settings={"device": "tpu"})
    assert problems == ["config: unsupported device 'tpu'; expected cpu or cuda[:N]"]
    problems = _ok(tmp_path, train_settings={"epochz": 3})
    assert len(problems) == 1 and "epochz" in problems[0]


def test_weights_problems(tmp_path) -> None:
    good = tmp_path / "w.pt"
    torch.save(build_backbone("resnet_tiny").state_dict(), good)
    assert _ok(tmp_path, weights=good) == []
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    (tmp_path / "w.npy").write_bytes(b"x")
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "folder.pt").mkdir()
    for name, expected in [
        ("cut.pt", "is a damaged torch archive (truncated?)"),
        ("junk.safetensors", "is not a readable safetensors file (truncated or corrupted?)"),
        ("w.npy", "unsupported file type; expected one of .safetensors, .pth"),
        ("empty.pth", "is empty"),
        ("folder.pt", "is not a file"),
    ]:
        (problem,) = _ok(tmp_path, weights=tmp_path / name)
        assert problem.startswith(f"weights file {str(tmp_path / name)!r}") and expected in problem, problem


def test_data_problems(tmp_path) -> None:
    assert _ok(tmp_path, data="imagenet")[0].startswith("unknown data specification 'imagenet'")
    assert _ok(tmp_path, data="folder:") == ["data 'folder:': a path is missing after 'folder:'"]
    root = tmp_path / "imgs"
    (root / "train" / "cat").mkdir(parents=True)
    (root / "test" / "cat").mkdir(parents=True)
    (root / "test" / "cat" / "a.png").write_bytes(b"png")
    (problem,) = _ok(tmp_path, data=f"folder:{root}")
    assert problem == f"data 'folder:{root}': class folder {str(root / 'train' / 'cat')!r} holds no image file " \
        "(.jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp)"
    (problem,) = _ok(tmp_path, data=f"cifar10:{root}")
    assert "holds no CIFAR python batches" in problem
    (root / "batches.meta").write_bytes(b"")
    problems = _ok(tmp_path, data=f"cifar10:{root}")
    assert len(problems) == 6 and all("CIFAR file" in p and "does not exist" in p for p in problems)
    assert _ok(tmp_path, data=f"split:{root / 's.json'}:{root}") == [
        f"data 'split:{root / 's.json'}:{root}': split file {str(root / 's.json')!r} does not exist"
    ]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_folder(tmp_path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    (problem,) = _ok(tmp_path, out=locked / "run")
    assert problem == f"run folder {str(locked / 'run')!r} is not writable (no write permission on {str(locked)!r})"


def test_run_folder_under_a_file_and_finished_runs(tmp_path) -> None:
    (tmp_path / "f").write_text("")
    (problem,) = _ok(tmp_path, out=tmp_path / "f" / "run")
    assert "is not a folder, so the run folder cannot be created" in problem
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".selfmask-run").touch()  # a run folder (selfmask.training.ownership)
    (tmp_path / "run" / "status.json").write_text(json.dumps({"status": "finished"}))
    (problem,) = _ok(tmp_path)
    assert problem.endswith("already holds a finished run (finished); pass --overwrite to replace it or choose another --out")
    assert _ok(tmp_path, overwrite=True) == []
    assert _ok(tmp_path, resume=True)[0].endswith("nothing to resume")


def test_not_enough_disk_names_folder_free_and_needed(tmp_path, monkeypatch, capsys) -> None:
    need = checkpoint_bytes_estimate("resnet_tiny", "mask").needed_bytes
    monkeypatch.setattr(pf.shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 1000, 1000))
    (problem,) = _ok(tmp_path)
    assert problem.startswith(
        f"not enough free disk space for checkpoints in {str(tmp_path)!r}: 1000 bytes (0.0 MiB) free, {need} bytes"
    )
    with pytest.raises(PreflightError, match="1 problem found before training"):
        run_preflight(out=tmp_path / "run", backbone="resnet_tiny", weights=None, data="embedded-tiny",
                      train_settings={})
    code = main(["adapt", "--data", "embedded-tiny", "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 2 and "not enough free disk space" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was created
    monkeypatch.setattr(pf.shutil, "disk_usage", lambda p: Usage(10**12, 0, need))
    assert _ok(tmp_path) == []


def test_estimate_bounds_a_real_checkpoint(tmp_path) -> None:
    """The estimate of one checkpoint (model + optimiser) is above the real file, and not wildly so."""
    info = backbone_info("resnet_tiny")
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=1, batch_size=8, seed=0)
    adapt(build_backbone("resnet_tiny"), info, make_stripes(16, seed=0), cfg,
          run=RunFolder(tmp_path / "run").prepare(), progress=False)
    real = (tmp_path / "run" / "checkpoint.pt").stat().st_size
    est = checkpoint_bytes_estimate("resnet_tiny", "mask", num_classes=2)
    assert real <= est.model_bytes + est.optimizer_bytes <= 1.2 * real
    for method in ("fft", "linear"):
        e = checkpoint_bytes_estimate("resnet_tiny", method)
        assert e.needed_bytes < est.needed_bytes + 4 * 1000 * 64


def test_free_space_is_read_where_the_folder_will_be(tmp_path, monkeypatch) -> None:
    seen = []
    real = shutil.disk_usage
    monkeypatch.setattr(pf.shutil, "disk_usage", lambda p: seen.append(str(p)) or real(p))
    assert _ok(tmp_path, out=tmp_path / "a" / "b" / "c") == []
    assert seen == [str(tmp_path)]
