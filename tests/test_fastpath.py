"""The fast mask path (one flat pass per step) computes exactly what the per-layer path computes."""

from __future__ import annotations

import pytest
import torch

from conftest import make_stripes
from selfmask.backbones import backbone_info, build_backbone
from selfmask.masking import MaskConfig, current_masks, mask_model, mask_scores, merge_masks
from selfmask.masking.model import disable_fast_masks, enable_fast_masks, iter_score_masks
from selfmask.training.config import TrainConfig
from selfmask.training.trainer import adapt, speed_setup

INFO = backbone_info("resnet_tiny")
DATA = make_stripes(48, seed=0, size=16)


def _masked(config: MaskConfig, fast: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = mask_model(build_backbone("resnet_tiny"), config)
    if fast:
        assert enable_fast_masks(model) is not None
    return model


@pytest.mark.parametrize(
    "config",
    [MaskConfig(), MaskConfig(trainable_fraction=0.5, seed=4), MaskConfig(threshold=0.5, init_score=2.5)],
    ids=["threshold", "selective", "shifted"],
)
def test_fast_equals_plain_step_by_step(config) -> None:
    plain, fast = _masked(config, False), _masked(config, True)
    opts = [torch.optim.SGD(mask_scores(m).values(), lr=50.0, momentum=0.9) for m in (plain, fast)]
    g = torch.Generator().manual_seed(1)
    flipped = 0
    for _ in range(4):
        x = torch.randn(8, 3, 16, 16, generator=g)
        target = torch.randn(8, INFO.embed_dim, generator=g)
        outs = []
        for model, opt in zip((plain, fast), opts):
            opt.zero_grad()
            out = model(x)
            ((out - target) ** 2).mean().backward()
            opt.step()
            outs.append(out.detach())
        assert torch.equal(outs[0], outs[1])  # the same masked weights, bit for bit
        a, b = current_masks(plain), current_masks(fast)
        assert all(torch.equal(a[k], b[k]) for k in a)
        flipped = sum(int((~m).sum()) for m in a.values())
    sa, sb = mask_scores(plain), mask_scores(fast)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert flipped > 0  # masks moved, so equality says something


def test_training_with_fast_masks_equals_plain() -> None:
    results = []
    for fast in (False, True):
        torch.manual_seed(0)
        cfg = TrainConfig(epochs=2, batch_size=16, fast_masks=fast, seed=2)
        results.append(adapt(build_backbone("resnet_tiny"), INFO, DATA, cfg, progress=False))
    a, b = (mask_scores(r.backbone) for r in results)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in results[0].history] == [r["loss"] for r in results[1].history]


def test_cache_follows_score_changes_and_moves() -> None:
    model = _masked(MaskConfig(), True)
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    scores = mask_scores(model)
    name = next(iter(scores))
    with torch.no_grad():
        scores[name].view(-1)[: scores[name].numel() // 2] = -1.0  # half of one tensor masked out
    reference = _masked(MaskConfig(), False)
    reference.eval()
    reference.load_state_dict(model.state_dict())
    assert torch.equal(model(x), reference(x))
    # scores replaced behind the cache's back (as .to() does): gathered again, same outputs
    for p in scores.values():
        p.data = p.data.clone()
    assert torch.equal(model(x), reference(x))
    with torch.no_grad():
        scores[name].fill_(1.0)  # in-place changes invalidate the cached pass
    reference.load_state_dict(model.state_dict())
    assert torch.equal(model(x), reference(x))
    disable_fast_masks(model)
    assert torch.equal(model(x), reference(x))


def test_merge_after_fast_masks() -> None:
    model = _masked(MaskConfig(), True)
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    before = model(x)
    merged = merge_masks(model)
    assert torch.equal(merged(x), before)


def test_topk_masks_keep_the_plain_path() -> None:
    model = _masked(MaskConfig(mode="topk", keep_ratio=0.5), False)
    assert enable_fast_masks(model) is None
    with pytest.raises(ValueError, match="no masks"):
        enable_fast_masks(build_backbone("resnet_tiny"))


def test_bf16_channels_last_training_runs() -> None:
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=1, batch_size=16, precision="bf16", channels_last=True, seed=2)
    result = adapt(build_backbone("resnet_tiny"), INFO, DATA, cfg, progress=False)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    assert all(s.dtype == torch.float32 for s in mask_scores(result.backbone).values())  # scores stay fp32
    assert any(not bool(m.all()) for m in current_masks(result.backbone).values())


def test_compile_keeps_the_per_layer_path() -> None:
    # the flat cache's lookup is keyed by a Python int per layer: torch.compile would recompile per layer
    for compile_, flat in ((True, False), (False, True)):
        model = mask_model(build_backbone("resnet_tiny"), MaskConfig.preset("resnet"))
        speed_setup(model, TrainConfig(compile=compile_))
        assert all((pm._flat_cache is not None) == flat for _n, _m, _t, pm in iter_score_masks(model))


def test_per_layer_masked_model_traces_into_one_graph() -> None:
    # what --compile relies on: no graph break in the mask's forward or backward (e.g. a scalar read)
    import torch._dynamo as dynamo

    torch.manual_seed(0)
    model = mask_model(build_backbone("resnet_tiny"), MaskConfig.preset("resnet"))
    explanation = dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    dynamo.reset()
    assert explanation.graph_count == 1 and not explanation.break_reasons
