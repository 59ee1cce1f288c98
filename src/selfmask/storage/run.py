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

from selfmask.backbones import backbone_info, create_backbone
from selfmask.errors import SelfmaskError
from selfmask.masking.config import MaskConfig
from selfmask.masking.model import mask_model, mask_scores
from selfmask.storage.container import parse_json


@dataclass
class RunModel:
    """A masked model rebuilt from a run folder, with what ``selfmask pack`` records."""

    model: nn.Module
    backbone: str
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise SelfmaskError(f"{path}: not a readable safetensors file ({exc})") from None


def load_run(run_dir: str | Path) -> RunModel:
    """Rebuild the masked model of ``run_dir``: create the backbone, mask it, load the scores."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise SelfmaskError(f"run folder {str(run_dir)!r}: no config.json")
    cfg = parse_json(config_path.read_bytes(), dict, str(config_path))
    if not isinstance(cfg.get("backbone"), str):
        raise SelfmaskError(f"{config_path}: expected an object with a 'backbone' name")
    backbone, weights, seed = cfg["backbone"], cfg.get("weights"), cfg.get("seed", 0)
    if weights is not None and not isinstance(weights, str):
        raise SelfmaskError(f"{config_path}: 'weights' must be a path or null, got {weights!r}")
    if type(seed) is not int:
        raise SelfmaskError(f"{config_path}: 'seed' must be an integer, got {seed!r}")
    if weights is not None and not Path(weights).exists() and (run_dir / weights).exists():
        weights = str(run_dir / weights)  # a relative path is tried from the run folder as well
    try:
        mask_dict = cfg.get("mask")
        config = (
            MaskConfig.from_dict(mask_dict)
            if mask_dict is not None
            else MaskConfig.preset(backbone_info(backbone).mask_preset)
        )
        if weights is None:
            torch.manual_seed(seed)
        model = create_backbone(backbone, weights)
        mask_model(model, config)
    except (TypeError, ValueError) as exc:
        raise SelfmaskError(f"{config_path}: {exc}") from None

    scores_path = run_dir / "scores.safetensors"
    if not scores_path.is_file():
        raise SelfmaskError(f"run folder {str(run_dir)!r}: no scores.safetensors")
    scores = _read_safetensors(scores_path)
    params = mask_scores(model)
    missing, unexpected = sorted(set(params) - set(scores)), sorted(set(scores) - set(params))
    if missing or unexpected:
        raise SelfmaskError(
            f"{scores_path}: score keys do not match the masked model: missing {missing[:6]}, unexpected {unexpected[:6]}"
        )
    with torch.no_grad():
        for name, p in params.items():
            if tuple(scores[name].shape) != tuple(p.shape):
                raise SelfmaskError(
                    f"{scores_path}: {name!r} has shape {list(scores[name].shape)}, the model needs {list(p.shape)}"
                )
            p.copy_(scores[name].to(p.dtype))
    extra: dict[str, torch.Tensor] = {}
    head_path = run_dir / "head.safetensors"
    if head_path.is_file():
        extra = {f"head.{k}": v for k, v in _read_safetensors(head_path).items()}
    source = {"run_dir": run_dir.name, "weights": cfg.get("weights"), "seed": seed}
    return RunModel(model, backbone, extra, source)


__all__ = ["RunModel", "load_run"]
