"""Any model as a backbone: timm:NAME, torchvision:NAME, open_clip:NAME (stand-ins) and module.path:factory."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from selfmask.backbones import backbone_info, build_backbone, create_backbone
from selfmask.backbones.external import _INFO_CACHE, generic_targets
from selfmask.cli import main
from selfmask.errors import SelfmaskError
from selfmask.masking import MaskConfig, mask_model, mask_scores

STANDINS = Path(__file__).parent / "fixtures" / "standins"
LIBS = ("timm", "torchvision", "open_clip")

USER_MODELS = '''
import torch
from torch import nn


class SmallNet(nn.Module):
    """A user's own classifier: conv body, pooled, then a linear head."""

    input_size = 32
    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)

    def __init__(self, classes: int = 7) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 24, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
        )
        self.proj = nn.Linear(24, 24)
        self.classifier = nn.Linear(24, classes)

    def forward(self, x):
        return self.classifier(torch.relu(self.proj(self.features(x).mean((2, 3)))))


def make():
    return SmallNet()


def make_embedder():
    net = SmallNet()
    net.selfmask_keep_head = True
    return net


def not_a_module():
    return 42


def broken():
    raise ValueError("missing config 'depth'")


def feature_map():
    return nn.Conv2d(3, 4, 3)

answer = 42
'''


@pytest.fixture
def standins(monkeypatch: pytest.MonkeyPatch):
    """The stand-in libraries first on sys.path; their modules and the info cache forgotten afterwards."""
    monkeypatch.syspath_prepend(str(STANDINS))
    yield
    for name in list(sys.modules):
        if name.split(".")[0] in LIBS:
            del sys.modules[name]
    _INFO_CACHE.clear()


@pytest.fixture
def user_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "user_models_i15.py").write_text(USER_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path / "user_models_i15.py"
    sys.modules.pop("user_models_i15", None)
    _INFO_CACHE.clear()


def test_timm_model_head_removed_embedding_by_dry_forward_generic_preset(standins) -> None:
    import timm

    model = create_backbone("timm:tiny_hybrid")
    assert isinstance(model.head, nn.Identity) and model.removed_head_keys == ["head.bias", "head.weight"]
    info = backbone_info("timm:tiny_hybrid")
    assert (info.embed_dim, info.input_size, info.mean, info.std) == (16, 32, (0.5,) * 3, (0.25,) * 3)
    config = MaskConfig(targets=info.mask_preset)
    masked = {n for n, _ in model.named_parameters() if config.matches(n)}
    # every conv and linear weight of the body, the fused qkv included; no BN/LN, no bias
    assert masked == {"stem.0.weight", "blocks.0.0.weight", "blocks.1.0.weight", "attn.qkv.weight", "attn.proj.weight"}
    assert config.parts("attn.qkv.weight", (48, 16)) == 3  # the fused qkv is masked as q, k, v parts
    # the body is timm's: same output as timm's model without its head
    torch.manual_seed(0)
    full = timm.create_model("tiny_hybrid").eval()
    model.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("head.")})
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), full.norm(full.forward_features(x).mean(1)))


def test_weights_from_a_local_file_drop_the_removed_head_with_a_note(standins, tmp_path) -> None:
    import timm

    torch.manual_seed(1)
    full = timm.create_model("tiny_hybrid").eval()
    path = tmp_path / "tiny_hybrid.safetensors"
    save_file(full.state_dict(), str(path))
    model = create_backbone("timm:tiny_hybrid", weights=path).eval()
    assert {k: sorted(v) for k, v in model.weights_report.dropped.items()} == {"removed classifier": ["head.bias", "head.weight"]}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.head(model(x)), model(x))  # Identity
        assert torch.allclose(full.head(model(x)), full(x), atol=1e-6)
    other = tmp_path / "other.safetensors"
    save_file(build_backbone("resnet_tiny").state_dict(), str(other))
    with pytest.raises(SelfmaskError, match=r"does not fit backbone 'timm:tiny_hybrid'.*missing key"):
        create_backbone("timm:tiny_hybrid", weights=other)


def test_torchvision_and_open_clip_stand_ins(standins) -> None:
    tv = create_backbone("torchvision:tinynet")
    assert isinstance(tv.fc, nn.Identity) and tv.removed_head_keys == ["fc.bias", "fc.weight"]
    info = backbone_info("torchvision:tinynet")
    assert (info.embed_dim, info.input_size, info.mean) == (12, 48, (0.485, 0.456, 0.406))  # from the weights enum
    clip = create_backbone("open_clip:tiny-clip")
    assert clip.removed_head_keys == []  # the image tower ends in its projection: nothing removed
    info = backbone_info("open_clip:tiny-clip")
    assert (info.embed_dim, info.input_size, info.mean[0]) == (12, 32, 0.48145466)
    assert MaskConfig(targets=info.mask_preset).matches("mlp.2.weight")


def test_info_does_not_disturb_the_callers_random_stream(standins) -> None:
    torch.manual_seed(3)
    backbone_info("timm:tiny_hybrid")
    a = torch.rand(3)
    torch.manual_seed(3)
    assert torch.equal(torch.rand(3), a)
    torch.manual_seed(5)
    one = create_backbone("timm:tiny_hybrid").state_dict()
    torch.manual_seed(5)
    two = create_backbone("timm:tiny_hybrid").state_dict()
    assert all(torch.equal(one[k], two[k]) for k in one)  # a run folder rebuilds the same random backbone


def test_user_factory_head_removed_and_kept_on_request(user_models) -> None:
    model = create_backbone("user_models_i15:make")
    assert isinstance(model.classifier, nn.Identity) and model.removed_head_keys == ["classifier.bias", "classifier.weight"]
    info = backbone_info("user_models_i15:make")
    assert (info.embed_dim, info.input_size, info.mean) == (24, 32, (0.5,) * 3)
    assert MaskConfig(targets=info.mask_preset).matches("proj.weight")  # the body's linear layer is masked
    kept = create_backbone("user_models_i15:make_embedder")
    assert isinstance(kept.classifier, nn.Linear) and backbone_info("user_models_i15:make_embedder").embed_dim == 7
    by_file = create_backbone(f"{user_models}:make")  # path/to/file.py:factory
    assert by_file.removed_head_keys == ["classifier.bias", "classifier.weight"]


def test_generic_preset_covers_attention_in_proj_and_masks_train() -> None:
    class Tower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 4, stride=4)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.norm = nn.LayerNorm(8)

        def forward(self, x):
            t = self.conv(x).flatten(2).transpose(1, 2)
            return self.norm(t + self.attn(t, t, t, need_weights=False)[0]).mean(1)

    model = Tower()
    pattern = generic_targets(model)
    masked = mask_model(model, MaskConfig(targets=pattern))
    assert set(mask_scores(masked)) == {"conv.weight", "attn.in_proj_weight", "attn.out_proj.weight"}
    masked(torch.randn(2, 3, 16, 16)).sum().backward()
    assert all(s.grad is not None for s in mask_scores(masked).values())


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("timm:no_such_net", "backbone 'timm:no_such_net': timm has no model 'no_such_net'"),
        ("timm:tiny_hybrd", "close matches: tiny_hybrid"),
        ("open_clip:ViT-Q", "open_clip has no model 'ViT-Q'"),
        ("timm:", "no model name after 'timm:'"),
        ("user_models_i15:not_a_module", "not_a_module() returned a int, not a torch.nn.Module"),
        ("user_models_i15:broken", "broken() failed: ValueError: missing config 'depth'"),
        ("user_models_i15:missing", "user_models_i15 has no attribute 'missing'"),
        ("user_models_i15:answer", "user_models_i15.answer is a int, not a callable factory"),
        ("user_models_i15:feature_map", "returns (2, 4, 222, 222) for 2 images of 224 px; expected (batch, embedding)"),
        ("no_such_pkg_i15.models:make", "no module named 'no_such_pkg_i15'"),
        ("not a spec:x y", "not a valid specification; expected timm:NAME"),
    ],
)
def test_bad_specifications_are_one_line(standins, user_models, spec: str, message: str) -> None:
    with pytest.raises(SelfmaskError) as err:
        create_backbone(spec)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_library_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(SelfmaskError, match=r"the library torchvision is not installed.*pip install torchvision"):
        backbone_info("torchvision:resnet50")


def test_cli_adapt_trains_and_evaluates_a_factory_model(user_models, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    args = ["adapt", "--data", "embedded-tiny", "--cache-dir", str(tmp_path / "cache"), "--backbone",
            "user_models_i15:make", "--epochs", "2", "--batch-size", "32", "--out", str(run), "--no-progress"]
    assert main(args) == 0
    res = json.loads((run / "results.json").read_text())
    assert 0 <= res["test_accuracy"] <= 1 and 0 <= res["knn_accuracy"] <= 1
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["backbone"] == "user_models_i15:make"
    targets = MaskConfig.from_dict(cfg["mask"])
    assert targets.matches("features.0.weight") and targets.matches("proj.weight")
    assert not targets.matches("features.1.weight")  # BatchNorm
    from selfmask.training.run_folder import load_run

    backbone, head, _ = load_run(run)  # the run folder rebuilds the model from the specification
    assert head is not None and head.in_features == 24 and set(mask_scores(backbone)) == {
        "features.0.weight", "features.3.weight", "proj.weight"}
    # --mask-targets overrides the generic preset
    assert main([*args[:-3], "--epochs", "1", "--mask-targets", r"proj\.weight", "--out", str(tmp_path / "r2"),
                 "--no-progress"]) == 0
    cfg2 = json.loads((tmp_path / "r2" / "config.json").read_text())
    assert cfg2["mask"]["targets"] == r"proj\.weight"
    assert main([*args[:6], "user_models_i15:not_a_module", "--out", str(tmp_path / "r3")]) == 2
    assert "not_a_module() returned a int, not a torch.nn.Module" in capsys.readouterr().err


def test_cli_adapt_with_the_timm_stand_in_and_local_weights(standins, tmp_path) -> None:
    import timm

    torch.manual_seed(0)
    weights = tmp_path / "tiny_hybrid.pth"
    torch.save(timm.create_model("tiny_hybrid").state_dict(), weights)
    run = tmp_path / "run"
    assert main(["adapt", "--data", "embedded-tiny", "--cache-dir", str(tmp_path / "cache"), "--backbone",
                 "timm:tiny_hybrid", "--weights", str(weights), "--epochs", "1", "--batch-size", "32",
                 "--out", str(run), "--no-progress"]) == 0
    res = json.loads((run / "results.json").read_text())
    assert 0 <= res["test_accuracy"] <= 1
    assert set(json.loads((run / "config.json").read_text())["mask"]) >= {"targets"}
