"""Fused q/k/v tensors are masked as three parts, each with its own alpha and top-k count (issue 17).

OpenAI CLIP and timm keep q, k and v in one tensor (``in_proj_weight``, ``qkv.weight``); the
authors' layout has three, each with its own score tensor and alpha. ``MaskConfig.split_fused``
(the default) reproduces that on the fused layout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfmask.backbones import build_backbone
from selfmask.masking import MaskConfig, ScoreMask, current_masks, iter_score_masks, mask_model, mask_scores, merge_masks
from selfmask.masking.model import enable_fast_masks
from selfmask.storage import FORMAT_VERSION, MaskBank, apply_mask, load_mask, merge_mask, save_mask

QKV = "transformer.resblocks.0.attn.in_proj_weight"
QKV_BIAS = "transformer.resblocks.0.attn.in_proj_bias"


def _tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_backbone("vit_tiny_clip")


def _scramble(model: torch.nn.Module, seed: int = 1) -> None:
    """Scores with about 20 % of the entries off, and half of q's rows of block 0 off."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, scores in mask_scores(model).items():
            scores.copy_(torch.rand(scores.shape, generator=g, dtype=scores.dtype) - 0.2)
        width = mask_scores(model)[QKV].shape[1]
        mask_scores(model)[QKV][: width // 2].fill_(-1.0)


def test_vit_b_32_clip_half_of_q_off_leaves_k_and_v_bit_identical() -> None:
    """The issue's check on the real layout with the default preset: k and v keep alpha = 1.

    In a child process: the 88 M weights and their scores would otherwise raise the peak memory
    of the whole test process (which test_fuzz_maskfile bounds).
    """
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": str(tests.parent / "src"), "OMP_NUM_THREADS": "1"}
    code = "import test_fused_parts as t; t.check_vit_b_32_clip(); print('ok')"
    done = subprocess.run([sys.executable, "-c", code], cwd=tests, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def check_vit_b_32_clip() -> None:
    torch.manual_seed(0)
    model = build_backbone("vit_b_32_clip")
    base_w = model.transformer.resblocks[0].attn.in_proj_weight.detach().clone()
    base_b = model.transformer.resblocks[0].attn.in_proj_bias.detach().clone()
    mask_model(model, MaskConfig.preset("vit"))
    # the authors' count of masked tensors: q, k, v, out, fc1, fc2 x (weight, bias) x 12 blocks
    assert sum(pm.parts for *_n, pm in iter_score_masks(model)) == 144
    with torch.no_grad():
        mask_scores(model)[QKV][: 768 // 2].fill_(-1.0)
        mask_scores(model)[QKV_BIAS][: 768 // 2].fill_(-1.0)
    merged = merge_masks(model).transformer.resblocks[0].attn
    assert torch.equal(merged.in_proj_weight[768:], base_w[768:])
    assert torch.equal(merged.in_proj_bias[768:], base_b[768:])
    assert torch.equal(merged.in_proj_weight[384:768], base_w[384:768] * torch.rsqrt(torch.tensor(0.5)))  # q: alpha of its own
    assert not merged.in_proj_weight[:384].any()


def test_whole_tensor_option_keeps_the_old_meaning() -> None:
    model = mask_model(_tiny(), MaskConfig.preset("vit", split_fused=False))
    base = model.transformer.resblocks[0].attn.parametrizations.in_proj_weight.original.detach().clone()
    with torch.no_grad():
        mask_scores(model)[QKV][:64].fill_(-1.0)
    merged = merge_masks(model).transformer.resblocks[0].attn.in_proj_weight
    assert not torch.equal(merged[128:], base[128:])  # one alpha over q, k, v rescales k


def _three_separate(weight: torch.Tensor, scores: torch.Tensor, grad_out: torch.Tensor):  # noqa: ANN202
    """Out and score gradient of the three parts masked as three separate tensors."""
    outs, grads = [], []
    for w, s, g in zip(weight.chunk(3), scores.chunk(3), grad_out.chunk(3)):
        pm = ScoreMask(w.shape)
        with torch.no_grad():
            pm.scores.copy_(s)
        out = pm(w)
        out.backward(g)
        outs.append(out.detach())
        grads.append(pm.scores.grad)
    return torch.cat(outs), torch.cat(grads)


@pytest.mark.parametrize("fast", [False, True])
def test_parts_compute_what_three_layers_compute(fast: bool) -> None:
    model = mask_model(_tiny(), MaskConfig.preset("vit"))
    _scramble(model)
    if fast:
        enable_fast_masks(model)
    attn = model.transformer.resblocks[0].attn
    pm = attn.parametrizations.in_proj_weight[0]
    weight = attn.parametrizations.in_proj_weight.original
    grad_out = torch.randn(weight.shape, generator=torch.Generator().manual_seed(3))
    out = pm(weight)
    out.backward(grad_out)
    ref_out, ref_grad = _three_separate(weight.detach(), pm.scores.detach().clone(), grad_out)
    assert torch.equal(out.detach(), ref_out)
    torch.testing.assert_close(pm.scores.grad, ref_grad, rtol=1e-5, atol=1e-9)


def test_fast_path_is_bit_identical_to_the_plain_path_with_parts() -> None:
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    results = []
    for fast in (False, True):
        model = mask_model(_tiny(), MaskConfig.preset("vit"))
        _scramble(model)
        if fast:
            assert enable_fast_masks(model) is not None
        out = model(x)
        (out**2).sum().backward()
        grads = {k: v.grad.clone() for k, v in mask_scores(model).items()}
        masks = current_masks(model)
        merged = merge_masks(model).state_dict()
        results.append((out.detach(), grads, masks, merged))
    (o0, g0, m0, w0), (o1, g1, m1, w1) = results
    assert torch.equal(o0, o1)
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name
        assert torch.equal(m0[name], m1[name]), name
    for name in w0:
        assert torch.equal(w0[name], w1[name]), name


def test_topk_keeps_its_count_in_each_part() -> None:
    model = mask_model(_tiny(), MaskConfig.preset("vit", mode="topk", keep_ratio=0.5))
    with torch.no_grad():
        s = mask_scores(model)[QKV]
        s.copy_(torch.arange(s.numel(), dtype=s.dtype).view(s.shape))  # q's scores all below k's and v's
    m = current_masks(model)[QKV]
    assert m.reshape(3, -1).sum(dim=1).tolist() == [128 * 128 // 2] * 3


def test_mask_file_records_parts_and_applies_bit_for_bit(tmp_path) -> None:
    for mode in ("threshold", "topk"):
        kw = {"mode": "topk", "keep_ratio": 0.7} if mode == "topk" else {}
        model = mask_model(_tiny(), MaskConfig.preset("vit", **kw))
        _scramble(model)
        if mode == "topk":
            with torch.no_grad():
                for scores in mask_scores(model).values():
                    scores.copy_(torch.randn(scores.shape, generator=torch.Generator().manual_seed(7)))
        path = tmp_path / f"{mode}.mask"
        save_mask(model, path)
        loaded = load_mask(path)
        assert loaded.version == FORMAT_VERSION and loaded.config.split_fused  # 2 or later
        parts = {t.name: t.parts for t in loaded.tensors}
        assert parts[QKV] == parts[QKV_BIAS] == 3 and parts["transformer.resblocks.0.attn.out_proj.weight"] == 1
        assert {t["name"]: t["parts"] for t in loaded.summary()["tensors"]}[QKV] == 3  # `selfmask inspect` shows it
        expected = merge_masks(model).state_dict()
        merged = merge_mask(_tiny(), loaded).state_dict()
        bank = MaskBank(_tiny())
        bank.add("task", loaded)
        banked = bank.activate("task").state_dict()
        for name in parts:
            assert torch.equal(merged[name], expected[name]), name
            assert torch.equal(banked[name], expected[name]), name


def test_a_model_masked_whole_refuses_a_file_masked_in_parts(tmp_path) -> None:
    from selfmask.errors import SelfmaskError

    save_mask(mask_model(_tiny(), MaskConfig.preset("vit")), tmp_path / "m.mask")
    whole = mask_model(_tiny(), MaskConfig.preset("vit", split_fused=False))
    with pytest.raises(SelfmaskError, match="masked with split_fused=False, the file with split_fused=True"):
        apply_mask(whole, tmp_path / "m.mask")


def test_a_fused_tensor_that_does_not_split_in_three_is_an_error() -> None:
    model = torch.nn.Module()
    model.attn = torch.nn.Module()
    model.attn.in_proj_weight = torch.nn.Parameter(torch.ones(4, 2))
    with pytest.raises(ValueError, match="in_proj_weight.*multiple of 3"):
        mask_model(model, MaskConfig(targets=r"attn\.in_proj_weight"))
