"""The levers that let the SMN help on the embedded benchmark (issue 14): head warm-up, benchmark v2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfmask.backbones import backbone_info, create_backbone
from selfmask.data.embedded import DOWNSTREAM_APPEARANCE, DOWNSTREAM_APPEARANCE_V1, build_embedded
from selfmask.data.multicrop import MultiCrop
from selfmask.data.render import MONO_BACKGROUND, Appearance, compose, render_glyph_masks
from selfmask.errors import SelfmaskError
from selfmask.masking import current_masks, mask_scores
from selfmask.objectives import SwAVConfig
from selfmask.training.config import TrainConfig
from selfmask.training.ssl import adapt_swav

ROOT = Path(__file__).resolve().parents[1]


def _swav_run(warmup: int, epochs: int):
    torch.set_num_threads(1)
    bench = build_embedded(seed=0, size="tiny")
    train = bench.downstream_train.subset(torch.arange(48))
    info = backbone_info("resnet_tiny")
    torch.manual_seed(0)
    backbone = create_backbone("resnet_tiny")
    cfg = TrainConfig(method="mask", objective="swav", epochs=epochs, batch_size=16, lr=50.0, seed=0, mask={"bn": "eval"})
    swav = SwAVConfig(num_prototypes=8, queue_length=0, freeze_prototypes_iters=0, freeze_backbone_iters=warmup)
    crops = MultiCrop.for_input_size(info.input_size, seed=0, mean=info.mean, std=info.std, n_small=1)
    return adapt_swav(backbone, info, train, cfg, swav, crops=crops, progress=False)


def test_head_warmup_leaves_the_scores_untouched_then_lets_them_train() -> None:
    # 3 steps per epoch: a warm-up of 3 covers the first epoch exactly
    warm = _swav_run(warmup=3, epochs=1)
    assert all(bool((s == 1.0).all()) for s in mask_scores(warm.backbone).values())  # no score moved
    assert all(bool(m.all()) for m in current_masks(warm.backbone).values())
    trained = _swav_run(warmup=0, epochs=1)
    assert any(bool((s != 1.0).any()) for s in mask_scores(trained.backbone).values())
    later = _swav_run(warmup=3, epochs=2)  # after the warm-up the scores do learn
    assert any(bool((s != 1.0).any()) for s in mask_scores(later.backbone).values())


def test_head_warmup_config_is_validated_and_recorded() -> None:
    with pytest.raises(SelfmaskError, match="freeze_backbone_iters"):
        SwAVConfig(freeze_backbone_iters=-1)
    cfg = SwAVConfig(freeze_backbone_iters=5)
    assert SwAVConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["freeze_backbone_iters"] == 5


def test_v2_digits_are_light_grey_on_plain_dark_grey_and_v1_is_kept() -> None:
    assert DOWNSTREAM_APPEARANCE.colours == "mono" and DOWNSTREAM_APPEARANCE.textures == ("flat",)
    assert DOWNSTREAM_APPEARANCE.distractor_prob == 0.0
    v2 = build_embedded(seed=0, size="tiny")
    v1 = build_embedded(seed=0, size="tiny", downstream_appearance=DOWNSTREAM_APPEARANCE_V1)
    x = v2.downstream_train.images.float() / 255
    corners = torch.cat([x[..., :3, :3].flatten(2), x[..., -3:, -3:].flatten(2)], -1)  # mostly background
    median = corners.median(-1).values  # (N, 3)
    assert float((median - MONO_BACKGROUND).abs().median()) < 0.03  # dark grey ...
    assert float((median.max(1).values - median.min(1).values).median()) < 0.02  # ... with no hue
    y = v1.downstream_train.images.float() / 255
    v1_corners = torch.cat([y[..., :3, :3].flatten(2), y[..., -3:, -3:].flatten(2)], -1).median(-1).values
    assert float(v1_corners.std(0).mean()) > 5 * float(median.std(0).mean())  # v1: every image its own colours
    # the pretraining splits and the labels are the same draws in both versions
    assert torch.equal(v1.pretrain_train.images, v2.pretrain_train.images)
    assert torch.equal(v1.downstream_train.labels, v2.downstream_train.labels)


def test_flat_texture_and_unknown_colour_scheme() -> None:
    masks = render_glyph_masks(["DejaVuSans.ttf"], "0")
    img = compose(masks.reshape(1, *masks.shape[-2:]).expand(4, -1, -1), 32, Appearance(textures=("flat",), distractor_prob=0.0),
                  torch.Generator().manual_seed(0))
    assert img.shape == (4, 3, 32, 32)
    with pytest.raises(SelfmaskError, match="colours"):
        Appearance(colours="neon")


def test_smn_claims_tool_pairs_seeds(tmp_path: Path) -> None:
    rows = []
    for seed, (lp, smn) in enumerate([(0.5, 0.55), (0.4, 0.38)]):
        rows += [{"method_id": "lp", "label_fraction": 0.01, "seed": seed, "accuracy": lp},
                 {"method_id": "smn-lp", "label_fraction": 0.01, "seed": seed, "accuracy": smn}]
    (tmp_path / "r.json").write_text(json.dumps({"rows": rows}))
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "smn_claims.py"), str(tmp_path / "r.json")],
                         capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if "smn-lp - lp" in ln)
    assert "+0.050" in line and "-0.020" in line and line.rstrip().endswith("| no |")
