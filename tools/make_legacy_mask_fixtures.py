"""Write the legacy (format version 1) mask-file fixtures of tests/test_legacy_masks.py.

The files in tests/fixtures/legacy_masks/ were written by this script at the commit that
added it, before per-part masks of fused q/k/v tensors and the authors' top-k count
(issue 17): they pin what a version-1 file means, so later readers must keep loading and
applying them bit for bit. Re-running this script with newer code writes files in the
newer format; do that only to make new fixtures, never to replace these.

The base model is a tiny CLIP-layout ViT whose weights are a closed-form integer formula
(no random generator, the same numbers on every platform and torch version):
:func:`fixture_model`. Two files: threshold mode with half of q's rows of block 0 off
(the whole-tensor alpha then rescales k and v), and top-k mode with keep_ratio 0.7
(where ``round(k n)`` and the authors' ``n - int((1 - k) n)`` differ). Next to each,
``*.merged.safetensors`` holds the merged masked parameters that version-1 code gives.

    PYTHONPATH=src python tools/make_legacy_mask_fixtures.py tests/fixtures/legacy_masks
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

OUT_NAMES = ("threshold_v1", "topk_v1")


def fixture_model() -> torch.nn.Module:
    """The fixtures' base: CLIP ViT layout, 16 px, patch 8, width 12, 2 blocks, 2 heads; formula weights."""
    from selfmask.backbones.vit import CLIPVisionTransformer

    model = CLIPVisionTransformer(input_resolution=16, patch_size=8, width=12, layers=2, heads=2, output_dim=6)
    with torch.no_grad():
        for i, (_name, p) in enumerate(sorted(model.named_parameters())):
            n = p.numel()
            ints = (torch.arange(n, dtype=torch.int64) * 7919 + i * 104729) % 2001 - 1000
            p.copy_((ints.to(torch.float64) / 4000.0).to(p.dtype).view(p.shape))
    model.backbone_name = "vit_fixture"  # type: ignore[assignment]
    return model


def fixture_scores(shape: torch.Size, salt: int) -> torch.Tensor:
    """Closed-form scores in [-1, 1] (distinct within a tensor for top-k)."""
    n = 1
    for s in shape:
        n *= s
    ints = (torch.arange(n, dtype=torch.int64) * 4099 + salt * 31) % 8191
    return ((ints.to(torch.float64) - 4095.0) / 4096.0).to(torch.float32).view(shape)


def write(out: Path) -> None:
    from selfmask.masking import MaskConfig, iter_score_masks, mask_model, merge_masks
    from selfmask.storage import save_mask

    out.mkdir(parents=True, exist_ok=True)
    configs = {
        "threshold_v1": MaskConfig.preset("vit"),
        "topk_v1": MaskConfig.preset("vit", mode="topk", keep_ratio=0.7),
    }
    for stem, config in configs.items():
        model = mask_model(fixture_model(), config)
        with torch.no_grad():
            for salt, (name, _m, _t, pm) in enumerate(iter_score_masks(model)):
                if config.mode == "topk":
                    pm.scores.copy_(fixture_scores(pm.scores.shape, salt))
                elif name == "transformer.resblocks.0.attn.in_proj_weight":
                    width = pm.scores.shape[1]
                    pm.scores[: width // 2].fill_(-1.0)  # half of q's rows off, k and v all on
                elif salt % 3 == 1:
                    pm.scores.copy_(fixture_scores(pm.scores.shape, salt) + 0.6)  # about 80 % on
        save_mask(model, out / f"{stem}.mask", overwrite=True, source={"fixture": "tools/make_legacy_mask_fixtures.py"})
        masked = [name for name, *_ in iter_score_masks(model)]
        merged = merge_masks(model).state_dict()
        save_file({k: merged[k].contiguous() for k in masked}, str(out / f"{stem}.merged.safetensors"))


if __name__ == "__main__":
    write(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/legacy_masks"))
