"""Backbone registry, the CLIP ViT's layout and forward pass, and layout parity with the fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from selfmask.backbones import (
    CLIPVisionTransformer,
    QuickGELU,
    backbone_info,
    build_backbone,
    create_backbone,
    list_backbones,
    timm_vit_to_openai_clip,
)
from selfmask.backbones.registry import CLIP_MEAN, CLIP_STD
from selfmask.errors import SelfmaskError
from selfmask.masking import MaskConfig, mask_model, mask_scores

FIXTURES = Path(__file__).parent / "fixtures" / "layouts"


def _fixture(name: str) -> dict[str, tuple[int, ...]]:
    doc = json.loads((FIXTURES / f"{name}.json").read_text())
    return {k: tuple(s) for k, s in doc["state_dict"]}


def _layout(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def vit_b_32() -> nn.Module:
    torch.manual_seed(0)
    return build_backbone("vit_b_32_clip")


def test_registry_lists_every_backbone_with_its_preprocessing() -> None:
    assert {"resnet18", "resnet50", "resnet_tiny", "resnet_small", "vit_b_32_clip", "vit_tiny_clip"} <= set(
        list_backbones()
    )
    info = backbone_info("vit_b_32_clip")
    assert (info.embed_dim, info.input_size, info.mean, info.std, info.mask_preset) == (
        768,
        224,
        CLIP_MEAN,
        CLIP_STD,
        "vit",
    )
    assert backbone_info("vit_tiny_clip").input_size == 32
    assert backbone_info("vit_b_32_clip_gelu").embed_dim == 768
    assert backbone_info("vit_b_32_clip_gelu", "projected").embed_dim == 512
    with pytest.raises(SelfmaskError, match="unknown backbone 'vit_b_16'"):
        create_backbone("vit_b_16")


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_layout_matches_torchvision_fixture(name: str) -> None:
    expected = {k: s for k, s in _fixture(f"torchvision_{name}").items() if not k.startswith("fc.")}
    assert _layout(build_backbone(name)) == expected


def test_vit_b_32_layout_matches_timm_fixture_after_key_mapping(vit_b_32: nn.Module) -> None:
    timm_state = {k: torch.zeros(s) for k, s in _fixture("timm_vit_base_patch32_clip_224").items()}
    mapped = timm_vit_to_openai_clip(timm_state)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == _layout(vit_b_32)


def test_vit_b_32_has_openai_clip_names_and_size(vit_b_32: nn.Module) -> None:
    layout = _layout(vit_b_32)
    assert layout["conv1.weight"] == (768, 3, 32, 32)
    assert "conv1.bias" not in layout
    assert layout["class_embedding"] == (768,)
    assert layout["positional_embedding"] == (50, 768)
    assert layout["proj"] == (768, 512)
    assert layout["transformer.resblocks.11.attn.in_proj_weight"] == (2304, 768)
    assert layout["transformer.resblocks.11.attn.out_proj.weight"] == (768, 768)
    assert layout["transformer.resblocks.11.mlp.c_fc.weight"] == (3072, 768)
    assert layout["transformer.resblocks.11.mlp.c_proj.weight"] == (768, 3072)
    assert "transformer.resblocks.12.ln_1.weight" not in layout
    # the published parameter count of CLIP ViT-B/32's image tower
    assert sum(p.numel() for p in vit_b_32.parameters()) == 87_849_216
    assert isinstance(vit_b_32.transformer.resblocks[0].mlp.gelu, QuickGELU)


def _reference_clip_forward(
    m: CLIPVisionTransformer, x: torch.Tensor, heads: int, projected: bool = True
) -> torch.Tensor:
    """CLIP's forward written out with explicit tensor algebra (no nn.MultiheadAttention).

    ``projected``: OpenAI's ``encode_image`` (``ln_post(class token) @ proj``); otherwise the
    post-LayerNorm class token (Hugging Face ``CLIPVisionModel(x)[1]``, the authors' features).
    """
    sd = m.state_dict()
    w = sd["conv1.weight"]
    p = w.shape[-1]
    b = x.shape[0]
    patches = x.unfold(2, p, p).unfold(3, p, p)  # B, 3, g, g, p, p
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, -1, 3 * p * p)
    t = patches @ w.reshape(w.shape[0], -1).t()
    t = torch.cat([sd["class_embedding"].expand(b, 1, -1), t], 1) + sd["positional_embedding"]

    def ln(v: torch.Tensor, name: str) -> torch.Tensor:
        return nn.functional.layer_norm(v, v.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-5)

    t = ln(t, "ln_pre")
    d = t.shape[-1]
    for i in range(len(m.transformer.resblocks)):
        pre = f"transformer.resblocks.{i}"
        y = ln(t, f"{pre}.ln_1")
        q, k, v = (y @ sd[f"{pre}.attn.in_proj_weight"].t() + sd[f"{pre}.attn.in_proj_bias"]).split(d, -1)
        q, k, v = (z.reshape(b, -1, heads, d // heads).transpose(1, 2) for z in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, -1) @ v
        a = a.transpose(1, 2).reshape(b, -1, d)
        t = t + a @ sd[f"{pre}.attn.out_proj.weight"].t() + sd[f"{pre}.attn.out_proj.bias"]
        h = ln(t, f"{pre}.ln_2") @ sd[f"{pre}.mlp.c_fc.weight"].t() + sd[f"{pre}.mlp.c_fc.bias"]
        h = h * torch.sigmoid(1.702 * h)
        t = t + h @ sd[f"{pre}.mlp.c_proj.weight"].t() + sd[f"{pre}.mlp.c_proj.bias"]
    cls = ln(t[:, 0], "ln_post")
    return cls @ sd["proj"] if projected else cls


def test_vit_forward_is_clips_computation() -> None:
    torch.manual_seed(0)
    m = build_backbone("vit_tiny_clip", "projected").eval()
    with torch.no_grad():
        for p in m.parameters():  # non-trivial biases and norms
            p.add_(0.05 * torch.randn_like(p))
        x = torch.randn(3, 3, 32, 32)
        out = m(x)
        ref = _reference_clip_forward(m, x, heads=4)
    assert out.shape == (3, 128)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def _openai_clip_checkpoint(path: Path, width: int, output_dim: int, layers: int, heads: int) -> None:
    """A full OpenAI-CLIP-layout checkpoint (``visual.*`` image tower plus a text-tower key) with random weights."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    tower = CLIPVisionTransformer(32, 8, width, layers, heads, output_dim)
    state = {f"visual.{k}": (v + 0.05 * torch.randn_like(v)).contiguous() for k, v in tower.state_dict().items()}
    state["token_embedding.weight"] = torch.randn(10, output_dim)
    save_file(state, str(path))


def test_clip_default_embedding_is_the_post_layernorm_class_token_and_projected_is_encode_image(tmp_path: Path) -> None:
    """Issue 17: the authors' features by default (class token after ln_post); encode_image one option away."""
    file = tmp_path / "clip.safetensors"
    _openai_clip_checkpoint(file, width=128, output_dim=128, layers=4, heads=4)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    default = create_backbone("vit_tiny_clip", file).eval()
    projected = create_backbone("vit_tiny_clip", file, "projected").eval()
    assert (default.embedding, projected.embedding) == ("class_token", "projected")
    with torch.no_grad():
        # float32: the same numbers up to summation order
        torch.testing.assert_close(default(x.float()), _reference_clip_forward(default, x.float(), 4, False))
        torch.testing.assert_close(projected(x.float()), _reference_clip_forward(projected, x.float(), 4, True))
        # float64 (the same weights): equal to 1e-6, so the computation is the reference's
        default.double(), projected.double()
        out_cls, out_proj = default(x), projected(x)
        ref_cls = _reference_clip_forward(default, x, heads=4, projected=False)
        ref_proj = _reference_clip_forward(projected, x, heads=4, projected=True)
    assert out_cls.shape == out_proj.shape == (3, 128)
    assert (out_cls - ref_cls).abs().max() <= 1e-6
    assert (out_proj - ref_proj).abs().max() <= 1e-6
    assert not torch.allclose(out_cls, out_proj)


def test_clip_vit_b_32_embeddings_are_768_and_512() -> None:
    assert backbone_info("vit_b_32_clip").embed_dim == 768
    assert backbone_info("vit_b_32_clip").embedding == "class_token"
    assert backbone_info("vit_b_32_clip", "projected").embed_dim == 512
    assert backbone_info("vit_b_32_clip", "projected").embedding == "projected"
    assert backbone_info("resnet18").embedding == "pooled"
    with torch.device("meta"):
        for embedding, dim in (("class_token", 768), ("projected", 512)):
            m = build_backbone("vit_b_32_clip", embedding)
            assert m(torch.empty(2, 3, 224, 224)).shape == (2, dim) and m.embed_dim == dim
    with pytest.raises(SelfmaskError, match="resnet18.*has no embedding 'projected'.*pooled"):
        backbone_info("resnet18", "projected")
    with pytest.raises(SelfmaskError, match="no embedding 'cls'"):
        create_backbone("vit_tiny_clip", embedding="cls")


def test_vit_rejects_wrong_image_size() -> None:
    with pytest.raises(ValueError, match="32x32"):
        build_backbone("vit_tiny_clip")(torch.zeros(1, 3, 64, 64))


def test_gelu_variant_has_the_same_layout() -> None:
    a = CLIPVisionTransformer(32, 8, 64, 2, 4, 32, activation="quick_gelu")
    b = CLIPVisionTransformer(32, 8, 64, 2, 4, 32, activation="gelu")
    assert _layout(a) == _layout(b)
    with pytest.raises(ValueError, match="activation"):
        CLIPVisionTransformer(32, 8, 64, 2, 4, 32, activation="relu")  # type: ignore[arg-type]


def test_vit_preset_masks_attention_and_mlp_only_and_starts_at_the_pretrained_network() -> None:
    torch.manual_seed(0)
    m = build_backbone("vit_tiny_clip").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for p in m.parameters():  # attention biases start at zero, where a mask has no gradient
            p.add_(0.05 * torch.randn_like(p))
        before = m(x)
    mask_model(m, MaskConfig.preset("vit"))
    scores = mask_scores(m)
    suffixes = {n.split("resblocks.")[1].split(".", 1)[1] for n in scores}
    attn = {f"attn.{n}" for n in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")}
    mlp = {f"mlp.{layer}.{p}" for layer in ("c_fc", "c_proj") for p in ("weight", "bias")}
    assert suffixes == attn | mlp
    assert len(scores) == 4 * 8
    with torch.no_grad():
        torch.testing.assert_close(m(x), before)
    m(x).square().sum().backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in scores.values())
    assert m.conv1.weight.grad is None and m.proj.grad is None


@pytest.mark.parametrize("name", ["resnet_tiny", "resnet_small", "vit_tiny_clip"])
def test_cpu_backbones_return_embeddings_of_the_stated_size(name: str) -> None:
    info = backbone_info(name)
    m = create_backbone(name).eval()
    with torch.no_grad():
        out = m(torch.zeros(2, 3, info.input_size, info.input_size))
    assert out.shape == (2, info.embed_dim)


def test_fixtures_are_what_the_tool_derives_from_the_published_definitions() -> None:
    import importlib.util

    tool_file = FIXTURES.parents[2] / "tools" / "make_layout_fixtures.py"
    spec = importlib.util.spec_from_file_location("make_layout_fixtures", tool_file)
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for name, layout in tool.spec_layouts().items():
        assert _fixture(name) == {k: tuple(s) for k, s in layout}, name
