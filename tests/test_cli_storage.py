"""``selfmask pack / inspect / apply / compress-report`` on a run folder this test writes itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from selfmask.backbones import build_backbone
from selfmask.cli.main import main
from selfmask.masking import MaskConfig, current_masks, mask_scores
from selfmask.storage import load_mask, load_run


def write_run(run_dir: Path, *, seed: int = 3, weights: str | None = None, head: bool = True) -> Path:
    """A run folder in the trainer's layout: config.json, scores.safetensors, head.safetensors."""
    run_dir.mkdir()
    config = MaskConfig.preset("resnet")
    (run_dir / "config.json").write_text(
        json.dumps({"backbone": "resnet_tiny", "weights": weights, "seed": seed, "mask": config.to_dict()})
    )
    torch.manual_seed(0)
    from selfmask.masking import mask_model

    shapes = mask_scores(mask_model(build_backbone("resnet_tiny"), config))
    g = torch.Generator().manual_seed(11)
    scores = {name: torch.rand(p.shape, generator=g) - 0.08 for name, p in shapes.items()}
    save_file(scores, str(run_dir / "scores.safetensors"))
    if head:
        save_file({"weight": torch.randn(10, 128), "bias": torch.randn(10)}, str(run_dir / "head.safetensors"))
    return run_dir


def test_pack_inspect_apply_round_trip(tmp_path, capsys) -> None:
    run_dir = write_run(tmp_path / "run")
    out = tmp_path / "task.mask"
    assert main(["pack", str(run_dir), "-o", str(out)]) == 0
    rebuilt = load_run(run_dir)
    mf = load_mask(out)
    assert all(torch.equal(mf.masks[n], m) for n, m in current_masks(rebuilt.model).items())
    assert set(mf.extra) == {"head.weight", "head.bias"}
    assert mf.source["seed"] == 3
    capsys.readouterr()

    assert main(["inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["backbone"] == "resnet_tiny" and summary["fingerprint"] == mf.fingerprint
    assert summary["masked_weights"] == sum(m.numel() for m in mf.masks.values())
    assert summary["ratio_to_fp32"] == pytest.approx(2 * summary["ratio_to_fp16"])
    assert main(["inspect", str(out)]) == 0
    assert "bits per masked weight" in capsys.readouterr().out

    merged = tmp_path / "merged.safetensors"
    assert main(["apply", str(out), "--backbone", "resnet_tiny", "-o", str(merged)]) == 0  # seed from the file
    fresh = build_backbone("resnet_tiny")
    fresh.load_state_dict(load_file(str(merged)), strict=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fresh.eval()(x), rebuilt.model.eval()(x))


def test_pack_and_apply_with_weights_file(tmp_path) -> None:
    torch.manual_seed(42)
    base = build_backbone("resnet_tiny")
    save_file(dict(base.state_dict()), str(tmp_path / "base.safetensors"))
    run_dir = write_run(tmp_path / "run", weights=str(tmp_path / "base.safetensors"), head=False)
    out = tmp_path / "t.mask"
    assert main(["pack", str(run_dir), "-o", str(out)]) == 0
    merged = tmp_path / "m.safetensors"
    args = ["apply", str(out), "--backbone", "resnet_tiny", "--weights", str(tmp_path / "base.safetensors")]
    assert main([*args, "-o", str(merged)]) == 0
    fresh = build_backbone("resnet_tiny")
    fresh.load_state_dict(load_file(str(merged)))
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(fresh.eval()(x), load_run(run_dir).model.eval()(x))


def test_compress_report(tmp_path, capsys) -> None:
    run_dir = write_run(tmp_path / "run")
    out = tmp_path / "t.mask"
    assert main(["pack", str(run_dir), "-o", str(out)]) == 0
    torch.manual_seed(1)
    save_file(dict(build_backbone("resnet_tiny").state_dict()), str(tmp_path / "ft.safetensors"))
    capsys.readouterr()
    assert main(["compress-report", str(out), "--finetuned", str(tmp_path / "ft.safetensors"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["columns"]) == {"packed_bits", "byte_per_mask", "finetuned_fp32"}
    names = {"gzip-9", "bz2-9", "lzma-9", "lz4-max", "snappy", "zstd-19"}
    assert set(report["columns"]["packed_bits"]["compressors"]) == names
    ours = report["ours"]["mask_bytes"]
    assert ours == report["ours"]["file_bytes"] - 4 * (10 * 128 + 10)  # the head is not counted
    for column in ("packed_bits", "byte_per_mask"):
        for row in report["columns"][column]["compressors"].values():
            assert row["bytes"] > report["ours"]["payload_bytes"]
    assert report["ours"]["x_smaller_than_fp32"] == pytest.approx(report["fp32_bytes"] / ours)
    assert main(["compress-report", str(out)]) == 0
    assert "zstd-19" in capsys.readouterr().out


def test_cli_bad_inputs_exit_2_and_touch_nothing(tmp_path, capsys) -> None:
    run_dir = write_run(tmp_path / "run")
    out = tmp_path / "t.mask"
    assert main(["pack", str(run_dir), "-o", str(out)]) == 0
    good = out.read_bytes()

    assert main(["pack", str(run_dir), "-o", str(out)]) == 2  # exists
    assert "exists" in capsys.readouterr().err
    assert out.read_bytes() == good
    assert main(["pack", str(run_dir), "-o", str(out), "--overwrite"]) == 0

    truncated = tmp_path / "trunc.mask"
    truncated.write_bytes(good[: len(good) // 2])
    assert main(["inspect", str(truncated)]) == 2
    assert "truncated" in capsys.readouterr().err

    flipped = tmp_path / "flip.mask"
    flipped.write_bytes(good[:-10] + bytes([good[-10] ^ 0x10]) + good[-9:])
    assert main(["inspect", str(flipped)]) == 2
    assert "checksum" in capsys.readouterr().err

    merged = tmp_path / "merged.safetensors"
    merged.write_bytes(b"keep me")
    assert main(["apply", str(out), "--backbone", "resnet_tiny", "-o", str(merged)]) == 2
    assert "exists" in capsys.readouterr().err and merged.read_bytes() == b"keep me"

    wrong = ["apply", str(out), "--backbone", "resnet_tiny", "--seed", "9", "-o", str(tmp_path / "w.safetensors")]
    assert main(wrong) == 2
    assert "fingerprint" in capsys.readouterr().err and not (tmp_path / "w.safetensors").exists()
    assert main([*wrong, "--force"]) == 0
    assert "warning" in capsys.readouterr().out

    other = ["apply", str(out), "--backbone", "resnet_small", "--force", "-o", str(tmp_path / "x.safetensors")]
    assert main(other) == 2
    err = capsys.readouterr().err
    assert "do not match" in err or "shape" in err

    assert main(["pack", str(tmp_path / "nowhere"), "-o", str(tmp_path / "n.mask")]) == 2
    assert "config.json" in capsys.readouterr().err
    (run_dir / "scores.safetensors").write_bytes(b"garbage")
    assert main(["pack", str(run_dir), "-o", str(tmp_path / "g.mask")]) == 2
    assert "scores.safetensors" in capsys.readouterr().err
