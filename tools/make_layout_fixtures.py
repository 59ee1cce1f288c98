"""Write the layout fixtures of tests/fixtures/layouts and check output parity with torchvision / timm.

A fixture is JSON: ``{"model": ..., "source": ..., "state_dict": [[name, shape], ...]}`` listing
every state-dict entry (parameters and buffers) of the reference model, in its order.

Two sources:

* ``--source spec`` (no dependencies): the names and shapes derived here from the published
  architecture definitions (torchvision ``torchvision/models/resnet.py``: ``ResNet``,
  ``BasicBlock``, ``Bottleneck``, ``_make_layer``; timm ``timm/models/vision_transformer.py``:
  ``VisionTransformer`` with ``vit_base_patch32_clip_224``'s arguments ``patch_size=32,
  embed_dim=768, depth=12, num_heads=12, pre_norm=True`` and the OpenAI pretrained config's
  ``num_classes=512``). This derivation does not use selfmask's models, so the tests that compare
  selfmask against these fixtures are not circular.
* ``--source libraries`` (needs ``torchvision`` and ``timm``, e.g. on the GPU machine): the names
  and shapes of the real models, checked equal to the spec, then written; with ``--check-outputs``
  the same random weights are loaded into torchvision/timm and selfmask (through selfmask's own
  checkpoint loader, from files in the libraries' layouts) and the float32 outputs compared
  (relative error ``||ours - theirs|| / ||theirs||`` must be below 1e-5).

Usage (from the repository root)::

    PYTHONPATH=src python tools/make_layout_fixtures.py --source spec
    PYTHONPATH=src python tools/make_layout_fixtures.py --source libraries --check-outputs --device cuda \
        --report parity.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

Layout = list[tuple[str, list[int]]]

FIXTURES = {
    "torchvision_resnet18": "torchvision.models.resnet18()",
    "torchvision_resnet50": "torchvision.models.resnet50()",
    "timm_vit_base_patch32_clip_224": "timm.create_model('vit_base_patch32_clip_224', num_classes=512)",
}
SPEC_SOURCE = (
    "derived from the published definitions (torchvision/models/resnet.py; timm/models/vision_transformer.py, "
    "vit_base_patch32_clip_224 with the OpenAI pretrained config's num_classes=512) by tools/make_layout_fixtures.py "
    "--source spec; no torchvision/timm was available when it was written"
)


# --- spec: derived from the published definitions, independent of selfmask's modules ------------------


def _batchnorm(prefix: str, c: int) -> Layout:
    return [(f"{prefix}.{n}", [c]) for n in ("weight", "bias", "running_mean", "running_var")] + [
        (f"{prefix}.num_batches_tracked", [])
    ]


def torchvision_resnet_spec(bottleneck: bool, layers: tuple[int, int, int, int], num_classes: int = 1000) -> Layout:
    """torchvision ``ResNet(block, layers)``: 7x7 stem, 4 stages of 64-512 planes, ``fc``."""
    expansion = 4 if bottleneck else 1
    out: Layout = [("conv1.weight", [64, 3, 7, 7])] + _batchnorm("bn1", 64)
    inplanes = 64
    for stage, (planes, blocks, stride) in enumerate(zip((64, 128, 256, 512), layers, (1, 2, 2, 2)), start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            if bottleneck:
                out += [(f"{p}.conv1.weight", [planes, inplanes, 1, 1])] + _batchnorm(f"{p}.bn1", planes)
                out += [(f"{p}.conv2.weight", [planes, planes, 3, 3])] + _batchnorm(f"{p}.bn2", planes)
                out += [(f"{p}.conv3.weight", [planes * 4, planes, 1, 1])] + _batchnorm(f"{p}.bn3", planes * 4)
            else:
                out += [(f"{p}.conv1.weight", [planes, inplanes, 3, 3])] + _batchnorm(f"{p}.bn1", planes)
                out += [(f"{p}.conv2.weight", [planes, planes, 3, 3])] + _batchnorm(f"{p}.bn2", planes)
            if b == 0 and (stride != 1 or inplanes != planes * expansion):
                out += [(f"{p}.downsample.0.weight", [planes * expansion, inplanes, 1, 1])]
                out += _batchnorm(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    out += [("fc.weight", [num_classes, 512 * expansion]), ("fc.bias", [num_classes])]
    return out


def timm_clip_vit_spec(
    patch: int = 32, width: int = 768, depth: int = 12, image: int = 224, num_classes: int = 512
) -> Layout:
    """timm ``VisionTransformer(pre_norm=True, class_token=True, global_pool='token')``."""
    tokens = (image // patch) ** 2 + 1
    out: Layout = [("cls_token", [1, 1, width]), ("pos_embed", [1, tokens, width])]
    out += [("patch_embed.proj.weight", [width, 3, patch, patch])]  # bias=not pre_norm -> no bias
    out += [("norm_pre.weight", [width]), ("norm_pre.bias", [width])]
    for i in range(depth):
        p = f"blocks.{i}"
        out += [(f"{p}.norm1.weight", [width]), (f"{p}.norm1.bias", [width])]
        out += [(f"{p}.attn.qkv.weight", [3 * width, width]), (f"{p}.attn.qkv.bias", [3 * width])]
        out += [(f"{p}.attn.proj.weight", [width, width]), (f"{p}.attn.proj.bias", [width])]
        out += [(f"{p}.norm2.weight", [width]), (f"{p}.norm2.bias", [width])]
        out += [(f"{p}.mlp.fc1.weight", [4 * width, width]), (f"{p}.mlp.fc1.bias", [4 * width])]
        out += [(f"{p}.mlp.fc2.weight", [width, 4 * width]), (f"{p}.mlp.fc2.bias", [width])]
    out += [("norm.weight", [width]), ("norm.bias", [width])]
    out += [("head.weight", [num_classes, width]), ("head.bias", [num_classes])]
    return out


def spec_layouts() -> dict[str, Layout]:
    return {
        "torchvision_resnet18": torchvision_resnet_spec(False, (2, 2, 2, 2)),
        "torchvision_resnet50": torchvision_resnet_spec(True, (3, 4, 6, 3)),
        "timm_vit_base_patch32_clip_224": timm_clip_vit_spec(),
    }


# --- libraries: the real torchvision / timm models -------------------------------------------------


def _library_models() -> dict[str, object]:
    import timm  # type: ignore[import-not-found]
    import torchvision  # type: ignore[import-not-found]

    return {
        "torchvision_resnet18": torchvision.models.resnet18(),
        "torchvision_resnet50": torchvision.models.resnet50(),
        # timm's vit_base_patch32_clip_224 computes exact GELU; OpenAI's weights (and selfmask) use
        # QuickGELU. The layout is the same; for the output comparison use QuickGELU.
        "timm_vit_base_patch32_clip_224": timm.create_model(
            "vit_base_patch32_clip_224", pretrained=False, num_classes=512, act_layer="quick_gelu"
        ),
    }


def library_layout(model: object) -> Layout:
    return [(k, list(v.shape)) for k, v in model.state_dict().items()]  # type: ignore[attr-defined]


def write_fixture(out_dir: Path, name: str, layout: Layout, source: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    rows = ",\n".join("  " + json.dumps([k, s]) for k, s in layout)
    text = (
        f'{{\n"model": {json.dumps(FIXTURES[name])},\n"source": {json.dumps(source)},\n"state_dict": [\n{rows}\n]\n}}\n'
    )
    json.loads(text)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


_UNIT_GAIN = re.compile(r".*(norm\d?|norm_pre|bn\d|downsample\.1)\.weight")


def _randomize_(model: object, seed: int) -> None:
    """Random weights everywhere (BatchNorm statistics included) so the comparison means something."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():  # type: ignore[attr-defined]
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name == "head.bias":
                t.zero_()  # CLIP's projection has no bias; timm stores it as a zero head bias
            else:
                scale = 0.02 if t.dim() > 1 else 0.1
                offset = 1.0 if _UNIT_GAIN.fullmatch(name) else 0.0
                t.copy_(torch.randn(t.shape, generator=g) * scale + offset)


def _parity_cases() -> list[tuple[str, object, str]]:
    """(reference description, reference model, selfmask backbone) pairs whose outputs must agree."""
    import timm  # type: ignore[import-not-found]

    models = _library_models()
    return [
        (FIXTURES["torchvision_resnet18"], models["torchvision_resnet18"], "resnet18"),
        (FIXTURES["torchvision_resnet50"], models["torchvision_resnet50"], "resnet50"),
        (
            "timm.create_model('vit_base_patch32_clip_224', num_classes=512, act_layer='quick_gelu')",
            models["timm_vit_base_patch32_clip_224"],
            "vit_b_32_clip",
        ),
        (
            FIXTURES["timm_vit_base_patch32_clip_224"] + " (exact GELU)",
            timm.create_model("vit_base_patch32_clip_224", pretrained=False, num_classes=512),
            "vit_b_32_clip_gelu",
        ),
    ]


def check_outputs(device: str, seed: int = 0) -> list[dict[str, object]]:
    """Same random weights in the library model and in selfmask's; float32 outputs compared.

    The weights go through files in the library's layout (``.pth`` and ``.safetensors``) and
    selfmask's loader, so the key mapping and head dropping are part of what is checked.
    """
    import torch
    from safetensors.torch import save_file

    from selfmask.backbones import create_backbone

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (reference, ref, ours_name) in enumerate(_parity_cases()):
            _randomize_(ref, seed)
            ref.eval()  # type: ignore[attr-defined]
            state = {k: v.contiguous() for k, v in ref.state_dict().items()}  # type: ignore[attr-defined]
            theirs = ref.to(device)  # type: ignore[attr-defined]
            if hasattr(theirs, "fc"):
                theirs.fc = torch.nn.Identity()  # torchvision's classifier; selfmask returns embeddings
            x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(seed + 1)).to(device)
            rows = []
            for fmt in ("pth", "safetensors"):
                path = Path(tmp) / f"case{i}.{fmt}"
                if fmt == "pth":
                    torch.save(state, path)
                else:
                    save_file(state, str(path))
                ours = create_backbone(ours_name, weights=path).eval().to(device)
                with torch.no_grad():
                    a, b = ours(x).float(), theirs(x).float()
                rows.append({"file": fmt, "rel_error": float((a - b).norm() / b.norm()), "shape": list(a.shape)})
            passed = all(r["rel_error"] < 1e-5 for r in rows)
            results.append(
                {"reference": reference, "ours": ours_name, "device": device, "checks": rows, "passed": passed}
            )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=("spec", "libraries"), default="spec")
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/layouts"))
    parser.add_argument("--check-outputs", action="store_true", help="compare outputs (needs --source libraries)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--report", type=Path, default=None, help="write the parity results as JSON here")
    args = parser.parse_args(argv)

    spec = spec_layouts()
    if args.source == "spec":
        for name, layout in spec.items():
            print(write_fixture(args.out, name, layout, SPEC_SOURCE))
        if args.check_outputs:
            print("--check-outputs needs --source libraries", file=sys.stderr)
            return 2
        return 0

    import timm  # type: ignore[import-not-found]
    import torch
    import torchvision  # type: ignore[import-not-found]

    source = f"torchvision {torchvision.__version__}, timm {timm.__version__}, torch {torch.__version__}"
    ok = True
    for name, model in _library_models().items():
        layout = library_layout(model)
        if layout != spec[name]:
            diff = sorted({(k, tuple(s)) for k, s in layout} ^ {(k, tuple(s)) for k, s in spec[name]})
            print(f"{name}: library layout differs from the spec: {diff[:10]}", file=sys.stderr)
            ok = False
        print(write_fixture(args.out, name, layout, source))
    if args.check_outputs:
        results = check_outputs(args.device)
        print(json.dumps(results, indent=1))
        ok = ok and all(r["passed"] for r in results)
        if args.report:
            args.report.write_text(json.dumps({"source": source, "results": results}, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
