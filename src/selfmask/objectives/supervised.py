"""The supervised objective: cross-entropy of a head on the backbone's embeddings.

One class serves ``selfmask adapt`` (methods mask, topk, fft and linear; a trained linear
head or the authors' masked-random head) and supervised pretraining; they differ in the
head's parameter groups and the augmentation (``transform``), given at construction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

#: ``transform(uint8_images, generator) -> normalised float images``: the augmentation.
Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class SupervisedObjective(nn.Module):
    """Cross-entropy of ``head(backbone(x))`` on labelled images.

    Args:
        head: the classifier on the embeddings (kept after training, unlike other objectives'
            modules); its state is checkpointed under ``"head"``.
        transform: the batch's augmentation and normalisation.
        head_groups: SGD parameter groups of the head (empty for a frozen head).
    """

    name: ClassVar[str] = "supervised"
    needs_labels: ClassVar[bool] = True
    find_unused_parameters = False

    def __init__(self, head: nn.Module, transform: Transform, head_groups: list[dict[str, Any]]) -> None:
        super().__init__()
        self.head = head
        self.transform = transform
        self.head_groups = head_groups

    def views(self, images: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        return self.transform(images, generator)

    def step(
        self, backbone: nn.Module, views: torch.Tensor, labels: torch.Tensor | None, *, epoch: int, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        assert labels is not None  # needs_labels: the engine always passes them
        logits = self.head(backbone(views))
        loss = F.cross_entropy(logits.float(), labels)
        n = len(labels)
        return loss, {"loss": float(loss.detach()) * n, "correct": float((logits.argmax(1) == labels).sum()), "seen": n}

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return self.head_groups

    def after_optimizer_step(self, backbone: nn.Module, *, step: int) -> None:
        return None

    def epoch_metrics(self, sums: dict[str, float]) -> dict[str, Any]:
        return {"loss": sums["loss"] / sums["seen"], "train_accuracy": sums["correct"] / sums["seen"]}

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        return {"head": self.head}

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {}

    def config_dict(self) -> dict[str, Any]:
        return {}


def build_supervised(inputs: Any) -> SupervisedObjective:
    """The objective of ``selfmask adapt --objective supervised`` from :class:`ObjectiveInputs`.

    The head is a new ``Linear(embed_dim, num_classes)`` drawn from the global generator:
    trained with ``head_lr`` (methods mask/topk/fft), with the method's learning rate (linear),
    or, with ``head="masked-random"``, frozen and masked like the backbone (the authors' head).
    Augmentation: random crop (and flip) on the uint8 batch, then normalisation.
    """
    from selfmask.data.base import normalize_batch
    from selfmask.masking import mask_model, mask_scores
    from selfmask.training.augment import random_crop_flip

    cfg, info = inputs.cfg, inputs.info
    head = nn.Linear(info.embed_dim, inputs.train_set.num_classes)
    lr, wd = cfg.resolved_lr, cfg.resolved_weight_decay
    if cfg.method == "linear":
        groups = [{"params": list(head.parameters()), "lr": lr, "weight_decay": wd, "name": "head"}]
    elif cfg.head == "masked-random":
        mask_model(head, cfg.head_mask_config())
        groups = [{"params": list(mask_scores(head).values()), "lr": lr, "weight_decay": 0.0, "name": "head-scores"}]
    else:
        groups = [{"params": list(head.parameters()), "lr": cfg.head_lr, "weight_decay": cfg.head_weight_decay,
                   "name": "head"}]

    def transform(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if cfg.augment:
            x = random_crop_flip(x, generator, flip=cfg.flip)
        return normalize_batch(x, info.mean, info.std)

    return SupervisedObjective(head, transform, groups)


__all__ = ["SupervisedObjective", "Transform", "build_supervised"]
