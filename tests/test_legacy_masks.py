"""Mask files written by older versions keep loading and applying bit for bit.

The fixtures in tests/fixtures/legacy_masks/ were written by tools/make_legacy_mask_fixtures.py
with format-version-1 code (before per-part masks of fused q/k/v tensors and the authors'
top-k count); their merged weights are stored next to them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfmask.masking import current_masks, merge_masks
from selfmask.storage import apply_mask, load_mask

FIXTURES = Path(__file__).parent / "fixtures" / "legacy_masks"
TOOL = Path(__file__).parents[1] / "tools" / "make_legacy_mask_fixtures.py"


def _tool():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("make_legacy_mask_fixtures", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("stem", ["threshold_v1", "topk_v1"])
def test_version_1_file_loads_and_applies_bit_for_bit(stem: str) -> None:
    mask = load_mask(FIXTURES / f"{stem}.mask")
    assert mask.version == 1
    model = apply_mask(_tool().fixture_model(), mask)
    for name, got in current_masks(model).items():
        assert torch.equal(got, mask.masks[name]), name
    merged = merge_masks(model).state_dict()
    expected = load_file(str(FIXTURES / f"{stem}.merged.safetensors"))
    assert expected
    for name, value in expected.items():
        assert torch.equal(merged[name], value), name


def test_version_1_threshold_fixture_scales_k_with_q() -> None:
    """The fixture pins the old meaning: one alpha over the fused q/k/v tensor rescales k too."""
    base = _tool().fixture_model().state_dict()["transformer.resblocks.0.attn.in_proj_weight"]
    merged = load_file(str(FIXTURES / "threshold_v1.merged.safetensors"))["transformer.resblocks.0.attn.in_proj_weight"]
    width = base.shape[1]
    assert not torch.equal(merged[width : 2 * width], base[width : 2 * width])
