"""``selfmask backbones [--json]``: every registered backbone with what a user needs to pick and feed it."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "backbones",
        help="list the backbones: input size, embedding size, mask preset, parameters, checkpoint layouts",
        description="Every backbone --backbone accepts, with its input size, embedding(s), MaskConfig preset, "
        "parameter count (masked tensors and weights under the preset) and the checkpoint layouts --weights reads.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from selfmask.backbones import describe_backbone, list_backbones

    rows = [describe_backbone(name) for name in list_backbones()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    embeddings = [
        ", ".join(f"{k} {v}" + (" (default)" if k == r["embedding"] and len(r["embeddings"]) > 1 else "")
                  for k, v in r["embeddings"].items())
        for r in rows
    ]
    ew = max(len(e) for e in embeddings)
    print(f"{'backbone':<{width}}  {'input':>5}  {'embedding':<{ew}}  {'preset':<6}  {'parameters':>11}  "
          f"{'masked (tensors)':>17}  description")
    for r, emb in zip(rows, embeddings):
        masked = f"{r['masked_weights']:,} ({r['masked_tensors']})"
        print(f"{r['name']:<{width}}  {r['input_size']:>5}  {emb:<{ew}}  {r['mask_preset']:<6}  {r['parameters']:>11,}  "
              f"{masked:>17}  {r['description']}")
    print("\ncheckpoint layouts (--weights):")
    seen: dict[tuple[str, ...], list[str]] = {}
    for r in rows:
        seen.setdefault(tuple(r["checkpoint_layouts"]), []).append(r["name"])
    for layouts, names in seen.items():
        print(f"  {', '.join(names)}:")
        for layout in layouts:
            print(f"    - {layout}")
    return 0
