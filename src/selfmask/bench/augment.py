"""Throughput of the SwAV multi-crop pipeline against the masked training step it feeds.

One uint8 batch is turned into multi-crop views by :class:`~selfmask.data.multicrop.MultiCrop`,
and a masked backbone takes one SwAV training step on such views (every crop through the
backbone, :class:`~selfmask.objectives.SwAVObjective`, backward, SGD on the scores and the
head). The two are timed side by side in one process, interleaved in blocks, and compared
by their medians, so a noisy machine affects both alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from selfmask.backbones import backbone_info, build_backbone
from selfmask.bench.timing import interleaved_medians
from selfmask.data.multicrop import MultiCrop
from selfmask.masking import MaskConfig, mask_model, mask_scores
from selfmask.masking.model import enable_fast_masks
from selfmask.objectives import SwAVConfig, SwAVObjective


def swav_step_fn(
    backbone: str, crops: list[torch.Tensor], device: torch.device, seed: int, masked: bool = True,
    fast_masks: bool = False,
) -> Callable[[], None]:
    """A closure running one SwAV training step on ``crops`` (same-size crops batched together).

    ``masked``: self-masking (the scores, lr 50); else the plain step, every backbone weight
    trained (lr 0.01). ``fast_masks``: the one-pass mask path training uses by default.
    """
    torch.manual_seed(seed)
    info = backbone_info(backbone)
    model = build_backbone(backbone).to(device)
    if masked:
        mask_model(model, MaskConfig(targets=info.mask_preset))
        if fast_masks:
            enable_fast_masks(model)
        group = {"params": list(mask_scores(model).values()), "lr": 50.0, "weight_decay": 0.0}
    else:
        group = {"params": list(model.parameters()), "lr": 0.01}
    model.train()
    obj = SwAVObjective(info.embed_dim, SwAVConfig(queue_length=0, freeze_prototypes_iters=0)).to(device)
    opt = torch.optim.SGD([group, *obj.param_groups()], momentum=0.9)
    batch = crops[0].shape[0]
    by_size: dict[int, list[torch.Tensor]] = {}
    for c in crops:
        by_size.setdefault(c.shape[-1], []).append(c)
    groups = [torch.cat(v) for v in by_size.values()]  # sizes in first-seen order: large crops first

    def step() -> None:
        embeddings = [e for g in groups for e in model(g).split(batch)]
        loss, _stats = obj(embeddings)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        obj.after_optimizer_step()

    return step


def augment_throughput(
    batch: int = 64,
    image_size: int = 32,
    large_size: int = 32,
    small_size: int = 16,
    n_large: int = 2,
    n_small: int = 6,
    backbone: str = "resnet_tiny",
    repeats: int = 7,
    calls_per_block: int = 3,
    threads: int | None = 2,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, float | int | str]:
    """Images/s of multi-crop augmentation and its time relative to one masked SwAV step.

    Args:
        batch: images per batch (uint8, ``image_size`` square, random content).
        large_size, small_size, n_large, n_small: the crops made from each image.
        backbone: the masked backbone of the training step.
        repeats: interleaved timing blocks (medians over them).
        calls_per_block: augmentation calls / training steps per block.
        threads: ``torch.set_num_threads`` during the measurement (restored after); None keeps it.
        device: where the batch lives and both run.
        seed: seed of the images, the crops and the model.

    Returns:
        A dict with the settings and ``augment_s`` (median seconds per batch),
        ``images_per_s``, ``crops_per_s``, ``step_s`` (median seconds per training step),
        ``augment_over_step`` (augmentation time / step time).
    """
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        dev = torch.device(device)
        info = backbone_info(backbone)
        g = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (batch, 3, image_size, image_size), generator=g, dtype=torch.uint8).to(dev)
        multicrop = MultiCrop.for_input_size(
            large_size, seed=seed, small_size=small_size, n_large=n_large, n_small=n_small, mean=info.mean, std=info.std
        )
        crops = multicrop(images)
        step = swav_step_fn(backbone, crops, dev, seed)
        variants: dict[str, Callable[[], object]] = {"augment": lambda: multicrop(images), "step": step}
        med, _ = interleaved_medians(variants, repeats, calls_per_block, dev)
        aug, step_s = med["augment"], med["step"]
        return {
            "backbone": backbone,
            "device": device,
            "threads": torch.get_num_threads(),
            "batch": batch,
            "image_size": image_size,
            "crops": f"{n_large}x{large_size} + {n_small}x{small_size}",
            "repeats": repeats,
            "augment_s": aug,
            "images_per_s": batch / aug,
            "crops_per_s": batch * (n_large + n_small) / aug,
            "step_s": step_s,
            "augment_over_step": aug / step_s,
        }
    finally:
        torch.set_num_threads(old_threads)


__all__ = ["augment_throughput", "swav_step_fn"]
