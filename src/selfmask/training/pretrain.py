"""Supervised pretraining of a small backbone, the stand-in for downloaded pretrained weights.

The embedded benchmark has no ImageNet checkpoint to start from, so the project pretrains its
own: the backbone plus a temporary linear head, cross-entropy, SGD with momentum and a cosine
schedule, with cheap on-device augmentation (random shift via pad-and-crop, optional flip).
The head is discarded; :func:`save_backbone` writes the backbone state dict as the same
``.safetensors`` file users load their own weights from with
``selfmask.backbones.create_backbone(name, weights=path)``.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from selfmask.backbones import backbone_info, build_backbone
from selfmask.data.base import ImageTensorDataset, normalize_batch
from selfmask.errors import SelfmaskError

DEFAULT_PRETRAIN_BACKBONE = "resnet_tiny"
DEFAULT_PRETRAIN_EPOCHS = 6  # 90,000 image passes: ~2 min at the ~800 img/s resnet_tiny trains at on 2 idle cores
DEFAULT_PRETRAIN_BATCH_SIZE = 64  # the configuration measured in docs/embedded.md
DEFAULT_PRETRAIN_LR = 0.05


def random_shift_flip(x: torch.Tensor, pad: int, flip: bool, gen: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample random crop of a ``pad``-reflect-padded batch ``(B, C, H, W)`` (i.e. a shift of up to
    ``pad`` pixels), and a random horizontal flip when ``flip``. Runs on the tensor's device."""
    b, c, h, w = x.shape
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device)).view(b, 1, h, 1).expand(b, c, h, w + 2 * pad)
        xp = xp.gather(2, rows)
        cols = (ox[:, None] + torch.arange(w, device=x.device)).view(b, 1, 1, w).expand(b, c, h, w)
        x = xp.gather(3, cols)
    if flip:
        do = (torch.rand(b, generator=gen) < 0.5).to(x.device).view(b, 1, 1, 1)
        x = torch.where(do, x.flip(3), x)
    return x


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
        progress: a tqdm bar per epoch with loss and images/s.
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
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_backbone(backbone)
        head = nn.Linear(info.embed_dim, dataset.num_classes)
    model.to(device)
    head.to(device)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(dataset) / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    history: list[dict[str, float]] = []
    for epoch in range(epochs):
        model.train()
        head.train()
        order = torch.randperm(len(dataset), generator=gen)
        t0 = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps_per_epoch, desc=f"pretrain {epoch + 1}/{epochs}", leave=False)
        for start in range(0, len(dataset), batch_size):
            idx = order[start : start + batch_size]
            x = normalize_batch(dataset.images[idx].to(device), info.mean, info.std)
            y = dataset.labels[idx].to(device)
            if augment:
                x = random_shift_flip(x, pad, flip, gen)
            logits = head(model(x))
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(idx)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        if bar is not None:
            bar.close()
        secs = time.perf_counter() - t0
        row = {
            "epoch": epoch + 1,
            "loss": loss_sum / seen,
            "train_accuracy": correct / seen,
            "lr": opt.param_groups[0]["lr"],
            "seconds": secs,
            "images_per_second": seen / secs,
        }
        history.append(row)
        if log is not None:
            log(
                f"pretrain epoch {epoch + 1}/{epochs}: loss {row['loss']:.4f}, train acc {row['train_accuracy']:.3f}, "
                f"{row['images_per_second']:.0f} img/s, {secs:.1f} s"
            )
    model.eval()
    return model, history


def save_backbone(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model``'s state dict as ``.safetensors`` atomically (temp file + ``os.replace``).

    The file loads with ``create_backbone(name, weights=path)``. A model with masks still
    attached (parametrised weights) is refused: merge the masks first.
    """
    from safetensors.torch import save_file

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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
