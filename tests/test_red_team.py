"""Regression tests for the red-team cases of issue 16: nothing lost, nothing silently wrong.

Each test names the case it guards; each failed before its fix. The runs are real
``selfmask`` commands (in-process through ``selfmask.cli.main.main``, or subprocesses
for signals) on a small image folder written here, resnet_tiny, one short epoch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli_resume import write_image_folder

from selfmask.backbones import build_backbone
from selfmask.cli.main import main
from selfmask.storage import load_mask, load_run, save_mask


def adapt_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["adapt", "--data", f"folder:{data}", "--epochs", "1", "--batch-size", "8", "--cache-dir",
            str(data.parent / "cache"), "--no-progress", "--no-eval", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("red_team") / "data", n_train=16, n_test=8)


@pytest.fixture(scope="module")
def bn_train_run(data) -> Path:
    """A finished default run (``--bn train``: the BatchNorm statistics change), with base weights on disk."""
    weights = data.parent / "base.pt"
    torch.manual_seed(5)
    torch.save(build_backbone("resnet_tiny").state_dict(), weights)
    run = data.parent / "bn-train-run"
    assert main(adapt_args(data, run, "--weights", str(weights))) == 0
    assert (run / "buffers.safetensors").is_file()
    return run


def _masked_outputs(run: Path, x: torch.Tensor) -> torch.Tensor:
    from selfmask.training.run_folder import load_run as rebuild

    model, _head, _cfg = rebuild(run)
    return model.eval()(x)


# ---------------------------------------------------------------------------- mask files and fingerprints


def test_pack_then_apply_on_a_default_bn_train_run_reproduces_the_masked_model(bn_train_run, tmp_path) -> None:
    """Case: ``pack`` then ``apply`` on a default (``--bn train``) run was refused (fingerprint of trained buffers)."""
    weights = json.loads((bn_train_run / "config.json").read_text())["weights"]
    mask = tmp_path / "t.mask"
    assert main(["pack", str(bn_train_run), "-o", str(mask)]) == 0
    mf = load_mask(mask)
    assert any(k.startswith("buffer.") for k in mf.extra)  # the trained statistics travel with the masks
    merged = tmp_path / "m.safetensors"
    assert main(["apply", str(mask), "--backbone", "resnet_tiny", "--weights", weights, "-o", str(merged)]) == 0
    assert mf.fingerprint == load_run(bn_train_run).base_fingerprint
    plain = build_backbone("resnet_tiny")
    plain.load_state_dict(load_file(str(merged)), strict=True)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), _masked_outputs(bn_train_run, x), atol=1e-6, rtol=0)


def test_old_mask_file_with_buffer_fingerprint_still_applies_with_a_note(bn_train_run, tmp_path, capsys) -> None:
    """Files written by the old code (fingerprint taken with the trained buffers) apply, with a note."""
    weights = json.loads((bn_train_run / "config.json").read_text())["weights"]
    rebuilt = load_run(bn_train_run)
    old = tmp_path / "old.mask"
    save_mask(rebuilt.model, old, backbone=rebuilt.backbone, extra=rebuilt.extra, source=rebuilt.source)  # old way
    assert load_mask(old).fingerprint != rebuilt.base_fingerprint
    merged = tmp_path / "m.safetensors"
    capsys.readouterr()
    assert main(["apply", str(old), "--backbone", "resnet_tiny", "--weights", weights, "-o", str(merged)]) == 0
    assert "older selfmask" in capsys.readouterr().out
    plain = build_backbone("resnet_tiny")
    plain.load_state_dict(load_file(str(merged)))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), _masked_outputs(bn_train_run, x), atol=1e-6, rtol=0)
    # other base weights are still refused: the buffers do not explain that difference
    other = tmp_path / "other.pt"
    torch.manual_seed(6)
    torch.save(build_backbone("resnet_tiny").state_dict(), other)
    assert main(["apply", str(old), "--backbone", "resnet_tiny", "--weights", str(other), "-o",
                 str(tmp_path / "x.safetensors")]) == 2
    assert not (tmp_path / "x.safetensors").exists()
    shutil.rmtree(tmp_path, ignore_errors=True)
