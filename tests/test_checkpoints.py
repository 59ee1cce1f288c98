"""Loading backbone checkpoints from local files: every supported layout, every bad input."""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from selfmask.backbones import (
    backbone_fingerprint,
    build_backbone,
    create_backbone,
    load_state_dict_file,
)
from selfmask.errors import SelfmaskError
from selfmask.fingerprint import model_fingerprint
from selfmask.masking import MaskConfig, mask_model

State = dict[str, torch.Tensor]


class NotATensor:
    """A Python object a weights-only loader must refuse."""

    def __init__(self) -> None:
        self.payload = "anything"


def _random_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = build_backbone(name)
    with torch.no_grad():
        for k, t in m.state_dict().items():
            if k.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif t.is_floating_point():
                t.add_(0.05 * torch.randn_like(t))
    return m.eval()


def _inputs() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _out(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m.eval()(x)


def _state(m: nn.Module) -> State:
    return {k: v.clone() for k, v in m.state_dict().items()}


def _to_timm(sd: State) -> State:
    """OpenAI CLIP names -> timm ``VisionTransformer`` names, written out independently of the loader."""
    out: State = {}
    for k, v in sd.items():
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", k)
        if m:
            rest = (
                m.group(2)
                .replace("ln_1.", "norm1.")
                .replace("ln_2.", "norm2.")
                .replace("attn.in_proj_weight", "attn.qkv.weight")
                .replace("attn.in_proj_bias", "attn.qkv.bias")
                .replace("attn.out_proj.", "attn.proj.")
                .replace("mlp.c_fc.", "mlp.fc1.")
                .replace("mlp.c_proj.", "mlp.fc2.")
            )
            out[f"blocks.{m.group(1)}.{rest}"] = v
        elif k == "class_embedding":
            out["cls_token"] = v.reshape(1, 1, -1)
        elif k == "positional_embedding":
            out["pos_embed"] = v.unsqueeze(0)
        elif k == "proj":
            out["head.weight"] = v.t().contiguous()
            out["head.bias"] = torch.zeros(v.shape[1])
        else:
            out[
                k.replace("conv1.", "patch_embed.proj.").replace("ln_pre.", "norm_pre.").replace("ln_post.", "norm.")
            ] = v
    return out


def _open_clip_full(sd: State) -> State:
    """A full CLIP checkpoint: ``visual.*`` plus a text tower whose names collide with the visual ones."""
    full = {f"visual.{k}": v for k, v in sd.items()}
    full.update(
        {
            "positional_embedding": torch.randn(77, 64),
            "transformer.resblocks.0.attn.in_proj_weight": torch.randn(192, 64),
            "token_embedding.weight": torch.randn(100, 64),
            "ln_final.weight": torch.ones(64),
            "text_projection": torch.randn(64, 128),
            "logit_scale": torch.tensor(4.6),
        }
    )
    return full


# layout name -> (backbone, how the file's content is made from the model's state dict, file suffix, dropped keys)
LAYOUTS: dict[str, tuple[str, Callable[[State], object], str, int]] = {
    "plain_pth": ("resnet_tiny", lambda sd: sd, ".pth", 0),
    "plain_safetensors": ("resnet_tiny", lambda sd: sd, ".safetensors", 0),
    "torchvision_with_fc": (
        "resnet_tiny",
        lambda sd: {**sd, "fc.weight": torch.randn(10, 128), "fc.bias": torch.randn(10)},
        ".pth",
        2,
    ),
    "training_ckpt_state_dict_module": (
        "resnet_tiny",
        lambda sd: {"epoch": 7, "arch": "resnet", "state_dict": {f"module.{k}": v for k, v in sd.items()}},
        ".pth.tar",
        0,
    ),
    "model_container": ("resnet_tiny", lambda sd: {"model": sd, "optimizer": {"lr": 0.1}}, ".pt", 0),
    "swav": (
        "resnet_tiny",
        lambda sd: {
            f"module.{k}": v
            for k, v in {
                **sd,
                "projection_head.0.weight": torch.randn(32, 128),
                "projection_head.0.bias": torch.randn(32),
                "prototypes.weight": torch.randn(50, 32),
            }.items()
        },
        ".pth.tar",
        3,
    ),
    "dino_teacher": (
        "resnet_tiny",
        lambda sd: {
            "teacher": {
                **{f"backbone.{k}": v for k, v in sd.items()},
                "head.mlp.0.weight": torch.randn(16, 128),
                "head.last_layer.weight_g": torch.randn(100, 1),
            },
            "epoch": 100,
            "args": argparse.Namespace(arch="resnet50", lr=0.3, out_dim=65536),  # as DINO's full checkpoints
        },
        ".pth",
        2,
    ),
    "old_torchvision_no_bn_counter": (
        "resnet_tiny",
        lambda sd: {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")},
        ".pth",
        0,
    ),
    "openai_clip_visual": ("vit_tiny_clip", lambda sd: sd, ".pt", 0),
    "openai_clip_fp16": ("vit_tiny_clip", lambda sd: {k: v.half() for k, v in sd.items()}, ".pt", 0),
    "open_clip_full": ("vit_tiny_clip", _open_clip_full, ".bin", 6),
    "open_clip_visual_prefixed_safetensors": (
        "vit_tiny_clip",
        lambda sd: {f"visual.{k}": v for k, v in sd.items()},
        ".safetensors",
        0,
    ),
    "timm_vit_safetensors": ("vit_tiny_clip", _to_timm, ".safetensors", 0),
    "timm_vit_wrapped": ("vit_tiny_clip", lambda sd: {"state_dict": _to_timm(sd)}, ".pth", 0),
}


def _save(obj: object, path: Path) -> None:
    if path.name.endswith(".safetensors"):
        assert isinstance(obj, dict)
        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_supported_layout_loads_and_keeps_the_forward_pass(layout: str, tmp_path: Path) -> None:
    name, make, suffix, n_dropped = LAYOUTS[layout]
    ref = _random_model(name)
    state = _state(ref)
    path = tmp_path / f"ckpt{suffix}"
    _save(make(state), path)

    loaded = create_backbone(name, weights=path)
    x = _inputs()
    expected = _out(ref, x)
    got = _out(loaded, x)
    if layout == "openai_clip_fp16":
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-3)
    else:
        assert torch.equal(got, expected)
        assert backbone_fingerprint(loaded) == model_fingerprint(ref)
    report = loaded.weights_report
    assert sum(len(v) for v in report.dropped.values()) == n_dropped
    assert report.fingerprint == backbone_fingerprint(loaded)
    assert (report.layout == "timm") == layout.startswith("timm")


def test_dropped_heads_are_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    name, make, suffix, _ = LAYOUTS["swav"]
    path = tmp_path / f"swav{suffix}"
    _save(make(_state(_random_model(name))), path)
    with caplog.at_level(logging.INFO, logger="selfmask.backbones.loading"):
        create_backbone(name, weights=path)
    text = caplog.text
    assert "prototypes.weight" in text and "projection_head.0.weight" in text and str(path) in text


def test_fingerprint_identifies_the_weights_and_survives_masking(tmp_path: Path) -> None:
    a, b = _random_model("resnet_tiny", 0), _random_model("resnet_tiny", 1)
    assert backbone_fingerprint(a) != backbone_fingerprint(b)
    fp = backbone_fingerprint(a)
    assert len(fp) == 64 and int(fp, 16) >= 0
    mask_model(a, MaskConfig.preset("resnet"))
    assert backbone_fingerprint(a) == fp


def test_load_state_dict_file_unwraps_containers(tmp_path: Path) -> None:
    sd = _state(_random_model("resnet_tiny"))
    path = tmp_path / "c.pth"
    torch.save({"state_dict": sd, "epoch": 1}, path)
    got = load_state_dict_file(path)
    assert set(got) == set(sd)


# --- bad inputs: a clear SelfmaskError naming the file (and the key) --------------------------------


def _good_file(tmp_path: Path, name: str = "resnet_tiny", suffix: str = ".pth") -> Path:
    path = tmp_path / f"good{suffix}"
    _save(_state(_random_model(name)), path)
    return path


def test_missing_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.pth"
    with pytest.raises(SelfmaskError, match=re.escape(str(path)) + ".*does not exist"):
        create_backbone("resnet_tiny", weights=path)


def test_directory_and_unsupported_suffix(tmp_path: Path) -> None:
    d = tmp_path / "dir.pth"
    d.mkdir()
    with pytest.raises(SelfmaskError, match="is not a file"):
        create_backbone("resnet_tiny", weights=d)
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"x")
    with pytest.raises(SelfmaskError, match=re.escape(str(odd)) + ".*unsupported file type"):
        create_backbone("resnet_tiny", weights=odd)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_truncated_or_corrupted_file(tmp_path: Path, suffix: str, damage: str) -> None:
    path = _good_file(tmp_path, suffix=suffix)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"\x00\x17not a checkpoint" * 50)
    with pytest.raises(SelfmaskError, match=re.escape(str(path))):
        create_backbone("resnet_tiny", weights=path)


def test_truncated_legacy_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pth"
    torch.save(_state(_random_model("resnet_tiny")), path, _use_new_zipfile_serialization=False)
    assert create_backbone("resnet_tiny", weights=path) is not None
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(SelfmaskError, match=re.escape(str(path)) + ".*truncated or corrupted"):
        create_backbone("resnet_tiny", weights=path)


def test_pickled_python_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "extra": NotATensor()}, path)
    with pytest.raises(SelfmaskError, match=re.escape(str(path)) + ".*not unpickled.*NotATensor"):
        create_backbone("resnet_tiny", weights=path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive_is_refused_with_a_recipe(tmp_path: Path) -> None:
    path = tmp_path / "ViT-B-32.pt"
    torch.jit.script(nn.Linear(2, 2)).save(str(path))
    with pytest.raises(SelfmaskError, match=re.escape(str(path)) + ".*TorchScript.*save_file"):
        create_backbone("vit_tiny_clip", weights=path)


def test_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "t.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(SelfmaskError, match=re.escape(str(path)) + ".*expected a state dict"):
        create_backbone("resnet_tiny", weights=path)
    torch.save({"epoch": 3, "note": "no weights"}, path)
    with pytest.raises(SelfmaskError, match=re.escape(str(path)) + ".*no tensors found"):
        create_backbone("resnet_tiny", weights=path)


def test_wrong_architecture_names_the_key_and_both_shapes(tmp_path: Path) -> None:
    path = _good_file(tmp_path, "resnet_small")  # widths 32-256 vs resnet_tiny's 16-128
    with pytest.raises(SelfmaskError) as err:
        create_backbone("resnet_tiny", weights=path)
    msg = str(err.value)
    assert str(path) in msg and "resnet_tiny" in msg
    assert "conv1.weight: checkpoint (32, 3, 3, 3) vs model (16, 3, 3, 3)" in msg
    assert "unexpected key(s): layer1.1.conv1.weight" in msg


def test_resnet50_checkpoint_into_resnet18_is_refused(tmp_path: Path) -> None:
    fixture = json.loads((Path(__file__).parent / "fixtures" / "layouts" / "torchvision_resnet50.json").read_text())
    state = {k: torch.zeros(s) for k, s in fixture["state_dict"]}  # a torchvision ResNet-50 file
    path = tmp_path / "r50.safetensors"
    save_file(state, str(path))
    with pytest.raises(SelfmaskError, match=re.escape(str(path)) + ".*resnet18.*shape mismatch"):
        create_backbone("resnet18", weights=path)


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path) -> None:
    sd = _state(_random_model("resnet_tiny"))
    del sd["layer2.0.conv1.weight"]
    sd["layer9.weird"] = torch.zeros(2)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(
        SelfmaskError,
        match=r"1 missing key\(s\): layer2\.0\.conv1\.weight.*1 unexpected key\(s\): "
        r"layer9\.weird",
    ):
        create_backbone("resnet_tiny", weights=path)


def test_timm_classifier_head_is_not_taken_for_the_clip_projection(tmp_path: Path) -> None:
    sd = _to_timm(_state(_random_model("vit_tiny_clip")))
    sd["head.bias"] = torch.randn(sd["head.bias"].shape)
    path = tmp_path / "timm.safetensors"
    save_file(sd, str(path))
    with pytest.raises(SelfmaskError, match=re.escape(str(path)) + ".*head.bias.*not zero"):
        create_backbone("vit_tiny_clip", weights=path)


def test_timm_without_projection_reports_the_missing_proj(tmp_path: Path) -> None:
    sd = _to_timm(_state(_random_model("vit_tiny_clip")))
    del sd["head.weight"], sd["head.bias"]
    path = tmp_path / "timm_headless.safetensors"
    save_file(sd, str(path))
    with pytest.raises(SelfmaskError, match=r"missing key\(s\): proj"):
        create_backbone("vit_tiny_clip", weights=path)
