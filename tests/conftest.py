"""Shared test fixtures: small synthetic datasets built by the tests themselves."""

from __future__ import annotations

import pytest
import torch

from selfmask.data.base import ImageTensorDataset


def make_stripes(n: int, seed: int, size: int = 32, num_classes: int = 2) -> ImageTensorDataset:
    """Class c = stripes at angle c*180/num_classes under noise: learnable, not trivially by colour."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    y = y[torch.randperm(n, generator=g)]
    grid = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    angle = y.float() * torch.pi / num_classes
    phase = torch.rand(n, generator=g) * 6.28
    proj = torch.cos(angle)[:, None, None] * xx + torch.sin(angle)[:, None, None] * yy
    img = torch.sin(proj * 0.9 + phase[:, None, None])
    img = img[:, None].expand(n, 3, size, size) + 0.6 * torch.randn(n, 3, size, size, generator=g)
    u8 = ((img * 0.25 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageTensorDataset(u8, y, [f"angle{c}" for c in range(num_classes)], name="stripes")


@pytest.fixture
def stripes_train() -> ImageTensorDataset:
    return make_stripes(256, seed=0)


@pytest.fixture
def stripes_test() -> ImageTensorDataset:
    return make_stripes(256, seed=1)
