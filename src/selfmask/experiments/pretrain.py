"""The work behind ``selfmask pretrain``: pretrain a small backbone and save it as a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfmask.errors import SelfmaskError

def pretrain_objectives() -> tuple[str, ...]:
    """Objectives ``selfmask pretrain`` offers: supervised, and every registered self-supervised objective
    (:func:`pretrain_ssl`; SwAV and DINO with recipes scaled to the data, others with their defaults)."""
    from selfmask.objectives.registry import objective_names

    return tuple(objective_names())


def _swav_recipe(info: Any, n: int, epochs: int, steps: int, prototypes: int) -> tuple[Any, float, float]:
    """SwAV pretraining as the paper's ResNet-50 SwAV, scaled to the data: an MLP projection head, a queue of
    at most half the data from a fifth of the epochs on, prototypes frozen for the first twentieth of the steps."""
    from selfmask.objectives import SwAVConfig

    swav = SwAVConfig(
        num_prototypes=prototypes, projection_hidden_dim=2 * info.embed_dim,
        queue_length=min(512, n // 2), queue_start_epoch=max(1, epochs // 5),
        freeze_prototypes_iters=max(1, steps // 20),
    )
    return swav, 0.3, 1e-6


def _dino_recipe(info: Any, n: int, epochs: int, steps: int, prototypes: int) -> tuple[Any, float, float]:
    """DINO with the BatchNorm head its masks needed on this benchmark (docs/dino.md), the last layer frozen
    for the first twentieth of the steps."""
    from selfmask.objectives.dino import DINOConfig

    return DINOConfig(head_batchnorm=True, freeze_last_layer_iters=max(1, steps // 20)), 0.03, 1e-4


#: objective -> (settings, default lr, weight decay) of its pretraining recipe; others: defaults, 0.03, 1e-4
_RECIPES = {"swav": _swav_recipe, "dino": _dino_recipe}


def pretrain_ssl(train: Any, *, backbone: str, objective: str, epochs: int, lr: float | None = None,
                 prototypes: int = 100, seed: int = 0, device: str = "cpu",
                 progress: bool = True) -> tuple[Any, list[dict[str, Any]]]:
    """Pretrain every weight of ``backbone`` from a random initialisation with the self-supervised
    ``objective`` (``prototypes``: SwAV's K). Returns ``(backbone, history)``."""
    import torch

    from selfmask.backbones import backbone_info, build_backbone
    from selfmask.training.config import TrainConfig
    from selfmask.training.ssl import adapt_ssl

    info = backbone_info(backbone)
    torch.manual_seed(seed)
    model = build_backbone(backbone)
    steps = max(1, len(train) // 64) * epochs
    recipe = _RECIPES.get(objective)
    settings, default_lr, wd = recipe(info, len(train), epochs, steps, prototypes) if recipe else (None, 0.03, 1e-4)
    cfg = TrainConfig(method="fft", objective=objective, epochs=epochs, lr=lr or default_lr, weight_decay=wd,
                      warmup_epochs=min(1.0, epochs / 10), seed=seed, device=device)
    result = adapt_ssl(model, info, train, cfg, settings, objective=objective, progress=progress)
    return result.backbone, result.history


def pretrain_swav(train: Any, *, backbone: str, epochs: int, lr: float | None = None, prototypes: int = 100,
                  seed: int = 0, device: str = "cpu", progress: bool = True) -> tuple[Any, list[dict[str, Any]]]:
    """SwAV pretraining (:func:`pretrain_ssl` with ``objective="swav"``)."""
    return pretrain_ssl(train, backbone=backbone, objective="swav", epochs=epochs, lr=lr, prototypes=prototypes,
                        seed=seed, device=device, progress=progress)


def run_pretrain(*, data: str, backbone: str, objective: str, epochs: int, out: Path, lr: float | None = None,
                 prototypes: int = 100, seed: int = 0, device: str = "cpu", overwrite: bool = False,
                 cache_dir: Path | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Check the settings, pretrain ``backbone`` on ``data`` with ``objective`` and save it to ``out``
    (``.safetensors``); returns the training history."""
    from selfmask.backbones import backbone_info
    from selfmask.data.sources import load_data
    from selfmask.storage.container import check_output_path
    from selfmask.training.pretrain import pretrain_supervised, save_backbone
    from selfmask.training.trainer import resolve_device

    info = backbone_info(backbone)
    resolve_device(device)
    if epochs < 1:
        raise SelfmaskError(f"--epochs must be >= 1, got {epochs}")
    if out.suffix != ".safetensors":
        raise SelfmaskError(f"--out {str(out)!r}: expected a .safetensors file name")
    check_output_path(out, overwrite=overwrite)  # not a device, a folder or (without --overwrite) a file
    if objective not in pretrain_objectives():
        raise SelfmaskError(f"--objective must be one of {', '.join(pretrain_objectives())}, got {objective!r}")
    train, _test = load_data(data, resolution=info.input_size, cache_dir=cache_dir)
    if objective == "supervised":
        kw = {"lr": lr} if lr is not None else {}
        model, history = pretrain_supervised(train, backbone=backbone, epochs=epochs, seed=seed, device=device,
                                             progress=progress, **kw)
    else:
        model, history = pretrain_ssl(train, backbone=backbone, objective=objective, epochs=epochs, lr=lr,
                                      prototypes=prototypes, seed=seed, device=device, progress=progress)
    save_backbone(model, out)
    return history


__all__ = ["pretrain_objectives", "pretrain_ssl", "pretrain_swav", "run_pretrain"]
