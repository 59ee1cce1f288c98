"""Supervised pretraining of a small backbone, the stand-in for downloaded pretrained weights.

The embedded benchmark has no ImageNet checkpoint to start from, so the project pretrains its
own: the backbone plus a temporary linear head, cross-entropy, SGD with momentum and a cosine
schedule, with cheap on-device augmentation (random shift via pad-and-crop, optional flip).
It runs on the training engine (:func:`selfmask.training.engine.train`) with the supervised
objective; unlike ``adapt`` its data order is drawn from the augmentation generator and the
last partial batch is kept. The head is discarded; :func:`save_backbone` writes the backbone state dict as the same
``.safetensors`` file users load their own weights from with
``selfmask.backbones.create_backbone(name, weights=path)``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfmask.backbones import backbone_info, build_backbone
from selfmask.data.base import ImageTensorDataset, normalize_batch
from selfmask.errors import SelfmaskError
from selfmask.io import atomic_save_safetensors
from selfmask.objectives.supervised import SupervisedObjective
from selfmask.training.augment import random_shift_flip
from selfmask.training.config import TrainConfig
from selfmask.training.distributed import SINGLE
from selfmask.training.engine import train

DEFAULT_PRETRAIN_BACKBONE = "resnet_tiny"
DEFAULT_PRETRAIN_EPOCHS = 6  # 90,000 image passes: ~2 min at the ~800 img/s resnet_tiny trains at on 2 idle cores
DEFAULT_PRETRAIN_BATCH_SIZE = 64  # the configuration measured in docs/embedded.md
DEFAULT_PRETRAIN_LR = 0.05


def pretrain_supervised(
    dataset: ImageTensorDataset,
    backbone: str = DEFAULT_PRETRAIN_BACKBONE,
    epochs: int = DEFAULT_PRETRAIN_EPOCHS,
    batch_size: int = DEFAULT_PRETRAIN_BATCH_SIZE,
    lr: float = DEFAULT_PRETRAIN_LR,
    seed: int = 0,
    device: str | torch.device = "cpu",
    augment: bool = True,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    flip: bool = False,
    pad: int = 4,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train ``backbone`` with a temporary linear head on ``dataset``'s labels; return the backbone.

    Args:
        dataset: uint8 images at the backbone's input size, labels in ``[0, dataset.num_classes)``.
        epochs: passes over the data; the cosine schedule decays per step to 0 over all of them.
        lr: peak SGD learning rate (``momentum``, ``weight_decay`` on every parameter).
        augment: random shift by up to ``pad`` pixels (reflect padding), plus a horizontal flip if
            ``flip`` (off by default: a mirrored glyph can be another class, b/d).
        progress: a tqdm bar per epoch on a terminal; elsewhere one plain line per epoch.
        log: called with one line per epoch.

    Returns:
        ``(backbone, history)``: the trained backbone in eval mode (no head) and one dict per
        epoch with ``epoch, loss, train_accuracy, lr, seconds, images_per_second``.
    """
    if len(dataset) == 0:
        raise SelfmaskError(f"pretrain: dataset {dataset.name!r} is empty")
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise SelfmaskError(f"pretrain: need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    if dataset.num_classes < 2:
        raise SelfmaskError(f"pretrain: dataset {dataset.name!r} has {dataset.num_classes} class(es); need >= 2")
    info = backbone_info(backbone)
    gen = torch.Generator().manual_seed(seed)  # the data order and the augmentation, in one stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_backbone(backbone)
        head = nn.Linear(info.embed_dim, dataset.num_classes)

    def transform(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = normalize_batch(x, info.mean, info.std)
        return random_shift_flip(x, pad, flip, generator) if augment else x

    objective = SupervisedObjective(head, transform, [{"params": list(head.parameters()), "lr": lr,
                                                       "weight_decay": weight_decay, "name": "head"}])
    groups = [{"params": list(model.parameters()), "lr": lr, "weight_decay": weight_decay, "name": "backbone"}]

    def report(row: dict[str, Any]) -> None:
        if log is not None:
            log(
                f"pretrain epoch {row['epoch']}/{epochs}: loss {row['loss']:.4f}, train acc {row['train_accuracy']:.3f}, "
                f"{row['images_per_second']:.0f} img/s, {row['seconds']:.1f} s"
            )

    n = len(dataset)
    cfg = TrainConfig(method="fft", epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                      weight_decay=weight_decay, seed=seed, device=str(device))  # all weights train
    history, _steps = train(
        model, objective, dataset, cfg, param_groups=groups, drop_last=False, progress=progress, on_epoch=report,
        desc="pretrain", order=lambda _epoch: torch.randperm(n, generator=gen), generator=gen, dist=SINGLE,
    )
    model.eval()
    return model, [{k: v for k, v in row.items() if k != "step"} for row in history]


def save_backbone(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model``'s state dict as ``.safetensors`` atomically (:func:`selfmask.io.atomic_save_safetensors`).

    The file loads with ``create_backbone(name, weights=path)``. A model with masks still
    attached (parametrised weights) is refused: merge the masks first.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise SelfmaskError(f"save_backbone: {str(path)!r} must end in .safetensors")
    state = model.state_dict()
    bad = [k for k in state if ".parametrizations." in k]
    if bad:
        raise SelfmaskError(f"save_backbone: model still has masks attached ({bad[0]}, ...); merge them first")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    meta = {"format": "selfmask-backbone"}
    name = getattr(model, "backbone_name", None)
    if isinstance(name, str):
        meta["backbone"] = name
    meta.update(metadata or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(path, tensors, metadata=meta)
    return path


__all__ = ["pretrain_supervised", "random_shift_flip", "save_backbone"]
