"""Core masking: exactness at init, the straight-through gradient, merging, theorems 1-2, layers."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from selfmask import (
    MaskConfig,
    current_masks,
    mask_model,
    mask_scores,
    mask_summary,
    merge_masks,
)
from selfmask.backbones import build_backbone
from selfmask.masking import MaskedWeight, ScoreMask, is_masked


def small_convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )


CONV_TARGETS = ["0.weight", "3.weight", "8.weight"]


# --------------------------------------------------------------------------- init


@pytest.mark.parametrize("name", ["resnet_tiny", "resnet18"])
def test_masked_model_equals_pretrained_at_init(name: str) -> None:
    torch.manual_seed(0)
    model = build_backbone(name).eval()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    masked = mask_model(model, MaskConfig.preset("resnet"))
    assert torch.equal(masked(x), ref(x))  # S0 > mu: M = 1, alpha = 1, exactly


def test_only_scores_are_trainable() -> None:
    model = mask_model(small_convnet(), MaskConfig(targets=CONV_TARGETS))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.parametrizations.weight.0.scores" for m in ("0", "3", "8")}
    assert set(mask_scores(model)) == set(CONV_TARGETS)
    masks = current_masks(model)
    assert all(m.dtype == torch.bool and bool(m.all()) for m in masks.values())


def test_resnet_preset_targets() -> None:
    model = build_backbone("resnet18")
    conv_names = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    mask_model(model, MaskConfig.preset("resnet"))
    assert set(mask_scores(model)) == {f"{n}.weight" for n in conv_names}
    assert "layer2.0.downsample.0.weight" in mask_scores(model)
    model2 = mask_model(build_backbone("resnet18"), MaskConfig.preset("resnet-authors"))
    assert "layer2.0.downsample.1.bias" in mask_scores(model2)
    assert "bn1.weight" not in mask_scores(model2)


# --------------------------------------------------------------------------- gradient


def _dense_reference(weight: torch.Tensor, scores: torch.Tensor, mu: float, rescale: bool) -> torch.Tensor:
    """Straight-through by the detach trick, alpha from the STE mask (the authors' code)."""
    hard = (scores > mu).to(scores.dtype)
    m = hard + scores - scores.detach()
    out = weight * m
    if rescale:
        out = out / torch.sqrt(m.mean())
    return out


@pytest.mark.parametrize("rescale", [True, False])
def test_score_gradient_matches_dense_reference_float64(rescale: bool) -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, 3, 3, generator=g, dtype=torch.float64)
    scores = torch.randn(6, 5, 3, 3, generator=g, dtype=torch.float64)  # ~half masked
    upstream = torch.randn(6, 5, 3, 3, generator=g, dtype=torch.float64)

    s1 = scores.clone().requires_grad_()
    out = MaskedWeight.apply(weight, s1, s1.detach() > 0.0, rescale)
    (out * upstream).sum().backward()

    s2 = scores.clone().requires_grad_()
    ref = _dense_reference(weight, s2, 0.0, rescale)
    (ref * upstream).sum().backward()

    torch.testing.assert_close(out, ref.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-12, atol=1e-12)
    if rescale:
        # the alpha term is really there: without it the gradient differs
        mask = (scores > 0).double()
        inv_alpha = 1 / mask.mean().sqrt()
        no_alpha_term = upstream * weight * inv_alpha
        assert not torch.allclose(s1.grad, no_alpha_term)
        # and it equals the analytic expression
        n = mask.numel()
        analytic = no_alpha_term - (upstream * weight * mask).sum() * inv_alpha**3 / (2 * n)
        torch.testing.assert_close(s1.grad, analytic, rtol=1e-12, atol=1e-12)


def test_weight_gradient_when_requested() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda w_: MaskedWeight.apply(w_, s, s.detach() > 0, True), (w,))


def test_all_zero_mask_is_finite() -> None:
    w = torch.randn(3, 3)
    s = torch.full((3, 3), -1.0, requires_grad=True)
    out = MaskedWeight.apply(w, s, s.detach() > 0, True)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(3, 3))
    assert torch.isfinite(s.grad).all()


# --------------------------------------------------------------------------- merge


@pytest.mark.parametrize("bn", ["train", "eval"])
def test_merge_masks_matches_masked_model(bn: str) -> None:
    model = mask_model(build_backbone("resnet_tiny"), MaskConfig.preset("resnet", bn=bn))
    g = torch.Generator().manual_seed(3)
    for s in mask_scores(model).values():  # a non-trivial mask (~30 % off)
        s.data.copy_(torch.randn(s.shape, generator=g) + 0.5)
    model.eval()
    x = torch.randn(4, 3, 32, 32, generator=g)
    expected = model(x)
    merge_masks(model)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert not any("scores" in n or "parametrizations" in n for n, _ in model.named_parameters())
    assert not any(m._forward_pre_hooks for m in model.modules())
    # loads into a plain model with no masking machinery
    plain = build_backbone("resnet_tiny").eval()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)


def test_merge_without_masks_raises() -> None:
    with pytest.raises(ValueError, match="no masks"):
        merge_masks(small_convnet())


# --------------------------------------------------------------------------- theorems 1 and 2


def _train_masks(lr: float, s0: float, mu: float, weight_decay: float = 0.0, steps: int = 50) -> list[dict]:
    model = small_convnet(seed=0)
    mask_model(model, MaskConfig(targets=CONV_TARGETS, init_score=s0, threshold=mu))
    opt = torch.optim.SGD(mask_scores(model).values(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(1)
    history = []
    for _ in range(steps):
        x = torch.randn(16, 3, 8, 8, generator=g)
        y = torch.randint(0, 4, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        history.append({k: v.clone() for k, v in current_masks(model).items()})
    return history


def _same_masks(a: list[dict], b: list[dict]) -> list[bool]:
    return [all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b)]


def test_theorems_paper_pair_gives_identical_masks() -> None:
    base = _train_masks(lr=50.0, s0=1.0, mu=0.0)
    # masks must actually move, otherwise the comparison is empty
    assert not all(bool(m.all()) for m in base[-1].values())
    changes = sum(not s for s in _same_masks(base[:-1], base[1:]))
    assert changes >= 5
    paper = _train_masks(lr=100.0, s0=2.5, mu=0.5)
    assert all(_same_masks(base, paper))


def test_power_of_two_scaling_is_bit_identical() -> None:
    base = _train_masks(lr=50.0, s0=1.0, mu=0.0)
    scaled = _train_masks(lr=200.0, s0=4.0, mu=0.0)
    assert all(_same_masks(base, scaled))


def test_weight_decay_breaks_the_equivalence() -> None:
    base = _train_masks(lr=50.0, s0=1.0, mu=0.0, weight_decay=5e-3)
    paper = _train_masks(lr=100.0, s0=2.5, mu=0.5, weight_decay=5e-3)
    assert not all(_same_masks(base, paper))


# --------------------------------------------------------------------------- layer kinds


def test_multihead_attention_in_proj_and_fused_qkv() -> None:
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
            self.qkv = nn.Linear(16, 48)  # timm-style fused qkv
            self.proj = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, _ = self.attn(x, x, x, need_weights=False)
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            b = nn.functional.scaled_dot_product_attention(q, k, v)
            return self.proj(a + b)

    model = Block()
    with torch.no_grad():  # MHA initialises its biases to zero, whose score gradient g*theta is 0
        model.attn.in_proj_bias.normal_()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 5, 16)
    targets = ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "qkv.weight", "qkv.bias"]
    mask_model(model, MaskConfig(targets=targets))
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    model(x).pow(2).sum().backward()
    for name, s in mask_scores(model).items():
        assert s.grad is not None and s.grad.abs().sum() > 0, name


def test_vit_preset_on_clip_and_timm_names() -> None:
    clip_like = nn.ModuleDict(
        {
            "attn": nn.MultiheadAttention(8, 2),
            "mlp": nn.ModuleDict({"c_fc": nn.Linear(8, 32), "c_proj": nn.Linear(32, 8)}),
            "ln_1": nn.LayerNorm(8),
        }
    )
    mask_model(clip_like, MaskConfig.preset("vit"))
    assert set(mask_scores(clip_like)) == {
        "attn.in_proj_weight",
        "attn.in_proj_bias",
        "attn.out_proj.weight",
        "attn.out_proj.bias",
        "mlp.c_fc.weight",
        "mlp.c_fc.bias",
        "mlp.c_proj.weight",
        "mlp.c_proj.bias",
    }
    timm_like = nn.ModuleDict(
        {
            "attn": nn.ModuleDict({"qkv": nn.Linear(8, 24), "proj": nn.Linear(8, 8)}),
            "mlp": nn.ModuleDict({"fc1": nn.Linear(8, 32), "fc2": nn.Linear(32, 8)}),
            "norm1": nn.LayerNorm(8),
        }
    )
    mask_model(timm_like, MaskConfig.preset("vit"))
    assert len(mask_scores(timm_like)) == 8 and "norm1.weight" not in mask_scores(timm_like)


def test_toy_problem_learned_by_masks_alone() -> None:
    """A frozen random network learns a 2-class problem through its masks only."""
    g = torch.Generator().manual_seed(0)
    n = 512
    x = torch.randn(n, 2, generator=g)
    y = ((x[:, 0] * x[:, 1]) > 0).long()  # XOR-like: not linearly separable
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 2))
    mask_model(model, MaskConfig(targets=["weight", "bias"]))
    opt = torch.optim.SGD(mask_scores(model).values(), lr=20.0, momentum=0.9)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    x_test = torch.randn(1024, 2, generator=g)
    y_test = ((x_test[:, 0] * x_test[:, 1]) > 0).long()
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert acc > 0.85, acc
    assert all(p.requires_grad is False for n_, p in model.named_parameters() if "original" in n_)


# --------------------------------------------------------------------------- top-k, BN, state dict


def test_topk_keeps_exact_fraction_per_tensor() -> None:
    model = mask_model(small_convnet(), MaskConfig(targets=CONV_TARGETS, mode="topk", keep_ratio=0.3))
    for name, m in current_masks(model).items():
        assert int(m.sum()) == max(1, m.numel() - int((1 - 0.3) * m.numel())), name  # the authors: n - int((1 - k) n)
    x = torch.randn(4, 3, 8, 8)
    model(x).sum().backward()
    assert all(s.grad is not None for s in mask_scores(model).values())


def test_bn_policy() -> None:
    x = torch.randn(8, 3, 8, 8)
    for bn, should_change in (("train", True), ("eval", False)):
        model = mask_model(small_convnet(), MaskConfig(targets=CONV_TARGETS, bn=bn))
        model.train()
        before = model[1].running_mean.clone()
        model(x)
        assert (not torch.equal(before, model[1].running_mean)) == should_change, bn
        assert not model[1].weight.requires_grad


def test_state_dict_round_trip() -> None:
    cfg = MaskConfig(targets=CONV_TARGETS)
    a = mask_model(small_convnet(), cfg)
    g = torch.Generator().manual_seed(5)
    for s in mask_scores(a).values():
        s.data.copy_(torch.randn(s.shape, generator=g))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = mask_model(small_convnet(seed=9), cfg)
    b.load_state_dict(torch.load(buf, weights_only=True))
    a.eval(), b.eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(a(x), b(x))
    for k, m in current_masks(a).items():
        assert torch.equal(m, current_masks(b)[k])


def test_mask_summary_counts() -> None:
    model = mask_model(small_convnet(), MaskConfig(targets=CONV_TARGETS))
    s = mask_scores(model)["3.weight"]
    s.data.view(-1)[:100] = -1.0
    summary = mask_summary(model)
    row = {t.name: t for t in summary.tensors}["3.weight"]
    assert row.numel == 16 * 8 * 9 and row.active == row.numel - 100
    assert summary.raw_bits == summary.numel
    assert 0 < summary.entropy_bits < summary.raw_bits
    assert "3.weight" in str(summary)
    assert summary.to_dict()["masked_weights"] == summary.numel


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "bogus"}, "unknown mode 'bogus'"),
        ({"mode": "topk", "keep_ratio": 0.0}, "keep_ratio must be in"),
        ({"mode": "topk", "keep_ratio": 1.5}, "keep_ratio must be in"),
        ({"mode": "topk"}, "keep_ratio is required"),
        ({"keep_ratio": 0.5}, "only applies to mode='topk'"),
        ({"bn": "frozen"}, "unknown policy"),
        ({"targets": "("}, "invalid regular expression"),
        ({"targets": []}, "empty list"),
        ({"init_score": 0.0, "threshold": 0.5}, "init_score=0.0 <= threshold=0.5"),
        ({"threshold": float("nan")}, "finite"),
    ],
)
def test_invalid_config_raises(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        MaskConfig(**kwargs)


def test_target_matching_nothing_lists_names() -> None:
    with pytest.raises(ValueError, match=r"'nope\.weight' matches no parameter.*0\.weight"):
        mask_model(small_convnet(), MaskConfig(targets=["0.weight", "nope.weight"]))
    with pytest.raises(ValueError, match="matches no parameter"):
        mask_model(small_convnet(), MaskConfig(targets=r"layer\d+\.conv\.weight"))


def test_masking_twice_raises() -> None:
    model = mask_model(small_convnet(), MaskConfig(targets=CONV_TARGETS))
    with pytest.raises(ValueError, match="already masked"):
        mask_model(model, MaskConfig(targets=CONV_TARGETS))
    assert is_masked(model)


def test_non_floating_target_raises() -> None:
    with pytest.raises(ValueError, match=r"non-floating buffer '1\.num_batches_tracked'"):
        mask_model(small_convnet(), MaskConfig(targets=["1.num_batches_tracked"]))

    class IntParam(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.arange(4), requires_grad=False)

    with pytest.raises(ValueError, match="'table' has dtype torch.int64"):
        mask_model(IntParam(), MaskConfig(targets=["table"]))


def test_score_mask_standalone_parametrization() -> None:
    lin = nn.Linear(4, 3)
    parametrize.register_parametrization(lin, "weight", ScoreMask(lin.weight.shape))
    assert torch.equal(lin.weight, lin.parametrizations.weight.original)


def test_base_state_dict_and_fingerprint_ignore_masking() -> None:
    from selfmask import base_state_dict, model_fingerprint

    plain = build_backbone("resnet_tiny")
    before = model_fingerprint(plain)
    masked = mask_model(copy.deepcopy(plain), MaskConfig.preset("resnet"))
    assert set(base_state_dict(masked)) == set(plain.state_dict())
    assert model_fingerprint(masked) == before
    with torch.no_grad():
        next(iter(mask_scores(masked).values())).fill_(-1.0)  # scores do not change the base
    assert model_fingerprint(masked) == before
    with torch.no_grad():
        plain.conv1.weight[0, 0, 0, 0] += 1.0
    assert model_fingerprint(plain) != before


# ---------------------------------------------------------------- selective masking (paper appendix)


def test_selective_config_validation() -> None:
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="trainable_fraction"):
            MaskConfig(trainable_fraction=bad)
    with pytest.raises(ValueError, match="mode='threshold'"):
        MaskConfig(mode="topk", keep_ratio=0.5, trainable_fraction=0.5)
    config = MaskConfig(targets=CONV_TARGETS, trainable_fraction=0.5)
    assert MaskConfig.from_dict(config.to_dict()) == config
    assert MaskConfig.from_dict({k: v for k, v in MaskConfig().to_dict().items() if k != "trainable_fraction"}) == (
        MaskConfig()
    )


def test_selective_trainable_mask_is_seeded_and_exact() -> None:
    from selfmask.masking.layer import selective_trainable_mask

    a = selective_trainable_mask((16, 8, 3, 3), 0.5, 3, "layer1.0.conv1.weight")
    assert a.shape == (16, 8, 3, 3) and int(a.sum()) == round(0.5 * a.numel())
    assert torch.equal(a, selective_trainable_mask((16, 8, 3, 3), 0.5, 3, "layer1.0.conv1.weight"))
    assert not torch.equal(a, selective_trainable_mask((16, 8, 3, 3), 0.5, 4, "layer1.0.conv1.weight"))
    assert not torch.equal(a, selective_trainable_mask((16, 8, 3, 3), 0.5, 3, "layer1.0.conv2.weight"))
    assert int(selective_trainable_mask((10,), 0.01, 0, "w").sum()) == 1


def test_selective_masking_fixes_untrainable_entries() -> None:
    model = mask_model(small_convnet(), MaskConfig(targets=CONV_TARGETS, trainable_fraction=0.3, seed=2))
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        for s in mask_scores(model).values():
            s.fill_(-1.0)  # every score below the threshold
    masks = current_masks(model)
    for name, pm_entry in zip(masks, mask_scores(model).values()):
        trainable = model.get_submodule(name.rpartition(".")[0]).parametrizations.weight[0].trainable
        assert torch.equal(masks[name], ~trainable)  # only trainable entries can switch off
        assert pm_entry.shape == trainable.shape
    with torch.no_grad():
        for s in mask_scores(model).values():
            s.fill_(1.0)
    model(x).square().sum().backward()
    for name, s in mask_scores(model).items():
        trainable = model.get_submodule(name.rpartition(".")[0]).parametrizations.weight[0].trainable
        assert torch.all(s.grad[~trainable] == 0)
        assert torch.any(s.grad[trainable] != 0)


def test_default_config_has_no_trainable_subset() -> None:
    model = mask_model(small_convnet(), MaskConfig(targets=CONV_TARGETS))
    for module in model.modules():
        if isinstance(module, ScoreMask):
            assert module.trainable is None


@pytest.mark.parametrize("n, keep_ratio", [(432, 0.7), (1000, 0.9), (7, 0.5), (3, 0.01), (2304, 0.923)])
def test_topk_keeps_the_authors_count(n: int, keep_ratio: float) -> None:
    """Issue 17: ``n - int((1 - k) n)`` entries, as the paper's code (not ``round(k n)``)."""
    from selfmask.masking.layer import topk_count, topk_mask

    expected = max(1, n - int((1 - keep_ratio) * n))
    scores = torch.randn(n, generator=torch.Generator().manual_seed(n))
    assert int(topk_mask(scores, keep_ratio).sum()) == topk_count(n, keep_ratio) == expected
    assert topk_count(n, keep_ratio, "round") == max(1, round(keep_ratio * n))
    model = mask_model(torch.nn.Linear(n, 1, bias=False), MaskConfig(targets=["weight"], mode="topk", keep_ratio=keep_ratio))
    assert int(current_masks(model)["weight"].sum()) == expected
