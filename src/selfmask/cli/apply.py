"""``selfmask apply FILE --backbone NAME [--weights BASE] -o merged.safetensors``: bake a mask into weights."""

from __future__ import annotations

import argparse
import warnings

from selfmask.cli.common import add_base_args, build_base


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "apply",
        help="apply a mask file to backbone weights and export the merged plain weights (safetensors)",
        description=(
            "Check the mask file against the base weights (fingerprint), apply it and write theta * M / alpha "
            "as an ordinary state dict that loads into the plain backbone without selfmask."
        ),
    )
    p.add_argument("file", metavar="FILE", help="mask file")
    add_base_args(p, required=True)
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="merged .safetensors file to write")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--force", action="store_true", help="apply even if the base fingerprint does not match")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from safetensors.torch import save

    from selfmask.errors import SelfmaskError
    from selfmask.storage import atomic_write_bytes, load_mask, merge_mask
    from selfmask.storage.container import check_output_path

    out = Path(args.output)
    inputs = (args.file, args.weights)
    check_output_path(out, overwrite=args.overwrite, inputs=inputs)  # refuse before any work
    mask = load_mask(args.file)
    model = build_base(args, mask, args.file)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merge_mask(model, mask, force=args.force)
    for w in caught:
        print(f"selfmask apply: warning: {w.message}")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    data = save(state, metadata={"selfmask_mask_fingerprint": mask.fingerprint})
    atomic_write_bytes(out, data, overwrite=args.overwrite, inputs=inputs)
    print(f"wrote {out}: {len(state)} tensors of {args.backbone} with {len(mask.masks)} masks merged")
    return 0
