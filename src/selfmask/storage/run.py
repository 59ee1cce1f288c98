"""Rebuild a masked model from a training run folder (the layout the trainer writes).

``RUN_DIR/config.json`` holds at least ``{"backbone": name, "weights": path or null,
"seed": int, "mask": MaskConfig.to_dict() or null}`` (``weights`` null: the backbone's
random initialisation after ``torch.manual_seed(seed)``; ``mask`` null: the backbone's
preset). ``RUN_DIR/scores.safetensors`` holds the trained scores by qualified parameter
name (the keys of ``mask_scores(model)``); ``RUN_DIR/head.safetensors`` (optional) an
extra trained head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfmask.errors import SelfmaskError
from selfmask.fingerprint import model_fingerprint


@dataclass
class RunModel:
    """A masked model rebuilt from a run folder, with what ``selfmask pack`` records."""

    model: nn.Module
    backbone: str
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    #: fingerprint of the base weights (before training changed any buffer): what a mask file records
    base_fingerprint: str | None = None


def load_run(run_dir: str | Path) -> RunModel:
    """Rebuild the masked model of ``run_dir`` (see :func:`selfmask.training.run_folder.load_run`).

    Extras recorded with the masks: the trained head (``head.*``) and every buffer that
    training changed relative to the base backbone (``buffer.*``: BatchNorm running
    statistics keep updating during mask training with ``bn="train"``, and they are part
    of the adapted model).
    """
    from selfmask.training.run_folder import create_run_base
    from selfmask.training.run_folder import load_run as rebuild_run

    run_dir = Path(run_dir)
    model, head, cfg = rebuild_run(run_dir)
    if cfg.mask is None:
        method = cfg.train.method if cfg.train is not None else None
        raise SelfmaskError(f"run folder {str(run_dir)!r} trained no masks (method {method!r})")
    extra: dict[str, torch.Tensor] = {}
    if head is not None:
        extra.update({f"head.{k}": v.detach() for k, v in head.state_dict().items()})
    base_model = create_run_base(cfg)  # the run's base, as built
    base = dict(base_model.named_buffers())
    for name, buf in model.named_buffers():
        if name in base and not torch.equal(buf, base[name]):
            extra[f"buffer.{name}"] = buf.detach().clone()
    source = {"run_dir": run_dir.name, "weights": cfg.weights, "seed": cfg.seed}
    return RunModel(model, cfg.backbone, extra, source, model_fingerprint(base_model))


__all__ = ["RunModel", "load_run"]
