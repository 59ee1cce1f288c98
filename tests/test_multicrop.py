"""Multi-crop augmentation: shapes, ranges, determinism, exactness of each operation, bad input."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from selfmask.data.multicrop import MultiCrop, MultiCropConfig, crop_theta, hue_shift, sample_crop_boxes
from selfmask.errors import SelfmaskError

MEAN = (0.5, 0.4, 0.3)
STD = (0.25, 0.2, 0.3)


def _images(batch: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8)


def _plain(**overrides) -> MultiCropConfig:
    """No random photometric changes and no flips: only the crop."""
    values = {"flip_p": 0.0, "jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0, "mean": (0.0,) * 3, "std": (1.0,) * 3}
    values.update(overrides)
    return MultiCropConfig.for_input_size(32, **values)


def test_shapes_dtype_and_value_ranges() -> None:
    mc = MultiCrop.for_input_size(32, small_size=16, mean=MEAN, std=STD)
    crops = mc(_images(5))
    assert len(crops) == 8
    assert [tuple(c.shape) for c in crops] == [(5, 3, 32, 32)] * 2 + [(5, 3, 16, 16)] * 6
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    for c in crops:
        assert c.dtype == torch.float32 and torch.isfinite(c).all()
        pixels = c * std + mean  # back to [0, 1]
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    # the crops differ from each other (random views, not copies)
    assert not torch.allclose(crops[0], crops[1])


def test_for_input_size_scales_the_paper_recipe() -> None:
    paper = MultiCropConfig.for_input_size(224)
    assert (paper.large_size, paper.small_size, paper.n_large, paper.n_small) == (224, 96, 2, 6)
    assert paper.blur_sigma == pytest.approx((0.1, 2.0))
    assert (paper.large_scale, paper.small_scale) == ((0.14, 1.0), (0.05, 0.14))
    assert paper.jitter == (0.8, 0.8, 0.8, 0.2) and (paper.jitter_p, paper.grayscale_p, paper.blur_p) == (0.8, 0.2, 0.5)
    small = MultiCropConfig.for_input_size(32)
    assert (small.large_size, small.small_size) == (32, 14)
    assert small.blur_sigma == pytest.approx((0.1 * 32 / 224, 2.0 * 32 / 224))
    assert MultiCropConfig.for_input_size(32, small_size=16, n_small=4).small_size == 16


def test_deterministic_from_a_seed_or_generator() -> None:
    images = _images()
    a = MultiCrop.for_input_size(32, seed=3)(images)
    b = MultiCrop.for_input_size(32, seed=3)(images)
    c = MultiCrop.for_input_size(32, seed=4)(images)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert any(not torch.equal(x, y) for x, y in zip(a, c))
    mc = MultiCrop.for_input_size(32)
    d = mc(images, generator=torch.Generator().manual_seed(9))
    e = mc(images, generator=torch.Generator().manual_seed(9))
    assert all(torch.equal(x, y) for x, y in zip(d, e))
    # successive calls draw new views
    f = mc(images)
    g = mc(images)
    assert not torch.equal(f[0], g[0])


def test_full_crop_without_augmentation_reproduces_the_image() -> None:
    images = _images(4)
    cfg = _plain(n_small=0, large_scale=(1.0, 1.0), ratio=(1.0, 1.0))
    (out_a, out_b) = MultiCrop(cfg)(images)
    expected = images.float() / 255
    torch.testing.assert_close(out_a, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_b, expected, atol=1e-5, rtol=0)
    normalised = MultiCrop(_plain(n_small=0, large_scale=(1.0, 1.0), ratio=(1.0, 1.0), mean=MEAN, std=STD))(images)
    torch.testing.assert_close(
        normalised[0],
        (expected - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1),
        atol=1e-4,
        rtol=0,
    )


def test_flip_and_grayscale_when_certain() -> None:
    images = _images(3)
    flipped = MultiCrop(_plain(n_small=0, n_large=1, large_scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0))(images)[0]
    torch.testing.assert_close(flipped, images.float().flip(-1) / 255, atol=1e-5, rtol=0)
    gray = MultiCrop(_plain(n_large=1, grayscale_p=1.0))(images)
    for c in gray:
        torch.testing.assert_close(c[:, 0], c[:, 1])
        torch.testing.assert_close(c[:, 1], c[:, 2])


def test_blur_and_jitter_change_the_crop() -> None:
    images = _images(4)
    base = MultiCrop(_plain(n_small=0, n_large=1), seed=5)(images)[0]
    blurred = MultiCrop(_plain(n_small=0, n_large=1, blur_p=1.0, blur_sigma=(1.0, 1.5)), seed=5)(images)[0]
    assert blurred.shape == base.shape
    # blur smooths: neighbouring pixels come closer together
    assert blurred.diff(dim=-1).abs().mean() < 0.8 * base.diff(dim=-1).abs().mean()
    jittered = MultiCrop(_plain(n_small=0, n_large=1, jitter_p=1.0), seed=5)(images)[0]
    assert (jittered - base).abs().mean() > 0.01
    assert jittered.min() >= 0 and jittered.max() <= 1


def test_crop_resampling_equals_kornia_crop_and_resize() -> None:
    kornia = pytest.importorskip("kornia")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(20, 3, 32, 28, generator=g)
    tlhw = sample_crop_boxes(20, 32, 28, (0.05, 0.6), (0.75, 4 / 3), g)
    grid = torch.nn.functional.affine_grid(crop_theta(tlhw, 32, 28), [20, 3, 16, 16], align_corners=True)
    ours = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    top, left, h, w = (tlhw[:, i].float() for i in range(4))
    x0, y0, x1, y1 = left, top, left + w - 1, top + h - 1
    boxes = torch.stack(
        [torch.stack(p, 1) for p in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))], dim=1
    )
    theirs = kornia.geometry.transform.crop_and_resize(x, boxes, (16, 16), align_corners=True)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_hue_shift_equals_kornia_adjust_hue() -> None:
    kornia = pytest.importorskip("kornia")
    g = torch.Generator().manual_seed(1)
    x = torch.rand(12, 3, 8, 8, generator=g)
    x[:3] = x[:3, :1]  # gray images: hue undefined, must stay unchanged
    turns = torch.rand(12, generator=g) * 0.4 - 0.2
    expected = kornia.enhance.adjust_hue(x, turns * 2 * math.pi)
    torch.testing.assert_close(hue_shift(x, turns), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(hue_shift(x[:3], turns[:3]), x[:3], atol=1e-6, rtol=0)


def test_sampled_boxes_lie_inside_and_cover_the_requested_area() -> None:
    g = torch.Generator().manual_seed(2)
    tlhw = sample_crop_boxes(2000, 32, 32, (0.14, 1.0), (3 / 4, 4 / 3), g)
    top, left, h, w = tlhw.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    area = (h * w).float() / (32 * 32)
    assert area.min() >= 0.10 and area.max() <= 1.0  # 0.14 up to rounding of the sides
    assert area.mean() > 0.4
    # impossible aspect ratios fall back to a centre crop
    fallback = sample_crop_boxes(5, 32, 32, (0.9, 1.0), (3.0, 4.0), g)
    assert (fallback[:, 2] == round(32 / 3)).all() and (fallback[:, 3] == 32).all()


def test_bad_inputs() -> None:
    mc = MultiCrop.for_input_size(32)
    with pytest.raises(SelfmaskError, match="larger than the 24x24 images"):
        mc(_images(4, size=24))
    with pytest.raises(SelfmaskError, match="uint8"):
        mc(_images(4).float())
    with pytest.raises(SelfmaskError, match="uint8"):
        mc(_images(4)[:, :1])
    with pytest.raises(SelfmaskError, match="smaller than min_batch=2"):
        mc(_images(1))
    with pytest.raises(SelfmaskError, match="small_size"):
        MultiCropConfig(large_size=32, small_size=48)
    with pytest.raises(SelfmaskError, match="large_scale"):
        MultiCropConfig(large_scale=(0.5, 1.5))
    with pytest.raises(SelfmaskError, match="blur_p"):
        MultiCropConfig(blur_p=2.0)
    with pytest.raises(SelfmaskError, match="n_large"):
        MultiCropConfig(n_large=0)
    with pytest.raises(SelfmaskError, match="input_size"):
        MultiCropConfig.for_input_size(0)


def test_missing_kornia_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "kornia", None)
    with pytest.raises(SelfmaskError, match="kornia"):
        MultiCrop.for_input_size(32)


def test_feeds_the_swav_objective() -> None:
    from selfmask.backbones import build_backbone
    from selfmask.objectives import SwAVConfig, SwAVObjective

    torch.manual_seed(0)
    backbone = build_backbone("resnet_tiny")
    crops = MultiCrop.for_input_size(32, n_small=2)(_images(4))
    embeddings = [backbone(c) for c in crops]
    obj = SwAVObjective(128, SwAVConfig(num_prototypes=10, queue_length=0))
    loss, stats = obj(embeddings)
    loss.backward()
    assert math.isfinite(loss.item()) and stats["prototypes_used"] > 0


def test_augment_benchmark_reports_its_settings() -> None:
    from selfmask.bench.augment import augment_throughput

    threads = torch.get_num_threads()
    out = augment_throughput(batch=4, n_small=2, repeats=1, calls_per_block=1, threads=1)
    assert torch.get_num_threads() == threads  # restored
    assert out["crops"] == "2x32 + 2x16" and out["threads"] == 1 and out["batch"] == 4
    assert out["images_per_s"] > 0 and out["step_s"] > 0
    assert out["augment_over_step"] == pytest.approx(out["augment_s"] / out["step_s"])
