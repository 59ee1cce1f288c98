"""Mask files written by older selfmask versions keep loading.

``tests/fixtures/maskfile_v1.mask`` was written by the version-1 writer (before the codec
conditioned on the base weights, issue 19) from :func:`v1_masks`, with every version-1
codec (``packbits``, ``ans``, ``ans-channel``, ``const``), an extra tensor and a source.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from selfmask.storage import load_mask

FIXTURE = Path(__file__).parent / "fixtures" / "maskfile_v1.mask"


def v1_masks() -> dict[str, torch.Tensor]:
    """The masks stored in the fixture (numpy's default generator: the same numbers on every version)."""
    rng = np.random.default_rng(19)
    rows = np.where(np.arange(8) % 2 == 0, 0.03, 0.97)[:, None]
    return {
        "a.weight": torch.from_numpy(rng.random((16, 3, 3, 3)) < 0.5),
        "b.weight": torch.from_numpy(rng.random((64, 9)) < 0.03),
        "c.weight": torch.from_numpy(rng.random((8, 40)) < rows),
        "d.weight": torch.ones(4, 4, dtype=torch.bool),
    }


def test_version_1_file_loads_and_decodes_without_base_weights() -> None:
    mf = load_mask(FIXTURE)
    assert mf.version == 1
    assert [t.codec for t in mf.tensors] == ["packbits", "ans", "ans-channel", "const"]
    assert mf.backbone == "resnet_tiny" and mf.fingerprint == "ab" * 32 and mf.source == {"fixture": "v1"}
    expected = v1_masks()
    assert list(mf.masks) == list(expected)
    for name, m in expected.items():
        assert torch.equal(mf.masks[name], m), name
    assert torch.equal(mf.extra["head.bias"], torch.arange(3, dtype=torch.float32))
