"""``selfmask bench --suite gpu``: the smoke run in CI, bad input, the authors' baseline and the parity check."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from selfmask.backbones import build_backbone
from selfmask.bench import suite
from selfmask.bench.authors import authors_mask_model, authors_scores
from selfmask.cli import main
from selfmask.cli.bench import GPU_SECTIONS
from selfmask.masking import MaskConfig, mask_model, mask_scores

SRC = Path(__file__).resolve().parents[1] / "src"


def test_smoke_suite_prints_and_writes_every_section(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "suite"
    res = subprocess.run([sys.executable, "-m", "selfmask", "bench", "--suite", "gpu", "--smoke", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    printed = {line.split("]")[0][1:] for line in res.stdout.splitlines() if line.startswith("[")}
    assert printed == set(suite.SECTIONS)
    result = json.loads((out / "suite.json").read_text())
    assert result["sections"] == list(suite.SECTIONS) and result["smoke"] is True
    for name in suite.SECTIONS:
        sec = result[name]
        assert "error" not in sec and sec["rows"] and not any("error" in r for r in sec["rows"]), name
    measured = [r for r in result["step"]["rows"] if "skipped" not in r]
    assert measured and all(r["step_s_fft"] > 0 and r["selfmask_over_fft"] > 0 for r in measured)
    for r in result["parity"]["rows"]:  # a missing library is a row with the reason, never a silent gap
        assert "skipped" in r or r["relative_error"] < 1e-4
    assert result["swav"]["rows"][0]["selfmask_images_per_s"] > 0
    md = (out / "suite.md").read_text()
    assert all(f"## {name} " in md for name in suite.SECTIONS)


def test_a_spent_cap_skips_the_rest_with_the_reason_and_the_suite_goes_on(tmp_path) -> None:
    sizes = dataclasses.replace(suite.SMOKE, caps={**suite.SMOKE.caps, "step": 0.0})
    lines: list[str] = []
    result = suite.run_suite(sizes, "cpu", ["step", "knn"], out=tmp_path, echo=lines.append)
    assert len(result["step"]["rows"]) == 5
    assert all("time cap (0 s) reached" in r["skipped"] for r in result["step"]["rows"])
    assert result["knn"]["rows"][0]["queries_per_s"] > 0 and len(lines) == 6
    assert json.loads((tmp_path / "suite.json").read_text())["sections"] == ["step", "knn"]


def test_cli_and_suite_agree_on_sections() -> None:
    assert GPU_SECTIONS == suite.SECTIONS


@pytest.mark.parametrize(
    "argv, message",
    [(["--only", "nosuch"], "--only: unknown gpu section(s) 'nosuch'"),
     (["--threads", "0"], "--threads must be >= 1, got 0"),
     (["--suite", "tpu"], "--suite must be cpu or gpu, got 'tpu'")],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path) -> None:
    assert main(["bench", "--suite", "gpu", "--smoke", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not any(tmp_path.iterdir())


def test_cuda_without_a_gpu_is_one_line(capsys, tmp_path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["bench", "--suite", "gpu", "--out", str(tmp_path)]) == 2  # the full suite defaults to cuda
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torch.cuda.is_available() is False" in err[0] and "--smoke" in err[0]


@pytest.mark.parametrize("backbone, preset", [("resnet_tiny", "resnet"), ("vit_tiny_clip", "vit")])
def test_authors_baseline_computes_our_masked_weights_and_gradients(backbone, preset) -> None:
    # float64: the score gradient is a difference of two close terms, which float32 rounding blurs
    torch.manual_seed(0)
    ours, theirs = build_backbone(backbone).double(), build_backbone(backbone).double()
    theirs.load_state_dict(ours.state_dict())
    config = MaskConfig.preset(preset)  # the ViT's fused q/k/v: one alpha per part on both sides
    mask_model(ours, config)
    authors_mask_model(theirs, config)
    g = torch.Generator().manual_seed(1)
    our_scores, their_scores = mask_scores(ours), authors_scores(theirs)
    assert list(our_scores) == list(their_scores)
    with torch.no_grad():
        for name, a in our_scores.items():
            s = torch.randn(a.shape, generator=g) + 0.5  # about 30 % of the entries masked
            a.copy_(s)
            their_scores[name].copy_(s)
    x = torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64)
    ours.train(), theirs.train()
    y1, y2 = ours(x), theirs(x)
    torch.testing.assert_close(y1, y2, rtol=1e-10, atol=1e-10)
    (y1 ** 2).sum().backward()
    (y2 ** 2).sum().backward()
    for name, a in our_scores.items():
        b = their_scores[name]
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-8 * float(b.grad.abs().max()))


def test_parity_row_loads_through_our_loader_and_measures_the_error() -> None:
    torch.manual_seed(0)
    ref = build_backbone("resnet_tiny")
    ref.fc = nn.Linear(128, 10)  # a torchvision-style classifier head: dropped by our loader, with a note
    x = torch.randn(2, 3, 32, 32)
    row = suite.parity_row("resnet_tiny", ref, lambda m, t: m(t), x, "test")
    assert row["relative_error"] == 0.0 and row["dropped"] == ["classification head"]
    noisy = suite.parity_row("resnet_tiny", ref, lambda m, t: m(t) * 1.01, x, "test")
    assert noisy["relative_error"] == pytest.approx(0.01 / 1.01, rel=1e-5)  # float32 rounding of the 1.01


def test_parity_row_maps_a_timm_layout_vit_onto_ours() -> None:
    from test_checkpoints import _to_timm

    class TimmLayout(nn.Module):  # a reference whose state dict has timm's ViT names
        def __init__(self) -> None:
            super().__init__()
            self.inner = build_backbone("vit_tiny_clip", "projected")

        def state_dict(self, *args, **kwargs):  # type: ignore[override]
            return _to_timm({k: v for k, v in self.inner.state_dict().items()})

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    torch.manual_seed(0)
    row = suite.parity_row("vit_tiny_clip", TimmLayout(), lambda m, t: m(t), torch.randn(2, 3, 32, 32), "test",
                           "projected")
    assert row["relative_error"] == 0.0 and row["shape"] == [2, 128]
