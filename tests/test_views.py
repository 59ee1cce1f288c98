"""view_agreement: instance retrieval between augmented views (the check to run before SwAV)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from selfmask.data.multicrop import MultiCrop, MultiCropConfig
from selfmask.errors import SelfmaskError
from selfmask.evaluation import view_agreement


def _noise(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 16, 16), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _pooled() -> nn.Module:
    """Resolution-independent "embeddings": 4 x 4 average-pooled pixels."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten())


def _crops(**kw) -> MultiCrop:
    base = dict(large_size=16, small_size=8, n_small=1, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    return MultiCrop(MultiCropConfig(**{**base, **kw}), seed=0)


def test_identical_views_are_always_retrieved_and_strong_crops_are_not() -> None:
    images, labels = _noise(), torch.arange(64) % 4
    same = view_agreement(_pooled(), images, _crops(large_scale=(1.0, 1.0), small_scale=(1.0, 1.0)), labels)
    assert same.large_large == 1.0 and same.class_large_large == 1.0 and same.images == 64
    assert same.large_small is not None and same.large_small > 0.9  # the whole image at half size
    assert same.chance == 1 / 64
    # pooled pixels of independent random crops of noise images share little: far below identical views
    strong = view_agreement(_pooled(), images, _crops(large_scale=(0.05, 0.2), small_scale=(0.05, 0.2)), labels)
    assert strong.large_large < 0.5 and strong.large_small < 0.5
    assert view_agreement(_pooled(), images, _crops(n_small=0, large_scale=(1.0, 1.0))).large_small is None


def test_class_figure_counts_neighbours_of_the_same_class() -> None:
    # two copies of each image under different labels: the nearest view is the image itself or its
    # copy (identical pixels, argmax picks the first), so exactly the images listed first are right
    base = _noise(16)
    images = torch.cat([base, base])
    labels = torch.cat([torch.zeros(16, dtype=torch.long), torch.ones(16, dtype=torch.long)])
    res = view_agreement(_pooled(), images, _crops(large_scale=(1.0, 1.0)), labels)
    assert res.class_large_large == pytest.approx(0.5)
    assert res.large_large == pytest.approx(0.5)


def test_same_generator_same_figure_and_default_is_seeded() -> None:
    images, crops = _noise(), _crops(large_scale=(0.2, 0.6))
    a = view_agreement(_pooled(), images, crops, generator=torch.Generator().manual_seed(3))
    b = view_agreement(_pooled(), images, crops, generator=torch.Generator().manual_seed(3))
    assert a == b
    assert view_agreement(_pooled(), images, crops) == view_agreement(_pooled(), images, crops)


def test_eval_mode_during_the_call_and_each_module_restored() -> None:
    seen = []
    model = nn.Sequential(_pooled(), nn.BatchNorm1d(48), nn.BatchNorm1d(48))
    model.train()
    model[2].eval()  # e.g. bn=eval inside a training model
    model[1].register_forward_hook(lambda m, i, o: seen.append(m.training))
    view_agreement(model, _noise(8), _crops(large_scale=(1.0, 1.0)))
    assert seen and not any(seen)
    assert model.training and model[1].training and not model[2].training


def test_bad_inputs() -> None:
    with pytest.raises(SelfmaskError, match="at least 2 large crops"):
        view_agreement(nn.Flatten(), _noise(8), _crops(n_large=1))
    with pytest.raises(SelfmaskError, match="B >= 2"):
        view_agreement(nn.Flatten(), _noise(1), _crops())
    with pytest.raises(SelfmaskError, match="labels must be a tensor of shape"):
        view_agreement(nn.Flatten(), _noise(8), _crops(), labels=torch.zeros(3))
    with pytest.raises(SelfmaskError, match="labels must be a tensor of shape"):
        view_agreement(nn.Flatten(), _noise(8), _crops(), labels=[0] * 8)
    with pytest.raises(SelfmaskError, match=r"expected \(B, D\) embeddings"):
        view_agreement(nn.Sequential(_pooled(), nn.Flatten(0)), _noise(8), _crops())
