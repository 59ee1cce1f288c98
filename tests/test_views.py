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
    same = view_agreement(_pooled(), images, _crops(large_scale=(1.0, 1.0)), labels)
    assert same.large_large == 1.0 and same.class_large_large == 1.0 and same.images == 64
    assert same.large_small is not None and same.chance == 1 / 64
    # pooled pixels of independent random crops of noise images share little: far below identical views
    strong = view_agreement(_pooled(), images, _crops(large_scale=(0.05, 0.2)), labels)
    assert strong.large_large < 0.5
    assert view_agreement(_pooled(), images, _crops(n_small=0, large_scale=(1.0, 1.0))).large_small is None


def test_model_mode_is_restored() -> None:
    model = nn.Sequential(_pooled(), nn.BatchNorm1d(48)).train()
    view_agreement(model, _noise(8), _crops(large_scale=(1.0, 1.0)))
    assert model.training


def test_bad_inputs() -> None:
    with pytest.raises(SelfmaskError, match="at least 2 large crops"):
        view_agreement(nn.Flatten(), _noise(8), _crops(n_large=1))
    with pytest.raises(SelfmaskError, match="B >= 2"):
        view_agreement(nn.Flatten(), _noise(1), _crops())
    with pytest.raises(SelfmaskError, match="labels must have shape"):
        view_agreement(nn.Flatten(), _noise(8), _crops(), labels=torch.zeros(3))
